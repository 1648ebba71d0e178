"""What each Ray Train worker runs: TRL's SFTTrainer/DPOTrainer under DeepSpeed (or DDP).

The model comes from vpo_ray.train.build: pretrained weights, or (weights=random) a real
architecture with random weights built in place; under ZeRO-3 each rank creates and shards
it on its own GPU. Callbacks (vpo_ray.train.callbacks) hand checkpoints to Ray Train and log
per-step seconds, tokens and GPU memory. After a restart (a dead worker, or a re-run with
the same out and run name) `ray.train.get_checkpoint()` hands the last checkpoint back and HF
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
from vpo_ray.train.callbacks import HF_CKPT, callback_classes, fault_drill, write_metrics

log = logging.getLogger("vpo.train")

DS_DIR = Path(__file__).resolve().parent / "deepspeed"
PAPER_DEFAULTS = {  # VPO paper hyper-parameters (full fine-tune)
    "sft": {"learning_rate": 2e-6, "epochs": 5.0, "lr_scheduler": "constant_with_warmup"},
    "dpo": {"learning_rate": 5e-7, "epochs": 1.0, "lr_scheduler": "linear"},
}
HF_OUTPUT = "_hf_output"  # shared checkpoints: the HF output dir inside the Ray run dir
# DeepSpeed keys a bucket size sets, per ZeRO stage (elements; HF's "auto" is hidden^2)
BUCKET_KEYS = {2: ("reduce_bucket_size", "allgather_bucket_size"),
               3: ("reduce_bucket_size", "stage3_prefetch_bucket_size")}


def resolved(cfg: TrainConfig, key: str) -> Any:
    value = getattr(cfg, key)
    return PAPER_DEFAULTS[cfg.method][key] if value is None else value


def deepspeed_config(cfg: TrainConfig) -> Optional[dict]:
    """The DeepSpeed JSON for `cfg` (stage, offload, overlap, buckets filled in); None = plain DDP."""
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
    if cfg.deepspeed_config:  # a user's own JSON is taken as given
        return ds
    zero["stage"] = cfg.deepspeed_stage
    device = "cpu" if cfg.offload else "none"
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:
            zero[key]["device"] = device
            zero[key]["pin_memory"] = bool(cfg.use_gpu)
    if cfg.offload:
        # ZeRO-Offload steps HF's torch AdamW on the CPU partitions (fused CPU kernel) instead of
        # DeepSpeedCPUAdam, whose C++ op would be JIT-compiled on every fresh GPU node.
        ds["zero_force_ds_cpu_optimizer"] = False
    # Overlapping reduction with backward pays on GPUs (NCCL on its own stream); gloo on CPU gains nothing.
    zero["overlap_comm"] = cfg.use_gpu if cfg.overlap_comm is None else cfg.overlap_comm
    if cfg.bucket_size:
        for key in BUCKET_KEYS[cfg.deepspeed_stage]:
            zero[key] = cfg.bucket_size
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
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        max_length=cfg.max_length,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=max(cfg.save_steps, 1),
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
    )
    if cfg.method == "sft":
        return SFTConfig(packing=cfg.packing, **common)  # packing (bfd) is padding-free in TRL
    # sft_weight > 0: TRL's "sft" loss is the token-mean NLL of the chosen completion, as pref_ftx's
    preference = ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.sft_weight]} if cfg.sft_weight > 0
                  else {})
    return DPOConfig(beta=cfg.beta, precompute_ref_log_probs=cfg.precompute_ref_log_probs, **preference, **common)


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------- export

def _put_dir(local: str, uri: str) -> None:
    """Move a local staging directory to `uri` (local path or fsspec URI), replacing what was there.

    A move, not a copy, where the filesystem allows: an 8B export is 16 GB.
    """
    if storage.is_local(uri):
        dst = storage.local_path(uri)
        tmp = dst.rstrip("/") + ".tmp-export"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.move(local, tmp)
        storage.set_modes(tmp)  # readable by the run folder's other readers (VPO_UMASK), like every artifact
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


def shared_run_dir() -> Optional[str]:
    """The Ray run dir when it is a plain filesystem path every rank sees (checkpoints then move, not copy)."""
    import pyarrow.fs as pafs
    import ray.train

    store = ray.train.get_context().get_storage()
    return store.experiment_fs_path if isinstance(store.storage_filesystem, pafs.LocalFileSystem) else None


def _restore(cfg: TrainConfig, rank: int, stack) -> tuple[Optional[str], dict]:
    """(HF checkpoint dir to resume from or None, {"path", "skipped"}) for this attempt."""
    import ray.train

    checkpoint, own_run = ray.train.get_checkpoint(), True
    if checkpoint is None and cfg.resume_from:
        checkpoint, own_run = ray.train.Checkpoint(cfg.resume_from), False
    if checkpoint is None:
        return None, {"path": None, "skipped": []}
    # This run's own checkpoints: a damaged newest one falls back to the one before.
    restore = pick_checkpoint(checkpoint, rank, fallback=own_run)
    if restore["path"] is None:
        why = "; ".join(f"{s['checkpoint']}: {s['why']}" for s in restore["skipped"])
        raise RuntimeError(f"no usable checkpoint to resume from ({why})")
    chosen = ray.train.Checkpoint(restore["path"], filesystem=checkpoint.filesystem)
    print(f"[vpo train] rank {rank} resumes from {chosen.path}", flush=True)
    return _resume_dir(stack.enter_context(chosen.as_directory())), restore


def _output_dir(run_dir: Optional[str], local_root: str, rank: int) -> str:
    """Where HF writes checkpoints: one dir for all ranks beside the Ray run, else this rank's own."""
    import torch.distributed as dist

    if not run_dir:
        return os.path.join(local_root, "hf")
    out = os.path.join(run_dir, HF_OUTPUT)
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)  # a crashed attempt's half-written save
    if dist.is_initialized():
        dist.barrier()
    return out


