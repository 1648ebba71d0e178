"""Training faults: a worker process killed mid-epoch, and a corrupt newest checkpoint.

tests/test_train.py::test_killed_worker_resumes_from_checkpoint already drills a worker
that exits (the VPO_FAULTS train_step drill) and checks the losses match an undisturbed run; here the
worker is killed from outside with SIGKILL (an OOM kill, a lost node) at a moment chosen
by the test, and the invariants are that the run finishes at its last step with every
step logged once. Then the newest checkpoint of that run is corrupted and the run is
continued: it falls back to the previous checkpoint and says so in its log.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from relsupport import alive_actors, kill9, reps, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_STEPS = 8
SAVE_STEPS = 2


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from train_helpers import sft_rows, write_parquet

    return write_parquet(sft_rows(24), tmp_path_factory.mktemp("train_data") / "sft.parquet")


@pytest.fixture(scope="module")
def base_model(tiny_cache):
    from train_helpers import tiny_model_path

    return tiny_model_path(tiny_cache)


def train_cfg(data: str, out: Path, model: str, **fields):
    from vpo_ray.config import TrainConfig, load_config

    fields = {"num_workers": 2, "per_device_batch_size": 2, "max_length": 384, "deepspeed_stage": 0,
              "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "learning_rate": 1e-3, "keep_checkpoints": 2,
              **fields}
    return load_config(TrainConfig, None, [], method="sft", data=data, out=str(out), model=model, **fields)


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def ckpts(out: Path) -> list[Path]:
    return sorted((out / "ray_results" / "sft").glob("checkpoint_0*"))


@pytest.fixture(scope="module")
def killed_run(ray_session, sft_data, base_model, tmp_path_factory):
    """One SFT run whose training workers get SIGKILLed after checkpoints exist (HEAVY: twice)."""
    from vpo_ray.train.runner import train

    out = tmp_path_factory.mktemp("train_killed") / "run"
    kills: list[dict] = []
    plan = [f"checkpoint_{s:08d}" for s in (2, 4)][:reps(1, 2)]
    t0 = time.monotonic()

    def killer():
        for name in plan:
            if not wait_for(lambda: any(p.name == name for p in ckpts(out)), 300, 0.05):
                return
            workers = alive_actors("RayTrainWorker")
            if workers and kill9(workers[-1][1]):
                kills.append({"after": name, "pid": workers[-1][1], "at_s": round(time.monotonic() - t0, 1),
                              "epoch": time.time()})

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = train(train_cfg(sft_data, out, base_model, max_failures=len(plan)))
    t.join(5)
    return {"out": out, "summary": summary, "kills": kills, "planned": len(plan)}


def test_killed_worker_resumes_from_checkpoint(killed_run, rel):
    e = rel("fault", "training", f"SIGKILL a Ray Train worker mid-epoch ({MAX_STEPS} steps, checkpoint every "
                                 f"{SAVE_STEPS}); resume from the last checkpoint", tried=len(killed_run["kills"]))
    out, summary, kills = killed_run["out"], killed_run["summary"], killed_run["kills"]
    e.metrics = {"kills": ",".join(f"after {k['after']}@{k['at_s']}s" for k in kills),
                 "fit_s": summary["fit_seconds"], "global_step": summary["global_step"]}
    assert kills, "no worker was killed (the run finished first?)"
    logged = steps(out)
    e.rows_lost = len(set(range(1, MAX_STEPS + 1)) - set(logged))
    assert summary["global_step"] == MAX_STEPS
    assert logged == list(range(1, MAX_STEPS + 1)), f"steps logged: {logged}"
    assert (Path(summary["model"]) / "model.safetensors").exists()
    # the attempt that finished started after the last kill: a new worker group resumed the run
    state = json.loads((out / "train_state.json").read_text())
    assert state["rank0_seconds"]["started_at"] > kills[-1]["epoch"]


def test_reference_to_the_train_step_exit_drill(rel):
    """Counted here, run in tests/test_train.py (it needs an undisturbed run to compare losses)."""
    e = rel("fault", "training",
            "worker exits at a step (VPO_FAULTS train_step:exit drill): losses equal an undisturbed run")
    e.tried = 0
    e.metrics = {"covered_by": "tests/test_train.py::test_killed_worker_resumes_from_checkpoint"}
    pytest.skip("runs in tests/test_train.py (pytest tests/test_train.py -k killed_worker)")


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(killed_run, sft_data, base_model, rel, caplog):
    """Truncate the newest checkpoint's weights and state, then continue the run for more
    steps: it resumes from the checkpoint before, and the driver's log names both."""
    from vpo_ray.train.runner import train

    e = rel("fault", "training", "corrupt the newest checkpoint, continue the run: fall back to the previous one")
    out = killed_run["out"]
    newest, previous = ckpts(out)[-1], ckpts(out)[-2]
    (newest / "checkpoint" / "trainer_state.json").write_text("{ truncated")
    for f in (newest / "checkpoint").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    e.metrics = {"corrupted": newest.name, "expected_fallback": previous.name}
    caplog.set_level(logging.INFO, logger="vpo.train")
    summary = train(train_cfg(sft_data, out, base_model, max_steps=MAX_STEPS + SAVE_STEPS, max_failures=0))
    e.metrics["resumed_from"] = Path(str(summary.get("resumed_from"))).name
    assert summary["global_step"] == MAX_STEPS + SAVE_STEPS
    assert [s["checkpoint"] for s in summary["skipped_checkpoints"]] == [newest.name]
    assert Path(summary["resumed_from"]).name == previous.name
    line = next((r.getMessage() for r in caplog.records if "skipped damaged checkpoint" in r.getMessage()), "")
    assert newest.name in line and previous.name in line, f"no log line names the skipped checkpoint: {line!r}"
    logged = steps(out)
    assert logged[-1] == MAX_STEPS + SAVE_STEPS and len(set(logged)) == len(logged)


def test_a_checkpoint_folder_left_by_a_dead_attempt_does_not_block_saving_that_step(tmp_path, monkeypatch):
    """A worker killed after rank 0 moved checkpoint-2 into checkpoint_00000002/ but before Ray
    registered it: the next attempt (resumed from an older checkpoint) saves step 2 again into
    the same folder, and its save replaces the stale one instead of failing with ENOTEMPTY."""
    import ray.train
    from transformers import TrainerState, TrainingArguments

    from vpo_ray.train.callbacks import HF_CKPT, callback_classes

    reported: list = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None, **kw: reported.append(checkpoint))
    run_dir, hf_out = tmp_path / "ray_results" / "sft", tmp_path / "ray_results" / "sft" / "_hf_output"
    stale = run_dir / "checkpoint_00000002" / HF_CKPT
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("from the attempt that died")
    (hf_out / "checkpoint-2").mkdir(parents=True)
    (hf_out / "checkpoint-2" / "model.safetensors").write_text("this attempt's step 2")

    checkpoint_to_ray = callback_classes()[0](str(tmp_path), time.time(), run_dir=str(run_dir), rank=0)
    state = TrainerState(global_step=2, epoch=0.5, log_history=[{"loss": 1.0, "step": 2}])
    args = TrainingArguments(output_dir=str(hf_out), report_to=[])
    checkpoint_to_ray.on_save(args, state, None)

    assert (stale / "model.safetensors").read_text() == "this attempt's step 2"
    assert not (hf_out / "checkpoint-2").exists()
    assert [Path(c.path).name for c in reported] == ["checkpoint_00000002"]
