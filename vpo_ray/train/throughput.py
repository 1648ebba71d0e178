"""Throughput of a training run from its step rows: seconds per optimizer step, tokens/s per
GPU, model FLOP utilisation, peak GPU memory per rank; and how a resumed run's re-trained
steps compare with what the crashed attempt logged for them.

MFU counts model FLOPs only, with the usual dense estimate (attention's N^2 term left out,
so it is a lower bound): 6 x N x T for the policy's forward + backward over T tokens, plus
2 x N x T for a DPO reference forward when it runs inside the step (not when its log-probs
were precomputed before training: that pass is reported apart). It is given against the
datasheet bf16 peak and against the matmul rate measured on the same GPU.
"""
from __future__ import annotations

import statistics
from typing import Optional

WARMUP_STEPS = 2  # first optimizer steps left out of the figures (allocator, kernels, NCCL set-up)


def model_flops(params: int, tokens: float, method: str, reference_in_step: bool = True) -> float:
    """Dense FLOPs of one step: forward + backward of the policy, forward of the DPO reference if it runs."""
    return 6.0 * params * tokens + (2.0 * params * tokens if method == "dpo" and reference_in_step else 0.0)


def timed_rows(rows: list[dict], warmup: int = WARMUP_STEPS) -> list[dict]:
    """Step rows with timings past the warm-up (all but the first step if the run is that short)."""
    timed = [r for r in rows if "step_seconds" in r and "step_tokens" in r]
    if len(timed) > warmup:
        return timed[warmup:]
    return timed[1:] if len(timed) > 1 else timed


def throughput(rows: list[dict], state: dict, method: str, reference_in_step: bool,
               warmup: int = WARMUP_STEPS) -> dict:
    """The run's steady-state figures past `warmup` steps (empty dict when no step carried timings)."""
    timed = timed_rows(rows, warmup)
    if not timed:
        return {}
    ranks = int(state.get("world_size") or 1)
    params = int(state.get("params") or 0)
    step_s = statistics.median(r["step_seconds"] for r in timed)
    tokens = statistics.mean(r["step_tokens"] for r in timed)
    per_gpu_tflops = model_flops(params, tokens, method, reference_in_step) / step_s / ranks / 1e12
    peak, ceiling = state.get("peak_bf16_tflops"), state.get("matmul_ceiling_tflops")
    memory = [r["peak_allocated_gib_per_rank"] for r in rows if r.get("peak_allocated_gib_per_rank")]
    return {
        "steps_timed": len(timed), "ranks": ranks, "params": params, "device": state.get("device_name"),
        "step_s_median": round(step_s, 4), "tokens_per_step": round(tokens, 1),
        "tokens_per_s": round(tokens / step_s, 1), "tokens_per_s_per_gpu": round(tokens / step_s / ranks, 1),
        "model_tflops_per_gpu": round(per_gpu_tflops, 2),
        "mfu": round(per_gpu_tflops / peak, 3) if peak else None,
        "mfu_vs_measured_matmul": round(per_gpu_tflops / ceiling, 3) if ceiling else None,
        "datasheet_bf16_tflops": peak, "measured_matmul_tflops": ceiling,
        "flops": "6·N·T" + (" + 2·N·T (reference forward in the step)" if method == "dpo" and reference_in_step
                            else " (reference log-probs precomputed before training)" if method == "dpo" else ""),
        "peak_allocated_gib_per_rank": [max(col) for col in zip(*memory)] if memory else None,
    }


def resume_check(rows: list[dict], replaced: list[dict]) -> Optional[dict]:
    """Loss of every re-trained step vs what the crashed attempt logged for it (None: no restart redid a step)."""
    final = {int(r["step"]): r for r in rows}
    pairs = [(int(r["step"]), r["loss"], final[int(r["step"])]["loss"]) for r in replaced
             if int(r["step"]) in final and "loss" in r]
    if not pairs:
        return None
    rel = [abs(a - b) / max(abs(b), 1e-12) for _, a, b in pairs]
    return {"steps_redone": [s for s, _, _ in pairs], "loss_before_crash": [a for _, a, _ in pairs],
            "loss_after_resume": [b for _, _, b in pairs], "max_rel_loss_diff": round(max(rel), 6)}
