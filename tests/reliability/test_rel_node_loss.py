"""Node loss: the worker node of the session's two-node cluster dies during `vpo generate dpo`
and during `vpo train dpo` (tests/twonode_cluster.py; its raylet is SIGKILLed by node id).

The jobs are submitted with `ray job submit`, so their drivers run on the head, which
survives. A job must finish on the head alone, by itself or by one rerun of the same
command (which resumes from the part files / the run's checkpoints), with:
- generate: every query accounted for and the same DPO set, error rows and duplicates as an
  undisturbed run (conftest.dpo_reference);
- train: every step logged once and the run resumed from the newest checkpoint there was when
  the node died (that a resumed run's losses equal an undisturbed run's is tests/test_train.py's
  killed-worker test: the same restart path).
The worker node is started again afterwards, so later tests find two nodes.
"""
from __future__ import annotations

import json
import re
import sys
import time
import uuid
from pathlib import Path

import pytest

from relsupport import DPO_EXTRA, DPO_QUERIES, accounting, content, gen_overrides, wait_for
from twonode_cluster import head_and_worker, parse_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

# One actor per stage at half a CPU: all four pools still fit on the head (4 CPUs) once the
# worker node is gone; Ray Data spreads them over both nodes while both are alive.
SMALL_POOLS = [f"{s}.{k}" for s in ("rewrite_stage", "judge_stage", "t2v_stage", "video_judge_stage")
               for k in ("num_cpus=0.5", "min_actors=1", "max_actors=1")]
SLOW_GPU = "render:hang,seconds=2; video_judge:hang,seconds=2"  # the fault hook's bounded hang: slow calls
SLOW_STEPS = "train_step:hang,seconds=4"
TRAIN_STEPS, SAVE_STEPS = 8, 2
TRAIN = ["use_gpu=false", "num_workers=2", "placement_strategy=SPREAD", "deepspeed_stage=0", "precision=fp32",
         "per_device_batch_size=2", "gradient_accumulation_steps=1", "max_length=384", f"max_steps={TRAIN_STEPS}",
         f"save_steps={SAVE_STEPS}", "max_failures=2", "learning_rate=2e-4", "logging_steps=1"]


def job_actors(cluster, sid: str) -> list[dict]:
    """ALIVE actors of a submitted job: class name and node id (state API)."""
    job_id = cluster.job(sid).get("job_id")
    if not job_id:  # the driver has not started yet
        return []
    out = cluster.ray("list", "actors", "--address", cluster.dashboard, "--format", "json", "--detail",
                      "--limit", "10000", "--filter", f"job_id={job_id}", "--filter", "state=ALIVE", timeout=180).stdout
    return [{"class": a.get("class_name", ""), "node": a.get("node_id", "")} for a in parse_json(out or "[]")]


def running(cluster, sid: str) -> bool:
    return cluster.job(sid).get("status") in ("PENDING", "RUNNING")


def lose_worker_then_finish(cluster, cmd: list[str], ready, e, env: dict, timeout: float = 1500,
                            before=lambda: True) -> dict:
    """Submit `cmd`; once before() (cheap: files) and then ready(classes of the job's actors on the
    worker node) hold, kill the worker node; wait; rerun once if the job failed.

    Fills e.tried and e.metrics; returns {"status", "reruns", "logs", "lost"}. The worker node is
    started again whatever happens.
    """
    _, worker = head_and_worker(cluster)
    sid = cluster.submit_nowait(cmd, **env)
    t0 = time.monotonic()
    lost: list[str] = []
    killed: dict = {}

    def poll() -> bool:
        nonlocal lost
        if not running(cluster, sid):
            return True
        if not before():
            return False
        lost = sorted(a["class"] for a in job_actors(cluster, sid) if a["node"] == worker)
        return ready(lost)

    try:
        assert wait_for(poll, timeout, 1.0), "the job never reached the point where the node is killed"
        if not running(cluster, sid):
            pytest.fail(f"the job ended before the node was killed: {cluster.wait(sid, 60)[2][-3000:]}")
        killed.update(cluster.kill_worker_node(worker))
        e.tried = 1
        e.metrics = {"killed_at_s": round(time.monotonic() - t0, 1), "node_dead_after_s": killed["dead_after_s"],
                     "actors_on_lost_node": ",".join(lost)}
        _, status, logs = cluster.wait(sid, timeout)
        e.metrics["first_attempt"] = status
        reruns = 0
        if status != "SUCCEEDED":
            reruns = 1
            _, status, logs = cluster.wait(cluster.submit_nowait(cmd, **env), timeout)
        e.metrics.update(reruns=reruns, wall_s=round(time.monotonic() - t0, 1))
        return {"status": status, "reruns": reruns, "logs": logs, "lost": lost}
    finally:
        if killed:  # later tests find two nodes again
            cluster.restart_worker()
        elif running(cluster, sid):
            cluster.ray("job", "stop", "--address", cluster.dashboard, sid, check=False)


