"""`vpo bench video-dpo-step`: the video model's Diffusion-DPO training step — pairs/s, memory, MFU.

    vpo bench video-dpo-step --preset cogvideox-2b --out DIR [modes=[lora,full]] [workers=[1,4]] [steps=5]

Each (mode, workers) is one Ray Train run of the `vpo train video-dpo` stack itself
(video_dpo_worker.setup_rank and micro_step: DeepSpeed engine, LoRA or all weights,
gradient checkpointing, bf16 on GPU) on synthetic pairs of the model's latent shape. A
non-tiny preset is the real architecture with random weights (registry.random_init_from_config
via t2v.build_arch_pipeline) and fixed stand-in text embeddings of the encoder's output shape,
so no text encoder runs inside the timed step; the tiny preset runs the whole thing on CPU.

Model FLOPs of one pair (F = one transformer forward of one clip, flops.dit_flops; F_att its
attention share): policy forward of both videos 2F, backward 2 x 2F (full) or 2 x (F + F_att)
(LoRA: activation gradients only, the frozen weights get none), reference forward 2F. The
recomputed forward of gradient checkpointing is not counted (MFU, not hardware utilisation).
MFU = model FLOPs of all ranks / step time / (ranks x datasheet bf16 peak).
"""
from __future__ import annotations

import dataclasses

from vpo_ray.bench import common
from vpo_ray.train.video_dpo_config import BenchVideoDPOConfig, VideoDPOConfig


def _model_path(preset: str) -> tuple[str, dict]:
    """(what video_dpo_worker.load_base takes, the registry's clip defaults) for `preset`."""
    from vpo_ray.models.registry import get_spec, model_path

    spec = get_spec(preset, "t2v")
    defaults = {k: spec.options[k] for k in ("num_frames", "height", "width")}
    return (model_path(spec) if spec.tiny else f"arch:{spec.name}"), defaults


def pair_flops(pipe, num_frames: int, height: int, width: int, lora: bool) -> dict:
    """Model FLOPs of one pair's step (see the module docstring) and its parts."""
    from vpo_ray.bench.flops import dit_flops

    f = dit_flops(type(pipe.transformer).__name__, pipe.transformer.config, num_frames=num_frames, height=height,
                  width=width, guidance_scale=1.0, text_len=(getattr(pipe, "_vpo_text_shape", None) or (None,))[0])
    fwd, att = f["per_forward"], f["per_forward"] * f["attention_share"]
    backward = 2 * (fwd + att) if lora else 2 * 2 * fwd
    return {"per_forward": fwd, "attention_per_forward": att, "video_tokens": f["video_tokens"],
            "per_pair": 2 * fwd + backward + 2 * fwd}


def _worker(config: dict) -> None:
    """One Ray Train rank: the training stack on a fixed synthetic batch; rank 0 reports every rank's figures."""
    import json
    import os
    import statistics
    import tempfile

    import ray.train
    import torch
    import torch.distributed as dist

    from vpo_ray.config import _build
    from vpo_ray.train.video_dpo_worker import micro_step, setup_rank

    cfg: VideoDPOConfig = _build(VideoDPOConfig, config["cfg"])
    ctx, pipe, scheduler, reference, engine, _, _ = setup_rank(cfg, config["model_path"], n_pairs=10**6)
    device, b = ctx["device"], cfg.per_device_batch_size
    lf = (config["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    shape = (b, lf, pipe.transformer.config.in_channels, config["height"] // pipe.vae_scale_factor_spatial,
             config["width"] // pipe.vae_scale_factor_spatial)
    g = torch.Generator().manual_seed(ctx["rank"])
    batch = (torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device),
             [f"benchmark prompt {ctx['rank']} {i}" for i in range(b)])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for s in range(config["warmup"] + config["steps"]):
        dist.barrier()
        with common.Timer(device) as t:
            out = micro_step(engine, reference, pipe, scheduler, cfg, batch, torch.Generator().manual_seed(s), ctx)
        if s >= config["warmup"]:
            times.append(t.seconds)
            losses.append(out["loss"])
    params = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in engine.module.parameters()]
    mine = {"rank": ctx["rank"], "step_s_median": statistics.median(times), **common.peak_memory(device)}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    with tempfile.TemporaryDirectory() as d:  # Train V2 hands the driver figures only inside a checkpoint
        checkpoint = None
        if ctx["rank"] == 0:
            flops = pair_flops(pipe, config["num_frames"], config["height"], config["width"], cfg.lora)
            with open(os.path.join(d, "bench.json"), "w") as f:
                json.dump({"ranks": ranks, "losses": losses, "flops": flops,
                           "params": sum(n for n, _ in params), "trainable": sum(n for n, g in params if g)}, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"rank": ctx["rank"]}, checkpoint=checkpoint)


