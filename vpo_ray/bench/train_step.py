"""`vpo bench train-step`: tokens/s of SFT and DPO optimizer steps of the optimizer LLM.

A plain PyTorch step per method on one device (the same math TRL's trainers run, without
their data loading): fp32 master weights, bf16 autocast on GPU, fused AdamW.

  sft  causal-LM loss over `train.batch_size` sequences of `train.seq_len` tokens
  dpo  policy forward over chosen + rejected (2 x batch_size sequences sharing a prompt of
       half the length), a frozen reference forward (no grad), the sigmoid DPO loss (beta 0.1)

Tokens/s counts the policy's tokens per step (DPO: chosen + rejected). ZeRO-2 is not in
play here: it shards optimizer state and gradients across data-parallel ranks, and this
harness runs one rank; `vpo train` (Ray Train + DeepSpeed) is the multi-GPU path.
"""
from __future__ import annotations

import dataclasses

from vpo_ray.bench import common
from vpo_ray.config import BenchConfig


def _batch(cfg, vocab: int, device: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    b, n = cfg.batch_size, cfg.seq_len
    chosen = torch.randint(10, vocab - 1, (b, n), generator=g)
    rejected = chosen.clone()
    rejected[:, n // 2:] = torch.randint(10, vocab - 1, (b, n - n // 2), generator=g)
    return chosen.to(device), rejected.to(device)


def _response_logps(logits, ids, start: int):
    import torch

    logp = torch.log_softmax(logits[:, start - 1:-1].float(), dim=-1)
    return logp.gather(-1, ids[:, start:].unsqueeze(-1)).squeeze(-1).sum(-1)


def _step(method: str, model, ref, opt, chosen, rejected, autocast) -> float:
    import torch
    import torch.nn.functional as F

    with autocast():
        if method == "sft":
            loss = model(input_ids=chosen, labels=chosen).loss
        else:
            both = torch.cat([chosen, rejected])
            start = chosen.shape[1] // 2
            lp = _response_logps(model(input_ids=both).logits, both, start)
            with torch.no_grad():
                rp = _response_logps(ref(input_ids=both).logits, both, start)
            b = chosen.shape[0]
            margin = (lp[:b] - rp[:b]) - (lp[b:] - rp[b:])
            loss = -F.logsigmoid(0.1 * margin).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def bench_method(method: str, cfg: BenchConfig, device: str) -> dict:
    import contextlib
    import copy

    import torch

    from vpo_ray.bench.llm_stages import load_llm

    tc = cfg.train
    cuda = device.startswith("cuda")
    name = "tiny-optimizer" if cfg.preset == "tiny" else tc.model
    common.free_memory(device)
    model, vocab = load_llm(name, device, "float32")
    model.train()
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ref = None
    if method == "dpo":  # the frozen reference starts as the policy, as in TRL's DPO
        ref = copy.deepcopy(model).to(torch.bfloat16 if cuda else torch.float32).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    chosen, rejected = _batch(tc, vocab, device, 0)
    _step(method, model, ref, opt, chosen, rejected, autocast)  # warm-up: optimizer state, kernels; excluded
    times, losses = [], []
    for _ in range(tc.steps):
        with common.Timer(device) as t:
            losses.append(_step(method, model, ref, opt, chosen, rejected, autocast))
        times.append(t.seconds)
    step_s = sorted(times)[len(times) // 2]
    tokens = chosen.numel() * (2 if method == "dpo" else 1)
    out = {"model": name, "step_s_median": round(step_s, 4), "tokens_per_step": tokens,
           "tokens_per_s": round(tokens / step_s, 1), "losses": [round(x, 4) for x in losses],
           **common.peak_memory(device)}
    del model, ref, opt
    common.free_memory(device)
    return out


def run(cfg: BenchConfig) -> dict:
    from vpo_ray import storage
    from vpo_ray.bench.plotting import plot_bars

    device = common.resolve_device(cfg.device)
    storage.makedirs(cfg.out)
    stem = f"train_step_{cfg.preset}"
    rec = {"benchmark": "train-step", "preset": cfg.preset, "device": common.device_facts(device),
           "versions": common.versions(), "config": dataclasses.asdict(cfg.train),
           "precision": "fp32 master weights, bf16 autocast" if device.startswith("cuda") else "fp32",
           "weights": "tiny preset" if cfg.preset == "tiny" else "random (real architecture config)",
           "zero": "not used: one rank (see module docstring)",
           "warmup_note": "one step per method before timing, excluded", "methods": {}}
    for method in cfg.train.methods:
        if method not in ("sft", "dpo"):
            raise ValueError(f"train.methods: unknown method {method!r} (sft, dpo)")
        common.guarded(rec["methods"], method, lambda m=method: bench_method(m, cfg, device))
        common.write_record(cfg.out, stem, rec)
    groups = {m: {"tokens/s": r.get("tokens_per_s")} for m, r in rec["methods"].items() if "error" not in r}
    png = storage.join(cfg.out, f"{stem}.png")
    plot_bars(f"train-step on {rec['device']['name']}", groups, "policy tokens / s", png)
    rec["png"] = png
    common.write_record(cfg.out, stem, rec)
    return rec
