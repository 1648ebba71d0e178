"""Throughput figures of a training run (vpo_ray.train.throughput) and the train-step run specs."""
from __future__ import annotations

import pytest

from vpo_ray.bench.train_stack import RunSpec, parse_run, scaling
from vpo_ray.train.throughput import model_flops, resume_check, throughput


def row(step, seconds, tokens, loss=1.0, peaks=None):
    r = {"step": step, "loss": loss, "step_seconds": seconds, "step_tokens": tokens}
    if peaks:
        r["peak_allocated_gib_per_rank"] = peaks
    return r


def test_mfu_from_steady_steps_against_datasheet_and_measured_ceiling():
    # 8e9 params, 4 ranks, 16,384 tokens per step: 6NT = 7.86e14 FLOP per step
    rows = [row(1, 9.0, 16384, peaks=[60.0, 61.0, 59.0, 60.5]), row(2, 3.0, 16384),
            row(3, 2.0, 16384, peaks=[62.0, 60.0, 60.0, 60.0]), row(4, 2.0, 16384), row(5, 2.2, 16384)]
    state = {"world_size": 4, "params": 8_000_000_000, "peak_bf16_tflops": 989.4, "matmul_ceiling_tflops": 780.0,
             "device_name": "NVIDIA H100 80GB HBM3"}
    got = throughput(rows, state, "sft", reference_in_step=False)
    assert got["steps_timed"] == 3 and got["step_s_median"] == 2.0  # the two warm-up steps are left out
    assert got["tokens_per_s"] == 8192.0 and got["tokens_per_s_per_gpu"] == 2048.0
    per_gpu = 6 * 8e9 * 16384 / 2.0 / 4 / 1e12
    assert got["model_tflops_per_gpu"] == pytest.approx(per_gpu, abs=0.01)
    assert got["mfu"] == pytest.approx(per_gpu / 989.4, abs=1e-3)
    assert got["mfu_vs_measured_matmul"] == pytest.approx(per_gpu / 780.0, abs=1e-3)
    assert got["peak_allocated_gib_per_rank"] == [62.0, 61.0, 60.0, 60.5]  # each rank's worst step
    assert got["flops"] == "6·N·T"


def test_dpo_counts_the_reference_forward_only_when_it_runs_in_the_step():
    assert model_flops(10, 100, "dpo", reference_in_step=True) == 8 * 10 * 100
    assert model_flops(10, 100, "dpo", reference_in_step=False) == 6 * 10 * 100
    assert model_flops(10, 100, "sft", reference_in_step=True) == 6 * 10 * 100
    rows = [row(s, 1.0, 100) for s in range(1, 5)]
    state = {"world_size": 1, "params": 10}
    assert "precomputed" in throughput(rows, state, "dpo", False)["flops"]
    assert throughput(rows, state, "dpo", True)["mfu"] is None  # no datasheet peak (CPU)
    assert throughput([{"step": 1, "loss": 1.0}], state, "sft", False) == {}  # nothing timed


def test_warm_up_steps_left_out_are_the_runs_own():
    """`vpo bench train-step train.warmup_steps=1` times every step after the first, not after the second."""
    rows = [row(1, 9.0, 100), row(2, 2.0, 100), row(3, 3.0, 100), row(4, 4.0, 100)]
    state = {"world_size": 1, "params": 10}
    assert throughput(rows, state, "sft", False)["steps_timed"] == 2  # the default: two warm-up steps
    one = throughput(rows, state, "sft", False, warmup=1)
    assert one["steps_timed"] == 3 and one["step_s_median"] == 3.0
    assert throughput(rows, state, "sft", False, warmup=0)["step_s_median"] == 3.5


def test_resume_check_compares_redone_steps_with_the_crashed_attempt():
    final = [row(s, 1.0, 10, loss=1.0 / s) for s in range(1, 7)]
    before_crash = [row(4, 1.0, 10, loss=0.25), row(5, 1.0, 10, loss=0.2 * 1.001)]
    check = resume_check(final, before_crash)
    assert check["steps_redone"] == [4, 5] and check["max_rel_loss_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert resume_check(final, []) is None


def test_run_specs_parse_and_bad_ones_are_named():
    assert parse_run("dpo:2:3:2:offload:gc") == RunSpec("dpo", 2, 3, 2, ("offload", "gc"))
    assert parse_run("sft:4:3:2").name == "sft:4:3:2"
    for bad, word in (("sft:4:3", "METHOD"), ("ppo:4:3:2", "METHOD"), ("sft:x:3:2", "integers"),
                      ("sft:4:1:2", "stage"), ("sft:4:3:2:turbo", "turbo")):
        with pytest.raises(ValueError, match=word):
            parse_run(bad)


def test_scaling_pairs_runs_that_differ_only_in_workers():
    runs = {"a": {"method": "sft", "zero_stage": 3, "batch_per_gpu": 2, "flags": [], "workers": 2, "tokens_per_s": 100.0},
            "b": {"method": "sft", "zero_stage": 3, "batch_per_gpu": 2, "flags": [], "workers": 4, "tokens_per_s": 190.0},
            "c": {"method": "sft", "zero_stage": 3, "batch_per_gpu": 2, "flags": ["offload"], "workers": 4,
                  "tokens_per_s": 50.0},
            "d": {"error": "OOM"}}
    (pair,) = scaling(runs)
    assert pair["tokens_per_s"] == {"2": 100.0, "4": 190.0}
    assert pair["efficiency_vs_linear"] == {"2": 1.0, "4": 0.95}
