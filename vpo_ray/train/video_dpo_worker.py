"""What each Ray Train worker of `vpo train video-dpo` runs: Diffusion-DPO under DeepSpeed.

    base pipeline (no VAE: latents come ready from the renderer) -> policy transformer
    (LoRA adapter via diffusers' add_adapter, or every weight) + frozen reference (the same
    module with its adapter off, or a frozen copy) -> DeepSpeed engine (ZeRO 0/2/3, bf16 on
    GPU) -> per micro-step: a slice of the pairs, one timestep and one noise per pair,
    video_dpo_loss.pair_loss -> engine.backward/step.

Determinism, which resume relies on: the pair order of every epoch is a seeded permutation
and each micro-step draws its noise and timesteps from a generator seeded by (seed, step,
micro-step, rank); a checkpoint holds the DeepSpeed state (weights or adapter, optimizer,
LR schedule) plus the step, so a resumed run continues exactly where the original was.

Checkpoints: every rank saves its DeepSpeed shard into a local folder and reports it with
`ray.train.report`; Ray Train merges the ranks' files into one checkpoint in storage and
`ray.train.get_checkpoint()` hands it back after a restart.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Optional

from vpo_ray import storage
from vpo_ray.train.callbacks import train_step_drill
from vpo_ray.train.video_dpo_config import VideoDPOConfig

CKPT_TAG = "state"  # DeepSpeed's tag (sub-folder) inside each reported checkpoint
STATE_FILE = "video_dpo_state.json"  # step and epoch, beside the DeepSpeed files


# ---------------------------------------------------------------------------- data order

def total_steps(cfg: VideoDPOConfig, n_pairs: int, world: int) -> int:
    """Optimizer steps of the run: max_steps, else epochs over the pairs (at least one step)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = world * cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    return max(1, math.ceil(cfg.epochs * n_pairs / per_step))


def pair_indices(n_pairs: int, seed: int, step: int, micro: int, rank: int, world: int, batch: int,
                 accumulation: int) -> list[int]:
    """Rows of (step, micro-step, rank): consecutive slices of a seeded permutation per epoch."""
    import numpy as np

    out = []
    for k in range(batch):
        pos = ((step * accumulation + micro) * world + rank) * batch + k
        epoch, offset = divmod(pos, n_pairs)
        out.append(int(np.random.RandomState(seed + epoch).permutation(n_pairs)[offset]))
    return out


def step_generator(seed: int, step: int, micro: int, rank: int):
    """The generator of one micro-step's noise and timesteps: the same after a resume."""
    import torch

    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + rank)


# ---------------------------------------------------------------------------- models

def load_base(model_path: str, device: str, dtype: str):
    """The base pipeline with transformer and text encoder on `device` (the VAE stays on the CPU)."""
    from vpo_ray.models.registry import load_t2v_pipeline
    from vpo_ray.pipeline import t2v

    if model_path.startswith(t2v.ARCH_PREFIX):  # real architecture, random weights, no text encoder
        return t2v.build_arch_pipeline(model_path[len(t2v.ARCH_PREFIX):], device, dtype)
    if model_path.startswith("random:"):  # weights=random: built in place on the device, text encoder included
        return load_t2v_pipeline(model_path, device, dtype)
    pipe = load_t2v_pipeline(model_path, "cpu", dtype)
    pipe.transformer.to(device)
    if pipe.text_encoder is not None:
        pipe.text_encoder.to(device).requires_grad_(False)
    return pipe


def make_trainable(transformer, cfg: VideoDPOConfig):
    """Policy in place (LoRA adapter or all weights); returns the reference forward."""
    import copy

    import torch

    from vpo_ray.train.video_dpo_loss import predict

    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    if cfg.lora:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, init_lora_weights=True,
                                           target_modules=[t.strip() for t in cfg.lora_targets.split(",")]))

        def reference(noisy, embeds, t, rotary, module=transformer):
            module.disable_adapters()  # the base weights are the reference: no second copy in memory
            try:
                return predict(module, noisy, embeds, t, rotary)
            finally:
                module.enable_adapters()
        return reference
    frozen = copy.deepcopy(transformer).requires_grad_(False).eval()
    transformer.requires_grad_(True)
    return lambda noisy, embeds, t, rotary: predict(frozen, noisy, embeds, t, rotary)


