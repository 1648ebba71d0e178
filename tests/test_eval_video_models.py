"""`vpo eval` across T2V models (original / VPO / video-DPO / both) with a second judge as a
reward-hacking guard, on the tiny preset."""
from __future__ import annotations

import json
import shutil

import pytest

from vpo_ray.config import ConfigError, EvalConfig, load_config

QUERIES = ["a cat playing piano in a jazz bar", "a red sports car drifting around a mountain corner"]
FAST = ["sampling.max_new_tokens=12", "judge_sampling.max_new_tokens=6", "video.num_frames=5", "video.height=32",
        "video.width=32", "video.num_inference_steps=2", "video.judge_frames=2", "bootstrap=100",
        "video.seeds_per_prompt=2",
        "truncation=keep"]  # random weights reach the token limit: keep those rows (the tiny preset's job default)


@pytest.fixture(scope="module")
def tuned_t2v(tiny_cache, tmp_path_factory):
    """A stand-in for a `vpo train video-dpo` out dir: the tiny pipeline with its transformer moved."""
    import torch
    from diffusers import CogVideoXPipeline

    from vpo_ray.models.registry import get_spec, model_path

    out = tmp_path_factory.mktemp("vdpo")
    pipe = CogVideoXPipeline.from_pretrained(model_path(get_spec("tiny", "t2v")))
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    pipe.save_pretrained(out / "model")
    return out


@pytest.fixture(scope="module")
def eval_run(ray_session, tuned_t2v, tmp_path_factory):
    from vpo_ray.eval.run import run_eval
    from vpo_ray.models.registry import get_spec, model_path

    root = tmp_path_factory.mktemp("eval_models")
    qfile = root / "queries.json"
    qfile.write_text(json.dumps(QUERIES))
    vpo = model_path(get_spec("tiny", "optimizer"))  # any causal LM dir stands in for the VPO optimizer
    cfg = load_config(EvalConfig, None, [f"queries={qfile}", f"out={root / 'out'}", "preset=tiny",
                                         f"sources=[original,vpo={vpo}]", f"t2v_models=[vdpo={tuned_t2v}]",
                                         "holdout_judge=tiny-video-judge-2", *FAST])
    return root / "out", run_eval(cfg)


def test_four_rows_original_vpo_video_dpo_and_both(eval_run):
    out, result = eval_run
    assert list(result["metrics"]) == ["original", "vpo", "original+vdpo", "vpo+vdpo"]
    assert result["t2v_models"]["vdpo"].endswith("model")
    md = (out / "table.md").read_text()
    for row in ("original", "vpo", "original+vdpo", "vpo+vdpo"):
        assert md.count(f"\n| {row} |") == 1, row
    assert "2nd judge score" in md and "2nd judge win" in md


def test_same_prompts_and_seeds_across_models(eval_run):
    out, _ = eval_run
    videos = [json.loads(line) for line in open(out / "videos.jsonl")]
    by = {(v["source"], v["query_id"], v["seed"]): v for v in videos}
    for (source, qid, seed), v in by.items():
        if "+" in source:
            base = by[(source.split("+")[0], qid, seed)]
            assert base["prompt"] == v["prompt"], "the tuned model renders the same prompt"
            assert base["video_uri"] != v["video_uri"], "each model renders its own video"
    keys = {(qid, seed) for (_, qid, seed) in by}
    assert all((s, qid, seed) in by for s in ("original", "vpo", "original+vdpo", "vpo+vdpo") for qid, seed in keys)
    assert len({seed for (_, _, seed) in by}) == 2


def test_second_judge_scores_every_video_and_guards_win_rates(eval_run):
    out, result = eval_run
    videos = [json.loads(line) for line in open(out / "videos.jsonl")]
    judged = [v for v in videos if not v["error"]]
    assert judged and all(len(v["holdout_checklist"]) == len(v["checklist"]) == 8 for v in judged)
    assert any(v["holdout_score"] != v["score"] for v in judged), "the second judge is another model"
    for name, entry in result["metrics"].items():
        assert entry["holdout"]["videos"] == entry["video"]["videos"]
        assert ("win_rate" in entry["holdout"]) == (name != "original")
    assert set(result["guard"]) == {"vpo", "original+vdpo", "vpo+vdpo"}


@pytest.mark.parametrize("second_judge_agrees, suspect", [(True, False), (False, True)])
def test_a_gain_only_the_training_judge_sees_is_flagged(second_judge_agrees, suspect):
    from vpo_ray.data.checklist import load_checklist
    from vpo_ray.eval import metrics as M
    from vpo_ray.eval.video_models import add_holdout_metrics

    checklist = load_checklist("vpo_ray").as_dicts()
    answers = [{"id": c["id"], "answer": True, "p_yes": 0.9} for c in checklist]
    videos = []
    for q in range(12):
        for source, train, held in (("original", 3.0, 5.0), ("tuned", 6.0, 6.0 if second_judge_agrees else 4.0)):
            videos.append({"source": source, "query_id": f"q{q}", "seed": 0, "score": train + q / 100,
                           "checklist": answers, "error": "", "holdout_score": held + q / 100,
                           "holdout_checklist": answers, "holdout_error": ""})
    cfg = load_config(EvalConfig, None, ["holdout_judge=tiny-video-judge-2", "bootstrap=200"])
    base = {(v["query_id"], v["seed"]): v["score"] for v in videos if v["source"] == "original"}
    metrics = {s: {"video": M.video_metrics([v for v in videos if v["source"] == s], checklist, n_boot=200,
                                            baseline=None if s == "original" else base)} for s in ("original", "tuned")}
    guard = add_holdout_metrics(metrics, videos, cfg, checklist)
    assert guard == {"tuned": {"training_judge_win": 100.0, "second_judge_win": 100.0 if second_judge_agrees else 0.0,
                               "suspect": suspect}}
    assert metrics["tuned"]["holdout"]["score"]["value"] == pytest.approx(6.055 if second_judge_agrees else 4.055)


def test_bad_t2v_models_name_the_problem(tuned_t2v, tmp_path):
    from vpo_ray.eval.video_models import parse_t2v_models

    assert [m.name for m in parse_t2v_models((f"vdpo={tuned_t2v}",), "tiny-t2v", ["original"])] == ["", "vdpo"]
    for spec, match in ((f"original={tuned_t2v}", "used twice"), ("vdpo", "name=path"),
                        (f"vdpo={tmp_path / 'missing'}", "neither a diffusers pipeline dir")):
        with pytest.raises(ConfigError, match=match):
            parse_t2v_models((spec,), "tiny-t2v", ["original"])
    shutil.rmtree(tmp_path, ignore_errors=True)
