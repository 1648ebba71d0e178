"""Video Diffusion-DPO pieces without Ray: latents kept by the renderer, the loss against a hand
computation on the tiny CogVideoX, the data order, the set's checks and the config."""
from __future__ import annotations

import math

import pytest

from video_dpo_helpers import write_video_set
from vpo_ray.config import ConfigError, VideoConfig, load_config
from vpo_ray.train.data import DataError
from vpo_ray.train.video_dpo_config import VideoDPOConfig

TINY_VIDEO = dict(num_frames=9, height=32, width=32, num_inference_steps=2)


@pytest.fixture(scope="module")
def tiny_t2v(tiny_cache):
    from vpo_ray.models.registry import get_spec, model_path

    return model_path(get_spec("tiny", "t2v"))


@pytest.fixture(scope="module")
def pipe(tiny_t2v):
    from vpo_ray.models.registry import load_t2v_pipeline

    return load_t2v_pipeline(tiny_t2v, "cpu")


def test_renderer_keeps_the_latents_the_video_was_decoded_from(tiny_t2v, tmp_path):
    """The saved latents are the video: decoding them gives the rendered frames exactly."""
    import numpy as np
    import torch

    from vpo_ray.pipeline.t2v import T2VRenderer, decode_latents, frames_to_uint8, latents_header, latents_uri, \
        load_latents

    r = T2VRenderer(tiny_t2v, VideoConfig(**TINY_VIDEO, keep_latents=True), out_root=str(tmp_path))
    row = {"query_id": ["q1"], "sample_idx": [0], "prompt": ["a cat playing piano"], "negative_prompt": [""],
           "seed": [7], "aspect_ratio": [""]}
    out = r(row)
    assert out["error"] == [""]
    lat_uri = latents_uri(out["video_uri"][0])
    assert lat_uri.endswith("q1_0_7.latents.safetensors")
    shape, meta = latents_header(lat_uri)
    assert shape == [3, 4, 4, 4] and meta["layout"] == "FCHW" and meta["seed"] == "7"
    with torch.inference_mode():
        frames = frames_to_uint8(decode_latents(r.pipe, load_latents(lat_uri)[None]))
    direct = r.render("a cat playing piano", seed=7)["frames"]
    assert np.array_equal(frames, direct)
    # an mp4 rendered before latents were kept is rendered again, not skipped
    (tmp_path / "videos" / "q1_0_7.latents.safetensors").unlink()
    assert r(row)["error"] == [""] and (tmp_path / "videos" / "q1_0_7.latents.safetensors").exists()


def test_diffusion_dpo_loss_matches_a_hand_computation(pipe):
    """pair_loss on the tiny CogVideoX (a policy that differs from its reference) against the formulas:
    x_t = sqrt(a) x0 + sqrt(1-a) e, v = sqrt(a) e - sqrt(1-a) x0 (a = alphas_cumprod[t]),
    inside = -beta/2 ((|m_w - v_w|^2 - |m_l - v_l|^2) - (|r_w - v_w|^2 - |r_l - v_l|^2)), loss = log(1 + e^-inside)."""
    import copy

    import torch
    from diffusers import CogVideoXDDIMScheduler

    from vpo_ray.train.video_dpo_loss import pair_loss, predict

    sched = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)
    policy, ref = pipe.transformer, copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(0)
    x_w, x_l = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)
    embeds = torch.randn(2, 226, 32, generator=g)
    t = torch.tensor([10, 700])
    beta = 50.0
    with torch.no_grad():
        got = pair_loss(lambda *a: predict(policy, *a), lambda *a: predict(ref, *a), sched, x_w, x_l, embeds,
                        torch.Generator().manual_seed(5), beta, timesteps=t)
    noise = torch.randn(x_w.shape, generator=torch.Generator().manual_seed(5))  # the same draw
    expected = []
    for k in range(2):
        a = float(sched.alphas_cumprod[t[k]])
        errs = {}
        for name, x0 in (("w", x_w[k]), ("l", x_l[k])):
            xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise[k]
            v = math.sqrt(a) * noise[k] - math.sqrt(1 - a) * x0
            for who, model in (("m", policy), ("r", ref)):
                with torch.no_grad():
                    out = model(hidden_states=xt[None], encoder_hidden_states=embeds[k:k + 1],
                                timestep=t[k:k + 1], return_dict=False)[0][0]
                errs[who + name] = float(((out - v) ** 2).mean())
        inside = -beta / 2 * ((errs["mw"] - errs["ml"]) - (errs["rw"] - errs["rl"]))
        expected.append((inside, math.log1p(math.exp(-inside))))
    assert got["margin"].tolist() == pytest.approx([e[0] for e in expected], rel=1e-4, abs=1e-6)
    assert float(got["loss"]) == pytest.approx(sum(e[1] for e in expected) / 2, rel=1e-4)
    assert any(abs(e[0]) > 1e-3 for e in expected), "policy and reference must differ for the check to bite"