def prompt_embeddings(pipe, prompts: list[str], device: str, dtype):
    """Text condition of `prompts`: the pipeline's own encoder, or fixed stand-ins for arch: builds."""
    import torch

    shape = getattr(pipe, "_vpo_text_shape", None)
    if shape is not None:
        from vpo_ray.pipeline.t2v import synthetic_prompt_embeds

        return torch.cat([synthetic_prompt_embeds(p, shape, device, dtype) for p in prompts])
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=torch.device(device),
                                       dtype=dtype)
    return embeds


def deepspeed_config(cfg: VideoDPOConfig, hidden: int) -> dict:
    """The shipped ZeRO JSON (train/deepspeed/zeroN.json, "auto" values resolved as the train-step
    benchmark does) with this run's batch, accumulation and clipping; stage 0 = data parallel, no ZeRO."""
    from vpo_ray.bench.train_step import _ds_config

    bf16 = cfg.precision == "bf16"
    if cfg.deepspeed_stage:
        ds = _ds_config(cfg.deepspeed_stage, cfg.per_device_batch_size, hidden, bf16)
    else:
        ds = {"zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "train_micro_batch_size_per_gpu": cfg.per_device_batch_size, "bf16": {"enabled": bf16}}
    ds.update(gradient_accumulation_steps=cfg.gradient_accumulation_steps, gradient_clipping=cfg.max_grad_norm)
    return ds


def build_engine(transformer, cfg: VideoDPOConfig, steps: int):
    """DeepSpeed engine over the trainable parameters, with AdamW and the diffusers LR schedule."""
    import deepspeed
    import torch
    from diffusers.optimization import get_scheduler

    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    schedule = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=steps)
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    engine, optimizer, _, schedule = deepspeed.initialize(model=transformer, optimizer=optimizer,
                                                          lr_scheduler=schedule, config=deepspeed_config(cfg, hidden))
    return engine, schedule


# ---------------------------------------------------------------------------- the batch

def load_pair_batch(rows: list[dict], indices: list[int], device: str):
    """(chosen latents, rejected latents, prompts) of the given rows; latents (B, F, C, H, W) in fp32."""
    import torch

    from vpo_ray.pipeline.t2v import load_latents

    chosen, rejected, prompts = [], [], []
    for i in indices:
        chosen.append(load_latents(rows[i]["chosen_latents"]))
        rejected.append(load_latents(rows[i]["rejected_latents"]))
        prompts.append(rows[i]["prompt"])
    as_batch = lambda xs: torch.stack(xs).to(device=device, dtype=torch.float32)  # noqa: E731
    return as_batch(chosen), as_batch(rejected), prompts


# ---------------------------------------------------------------------------- checkpoints

