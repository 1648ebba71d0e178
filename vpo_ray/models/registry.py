"""The one model registry: every model id, class and preset, and the loaders.

A model is a `ModelSpec`: a Hugging Face id (or local path) plus the class that loads
it and its default options. Presets map each role (optimizer, judge, t2v, video_judge)
to a spec. The `tiny` preset names random-weight models of the same classes that
`vpo_ray.models.tiny` builds offline; `model_path` builds them once into $VPO_CACHE.

Loaders never download when HF_HUB_OFFLINE=1: a hub id that is not in the local cache
raises `ModelLoadError` naming the id and saying how to give a local path instead.
Anywhere a model is accepted, a registry name ("cogvideox-2b"), a local directory or a
hub id works. `weights=random` (every job): `model_ref(preset, role, "random")` gives a
`random_weights.RandomModel` that the same loaders build at real size with random weights
from vpo_ray/models/configs/<name>/ (random_weights.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from vpo_ray.models import random_weights, tiny
from vpo_ray.models.hub import (ModelLoadError, UnknownModelError, _diffusers_dtype_kw, _hub_kwargs,  # noqa: F401
                                _import, _load_error, _looks_local, _torch_dtype, _transformers_dtype_kw,
                                _trust_remote_code, _truthy, offline)
from vpo_ray.models.tiny import cache_root  # noqa: F401 (where tiny models are built; `vpo models list` shows it)

ROLES = ("optimizer", "judge", "t2v", "video_judge")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry key, e.g. "qwen2.5-7b-instruct", "cogvideox-2b", "tiny-optimizer"
    role: str  # one of ROLES
    model_id: str  # Hugging Face id or local path
    model_class: str  # dotted class used to load, e.g. "diffusers.CogVideoXPipeline"
    dtype: str = "bfloat16"  # torch dtype name; tiny uses float32
    num_gpus: float = 1.0  # placement hint per actor
    tiny: bool = False  # built offline by vpo_ray.models.tiny
    # Extra (key, value) pairs. T2V: generation defaults (T2V_CALL_KEYS go to the pipeline
    # call, `fps` to write_mp4) and load options (vae_dtype, vae_tiling, vae_slicing).
    # Video judge: min_pixels / max_pixels per frame for the image processor. Any:
    # arch_config, the configs/ folder weights=random builds from (default: the name);
    # gpu_gib, one actor's peak GPU memory, which placement plans with.
    kwargs: tuple = ()

    @property
    def options(self) -> dict:
        return dict(self.kwargs)

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


# Keys of a T2V spec's kwargs that are arguments of the diffusers pipeline call.
T2V_CALL_KEYS = ("num_frames", "height", "width", "num_inference_steps", "guidance_scale",
                 "negative_prompt", "max_sequence_length")


def t2v_call_kwargs(spec: ModelSpec, **overrides: Any) -> dict:
    """The pipeline-call defaults of a T2V spec, updated with non-None `overrides`."""
    out = {k: v for k, v in spec.kwargs if k in T2V_CALL_KEYS}
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out


def _t2v(num_frames: int, height: int, width: int, steps: int, cfg: float, fps: int, **extra: Any) -> tuple:
    return (("num_frames", num_frames), ("height", height), ("width", width), ("num_inference_steps", steps),
            ("guidance_scale", cfg), ("fps", fps)) + tuple(extra.items())


_LTX_NEGATIVE = "worst quality, inconsistent motion, blurry, jittery, distorted"
# qwen-vl-utils caps video frames at 768*28*28 pixels; 360*420 keeps 8 sampled frames
# under ~800 visual tokens, enough for checklist questions.
_VIDEO_JUDGE_PIXELS = (("min_pixels", 56 * 56), ("max_pixels", 360 * 420), ("gpu_gib", 18.0))
# gpu_gib (GiB, what placement plans with; docs/PLACEMENT.md): LLM/VLM = bf16 weights (8.0B / 7.6B /
# 8.3B params) + ~3-4 GiB of KV cache and activations for a batch of 32 rows. T2V = the peak
# allocated by one video in benchmarks/README.md (untiled VAE decode; gpu_gib_tiled: tiled)
# + the T5/UMT5 text encoder's bf16 weights (8.9 / 12.5 GiB), which the pipeline keeps resident.

MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    # LLMs: the optimizer (rewrites queries) and the judge (critique + refine)
    ModelSpec("llama3-8b-instruct", "optimizer", "meta-llama/Meta-Llama-3-8B-Instruct",
              "transformers.AutoModelForCausalLM", kwargs=(("gpu_gib", 19.0),)),
    ModelSpec("qwen2.5-7b-instruct", "optimizer", "Qwen/Qwen2.5-7B-Instruct", "transformers.AutoModelForCausalLM",
              kwargs=(("gpu_gib", 18.0),)),
    # Text-to-video pipelines; defaults are each model card's recommended settings.
    ModelSpec("cogvideox-2b", "t2v", "THUDM/CogVideoX-2b", "diffusers.CogVideoXPipeline", dtype="float16",
              kwargs=_t2v(49, 480, 720, 50, 6.0, 8, gpu_gib=28.0, gpu_gib_tiled=16.5)),  # the 2B card says fp16
    ModelSpec("cogvideox-5b", "t2v", "THUDM/CogVideoX-5b", "diffusers.CogVideoXPipeline",
              kwargs=_t2v(49, 480, 720, 50, 6.0, 8, gpu_gib=37.0, gpu_gib_tiled=30.0)),
    ModelSpec("wan2.1-t2v-1.3b", "t2v", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "diffusers.WanPipeline",
              kwargs=_t2v(81, 480, 832, 50, 5.0, 16, vae_dtype="float32", gpu_gib=25.0, gpu_gib_tiled=18.0)),
    ModelSpec("ltx-video", "t2v", "Lightricks/LTX-Video", "diffusers.LTXPipeline",
              kwargs=_t2v(121, 512, 768, 50, 3.0, 24, negative_prompt=_LTX_NEGATIVE, gpu_gib=19.5,
                          gpu_gib_tiled=16.5)),  # 8k+1 frames, /32 sizes
    # VLM video judges (checklist questions answered Yes/No)
    ModelSpec("qwen2-vl-7b-instruct", "video_judge", "Qwen/Qwen2-VL-7B-Instruct",
              "transformers.Qwen2VLForConditionalGeneration", kwargs=_VIDEO_JUDGE_PIXELS),
    ModelSpec("qwen2.5-vl-7b-instruct", "video_judge", "Qwen/Qwen2.5-VL-7B-Instruct",
              "transformers.Qwen2_5_VLForConditionalGeneration", kwargs=_VIDEO_JUDGE_PIXELS),
    # tiny: random weights of the same classes, built offline (vpo_ray.models.tiny)
    ModelSpec("tiny-optimizer", "optimizer", "tiny-optimizer", "transformers.AutoModelForCausalLM",
              dtype="float32", num_gpus=0.0, tiny=True, kwargs=(("arch_config", "tiny-llm"),)),
    ModelSpec("tiny-judge", "judge", "tiny-judge", "transformers.AutoModelForCausalLM",
              dtype="float32", num_gpus=0.0, tiny=True, kwargs=(("arch_config", "tiny-llm"),)),
    ModelSpec("tiny-t2v", "t2v", "tiny-t2v", "diffusers.CogVideoXPipeline", dtype="float32", num_gpus=0.0,
              tiny=True, kwargs=_t2v(9, 32, 32, 2, 6.0, 8, arch_config="tiny-cogvideox")),  # 9 frames -> 3 latent; 32 px -> 4x4
    ModelSpec("tiny-wan", "t2v", "tiny-wan", "diffusers.WanPipeline", dtype="float32", num_gpus=0.0,
              tiny=True, kwargs=_t2v(9, 32, 32, 2, 5.0, 16)),
    ModelSpec("tiny-video-judge", "video_judge", "tiny-video-judge",
              "transformers.Qwen2VLForConditionalGeneration", dtype="float32", num_gpus=0.0, tiny=True,
              kwargs=(("min_pixels", 56 * 56), ("max_pixels", 112 * 112), ("arch_config", "tiny-vlm"))),
    # other weights of the same class: `vpo eval holdout_judge=` (a judge no training step saw)
    ModelSpec("tiny-video-judge-2", "video_judge", "tiny-video-judge-2",
              "transformers.Qwen2VLForConditionalGeneration", dtype="float32", num_gpus=0.0, tiny=True,
              kwargs=(("min_pixels", 56 * 56), ("max_pixels", 112 * 112), ("arch_config", "tiny-vlm"))),
)}

# An LLM entry serves either LLM role: these names may stand for optimizer or judge.
_LLM_ROLES = ("optimizer", "judge")

PRESETS: dict[str, dict[str, str]] = {
    # The VPO paper's set-up.
    "paper": {"optimizer": "llama3-8b-instruct", "judge": "llama3-8b-instruct", "t2v": "cogvideox-2b",
              "video_judge": "qwen2-vl-7b-instruct"},
    # Newer open models of the same sizes; CogVideoX-5B keeps the paper's T2V family.
    "qwen": {"optimizer": "qwen2.5-7b-instruct", "judge": "qwen2.5-7b-instruct", "t2v": "cogvideox-5b",
             "video_judge": "qwen2.5-vl-7b-instruct"},
    # As "qwen" with the smaller, faster Wan2.1 1.3B renderer (fits beside the LLMs on one GPU).
    "wan": {"optimizer": "qwen2.5-7b-instruct", "judge": "qwen2.5-7b-instruct", "t2v": "wan2.1-t2v-1.3b",
            "video_judge": "qwen2.5-vl-7b-instruct"},
    "tiny": {"optimizer": "tiny-optimizer", "judge": "tiny-judge", "t2v": "tiny-t2v",
             "video_judge": "tiny-video-judge"},
}


def _known() -> str:
    return f"presets: {', '.join(PRESETS)}; models: {', '.join(MODELS)}"


def get_spec(preset_or_name: str, role: Optional[str] = None) -> ModelSpec:
    """The spec of `role` in a preset, or the registry entry `preset_or_name`.

    get_spec("tiny", "optimizer"); get_spec("cogvideox-2b"); get_spec("llama3-8b-instruct", "judge").
    """
    if role is not None and role not in ROLES:
        raise UnknownModelError(f"unknown model role {role!r} (roles: {', '.join(ROLES)})")
    if preset_or_name in PRESETS:
        if role is None:
            raise UnknownModelError(f"preset {preset_or_name!r} needs a role (one of {', '.join(ROLES)})")
        return MODELS[PRESETS[preset_or_name][role]]
    if preset_or_name in MODELS:
        spec = MODELS[preset_or_name]
        ok = role is None or spec.role == role or (spec.role in _LLM_ROLES and role in _LLM_ROLES)
        if not ok:
            raise UnknownModelError(f"model {preset_or_name!r} is a {spec.role} model, not a {role} model")
        return spec
    raise UnknownModelError(f"unknown preset or model {preset_or_name!r} ({_known()})")


def _as_spec(spec_or_path: Union[ModelSpec, str]) -> Optional[ModelSpec]:
    """The spec for a spec or registry name; None for a path or hub id."""
    if isinstance(spec_or_path, ModelSpec):
        return spec_or_path
    if not isinstance(spec_or_path, (str, os.PathLike)):
        raise ModelLoadError(f"expected a ModelSpec, registry name, local path or hub id, got {spec_or_path!r}")
    s = os.fspath(spec_or_path)
    if s in MODELS and not os.path.isdir(s):
        return MODELS[s]
    return None


def _id_of(spec_or_path: Union[ModelSpec, str]) -> str:
    return spec_or_path.model_id if isinstance(spec_or_path, ModelSpec) else os.fspath(spec_or_path)


# ---------------------------------------------------------------------------- references

def model_path(spec_or_path: Union[ModelSpec, str]) -> str:
    """Where to load a model from: a built tiny dir, a local dir, a hub id (as given), or "random:<name>".

    A local run folder (`vpo train`/`vpo loop` out) resolves to the model it exported
    (vpo_ray.runs.model_dir: the one rule every job follows)."""
    from vpo_ray.runs import model_dir

    if random_weights.as_random(spec_or_path) is not None:
        return str(spec_or_path)
    spec = _as_spec(spec_or_path)
    if spec is None:
        return model_dir(os.fspath(spec_or_path))
    if spec.tiny:
        return tiny.build_cached(spec.name)
    return spec.model_id


def model_ref(preset_or_name: str, role: Optional[str] = None, weights: str = "pretrained",
              outputs: Optional[Any] = None) -> Union[str, "random_weights.RandomModel"]:
    """What a job hands to its stages (and they to the loaders) for `role` of a preset, or a registry name.

    weights="pretrained": `model_path` (a built tiny dir or the hub id). weights="random": a
    `RandomModel` with the output model `outputs` (a RandomOutputsConfig; None = defaults)
    that the loaders build at real size with random weights. The tiny preset's video
    models are random already, and so is a tiny T2V pipeline: those stay as built.
    """
    spec = get_spec(preset_or_name, role)
    if weights == "pretrained" or (spec.tiny and spec.role == "t2v"):
        return model_path(spec)
    if weights != "random":
        raise ModelLoadError(f"weights: expected pretrained or random, got {weights!r}")
    return random_weights.RandomModel(spec.name, outputs or random_weights.RandomOutputsConfig())


# ---------------------------------------------------------------------------- loading helpers

def _dtype_for(spec: Optional[ModelSpec], dtype: Optional[str], device: str) -> str:
    if dtype:
        return dtype
    if spec is not None:
        return spec.dtype
    return "float32" if str(device).startswith("cpu") else "bfloat16"


def _resolve(spec_or_path: Union[ModelSpec, str], default_class: str):
    """(spec or None, path to load, id for messages, class to load with)."""
    spec = _as_spec(spec_or_path)
    return (spec, model_path(spec or spec_or_path), _id_of(spec or spec_or_path),
            _import(spec.model_class if spec else default_class))


def _tf_dtype(spec: Optional[ModelSpec], dtype: Optional[str], device: str) -> dict:
    return {_transformers_dtype_kw(): _torch_dtype(_dtype_for(spec, dtype, device))}


# ---------------------------------------------------------------------------- loaders

def load_causal_lm(spec_or_path: Union[ModelSpec, str], device: str = "cpu", dtype: Optional[str] = None,
                   for_training: bool = False):
    """(model, tokenizer) of an instruct LLM; the tokenizer pads on the left and has a pad token.

    A `random_weights.RandomModel` (or "random:<name>") builds the architecture with random weights.
    """
    from transformers import AutoTokenizer

    if random_weights.as_random(spec_or_path) is not None:
        return random_weights.build_causal_lm(spec_or_path, device, dtype, for_training)
    if isinstance(spec_or_path, random_weights.WithRandomOutputs):
        model, tokenizer = load_causal_lm(spec_or_path.model, device, dtype, for_training)
        model.vpo_random_outputs = spec_or_path.outputs
        return model, tokenizer

    spec, path, model_id, cls = _resolve(spec_or_path, "transformers.AutoModelForCausalLM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs())
        model = cls.from_pretrained(path, **_tf_dtype(spec, dtype, device), **_hub_kwargs())
    except Exception as e:  # noqa: BLE001 - every failure becomes one error that names the model
        raise _load_error(model_id, path, e, "model") from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # Llama 3 ships none; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    if for_training:
        model.train()
        model.config.use_cache = False  # caches are useless (and warn) under gradient checkpointing
    else:
        model.eval()
    return model, tokenizer


def load_t2v_pipeline(spec_or_path: Union[ModelSpec, str], device: str = "cpu", dtype: Optional[str] = None):
    """A diffusers text-to-video pipeline, on `device`; spec options set VAE dtype/tiling; random refs build random."""
    if (rm := random_weights.as_random(spec_or_path)) is not None:
        return random_weights.build_t2v_pipeline(rm.name, device, dtype)
    spec, path, model_id, cls = _resolve(spec_or_path, "diffusers.DiffusionPipeline")
    opts = spec.options if spec else {}
    torch_dtype = _torch_dtype(_dtype_for(spec, dtype, device))
    dtype_kw = _diffusers_dtype_kw()
    try:
        extra = {}
        if opts.get("vae_dtype"):
            import diffusers

            index = cls.load_config(path, local_files_only=offline())
            vae_cls = getattr(diffusers, index["vae"][1])
            extra["vae"] = vae_cls.from_pretrained(path, subfolder="vae", local_files_only=offline(),
                                                   **{dtype_kw: _torch_dtype(opts["vae_dtype"])})
        pipe = cls.from_pretrained(path, local_files_only=offline(), **{dtype_kw: torch_dtype}, **extra)
    except Exception as e:  # noqa: BLE001
        raise _load_error(model_id, path, e, "text-to-video pipeline") from e
    pipe.to(device)
    if opts.get("vae_tiling") and hasattr(pipe, "vae"):
        pipe.vae.enable_tiling()
    if opts.get("vae_slicing") and hasattr(pipe, "vae"):
        pipe.vae.enable_slicing()
    if os.environ.get("VPO_PROGRESS", "1") == "0":
        pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class VideoJudgeProcessor:
    """Tokenizer + Qwen2-VL image processor + chat template: all `video_judge_inputs` needs.

    Used instead of Qwen2VLProcessor because that one requires the torchvision-based
    video processor, which cannot be installed beside every torch build.
    """
    tokenizer: Any
    image_processor: Any
    chat_template: Optional[str] = None
    model_type: str = "qwen2_vl"  # qwen2_5_vl adds second_per_grid_ts (temporal rope spacing)
    video_token: str = "<|video_pad|>"

    @property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.video_token)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def batch_decode(self, ids, **kwargs) -> list:
        return self.tokenizer.batch_decode(ids, **kwargs)


def _image_processor_cls():
    try:  # transformers >= 5: the PIL/numpy backend (no torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil
    except ImportError:  # transformers 4.x: the slow processor is the PIL/numpy one
        from transformers import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor


def load_video_processor(path: str, options: Optional[dict] = None) -> VideoJudgeProcessor:
    from transformers import AutoConfig, AutoTokenizer

    from vpo_ray.models import tiny

    options = options or {}
    tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs())
    tokenizer.padding_side = "left"
    pixels = {k: options[k] for k in ("min_pixels", "max_pixels") if k in options}
    image_processor = _image_processor_cls().from_pretrained(path, local_files_only=offline(), **pixels)
    model_type = getattr(AutoConfig.from_pretrained(path, **_hub_kwargs()), "model_type", "qwen2_vl")
    # Qwen checkpoints keep the template on the tokenizer; ChatML is the same layout otherwise.
    template = tokenizer.chat_template or tiny.CHAT_TEMPLATE
    return VideoJudgeProcessor(tokenizer=tokenizer, image_processor=image_processor, chat_template=template,
                               model_type=model_type)


def load_video_judge(spec_or_path: Union[ModelSpec, str], device: str = "cpu", dtype: Optional[str] = None):
    """(model, processor) of a Qwen2-VL style video judge; feed it `video_judge_inputs(...)`; random refs build random."""
    if random_weights.as_random(spec_or_path) is not None:
        return random_weights.build_video_judge(spec_or_path, device, dtype)
    spec, path, model_id, cls = _resolve(spec_or_path, "transformers.AutoModelForImageTextToText")
    try:
        processor = load_video_processor(path, spec.options if spec else None)
        model = cls.from_pretrained(path, **_tf_dtype(spec, dtype, device), **_hub_kwargs())
    except Exception as e:  # noqa: BLE001
        raise _load_error(model_id, path, e, "video judge") from e
    model.to(device).eval()
    return model, processor


def check_config(spec_or_path: Union[ModelSpec, str]) -> dict:
    """Resolve and read only the config of a model (no weights); raises ModelLoadError."""
    import warnings

    spec = _as_spec(spec_or_path)
    path = model_path(spec or spec_or_path) if (spec is None or spec.tiny) else spec.model_id
    model_id = _id_of(spec or spec_or_path)
    is_pipeline = (spec.model_class.startswith("diffusers.") if spec
                   else os.path.isfile(os.path.join(os.path.expanduser(path), "model_index.json")))
    try:
        if is_pipeline:
            from diffusers import DiffusionPipeline

            with warnings.catch_warnings():  # diffusers warns about a deprecated hub argument it passes itself
                warnings.simplefilter("ignore")
                cfg = dict(DiffusionPipeline.load_config(path, local_files_only=offline()))
            return {"path": path, "kind": "pipeline", "class": cfg.get("_class_name"), "config": cfg}
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path, **_hub_kwargs())
        return {"path": path, "kind": "transformers", "class": type(cfg).__name__,
                "model_type": cfg.model_type, "architectures": getattr(cfg, "architectures", None)}
    except Exception as e:  # noqa: BLE001
        raise _load_error(model_id, path, e, "model") from e


# ---------------------------------------------------------------------------- Yes/No reading

_YES = ("Yes", " Yes", "yes", " yes")
_NO = ("No", " No", "no", " no")


def yes_no_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Ids of the single-token spellings of Yes and of No ("Yes", " Yes", "yes", " yes", ...).

    A judge's verdict is P(any yes id) vs P(any no id) at the next position.
    """
    def ids(words):
        out = []
        for w in words:
            enc = tokenizer.encode(w, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in out:
                out.append(enc[0])
        return out

    yes, no = ids(_YES), ids(_NO)
    if not yes or not no or set(yes) & set(no):
        raise ModelLoadError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no single-token "
                             f"Yes/No (yes ids {yes}, no ids {no}); the judge cannot read a verdict from it")
    return yes, no


