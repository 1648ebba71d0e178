"""What each Ray Train worker runs: TRL's SFTTrainer/DPOTrainer under DeepSpeed (or DDP).

Checkpoints: every rank trains into its own node-local output dir; at each save the
HF checkpoint dir (model, trainer state, scheduler, this rank's optimizer shard and RNG
state) is reported with `ray.train.report`, and Ray Train merges the ranks' files
into one checkpoint in storage. After a restart (a dead worker, or a re-run with the
same out and run name) `ray.train.get_checkpoint()` hands that merged dir back and HF
Trainer resumes from it: weights, optimizer, scheduler, RNG and data position.

The export (DIR/model/) is written by rank 0 after the last step: full weights as
safetensors (gathered from ZeRO-3 shards; LoRA merged into the base) plus tokenizer
and chat template. Per-step metrics go to DIR/metrics.jsonl as they are logged.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from vpo_ray import storage
from vpo_ray.config import ConfigError, TrainConfig

log = logging.getLogger("vpo.train")

DS_DIR = Path(__file__).resolve().parent / "deepspeed"
PAPER_DEFAULTS = {  # VPO paper hyper-parameters (full fine-tune)
    "sft": {"learning_rate": 2e-6, "epochs": 5.0, "lr_scheduler": "constant_with_warmup"},
    "dpo": {"learning_rate": 5e-7, "epochs": 1.0, "lr_scheduler": "linear"},
}
HF_CKPT = "checkpoint"  # the HF checkpoint's folder name inside a Ray checkpoint (as RayTrainReportCallback)
FAULT_MARKER = ".fault_injected"


def resolved(cfg: TrainConfig, key: str) -> Any:
    value = getattr(cfg, key)
    return PAPER_DEFAULTS[cfg.method][key] if value is None else value


def deepspeed_config(cfg: TrainConfig) -> Optional[dict]:
    """The DeepSpeed JSON for `cfg` (stage, offload, precision filled in); None = plain DDP."""
    if cfg.deepspeed_stage == 0:
        return None
    path = cfg.deepspeed_config or str(DS_DIR / f"zero{cfg.deepspeed_stage}.json")
    try:
        ds = json.loads(storage.read_text(path))
    except (storage.StorageError, json.JSONDecodeError) as e:
        raise ConfigError(f"deepspeed_config: cannot use {path}: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed_config: {path} must hold a JSON object")
    zero = ds.setdefault("zero_optimization", {})
    if not cfg.deepspeed_config:  # a user's own JSON is taken as given
        zero["stage"] = cfg.deepspeed_stage
        device = "cpu" if cfg.offload else "none"
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                zero[key]["device"] = device
                zero[key]["pin_memory"] = bool(cfg.use_gpu)
        if cfg.offload:  # ZeRO-Offload steps the optimizer on CPU: DeepSpeedCPUAdam (JIT-built op)
            ds["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return ds


def training_args(cfg: TrainConfig, output_dir: str, ds_config: Optional[dict]):
    """SFTConfig / DPOConfig from `cfg` (paper defaults where cfg leaves None)."""
    import torch.distributed as dist
    from trl import DPOConfig, SFTConfig

    common = dict(
        output_dir=output_dir,
        learning_rate=resolved(cfg, "learning_rate"),
        num_train_epochs=resolved(cfg, "epochs"),
        max_steps=cfg.max_steps,
        lr_scheduler_type=resolved(cfg, "lr_scheduler"),
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of all steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=cfg.max_length,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_only_model=False,  # optimizer + scheduler + RNG are needed to resume
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        use_cpu=not cfg.use_gpu,
        ddp_backend="gloo" if not cfg.use_gpu and dist.is_initialized() else None,  # Ray set up gloo on CPU
        deepspeed=ds_config,
        dataloader_num_workers=0,
        disable_tqdm=True,
        dataset_num_proc=None,
        model_init_kwargs={"dtype": "float32"},  # master weights fp32; bf16/fp16 are mixed precision
    )
    if cfg.method == "sft":
        return SFTConfig(**common)
    return DPOConfig(beta=cfg.beta, **common)


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------- callbacks

def _callbacks():
    """Callback classes, defined lazily so importing this module stays light."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import TrainerCallback

    class CheckpointToRay(RayTrainReportCallback):
        """RayTrainReportCallback with per-rank dirs: each rank reports the files it wrote.

        Moves (not copies) the local HF checkpoint into the report dir, so a node's disk
        holds at most one checkpoint; the step's metrics ride along with it. After a
        fallback past a damaged checkpoint, new names get a suffix so that they never
        land in (or get deleted with) the damaged one's folder.
        """

        def __init__(self, suffix: str = ""):
            super().__init__()
            self.suffix = suffix

        def on_save(self, args, state, control, **kwargs):
            src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            stage = Path(args.output_dir) / "_report"
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
            checkpoint = None
            if src.is_dir():
                os.replace(src, stage / HF_CKPT)
                checkpoint = ray.train.Checkpoint.from_directory(str(stage))
            metrics = _last_step_metrics(state)
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"checkpoint_{state.global_step:08d}{self.suffix}")
            shutil.rmtree(stage, ignore_errors=True)

    class StepMetrics(TrainerCallback):
        """Adds tokens/s to each step's log; rank 0 appends the step to metrics.jsonl."""

        def __init__(self, metrics_uri: str, rank: int):
            self.uri, self.rank = metrics_uri, rank
            self.t0, self.tokens0 = None, 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.tokens0 = time.perf_counter(), 0.0
            if self.rank == 0:  # after a resume, the history restored with the checkpoint is the truth
                write_metrics(self.uri, state.log_history)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.log_history:
                return
            now = time.perf_counter()
            tokens = float(logs.get("num_tokens", 0.0))
            if self.t0 is not None and now > self.t0 and tokens > self.tokens0:
                tps = (tokens - self.tokens0) / (now - self.t0)
                state.log_history[-1]["tokens_per_second"] = round(tps, 2)  # kept in trainer_state.json
            self.t0, self.tokens0 = now, tokens
            if self.rank == 0:
                append_metrics(self.uri, state.log_history[-1])

        def on_save(self, args, state, control, **kwargs):
            if self.rank == 0 and not storage.is_local(self.uri):  # object stores cannot append
                write_metrics(self.uri, state.log_history)

    class CrashOnce(TrainerCallback):
        """Chaos drill (cfg.fault_step): the last rank dies once, like a lost node."""

        def __init__(self, step: int, marker: str, rank: int, world: int):
            self.step, self.marker, self.armed = step, marker, rank == world - 1

        def on_step_end(self, args, state, control, **kwargs):
            if self.armed and state.global_step == self.step and not storage.exists(self.marker):
                storage.write_text(self.marker, f"killed at step {state.global_step}\n")
                log.warning("fault drill: worker exits at step %d", state.global_step)
                os._exit(1)

    return CheckpointToRay, StepMetrics, CrashOnce


