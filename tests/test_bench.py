"""`vpo bench` on the tiny preset (CPU): the harness runs, the record has its figures, the PNG is drawn.

Speed is not asserted here (benchmarks/README.md holds GPU figures); these tests check that
every benchmark completes, reports what it says it reports, and writes strict JSON + a PNG.
"""
from __future__ import annotations

import json
import os
import stat

import pytest

from vpo_ray.bench import flops
from vpo_ray.bench.nvml import GpuSampler


def _strict_load(path):
    def bad(token):
        raise AssertionError(f"{path}: non-standard JSON constant {token}")
    with open(path) as f:
        return json.load(f, parse_constant=bad)


def _bench(capsys, *argv):
    from vpo_ray.cli import main

    assert main(["bench", *argv]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    return json.loads(printed)


def _png_ok(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) < 300_000


def test_video_sampling_tiny(ray_session, tiny_cache, tmp_path, capsys):
    out = tmp_path / "bench"
    rec = _bench(capsys, "video-sampling", "--preset", "tiny", "--out", str(out), "--videos", "2", "--warmup", "1",
                 "cache_videos=1")
    saved = _strict_load(out / "video_sampling_tiny.json")
    assert saved["summary"] == rec["summary"]
    assert rec["video"]["num_frames"] == 9 and rec["device"]["name"] and rec["versions"]["torch"]
    assert "warm-up" in rec["warmup_note"] and rec["text_encoder"]
    for variant in ("baseline", "optimized"):
        r = rec[variant]
        assert "error" not in r, r
        assert r["seconds_per_video"] > 0 and r["dit_step_s"] > 0 and r["vae_decode_s"] > 0 and r["videos_per_s"] > 0
        assert r["dit_tflops"] >= 0 and len(r["per_video"]) == r["videos"]
    assert rec["optimized"]["vs_baseline"]["max_abs_diff_uint8"] <= 1  # fused QKV in fp32: same frames
    ray = rec["ray"]
    assert ray["errors"] == [] and ray["videos_per_s"] > 0 and ray["ratio_vs_bare_loop"] > 0
    assert ray["psnr_vs_bare_loop_mp4_db"] == "inf"  # same weights, seed and kernels: identical mp4 frames
    cache = rec["cache"]["cache=taylorseer-lite:6"]
    assert cache["seconds_per_video"] > 0 and len(cache["psnr_vs_optimized_db"]) == 1
    assert "skipped" in rec["memory"]  # no CUDA here
    assert "skipped" in rec["quantized"]["linear=fp8"]  # FP8 GEMMs: CUDA only
    assert rec["summary"]["ray_vs_bare"] == ray["ratio_vs_bare_loop"]
    _png_ok(rec["png"])


def test_video_sampling_scaling_tiny(ray_session, tiny_cache, tmp_path, capsys):
    """The multi-GPU scaling harness on CPU: 1 and 2 actors render, rates add up per actor."""
    out = tmp_path / "bench"
    rec = _bench(capsys, "video-sampling", "--preset", "tiny", "--out", str(out), "--warmup", "1",
                 "variants=[scaling]", "scaling_actors=[1,2,4]", "scaling_videos_per_actor=2")
    sc = rec["scaling"]
    assert sc["left_out"] == [4]  # more actors than the 2 CPU runs allow are said, not started
    for c, n in (("1", 2), ("2", 4)):
        r = sc["runs"][c]
        assert r["errors"] == [] and r["rows"] == n and r["stage"]["actors"] == int(c)
        assert r["videos_by_actor"] == [2] * int(c), "every actor renders its share"
        assert r["videos_per_s"] > 0
    assert sc["efficiency_vs_linear"]["1"] == 1.0 and sc["efficiency_vs_linear"]["2"] > 0
    assert rec["summary"]["scaling[2 actors]_efficiency"] == sc["efficiency_vs_linear"]["2"]
    _png_ok(sc["png"])


def test_llm_stages_measures_the_presets_models():
    from vpo_ray.bench.llm_stages import bench_models
    from vpo_ray.bench.config import BenchConfig, BenchLLMConfig

    assert bench_models(BenchConfig(name="llm-stages", preset="paper")) == (("llama3-8b-instruct",),
                                                                            ("qwen2-vl-7b-instruct",))
    assert bench_models(BenchConfig(name="llm-stages", preset="qwen")) == (("qwen2.5-7b-instruct",),
                                                                           ("qwen2.5-vl-7b-instruct",))
    explicit = BenchConfig(name="llm-stages", preset="paper", llm=BenchLLMConfig(models=("qwen2.5-1.5b-instruct",)))
    assert bench_models(explicit)[0] == ("qwen2.5-1.5b-instruct",)


def test_llm_stages_tiny(tiny_cache, tmp_path, capsys):
    rec = _bench(capsys, "llm-stages", "--preset", "tiny", "--out", str(tmp_path), "llm.rows=6", "llm.batch_size=4",
                 "llm.prompt_tokens=[12,30]", "llm.max_new_tokens=8", "llm.baseline_rows=2", "llm.baseline_batch=2",
                 "llm.ablation_rows=4", "llm.stage_rows=3", "llm.verdict_rows=5",
                 "llm.verdict_tokens=[20,40]", "llm.verdict_baseline_rows=3", "llm.invariance_rows=2",
                 "llm.vlm_videos=2", "llm.vlm_baseline_videos=1", "llm.vlm_questions=3",
                 "llm.phases=[engine,verdict,baseline,vlm,stages,invariance,ablations]")
    m = rec["models"]["tiny-optimizer"]
    eng = m["engine"]
    assert eng["backend"] == "static" and eng["rows"] == 6 and eng["slots"] == 4  # 6 rows through 4 slots: refills
    assert eng["tok_s"] > 0 and eng["decode_steps"] > 0 and 0 < eng["live_rows_per_step"] <= 4
    assert eng["generated_tokens"] == 6 * 7  # every length drawn by the output model is capped at 8 - 1
    for stage in ("rewrite", "critique"):  # the old path on the engine's first rows: same lengths, HF generate
        old = m["baseline"][stage]
        assert old["backend"] == "hf" and old["slots"] == 2 and old["generated_tokens"] == 2 * 7
        assert old["rows_per_s"] > 0
    v = m["verdict"]
    assert v["bucketed_prefill"]["rows"] == 5 and v["old_path_b8_full_logits"]["rows"] == 3
    assert v["max_abs_p_yes_difference"] < 1e-5  # the bucketed prefill reads the old path's P(yes)
    assert m["invariance"]["rows_identical"] == m["invariance"]["rows"] == 2  # CPU: batching changes no token
    assert set(m["stages"]) == {"critique", "refine"} and all(s["tok_s"] > 0 for s in m["stages"].values())
    assert set(m["ablations"]) == {"graphs-continuous", "+refill-every-check", "+sampler-top-k-256",
                                   "+prefill-chunks-4096", "+refill+top-k", "hf-generate-b64", "static-eager",
                                   "graphs-waves", "graphs-continuous-64-slots", "graphs-continuous-no-kv-buckets"}
    ablations = m["ablations"]  # each new switch reached its engine; the same rows came out of every variant
    assert ablations["+sampler-top-k-256"]["config"] == {"refill_every_check": False, "prefill_chunk_tokens": 0,
                                                         "sampler_top_k": 256}
    assert ablations["+sampler-top-k-256"]["sampler_full_sort_share"] == 1.0  # a flat random model: never decided
    assert ablations["graphs-continuous"]["sampler_full_sort_share"] == 0.0  # (top-k off: no row counted)
    assert len({v["generated_tokens"] for v in ablations.values() if v["backend"] == "static"}) == 1
    vlm = rec["vlm"]["tiny-video-judge"]
    assert vlm["prefix_reuse"]["videos_per_s"] > 0 and vlm["questions"] == 3
    assert vlm["hf_per_question"]["max_abs_p_yes_vs_prefix_reuse"] < 1e-5
    compared = {(r["stage"], r["variant"], r["compare"]) for r in rec["table"] if r.get("compare")}
    assert compared == {("rewrite", "hf-generate-b2", "old"), ("rewrite", "engine", "engine"),
                        ("critique", "hf-generate-b2", "old"), ("critique", "engine", "engine"),
                        ("refine", "engine", "engine"),
                        ("verdict", "old_path_b8_full_logits", "old"), ("verdict", "bucketed_prefill", "engine"),
                        ("judge (critique + verdict)", "old path", "old"), ("judge (critique + verdict)", "engine", "engine"),
                        ("video judge", "hf_per_question", "old"), ("video judge", "prefix_reuse", "engine")}
    judge = [r for r in rec["table"] if r["stage"].startswith("judge") and r["compare"] == "engine"][0]
    assert judge["rows_per_s"] > 0 and judge["x_old_path"] > 0
    _strict_load(tmp_path / "llm_stages_tiny.json")
    _png_ok(rec["png"])


def test_train_step_tiny(ray_session, tiny_cache, tmp_path, capsys):
    """Default engine: one Ray Train worker with DeepSpeed ZeRO-2, as `vpo train` runs."""
    rec = _bench(capsys, "train-step", "--preset", "tiny", "--out", str(tmp_path), "train.steps=2",
                 "train.seq_len=24", "train.batch_size=2")
    sft, dpo = rec["methods"]["sft"], rec["methods"]["dpo"]
    assert "error" not in sft and "error" not in dpo, (sft, dpo)
    assert sft["engine"] == dpo["engine"] == "deepspeed zero-2" and sft["ranks"] == 1
    assert sft["tokens_per_step"] == 48 and dpo["tokens_per_step"] == 96  # DPO counts chosen + rejected
    assert sft["tokens_per_s"] > 0 and dpo["tokens_per_s"] > 0 and len(dpo["losses"]) == 2
    assert sft["mfu"] is None and sft["model_tflops_per_gpu"] >= 0  # no datasheet peak for a CPU
    assert dpo["params"] == sft["params"] > 0


def test_train_step_two_ranks_zero3_and_torch_engine(ray_session, tiny_cache, tmp_path, capsys):
    rec = _bench(capsys, "train-step", "--preset", "tiny", "--out", str(tmp_path / "ds"), "train.steps=2",
                 "train.seq_len=24", "train.batch_size=2", "train.workers=2", "train.zero_stage=3",
                 "train.methods=[dpo]")
    dpo = rec["methods"]["dpo"]
    assert "error" not in dpo, dpo
    assert dpo["engine"] == "deepspeed zero-3" and dpo["ranks"] == 2
    assert dpo["tokens_per_step"] == 2 * 2 * 24 * 2 and len(dpo["peak_allocated_gib_per_rank"]) == 2
    assert dpo["tokens_per_s_per_gpu"] == pytest.approx(dpo["tokens_per_s"] / 2, rel=1e-3)
    one = _bench(capsys, "train-step", "--preset", "tiny", "--out", str(tmp_path / "torch"), "train.steps=2",
                 "train.seq_len=24", "train.batch_size=2", "train.engine=torch", "train.methods=[sft]")
    assert one["methods"]["sft"]["engine"] == "torch" and one["methods"]["sft"]["tokens_per_s"] > 0
    assert abs(dpo["losses"][0] - 0.6931) < 0.05  # log 2 at the start: policy == reference
    _png_ok(rec["png"])


def test_train_step_runs_vpo_train_itself(ray_session, tiny_cache, tmp_path, capsys):
    """engine=trl: a `vpo train` call per run spec; 2 ranks, ZeRO-3, DPO reference log-probs precomputed once."""
    rec = _bench(capsys, "train-step", "--preset", "tiny", "--out", str(tmp_path), "train.engine=trl",
                 "train.runs=[dpo:2:3:2:precompute]", "train.seq_len=96", "train.steps=2", "train.warmup_steps=1",
                 "train.label=ci")
    run = rec["runs"]["dpo:2:3:2:precompute"]
    assert "error" not in run, run
    assert (run["workers"], run["zero_stage"], run["ranks"], run["steps_timed"]) == (2, 3, 2, 2)
    assert len(run["losses"]) == 3 and abs(run["losses"][0] - 0.6931) < 0.01  # policy == its precomputed reference
    assert 0 < run["tokens_per_step"] <= 2 * 2 * 2 * 96  # 2 ranks x 2 pairs x (chosen + rejected) x cutoff
    assert run["tokens_per_s_per_gpu"] == pytest.approx(run["tokens_per_s"] / 2, rel=1e-2)
    assert "precomputed" in run["flops"] and run["mfu"] is None and run["params"] > 0
    assert rec["scaling"] == []  # one worker count only
    _strict_load(tmp_path / "train_step_tiny-optimizer_trl_ci.json")
    _png_ok(rec["png"])


def test_bad_settings_are_named(tmp_path, capsys):
    from vpo_ray.cli import main

    assert main(["bench", "video-sampling", "--out", str(tmp_path), "videos=one"]) == 2
    assert "videos" in capsys.readouterr().err
    assert main(["bench", "video-sampling", "--out", str(tmp_path), "variants=[baseline,turbo]"]) == 2
    assert "'turbo'" in capsys.readouterr().err


def test_flops_cogvideox_2b_matches_hand_count():
    import json as _json
    from pathlib import Path

    cfg = _json.loads((Path(flops.__file__).parent.parent / "models" / "configs" / "cogvideox-2b" /
                       "transformer.json").read_text())
    f = flops.dit_flops("CogVideoXTransformer3DModel", cfg, num_frames=49, height=480, width=720, guidance_scale=6.0)
    n, d = 13 * 30 * 45 + 226, 1920
    assert f["video_tokens"] == 17550 and f["attention_tokens"] == n
    per_layer = 24 * n * d * d + 4 * n * n * d
    assert 30 * per_layer < f["per_forward"] < 1.01 * 30 * per_layer  # embeddings add well under 1%
    assert f["per_step"] == 2 * f["per_forward"] and 2.3e14 < f["per_step"] < 2.5e14
    wan = _json.loads((Path(flops.__file__).parent.parent / "models" / "configs" / "wan2.1-t2v-1.3b" /
                       "transformer.json").read_text())
    w = flops.dit_flops("WanTransformer3DModel", wan, num_frames=81, height=480, width=832, guidance_scale=5.0)
    assert w["video_tokens"] == 21 * 30 * 52 and w["cfg_passes"] == 2
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and flops.peak_tflops("cpu") is None


def test_gpu_sampler_reads_nvidia_smi_when_nvml_is_missing(tmp_path, monkeypatch):
    import sys
    import time

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nwhile true; do echo '87, 1024'; sleep 0.05; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    t0 = time.time()
    with GpuSampler(interval_s=0.05) as s:
        # wait for 3 samples (~0.15 s); the bound only stops a broken reader from hanging the test
        deadline = time.monotonic() + 30
        while len(s.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    w = s.window(t0, time.time())
    assert s.source == "nvidia-smi" and w["samples"] >= 3
    assert w["busy_fraction"] == pytest.approx(0.87) and w["mem_used_max_gib"] == pytest.approx(1.0)


def test_gpu_sampler_without_any_gpu_tool(monkeypatch, tmp_path):
    import sys

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with GpuSampler() as s:
        pass
    assert s.source == "none" and s.window(0, 1e12)["busy_fraction"] is None


def test_pipeline_tiny(ray_session, tiny_cache, tmp_path, capsys):
    """`vpo bench pipeline` runs the real generate job (random-weight tiny models) and times every pool."""
    out = tmp_path / "bench"
    rec = _bench(capsys, "pipeline", "--preset", "tiny", "--out", str(out), "pipeline.limit=2",
                 "pipeline.num_samples=2", "pipeline.generate=[random_outputs.judge_pass_rate=1.0]")
    assert rec["weights"] == "random" and rec["generate_summary"]["accounted"] is True
    e2e = rec["end_to_end"]
    assert e2e["queries"] == 2 and e2e["videos"] == 4  # every candidate passes, one seed each
    # both figures are rounded to 5 places from the same unrounded rate: compare within that rounding
    assert e2e["videos_per_s"] > 0 and abs(e2e["queries_per_s"] - e2e["videos_per_s"] / 2.0) <= 1e-5
    assert set(rec["stages"]) == {"rewrite", "judge", "t2v", "video_judge"}
    assert rec["stages"]["t2v"]["rows_in"] == 4 and rec["stages"]["video_judge"]["rows_in"] == 4
    assert rec["stages"]["rewrite"]["tokens"] > 0  # generated tokens counted in the LLM pools
    for pool in rec["stages"].values():
        assert pool["actors"] == 1 and 0 <= pool["busy_share"] <= 1 and pool["waited_for_input_s"] >= 0
    assert rec["gpus"] == [] and e2e["gpu_hours_per_1000_queries"] is None  # no GPU: said, not invented
    saved = _strict_load(out / "pipeline_tiny.json")
    assert saved["summary"]["videos_per_s"] == e2e["videos_per_s"]
    _png_ok(rec["png"])
