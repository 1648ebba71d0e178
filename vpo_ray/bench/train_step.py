"""`vpo bench train-step`: tokens/s and MFU of SFT and DPO optimizer steps of the optimizer LLM.

The same math TRL's trainers run, without their data loading, in one of two engines:

  deepspeed  (default) `train.workers` Ray Train workers (one GPU each on CUDA), the model in a
             DeepSpeed engine with ZeRO stage `train.zero_stage` (the shipped
             vpo_ray/train/deepspeed/zeroN.json, "auto" values resolved as HF does), bf16 on GPU,
             torch AdamW: the `vpo train` stack minus TRL's data pipeline
  torch      one process: fp32 master weights, bf16 autocast on GPU, fused AdamW

  sft  causal-LM loss over `train.batch_size` sequences of `train.seq_len` tokens per rank
  dpo  policy forward over chosen + rejected (2 x batch_size sequences sharing a prompt of
       half the length), a frozen reference forward (no grad), the sigmoid DPO loss (beta 0.1)

Tokens/s counts the policy's tokens per step over all ranks (DPO: chosen + rejected);
per GPU = that / ranks. MFU = model FLOPs / step time / (ranks x datasheet bf16 peak), with
model FLOPs = 6 x params x policy tokens (+ 2 x params x reference tokens for DPO): the usual
dense estimate, attention's N^2 term left out (small at 512 tokens), so MFU is a lower bound.
"""
from __future__ import annotations

import dataclasses

from vpo_ray.bench import common
from vpo_ray.bench.config import BenchConfig


def _batch(batch_size: int, seq_len: int, vocab: int, device: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    b, n = batch_size, seq_len
    chosen = torch.randint(10, vocab - 1, (b, n), generator=g)
    rejected = chosen.clone()
    rejected[:, n // 2:] = torch.randint(10, vocab - 1, (b, n - n // 2), generator=g)
    return chosen.to(device), rejected.to(device)


def _response_logps(logits, ids, start: int):
    import torch

    logp = torch.log_softmax(logits[:, start - 1:-1].float(), dim=-1)
    return logp.gather(-1, ids[:, start:].unsqueeze(-1)).squeeze(-1).sum(-1)


def _loss(method: str, model, ref, chosen, rejected):
    """The step's loss; each engine does its own backward and optimizer step around it."""
    import torch
    import torch.nn.functional as F

    if method == "sft":
        return model(input_ids=chosen, labels=chosen).loss
    both = torch.cat([chosen, rejected])
    start = chosen.shape[1] // 2
    lp = _response_logps(model(input_ids=both).logits, both, start)
    with torch.no_grad():
        rp = _response_logps(ref(input_ids=both).logits, both, start)
    b = chosen.shape[0]
    margin = (lp[:b] - rp[:b]) - (lp[b:] - rp[b:])
    return -F.logsigmoid(0.1 * margin).mean()


def model_flops(params: int, tokens: int, method: str) -> float:
    """Dense FLOPs of one step: forward + backward of the policy, forward of the DPO reference."""
    return 6.0 * params * tokens + (2.0 * params * tokens if method == "dpo" else 0.0)


def _figures(method: str, params: int, tokens: int, step_s: float, ranks: int, device: str) -> dict:
    """Throughput and MFU of one method from its median step time (`tokens` over all ranks)."""
    flop = model_flops(params, tokens, method)
    peak = common.device_facts(device).get("peak_bf16_tflops") if device.startswith("cuda") else None
    return {"ranks": ranks, "params": params, "step_s_median": round(step_s, 4), "tokens_per_step": tokens,
            "tokens_per_s": round(tokens / step_s, 1), "tokens_per_s_per_gpu": round(tokens / step_s / ranks, 1),
            "model_tflops_per_gpu": round(flop / step_s / ranks / 1e12, 1),
            "mfu": round(flop / step_s / ranks / 1e12 / peak, 3) if peak else None}


def _policy_and_ref(name: str, method: str, device: str, gradient_checkpointing: bool):
    """(policy in fp32, frozen reference or None, vocab size); the reference starts as the policy, as in TRL."""
    import copy

    import torch

    from vpo_ray.bench.llm_stages import load_llm

    model, vocab = load_llm(name, device, "float32")
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ref = None
    if method == "dpo":
        ref = copy.deepcopy(model).to(torch.bfloat16 if device.startswith("cuda") else torch.float32)
        ref = ref.eval().requires_grad_(False)
    return model, ref, vocab


def _ds_config(stage: int, batch_size: int, hidden: int, bf16: bool) -> dict:
    """The shipped ZeRO JSON with HF Trainer's "auto" rules filled in for this model."""
    import json

    from vpo_ray.train.worker import DS_DIR

    ds = json.loads((DS_DIR / f"zero{stage}.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=1, gradient_clipping=1.0,
              bf16={"enabled": bf16})
    ds["fp16"]["enabled"] = False
    auto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}
    zero = ds["zero_optimization"]
    for key, value in list(zero.items()):
        if value == "auto":
            zero[key] = auto[key]
    return ds


def _ds_worker(config: dict) -> None:
    """One Ray Train rank: DeepSpeed engine, warm-up step, timed steps; rank 0 reports all ranks."""
    import json
    import os
    import statistics
    import tempfile

    import deepspeed
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from vpo_ray.train.build import init_deepspeed_comm

    cuda = config["cuda"]
    init_deepspeed_comm(cuda)
    rank = ray.train.get_context().get_world_rank()
    device = str(ray.train.torch.get_device()) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats()
    model, ref, vocab = _policy_and_ref(config["model"], config["method"], device, config["gradient_checkpointing"])
    params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    ds = _ds_config(config["zero_stage"], config["batch_size"], model.config.hidden_size, bf16=cuda)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-6),
                                      config=ds)
    # data parallel: each rank its own batch
    chosen, rejected = _batch(config["batch_size"], config["seq_len"], vocab, device, seed=rank)

    def step() -> float:
        loss = _loss(config["method"], engine, ref, chosen, rejected)
        engine.backward(loss)
        engine.step()  # also zeroes the gradients
        return float(loss.detach())

    step()  # warm-up: optimizer state, buckets, kernels; excluded
    times, losses = [], []
    for _ in range(config["steps"]):
        dist.barrier()
        with common.Timer(device) as t:
            losses.append(step())
        times.append(t.seconds)
    mine = {"rank": rank, "step_s_median": statistics.median(times),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    # Train V2 hands the driver metrics only with a checkpoint: rank 0 ships its figures as one
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            with open(os.path.join(d, "bench.json"), "w") as f:
                json.dump({"ranks": ranks, "losses": losses, "params": params}, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"rank": rank}, checkpoint=checkpoint)


