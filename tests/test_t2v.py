"""The text-to-video stage on the tiny preset: mp4s out of a Ray Data actor pool, error rows, reruns."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vpo_ray.config import StageConfig, VideoConfig
from vpo_ray.pipeline import t2v

VIDEO = VideoConfig(num_frames=9, height=32, width=32, num_inference_steps=2, fps=8)
STAGE = StageConfig(min_actors=1, max_actors=1, num_gpus=0.0, num_cpus=1.0, batch_size=2)


def _row(qid, prompt, seed, aspect="", sample_idx=0, negative=""):
    return {"query_id": qid, "sample_idx": sample_idx, "prompt": prompt, "negative_prompt": negative,
            "seed": seed, "aspect_ratio": aspect}


def _render(rows, out_root, optimizations=("overlap",)):
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 3))
    out = t2v.stage(ds, STAGE, model="tiny", video=VIDEO, out_root=str(out_root), optimizations=optimizations,
                    timings=True)
    return {(r["query_id"], r["sample_idx"]): r for r in out.take_all()}


def test_target_size_keeps_pixel_budget_and_multiple():
    assert t2v.target_size("", 480, 720, 16) == (480, 720)
    h, w = t2v.target_size("9:16", 480, 720, 16)
    assert h > w and h % 16 == 0 and w % 16 == 0
    assert abs(h * w - 480 * 720) / (480 * 720) < 0.05
    assert t2v.target_size("1:1", 480, 720, 16) == (592, 592)
    with pytest.raises(ValueError, match="aspect_ratio 'wide'"):
        t2v.target_size("wide", 480, 720, 16)


def test_unknown_optimization_is_named():
    with pytest.raises(ValueError, match="'turbo'"):
        t2v.parse_optimizations(("fuse-qkv", "turbo"))
    assert t2v.parse_optimizations(("cache=fbc:0.1", "compile", "attn=cudnn")) == {
        "cache": ("fbc", "0.1"), "compile": "regional", "attn": "cudnn"}


def test_stage_renders_readable_mp4s_with_error_rows(ray_session, tiny_cache, tmp_path):
    from vpo_ray.video_io import read_frames, video_info

    rows = [_row("q1", "a red fox running through snow", 7),
            _row("q2", "a red fox running through snow", 7),  # same prompt and seed as q1
            _row("q3", "a red fox running through snow", 8),  # another seed
            _row("q4", "a sailboat at dawn", 1, aspect="16:9"),
            _row("q5", "   ", 1),  # empty prompt
            _row("q6", "a dog", 1, aspect="wide")]  # unparseable aspect ratio
    out = _render(rows, tmp_path)
    assert sorted(out) == [(f"q{i}", 0) for i in range(1, 7)]  # nothing dropped

    for qid in ("q1", "q2", "q3", "q4"):
        r = out[(qid, 0)]
        assert r["error"] == "" and r["frames"] == 9 and r["fps"] == 8 and r["model"] == "tiny-t2v"
        assert r["video_uri"] == os.path.join(str(tmp_path), "videos", f"{qid}_0_{r['seed']}.mp4")
        assert video_info(r["video_uri"])["frames"] == 9
        assert r["checklist_json"] == "[]" and r["score"] == 0.0
    assert (video_info(out[("q1", 0)]["video_uri"])["height"], video_info(out[("q1", 0)]["video_uri"])["width"]) == (32, 32)
    wide = video_info(out[("q4", 0)]["video_uri"])
    assert wide["width"] > wide["height"]  # 16:9 at the same pixel budget: 48x32

    f1, f2, f3 = (read_frames(out[(q, 0)]["video_uri"]) for q in ("q1", "q2", "q3"))
    assert f1.shape == (9, 32, 32, 3)
    assert np.array_equal(f1, f2)  # same seed, same frames
    assert not np.array_equal(f1, f3)

    assert out[("q5", 0)]["video_uri"] == "" and "prompt is empty" in out[("q5", 0)]["error"]
    assert out[("q6", 0)]["video_uri"] == "" and "aspect_ratio 'wide'" in out[("q6", 0)]["error"]


def test_rerun_skips_existing_and_rerenders_corrupt(ray_session, tiny_cache, tmp_path):
    from vpo_ray.video_io import video_info

    rows = [_row("r1", "a panda eating bamboo", 3), _row("r2", "a train in the rain", 4)]
    first = _render(rows, tmp_path, optimizations=())
    uri1, uri2 = first[("r1", 0)]["video_uri"], first[("r2", 0)]["video_uri"]
    mtime1 = os.stat(uri1).st_mtime_ns
    with open(uri2, "wb") as f:  # a cut-off file, as a crash mid-copy would leave
        f.write(b"\x00\x00\x00\x18ftypmp42")

    second = _render(rows, tmp_path, optimizations=())
    assert json.loads(second[("r1", 0)]["timings_json"]) == {"skipped": True}
    assert os.stat(uri1).st_mtime_ns == mtime1 and second[("r1", 0)]["frames"] == 9
    assert "denoise_s" in json.loads(second[("r2", 0)]["timings_json"])  # rendered again
    assert second[("r2", 0)]["error"] == "" and video_info(uri2)["frames"] == 9


def test_renderer_optimisations_keep_frames_on_cpu(tiny_cache):
    """Fused QKV and the overlap path give the same frames as the plain path (fp32, CPU)."""
    plain = t2v.T2VRenderer("tiny", VIDEO)
    fast = t2v.T2VRenderer("tiny", VIDEO, optimizations=("fuse-qkv", "overlap"))
    a = plain.render("a cat dancing", seed=5)["frames"]
    b = fast.render("a cat dancing", seed=5)["frames"]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    cached = t2v.T2VRenderer("tiny", VIDEO, optimizations=("cache=taylorseer-lite:2",))
    assert cached.render("a cat dancing", seed=5)["frames"].shape == a.shape