def _gpu_facts(cfg: TrainConfig, measure_ceiling: bool) -> dict:
    """This rank's device name, datasheet bf16 peak and (if asked) measured matmul ceiling."""
    if not cfg.use_gpu:
        return {"device_name": "cpu", "peak_bf16_tflops": None, "matmul_ceiling_tflops": None}
    import ray.train.torch
    import torch

    from vpo_ray.bench import common
    from vpo_ray.bench.flops import peak_tflops

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device)
    ceiling = common.matmul_ceiling_tflops(str(device)) if measure_ceiling else None
    torch.cuda.reset_peak_memory_stats()
    return {"device_name": name, "peak_bf16_tflops": peak_tflops(name), "matmul_ceiling_tflops": ceiling}


def _make_trainer(cfg: TrainConfig, config: dict, args, datasets_cache: str):
    """The TRL trainer for this rank, its model built in place (after `args`: ZeRO-3 init).

    `datasets_cache` is one dir for all ranks (of a node at least): TRL's precomputed reference
    log-probs are written once by rank 0 into the dataset's cache and read back by every rank.
    """
    from vpo_ray.train.build import build_model, load_tokenizer, reference_model
    from vpo_ray.train.data import load_for_trl

    model_path = config["model_path"]
    dataset = load_for_trl(cfg.data, cfg.method, cache_dir=datasets_cache,
                           completion_only_loss=cfg.completion_only_loss)
    kwargs: dict = dict(model=build_model(cfg, model_path), args=args, train_dataset=dataset,
                        processing_class=load_tokenizer(cfg, model_path),
                        peft_config=lora_config(cfg) if cfg.lora else None)
    if cfg.method == "sft":
        from trl import SFTTrainer as Trainer
    else:
        from trl import DPOTrainer as Trainer

        kwargs["ref_model"] = reference_model(cfg, model_path, config.get("ref_model_path"))
    return Trainer(**kwargs)


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

    from vpo_ray.config import _build
    from vpo_ray.train.build import parameter_count

    mark("import_s")
    cfg: TrainConfig = _build(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    facts = _gpu_facts(cfg, bool(config.get("measure_ceiling")))
    if cfg.deepspeed_stage > 0:
        from vpo_ray.train.build import init_deepspeed_comm

        init_deepspeed_comm(cfg.use_gpu)
    local_root = tempfile.mkdtemp(prefix=f"vpo-train-{cfg.method}-r{rank}-")
    run_dir = shared_run_dir()
    CheckpointToRay, StepMetrics, NoSaveAtEnd = callback_classes()
    try:
        with contextlib.ExitStack() as stack:
            resume, restore = _restore(cfg, rank, stack)
            args = training_args(cfg, _output_dir(run_dir, local_root, rank), config.get("deepspeed"))
            cache = os.path.join(run_dir or tempfile.gettempdir(), f"_hf_datasets-{config.get('job_id', '')}")
            trainer = _make_trainer(cfg, config, args, cache)
            mark("setup_s")
            suffix = ""
            if restore["skipped"]:
                suffix = "_from" + os.path.basename(restore["path"].rstrip("/")).split("_")[1].lstrip("0")
            saver = CheckpointToRay(cfg.out, phases["started_at"], suffix, run_dir, rank)
            attempt = {**phases, "job_id": config.get("job_id", ""), "resumed_from": restore["path"],
                       "_train_called": time.perf_counter()}
            for callback in (saver, StepMetrics(cfg.out, rank, attempt)):
                trainer.add_callback(callback)
            if (drill := fault_drill(rank, world)) is not None:  # VPO_FAULTS train_step drills
                trainer.add_callback(drill)
            if not cfg.save_at_end:
                trainer.add_callback(NoSaveAtEnd())
            trainer = prepare_trainer(trainer)
            trainer.train(resume_from_checkpoint=resume)
            mark("train_s")
        if cfg.export:
            export_model(trainer, cfg, config["model_path"], rank, local_root, storage.join(cfg.out, "model"))
            mark("export_s")
        if rank == 0:
            _write_state(cfg, trainer, config, {**facts, "world_size": world, "rank0_seconds": phases,
                                                "params": parameter_count(trainer.model), "resumed_from": restore["path"],
                                                "skipped_checkpoints": restore["skipped"],
                                                "attempt": attempt})
    finally:
        shutil.rmtree(local_root, ignore_errors=True)


def _write_state(cfg: TrainConfig, trainer, config: dict, extra: dict) -> None:
    """Rank 0: the final metrics.jsonl and train_state.json (the driver's proof that this call finished)."""
    write_metrics(storage.join(cfg.out, "metrics.jsonl"), trainer.state.log_history)
    summary = [e for e in trainer.state.log_history if "train_runtime" in e]
    storage.write_json(storage.join(cfg.out, "train_state.json"),
                       {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
                        "summary": summary[-1] if summary else {}, "finished_at": time.time(),
                        "job_id": config.get("job_id", ""), **extra})