def _last_step_metrics(state) -> dict:
    """The newest logged step's numbers (what Ray attaches to the checkpoint)."""
    out: dict = {"epoch": float(state.epoch or 0.0)}
    latest = next((e for e in reversed(state.log_history) if "loss" in e), {})
    for k, v in latest.items():
        if isinstance(v, (int, float)):
            out[k] = v
    out["step"] = state.global_step
    return out


# ---------------------------------------------------------------------------- metrics files

def step_rows(log_history: list) -> list[dict]:
    return [dict(e) for e in log_history if "loss" in e]


def write_metrics(uri: str, log_history: list) -> None:
    storage.write_jsonl(uri, step_rows(log_history))


def append_metrics(uri: str, entry: dict) -> None:
    line = json.dumps(entry, default=float) + "\n"
    if storage.is_local(uri):
        with open(storage.local_path(uri), "a") as f:
            f.write(line)
    # remote URIs: the whole file is rewritten at each checkpoint and at the end


# ---------------------------------------------------------------------------- export

def _put_dir(local: str, uri: str) -> None:
    """Copy a local directory to `uri` (local path or fsspec URI), replacing what was there."""
    if storage.is_local(uri):
        dst = storage.local_path(uri)
        tmp = dst.rstrip("/") + ".tmp-export"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        return
    fs, path = storage.fs_for(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.put(local.rstrip("/") + "/", path, recursive=True)


def export_model(trainer, cfg: TrainConfig, model_path: str, rank: int, local_root: str, out_uri: str) -> None:
    """Write the trained optimizer to `out_uri`: full safetensors + tokenizer + chat template.

    All ranks take part (ZeRO-3 gathers its shards); only rank 0 writes.
    """
    staged = os.path.join(local_root, "export")
    shutil.rmtree(staged, ignore_errors=True)
    trainer.save_model(staged)  # ZeRO-3: gathers 16-bit weights (stage3_gather_16bit_weights_on_model_save)
    if rank != 0:
        return
    if cfg.lora:  # save_model wrote the adapter only; merge it into the base for a plain HF model
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # Training is over: without this, from_pretrained on rank 0 alone would enter ZeRO-3's
        # zero.Init and wait forever in a broadcast the other ranks never join.
        unset_hf_deepspeed_config()

        base = AutoModelForCausalLM.from_pretrained(model_path, dtype="float32")
        merged = PeftModel.from_pretrained(base, staged).merge_and_unload()
        full = os.path.join(local_root, "export-merged")
        merged.save_pretrained(full, safe_serialization=True)
        trainer.processing_class.save_pretrained(full)
        staged = full
    Path(staged, "training_args.bin").unlink(missing_ok=True)  # a pickle; the export is weights + tokenizer
    tok = trainer.processing_class
    if not any(Path(staged).glob("chat_template*")) and getattr(tok, "chat_template", None):
        Path(staged, "chat_template.jinja").write_text(tok.chat_template)
    _put_dir(staged, out_uri)


# ---------------------------------------------------------------------------- the worker

def _resume_dir(restored: str) -> str:
    """The HF checkpoint folder inside a restored dir (Ray layout, HF layout, or an output dir)."""
    root = Path(restored)
    for cand in (root / HF_CKPT, root):
        if (cand / "trainer_state.json").exists():
            return str(cand)
    steps = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    if steps and (steps[-1] / "trainer_state.json").exists():
        return str(steps[-1])
    raise FileNotFoundError(f"no HF checkpoint (trainer_state.json) under {restored}")


def checkpoint_problem(restored: str) -> Optional[str]:
    """Why the checkpoint restored at `restored` cannot be resumed from; None if it looks whole.

    Cheap checks that catch truncated or half-written files before HF Trainer and DeepSpeed
    have built half their state from them: the trainer state parses, every safetensors
    header reads, every torch file is a readable zip, DeepSpeed's `latest` tag exists.
    """
    import zipfile

    from safetensors import safe_open

    try:
        hf = Path(_resume_dir(restored))
    except FileNotFoundError as e:
        return str(e)
    try:
        int(json.loads((hf / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json unreadable ({type(e).__name__}: {e})"
    for f in sorted(hf.rglob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            return f"{f.relative_to(hf)} unreadable ({type(e).__name__}: {e})"
    for f in sorted(list(hf.rglob("*.pt")) + list(hf.rglob("*.pth")) + list(hf.rglob("*.bin"))):
        if not zipfile.is_zipfile(f):
            return f"{f.relative_to(hf)} is truncated or not a torch file"
    if (hf / "latest").exists():
        tag = (hf / "latest").read_text().strip()
        if not (hf / tag).is_dir():
            return f"DeepSpeed tag '{tag}' named in 'latest' is missing"
    return None


def _older_checkpoints(latest) -> list:
    """`latest` then the run's older checkpoints beside it (same storage), newest first."""
    import posixpath

    import pyarrow.fs as pafs
    import ray.train

    parent, name = posixpath.split(latest.path.rstrip("/"))
    infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    older = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [latest] + [ray.train.Checkpoint(posixpath.join(parent, n), filesystem=latest.filesystem) for n in older]


def pick_checkpoint(latest, rank: int, fallback: bool) -> dict:
    """Rank 0 checks `latest` (and with `fallback`, older ones) and tells every rank which to use.

    Returns {"path": chosen path or None, "skipped": [{"checkpoint", "why"}]}.
    """
    import posixpath

    import torch.distributed as dist

    choice: dict = {"path": None, "skipped": []}
    if rank == 0:
        for cand in (_older_checkpoints(latest) if fallback else [latest]):
            with cand.as_directory() as d:
                why = checkpoint_problem(d)
            if why is None:
                choice["path"] = cand.path
                break
            choice["skipped"].append({"checkpoint": posixpath.basename(cand.path.rstrip("/")), "why": why})
            print(f"[vpo train] skipping checkpoint {cand.path}: {why}", flush=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    return choice


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: one rank of SFT or DPO."""
    import contextlib

    t_start = time.perf_counter()
    phases: dict[str, float] = {"started_at": time.time()}

    def mark(name: str) -> None:
        spent = sum(v for k, v in phases.items() if k.endswith("_s"))
        phases[name] = round(time.perf_counter() - t_start - spent, 2)

    import ray.train
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import AutoTokenizer

    from vpo_ray.config import _build
    from vpo_ray.train.data import load_for_trl

    mark("import_s")
    cfg: TrainConfig = _build(TrainConfig, config["cfg"])
    model_path: str = config["model_path"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.deepspeed_stage > 0:
        import deepspeed

        # ZeRO-3's zero.Init (inside from_pretrained) needs DeepSpeed's comm set up on Ray's process group.
        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    local_root = tempfile.mkdtemp(prefix=f"vpo-train-{cfg.method}-r{rank}-")
    checkpoint, own_run = ray.train.get_checkpoint(), True
    if checkpoint is None and cfg.resume_from:
        checkpoint, own_run = ray.train.Checkpoint(cfg.resume_from), False
    restore: dict = {"path": None, "skipped": []}
    CheckpointToRay, StepMetrics, CrashOnce = _callbacks()
    try:
        with contextlib.ExitStack() as stack:
            resume = None
            if checkpoint is not None:
                # This run's own checkpoints: a damaged newest one falls back to the one before.
                restore = pick_checkpoint(checkpoint, rank, fallback=own_run)
                if restore["path"] is None:
                    why = "; ".join(f"{s['checkpoint']}: {s['why']}" for s in restore["skipped"])
                    raise RuntimeError(f"no usable checkpoint to resume from ({why})")
                chosen = ray.train.Checkpoint(restore["path"], filesystem=checkpoint.filesystem)
                resume = _resume_dir(stack.enter_context(chosen.as_directory()))
                print(f"[vpo train] rank {rank} resumes from {chosen.path}", flush=True)
            dataset = load_for_trl(cfg.data, cfg.method, cache_dir=os.path.join(local_root, "hf_datasets"))
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            args = training_args(cfg, os.path.join(local_root, "hf"), config.get("deepspeed"))
            kwargs: dict = dict(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer,
                                peft_config=lora_config(cfg) if cfg.lora else None)
            if cfg.method == "sft":
                from trl import SFTTrainer as Trainer
            else:
                from trl import DPOTrainer as Trainer
                if config.get("ref_model_path"):
                    from transformers import AutoModelForCausalLM

                    kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(config["ref_model_path"], dtype="float32")
            trainer = Trainer(**kwargs)
            suffix = ""
            if restore["skipped"]:
                suffix = "_from" + os.path.basename(restore["path"].rstrip("/")).split("_")[1].lstrip("0")
            trainer.add_callback(CheckpointToRay(suffix))
            trainer.add_callback(StepMetrics(storage.join(cfg.out, "metrics.jsonl"), rank))
            if cfg.fault_step > 0:
                trainer.add_callback(CrashOnce(cfg.fault_step, storage.join(cfg.out, FAULT_MARKER), rank, world))
            trainer = prepare_trainer(trainer)
            mark("setup_s")
            trainer.train(resume_from_checkpoint=resume)
            mark("train_s")
        export_model(trainer, cfg, model_path, rank, local_root, storage.join(cfg.out, "model"))
        mark("export_s")
        if rank == 0:
            write_metrics(storage.join(cfg.out, "metrics.jsonl"), trainer.state.log_history)
            summary = [e for e in trainer.state.log_history if "train_runtime" in e]
            storage.write_json(storage.join(cfg.out, "train_state.json"),
                               {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
                                "summary": summary[-1] if summary else {}, "rank0_seconds": phases,
                                "finished_at": time.time(), "job_id": config.get("job_id", ""),
                                "resumed_from": restore["path"], "skipped_checkpoints": restore["skipped"]})
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
