"""`vpo bench llm-stages`: rewrite (generate) and judge (prefill + Yes/No) throughput of the LLM stages.

For each model in `llm.models` (real architectures with random weights; `--preset tiny`
uses the tiny optimizer instead), prompts of random token ids with lengths drawn from
`llm.prompt_tokens` are run two ways:

  naive    one prompt per `generate` call (what a per-row UDF does)
  batched  `llm.batch_size` prompts per call, left-padded with an attention mask (what the
           Rewriter/Critic actors do)

Rewrite: every sequence generates exactly `llm.max_new_tokens` tokens (EOS ignored), so the
modes do the same work; generated tokens/s. Judge: one forward over the prompt (the judge
reads P(Yes) at the last position); prompt tokens/s. Warm-up calls are excluded.
"""
from __future__ import annotations

import dataclasses
import time

from vpo_ray.bench import common
from vpo_ray.config import BenchConfig


def load_llm(name: str, device: str, dtype: str):
    """(model, vocab size): the tiny optimizer, or the architecture configs/<name>/model.json with random weights."""
    import torch

    from vpo_ray.models import registry

    if name.startswith("tiny"):
        model, tok = registry.load_causal_lm(registry.get_spec("tiny", "optimizer"), device=device, dtype=dtype)
        return model.eval(), len(tok)
    spec = registry.MODELS.get(name) or registry.ModelSpec(name, "optimizer", "(architecture only)",
                                                           "transformers.AutoModelForCausalLM")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # build in the target dtype: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = registry.random_init_from_config(spec, ["model"], device=device, dtype=dtype)["model"]
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), model.config.vocab_size


def _prompts(n: int, lengths: tuple, vocab: int, seed: int = 0) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    lo, hi = lengths[0], lengths[-1]
    sizes = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(10, vocab - 1, (s,), generator=g) for s in sizes]


def _left_pad(batch: list, pad_id: int, device: str):
    import torch

    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x):] = x
        mask[i, width - len(x):] = 1
    return ids.to(device), mask.to(device)


def _generate(model, batch: list, new_tokens: int, device: str) -> None:
    import torch

    ids, mask = _left_pad(batch, 0, device)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, eos_token_id=None, pad_token_id=0)


def _prefill(model, batch: list, device: str) -> None:
    import torch

    ids, mask = _left_pad(batch, 0, device)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)


def _timed(fn, prompts: list, batch_size: int, device: str) -> float:
    fn(prompts[:batch_size])  # warm-up (kernels, allocator), excluded
    common.sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        fn(prompts[i:i + batch_size])
    common.sync(device)
    return time.perf_counter() - t0


def bench_model(name: str, cfg: BenchConfig, device: str, dtype: str) -> dict:
    lc = cfg.llm
    common.free_memory(device)
    t0 = time.perf_counter()
    model, vocab = load_llm(name, device, dtype)
    load_s = time.perf_counter() - t0
    prompts = _prompts(lc.prompts, tuple(lc.prompt_tokens), vocab)
    prompt_tokens = sum(len(p) for p in prompts)
    gen_tokens = lc.max_new_tokens * len(prompts)
    out = {"params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3), "load_s": round(load_s, 1),
           "prompts": len(prompts), "prompt_tokens": prompt_tokens, "new_tokens_per_prompt": lc.max_new_tokens}
    for mode, bs in (("naive", 1), ("batched", lc.batch_size)):
        gen_s = _timed(lambda b: _generate(model, b, lc.max_new_tokens, device), prompts, bs, device)
        judge_s = _timed(lambda b: _prefill(model, b, device), prompts, bs, device)
        out[mode] = {"batch_size": bs, "rewrite_s": round(gen_s, 3),
                     "rewrite_tokens_per_s": round(gen_tokens / gen_s, 1),
                     "rewrite_prompts_per_s": round(len(prompts) / gen_s, 3),
                     "judge_s": round(judge_s, 3), "judge_prompt_tokens_per_s": round(prompt_tokens / judge_s, 1),
                     "judge_prompts_per_s": round(len(prompts) / judge_s, 3)}
    out["rewrite_speedup_batched"] = round(out["naive"]["rewrite_s"] / out["batched"]["rewrite_s"], 2)
    out["judge_speedup_batched"] = round(out["naive"]["judge_s"] / out["batched"]["judge_s"], 2)
    out.update(common.peak_memory(device))
    del model
    common.free_memory(device)
    return out


def run(cfg: BenchConfig) -> dict:
    from vpo_ray import storage
    from vpo_ray.bench.plotting import plot_bars

    device = common.resolve_device(cfg.device)
    dtype = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    models = ("tiny-optimizer",) if cfg.preset == "tiny" else tuple(cfg.llm.models)
    storage.makedirs(cfg.out)
    stem = f"llm_stages_{cfg.preset}"
    rec = {"benchmark": "llm-stages", "preset": cfg.preset, "device": common.device_facts(device),
           "versions": common.versions(), "dtype": dtype, "config": dataclasses.asdict(cfg.llm),
           "weights": "tiny preset" if cfg.preset == "tiny" else "random (real architecture config)",
           "warmup_note": "one call per mode and model before timing, excluded", "models": {}}
    for name in models:
        common.guarded(rec["models"], name, lambda n=name: bench_model(n, cfg, device, dtype))
        common.write_record(cfg.out, stem, rec)
    groups = {f"{n} {kind}": {m: (r.get(m) or {}).get(key) for m in ("naive", "batched")}
              for n, r in rec["models"].items() if "error" not in r
              for kind, key in (("rewrite", "rewrite_tokens_per_s"), ("judge/100", "judge_prompt_tokens_per_s"))}
    for g, vals in groups.items():  # judge prefill rates are ~100x generate rates: scale to share an axis
        if g.endswith("judge/100"):
            groups[g] = {m: (v or 0) / 100 for m, v in vals.items()}
    png = storage.join(cfg.out, f"{stem}.png")
    plot_bars(f"llm-stages on {rec['device']['name']}", groups, "tokens / s", png,
              note="rewrite: generated tokens/s; judge: prompt tokens/s / 100")
    rec["png"] = png
    common.write_record(cfg.out, stem, rec)
    return rec