def bench_method_deepspeed(method: str, cfg: BenchConfig, device: str) -> dict:
    import json
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vpo_ray.ray_utils import init_ray

    tc = cfg.train
    cuda = device.startswith("cuda")
    init_ray(cfg.ray)
    name = "tiny-optimizer" if cfg.preset == "tiny" else tc.model
    config = {"cuda": cuda, "model": name, "method": method, "zero_stage": tc.zero_stage,
              "batch_size": tc.batch_size, "seq_len": tc.seq_len, "steps": tc.steps,
              "gradient_checkpointing": tc.gradient_checkpointing}
    trainer = TorchTrainer(
        _ds_worker, train_loop_config=config, torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=cuda),
        run_config=RunConfig(name=f"bench-train-step-{method}", storage_path=tempfile.mkdtemp(prefix="vpo-bench-"),
                             worker_runtime_env=None if cuda else {"env_vars": {"DS_ACCELERATOR": "cpu"}}))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d, open(f"{d}/bench.json") as f:
        got = json.load(f)
    step_s = max(r["step_s_median"] for r in got["ranks"])  # a step ends when its slowest rank does
    tokens = tc.workers * tc.batch_size * tc.seq_len * (2 if method == "dpo" else 1)
    return {"model": name, "engine": f"deepspeed zero-{tc.zero_stage}",
            **_figures(method, got["params"], tokens, step_s, tc.workers, device),
            "losses": [round(x, 4) for x in got["losses"]],
            "peak_allocated_gib_per_rank": [r["peak_allocated_gib"] for r in got["ranks"]]}


