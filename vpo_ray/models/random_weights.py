"""`weights=random`: every model a preset names, at real size with random weights, offline.

For throughput benchmarks and cluster smoke tests: the same FLOPs and memory as the
released checkpoints, nothing downloaded. A model reference `RandomModel(name, outputs)`
(or the string "random:<name>") goes wherever a model path goes; the registry's loaders
(`load_causal_lm`, `load_video_judge`, `load_t2v_pipeline`) build it from the
architecture configs shipped in vpo_ray/models/configs/<name>/ (the spec option
`arch_config` names another folder: the tiny preset's small stand-ins), directly on the
target device in the target dtype (an 8B model never takes a float32 detour through CPU
memory), with a stand-in tokenizer of the real vocabulary size (stand_in.py).

Random models never stop, judge or see on their own, so they answer by the output model
of `RandomOutputsConfig` (vpo_ray/config.py), seeded per row:
  - generated rows end as a natural stop ("stop") at lengths drawn per row and stage
    (rewrite / critique / refine), passed to `LLMEngine.generate(forced_lengths=...)`;
  - judge verdicts pass at `judge_pass_rate`; video checklist answers are Yes at
    `checklist_yes_rate`. The forward passes still run at full size: only the reading
    of their (meaningless) probabilities is replaced.
Loaded models carry the output model as `model.vpo_random_outputs` (None for real weights).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from vpo_ray.config import RandomOutputsConfig

RANDOM_PREFIX = "random:"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STAGE_LENGTHS = {"rewrite": "rewrite_tokens", "critique": "critique_tokens", "refine": "refine_tokens"}


@dataclass(frozen=True)
class RandomModel:
    """A registry model built with random weights; str() is "random:<name>" (a plain-string reference)."""
    name: str  # registry name, e.g. "llama3-8b-instruct"
    outputs: RandomOutputsConfig = field(default_factory=RandomOutputsConfig)  # how its rows end and verdicts fall

    def __str__(self) -> str:
        return RANDOM_PREFIX + self.name


@dataclass(frozen=True)
class WithRandomOutputs:
    """A checkpoint trained from random weights (a weights=random loop's optimizer): its weights, and the output
    model, because a model trained from noise on a few steps does not learn to stop either."""
    model: str  # checkpoint folder
    outputs: RandomOutputsConfig = field(default_factory=RandomOutputsConfig)

    def __str__(self) -> str:
        return self.model


def as_random(model: Any) -> Optional[RandomModel]:
    """The RandomModel a reference stands for (a RandomModel or "random:<name>"), else None."""
    if isinstance(model, RandomModel):
        return model
    if isinstance(model, str) and model.startswith(RANDOM_PREFIX):
        return RandomModel(model[len(RANDOM_PREFIX):])
    return None


def config_folder(spec) -> Path:
    """Where a spec's architecture configs live: configs/<arch_config option or name>/."""
    return CONFIG_DIR / spec.option("arch_config", spec.name)


def _spec(name: str, role: Optional[str] = None):
    from vpo_ray.models import registry

    spec = registry.get_spec(name, role)
    if not config_folder(spec).is_dir() and not spec.tiny:
        raise registry.ModelLoadError(f"weights=random: no architecture config for {spec.name!r} under "
                                      f"{config_folder(spec)}; add its <component>.json files there")
    return spec


# ---------------------------------------------------------------------------- building modules

def _read_config(path: Path) -> dict:
    from vpo_ray.models import registry

    if not path.is_file():
        raise registry.ModelLoadError(f"no shipped architecture config {path}; add <component>.json files there")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_") or k in
            ("_class_name", "_config_class")}


def build_module(cfg: dict, device: str, dtype, seed: int = 0):
    """Construct `cfg["_class_name"]` (diffusers name, or dotted class + `_config_class`) on `device` in `dtype`.

    The default dtype is switched while the modules are created, so weights are born in
    `dtype` on the device; `_keep_in_fp32_modules` are cast back to float32 after.
    """
    import torch

    from vpo_ray.models import registry

    cfg = dict(cfg)
    cls_name = cfg.pop("_class_name", None)
    if not cls_name:
        raise registry.ModelLoadError(f"architecture config {sorted(cfg)[:5]}...: missing _class_name")
    cls = registry._import(cls_name if "." in cls_name else f"diffusers.{cls_name}")
    config_cls = cfg.pop("_config_class", None)
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            torch.set_default_dtype(dtype)
        with torch.device(device):
            module = cls(registry._import(config_cls)(**cfg)) if config_cls else cls(**cfg)
    finally:
        torch.set_default_dtype(previous)
    return _cast(module, dtype).eval()