def test_worker_node_lost_during_generate(two_nodes, dpo_reference, rel):
    ref_out, _ = dpo_reference
    e = rel("fault", "node", "worker node lost (raylet SIGKILL) during `vpo generate dpo` on the 2-node cluster",
            tried=0)
    root = two_nodes.root / f"gen-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    queries = root / "queries.json"
    queries.write_text(json.dumps(DPO_QUERIES))
    out = root / "out"
    cmd = [sys.executable, "-m", "vpo_ray.cli", "generate",
           *gen_overrides("dpo", str(queries), str(out), *DPO_EXTRA, *SMALL_POOLS)]
    # Kill once a stage actor (model loaded, rows flowing) lives on the worker node. The tiny run is
    # over in seconds; every render and video-judge call takes 2 s more here (the fault hook's
    # bounded `hang`: a slow GPU), which leaves the same outputs and time to act.
    res = lose_worker_then_finish(two_nodes, cmd, lambda there: any(c.startswith("MapWorker") for c in there), e,
                                  env={"VPO_PART_FLUSH_S": "0", "VPO_FAULTS": SLOW_GPU})
    assert res["status"] == "SUCCEEDED", res["logs"][-4000:]
    acc = accounting(str(out), "dpo", len(DPO_QUERIES), allow_tmp=True)
    e.rows_lost = acc["rows_lost"]
    assert not acc["problems"], acc["problems"]
    summary = json.loads((out / "summary.json").read_text())
    e.metrics["resumed_queries"] = summary["resumed_from_earlier_runs"]
    assert content(str(out), "dpo") == content(ref_out, "dpo")


@pytest.fixture(scope="module")
def dpo_train_data(tmp_path_factory):
    from train_helpers import dpo_rows, write_parquet

    return write_parquet(dpo_rows(48), tmp_path_factory.mktemp("node_loss_train") / "dpo.parquet")


def steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_worker_node_lost_during_train(two_nodes, dpo_train_data, rel):
    e = rel("fault", "node", "worker node lost (raylet SIGKILL) during `vpo train dpo` (2 workers, SPREAD)",
            tried=0)
    out = two_nodes.root / f"train-{uuid.uuid4().hex[:6]}"
    cmd = [sys.executable, "-m", "vpo_ray.cli", "train", "dpo", "--data", dpo_train_data, "--out", str(out),
           "--preset", "tiny", *TRAIN]
    run_dir = out / "ray_results" / "dpo"
    at_kill: dict = {}

    def before() -> bool:  # a checkpoint is in storage and training has moved past it
        metrics = out / "metrics.jsonl"
        ckpts = sorted(p.name for p in run_dir.glob("checkpoint_*") if re.fullmatch(r"checkpoint_\d{8}", p.name))
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        at_kill.update(newest=ckpts[-1] if ckpts else "", step=logged)
        return bool(ckpts) and SAVE_STEPS < logged < TRAIN_STEPS - 1

    res = lose_worker_then_finish(two_nodes, cmd, lambda there: any("TrainWorker" in c for c in there), e,
                                  env={"VPO_FAULTS": SLOW_STEPS}, before=before)
    assert res["status"] == "SUCCEEDED", res["logs"][-4000:]
    logged = steps(out)
    e.rows_lost = TRAIN_STEPS - len({r["step"] for r in logged})
    state = json.loads((out / "train_state.json").read_text())
    resumed = Path(str(state.get("resumed_from"))).name
    e.metrics.update(steps_logged_at_kill=at_kill["step"], newest_checkpoint_at_kill=at_kill["newest"],
                     resumed_from=resumed)
    assert [r["step"] for r in logged] == list(range(1, TRAIN_STEPS + 1))  # each step logged once
    assert state["global_step"] == TRAIN_STEPS
    # the last attempt started from the newest checkpoint there was when the node died (or a later one)
    assert resumed.startswith("checkpoint_") and resumed >= at_kill["newest"], (resumed, at_kill)
    assert (out / "model" / "model.safetensors").exists()