def bench_method(method: str, cfg: BenchConfig, device: str) -> dict:
    import contextlib

    import torch

    tc = cfg.train
    cuda = device.startswith("cuda")
    name = "tiny-optimizer" if cfg.preset == "tiny" else tc.model
    common.free_memory(device)
    model, ref, vocab = _policy_and_ref(name, method, device, tc.gradient_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    chosen, rejected = _batch(tc.batch_size, tc.seq_len, vocab, device, 0)

    def step() -> float:
        with autocast():
            loss = _loss(method, model, ref, chosen, rejected)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up: optimizer state, kernels; excluded
    times, losses = [], []
    for _ in range(tc.steps):
        with common.Timer(device) as t:
            losses.append(step())
        times.append(t.seconds)
    step_s = sorted(times)[len(times) // 2]
    tokens = chosen.numel() * (2 if method == "dpo" else 1)
    out = {"model": name, "engine": "torch",
           **_figures(method, sum(p.numel() for p in model.parameters()), tokens, step_s, 1, device),
           "losses": [round(x, 4) for x in losses], **common.peak_memory(device)}
    del model, ref, opt
    common.free_memory(device)
    return out


def run(cfg: BenchConfig) -> dict:
    if cfg.train.engine == "trl":
        return run_stack(cfg)
    from vpo_ray import storage
    from vpo_ray.bench.plotting import plot_bars

    device = common.resolve_device(cfg.device)
    storage.makedirs(cfg.out)
    stem = f"train_step_{cfg.preset}"
    rec = {"benchmark": "train-step", "preset": cfg.preset, "device": common.device_facts(device),
           "versions": common.versions(), "config": dataclasses.asdict(cfg.train),
           "precision": ("bf16 (DeepSpeed), fp32 master weights" if cfg.train.engine == "deepspeed"
                         else "fp32 master weights, bf16 autocast") if device.startswith("cuda") else "fp32",
           "weights": "tiny preset" if cfg.preset == "tiny" else "random (real architecture config)",
           "engine": (f"deepspeed ZeRO-{cfg.train.zero_stage}, {cfg.train.workers} Ray Train worker(s)"
                      if cfg.train.engine == "deepspeed" else "torch, one process"),
           "flops_note": "MFU from 6 x params x policy tokens (+ 2 x params x reference tokens for DPO)",
           "warmup_note": "one step per method before timing, excluded", "methods": {}}
    for method in cfg.train.methods:
        if method not in ("sft", "dpo"):
            raise ValueError(f"train.methods: unknown method {method!r} (sft, dpo)")
        run_one = bench_method_deepspeed if cfg.train.engine == "deepspeed" else bench_method
        common.guarded(rec["methods"], method, lambda m=method: run_one(m, cfg, device))
        common.write_record(cfg.out, stem, rec)
    groups = {m: {"tokens/s": r.get("tokens_per_s")} for m, r in rec["methods"].items() if "error" not in r}
    png = storage.join(cfg.out, f"{stem}.png")
    plot_bars(f"train-step on {rec['device']['name']}", groups, "policy tokens / s", png)
    rec["png"] = png
    common.write_record(cfg.out, stem, rec)
    return rec


def run_stack(cfg: BenchConfig) -> dict:
    """engine=trl: `vpo train` runs in the order given; the record is rewritten after each run."""
    from vpo_ray import storage
    from vpo_ray.bench import train_stack

    import torch

    tc = cfg.train
    device = common.resolve_device(cfg.device)  # asks NVML only: this driver never holds GPU memory
    storage.makedirs(cfg.out)
    specs = [train_stack.parse_run(r) for r in tc.runs] or [
        train_stack.RunSpec(m, tc.workers, tc.zero_stage, tc.batch_size) for m in tc.methods]
    model = "tiny-optimizer" if cfg.preset == "tiny" else tc.model
    stem = f"train_step_{model}_trl" + (f"_{tc.label}" if tc.label else "")
    rec = {"benchmark": "train-step", "engine": "trl (vpo train: Ray Train + TRL + DeepSpeed)", "model": model,
           "weights": "random (real architecture)" if cfg.preset != "tiny" else "tiny preset architecture, random",
           "device": {"device": device, "gpus": torch.cuda.device_count(), "name": "CPU" if device == "cpu" else "?"},
           "versions": common.versions(), "config": dataclasses.asdict(tc),
           "precision": "bf16 weights and activations, fp32 master weights and optimizer (DeepSpeed)"
           if device.startswith("cuda") else "fp32",
           "warmup_note": f"first {tc.warmup_steps} optimizer steps of each run excluded; median of the rest",
           "runs": {}, "scaling": []}
    png = storage.join(cfg.out, f"{stem}.png")
    for spec in specs:
        run = common.guarded(rec["runs"], spec.name, lambda s=spec: train_stack.run_one(s, cfg, model, device))
        if device != "cpu" and run.get("device"):
            rec["device"]["name"] = run["device"]  # as the workers saw it
        rec["scaling"] = train_stack.scaling(rec["runs"])
        _plot_runs(rec, png)
        rec["png"] = png
        common.write_record(cfg.out, stem, rec)
    return rec


def _plot_runs(rec: dict, png: str) -> None:
    from vpo_ray.bench.plotting import plot_bars

    groups = {name: {"tokens/s per GPU": r.get("tokens_per_s_per_gpu")} for name, r in rec["runs"].items()
              if "error" not in r}
    mfu = ", ".join(f"{n} {r['mfu']}" for n, r in rec["runs"].items() if r.get("mfu") is not None)
    plot_bars(f"vpo train step, {rec['model']} on {rec['device']['name']}", groups, "tokens / s per GPU", png,
              note=f"MFU vs datasheet: {mfu}" if mfu else None)