def _cast(module, dtype):
    """Floating weights to `dtype`, `_keep_in_fp32_modules` to float32 (as from_pretrained does)."""
    import torch

    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return module


def random_init_from_config(spec, components: Optional[Sequence[str]] = None, device: str = "cpu",
                            dtype: Optional[str] = None, seed: int = 0) -> dict:
    """{component: module} of `configs/<spec>/<component>.json` with random weights, built on `device`.

    Each file holds `_class_name` (a diffusers class name, or a dotted transformers class
    plus `_config_class`) and its constructor arguments, e.g. configs/cogvideox-2b/
    transformer.json. `device="meta"` gives shapes without memory. Add a model by adding
    its files there.
    """
    from vpo_ray.models import registry

    spec_obj = spec if isinstance(spec, registry.ModelSpec) else registry.get_spec(spec)
    folder = config_folder(spec_obj)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if components is not None:
        files = [folder / f"{c}.json" for c in components]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise registry.ModelLoadError(f"no shipped architecture config for {spec_obj.name!r} "
                                      f"({', '.join(missing) or folder}); add <component>.json files there")
    torch_dtype = registry._torch_dtype(registry._dtype_for(spec_obj, dtype, device))
    return {f.stem: build_module(_read_config(f), device, torch_dtype, seed) for f in files}


# ---------------------------------------------------------------------------- LLM, VLM, T2V

def _token_ids(tok) -> dict:
    from vpo_ray.models import tiny

    ids = {k: tok.convert_tokens_to_ids(t) for k, t in
           (("bos_token_id", tiny.BOS), ("eos_token_id", tiny.EOS), ("pad_token_id", tiny.PAD))}
    return ids


def _finish_lm(model, tok, outputs: RandomOutputsConfig):
    from transformers import GenerationConfig

    ids = _token_ids(tok)
    for k, v in ids.items():
        setattr(model.config, k, v)
    model.generation_config = GenerationConfig(**ids)
    model.vpo_random_outputs = outputs
    return model


def build_causal_lm(ref: Union[RandomModel, str], device: str = "cpu", dtype: Optional[str] = None,
                    for_training: bool = False):
    """(model, tokenizer): the LLM's architecture (configs/<name>/model.json), random weights, stand-in tokenizer."""
    from vpo_ray.models import registry, stand_in

    rm = as_random(ref)
    spec = _spec(rm.name)
    cfg = _read_config(config_folder(spec) / "model.json")
    tok = stand_in.chat_tokenizer(int(cfg["vocab_size"]))
    cfg.update(_token_ids(tok))
    model = build_module(cfg, device, registry._torch_dtype(registry._dtype_for(spec, dtype, device)),
                         seed=_name_seed(spec.name))
    model = _finish_lm(model, tok, rm.outputs)
    if for_training:
        model.train()
        model.config.use_cache = False
    return model, tok


