"""GPU faults in the stage actors, injected through VPO_FAULTS (the CPU analogue of the GPU drill).

Two DPO runs against the undisturbed reference (conftest.dpo_reference):
- transient: each stage meets one fault once (out of memory in the rewriter, a hung judge
  call, a render worker that dies, a hung video-judge call). The guard splits the batch,
  the watchdog ends the hung actors, Ray restarts them and retries their rows: the DPO set,
  error rows and duplicates equal the undisturbed run.
- persistent: one query per stage always fails there (out of memory in rewrite, an
  exception in critique, out of memory in render and in the video judge) and one query's
  judge call always hangs. Those queries (or their videos) become error rows naming the
  cause, a query whose call always hangs is an error after two strikes, and every other
  query comes out exactly as undisturbed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from relsupport import DPO_EXTRA, DPO_QUERIES, accounting, content, gen_cfg, pid_alive, read_jsonl
from vpo_ray.bench.gpu_faults import outputs_by_query

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

WATCHDOG_S = 20  # far above a tiny-model call on 2 busy cores (~1-3 s), far below the suite's patience
WATCHDOGS = [f"{s}.watchdog_s={WATCHDOG_S}" for s in ("rewrite_stage", "judge_stage", "t2v_stage", "video_judge_stage")]


def videos(rec: dict) -> list[dict]:
    return [json.loads(v) for v in rec["videos"]]


def pick_targets(ref_out: str) -> dict:
    """Query ids to aim at: two with rendered videos (render, video_judge), three others."""
    ref = outputs_by_query(ref_out)
    ran = sorted(q["query_id"] for q in read_jsonl(Path(ref_out) / "candidates.jsonl"))
    with_videos = [q for q in ran if any(v.get("video_uri") for v in videos(ref.get(q, {"videos": []})))]
    others = [q for q in ran if q not in with_videos[:2]]
    assert len(with_videos) >= 2 and len(others) >= 3, f"reference too thin: {len(with_videos)} with videos, {ran}"
    return {"render": with_videos[0], "video_judge": with_videos[1], "rewrite": others[0], "critique": others[1],
            "hang": others[2]}


def run_with_faults(monkeypatch, tmp_path, dpo_queries, spec: str, e):
    """One DPO run with VPO_FAULTS=spec; fills e.tried and e.rows_lost; (out, summary, firings, accounting)."""
    from vpo_ray import faults
    from vpo_ray.pipeline.generate import run_generate

    fired_dir = tmp_path / "fired"
    monkeypatch.setenv("VPO_FAULTS", spec)
    monkeypatch.setenv("VPO_FAULTS_DIR", str(fired_dir))
    out = str(tmp_path / "run")
    summary = run_generate(gen_cfg("dpo", dpo_queries, out, *DPO_EXTRA, *WATCHDOGS))
    fired = faults.fired(str(fired_dir))
    acc = accounting(out, "dpo", len(DPO_QUERIES), allow_tmp=True)
    e.tried, e.rows_lost = len(fired), acc["rows_lost"]
    return out, summary, fired, acc


def test_transient_gpu_faults_in_every_stage_change_no_output(dpo_reference, dpo_queries, tmp_path, monkeypatch,
                                                              rel):
    ref_out, ref_summary = dpo_reference
    spec = "rewrite:oom,times=1; critique:hang,times=1; render:exit,times=1; video_judge:hang,times=1"
    e = rel("fault", "generation", "once in each stage: rewrite OOM, hung judge call, render worker exits, "
                                   "hung video-judge call (VPO_FAULTS)", tried=0)
    out, summary, fired, acc = run_with_faults(monkeypatch, tmp_path, dpo_queries, spec, e)
    e.metrics = {"fired": ",".join(f"{f['point']}:{f['action']}" for f in fired), "wall_s": summary["wall_seconds"],
                 "undisturbed_s": ref_summary["wall_seconds"]}
    assert sorted((f["point"], f["action"]) for f in fired) == [
        ("critique", "hang"), ("render", "exit"), ("rewrite", "oom"), ("video_judge", "hang")]
    assert not acc["problems"], acc["problems"]
    # the hung and the exited actors are gone: Ray restarted them and their rows came from the new ones
    gone = [f for f in fired if f["action"] in ("hang", "exit")]
    assert not any(pid_alive(f["pid"]) for f in gone), gone
    struck = sorted(p.parent.name for p in (Path(out) / "watchdog").rglob("*.json"))
    assert {"critique", "video_judge"} <= set(struck), struck
    assert content(out, "dpo") == content(ref_out, "dpo")


def test_persistent_gpu_faults_become_error_rows_of_their_queries(dpo_reference, dpo_queries, tmp_path, monkeypatch,
                                                                  rel):
    ref_out, _ = dpo_reference
    t = pick_targets(ref_out)
    spec = (f"rewrite:oom,row={t['rewrite']}; critique:raise,row={t['critique']}; render:oom,row={t['render']}; "
            f"video_judge:oom,row={t['video_judge']}; critique:hang,row={t['hang']}")
    e = rel("fault", "generation", "one query per stage always fails there (OOM rewrite/render/video judge, "
                                   "exception in critique) and one query's judge call always hangs", tried=0)
    out, summary, fired, acc = run_with_faults(monkeypatch, tmp_path, dpo_queries, spec, e)
    e.metrics = {"firings": len(fired), "watchdog_exits": sum(f["action"] == "hang" for f in fired),
                 "error_rows": summary["errors"], "wall_s": summary["wall_seconds"]}
    assert not acc["problems"], acc["problems"]
    got, ref = outputs_by_query(out), outputs_by_query(ref_out)

    assert got[t["rewrite"]]["error"] == ("rewrite", "out of GPU memory")
    stage, reason = got[t["critique"]]["error"]
    assert stage == "critique" and reason.startswith("RuntimeError (injected fault at critique"), reason
    assert got[t["hang"]]["error"] == ("critique", f"hung 2 times past the {WATCHDOG_S} s watchdog")
    for target, stage, why in ((t["render"], "render", "no video could be rendered"),
                               (t["video_judge"], "video_judge", "no video could be judged")):
        made = videos(got[target])
        assert made and all(v["error"] == f"{stage}: out of GPU memory" for v in made), made
        if any(json.loads(r)["source"] == "text" for r in ref[target]["rows"]):
            assert got[target]["rows"] == ref[target]["rows"]  # its text pair needs no video
        else:
            assert got[target]["error"] == (stage, why)
    assert all(v["video_uri"] for v in videos(got[t["video_judge"]]))  # rendered, then the judge failed

    untouched = set(ref) - set(t.values())
    assert {q: got[q] for q in untouched} == {q: ref[q] for q in untouched}


def _query(error=None, video=False) -> dict:
    return {"rows": [], "error": error, "videos": [json.dumps({"video_uri": "v.mp4"})] if video else []}


@pytest.mark.parametrize("ref, targets", [
    # CUDA's undisturbed run: every query ran every stage, none found a pair (the tiny judge's answers tie)
    ({"a": _query(("pairs", "no preference pair"), True), "b": _query(("pairs", "no preference pair"), True),
      "c": _query(("pairs", "no preference pair"), True)}, {"render": "a", "video_judge": "b", "hang": "c"}),
    ({"a": _query(None, True), "b": _query(None, True), "c": _query(("rewrite", "oom")), "d": _query()},
     {"render": "a", "video_judge": "b", "hang": "d"}),
    ({"a": _query(None, True), "b": _query(None, True), "c": _query(("critique", "hung"))}, None),
    ({"a": _query(None, True), "b": _query()}, None),
])
def test_gpu_drill_aims_at_queries_that_ran_every_stage(ref, targets):
    """The GPU drill's targets: two queries with videos, and a third that reached the judge; a query
    whose only error is 'no pair' did. Too few: the error names the counts and the error rows' stages."""
    from vpo_ray.bench.gpu_faults import _targets

    if targets is not None:
        assert _targets(ref) == targets
        return
    thin = r"too thin to aim at: \d queries with videos \(2 needed\), \d other queries"
    with pytest.raises(RuntimeError, match=thin) as err:
        _targets(ref)
    assert "error rows by stage: " in str(err.value)
