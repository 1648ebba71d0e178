"""`vpo loop` settings: prefixed overrides and YAML sections reach the right stage.

The loop itself (SFT round, then a DPO round from the SFT export, on Ray) runs in
tests/test_train.py, where it is the ZeRO-2 SFT-then-DPO run.
"""
from __future__ import annotations

import pytest

from vpo_ray.config import ConfigError, GenerateConfig
from vpo_ray.models.registry import preset_job_defaults
from vpo_ray.train.loop import run_loop, split_overrides


def test_split_overrides_by_stage(tmp_path):
    cfg = tmp_path / "loop.yaml"
    cfg.write_text("train:\n  learning_rate: 1.0e-4\nsft:\n  max_steps: 3\ngenerate:\n  video:\n    fps: 4\n")
    values, over = split_overrides(["gen.num_samples=4", "dpo.beta=0.2", "train.num_workers=1"], str(cfg))
    assert over == {"generate": ["num_samples=4"], "train": ["num_workers=1"], "sft": [], "dpo": ["beta=0.2"],
                    "video_dpo": []}
    assert values["train"] == {"learning_rate": 1e-4} and values["sft"] == {"max_steps": 3}
    assert values["generate"] == {"video.fps": 4}
    with pytest.raises(ConfigError, match="prefix"):
        split_overrides(["max_steps=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  port: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'serve'"):
        split_overrides([], str(bad))


def test_bad_stage_setting_fails_before_any_work(tmp_path):
    calls = []
    with pytest.raises(ConfigError, match="deepspeed_stage"):
        run_loop(1, str(tmp_path / "q.jsonl"), str(tmp_path / "out"), overrides=["train.deepspeed_stage=1"],
                 generate_fn=lambda cfg: calls.append(cfg) or {"output": cfg.out},
                 train_fn=lambda cfg: calls.append(cfg) or {})
    assert calls == []  # refused before the first set was built


@pytest.mark.parametrize("override, named", [
    ("gen.video.num_frames=0", "video.num_frames"),  # a section's own check
    ("gen.num_samples=0", "num_samples"),  # a generate rule
    ("gen.judge_stage.max_actors=0", "judge_stage.max_actors"),
])
def test_bad_dpo_round_setting_fails_before_the_sft_round(tmp_path, override, named):
    calls = []
    with pytest.raises(ConfigError, match=named):
        run_loop(1, str(tmp_path / "q.jsonl"), str(tmp_path / "out"), overrides=[override],
                 generate_fn=lambda cfg: calls.append(cfg) or {"output": cfg.out},
                 train_fn=lambda cfg: calls.append(cfg) or {})
    assert calls == []


def test_preset_job_defaults_reach_every_generate_stage_and_user_settings_win(tmp_path):
    cfg = tmp_path / "loop.yaml"
    cfg.write_text("generate:\n  sampling:\n    max_new_tokens: 7\n")
    gens = []

    def run(preset, overrides=(), config_path=None):
        gens.clear()
        run_loop(1, str(tmp_path / "q.jsonl"), str(tmp_path / preset), preset=preset, overrides=list(overrides),
                 config_path=config_path, generate_fn=lambda c: gens.append(c) or {"output": c.out},
                 train_fn=lambda c: {"model": str(tmp_path / "model")})
        return gens

    tiny = preset_job_defaults("tiny")
    for g in run("tiny", ["gen.video.num_frames=5"], str(cfg)):  # the SFT set, then the DPO set
        assert g.video.num_frames == 5 and g.sampling.max_new_tokens == 7  # override, YAML
        assert g.video.height == tiny["video.height"] and g.judge_sampling.max_new_tokens == 12  # preset
    assert [g.kind for g in gens] == ["sft", "dpo"]
    assert preset_job_defaults("paper") == {}
    assert all(g.video == GenerateConfig().video for g in run("paper"))  # no defaults: the paper's


@pytest.mark.parametrize("gen, named", [
    ({"output_rows": 0, "errors": 39, "errors_by_reason": {"pairs: no preference pair (4 videos)": 39}},
     ["round 1: the dpo set in", "39 x pairs: no preference pair", "A DPO set has no pair when"]),
    ({"output_rows": 0, "errors": 0}, ["round 1: the dpo set in", "none recorded"]),
])
def test_a_round_without_rows_stops_naming_the_round_and_why(tmp_path, gen, named):
    """An empty set stops the loop before its training starts, with the round, the set and the reasons."""
    from vpo_ray.train.data import DataError
    from vpo_ray.train.loop import _trainable

    assert _trainable(str(tmp_path), 1, "dpo", {"output_rows": 3}) == str(tmp_path)
    with pytest.raises(DataError) as err:
        _trainable(str(tmp_path), 1, "dpo", gen)
    assert all(part in str(err.value) for part in named), str(err.value)
