"""Model registry, tiny offline builds, loaders, Yes/No reading and the video-judge inputs."""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from vpo_ray import prompts
from vpo_ray.models import registry
from vpo_ray.models.registry import ModelLoadError, get_spec

MISSING_HUB_ID = "vpo-ray-tests/no-such-model-7b"


@pytest.fixture(scope="session")
def tiny_models(tiny_cache):
    """The four tiny roles, built once per session under VPO_CACHE."""
    return {role: registry.model_path(get_spec("tiny", role)) for role in registry.ROLES}


@pytest.fixture(scope="session")
def tiny_video(tiny_models, tmp_path_factory):
    """A clip rendered by the tiny T2V pipeline and written as mp4: (uri, frames array)."""
    import torch

    from vpo_ray.video_io import write_mp4

    spec = get_spec("tiny", "t2v")
    pipe = registry.load_t2v_pipeline(spec)
    out = pipe("a cat playing piano in a cozy living room", output_type="np",
               generator=torch.Generator().manual_seed(0), **registry.t2v_call_kwargs(spec))
    frames = out.frames[0]
    uri = str(tmp_path_factory.mktemp("videos") / "tiny.mp4")
    write_mp4(frames, uri, fps=spec.option("fps"))
    return uri, frames


# ---------------------------------------------------------------------------- registry

def test_presets_name_every_role_with_a_registered_model():
    for preset, roles in registry.PRESETS.items():
        assert set(roles) == set(registry.ROLES), preset
        for role in registry.ROLES:
            spec = get_spec(preset, role)
            assert spec.name == roles[role]
            llm = {"optimizer", "judge"}
            assert spec.role == role or {spec.role, role} <= llm, (preset, role, spec.role)
    assert get_spec("paper", "optimizer").model_id == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert get_spec("paper", "judge").model_id == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert get_spec("paper", "t2v").model_id == "THUDM/CogVideoX-2b"
    assert get_spec("paper", "video_judge").model_id == "Qwen/Qwen2-VL-7B-Instruct"
    assert get_spec("qwen", "optimizer").model_id == "Qwen/Qwen2.5-7B-Instruct"
    assert all(get_spec("tiny", r).tiny and get_spec("tiny", r).dtype == "float32" for r in registry.ROLES)


def test_t2v_entries_carry_their_generation_defaults():
    cog = get_spec("cogvideox-2b")
    assert cog.model_class == "diffusers.CogVideoXPipeline"
    assert registry.t2v_call_kwargs(cog) == {"num_frames": 49, "height": 480, "width": 720,
                                             "num_inference_steps": 50, "guidance_scale": 6.0}
    assert cog.option("fps") == 8
    wan = get_spec("wan2.1-t2v-1.3b")
    assert (wan.model_id, wan.option("num_frames"), wan.option("width"), wan.option("fps")) == \
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 81, 832, 16)
    ltx = get_spec("ltx-video")
    assert (ltx.option("num_frames") - 1) % 8 == 0 and ltx.option("height") % 32 == 0  # LTX's shape rules
    assert registry.t2v_call_kwargs(cog, num_frames=9, height=None) ["num_frames"] == 9


@pytest.mark.parametrize("args, words", [
    (("no-such-preset", "optimizer"), ["no-such-preset", "tiny", "cogvideox-2b"]),
    (("tiny", "painter"), ["painter", "video_judge"]),
    (("no-such-model",), ["no-such-model", "qwen2.5-7b-instruct"]),
    (("tiny",), ["needs a role"]),
    (("cogvideox-2b", "judge"), ["t2v model", "judge"]),
])
def test_unknown_names_raise_a_keyerror_like_model_load_error(args, words):
    with pytest.raises(ModelLoadError) as ei:
        get_spec(*args)
    assert isinstance(ei.value, KeyError)
    for w in words:
        assert w in str(ei.value)


