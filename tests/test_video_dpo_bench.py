"""`vpo bench video-dpo-step` on the tiny preset: the harness (CPU), not speed."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_pair_flops_count_lora_without_weight_gradients(tiny_cache):
    from vpo_ray.bench.video_dpo_step import pair_flops
    from vpo_ray.models.registry import get_spec, load_t2v_pipeline, model_path

    pipe = load_t2v_pipeline(model_path(get_spec("tiny", "t2v")), "cpu")
    full, lora = (pair_flops(pipe, 9, 32, 32, lora=x) for x in (False, True))
    f, att = full["per_forward"], full["attention_per_forward"]
    assert 0 < att < f
    assert full["per_pair"] == pytest.approx(2 * f + 4 * f + 2 * f)  # policy fwd, bwd (2x), reference fwd
    assert lora["per_pair"] == pytest.approx(2 * f + 2 * (f + att) + 2 * f)
    assert full["video_tokens"] == 3 * 2 * 2  # 3 latent frames of 4x4 latents in 2x2 patches


def test_tiny_benchmark_writes_its_record_and_chart(ray_session, tmp_path):
    from vpo_ray.bench.video_dpo_step import run
    from vpo_ray.train.video_dpo_config import BenchVideoDPOConfig

    rec = run(BenchVideoDPOConfig(preset="tiny", out=str(tmp_path), modes=("lora",), workers=(1,), steps=2))
    r = rec["runs"]["lora-1"]
    assert "error" not in r, r
    assert r["pairs_per_s"] > 0 and r["videos_per_s"] == pytest.approx(2 * r["pairs_per_s"], rel=1e-3)
    assert 0 < r["trainable_params"] < r["params"] and len(r["losses"]) == 2
    assert (r["num_frames"], r["height"], r["width"]) == (9, 32, 32) and r["mfu"] is None  # no GPU peak on CPU
    saved = json.loads((tmp_path / "video_dpo_step_tiny.json").read_text())
    assert saved["runs"]["lora-1"]["step_s_median"] == r["step_s_median"]
    assert (tmp_path / "video_dpo_step_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
