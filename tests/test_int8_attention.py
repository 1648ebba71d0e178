"""benchmarks/int8_attention.py, the int8/e4m3 attention experiment: its quantized function is right.

The plain-torch reference is what the Triton kernel computes (up to the online softmax); it
is checked here against float64 attention. The kernel itself runs on a GPU
(benchmarks/attention_kernels.py records its error there) or under Triton's CPU interpreter,
which this test uses when Triton is installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import int8_attention  # noqa: E402


def _qkv(b=1, h=2, n=200, d=64, dtype=torch.float32, k_offset=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g).transpose(1, 2)  # diffusers' [B, H, N, D] view of [B, N, H, D]
    k = (torch.randn(b, n, h, d, generator=g) + k_offset * torch.randn(d, generator=g)).transpose(1, 2)
    v = (torch.randn(b, n, h, d, generator=g) + 0.3).transpose(1, 2)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("d", [32, 64, 128])
def test_reference_matches_float64_attention_within_8bit_error(d):
    q, k, v = _qkv(d=d)
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    int8_qk = int8_attention.attention_reference(q, k, v, pv_fp8=False)
    all_8bit = int8_attention.attention_reference(q, k, v, pv_fp8=True)
    assert int8_qk.shape == exact.shape and int8_qk.dtype == q.dtype
    assert 1e-4 < _rel(int8_qk, exact) < 1e-2   # int8 QK^T, fp32 P and V
    assert _rel(int8_qk, exact) < _rel(all_8bit, exact) < 5e-2  # e4m3 P and V cost more


def test_k_smoothing_makes_a_shared_key_offset_free():
    q, k, v = _qkv(k_offset=0.0)
    shifted = k + 20.0 * torch.randn(k.shape[-1])  # softmax-invariant: every score of a row moves alike
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    a = int8_attention.attention_reference(q, k, v, pv_fp8=False)
    b = int8_attention.attention_reference(q, shifted, v, pv_fp8=False)
    assert _rel(b, exact) < 1e-2 and _rel(a, b) < 1e-2


def test_kernel_in_triton_interpreter_matches_reference():
    try:
        import numpy
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("Triton is not installed (the CUDA build of torch brings it; GPU figures are in benchmarks/)")
    if tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 3):
        pytest.skip(f"Triton's CPU interpreter needs numpy < 2.3 (have {numpy.__version__})")
    code = f"""
import sys; sys.path.insert(0, {str(BENCH)!r})
import torch, int8_attention as ia
g = torch.Generator().manual_seed(0)
for d, n in ((64, 200), (32, 77)):
    q, k, v = (torch.randn(1, n, 2, d, generator=g).transpose(1, 2).half() for _ in range(3))
    v = v + 0.3
    for pv in (False, True):
        out, ref = ia.attention(q, k, v, pv_fp8=pv), ia.attention_reference(q, k, v, pv_fp8=pv)
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        # e4m3 P is rounded against the running row max in the kernel, the final one in the reference
        assert out.shape == q.shape and err < (3e-2 if pv else 2e-3), (d, pv, err)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
