"""HF Trainer callbacks of a training rank: checkpoints into Ray, per-step figures, the fault drill.

Checkpoints. Two ways, picked by where Ray Train stores the run:
  shared   the run dir is a local/shared filesystem path (one node, or NFS across nodes): every
           rank saves into one HF output dir beside the run's checkpoints; after the save rank 0
           renames `checkpoint-N` into `checkpoint_0000000N/checkpoint` and reports it with
           `checkpoint_upload_mode=NO_UPLOAD`. No byte is copied: an 8B checkpoint with optimizer
           state is ~110 GB, and a copy would need twice the disk and minutes.
  upload   anything else (s3://, gs://): each rank saves into its own node-local dir and reports
           it; Ray Train uploads and merges the ranks' files (RayTrainReportCallback's layout).
Rank 0 appends each save's seconds (HF + DeepSpeed write, then the hand-over to Ray) and bytes
to checkpoints.jsonl as it happens.

Per-step figures (StepMetrics): wall seconds per optimizer step (CUDA-synchronised), tokens in
the step (TRL's global `num_tokens` counter), tokens/s, the peak GPU memory of every rank, and
the attempt (restart) that logged it. Rank 0 appends each step to metrics.jsonl; after a
restart the steps the crashed attempt logged past the restored checkpoint move to
metrics_replaced.jsonl, so a resume can be compared with what ran before the crash.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from vpo_ray import storage

log = logging.getLogger("vpo.train")

HF_CKPT = "checkpoint"  # the HF checkpoint's folder name inside a Ray checkpoint (as RayTrainReportCallback)
REPLACED = "metrics_replaced.jsonl"  # steps a crashed attempt logged, later trained again
ATTEMPTS = "attempts.jsonl"  # one row per attempt: when it started, what it resumed from, its set-up seconds
SAVES = "checkpoints.jsonl"  # one row per checkpoint saved: step, write and hand-over seconds, bytes


# ---------------------------------------------------------------------------- metrics files

def step_rows(log_history: list) -> list[dict]:
    return [dict(e) for e in log_history if "loss" in e]


def write_metrics(uri: str, log_history: list) -> None:
    storage.write_jsonl(uri, step_rows(log_history))


def append_jsonl(uri: str, entry: dict) -> None:
    """Append one row (local files); remote URIs are rewritten whole at checkpoints and at the end."""
    if storage.is_local(uri):
        with open(storage.local_path(uri), "a") as f:
            f.write(json.dumps(entry, default=float) + "\n")


def keep_replaced_steps(out: str, restored_step: int) -> None:
    """Move the rows a crashed attempt logged after `restored_step` from metrics.jsonl to metrics_replaced.jsonl."""
    uri = storage.join(out, "metrics.jsonl")
    if not storage.exists(uri):
        return
    for row in storage.read_jsonl(uri):
        if int(row.get("step", 0)) > restored_step:
            append_jsonl(storage.join(out, REPLACED), row)


# ---------------------------------------------------------------------------- GPU figures

def sync_cuda() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_gib_per_rank() -> Optional[list]:
    """Every rank's peak allocated GPU memory (GiB) so far; None without CUDA. A collective: all ranks call it."""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        return None
    mine = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return ranks


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------- callbacks

def callback_classes() -> tuple:
    """(CheckpointToRay, StepMetrics, NoSaveAtEnd), defined lazily so importing stays light."""
    return (_checkpoint_class(), *_metric_classes())