def yes_no_probs(logits, yes_ids: Sequence[int], no_ids: Sequence[int]):
    """(p_yes, p_no), each shape (batch,), from logits (batch, vocab) or (batch, seq, vocab) (last position)."""
    if logits.dim() == 3:
        logits = logits[:, -1, :]
    probs = logits.float().softmax(dim=-1)
    return probs[:, list(yes_ids)].sum(dim=-1), probs[:, list(no_ids)].sum(dim=-1)


# ---------------------------------------------------------------------------- video judge inputs

def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides divisible by `factor`, area within [min, max] pixels."""
    import math

    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"video_judge_inputs: aspect ratio of {height}x{width} frames is over 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _pixel_bounds(ip) -> tuple[int, int]:
    size = ip.size

    def get(key):
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    lo = get("shortest_edge") or getattr(ip, "min_pixels", None) or 56 * 56
    hi = get("longest_edge") or getattr(ip, "max_pixels", None) or 28 * 28 * 1280
    return int(lo), int(hi)


def _video_patches(ip, frames) -> tuple[Any, list[int]]:
    """Frames (T of HxWx3 uint8) -> (pixel_values_videos (N, C*tps*ps*ps), [grid_t, grid_h, grid_w])."""
    import numpy as np
    import torch
    from PIL import Image

    arr = [np.asarray(f) for f in frames]
    if not arr:
        raise ValueError("video_judge_inputs: no frames")
    h0, w0 = arr[0].shape[:2]
    for i, a in enumerate(arr):
        if a.ndim != 3 or a.shape[2] != 3 or a.shape[:2] != (h0, w0):
            raise ValueError(f"video_judge_inputs: frame {i} has shape {a.shape}, expected ({h0}, {w0}, 3)")
    ps, ms, tps = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    lo, hi = _pixel_bounds(ip)
    h, w = _smart_resize(h0, w0, ps * ms, lo, hi)
    mean = np.asarray(ip.image_mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(ip.image_std, np.float32).reshape(1, 3, 1, 1)
    resized = [np.asarray(Image.fromarray(a.astype(np.uint8)).resize((w, h), Image.BICUBIC)) for a in arr]
    video = np.stack(resized).astype(np.float32).transpose(0, 3, 1, 2) * float(ip.rescale_factor)
    video = (video - mean) / std
    if pad := -len(video) % tps:  # as Qwen2-VL's video processor: repeat the last frame
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    t = len(video)
    gt, gh, gw = t // tps, h // ps, w // ps
    x = torch.from_numpy(np.ascontiguousarray(video)).view(gt, tps, 3, gh // ms, ms, ps, gw // ms, ms, ps)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, 3 * tps * ps * ps)
    return x, [gt, gh, gw]


def video_patches(processor: VideoJudgeProcessor, frames) -> tuple[Any, list[int]]:
    """One video's pixel patches and [grid_t, grid_h, grid_w], computed once per video."""
    return _video_patches(processor.image_processor, frames)