def test_hub_id_offline_raises_model_load_error_naming_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaders = [registry.load_causal_lm, registry.load_t2v_pipeline, registry.load_video_judge,
               registry.check_config]
    for load in loaders:
        with pytest.raises(ModelLoadError) as ei:
            load(MISSING_HUB_ID)
        msg = str(ei.value)
        assert MISSING_HUB_ID in msg and "local path" in msg and "HF_HOME" in msg, (load.__name__, msg)
    # a registry entry whose weights are not cached fails the same way
    spec = dataclasses.replace(get_spec("cogvideox-2b"), model_id="vpo-ray-tests/CogVideoX-missing")
    with pytest.raises(ModelLoadError, match="vpo-ray-tests/CogVideoX-missing"):
        registry.load_t2v_pipeline(spec)


def test_missing_local_path_says_not_found(tmp_path):
    missing = str(tmp_path / "models" / "nope")
    with pytest.raises(ModelLoadError, match="not found") as ei:
        registry.load_causal_lm(missing)
    assert missing in str(ei.value)


def test_model_path_passes_model_dirs_and_hub_ids_through(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    assert registry.model_path(str(tmp_path)) == str(tmp_path)
    assert registry.model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert registry.model_path(get_spec("cogvideox-2b")) == "THUDM/CogVideoX-2b"


# ---------------------------------------------------------------------------- tiny builds

def test_tiny_preset_builds_all_roles_and_reuses_the_cache(tiny_models, tiny_cache):
    for role, path in tiny_models.items():
        p = Path(path)
        assert p.is_dir() and p.parent == tiny_cache / "tiny", (role, path)
    assert (Path(tiny_models["optimizer"]) / "model.safetensors").is_file()
    assert (Path(tiny_models["t2v"]) / "model_index.json").is_file()
    assert (Path(tiny_models["video_judge"]) / "preprocessor_config.json").is_file()
    weights = Path(tiny_models["optimizer"]) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert registry.model_path("tiny-optimizer") == tiny_models["optimizer"]
    assert weights.stat().st_mtime_ns == before  # found, not rebuilt
    assert not list((tiny_cache / "tiny").glob(".build-*"))  # no half-built leftovers


def _tensors(folder: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


@pytest.mark.parametrize("name", ["tiny-optimizer", "tiny-t2v"])
def test_tiny_builds_are_deterministic(tmp_path, name):
    from vpo_ray.models import tiny

    tiny.build(name, str(tmp_path / "a"))
    tiny.build(name, str(tmp_path / "b"))
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    tok = "tokenizer.json" if name == "tiny-optimizer" else "tokenizer/tokenizer.json"
    ta, tb = (json.loads((tmp_path / d / tok).read_text()) for d in ("a", "b"))
    assert ta["model"]["vocab"] == tb["model"]["vocab"]


def test_optimizer_and_judge_are_different_networks(tiny_models):
    a = _tensors(Path(tiny_models["optimizer"]))
    b = _tensors(Path(tiny_models["judge"]))
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_parallel_builds_share_one_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("VPO_CACHE", str(tmp_path))
    paths, errors = [], []

    def build():
        try:
            paths.append(registry.model_path("tiny-judge"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(paths)) == 1
    assert [p.name for p in (tmp_path / "tiny").iterdir() if not p.name.endswith(".lock")] == [Path(paths[0]).name]


# ---------------------------------------------------------------------------- LLM roles

def test_tiny_optimizer_generates_from_the_chat_template(tiny_models):
    import torch

    model, tok = registry.load_causal_lm("tiny-optimizer")
    assert tok.padding_side == "left" and tok.pad_token is not None and not model.training
    texts = [tok.apply_chat_template(prompts.optimizer_messages(q), tokenize=False, add_generation_prompt=True)
             for q in ("a cat", "a dog surfing a wave at sunset -ar 16:9")]
    assert texts[0].endswith("<|im_start|>assistant\n")
    assert "User Query:a cat\n" in texts[0]  # the official template: no space after the colon
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padded
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=8, do_sample=True, top_p=0.95)
    assert out.shape[0] == 2 and out.shape[1] > batch["input_ids"].shape[1]
    new = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(isinstance(t, str) for t in new)


def test_chat_template_marks_assistant_turns_for_training(tiny_models):
    _, tok = registry.load_causal_lm("tiny-optimizer", for_training=True)
    msgs = prompts.optimizer_messages("a cat") + [{"role": "assistant", "content": "A fluffy cat."}]
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = enc["assistant_masks"]
    assert sum(mask) > 0
    assistant_ids = [i for i, m in zip(enc["input_ids"], mask) if m]
    assert tok.decode(assistant_ids) == "A fluffy cat.<|im_end|>"


def test_yes_and_no_are_single_tokens(tiny_models):
    _, tok = registry.load_causal_lm("tiny-judge")
    for word in ("Yes", " Yes", "No", " No"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    yes, no = registry.yes_no_token_ids(tok)
    assert tok.encode(" Yes", add_special_tokens=False)[0] in yes
    assert tok.encode("No", add_special_tokens=False)[0] in no
    assert not set(yes) & set(no)


def test_judge_reads_yes_no_probabilities(tiny_models):
    import torch

    model, tok = registry.load_causal_lm("tiny-judge")
    text = tok.apply_chat_template(prompts.judge_messages("a cat", "A cat plays piano."), tokenize=False,
                                   add_generation_prompt=True) + "Step-by-step verification: fine.\n" \
        + prompts.JUDGE_ANSWER_PREFIX
    batch = tok([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**batch).logits
    p_yes, p_no = registry.yes_no_probs(logits, *registry.yes_no_token_ids(tok))
    assert 0 < float(p_yes) and 0 < float(p_no) and float(p_yes + p_no) <= 1


# ---------------------------------------------------------------------------- T2V

def test_tiny_t2v_renders_frames_that_round_trip_through_mp4(tiny_video):
    from vpo_ray.video_io import read_frames, video_info

    uri, frames = tiny_video
    spec = get_spec("tiny", "t2v")
    assert frames.shape == (spec.option("num_frames"), spec.option("height"), spec.option("width"), 3)
    assert frames.dtype == np.float32 and 0 <= frames.min() and frames.max() <= 1
    info = video_info(uri)
    assert info == {"frames": 9, "fps": 8.0, "height": 32, "width": 32}
    assert read_frames(uri, 4).shape == (4, 32, 32, 3)


def test_tiny_wan_pipeline_renders(tiny_cache):
    import torch

    spec = get_spec("tiny-wan")
    pipe = registry.load_t2v_pipeline(spec)
    out = pipe("a fox in the snow", output_type="np", generator=torch.Generator().manual_seed(0),
               **registry.t2v_call_kwargs(spec))
    assert out.frames.shape == (1, 9, 32, 32, 3)


def test_vae_dtype_option_loads_the_vae_separately(tiny_cache):
    import torch

    spec = dataclasses.replace(get_spec("tiny-wan"), name="wan-test", tiny=False,
                               model_id=registry.model_path("tiny-wan"), kwargs=(("vae_dtype", "float32"),))
    pipe = registry.load_t2v_pipeline(spec, dtype="bfloat16")
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32


# ---------------------------------------------------------------------------- video judge

def test_video_judge_gives_yes_no_probabilities_for_a_rendered_video(tiny_video):
    import torch

    from vpo_ray.video_io import read_frames

    uri, _ = tiny_video
    model, processor = registry.load_video_judge("tiny-video-judge")
    frames = list(read_frames(uri, 8))
    inputs = registry.video_judge_inputs(processor, frames, "Does the video show a cat?")
    n_video = int((inputs["input_ids"] == processor.video_token_id).sum())
    assert n_video == int(inputs["video_grid_thw"].prod()) // processor.image_processor.merge_size ** 2
    assert int(inputs["video_grid_thw"][0, 0]) == 4  # 8 frames / temporal patch 2
    with torch.no_grad():
        logits = model(**inputs).logits
    p_yes, p_no = registry.yes_no_probs(logits, *registry.yes_no_token_ids(processor.tokenizer))
    assert float(p_yes) > 0 and float(p_no) > 0 and float(p_yes + p_no) <= 1


def test_video_judge_batch_matches_single_items(tiny_models):
    import torch

    model, processor = registry.load_video_judge("tiny-video-judge")
    rng = np.random.RandomState(0)
    a = [rng.randint(0, 255, (32, 32, 3), np.uint8) for _ in range(8)]
    b = [rng.randint(0, 255, (48, 40, 3), np.uint8) for _ in range(5)]  # other size, odd frame count
    items = [(a, "Is it a cat?"), (b, "Is the motion in the video smooth and natural?")]
    ids = registry.yes_no_token_ids(processor.tokenizer)
    with torch.no_grad():
        single = [registry.yes_no_probs(model(**registry.video_judge_inputs(processor, f, q)).logits, *ids)[0]
                  for f, q in items]
        batch = registry.yes_no_probs(model(**registry.video_judge_batch_inputs(processor, items)).logits, *ids)[0]
    torch.testing.assert_close(batch, torch.cat(single), atol=1e-5, rtol=1e-4)


def test_video_patches_match_the_official_image_processor(tiny_models):
    import torch

    # two identical frames form one temporal patch, which is exactly how Qwen2-VL's own
    # image processor encodes a single image: the layouts must agree element for element
    _, processor = registry.load_video_judge("tiny-video-judge")
    frame = np.random.RandomState(1).randint(0, 255, (40, 60, 3), np.uint8)
    inputs = registry.video_judge_inputs(processor, [frame, frame], "Is it a cat?")
    official = processor.image_processor(images=[frame], return_tensors="pt")
    assert inputs["video_grid_thw"].tolist() == official["image_grid_thw"].tolist()
    torch.testing.assert_close(inputs["pixel_values_videos"], official["pixel_values"].float(), atol=1e-4, rtol=0)


def test_video_judge_inputs_reject_mismatched_frames(tiny_models):
    _, processor = registry.load_video_judge("tiny-video-judge")
    frames = [np.zeros((32, 32, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)]
    with pytest.raises(ValueError, match="frame 1"):
        registry.video_judge_inputs(processor, frames, "Is it a cat?")
    with pytest.raises(ValueError, match="no frames"):
        registry.video_judge_inputs(processor, [], "Is it a cat?")


# ---------------------------------------------------------------------------- random init, CLI

def test_random_init_builds_architectures_from_shipped_configs(tmp_path, monkeypatch):
    import torch

    # the real shipped configs: real sizes on the meta device (shapes, no memory)
    mods = registry.random_init_from_config("cogvideox-2b", ["transformer"], device="meta")
    n_params = sum(p.numel() for p in mods["transformer"].parameters())
    assert 1.5e9 < n_params < 2.0e9  # CogVideoX-2B's transformer has ~1.7B parameters
    # a small config through the same path, on CPU, deterministic per seed
    from vpo_ray.models import random_weights

    folder = tmp_path / random_weights.config_folder(registry.get_spec("tiny-t2v")).name
    folder.mkdir()
    cfg = json.loads((Path(registry.__file__).parent / "configs" / "tiny" / "cogvideox_transformer.json").read_text())
    (folder / "transformer.json").write_text(json.dumps(dict(cfg, _class_name="CogVideoXTransformer3DModel")))
    monkeypatch.setattr(random_weights, "CONFIG_DIR", tmp_path)
    a = registry.random_init_from_config("tiny-t2v", seed=1)["transformer"]
    b = registry.random_init_from_config("tiny-t2v", seed=1)["transformer"]
    assert type(a).__name__ == "CogVideoXTransformer3DModel"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ModelLoadError, match="vae.json"):
        registry.random_init_from_config("tiny-t2v", ["vae"])
    with pytest.raises(ModelLoadError, match="no shipped architecture config"):
        registry.random_init_from_config("tiny-wan")


def test_cli_list_build_check(tiny_models, capsys):
    from vpo_ray.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "paper" in out and "THUDM/CogVideoX-2b" in out and "tiny-video-judge" in out
    assert main(["models", "build", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert tiny_models["t2v"] in out and "tiny-judge" in out
    assert main(["models", "check", "tiny-t2v"]) == 0
    assert "CogVideoXPipeline" in capsys.readouterr().out
    assert main(["models", "check", MISSING_HUB_ID]) == 1
    assert MISSING_HUB_ID in capsys.readouterr().err
    assert main(["models", "build", "--preset", "nope"]) == 2
