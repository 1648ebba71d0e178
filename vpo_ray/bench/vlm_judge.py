"""The `vlm` phase of `vpo bench llm-stages`: videos judged per second by the Qwen2-VL judge.

Random weights of the real architecture; each video is `vlm_frames` frames of `vlm_video_size`
resized by the judge's own pixel bounds (registry spec) into its patch grid, and its
checklist is `vlm_questions` questions. Token ids are random in the chat layout of the real
prompt (system turn, vision start, the video's tokens, vision end, template text; then per
question 20-40 tokens of question, answer instruction and assistant header). Three ways:

  hf_per_question  the plain path: one HF forward per (video, question), full prompt, the
                   video re-encoded each time (on `vlm_baseline_videos` videos)
  no_reuse         the engine, every question from scratch (vision + whole prompt per question)
  prefix_reuse     the engine: each video encoded once, its prefix prefilled once, all its
                   questions answered in one batch

videos/s excludes frame decoding (decord, in the actor) and includes preprocessing-free model
time only. GPU share per T2V GPU = (1 / seconds per video of the T2V pool) / videos/s.
"""
from __future__ import annotations

import random
import time

from vpo_ray.bench import common

T2V_SECONDS_PER_VIDEO = {"exact": 29.9, "cached": 9.7}  # CogVideoX-2B on one H100 (benchmarks/README.md)

# TODO(helper A): use registry.random_init_from_config once configs/qwen2-vl-7b-instruct/ lands.
QWEN2_VL_7B = {
    "model_type": "qwen2_vl", "tie_word_embeddings": False,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645,
    "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                    "rms_norm_eps": 1e-06, "hidden_act": "silu", "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                    "bos_token_id": 151643, "eos_token_id": 151645},
    "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16,
                      "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}


def load_vlm(name: str, device: str, dtype: str) -> dict:
    """{model, video_token_id, vocab, pixels: (min, max)} for the tiny judge or a random-weight 7B."""
    import torch

    from vpo_ray.models import registry

    if name.startswith("tiny"):
        model, processor = registry.load_video_judge("tiny-video-judge", device=device, dtype=dtype)
        spec = registry.get_spec("tiny-video-judge")
        vocab = model.config.text_config.vocab_size
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        spec = registry.get_spec(name)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            with torch.device(device):
                torch.manual_seed(0)
                model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**QWEN2_VL_7B))
        finally:
            torch.set_default_dtype(previous)
        vocab = QWEN2_VL_7B["text_config"]["vocab_size"]
    pixels = (spec.option("min_pixels", 56 * 56), spec.option("max_pixels", 360 * 420))
    return {"model": model.eval(), "video_token_id": int(model.config.video_token_id), "vocab": vocab, "pixels": pixels}


