"""Triton kernel of benchmarks/int8_attention.py: int8 QK^T, bf16 or e4m3 PV, online softmax.

One program computes BLOCK_M query rows of one (batch, head) against every key, FlashAttention
style (running max and sum in fp32). Q arrives in bf16/fp16 and is quantized in the kernel;
K (int8) and V (e4m3, transposed) come quantized from `int8_attention.quantize_kv`. The output
is written as [B, N, H, D], so a processor's transpose+reshape to [B, N, H*D] is free.
Registered as a torch.library triton_op so that torch.compile traces through it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from int8_attention import LOG2E, P_SHIFT

P_SHIFT_C = tl.constexpr(P_SHIFT)  # jit code reads module globals only as constexpr
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU interpreter: no inline PTX, no autotuning


def _configs():
    if INTERPRET:  # CPU interpreter (tests): no benchmarker to autotune with
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3), (64, 128, 4, 3),
                                 (128, 128, 8, 4), (128, 64, 8, 4))]


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    # ex2.approx.ftz: one MUFU.EX2; the default (no ftz) adds denormal fix-up instructions around it
    if FAST:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        y = tl.math.exp2(x)
    return y


@triton.jit
def _attn_tile(q, sq, k_ptrs, sk_ptrs, v_ptrs, acc, l_i, m_i, offs_n, start_n, n_kv,
               MASKED: tl.constexpr, PV_FP8: tl.constexpr, FAST_EXP: tl.constexpr, s_kn, s_vn):
    if MASKED:
        valid = (start_n + offs_n) < n_kv
        k = tl.load(k_ptrs + start_n * s_kn, mask=valid[:, None], other=0.0)
        sk = tl.load(sk_ptrs + start_n, mask=valid, other=0.0)
        v = tl.load(v_ptrs + start_n * s_vn, mask=valid[None, :] if PV_FP8 else valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * s_kn)
        sk = tl.load(sk_ptrs + start_n)
        v = tl.load(v_ptrs + start_n * s_vn)
    # int32 -> fp32 without I2F (which shares the special-function pipe with exp2): for |x| < 2^22,
    # bits(x + 0x4B400000) read as fp32 is 1.5 * 2^23 + x; the FMA removes the offset and scales.
    s = tl.dot(q, tl.trans(k))
    s = tl.fma((s + 0x4B400000).to(tl.float32, bitcast=True), sk[None, :], (sk * -12582912.0)[None, :])
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * sq)
    p = _exp2(s * sq[:, None] - (m_new - P_SHIFT_C)[:, None], FAST_EXP)
    alpha = _exp2(m_i - m_new, FAST_EXP)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        acc = tl.dot(p.to(tl.float8e4nv), tl.trans(v), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.autotune(configs=_configs(), key=["N_Q", "N_KV", "HEAD_DIM", "PV_FP8"])
@triton.jit
def _attn_fwd(Q, K, SK, V, SV, O, qk_scale,
              s_qz, s_qh, s_qm, s_kz, s_kh, s_kn, s_vz, s_vh, s_vn, s_vd, s_oz, s_oh, s_om,
              H, N_Q, N_KV,
              HEAD_DIM: tl.constexpr, PV_FP8: tl.constexpr, FAST_EXP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    z = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q

    # Q is bf16/fp16 in HBM; its tile is quantized here (int8, per token), once per program.
    q = tl.load(Q + z * s_qz + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    q_amax = tl.maximum(tl.max(tl.abs(q), 1), 1e-6)
    q = q * (127.0 / q_amax)[:, None]
    q = (q + tl.where(q >= 0, 0.5, -0.5)).to(tl.int8)  # round half away from zero (the cast truncates)
    # folds softmax scale and log2(e) into the row scale; the cast: inductor passes floats as fp64
    sq = (q_amax * (qk_scale / 127.0)).to(tl.float32)

    k_ptrs = K + z * s_kz + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :]
    sk_ptrs = SK + pid_bh * N_KV + offs_n
    if PV_FP8:  # V^T: [D, N], N contiguous
        v_ptrs = V + z * s_vz + h * s_vh + offs_d[:, None] * s_vd + offs_n[None, :] * s_vn
    else:       # V: [N, D]
        v_ptrs = V + z * s_vz + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    for i in tl.range(0, N_KV // BLOCK_N):
        acc, l_i, m_i = _attn_tile(q, sq, k_ptrs, sk_ptrs, v_ptrs, acc, l_i, m_i, offs_n, i * BLOCK_N, N_KV,
                                   False, PV_FP8, FAST_EXP, s_kn, s_vn)
    if n_full < N_KV:
        acc, l_i, m_i = _attn_tile(q, sq, k_ptrs, sk_ptrs, v_ptrs, acc, l_i, m_i, offs_n, n_full, N_KV,
                                   True, PV_FP8, FAST_EXP, s_kn, s_vn)

    o = acc / l_i[:, None]
    if PV_FP8:
        o = o * tl.load(SV + pid_bh * HEAD_DIM + offs_d)[None, :]
    tl.store(O + z * s_oz + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None])


@torch.library.triton_op("vpo::quantized_attention", mutates_args=())
def quantized_attention(q: torch.Tensor, k8: torch.Tensor, sk: torch.Tensor, v: torch.Tensor, sv: torch.Tensor,
                   scale: float, pv_fp8: bool) -> torch.Tensor:
    b, h, n_q, d = q.shape
    n_kv = k8.shape[-2]
    out = torch.empty((b, n_q, h, d), device=q.device, dtype=q.dtype)  # [B, N, H, D]: free reshape after
    if pv_fp8:
        s_vn, s_vd = v.stride(3), v.stride(2)
    else:
        s_vn, s_vd = v.stride(2), v.stride(3)

    def grid(meta):
        return (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)

    torch.library.wrap_triton(_attn_fwd)[grid](
        q, k8, sk, v, sv, out, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        v.stride(0), v.stride(1), s_vn, s_vd, out.stride(0), out.stride(2), out.stride(1),
        h, n_q, n_kv, HEAD_DIM=d, PV_FP8=pv_fp8, FAST_EXP=not INTERPRET)
    return out.transpose(1, 2)