def measure(mode: str, workers: int, cfg: BenchVideoDPOConfig, device: str) -> dict:
    """One Ray Train run of `workers` ranks in `mode`; returns its figures."""
    import json
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vpo_ray.config import to_dict

    cuda = device.startswith("cuda")
    model_path, clip = _model_path(cfg.preset)
    clip.update({k: getattr(cfg, k) for k in ("num_frames", "height", "width") if getattr(cfg, k)})
    train_cfg = VideoDPOConfig(lora=mode == "lora", deepspeed_stage=cfg.zero_stage if mode == "full" else 2,
                               precision="bf16" if cuda else "fp32", use_gpu=cuda, num_workers=workers,
                               per_device_batch_size=cfg.pairs_per_gpu, gradient_accumulation_steps=1,
                               gradient_checkpointing=cfg.gradient_checkpointing, max_steps=10**6)
    trainer = TorchTrainer(
        _worker, train_loop_config={"cfg": to_dict(train_cfg), "model_path": model_path, "steps": cfg.steps,
                                    "warmup": cfg.warmup, **clip},
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cuda),
        run_config=RunConfig(name=f"bench-video-dpo-{mode}-{workers}", storage_path=tempfile.mkdtemp(prefix="vpo-bench-"),
                             worker_runtime_env=None if cuda else {"env_vars": {"DS_ACCELERATOR": "cpu"}}))
    with trainer.fit().checkpoint.as_directory() as d, open(f"{d}/bench.json") as f:
        got = json.load(f)
    step_s = max(r["step_s_median"] for r in got["ranks"])  # a step ends when its slowest rank does
    pairs = workers * cfg.pairs_per_gpu
    peak = common.device_facts(device).get("peak_bf16_tflops") if cuda else None
    flop = got["flops"]["per_pair"] * pairs
    return {"mode": mode, "workers": workers, "engine": f"deepspeed zero-{train_cfg.deepspeed_stage}", **clip,
            "params": got["params"], "trainable_params": got["trainable"], "step_s_median": round(step_s, 4),
            "pairs_per_step": pairs, "pairs_per_s": round(pairs / step_s, 4),
            "pairs_per_s_per_gpu": round(pairs / step_s / workers, 4), "videos_per_s": round(2 * pairs / step_s, 4),
            "model_tflops_per_gpu": round(flop / step_s / workers / 1e12, 1),
            "mfu": round(flop / step_s / workers / 1e12 / peak, 3) if peak else None, "flops": got["flops"],
            "losses": [round(x, 5) for x in got["losses"]],
            "peak_allocated_gib_per_rank": [r["peak_allocated_gib"] for r in got["ranks"]],
            "peak_reserved_gib_per_rank": [r["peak_reserved_gib"] for r in got["ranks"]]}


def run(cfg: BenchVideoDPOConfig) -> dict:
    import torch

    from vpo_ray import storage
    from vpo_ray.ray_utils import init_ray

    device = common.resolve_device(None)
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    counts = sorted({min(w, gpus or 2) for w in cfg.workers})  # no GPU: at most 2 CPU ranks
    storage.makedirs(cfg.out)
    stem = f"video_dpo_step_{cfg.preset}"
    rec = {"benchmark": "video-dpo-step", "preset": cfg.preset, "device": common.device_facts(device),
           "gpus": gpus, "versions": common.versions(), "config": dataclasses.asdict(cfg),
           "weights": "tiny preset" if cfg.preset == "tiny" else "random (real architecture config)",
           "precision": "bf16 (DeepSpeed), fp32 master weights" if gpus else "fp32",
           "text": "fixed stand-in embeddings (no text encoder in the step)" if cfg.preset != "tiny"
                   else "the tiny T5 encoder, inside the step",
           "flops_note": __doc__.split("Model FLOPs")[1].strip().replace("\n", " "), "runs": {}}
    init_ray(cfg.ray)
    for mode in cfg.modes:
        for workers in counts:
            common.guarded(rec["runs"], f"{mode}-{workers}", lambda m=mode, w=workers: measure(m, w, cfg, device))
            common.write_record(cfg.out, stem, rec)  # a cut-off run keeps what it measured
    rec["png"] = storage.join(cfg.out, f"{stem}.png")
    plot_record(rec, rec["png"])
    common.write_record(cfg.out, stem, rec)
    return rec


def plot_record(rec: dict, png: str) -> None:
    """Pairs/s in total and per GPU for each mode x worker count, MFU in the subtitle."""
    from vpo_ray.bench.plotting import plot_bars

    done = {k: r for k, r in rec["runs"].items() if "error" not in r}
    groups = {k: {"pairs/s": r.get("pairs_per_s"), "pairs/s per GPU": r.get("pairs_per_s_per_gpu")}
              for k, r in done.items()}
    mfu = ", ".join(f"{k} {r['mfu']:.2f}" for k, r in done.items() if r.get("mfu") is not None)
    note = f"MFU {mfu}" if mfu else "MFU: no datasheet peak for this device"
    plot_bars(f"video Diffusion-DPO step, {rec['preset']} on {rec['device']['name']}", groups, "pairs / s",
              png, note=note)

