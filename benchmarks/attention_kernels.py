"""Kernel-level figures: attention and DiT linears at video shapes (what bounds a denoising step).

    python benchmarks/attention_kernels.py --out runs/bench        # needs a CUDA GPU (FP8: sm_89+)

Times (median of triton.testing.do_bench) torch SDPA with each kernel (flash, cuDNN,
mem-efficient) against the int8/e4m3 Triton experiment (benchmarks/int8_attention.py; K/V
quantization included), and bf16 vs e4m3 GEMMs (`linear=fp8`, vpo_ray/pipeline/fp8.py) for the
transformer block's linears.
Error is ||out - ref|| / ||ref|| with ref = fp32 mem-efficient SDPA (attention) or an fp32
matmul (linears), on random inputs with a per-channel offset in K (what smoothing is for).
Writes attention_kernels.json and .png.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from vpo_ray import storage
from vpo_ray.bench import common
from vpo_ray.pipeline import t2v

# (name, batch incl. CFG, heads, tokens, head_dim): 49x480x720 CogVideoX (226 text + 13*30*45 video tokens),
# 81x480x832 Wan2.1 self-attention (21*30*52 tokens).
ATTN_SHAPES = (("cogvideox-2b", 2, 30, 17776, 64), ("cogvideox-5b", 2, 48, 17776, 64), ("wan2.1-1.3b", 1, 12, 32760, 128))
# (name, tokens, in, out): CogVideoX-2B block linears for one CFG batch of 2.
LINEAR_SHAPES = (("qkv (fused)", 35552, 1920, 5760), ("attn out", 35552, 1920, 1920),
                 ("ff up", 35552, 1920, 7680), ("ff down", 35552, 7680, 1920))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def attention_rows(int8_attention) -> list[dict]:
    rows = []
    for name, b, h, n, d in ATTN_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        # [B, N, H, D] storage seen as [B, H, N, D], as diffusers' processors hand it over
        q, k, v = (torch.randn(b, n, h, d, device="cuda", generator=g).transpose(1, 2) for _ in range(3))
        k = k + 0.5 * torch.randn(1, h, 1, d, device="cuda", generator=g)  # shared channel offset
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # fp32
        qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
        flop = 4 * b * h * n * n * d
        for kernel in ("flash", "cudnn", "efficient"):
            backend = getattr(torch.nn.attention.SDPBackend, t2v._SDPA[kernel])

            def run(backend=backend):
                with torch.nn.attention.sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qb, kb, vb)
            rows.append(_row(name, f"sdpa {kernel} bf16", run, ref, flop))
        for pv_fp8 in (False, True):
            label = "int8 QK, " + ("e4m3 PV" if pv_fp8 else "bf16 PV")
            rows.append(_row(name, f"triton {label}",
                             lambda p=pv_fp8: int8_attention.attention(qb, kb, vb, pv_fp8=p), ref, flop))
            quant = torch.compile(lambda k_, v_, p=pv_fp8: int8_attention.quantize_kv(k_, v_, p))
            rows.append(_row(name, f"  of which K/V quantization ({'e4m3 V' if pv_fp8 else 'K only'}, compiled)",
                             lambda: quant(kb, vb), None, None))
        del q, k, v, ref, qb, kb, vb
        torch.cuda.empty_cache()
    return rows


def _row(shape: str, kernel: str, fn, ref, flop) -> dict:
    row = {"shape": shape, "kernel": kernel}
    try:
        out = fn()
        row["ms"] = round(bench_ms(fn), 3)
        if flop:
            row["tflops"] = round(flop / row["ms"] / 1e9, 1)
        if ref is not None:
            row["rel_l2"] = rel(out, ref)
    except Exception as e:  # noqa: BLE001 — a kernel that rejects the shape
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    print(json.dumps(row), flush=True)
    return row


def linear_rows(fp8) -> list[dict]:
    rows = []
    for name, m, k_in, n_out in LINEAR_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(1)
        lin = torch.nn.Linear(k_in, n_out, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=1 / math.sqrt(k_in), generator=g)
        x = torch.randn(m, k_in, device="cuda", generator=g, dtype=torch.bfloat16)
        ref = x.float() @ lin.weight.float().t() + lin.bias.float()
        flop = 2 * m * k_in * n_out
        q = fp8.Fp8Linear(lin)
        compiled = torch.compile(q)
        rows.append(_row(name, "bf16 F.linear", lambda: lin(x), ref, flop))
        rows.append(_row(name, "e4m3 _scaled_mm (eager, incl. activation quant)", lambda: q(x), ref, flop))
        rows.append(_row(name, "e4m3 _scaled_mm (compiled, incl. activation quant)", lambda: compiled(x), ref, flop))
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("tflops")]
    shapes = list(dict.fromkeys(r["shape"] for r in timed))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 4.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = [r for r in timed if r["shape"] == shape]
        ax.barh([r["kernel"] for r in sel], [r["tflops"] for r in sel], color="tab:blue")
        for i, r in enumerate(sel):
            ax.text(r["tflops"], i, f" {r['ms']:.2f} ms", va="center", fontsize=7)
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("TFLOP/s")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"attention and linear kernels on {torch.cuda.get_device_name(0)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_kernels: needs a CUDA GPU")
    import int8_attention  # beside this script (Triton)

    from vpo_ray.pipeline import fp8

    storage.makedirs(args.out)
    rec = {"benchmark": "attention-kernels", "device": common.device_facts("cuda"), "versions": common.versions(),
           "reference": "fp32 mem-efficient SDPA / fp32 matmul on the same random inputs"}
    rec["attention"] = attention_rows(int8_attention)
    rec["linear"] = linear_rows(fp8)
    common.write_record(args.out, "attention_kernels", rec)
    plot(rec["attention"] + rec["linear"], storage.join(args.out, "attention_kernels.png"))
    return rec


if __name__ == "__main__":
    main()