def build_video_judge(ref: Union[RandomModel, str], device: str = "cpu", dtype: Optional[str] = None):
    """(model, VideoJudgeProcessor) of a Qwen2-VL style judge: configs/<name>/model.json, random weights."""
    from vpo_ray.models import registry, stand_in, tiny

    rm = as_random(ref)
    spec = _spec(rm.name, "video_judge")
    cfg = _read_config(config_folder(spec) / "model.json")
    pixels = cfg.pop("image_processor", {})
    vocab = int(cfg["text_config"]["vocab_size"])
    tok = stand_in.chat_tokenizer(vocab)
    cfg["text_config"] = dict(cfg["text_config"], **_token_ids(tok))
    cfg.update(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    model = build_module(cfg, device, registry._torch_dtype(registry._dtype_for(spec, dtype, device)),
                         seed=_name_seed(spec.name))
    model = _finish_lm(model, tok, rm.outputs)
    vis = model.config.vision_config
    opts = spec.options
    image_processor = registry._image_processor_cls()(
        min_pixels=opts.get("min_pixels", pixels.get("min_pixels", 56 * 56)),
        max_pixels=opts.get("max_pixels", pixels.get("max_pixels", 28 * 28 * 1280)),
        patch_size=vis.patch_size, temporal_patch_size=vis.temporal_patch_size, merge_size=vis.spatial_merge_size)
    processor = registry.VideoJudgeProcessor(tokenizer=tok, image_processor=image_processor,
                                             chat_template=tiny.CHAT_TEMPLATE, model_type=model.config.model_type)
    return model, processor


def build_t2v_pipeline(name: str, device: str, dtype: Optional[str] = None, seed: int = 0,
                       text_encoder: bool = True):
    """A diffusers T2V pipeline of registry model `name` with random weights, built on `device`.

    Transformer, VAE (in the spec's `vae_dtype` where it names one) and, unless
    `text_encoder=False`, the T5/UMT5 text encoder with a stand-in T5 tokenizer. Without
    the encoder the pipeline carries `_vpo_text_shape` (max_sequence_length x d_model) for
    callers that feed fixed prompt embeddings (vpo_ray.pipeline.t2v, the video benchmark).
    """
    import inspect

    import diffusers
    import torch

    from vpo_ray.models import registry, stand_in

    spec = _spec(name, "t2v")
    folder = config_folder(spec)
    dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    parts = random_init_from_config(spec, ["transformer"], device=device, dtype=dtype, seed=seed)
    parts.update(random_init_from_config(spec, ["vae"], device=device, dtype=spec.option("vae_dtype") or dtype,
                                         seed=seed + 1))
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    parts["scheduler"] = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    enc_cfg = _read_config(folder / "text_encoder.json")
    if text_encoder:
        parts["text_encoder"] = build_module(enc_cfg, device, registry._torch_dtype(dtype), seed + 2)
        parts["tokenizer"] = stand_in.t5_tokenizer(int(enc_cfg["vocab_size"]))
    else:
        parts.update(text_encoder=None, tokenizer=None)
    pipe_cls = getattr(diffusers, spec.model_class.rpartition(".")[2])
    with torch.device(device):
        pipe = pipe_cls(**parts)
    if not text_encoder:
        text_len = inspect.signature(pipe_cls.__call__).parameters["max_sequence_length"].default
        pipe._vpo_text_shape = (int(text_len), int(enc_cfg["d_model"]))
    return pipe


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


# ---------------------------------------------------------------------------- the output model

def _rng(*keys: Any):
    import numpy as np

    digest = hashlib.sha256(json.dumps(keys, default=str).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def outputs_of(obj: Any) -> Optional[RandomOutputsConfig]:
    """The output model a loaded model (or an engine holding one as `.model`) carries; None = real weights."""
    for candidate in (obj, getattr(obj, "model", None)):
        outputs = getattr(candidate, "vpo_random_outputs", None)
        if isinstance(outputs, RandomOutputsConfig):
            return outputs
    return None


def draw_lengths(outputs: RandomOutputsConfig, stage: str, row_seeds: Sequence[int], cap: int) -> list[int]:
    """Per-row generated lengths of `stage`: normal(mean, spread x mean), clipped to [min_tokens, cap - 1]."""
    if stage not in STAGE_LENGTHS:
        raise ValueError(f"no output length for stage {stage!r} (stages: {', '.join(STAGE_LENGTHS)})")
    mean = getattr(outputs, STAGE_LENGTHS[stage])
    out = []
    for seed in row_seeds:
        drawn = round(_rng("length", stage, int(seed)).normal(mean, outputs.length_spread * mean))
        out.append(max(1, min(max(drawn, outputs.min_tokens), cap - 1)))
    return out


def stage_lengths(engine: Any, stage: str, row_seeds: Sequence[int], cap: int) -> dict:
    """Extra keyword arguments of an engine's generate call: {"forced_lengths": [...]} for random weights, else {}.

    Empty for real weights, so an engine (or a test's stand-in) without the argument is never handed one.
    """
    outputs = getattr(engine, "random_outputs", None)
    return {} if outputs is None else {"forced_lengths": draw_lengths(outputs, stage, row_seeds, cap)}


def judge_passes(outputs: RandomOutputsConfig, seed: int) -> bool:
    """A random-weight judge's verdict: pass with probability judge_pass_rate, from the row's seed."""
    return bool(_rng("verdict", int(seed)).random() < outputs.judge_pass_rate)


def checklist_answers(outputs: RandomOutputsConfig, video_key: Sequence[Any], answers: list[dict]) -> list[dict]:
    """Replace a random-weight VLM's checklist answers: Yes at checklist_yes_rate, seeded by video and question.

    p_yes stays on the side of 0.5 that its answer says, so scores and answers agree.
    """
    out = []
    for a in answers:
        draw = _rng("checklist", *video_key, a["id"])
        yes = bool(draw.random() < outputs.checklist_yes_rate)
        u = float(draw.random())
        out.append(dict(a, answer=yes, p_yes=round(0.5 + 0.5 * u if yes else 0.5 * u, 6)))
    return out