def _checkpoint_class():
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    class CheckpointToRay(RayTrainReportCallback):
        """Hands each HF checkpoint to Ray Train (see the module doc: `shared` or `upload`).

        After a fallback past a damaged checkpoint, new names get a suffix so that they never
        land in (or get deleted with) the damaged one's folder.
        """

        def __init__(self, out: str, attempt_started_at: float, suffix: str = "", run_dir: Optional[str] = None,
                     rank: int = 0):
            super().__init__()
            self.out, self.started_at = out, attempt_started_at
            self.suffix, self.run_dir, self.rank = suffix, run_dir, rank
            self.step_done_at = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_done_at = time.perf_counter()  # the save (if any) starts after this step's log

        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            wrote_s = time.perf_counter() - self.step_done_at
            name = f"checkpoint_{state.global_step:08d}{self.suffix}"
            src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            metrics = last_step_metrics(state)
            t0 = time.perf_counter()
            if self.run_dir:
                if dist.is_initialized():
                    dist.barrier()  # every rank's shard is on disk before the folder moves
                checkpoint, size = None, 0
                if self.rank == 0 and src.is_dir():
                    dest = Path(self.run_dir) / name
                    dest.mkdir(parents=True, exist_ok=True)
                    if (dest / HF_CKPT).exists():  # an attempt that died (a lost node) before Ray registered it
                        shutil.rmtree(dest / HF_CKPT)  # had it been registered, this attempt would resume past it
                    os.replace(src, dest / HF_CKPT)
                    size = _dir_bytes(dest)
                    checkpoint = ray.train.Checkpoint.from_directory(str(dest))
                ray.train.report(metrics, checkpoint=checkpoint,
                                 checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
            else:
                size = self._report_uploaded(src, Path(args.output_dir) / "_report", metrics, name)
            if self.rank == 0:  # written at once: an attempt that crashes later still leaves its saves
                append_jsonl(storage.join(self.out, SAVES), {
                    "step": state.global_step, "write_s": round(wrote_s, 2), "bytes": size,
                    "report_s": round(time.perf_counter() - t0, 2), "attempt_started_at": self.started_at})

        def _report_uploaded(self, src: Path, stage: Path, metrics: dict, name: str) -> int:
            """Move (not copy) the rank's checkpoint into a report dir that Ray uploads; its size."""
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
            checkpoint, size = None, 0
            if src.is_dir():
                os.replace(src, stage / HF_CKPT)
                size = _dir_bytes(stage)
                checkpoint = ray.train.Checkpoint.from_directory(str(stage))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
            shutil.rmtree(stage, ignore_errors=True)
            return size

    return CheckpointToRay


def _metric_classes() -> tuple:
    from transformers import TrainerCallback

    class StepMetrics(TrainerCallback):
        """Per-step seconds, tokens, tokens/s and peak GPU memory per rank; rank 0 writes metrics.jsonl."""

        def __init__(self, out: str, rank: int, attempt: dict):
            self.out, self.rank, self.attempt = out, rank, attempt
            self.uri = storage.join(out, "metrics.jsonl")
            self.last, self.tokens0, self.since_log = 0.0, 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last, self.tokens0, self.since_log = time.perf_counter(), 0.0, []
            self.attempt["train_begin_s"] = round(self.last - self.attempt.pop("_train_called", self.last), 2)
            if self.rank == 0:  # after a resume, the history restored with the checkpoint is the truth
                if state.global_step > 0:
                    keep_replaced_steps(self.out, state.global_step)
                write_metrics(self.uri, state.log_history)
                append_jsonl(storage.join(self.out, ATTEMPTS), {**self.attempt, "start_step": state.global_step})

        def on_step_end(self, args, state, control, **kwargs):
            sync_cuda()  # the step's kernels are done: its wall time is real
            now = time.perf_counter()
            self.since_log.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.log_history:
                return
            entry = state.log_history[-1]
            peaks = peak_gib_per_rank()  # collective: every rank logs the same steps
            steps, self.since_log = self.since_log, []
            tokens = float(logs.get("num_tokens", 0.0))
            if steps:
                entry["step_seconds"] = round(sum(steps) / len(steps), 4)
            if tokens > self.tokens0 and steps:  # TRL's counter restarts at 0 after a resume
                entry["step_tokens"] = round((tokens - self.tokens0) / len(steps), 1)
                entry["tokens_per_second"] = round((tokens - self.tokens0) / sum(steps), 2)
            self.tokens0 = tokens
            if peaks:
                entry["peak_allocated_gib_per_rank"] = peaks
            entry["attempt_started_at"] = self.attempt["started_at"]
            if self.rank == 0:
                append_jsonl(self.uri, entry)

        def on_save(self, args, state, control, **kwargs):
            if self.rank == 0 and not storage.is_local(self.uri):  # object stores cannot append
                write_metrics(self.uri, state.log_history)

    class NoSaveAtEnd(TrainerCallback):
        """save_at_end=false: no checkpoint after the last step, even one that save_steps would make.

        Runs after HF's DefaultFlowCallback, which asks for that save; an 8B checkpoint is ~110 GB
        and a second one beside the first may not fit the disk.
        """

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False

    return StepMetrics, NoSaveAtEnd


# ---------------------------------------------------------------------------- fault drill

def fault_drill(rank: int, world: int):
    """A TrainerCallback that fires VPO_FAULTS' `train_step` after every optimizer step, or None
    when no train_step fault is set (then training carries no extra callback at all). Before a
    drill fires on this rank it waits until Ray Train has registered the newest checkpoint, so
    that a kill tests a resume from it (see wait_until_registered)."""
    from vpo_ray import faults

    if not any(f.point == "train_step" for f in faults.active()):
        return None
    from transformers import TrainerCallback

    class FaultDrill(TrainerCallback):
        saved = 0  # the newest checkpoint's step: restored at the start, then each save

        def on_train_begin(self, args, state, control, **kwargs):
            self.saved = state.global_step

        def on_save(self, args, state, control, **kwargs):
            self.saved = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            train_step_drill(state.global_step, rank, world, self.saved)

    return FaultDrill()


def train_step_drill(step: int, rank: int, world: int, saved: int) -> None:
    """VPO_FAULTS' `train_step` after optimizer step `step` (TRL and video-DPO workers alike): when a
    drill is due here, first wait until checkpoint `saved` is registered, then fire it."""
    from vpo_ray import faults

    if faults.due("train_step", step=step, rank=rank, world=world):
        wait_until_registered(saved)
        faults.fire("train_step", step=step, rank=rank, world=world)


def wait_until_registered(saved: int, timeout_s: float = 300.0) -> None:
    """Block until Ray Train has registered checkpoint `saved` (0: return at once). Ray Train's
    controller collects the ranks' reports every few seconds, and a worker that dies in between
    takes its report with it: the run then restarts from the checkpoint before, or from scratch
    (seen in CI), and a drill meant to test a resume tests something else."""
    import ray.train

    if not saved:
        return
    run = ray.train.get_context().get_storage()
    snapshot = os.path.join(run.experiment_fs_path, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout_s
    while f"checkpoint_{saved:08d}" not in _read_or_empty(run.storage_filesystem, snapshot):
        if time.monotonic() > deadline:
            raise TimeoutError(f"fault drill: checkpoint {saved} was never registered in {snapshot}")
        time.sleep(0.2)


def _read_or_empty(fs, path: str) -> str:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8", "replace")
    except (OSError, FileNotFoundError):
        return ""


def last_step_metrics(state) -> dict:
    """The newest logged step's numbers (what Ray attaches to the checkpoint)."""
    out: dict = {"epoch": float(state.epoch or 0.0)}
    latest = next((e for e in reversed(state.log_history) if "loss" in e), {})
    for k, v in latest.items():
        if isinstance(v, (int, float)):
            out[k] = v
    out["step"] = state.global_step
    return out