def video_judge_chat_ids(processor: VideoJudgeProcessor, question: str, grid: Sequence[int],
                         template: Optional[str] = "default") -> list[int]:
    """Token ids of the user turn asking `question` about a video of patch grid `grid` (open assistant turn)."""
    from vpo_ray import prompts

    if template == "default":
        template = prompts.VIDEO_JUDGE_TEMPLATE
    text = template.format(question=question) if template else question
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True)
    if chat.count(processor.video_token) != 1:
        raise ValueError(f"chat template rendered {chat.count(processor.video_token)} video placeholders, expected 1")
    n_tokens = grid[0] * grid[1] * grid[2] // (int(processor.image_processor.merge_size) ** 2)
    chat = chat.replace(processor.video_token, processor.video_token * n_tokens)
    return list(processor.tokenizer(chat, add_special_tokens=False)["input_ids"])


def video_judge_batch_inputs(processor: VideoJudgeProcessor, items: Sequence[tuple], *,
                             template: Optional[str] = "default", sample_fps: Optional[float] = None,
                             device: Any = None, dtype: Any = None) -> dict:
    """Model inputs for several (frames, question) pairs, left-padded into one batch."""
    import torch
    import transformers

    tok, ip = processor.tokenizer, processor.image_processor
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    vid_id = processor.video_token_id
    seqs, pixels, grids = [], [], []
    for frames, question in items:
        patches, grid = _video_patches(ip, frames)
        seqs.append(video_judge_chat_ids(processor, question, grid, template))
        pixels.append(patches)
        grids.append(grid)
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask,
           "pixel_values_videos": torch.cat(pixels).to(dtype or torch.float32),
           "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
    if int(transformers.__version__.split(".")[0]) >= 5:  # v5 M-RoPE reads modality types: video = 2
        out["mm_token_type_ids"] = (input_ids == vid_id).to(torch.int) * 2 * attention_mask.to(torch.int)
    if sample_fps and processor.model_type == "qwen2_5_vl":
        out["second_per_grid_ts"] = torch.tensor([int(ip.temporal_patch_size) / sample_fps] * len(items))
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def video_judge_inputs(processor: VideoJudgeProcessor, frames, question: str, *,
                       template: Optional[str] = "default", sample_fps: Optional[float] = None,
                       device: Any = None, dtype: Any = None) -> dict:
    """Model inputs asking `question` about one video given as sampled frames (HxWx3 uint8).

    The question is wrapped in prompts.VIDEO_JUDGE_TEMPLATE (pass template=None to send it
    as is) and rendered as a user turn holding one video; the assistant turn is open, so
    `yes_no_probs(model(**inputs).logits, *yes_no_token_ids(processor.tokenizer))` reads
    the answer. `sample_fps` (frames per second of the sampled frames) only matters for
    Qwen2.5-VL. `dtype` applies to pixel values (match the model's dtype).
    """
    return video_judge_batch_inputs(processor, [(frames, question)], template=template, sample_fps=sample_fps,
                                    device=device, dtype=dtype)


