"""Experiment: int8 QK^T / e4m3 PV attention in Triton (SageAttention-style), measured against torch SDPA.

Used by benchmarks/attention_kernels.py; not wired into the pipeline, because on an H100 it
is slower than cuDNN's bf16 kernel at the video shapes that matter (CogVideoX-2B, 49x480x720:
13.8 ms vs 11.3 ms per layer; benchmarks/results/attention_kernels.json). At head_dim 64 the
attention is bounded by the exp units (one exp per 256 matmul FLOPs; the card does about
4.1e12 exp/s, benchmarks/exp_throughput.py), so halving matmul time with 8-bit tensor cores
buys little unless the kernel also overlaps softmax with the matmuls (FlashAttention-3's
warp-specialised ping-pong), which Triton does not do here.

Scheme (accumulation fp32):
- Q: int8, per-token scale, quantized inside the kernel (each Q tile is loaded once).
- K: int8, smoothed (the per-channel mean over tokens is subtracted: softmax is unchanged because
  every score of a query row moves by the same q.mean(k)), then per-token scale.
- P = exp(S - max) in (0, 1] is computed as exp2(S - max + 8.75), spanning (0, 430] to fit
  e4m3 (max 448) without a multiply; the row sum uses the same units, so the shift cancels.
- V: bf16 as is, or e4m3 with a per-channel scale stored transposed (N contiguous): Hopper's
  FP8 wgmma wants both operands K-major.
The Triton kernel is in int8_attention_kernel.py (imported on first use); `attention_reference`
computes the same quantized function in plain torch (tests/test_int8_attention.py).
"""
from __future__ import annotations

import math

import torch

from vpo_ray.pipeline.fp8 import FP8, FP8_MAX

P_SHIFT = 8.75  # log2 of P's largest value (430.5): below e4m3's 448 after exp2 rounding
LOG2E = 1.4426950408889634


def quantize_kv(k: torch.Tensor, v: torch.Tensor, pv_fp8: bool = True):
    """K smoothed + per-token int8 with scales; V per-channel e4m3 transposed (or V as is)."""
    k = k.float()
    k = k - k.mean(dim=-2, keepdim=True)
    sk = k.abs().amax(dim=-1).clamp_min(1e-6) / 127.0
    k8 = (k / sk[..., None]).round().to(torch.int8)
    if not pv_fp8:
        return k8, sk.contiguous(), v, None
    vf = v.float()
    sv = vf.abs().amax(dim=-2).clamp_min(1e-6) / FP8_MAX  # [B, H, D]
    vt8 = (vf / sv[..., None, :]).to(FP8).transpose(-1, -2).contiguous()
    return k8, sk.contiguous(), vt8, sv.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              pv_fp8: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale) v for [B, H, N, D] inputs (no mask), FP8 matmuls, fp32 accumulation.

    Returns [B, H, N, D] in q's dtype (a transposed view of a [B, N, H, D] tensor).
    """
    if q.shape[-1] not in (16, 32, 64, 128) or q.stride(-1) != 1:
        raise ValueError(f"int8 attention: head_dim must be 16, 32, 64 or 128 with unit stride, got {tuple(q.shape)}")
    from int8_attention_kernel import quantized_attention  # Triton, beside this file

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k8, sk, vq, sv = quantize_kv(k, v, pv_fp8)
    if sv is None:
        sv = sk  # unused by the kernel when pv_fp8 is off; any fp32 tensor
    return quantized_attention(q, k8, sk, vq, sv, float(scale), bool(pv_fp8))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        pv_fp8: bool = True) -> torch.Tensor:
    """The kernel's quantized function in plain torch (global row max instead of the online one)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k8, sk, vq, sv = quantize_kv(k, v, pv_fp8)
    qf = q.float()
    sq = qf.abs().amax(-1).clamp_min(1e-6) / 127.0
    q8 = (qf / sq[..., None]).round()
    s = (q8 @ k8.float().transpose(-1, -2)) * (sq[..., None] * sk[..., None, :]) * (scale * LOG2E)
    p = torch.exp2(s - s.amax(-1, keepdim=True) + P_SHIFT)
    l = p.sum(-1, keepdim=True)
    if pv_fp8:
        out = (p.to(FP8).float() @ vq.float().transpose(-1, -2)) * sv[..., None, :]
    else:
        out = p.to(v.dtype).float() @ v.float()
    return (out / l).to(q.dtype)


