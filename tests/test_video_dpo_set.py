"""`vpo generate dpo video_dpo_set=true` on the tiny preset: the video model's preference set."""
from __future__ import annotations

import json
import os

import pytest

from vpo_ray import schema
from vpo_ray.config import GenerateConfig, load_config
from vpo_ray.pipeline.generate import run_generate

QUERIES = ["a cat playing piano in a jazz bar", "drone shot of waves crashing on a black sand beach",
           "an astronaut riding a horse on mars", "children building a sandcastle at sunset"]
FAST = ["sampling.max_new_tokens=12", "judge_sampling.max_new_tokens=8", "video.num_frames=9", "video.height=32",
        "video.width=32", "video.num_inference_steps=2", "video.judge_frames=2", "video_judge_stage.batch_size=4",
        "truncation=keep"]  # random weights reach the token limit: keep those rows (the tiny preset's job default)


@pytest.fixture(scope="module")
def video_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("video_set")
    queries = root / "queries.json"
    queries.write_text(json.dumps(QUERIES))
    out = str(root / "out")
    # three seeds per prompt; margin 0 so that any dominance forms a pair
    cfg = load_config(GenerateConfig, None, [f"queries={queries}", f"out={out}", "kind=dpo", "preset=tiny",
                                             "num_samples=2", "video_dpo_set=true", "video.seeds_per_prompt=3",
                                             "pair_margin=0.0", *FAST])
    return cfg, run_generate(cfg)


@pytest.fixture(scope="module")
def video_set(video_run):
    """The run's set, rebuilt by the same hook after the videos' answers are set per seed.

    The tiny judge's random weights answer every question of every video alike (which way
    depends on the build), so the run's own set may hold no pair. Seed s here answers yes
    to the first 8 - 3s questions: seed 0 dominates seed 1, which dominates seed 2.
    """
    from vpo_ray.pipeline import video_dpo_set

    cfg, summary = video_run
    path = os.path.join(cfg.out, "videos.jsonl")
    videos = [json.loads(line) for line in open(path)]
    for v in videos:
        for k, a in enumerate(v["checklist"]):
            a["answer"] = k < 8 - 3 * (v["seed"] % 1000)
    with open(path, "w") as f:
        f.writelines(json.dumps(v) + "\n" for v in videos)
    stages = dict(summary["stages"], video_dpo_set=video_dpo_set.write(cfg, videos))
    return cfg.out, dict(summary, stages=stages)


def test_the_run_writes_its_set_and_keeps_every_videos_latents(video_run):
    import pyarrow.parquet as pq

    cfg, summary = video_run
    stage = summary["stages"]["video_dpo_set"]
    table = pq.read_table(os.path.join(cfg.out, "video_dpo.parquet"))
    assert table.schema.equals(schema.arrow_schema("video_dpo"))
    assert stage["pairs"] == table.num_rows and stage["output"].endswith("video_dpo.parquet")
    assert stage["videos_without_latents"] == 0 and stage["prompts"] == 8  # 4 queries x 2 samples, all rendered


def test_video_set_is_written_with_its_schema_and_latents(video_set):
    import pyarrow.parquet as pq

    out, summary = video_set
    stage = summary["stages"]["video_dpo_set"]
    table = pq.read_table(os.path.join(out, "video_dpo.parquet"))
    assert table.schema.equals(schema.arrow_schema("video_dpo"))
    assert stage["pairs"] == table.num_rows >= 1 and stage["output"].endswith("video_dpo.parquet")
    assert stage["videos_without_latents"] == 0
    videos = [json.loads(line) for line in open(os.path.join(out, "videos.jsonl"))]
    rendered = [v for v in videos if v["video_uri"] and not v["error"]]
    assert rendered and all(os.path.exists(v["video_uri"][:-4] + ".latents.safetensors") for v in rendered)
    assert stage["prompts"] == len({(v["query_id"], v["sample_idx"]) for v in rendered if v["checklist"]})


def test_each_pair_is_two_seeds_of_one_prompt_preferred_by_the_checklist_rule(video_set):
    import pyarrow.parquet as pq

    from vpo_ray.data.checklist import load_checklist

    out, _ = video_set
    videos = {(json.loads(line)["query_id"], json.loads(line)["seed"], json.loads(line)["sample_idx"]):
              json.loads(line) for line in open(os.path.join(out, "videos.jsonl"))}
    weights = load_checklist("vpo_ray").weights()  # the run's checklist (the default)
    for row in pq.read_table(os.path.join(out, "video_dpo.parquet")).to_pylist():
        w = videos[(row["query_id"], row["chosen_seed"], row["sample_idx"])]
        l_ = videos[(row["query_id"], row["rejected_seed"], row["sample_idx"])]
        assert row["chosen_seed"] != row["rejected_seed"] and w["prompt"] == l_["prompt"] == row["prompt"]
        yes_w = {a["id"]: a["answer"] for a in w["checklist"]}
        yes_l = {a["id"]: a["answer"] for a in l_["checklist"]}
        assert all(yes_w[q] >= yes_l[q] for q in weights) and any(yes_w[q] > yes_l[q] for q in weights)
        assert row["chosen_score"] == sum(weights[q] for q in weights if yes_w[q])
        assert row["chosen_score"] > row["rejected_score"]
        assert not os.path.isabs(row["chosen_latents"]), "paths inside the run folder are stored relative to it"


def test_the_set_is_ready_for_training(video_set):
    from vpo_ray.train.video_dpo import read_pairs

    out, summary = video_set
    files, rows = read_pairs(out)
    assert len(rows) == summary["stages"]["video_dpo_set"]["pairs"]
    assert all(os.path.exists(r["chosen_latents"]) and os.path.exists(r["rejected_latents"]) for r in rows)


def test_a_tuned_video_model_is_what_the_next_round_renders_with(tiny_cache, tmp_path):
    """`vpo loop --tune video` hands round k+1 the video model of round k as `t2v=` (a dir or run folder)."""
    import shutil

    from vpo_ray.models.registry import get_spec, model_path
    from vpo_ray.pipeline.flow import resolve_models

    tuned = tmp_path / "vdpo" / "model"
    shutil.copytree(model_path(get_spec("tiny", "t2v")), tuned)
    for t2v, expected in ((None, model_path(get_spec("tiny", "t2v"))), (str(tmp_path / "vdpo"), str(tuned))):
        cfg = load_config(GenerateConfig, None, ["kind=dpo", "preset=tiny", f"t2v={t2v}" if t2v else "t2v=null"])
        assert str(resolve_models(cfg)["t2v"]) == expected