def test_every_epoch_visits_every_pair_once_across_ranks_and_micro_steps():
    from vpo_ray.train.video_dpo_worker import pair_indices

    n, world, batch, acc = 10, 2, 1, 5  # one optimizer step = 10 pairs = one epoch
    for step in (0, 1):
        seen = [i for m in range(acc) for r in range(world)
                for i in pair_indices(n, 0, step, m, r, world, batch, acc)]
        assert sorted(seen) == list(range(n))
    assert pair_indices(n, 0, 1, 0, 0, world, batch, acc) == pair_indices(n, 0, 1, 0, 0, world, batch, acc)
    assert [pair_indices(n, 0, 0, m, 0, world, batch, acc) for m in range(acc)] != \
        [pair_indices(n, 1, 0, m, 0, world, batch, acc) for m in range(acc)], "the seed orders the pairs"


def test_video_set_is_checked_row_by_row(tmp_path):
    from vpo_ray.train.video_dpo import read_pairs

    small, big = (3, 4, 4, 4), (3, 4, 4, 6)
    write_video_set(tmp_path, [(small, small), (big, big)])
    files, rows = read_pairs(str(tmp_path))  # a generate folder: finds video_dpo.parquet
    assert files == [str(tmp_path / "video_dpo.parquet")]
    assert rows[1]["chosen_latents"] == str(tmp_path / "videos/q1_0_0.latents.safetensors")
    with pytest.raises(DataError, match="row 1: latents shape .* differs from row 0"):
        read_pairs(str(tmp_path), same_shape=True)
    write_video_set(tmp_path, [(small, small), (small, big)])
    with pytest.raises(DataError, match="video_dpo.parquet row 1: latents of different shapes"):
        read_pairs(str(tmp_path))
    (tmp_path / "videos" / "q0_0_1.latents.safetensors").unlink()
    with pytest.raises(DataError, match="row 0: field 'rejected_latents'.*not a readable latents file"):
        read_pairs(str(tmp_path))
    with pytest.raises(DataError, match="no video_dpo.parquet"):
        read_pairs(str(tmp_path / "videos"))


def test_config_names_bad_keys_and_states_learning_rates():
    assert VideoDPOConfig().beta == 5000.0 and VideoDPOConfig().timestep_sampling == "uniform"
    assert VideoDPOConfig(lora=True).lr == 1e-4 and VideoDPOConfig(lora=False).lr == 6e-6
    assert VideoDPOConfig(learning_rate=3e-5).lr == 3e-5
    for bad, key in (("beta=0", "beta"), ("deepspeed_stage=1", "deepspeed_stage"),
                     ("timestep_sampling=cosine", "timestep_sampling"), ("precision=fp16", "precision"),
                     ("per_device_batch_size=0", "per_device_batch_size"), ("lora_rank=8", "lora_rank")):
        with pytest.raises(ConfigError, match=key):
            load_config(VideoDPOConfig, None, [bad])


def test_generate_config_refuses_a_video_set_it_cannot_build():
    from vpo_ray.config import GenerateConfig
    from vpo_ray.pipeline import video_dpo_set

    on = load_config(GenerateConfig, None, ["kind=dpo", "video_dpo_set=true", "video.seeds_per_prompt=2"])
    assert video_dpo_set.configure(on).video.keep_latents is True
    with pytest.raises(ConfigError, match="seeds_per_prompt must be >= 2"):
        video_dpo_set.configure(load_config(GenerateConfig, None, ["kind=dpo", "video_dpo_set=true"]))
    with pytest.raises(ConfigError, match="kind=dpo"):
        video_dpo_set.configure(load_config(GenerateConfig, None, ["kind=sft", "video_dpo_set=true",
                                                                    "video.seeds_per_prompt=2"]))


def test_random_weight_base_trains_without_an_export_only(tmp_path):
    from vpo_ray.train.video_dpo import resolve_model, train_video_dpo

    assert resolve_model(VideoDPOConfig(weights="random")) == "random:tiny-t2v"
    assert resolve_model(VideoDPOConfig(weights="random", model="cogvideox-2b")) == "random:cogvideox-2b"
    with pytest.raises(ConfigError, match="weights"):
        load_config(VideoDPOConfig, None, ["weights=fake"])
    write_video_set(tmp_path / "set", [((3, 4, 4, 4), (3, 4, 4, 4))])
    with pytest.raises(ConfigError, match="export: the base random:tiny-t2v has random weights"):
        train_video_dpo(VideoDPOConfig(data=str(tmp_path / "set"), out=str(tmp_path / "out"), weights="random"))
    assert not (tmp_path / "out").exists(), "refused before anything was written"
