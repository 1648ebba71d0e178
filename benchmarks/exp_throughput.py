"""Special-function throughput on this GPU: exp2 in fp32 (MUFU.EX2) vs packed fp16x2 (ex2.approx.f16x2).

    python benchmarks/exp_throughput.py

Why: attention at head_dim 64 does one exp per 256 matmul FLOPs, so on Hopper its speed is
bounded by the special-function units (~3.9e12 exp/s on an H100 SXM), not the tensor cores.
Prints one JSON line per variant: exps per second over a register-resident loop.
"""
import json

import torch
import triton
import triton.language as tl


@triton.jit
def _exp_loop(X, ITERS: tl.constexpr, F16X2: tl.constexpr, FTZ: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    if F16X2:
        h = x.to(tl.float16)
        for _ in range(ITERS):
            h = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [h * 0.5 - 1.0],
                                          dtype=tl.float16, is_pure=True, pack=2)
        x = h.to(tl.float32)
    elif FTZ:
        for _ in range(ITERS):
            x = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 0.5 - 1.0],
                                          dtype=tl.float32, is_pure=True, pack=1)
    else:
        for _ in range(ITERS):
            x = tl.math.exp2(x * 0.5 - 1.0)
    tl.store(X + offs, x)


def main():
    n, block, iters = 132 * 64 * 1024, 1024, 256
    x = torch.rand(n, device="cuda")
    for name, f16x2, ftz in (("tl.math.exp2 (f32)", False, False), ("ex2.approx.ftz.f32", False, True),
                             ("ex2.approx.f16x2", True, False)):
        def run():
            _exp_loop[(n // block,)](x, ITERS=iters, F16X2=f16x2, FTZ=ftz, BLOCK=block, num_warps=8)
        ms = triton.testing.do_bench(run, warmup=50, rep=200, return_mode="median")
        print(json.dumps({"variant": name,
                          "exp_per_s": round(n * iters / (ms * 1e-3) / 1e12, 3), "unit": "1e12 exp/s",
                          "device": torch.cuda.get_device_name(0)}), flush=True)


if __name__ == "__main__":
    main()
