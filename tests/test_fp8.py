"""`linear=fp8` (vpo_ray/pipeline/fp8.py): e4m3 GEMMs with row-wise scales, checked on CPU.

torch._scaled_mm runs on CPU too, so the arithmetic is the GPU path's; speed figures are in
benchmarks/README.md. What a user checks: outputs stay close to bf16/fp32 (and are not
silently the unquantized ones), shapes and bias are kept, only suitable layers are swapped,
and the flag fails clearly where there are no FP8 tensor cores.
"""
from __future__ import annotations

import pytest
import torch

from vpo_ray.pipeline import fp8, t2v


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_close_to_linear_and_keeps_shape_and_bias(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(dtype)
    torch.nn.init.normal_(lin.bias, std=1.0)
    x = torch.randn(2, 7, 64, dtype=dtype)
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    q = fp8.Fp8Linear(lin)
    y = q(x)
    assert y.shape == (2, 7, 48) and y.dtype == dtype
    err = _rel(y, ref)
    assert 1e-4 < err < 6e-2, err  # e4m3: ~3-4e-2 on random data; exactly-equal would mean no quantization
    no_bias = fp8.Fp8Linear(torch.nn.Linear(64, 48, bias=False).to(dtype))
    no_bias.weight_t, no_bias.w_scale = q.weight_t, q.w_scale
    assert _rel(y - no_bias(x), lin.bias.expand_as(y)) < 1e-2  # the bias is added once


def test_swap_linears_skips_layers_fp8_gemms_cannot_take():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10),
                                torch.nn.Sequential(torch.nn.Linear(64, 16)))
    assert fp8.swap_linears(model) == 2
    assert isinstance(model[0], fp8.Fp8Linear) and isinstance(model[3][0], fp8.Fp8Linear)
    assert type(model[2]) is torch.nn.Linear  # 10 outputs: not a multiple of 16


def test_fp8_linears_in_a_video_transformer_stay_close():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                    time_embed_dim=64, text_embed_dim=32, num_layers=2, sample_width=16,
                                    sample_height=16, sample_frames=9, patch_size=2, max_text_seq_length=8).eval()
    x, emb, t = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 8, 32), torch.tensor([500, 500])
    with torch.no_grad():
        ref = m(x, emb, t).sample
        n = fp8.apply_fp8_linears(t2v.transformer_blocks(m))
        out = m(x, emb, t).sample
    # per block: to_q, to_k, to_v, to_out[0], ff in, ff out; the timestep-modulation linears stay bf16/fp32
    assert n == 2 * 6
    assert all(type(b.norm1.linear) is torch.nn.Linear for b in m.transformer_blocks)
    assert 1e-5 < _rel(out, ref) < 5e-2


def test_linear_flag_parses_and_refuses_devices_without_fp8():
    assert t2v.parse_optimizations(("fuse-qkv", "linear=fp8")) == {"fuse-qkv": True, "linear": "fp8"}
    with pytest.raises(ValueError, match="'linear=int4'"):
        t2v.parse_optimizations(("linear=int4",))

    class Pipe:
        transformer = torch.nn.Module()

    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        t2v.apply_optimizations(Pipe(), {"linear": "fp8"}, "cpu")