# ---------------------------------------------------------------------------- random weights

CONFIG_DIR = random_weights.CONFIG_DIR


def random_init_from_config(spec: Union[ModelSpec, str], components: Optional[Sequence[str]] = None,
                            device: str = "cpu", dtype: Optional[str] = None, seed: int = 0) -> dict:
    """{component: module} of configs/<spec>/<component>.json with random weights (random_weights.py)."""
    return random_weights.random_init_from_config(spec, components, device, dtype, seed)


def preset_job_defaults(preset: str) -> dict:
    """Job settings a preset implies unless the user sets them ({dotted key: value}).

    `tiny`: the tiny T2V model's own clip size and step count, and short generations,
    so generate/eval/demo runs finish on a laptop in minutes. Random weights rarely emit
    EOS, so nearly every tiny generation reaches its limit: `truncation=keep` keeps those
    rows, marked `truncated: true`, instead of making every one an error (the real
    presets' default); and they never write the [[start]]/[[end]] markers on their own, so
    `refine_reflection=false` prefills the marker (else no refinement, no text pair, and
    the tiny video judge's constant answers give no video pair either). Real presets:
    none (the config dataclasses' defaults are the paper's).
    """
    if preset != "tiny":
        return {}
    t2v = get_spec("tiny", "t2v").options
    out = {f"video.{k}": t2v[k] for k in ("num_frames", "height", "width", "num_inference_steps") if k in t2v}
    out.update({"video.judge_frames": 2, "sampling.max_new_tokens": 24, "judge_sampling.max_new_tokens": 12,
                "truncation": "keep", "refine_reflection": False})
    return out
