"""FP8 linear layers for video DiTs on GPUs with FP8 tensor cores (flag `linear=fp8`, compute capability >= 8.9).

The attention and feed-forward projections of each transformer block run as e4m3 GEMMs
(`torch._scaled_mm`, fp32 accumulation, bf16 out): weights scaled per output channel once,
activations per token on each call (torch.compile fuses that into the preceding op). On an
H100 at CogVideoX-2B shapes the block's GEMMs run 1.2-1.4x faster than bf16 (672 -> 918
TFLOP/s for the fused QKV; benchmarks/attention_kernels.py), about 4.5 % of a whole video
(29.9 -> 28.7 s), at a per-GEMM error of ~3.7e-2 relative L2 (bf16: 1.7e-3) and a video PSNR
of ~47 dB against bf16 on the same seeds. Not exact: the flag sits beside, not in, the exact path.
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class Fp8Linear(torch.nn.Module):
    """nn.Linear with e4m3 weights (per output channel) and per-token dynamic e4m3 activations."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        w_scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX  # [out, 1]
        # _scaled_mm wants the second operand column-major: keep W^T as a transposed view.
        self.register_buffer("weight_t", (w / w_scale).to(FP8).t(), persistent=False)
        self.register_buffer("w_scale", w_scale.t().contiguous(), persistent=False)  # [1, out]
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX  # [M, 1]
        x8 = (x2 / x_scale).to(FP8)
        y = torch._scaled_mm(x8, self.weight_t, scale_a=x_scale, scale_b=self.w_scale, bias=self.bias,
                             out_dtype=self.out_dtype)
        return y.reshape(*shape[:-1], self.out_features)


def swap_linears(module: torch.nn.Module) -> int:
    """Replace every nn.Linear under `module` whose sizes suit FP8 GEMMs (multiples of 16); returns how many."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            if child.in_features % 16 == 0 and child.out_features % 16 == 0:
                setattr(module, name, Fp8Linear(child))
                n += 1
        else:
            n += swap_linears(child)
    return n


def apply_fp8_linears(blocks) -> int:
    """FP8 GEMMs for the attention and feed-forward projections of every block (not the tiny
    timestep-modulation linears: their batch is the number of videos, too small to gain)."""
    n = 0
    for block in blocks:
        for name, child in block.named_children():
            if name.startswith(("attn", "ff", "ffn")):
                n += swap_linears(child)
    return n
