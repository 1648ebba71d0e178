"""`vpo loop --tune optimizer|video|both`: which stages each round runs, and with which models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpo_ray.config import ConfigError
from vpo_ray.train.loop import run_loop


class Recorder:
    """Fake generate / train / video-train stages: write summary.json where the real ones would."""

    def __init__(self):
        self.calls: list[tuple] = []

    def _done(self, out: str, summary: dict) -> dict:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps(summary))
        return summary

    def generate(self, cfg):
        self.calls.append(("generate", cfg.kind, cfg.optimizer, cfg.t2v, cfg.video_dpo_set, cfg.video.seeds_per_prompt))
        return self._done(cfg.out, {"output": cfg.out})

    def train(self, cfg):
        self.calls.append(("train", cfg.method, cfg.model))
        return self._done(cfg.out, {"model": f"{cfg.out}/model"})

    def video_train(self, cfg):
        self.calls.append(("video_dpo", cfg.data, cfg.model, cfg.beta))
        return self._done(cfg.out, {"model": f"{cfg.out}/model"})


def loop(tmp_path, tune, rounds=2, overrides=()):
    rec = Recorder()
    out = tmp_path / tune
    summary = run_loop(rounds, str(tmp_path / "q.jsonl"), str(out), overrides=list(overrides), tune=tune,
                       generate_fn=rec.generate, train_fn=rec.train, video_train_fn=rec.video_train)
    return rec.calls, summary, out


def test_both_tunes_each_round_and_the_next_round_renders_with_the_tuned_video_model(tmp_path):
    calls, summary, out = loop(tmp_path, "both", overrides=["video_dpo.beta=2500"])
    r = lambda k, name: f"{out}/round_{k}/{name}"  # noqa: E731
    assert calls == [
        ("generate", "sft", None, None, False, 1), ("train", "sft", None),
        ("generate", "dpo", r(0, "sft/model"), None, True, 2),
        ("video_dpo", r(1, "dpo_data"), None, 2500.0), ("train", "dpo", r(0, "sft/model")),
        ("generate", "dpo", r(1, "dpo/model"), r(1, "video_dpo/model"), True, 2),
        ("video_dpo", r(2, "dpo_data"), r(1, "video_dpo/model"), 2500.0), ("train", "dpo", r(1, "dpo/model")),
    ]
    assert summary["optimizer"] == r(2, "dpo/model") and summary["t2v"] == r(2, "video_dpo/model")
    assert [h["round"] for h in summary["history"]] == [0, 1, 2]
    assert "video_dpo" in summary["history"][1] and "train" in summary["history"][1]


def test_video_only_keeps_the_sft_optimizer(tmp_path):
    calls, summary, out = loop(tmp_path, "video", overrides=["gen.video.seeds_per_prompt=3"])
    assert [c[0] for c in calls] == ["generate", "train", "generate", "video_dpo", "generate", "video_dpo"]
    assert all(c[2] == f"{out}/round_0/sft/model" for c in calls if c[:2] == ("generate", "dpo"))
    assert [c[5] for c in calls if c[:2] == ("generate", "dpo")] == [3, 3], "the user's seed count wins"
    assert summary["optimizer"] == f"{out}/round_0/sft/model"


def test_optimizer_rounds_stay_as_they_were_and_reruns_skip_done_stages(tmp_path):
    calls, summary, _ = loop(tmp_path, "optimizer", rounds=1)
    assert [c[:2] for c in calls] == [("generate", "sft"), ("train", "sft"), ("generate", "dpo"), ("train", "dpo")]
    assert calls[2][3:] == (None, False, 1) and summary["t2v"] is None
    again, _, _ = loop(tmp_path, "optimizer", rounds=1)
    assert again == []


def test_bad_video_settings_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="beta"):
        loop(tmp_path, "both", overrides=["video_dpo.beta=-1"])
    with pytest.raises(ConfigError, match="tune"):
        loop(tmp_path, "everything")
    assert not (tmp_path / "both").exists()