def _items(n: int, lc, m: dict, seed: int) -> list:
    """VideoQuestions with random pixels and random text ids laid out like the real prompt."""
    import torch

    from vpo_ray.models.registry import _smart_resize
    from vpo_ray.pipeline.vlm_engine import VideoQuestions

    cfg = m["model"].config
    vc = cfg.vision_config
    h, w = _smart_resize(*lc.vlm_video_size, vc.patch_size * vc.spatial_merge_size, *m["pixels"])
    grid = (-(-lc.vlm_frames // vc.temporal_patch_size), h // vc.patch_size, w // vc.patch_size)
    n_video = grid[0] * grid[1] * grid[2] // vc.spatial_merge_size ** 2
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    rng = random.Random(seed)
    special = {cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, m["video_token_id"]}
    ordinary = [t for t in range(10, min(m["vocab"] - 1, 151000)) if t not in special]

    def text(k):
        return [rng.choice(ordinary) for _ in range(k)]

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prefix = text(20) + [cfg.vision_start_token_id] + [m["video_token_id"]] * n_video + \
            [cfg.vision_end_token_id] + text(12)
        suffixes = tuple(tuple(text(rng.randint(20, 40))) for _ in range(lc.vlm_questions))
        patches = torch.randn(grid[0] * grid[1] * grid[2], width, generator=g)
        out.append(VideoQuestions(patches=patches, grid=grid, prefix=tuple(prefix), suffixes=suffixes))
    return out


def _hf_per_question(model, item, video_token_id: int, yes: list, no: list, device: str) -> list:
    """The plain path: a full HF forward per question (video re-encoded, logits at every position)."""
    import torch
    import transformers

    out = []
    for suffix in item.suffixes:
        ids = torch.tensor([list(item.prefix) + list(suffix)], device=device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "pixel_values_videos": item.patches.to(device, next(model.parameters()).dtype),
                  "video_grid_thw": torch.tensor([list(item.grid)], device=device)}
        if int(transformers.__version__.split(".")[0]) >= 5:  # as registry.video_judge_batch_inputs
            inputs["mm_token_type_ids"] = (ids == video_token_id).to(torch.int) * 2
        with torch.inference_mode():
            probs = model(**inputs).logits[0, -1].float().softmax(-1)
        py, pn = probs[yes].sum(), probs[no].sum()
        out.append(float(py / (py + pn)))
    return out


def _timed(device: str, fn):
    common.sync(device)
    t0 = time.perf_counter()
    result = fn()
    common.sync(device)
    return result, time.perf_counter() - t0


def bench_vlm(name: str, cfg, device: str, dtype: str) -> dict:
    import numpy as np

    from vpo_ray.pipeline.vlm_engine import VideoQAEngine

    lc = cfg.llm
    common.free_memory(device)
    t0 = time.perf_counter()
    m = load_vlm(name, device, dtype)
    load_s = time.perf_counter() - t0
    yes, no = [11], [12]
    engine = VideoQAEngine(m["model"], yes, no, m["video_token_id"])
    items = _items(lc.vlm_videos, lc, m, seed=0)
    it0 = items[0]
    rec = {"params_b": round(sum(p.numel() for p in m["model"].parameters()) / 1e9, 3), "load_s": round(load_s, 1),
           "grid": list(it0.grid), "video_tokens": sum(t == m["video_token_id"] for t in it0.prefix),
           "prefix_tokens": len(it0.prefix), "suffix_tokens_mean": round(float(np.mean([len(s) for s in it0.suffixes])), 1),
           "questions": lc.vlm_questions, "frames": lc.vlm_frames, "video_size": list(lc.vlm_video_size)}
    engine.p_yes(items[:1])  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        import torch
        torch.cuda.reset_peak_memory_stats()
    reused, s = _timed(device, lambda: engine.p_yes(items))
    rec["prefix_reuse"] = {"videos": len(items), "wall_s": round(s, 3), "videos_per_s": round(len(items) / s, 3),
                           **common.peak_memory(device)}
    k = max(1, min(lc.vlm_baseline_videos, len(items)))
    plain, s = _timed(device, lambda: engine.p_yes(items[:k], reuse=False))
    rec["no_reuse"] = {"videos": k, "wall_s": round(s, 3), "videos_per_s": round(k / s, 3)}
    common.guarded(rec, "hf_per_question", lambda: _hf_phase(m, items[:k], yes, no, device, reused[:k]))
    rec["max_abs_p_yes_reuse_vs_no_reuse"] = round(float(max(np.abs(a - b).max() for a, b in zip(reused, plain))), 6)
    rate = rec["prefix_reuse"]["videos_per_s"]
    rec["gpu_share_per_t2v_gpu"] = {mode: round((1 / sec) / rate, 4) for mode, sec in T2V_SECONDS_PER_VIDEO.items()}
    rec["speedup_reuse_vs_hf"] = (round(rate / rec["hf_per_question"]["videos_per_s"], 2)
                                  if "videos_per_s" in rec.get("hf_per_question", {}) else None)
    engine = m = None  # free the model before the next phase  # noqa: F841
    common.free_memory(device)
    return rec


def _hf_phase(m: dict, items: list, yes: list, no: list, device: str, reused: list) -> dict:
    import numpy as np

    _hf_per_question(m["model"], items[0], m["video_token_id"], yes, no, device)  # warm-up
    p, s = _timed(device, lambda: [_hf_per_question(m["model"], it, m["video_token_id"], yes, no, device)
                                   for it in items])
    diff = max(float(np.abs(np.array(a) - np.array(b)).max()) for a, b in zip(p, reused))
    return {"videos": len(items), "wall_s": round(s, 3), "videos_per_s": round(len(items) / s, 3),
            "max_abs_p_yes_vs_prefix_reuse": round(diff, 6)}
