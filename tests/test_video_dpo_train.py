"""`vpo train video-dpo` on Ray Train (2 CPU workers, DeepSpeed): the tiny CogVideoX learns its
pairs' preference, a killed worker's run ends where an undisturbed one ends, the export loads
with from_pretrained and renders. Ray Train runs cost minutes on a 2-core box: each is made
once per module and several tests read it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from video_dpo_helpers import write_video_set
from vpo_ray.config import load_config
from vpo_ray.train.video_dpo_config import VideoDPOConfig

pytestmark = pytest.mark.slow

SHAPE = (3, 4, 4, 4)  # latents of the tiny preset's 9x32x32 clip: frames, channels, height, width
# The sources' rates (LoRA 1e-4, full 6e-6) are for real models and thousands of steps; a random
# tiny model must move in a handful.
FAST = dict(num_workers=2, max_steps=4, save_steps=2, gradient_accumulation_steps=1, lora_r=4, lora_alpha=4,
            learning_rate=1e-3)


def train(data: Path, out: Path, **fields) -> dict:
    from vpo_ray.train.video_dpo import train_video_dpo

    cfg = load_config(VideoDPOConfig, None, [], data=str(data), out=str(out), **{**FAST, **fields})
    return train_video_dpo(cfg)


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("video_dpo")
    write_video_set(root / "set", [(SHAPE, SHAPE)] * 4)
    clean = train(root / "set", root / "clean")
    return root, clean


def steps(out: Path) -> list[dict]:
    from vpo_ray.train.metrics import read_steps

    return read_steps(str(out / "metrics.jsonl"))


def margins_on_training_pairs(model_dir: str, base_dir: str, data: Path, draws: int = 4):
    """Implicit reward margins of the tuned transformer against the base on the set's pairs, over
    fixed draws of timestep and noise (the same for both models)."""
    import torch
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    from vpo_ray.train.video_dpo import read_pairs
    from vpo_ray.train.video_dpo_loss import pair_loss, predict
    from vpo_ray.train.video_dpo_worker import load_pair_batch, prompt_embeddings

    base, tuned = CogVideoXPipeline.from_pretrained(base_dir), CogVideoXPipeline.from_pretrained(model_dir)
    scheduler = CogVideoXDDIMScheduler.from_config(base.scheduler.config)
    _, rows = read_pairs(str(data))
    chosen, rejected, prompts = load_pair_batch(rows, list(range(len(rows))), "cpu")
    embeds = prompt_embeddings(base, prompts, "cpu", torch.float32)
    out = []
    for k in range(draws):
        with torch.no_grad():
            got = pair_loss(lambda *a: predict(tuned.transformer, *a), lambda *a: predict(base.transformer, *a),
                            scheduler, chosen, rejected, embeds, torch.Generator().manual_seed(1000 + k), 5000.0)
        out.append(got["margin"])
    return torch.stack(out)


def test_training_moves_the_implicit_reward_margin_toward_the_chosen_videos(runs):
    root, clean = runs
    assert clean["global_step"] == 4 and clean["pairs"] == 4
    logged = steps(root / "clean")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6), "policy == reference at the start"
    assert logged[-1]["rewards/margins"] > 0 and logged[-1]["loss"] < logged[0]["loss"]
    m = margins_on_training_pairs(clean["model"], clean["base_model"], root / "set")
    assert float(m.mean()) > 0 and float((m > 0).float().mean()) > 0.5  # at the base model: exactly 0
    assert (root / "clean" / "loss.png").stat().st_size > 0


def test_killed_worker_resumes_and_ends_where_an_undisturbed_run_ends(runs, monkeypatch):
    """The last worker dies at step 3 (the shared VPO_FAULTS hook, as in every other drill); the group
    restarts from checkpoint 2 and ends bit-identical."""
    from safetensors.torch import load_file

    from vpo_ray import faults

    root, clean = runs
    monkeypatch.setenv(faults.ENV, "train_step:exit,step=3,rank=last,times=1")
    monkeypatch.setenv(faults.DIR_ENV, str(root / "fired"))
    faulty = train(root / "set", root / "faulty", max_failures=1)
    fired = faults.fired(str(root / "fired"))
    assert [(f["point"], f["action"], f["step"], f["rank"]) for f in fired] == [("train_step", "exit", 3, 1)]
    assert faulty["resumed_from"].endswith("checkpoint_00000002"), "the restart resumed, it did not start over"
    a = load_file(root / "clean" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(root / "faulty" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for x, y in zip(steps(root / "clean"), steps(root / "faulty")):
        assert x["loss"] == y["loss"] and x["rewards/margins"] == y["rewards/margins"], x["step"]


def test_export_loads_with_from_pretrained_renders_and_holds_the_lora(runs, tmp_path):
    import numpy as np
    import torch
    from diffusers import CogVideoXPipeline

    root, clean = runs
    pipe = CogVideoXPipeline.from_pretrained(clean["model"])
    frames = pipe("a cat playing piano", num_frames=9, height=32, width=32, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    assert frames.shape == (9, 32, 32, 3) and np.isfinite(frames).all()
    base = CogVideoXPipeline.from_pretrained(clean["base_model"])
    tuned_sd, base_sd = pipe.transformer.state_dict(), base.transformer.state_dict()
    assert tuned_sd.keys() == base_sd.keys()
    assert any(not torch.equal(tuned_sd[k], base_sd[k]) for k in base_sd), "training changed no weight"
    base.load_lora_weights(clean["lora"])  # the adapter alone, as users load a LoRA
    base.fuse_lora()
    base.unload_lora_weights()  # plain layers holding the fused weights
    fused = base.transformer.state_dict()
    assert fused.keys() == tuned_sd.keys()
    assert all(torch.allclose(fused[k], v, atol=1e-6) for k, v in tuned_sd.items())
    summary = json.loads((root / "clean" / "summary.json").read_text())
    assert summary["lora"] and summary["beta"] == 5000.0 and summary["learning_rate"] == 1e-3


def test_full_fine_tune_with_zero3(runs):
    """Every transformer weight trained under ZeRO-3 (sharded), gathered for the export."""
    import torch
    from diffusers import CogVideoXPipeline

    root, clean = runs
    full = train(root / "set", root / "full", lora=False, deepspeed_stage=3, max_steps=2, learning_rate=1e-4)
    assert full["global_step"] == 2 and full["lora"] is None
    tuned = CogVideoXPipeline.from_pretrained(full["model"]).transformer.state_dict()
    base = CogVideoXPipeline.from_pretrained(clean["base_model"]).transformer.state_dict()
    changed = [k for k in base if not torch.equal(tuned[k], base[k])]
    assert len(changed) > len(base) // 2, "a full fine-tune moves most weights"
    assert steps(root / "full")[-1]["rewards/margins"] > 0
