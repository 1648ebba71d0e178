"""weights=random: real-size architectures, stand-in tokenizers, and the output model rows end by."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vpo_ray.config import GenerateConfig, RandomOutputsConfig, load_config
from vpo_ray.models import random_weights, registry, stand_in


@pytest.mark.parametrize("name, billions", [
    ("llama3-8b-instruct", 8.03), ("qwen2.5-7b-instruct", 7.62),
    ("qwen2-vl-7b-instruct", 8.29), ("qwen2.5-vl-7b-instruct", 8.29),  # the published parameter counts
])
def test_every_preset_llm_and_vlm_builds_at_its_published_size(name, billions):
    model = registry.random_init_from_config(name, ["model"], device="meta")["model"]
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    assert next(model.parameters()).dtype.is_floating_point


def test_every_model_a_preset_names_has_an_architecture():
    for preset in ("paper", "qwen", "wan"):
        for role in registry.ROLES:
            spec = registry.get_spec(preset, role)
            assert random_weights.config_folder(spec).is_dir(), f"{preset}/{role}: {spec.name}"


def test_stand_in_tokenizer_has_the_real_vocabulary_and_realistic_lengths():
    from vpo_ray import prompts

    tok = stand_in.chat_tokenizer(128256)  # Llama 3's vocabulary
    assert len(tok) == 128256
    assert all(len(tok.encode(w, add_special_tokens=False)) == 1 for w in ("Yes", " Yes", "No", " No"))
    template = prompts.OPTIMIZER_TEMPLATE + prompts.JUDGE_TEMPLATE + prompts.REFINE_TEMPLATE
    per_word = len(tok.encode(template, add_special_tokens=False)) / len(template.split())
    assert 1.2 <= per_word <= 1.6  # a 100k+ BPE takes ~1.3 tokens per word of English prose
    ids = np.random.default_rng(0).integers(16, len(tok), 200).tolist()  # what a random model samples
    again = tok.encode(tok.decode(ids, skip_special_tokens=True), add_special_tokens=False)
    assert abs(len(again) - 200) <= 10, "a random rewrite keeps its length when the judge reads it"


def test_output_lengths_are_seeded_per_row_and_follow_the_configured_distribution():
    outputs = RandomOutputsConfig(rewrite_tokens=150, length_spread=0.25)
    seeds = list(range(2000))
    lengths = random_weights.draw_lengths(outputs, "rewrite", seeds, cap=256)
    assert lengths == random_weights.draw_lengths(outputs, "rewrite", seeds, cap=256)
    assert lengths[:5] == random_weights.draw_lengths(outputs, "rewrite", seeds[:5], cap=256), "row, not batch"
    assert 140 <= np.mean(lengths) <= 160 and 30 <= np.std(lengths) <= 45
    assert min(lengths) >= outputs.min_tokens and max(lengths) <= 255  # below the cap: a natural stop
    assert max(random_weights.draw_lengths(outputs, "critique", seeds[:50], cap=64)) == 63
    with pytest.raises(ValueError, match="no output length for stage"):
        random_weights.draw_lengths(outputs, "summary", seeds, cap=256)


def test_verdicts_and_checklist_answers_fall_at_the_configured_rates():
    outputs = RandomOutputsConfig(judge_pass_rate=0.3, checklist_yes_rate=0.8)
    passes = [random_weights.judge_passes(outputs, s) for s in range(4000)]
    assert 0.27 <= np.mean(passes) <= 0.33
    items = [{"id": f"q{i}", "answer": False, "p_yes": 0.5} for i in range(8)]
    answers = [a for v in range(500) for a in random_weights.checklist_answers(outputs, ("qid", v, 0), items)]
    assert 0.77 <= np.mean([a["answer"] for a in answers]) <= 0.83
    assert all((a["p_yes"] >= 0.5) == a["answer"] for a in answers), "scores agree with answers"


def test_model_refs_follow_the_weights_setting(tiny_cache):
    assert registry.model_ref("paper", "optimizer") == "meta-llama/Meta-Llama-3-8B-Instruct"
    ref = registry.model_ref("paper", "video_judge", "random", RandomOutputsConfig(judge_pass_rate=0.2))
    assert ref == random_weights.RandomModel("qwen2-vl-7b-instruct", RandomOutputsConfig(judge_pass_rate=0.2))
    assert str(ref) == "random:qwen2-vl-7b-instruct" and registry.model_path(ref) == str(ref)
    # the tiny preset's video pipeline has random weights already: it stays as built
    assert registry.model_ref("tiny", "t2v", "random") == registry.model_path(registry.get_spec("tiny", "t2v"))


def test_a_random_llm_ends_its_rows_at_the_drawn_lengths(tiny_cache):
    from vpo_ray.config import SamplingConfig
    from vpo_ray.pipeline.llm import LLMEngine

    engine = LLMEngine(random_weights.RandomModel("tiny-optimizer"), device="cpu")
    assert len(engine.tok) == engine.model.config.vocab_size == 4096  # the tiny architecture's stand-in
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0)
    seeds = [3, 4, 5]
    extra = random_weights.stage_lengths(engine, "rewrite", seeds, sampling.max_new_tokens)
    out = engine.generate([[{"role": "user", "content": q}] for q in ("a cat", "a dog", "rain")], seeds, sampling,
                          **extra)
    assert [c.n_tokens for c in out] == extra["forced_lengths"] == [39, 39, 39]  # mean 150, below the cap of 40
    assert {c.finish_reason for c in out} == {"stop"} and all(c.text for c in out)


def test_one_pool_rewrites_and_judges_when_both_are_one_model(tiny_cache):
    from vpo_ray.pipeline import flow

    cfg = load_config(GenerateConfig, None, ["kind=dpo", "preset=paper", "weights=random"])
    models = flow.resolve_models(cfg)
    assert [r.name for r in flow.pool_requests(cfg, models)] == ["llm", "t2v", "video_judge"]
    separate = load_config(GenerateConfig, None, ["kind=dpo", "preset=paper", "placement.share_llm=false"])
    assert [r.name for r in flow.pool_requests(separate, flow.resolve_models(separate))][:2] == ["rewrite", "judge"]
    # the shared actor on the tiny models: one engine for both stages, rows come out judged
    tiny = registry.model_path(registry.get_spec("tiny", "judge"))
    stage = flow.RewriteAndJudge(rewrite=dict(model=tiny, num_samples=2, sampling={"max_new_tokens": 8}),
                                 judge=dict(model=tiny, sampling={"max_new_tokens": 6}, endpoint={}, refine=True))
    assert stage.rewriter.backend.engine is stage.critic.backend.engine
    batch = {"query_id": np.array(["q1"], dtype=object), "query": np.array(["a fox in the snow"], dtype=object),
             "text": np.array(["a fox in the snow"], dtype=object),
             "error": np.array([""], dtype=object), "error_stage": np.array([""], dtype=object)}
    cands = json.loads(stage(batch)["candidates_json"][0])
    assert len(cands) == 2 and all(c.get("judge") or c.get("error") for c in cands)


def test_a_random_video_pipeline_renders_with_its_text_encoder(tiny_cache, tmp_path):
    """The whole pipeline, T5 encoder and stand-in tokenizer included (the tiny architecture; real ones on GPU)."""
    from vpo_ray.config import VideoConfig
    from vpo_ray.pipeline.t2v import T2VRenderer

    r = T2VRenderer(random_weights.RandomModel("tiny-t2v"), VideoConfig(num_frames=9, height=32, width=32,
                                                                     num_inference_steps=2), out_root=str(tmp_path))
    assert type(r.pipe.text_encoder).__name__ == "T5EncoderModel" and len(r.pipe.tokenizer) == 1024
    out = r({"query_id": ["q"], "sample_idx": [0], "prompt": ["a red kite over the sea"], "negative_prompt": [""],
             "seed": [1], "aspect_ratio": [""]})
    assert out["error"] == [""] and out["frames"] == [9] and out["model"] == ["random:tiny-t2v"]