def save_checkpoint(engine, cfg: VideoDPOConfig, step: int, epoch: float, metrics: dict, rank: int) -> None:
    """Every rank: its DeepSpeed files into a local folder, reported to Ray Train (which merges the ranks')."""
    import ray.train

    local = tempfile.mkdtemp(prefix=f"vpo-video-dpo-ckpt-r{rank}-")
    try:
        # LoRA: the frozen base is the base model's; only the adapter and its optimizer state are saved
        engine.save_checkpoint(local, tag=CKPT_TAG, client_state={"step": step}, exclude_frozen_parameters=cfg.lora)
        if rank == 0:
            with open(os.path.join(local, STATE_FILE), "w") as f:
                json.dump({"global_step": step, "epoch": epoch}, f)
        ray.train.report(dict(metrics, step=step), checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")
    finally:
        shutil.rmtree(local, ignore_errors=True)


def restore(engine, cfg: VideoDPOConfig) -> tuple[int, Optional[str]]:
    """(step to start from, checkpoint path or None): this run's last checkpoint, else cfg.resume_from."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.resume_from:
        checkpoint = ray.train.Checkpoint(cfg.resume_from)
    if checkpoint is None:
        return 0, None
    with checkpoint.as_directory() as d:
        if not os.path.isfile(os.path.join(d, STATE_FILE)):
            raise FileNotFoundError(f"{checkpoint.path}: not a video-dpo checkpoint (no {STATE_FILE})")
        _, client = engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=not cfg.lora)
    if client is None:
        raise RuntimeError(f"{checkpoint.path}: DeepSpeed could not load the '{CKPT_TAG}' checkpoint")
    return int(client["step"]), checkpoint.path


# ---------------------------------------------------------------------------- metrics

def reduce_mean(values: dict, device: str) -> dict:
    """Mean of each value over all ranks (every rank calls it)."""
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def append_metrics(uri: str, row: dict) -> None:
    line = json.dumps(row) + "\n"
    if storage.is_local(uri):
        with open(storage.local_path(uri), "a") as f:
            f.write(line)
    else:  # object stores cannot append: rewrite
        old = storage.read_text(uri) if storage.exists(uri) else ""
        storage.write_text(uri, old + line)


# ---------------------------------------------------------------------------- export

def gathered_state_dict(module, cfg: VideoDPOConfig, rank: int) -> Optional[dict]:
    """Full weights (or just the adapter's) on rank 0, gathered from ZeRO-3 shards; None on other ranks."""
    import contextlib

    import deepspeed

    gather = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
              if cfg.deepspeed_stage == 3 else contextlib.nullcontext())
    with gather:
        if rank != 0:
            return None
        if cfg.lora:
            from peft.utils import get_peft_model_state_dict

            return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def export(state: dict, cfg: VideoDPOConfig, model_path: str, local_root: str) -> None:
    """Rank 0: DIR/model/ (a diffusers pipeline: the base with the trained transformer) and, for LoRA,
    DIR/lora/ (the adapter alone, loadable with pipe.load_lora_weights)."""
    from vpo_ray.models.registry import load_t2v_pipeline
    from vpo_ray.train.worker import _put_dir

    pipe = load_t2v_pipeline(model_path, "cpu")  # a released base (the driver refuses random-weight ones)
    if cfg.lora:
        lora_dir = os.path.join(local_root, "lora")
        type(pipe).save_lora_weights(lora_dir, transformer_lora_layers=state)
        pipe.load_lora_weights(lora_dir)  # diffusers' own loader: the adapter as users will load it
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        _put_dir(lora_dir, storage.join(cfg.out, "lora"))
    else:
        pipe.transformer.load_state_dict(state)  # copies into the base's dtype
    model_dir = os.path.join(local_root, "model")
    pipe.save_pretrained(model_dir)
    _put_dir(model_dir, storage.join(cfg.out, "model"))


# ---------------------------------------------------------------------------- the worker

def micro_step(engine, reference, pipe, scheduler, cfg: VideoDPOConfig, batch: tuple, generator, ctx: dict) -> dict:
    """Forward, loss and backward of one micro-batch (chosen, rejected, prompts); returns its numbers."""
    from vpo_ray.train.video_dpo_loss import pair_loss, predict, rotary_embeddings

    chosen, rejected, prompts = batch
    embeds = prompt_embeddings(pipe, prompts, ctx["device"], ctx["dtype"])
    rotary = rotary_embeddings(pipe, chosen, ctx["device"])
    sampling = dict(sampling=cfg.timestep_sampling, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                    mode_scale=cfg.mode_scale)
    out = pair_loss(lambda *a: predict(engine, *a), reference, scheduler, chosen, rejected, embeds, generator,
                    cfg.beta, rotary, sampling=sampling, dtype=ctx["dtype"])
    engine.backward(out["loss"])
    engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
    margin = out["margin"].float()
    return {"loss": float(out["loss"].detach()), "rewards/margins": float(margin.mean()),
            "rewards/accuracies": float((margin > 0).float().mean()), "err_w": float(out["err_w"].mean()),
            "err_l": float(out["err_l"].mean()), "ref_err_w": float(out["ref_err_w"].mean()),
            "ref_err_l": float(out["ref_err_l"].mean())}


def _train_micro_step(engine, reference, pipe, scheduler, cfg, rows, step: int, micro: int, ctx: dict) -> dict:
    """micro_step on the pairs that (step, micro-step, rank) owns, with its own seeded noise."""
    idx = pair_indices(len(rows), cfg.seed, step, micro, ctx["rank"], ctx["world"], cfg.per_device_batch_size,
                       cfg.gradient_accumulation_steps)
    return micro_step(engine, reference, pipe, scheduler, cfg, load_pair_batch(rows, idx, ctx["device"]),
                      step_generator(cfg.seed, step, micro, ctx["rank"]), ctx)


def setup_rank(cfg: VideoDPOConfig, model_path: str, n_pairs: int):
    """(run facts, pipeline, scheduler, reference forward, engine, LR schedule, total steps) of this rank."""
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch
    from diffusers import CogVideoXDDIMScheduler

    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    tc = ray.train.get_context()
    ctx = {"rank": tc.get_world_rank(), "world": tc.get_world_size(),
           "device": str(ray.train.torch.get_device()) if cfg.use_gpu else "cpu",
           "dtype": torch.bfloat16 if cfg.precision == "bf16" else torch.float32}
    if cfg.use_gpu:
        torch.cuda.set_device(ctx["device"])
    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices: the same on every rank and every restart
    pipe = load_base(model_path, ctx["device"], "bfloat16" if cfg.precision == "bf16" else "float32")
    if not type(pipe).__name__.startswith("CogVideoX"):
        raise ValueError(f"video-dpo: {type(pipe).__name__} is not supported yet (CogVideoX pipelines are)")
    # CogVideoX's DDIM scheduler (v-prediction, zero-terminal-SNR) from the pipeline's own scheduler config
    scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)
    reference = make_trainable(pipe.transformer, cfg)
    steps = total_steps(cfg, n_pairs, ctx["world"])
    engine, schedule = build_engine(pipe.transformer, cfg, steps)
    return ctx, pipe, scheduler, reference, engine, schedule, steps


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: one rank of video Diffusion-DPO."""
    import ray.train

    from vpo_ray.config import _build

    t0 = time.perf_counter()
    cfg: VideoDPOConfig = _build(VideoDPOConfig, config["cfg"])
    rows = config["rows"]
    ctx, pipe, scheduler, reference, engine, schedule, steps = setup_rank(cfg, config["model_path"], len(rows))
    rank = ctx["rank"]
    start, resumed_from = restore(engine, cfg)
    saved = start
    metrics_uri = storage.join(cfg.out, "metrics.jsonl")
    pairs_per_step = ctx["world"] * cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    setup_s = time.perf_counter() - t0
    for step in range(start, steps):
        t_step = time.perf_counter()
        parts = [_train_micro_step(engine, reference, pipe, scheduler, cfg, rows, step, m, ctx)
                 for m in range(cfg.gradient_accumulation_steps)]
        logged = reduce_mean({k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}, ctx["device"])
        epoch = (step + 1) * pairs_per_step / len(rows)
        row = {"step": step + 1, "epoch": round(epoch, 4), **logged, "learning_rate": schedule.get_last_lr()[0],
               "pairs_per_second": round(pairs_per_step / (time.perf_counter() - t_step), 4)}
        if rank == 0 and ((step + 1) % cfg.logging_steps == 0 or step + 1 == steps):
            append_metrics(metrics_uri, row)
        train_step_drill(step + 1, rank, ctx["world"], saved)
        if (step + 1) % cfg.save_steps == 0 or step + 1 == steps:
            save_checkpoint(engine, cfg, step + 1, epoch, row, rank)
            saved = step + 1
    local_root = tempfile.mkdtemp(prefix=f"vpo-video-dpo-export-r{rank}-")
    try:
        state = gathered_state_dict(engine.module, cfg, rank) if cfg.export else None  # all ranks (ZeRO-3 gathers)
        if rank == 0:
            if cfg.export:
                export(state, cfg, config["model_path"], local_root)
            storage.write_json(storage.join(cfg.out, "train_state.json"), {
                "global_step": steps, "resumed_from": resumed_from, "job_id": config.get("job_id", ""),
                "setup_seconds": round(setup_s, 2), "train_seconds": round(time.perf_counter() - t0 - setup_s, 2),
                "finished_at": time.time()})
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
