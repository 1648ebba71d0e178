"""Figures of `vpo bench llm-stages`: device ceilings, decode bandwidth, prefill FLOPs and MFU,
the verdict phase, and the before/after table.

Decode (one step advances every live row by a token):
  bytes per step   = weight bytes (every matrix once; embedding rows are negligible)
                     + live K/V positions read x (2 x layers x kv_heads x head_dim x 2 bytes)
  bandwidth        = bytes per step / (decode seconds / steps), against the datasheet HBM
                     bandwidth and a measured device-to-device copy (read + write bytes / time)
  bound at batch   = live rows per step / (bytes per step / datasheet bandwidth): the tok/s a
                     step that only moved those bytes would reach
Prefill (causal, per row of T tokens; P = matmul parameters of the layers, d = heads x head_dim):
  FLOPs            = 2 P T + 2 layers T^2 d  (QK^T and PV over the causal half)
                     + 2 hidden vocab        (LM head at the last token only)
  MFU              = FLOPs / time / peak, against the datasheet bf16 peak and the bf16 matmul
                     rate measured in the same run (vpo_ray.bench.common.matmul_ceiling_tflops)
"""
from __future__ import annotations

import time
from typing import Optional

from vpo_ray.bench import common

# Datasheet HBM bandwidth, TB/s (first match wins: specific names before general ones).
PEAK_HBM_TBPS = (("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("GH200", 4.0), ("H200", 4.8), ("H100", 3.35),
                 ("H20", 4.0), ("B200", 8.0), ("A100-SXM4-40GB", 1.555), ("A100", 2.039), ("L40S", 0.864),
                 ("L4", 0.3), ("A10G", 0.6))


def peak_bandwidth_tbps(device_name: str) -> Optional[float]:
    for key, tbps in PEAK_HBM_TBPS:
        if key.lower() in device_name.lower():
            return tbps
    return None


def copy_bandwidth_gbps(device: str, gib: float = 2.0, iters: int = 10) -> Optional[float]:
    """Measured device memory bandwidth: a `gib` GiB device-to-device copy (bytes read + written / time)."""
    import torch

    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return None
    a = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    nbytes = 2 * a.numel() * a.element_size()
    del a, b
    common.free_memory(device)
    return round(nbytes / sorted(times)[len(times) // 2] / 1e9, 1)


def ceilings(device: str) -> dict:
    facts = common.device_facts(device)
    return {"matmul_bf16_tflops_measured": common.matmul_ceiling_tflops(device),
            "matmul_bf16_tflops_datasheet": facts.get("peak_bf16_tflops"),
            "copy_gbps_measured": copy_bandwidth_gbps(device),
            "hbm_tbps_datasheet": peak_bandwidth_tbps(facts.get("name", "")) if device.startswith("cuda") else None}


def _r(x, nd=3):
    return None if x is None else round(float(x), nd)


def decode_figures(eng, outs: list, wall: float, ceil: dict, device: str) -> dict:
    """Throughput of one generate call, and for the static back-end its decode bandwidth."""
    gen = sum(len(o.ids) for o in outs)
    fig = {"backend": eng.backend, "slots": eng.cfg.max_batch_rows, "generated_tokens": gen, "wall_s": _r(wall),
           "tok_s": _r(gen / wall, 1), "rows_per_s": _r(len(outs) / wall, 2)}
    s = eng.stats
    if eng.backend != "static" or not s.get("decode_steps"):
        return fig
    w = eng.weights
    steps, decode_s = s["decode_steps"], s["decode_s"]
    live = (s["sampled_tokens"] - len(outs)) / steps  # each row's first token comes from its prefill
    step_bytes = w.weight_bytes_per_step() + s["kv_reads"] / steps * w.kv_bytes_per_token()
    achieved = step_bytes / (decode_s / steps) / 1e9
    peak = ceil.get("hbm_tbps_datasheet")
    fig.update(slots=s["slots"], graph_mode=s["graph_mode"], graphs=s["graphs"], decode_steps=steps,
               step_ms=_r(1000 * decode_s / steps), live_rows_per_step=_r(live, 1),
               decode_tok_s=_r(live * steps / decode_s, 1), decode_s=_r(decode_s), prefill_s=_r(s["prefill_s"]),
               prefill_tok_s=_r(s["prefill_tokens"] / max(s["prefill_s"], 1e-9), 1),
               prefill_pad_share=_r(1 - s["prefill_tokens"] / max(1, s["prefill_padded_tokens"])),
               weight_gib=_r(w.weight_bytes_per_step() / 2**30, 2),
               kv_gib_per_step=_r(s["kv_reads"] / steps * w.kv_bytes_per_token() / 2**30, 2),
               bandwidth_gbps=_r(achieved, 1),
               bandwidth_util_datasheet=_r(achieved / (peak * 1e3)) if peak else None,
               bandwidth_util_measured=_r(achieved / ceil["copy_gbps_measured"]) if ceil.get("copy_gbps_measured") else None,
               bound_tok_s_at_batch=_r(live / (step_bytes / (peak * 1e12)), 1) if peak else None,
               sampler_ms=sampler_ms(s["slots"], w.vocab, device),
               sampler_top_k_ms=sampler_ms(s["slots"], w.vocab, device, top_k=eng.cfg.sampler_top_k),
               # tokens the top-k pre-filter left to the full sort (flat random-weight distributions: most)
               sampler_full_sort_share=_r(s.get("sampler_full_sort_tokens", 0) / max(1, s["sampled_tokens"] - len(outs))),
               sampler_waited_row_steps=s.get("sampler_waited_row_steps", 0))
    return fig


def sampler_ms(rows: int, vocab: int, device: str, iters: int = 10, top_k: int = 0) -> Optional[float]:
    """Milliseconds of one `sample_rows` call at (rows, vocab) (full-vocabulary sort for top-p), median;
    with `top_k`, of the top-k pre-filter alone (`sample_rows_top_k`, no fallback rows)."""
    import functools

    import torch

    from vpo_ray.sampling import sample_rows, sample_rows_top_k

    if not device.startswith("cuda") or (top_k and top_k >= vocab):
        return None
    sample = functools.partial(sample_rows_top_k, top_k=top_k) if top_k else sample_rows
    logits = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16)
    args = (torch.full((rows,), 0.9, device=device), torch.full((rows,), 0.95, device=device),
            torch.arange(rows, device=device), torch.zeros(rows, dtype=torch.int64, device=device))
    times = []
    for i in range(iters + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        sample(logits, *args)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    return round(sorted(times)[len(times) // 2], 3)


def prefill_flops(w, lengths: list) -> float:
    """FLOPs of causal prefills of rows of these lengths, logits at each row's last token only."""
    params = sum(t.numel() for lw in w.layers for t in (lw.wqkv, lw.wo, lw.wgu, lw.wd))
    tokens, squares = sum(lengths), sum(n * n for n in lengths)
    return (2.0 * params * tokens + 2.0 * len(w.layers) * squares * w.n_heads * w.head_dim
            + 2.0 * w.hidden * w.vocab * len(lengths))


def _mfu_figures(flops: float, seconds: float, ceil: dict) -> dict:
    tflops = flops / seconds / 1e12
    peak, measured = ceil.get("matmul_bf16_tflops_datasheet"), ceil.get("matmul_bf16_tflops_measured")
    return {"tflops": _r(tflops, 1), "mfu_datasheet": _r(tflops / peak) if peak else None,
            "mfu_vs_measured_matmul": _r(tflops / measured) if measured else None}


def _old_verdict(model, prompts: list, yes: list, no: list, device: str, batch: int = 8):
    """The verdict as the stages first ran it: left-padded batches of 8, logits at every position."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        rows = prompts[i:i + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.inference_mode():
            probs = model(input_ids=ids, attention_mask=mask).logits[:, -1].float().softmax(-1)
        py, pn = probs[:, yes].sum(-1), probs[:, no].sum(-1)
        out += (py / (py + pn)).tolist()
    return out


def verdict_phase(bench, name: str) -> dict:
    """Bucketed verdict prefill vs the old path: prompt tok/s, MFU, agreement of P(yes)."""
    from vpo_ray.bench.llm_stages import workload

    lc, device = bench.lc, bench.device
    model, vocab = bench.model(name)
    prompts, _ = workload(lc.verdict_rows, lc.verdict_tokens, "critique", lc.max_new_tokens, vocab, seed=2)
    yes, no = [11], [12]  # any two ids: random weights
    eng = bench.engine(name)
    eng.yes_probability_ids(prompts[:8], yes, no)  # warm-up
    common.sync(device)
    t0 = time.perf_counter()
    p_new = eng.yes_probability_ids(prompts, yes, no)
    common.sync(device)
    wall = time.perf_counter() - t0
    ceil = bench.rec.get("ceilings") or {}
    lengths = [len(p) for p in prompts]
    padded = sum(len(c) * max(lengths[i] for i in c) for c in eng._prefill_chunks(prompts))
    new = {"rows": len(prompts), "prompt_tokens": sum(lengths), "padded_tokens": padded, "wall_s": _r(wall),
           "prompt_tok_s": _r(sum(lengths) / wall, 1), "rows_per_s": _r(len(prompts) / wall, 1),
           **_mfu_figures(prefill_flops(eng.weights, lengths), wall, ceil), **common.peak_memory(device)}
    k = min(lc.verdict_baseline_rows, len(prompts))
    _old_verdict(model, prompts[:2], yes, no, device)  # warm-up
    common.sync(device)
    t0 = time.perf_counter()
    p_old = _old_verdict(model, prompts[:k], yes, no, device)
    common.sync(device)
    old_s = time.perf_counter() - t0
    old = {"rows": k, "prompt_tokens": sum(lengths[:k]), "wall_s": _r(old_s),
           "prompt_tok_s": _r(sum(lengths[:k]) / old_s, 1), "rows_per_s": _r(k / old_s, 1),
           **_mfu_figures(prefill_flops(eng.weights, lengths[:k]), old_s, ceil)}
    agree = max(abs(a - b) for a, b in zip(p_new[:k], p_old))
    return {"bucketed_prefill": new, "old_path_b8_full_logits": old, "max_abs_p_yes_difference": _r(agree, 6),
            "speedup": _r(new["prompt_tok_s"] / old["prompt_tok_s"], 2)}


def _decode_row(stage: str, name: str, fig: dict, old: Optional[dict], compare: Optional[str]) -> dict:
    """A table row of one decode run and its gain over the old path's run of the same stage."""
    return {"stage": stage, "model": name, "variant": fig.get("variant"), "compare": compare, "rows": fig.get("rows"),
            "slots": fig.get("slots"), "tok_s": fig["tok_s"], "rows_per_s": fig.get("rows_per_s"),
            "bandwidth_util_datasheet": fig.get("bandwidth_util_datasheet"),
            "x_old_path": _r(fig["tok_s"] / old["tok_s"], 1) if old and old.get("tok_s") else None}


def _ok(fig) -> bool:
    return isinstance(fig, dict) and bool(fig.get("tok_s") or fig.get("prompt_tok_s") or fig.get("videos_per_s"))


def _judge_rows(name: str, m: dict) -> list:
    """The judge's rows/s (critique decode, then the verdict prefill of the same rows), old path vs engine:
    1 / (1 / critique rows/s + 1 / verdict rows/s), from the two phases' separate timings."""
    crit_old = (m.get("baseline") or {}).get("critique")
    crit_new = (m.get("stages") or {}).get("critique")
    v = m.get("verdict") or {}
    out = []
    for variant, crit, verd in (("old path", crit_old, v.get("old_path_b8_full_logits")),
                                ("engine", crit_new, v.get("bucketed_prefill"))):
        if _ok(crit) and _ok(verd) and crit.get("rows_per_s") and verd.get("rows_per_s"):
            rate = 1 / (1 / crit["rows_per_s"] + 1 / verd["rows_per_s"])
            out.append({"stage": "judge (critique + verdict)", "model": name, "variant": variant,
                        "compare": "old" if variant == "old path" else "engine",
                        "rows_per_s": _r(rate, 2)})
    if len(out) == 2:
        out[1]["x_old_path"] = _r(out[1]["rows_per_s"] / out[0]["rows_per_s"], 1)
    return out


def before_after(rec: dict) -> list:
    """Rows of the before/after table: per stage the old path, each optimisation and the engine, with the
    gain over the old path's run of the same stage (same rows' lengths)."""
    rows = []
    for name, m in rec.get("models", {}).items():
        old = m.get("baseline") or {}
        chain = [("rewrite", old.get("rewrite"), "old")]
        chain += [("rewrite", v, None) for v in (m.get("ablations") or {}).values()]
        chain += [("rewrite", m.get("engine"), "engine"), ("rewrite", m.get("compile"), None),
                  ("critique", old.get("critique"), "old")]
        chain += [(stage, fig, "engine") for stage, fig in (m.get("stages") or {}).items()]
        for stage, fig, compare in chain:
            if _ok(fig):
                rows.append(_decode_row(stage, name, fig, old.get(stage), compare))
        v = m.get("verdict") or {}
        for key in ("old_path_b8_full_logits", "bucketed_prefill"):
            if _ok(v.get(key)):
                rows.append({"stage": "verdict", "model": name, "variant": key, "rows": v[key]["rows"],
                             "compare": "engine" if key == "bucketed_prefill" else "old",
                             "prompt_tok_s": v[key]["prompt_tok_s"], "rows_per_s": v[key].get("rows_per_s"),
                             "mfu_datasheet": v[key].get("mfu_datasheet"),
                             "mfu_vs_measured_matmul": v[key].get("mfu_vs_measured_matmul"),
                             "x_old_path": v.get("speedup") if key == "bucketed_prefill" else None})
        rows += _judge_rows(name, m)
    for name, v in rec.get("vlm", {}).items():
        plain = (v.get("hf_per_question") or {}).get("videos_per_s")
        for key in ("hf_per_question", "no_reuse", "prefix_reuse"):
            if _ok(v.get(key)):
                rows.append({"stage": "video judge", "model": name, "variant": key, "videos": v[key]["videos"],
                             "compare": {"hf_per_question": "old", "prefix_reuse": "engine"}.get(key),
                             "videos_per_s": v[key]["videos_per_s"],
                             "x_old_path": _r(v[key]["videos_per_s"] / plain, 1) if plain else None})
    return rows
