"""`vpo bench gpu-faults`: the GPU-fault drill. Real CUDA out-of-memory and hung GPU calls in the
stage actors of a DPO generate run, injected through VPO_FAULTS (vpo_ray/faults.py).

    vpo bench gpu-faults --out runs/bench      # one GPU (or the CPU analogue without one), ~2-3 min

Two runs of `run_generate` on the tiny preset with every stage on the GPU (fractions of it):
an undisturbed one, then one with faults. On CUDA the hook's `oom` asks the CUDA allocator
for more than the free memory (a real torch.OutOfMemoryError, raised by the allocator) and
`hang` keeps a spinning kernel running that the call waits on; on CPU both are simulated.

    transient (once each):  rewrite OOM, critique worker exits, render call hangs, video-judge OOM
    persistent (one query): every render of query A and every video-judge call of query B run
                            out of memory; every judge call holding query C hangs

Checks (each a row of the table, as tests/reliability prints it, also in reliability.json):
every query accounted for; every query the persistent faults do not aim at comes out as in
the undisturbed run; A's and B's videos are error rows naming the OOM; C is an error row
after two watchdog strikes; the processes that hung or exited are gone (Ray restarted them);
after Ray shuts down no process holds memory on the GPU and a fresh allocation of most of
its memory succeeds (no GPU reset was needed).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from vpo_ray import storage

DRILL_QUERIES = [
    "a cat playing piano in a jazz bar", "drone shot of waves crashing on a black sand beach",
    "a red vintage car driving along a coastal road", "a hummingbird drinking nectar in slow motion",
    "an old lighthouse in a storm at night", "a chef flipping pancakes in a busy kitchen",
    "a fox walking through fresh snow in a pine forest", "children building a sandcastle at sunset",
]
WATCHDOG_S = 8  # a tiny-model call takes milliseconds on a GPU, a second or two on CPU
TRANSIENT = "rewrite:oom,times=1; critique:exit,times=1; render:hang,times=1; video_judge:oom,times=1"


def outputs_by_query(out: str, kind: str = "dpo") -> dict:
    """query_id -> {"rows", "error": (stage, reason) | None, "videos"}: set rows and video records as
    sorted JSON (floats to 5 decimals, the run's folder masked), for comparing two runs query by query."""
    import pyarrow.parquet as pq

    def canon(v):
        if isinstance(v, float):
            return round(v, 5)
        if isinstance(v, dict):
            return {k: canon(x if not (k.endswith("_json") and isinstance(x, str) and x) else json.loads(x))
                    for k, x in v.items()}
        return [canon(x) for x in v] if isinstance(v, (list, tuple)) else v

    def text(rec: dict) -> str:
        return json.dumps(canon(rec), sort_keys=True, ensure_ascii=False).replace(out, "<OUT>")

    recs: dict = {}

    def at(qid: str) -> dict:
        return recs.setdefault(qid, {"rows": [], "error": None, "videos": []})

    path = Path(out) / f"{kind}.parquet"
    rows = pq.read_table(path).to_pylist() if path.exists() else list(storage.read_jsonl(str(Path(out) / f"{kind}.jsonl")))
    for r in rows:
        at(r["query_id"])["rows"].append(text(r))
    for e in storage.read_jsonl(str(Path(out) / "errors.jsonl")):
        at(e["query_id"])["error"] = (e["stage"], e["reason"])
    if (Path(out) / "videos.jsonl").exists():
        for v in storage.read_jsonl(str(Path(out) / "videos.jsonl")):
            at(v["query_id"])["videos"].append(text(v))
    for r in recs.values():
        r["rows"].sort()
        r["videos"].sort()
    return recs


def _config(queries: str, out: str, cuda: bool):
    from vpo_ray.config import GenerateConfig, load_config_with_defaults
    from vpo_ray.models.registry import preset_job_defaults

    stages = [f"{s}.{k}" for s in ("rewrite_stage", "judge_stage", "t2v_stage", "video_judge_stage")
              for k in (f"num_gpus={0.2 if cuda else 0}", "min_actors=1", "max_actors=1", f"watchdog_s={WATCHDOG_S}")]
    # placement.mode=manual: the pools as set here (one actor each at 0.2 GPU), not sized to the node's GPUs
    return load_config_with_defaults(GenerateConfig, None, ["num_samples=1", "video.seeds_per_prompt=2",
                                                            "pair_margin=0.0", "placement.mode=manual", *stages],
                                     preset_job_defaults("tiny"), kind="dpo", queries=queries, out=out, preset="tiny")


def _targets(ref: dict) -> dict:
    """Query ids to aim at: two with rendered videos (render, video_judge) and one that ran through the
    judge (hang). A query whose only error is at the pairs stage ran every stage: on CUDA the tiny
    judge's answers for a prompt's two videos often tie, so most queries end without a pair."""
    ran_through = {q for q, r in ref.items() if r["error"] is None or r["error"][0] == "pairs"}
    with_videos = sorted(q for q, r in ref.items() if any(json.loads(v).get("video_uri") for v in r["videos"]))
    others = sorted(ran_through - set(with_videos[:2]))
    if len(with_videos) < 2 or not others:
        stages = dict(Counter(r["error"][0] for r in ref.values() if r["error"] is not None))
        raise RuntimeError(f"the undisturbed run is too thin to aim at: {len(with_videos)} queries with videos "
                           f"(2 needed), {len(others)} other queries that ran every stage (1 needed), of "
                           f"{len(ref)}; error rows by stage: {stages or 'none'}")
    return {"render": with_videos[0], "video_judge": with_videos[1], "hang": others[0]}


def gpu_processes() -> Optional[list[str]]:
    """Compute processes on the drill's GPU (nvidia-smi; the first of CUDA_VISIBLE_DEVICES, else 0), or None
    where it cannot be asked. Other GPUs of the machine may be busy with other work."""
    gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    try:
        out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else None


def _checks(ref: dict, got: dict, t: dict, fired: list[dict], acc_ok: bool) -> list[dict]:
    from vpo_ray.pipeline.guard import MAX_STRIKES

    untouched = sorted(set(ref) - set(t.values()))
    same = [q for q in untouched if got.get(q) == ref[q]]
    oom_videos = {k: [json.loads(v) for v in got.get(t[k], {}).get("videos", [])] for k in ("render", "video_judge")}
    gone = [f for f in fired if f["action"] in ("hang", "exit")]
    alive = [f["pid"] for f in gone if Path(f"/proc/{f['pid']}").exists()]
    return [
        {"case": "every query accounted for (set, errors, duplicates)", "ok": acc_ok},
        {"case": "transient OOM (rewrite, video judge), worker exit (critique), hung render: queries not aimed at "
                 "equal the undisturbed run", "ok": len(same) == len(untouched), "measured": f"{len(same)}/{len(untouched)}"},
        {"case": "every render of one query runs out of memory: its videos are error rows",
         "ok": bool(oom_videos["render"]) and all(v["error"] == "render: out of GPU memory" for v in oom_videos["render"])},
        {"case": "every video-judge call of one query runs out of memory: its videos are error rows",
         "ok": bool(oom_videos["video_judge"]) and
         all(v["error"] == "video_judge: out of GPU memory" for v in oom_videos["video_judge"])},
        {"case": "a judge call that always hangs: its query is an error row after the watchdog's strikes",
         "ok": (got.get(t["hang"]) or {}).get("error") == ("critique", f"hung {MAX_STRIKES} times past the "
                                                                       f"{WATCHDOG_S} s watchdog")},
        {"case": "hung and exited actor processes are gone (Ray restarted them)", "ok": bool(gone) and not alive,
         "measured": f"{len(gone)} ended, {len(alive)} still alive"},
    ]


def _gpu_after(cuda: bool) -> dict:
    """After Ray is gone: no process left on the GPU, and most of its memory can be allocated again."""
    if not cuda:
        return {"case": "GPU usable afterwards (no GPU here: not checked)", "ok": True, "measured": "cpu"}
    import torch

    time.sleep(3)  # let the driver finish tearing down the last contexts
    procs = gpu_processes()
    free, total = torch.cuda.mem_get_info()
    block = torch.empty(int(free * 0.9), dtype=torch.uint8, device="cuda")
    del block
    torch.cuda.empty_cache()
    ok = procs is not None and not [p for p in procs if not p.startswith(str(os.getpid()))]
    return {"case": "after the drill no process holds GPU memory and 90% of free memory allocates (no reset)",
            "ok": ok, "measured": f"processes {procs}, free {free / 2**30:.1f}/{total / 2**30:.1f} GiB"}


def run(cfg) -> dict:
    import ray
    import torch

    from vpo_ray import faults
    from vpo_ray.config import RayConfig
    from vpo_ray.pipeline.generate import run_generate
    from vpo_ray.ray_utils import init_ray

    cuda = torch.cuda.is_available() and (cfg.device or "cuda").startswith("cuda")
    root = storage.join(cfg.out, "gpu_faults")
    storage.makedirs(root)
    queries = storage.join(root, "queries.json")
    storage.write_json(queries, DRILL_QUERIES)
    init_ray(RayConfig(num_gpus=1 if cuda else None, num_cpus=cfg.ray.num_cpus, log_to_driver=False))
    t0 = time.perf_counter()
    ref_sum = run_generate(_config(queries, storage.join(root, "undisturbed"), cuda))
    ref_s = time.perf_counter() - t0
    ref = outputs_by_query(storage.join(root, "undisturbed"))
    t = _targets(ref)
    spec = (f"{TRANSIENT}; render:oom,row={t['render']}; video_judge:oom,row={t['video_judge']}; "
            f"critique:hang,row={t['hang']}")
    fired_dir = storage.join(root, "fired")
    os.environ.update({faults.ENV: spec, faults.DIR_ENV: fired_dir})
    try:
        t1 = time.perf_counter()
        got_sum = run_generate(_config(queries, storage.join(root, "faulted"), cuda))
        faulted_s = time.perf_counter() - t1
    finally:
        os.environ.pop(faults.ENV, None)
        os.environ.pop(faults.DIR_ENV, None)
        ray.shutdown()
    fired = faults.fired(fired_dir)
    checks = _checks(ref, outputs_by_query(storage.join(root, "faulted")), t, fired, bool(got_sum["accounted"]))
    checks.append(_gpu_after(cuda))
    record = {"benchmark": "gpu-faults", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "spec": spec, "watchdog_s": WATCHDOG_S, "queries": len(DRILL_QUERIES),
              "undisturbed_s": round(ref_s, 1), "faulted_s": round(faulted_s, 1),
              "undisturbed_errors": ref_sum["errors"], "faulted_errors": got_sum["errors"],
              "firings": [{k: f[k] for k in ("point", "action", "rows", "pid")} for f in fired],
              "checks": checks, "passed": all(c["ok"] for c in checks)}
    write_tables(cfg.out, record)
    return record


def write_tables(out: str, record: dict) -> None:
    """Print the checks as tests/reliability's table and write reliability.json and gpu_faults.json."""
    entries = [{"kind": "fault", "area": "gpu", "case": c["case"], "tried": 1, "survived": int(c["ok"]),
                "rows_lost": None, "outcome": "passed" if c["ok"] else "failed",
                "metrics": {"measured": c.get("measured", "")}} for c in record["checks"]]
    summary = {"faults_injected": len(record["firings"]), "checks": len(entries),
               "checks_passed": sum(e["survived"] for e in entries), "device": record["device"]}
    rows = [["area", "check", "outcome", "measured"]] + [[e["area"], e["case"][:100], e["outcome"],
                                                          e["metrics"]["measured"][:80]] for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"GPU FAULTS on {record['device']}: {len(record['firings'])} faults fired, "
          f"{summary['checks_passed']}/{len(entries)} checks passed; undisturbed {record['undisturbed_s']} s, "
          f"with faults {record['faulted_s']} s", flush=True)
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), flush=True)
        if i == 0:
            print("-+-".join("-" * w for w in widths), flush=True)
    storage.write_json(storage.join(out, "reliability.json"), {"summary": summary, "entries": entries})
    storage.write_json(storage.join(out, "gpu_faults.json"), record)
