"""The `vlm` phase of `vpo bench llm-stages`: videos judged per second by the Qwen2-VL judge.

The real architecture with random weights and a stand-in tokenizer of its vocabulary
(`weights=random`: registry.load_video_judge(RandomModel(name))); each video is
`vlm_frames` random frames of `vlm_video_size`, resized by the judge's own pixel bounds
into its patch grid, and asked the default checklist (data/checklist.py "vpo_ray", repeated
to `vlm_questions` questions) in the real prompt layout. Three ways, each timed with its
preprocessing (frame resize, patches, tokenization; frame decoding from mp4 is not in it):

  hf_per_question  the plain path: registry.video_judge_inputs + one HF forward per
                   (video, question): frames re-processed and re-encoded every question
                   (on `vlm_baseline_videos` videos)
  no_reuse         the engine, every question from scratch (vision + whole prompt per question)
  prefix_reuse     the engine: each video encoded once, its prefix prefilled once, all its
                   questions answered in one batch with the other videos'

GPU share per T2V GPU = (1 / T2V seconds per video) / judge videos/s.
"""
from __future__ import annotations

import time

from vpo_ray.bench import common

T2V_SECONDS_PER_VIDEO = {"exact": 29.9, "cached": 9.7}  # CogVideoX-2B on one H100 (benchmarks/README.md)


def load_vlm(name: str, device: str, dtype: str):
    """(model, processor): the registry model's architecture with random weights and a stand-in
    tokenizer (for "tiny-video-judge" the small stand-in: the same code path the GPU run takes)."""
    from vpo_ray.models import random_weights, registry

    model, processor = registry.load_video_judge(random_weights.RandomModel(name), device=device, dtype=dtype)
    return model.eval(), processor


def _videos(n: int, lc, seed: int) -> list:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (lc.vlm_frames, *lc.vlm_video_size, 3), dtype=np.uint8) for _ in range(n)]


def _questions(lc, query: str = "a red fox running through a snowy forest at dawn") -> list[str]:
    from vpo_ray.data.checklist import load_checklist

    checklist = load_checklist("vpo_ray").items
    items = [checklist[i % len(checklist)] for i in range(lc.vlm_questions)]
    return [c.ask(query) for c in items]


def _hf_per_question(model, processor, frames, questions: list, yes: list, no: list, device: str) -> list:
    """The plain path the judge ran before: inputs rebuilt and a full HF forward for every question."""
    import torch

    from vpo_ray.models import registry

    dtype = next(model.parameters()).dtype
    out = []
    for q in questions:
        inputs = registry.video_judge_inputs(processor, list(frames), q, device=device, dtype=dtype)
        with torch.inference_mode():
            p_yes, p_no = registry.yes_no_probs(model(**inputs).logits, yes, no)
        out.append(float(p_yes / (p_yes + p_no)))
    return out


def _timed(device: str, fn):
    common.sync(device)
    t0 = time.perf_counter()
    result = fn()
    common.sync(device)
    return result, time.perf_counter() - t0


def bench_vlm(name: str, cfg, device: str, dtype: str) -> dict:
    import numpy as np

    from vpo_ray.models.registry import yes_no_token_ids
    from vpo_ray.pipeline.vlm_engine import VideoQAEngine, build_questions

    lc = cfg.llm
    common.free_memory(device)
    t0 = time.perf_counter()
    model, processor = load_vlm(name, device, dtype)
    load_s = time.perf_counter() - t0
    yes, no = yes_no_token_ids(processor.tokenizer)
    engine = VideoQAEngine(model, yes, no, processor.video_token_id)
    videos, questions = _videos(lc.vlm_videos, lc, seed=0), _questions(lc)

    def prepared(frames_list):
        return [build_questions(processor, list(f), questions) for f in frames_list]

    it0 = prepared(videos[:1])[0]
    rec = {"params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3), "load_s": round(load_s, 1),
           "grid": list(it0.grid), "video_tokens": sum(t == processor.video_token_id for t in it0.prefix),
           "prefix_tokens": len(it0.prefix), "suffix_tokens_mean": round(float(np.mean([len(s) for s in it0.suffixes])), 1),
           "questions": len(questions), "frames": lc.vlm_frames, "video_size": list(lc.vlm_video_size),
           "timing_note": "preprocessing (resize, patches, tokenization) included; mp4 decoding not"}
    engine.p_yes([it0])  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        import torch
        torch.cuda.reset_peak_memory_stats()
    reused, s = _timed(device, lambda: engine.p_yes(prepared(videos)))
    rec["prefix_reuse"] = {"videos": len(videos), "wall_s": round(s, 3), "videos_per_s": round(len(videos) / s, 3),
                           **common.peak_memory(device)}
    k = max(1, min(lc.vlm_baseline_videos, len(videos)))
    plain, s = _timed(device, lambda: engine.p_yes(prepared(videos[:k]), reuse=False))
    rec["no_reuse"] = {"videos": k, "wall_s": round(s, 3), "videos_per_s": round(k / s, 3)}
    rec["max_abs_p_yes_reuse_vs_no_reuse"] = round(float(max(np.abs(a - b).max() for a, b in zip(reused, plain))), 6)
    common.guarded(rec, "hf_per_question",
                   lambda: _hf_phase(model, processor, videos[:k], questions, yes, no, device, reused[:k]))
    rate = rec["prefix_reuse"]["videos_per_s"]
    rec["gpu_share_per_t2v_gpu"] = {mode: round((1 / sec) / rate, 4) for mode, sec in T2V_SECONDS_PER_VIDEO.items()}
    hf_rate = (rec.get("hf_per_question") or {}).get("videos_per_s")
    rec["speedup_reuse_vs_hf"] = round(rate / hf_rate, 2) if hf_rate else None
    engine = model = None  # free the model before the next phase  # noqa: F841
    common.free_memory(device)
    return rec


def _hf_phase(model, processor, videos: list, questions: list, yes: list, no: list, device: str,
              reused: list) -> dict:
    import numpy as np

    _hf_per_question(model, processor, videos[0], questions[:1], yes, no, device)  # warm-up
    p, s = _timed(device, lambda: [_hf_per_question(model, processor, f, questions, yes, no, device) for f in videos])
    diff = max(float(np.abs(np.array(a) - np.array(b)).max()) for a, b in zip(p, reused))
    return {"videos": len(videos), "wall_s": round(s, 3), "videos_per_s": round(len(videos) / s, 3),
            "max_abs_p_yes_vs_prefix_reuse": round(diff, 6)}
