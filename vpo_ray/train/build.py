"""The tokenizer and models a training rank starts from: pretrained weights, or a real
architecture with random weights (`weights=random`).

weights=pretrained: `model` is a checkpoint dir or hub id, loaded with `from_pretrained`.
weights=random: the architecture of `model` (a registry name whose config ships in
vpo_ray/models/configs/<name>/model.json, or a dir holding a config.json) is built with
`from_config`. Both run after the TrainingArguments exist, so under ZeRO-3 transformers
wraps construction in `deepspeed.zero.Init`: each layer is created on this rank's GPU and
partitioned at once, and an 8B model never exists whole in CPU RAM or on one GPU (a plain
fp32 CPU init per worker would take minutes and 32 GB of RAM each). The tokenizer of a
random model is the registry's stand-in (models/stand_in.py) with the architecture's real vocabulary
size. (models.random_weights.build_causal_lm builds the same model whole on one device; training
needs transformers' from_config for ZeRO-3's partitioned construction.)

Weights are built in the training precision when DeepSpeed runs (bf16/fp16: DeepSpeed keeps
the fp32 master copy in the optimizer partitions); plain DDP keeps fp32 weights and autocasts.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from vpo_ray.config import ConfigError, TrainConfig, replace

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def init_deepspeed_comm(use_gpu: bool) -> None:
    """DeepSpeed's comm on Ray's process group (ZeRO-3's zero.Init needs it before the model).

    On CPU, DeepSpeed's comm JIT-compiles its shared-memory all-reduce op (deepspeed_shm_comm)
    the first time it starts: a C++ build of minutes on a small machine (most of the tiny
    demo's SFT time on 2 cores). That op serves only `inference_all_reduce` (tensor-parallel
    inference); ZeRO training reduces through the gloo group, so the op is marked not
    buildable here. DeepSpeed keeps edits to `deepspeed.ops.__compatible_ops__` (one dict per
    process); if a DeepSpeed release drops it, the op is built as before.
    """
    import deepspeed

    if not use_gpu:
        import deepspeed.ops

        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def architecture_config(model: str):
    """The transformers config of `model`: a dir holding config.json, or a registry name whose architecture
    ships in vpo_ray/models/configs/ (the folder models.random_weights.config_folder names; tiny presets
    have small stand-ins there)."""
    import json

    from transformers import AutoConfig

    from vpo_ray.models import random_weights, registry

    if os.path.isdir(model):
        return AutoConfig.from_pretrained(model)
    path = random_weights.config_folder(registry.get_spec(model)) / "model.json"
    if not path.is_file():
        raise ConfigError(f"weights=random: no shipped architecture for {model!r} ({path}); "
                          "give a registry LLM name or a dir holding a config.json")
    raw = json.loads(path.read_text())
    config_cls = registry._import(raw.get("_config_class", "transformers.AutoConfig"))
    return config_cls(**{k: v for k, v in raw.items() if not k.startswith("_")})


def load_tokenizer(cfg: TrainConfig, model_path: str):
    """The model's own tokenizer; for random weights without one, the registry's stand-in of the real vocabulary size."""
    from transformers import AutoTokenizer

    from vpo_ray.models import stand_in

    own = cfg.weights == "pretrained" or (
        os.path.isdir(model_path) and any(os.path.exists(os.path.join(model_path, f)) for f in TOKENIZER_FILES))
    tokenizer = (AutoTokenizer.from_pretrained(model_path) if own
                 else stand_in.chat_tokenizer(int(architecture_config(model_path).vocab_size)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weights_dtype(cfg: TrainConfig) -> str:
    """bf16/fp16 weights under DeepSpeed (fp32 masters live in its optimizer); fp32 for plain DDP."""
    if cfg.deepspeed_stage > 0 and cfg.precision in ("bf16", "fp16"):
        return {"bf16": "bfloat16", "fp16": "float16"}[cfg.precision]
    return "float32"


def build_model(cfg: TrainConfig, model_path: str, seed: Optional[int] = None) -> Any:
    """The policy (or a reference) as a module; call after the TrainingArguments (ZeRO-3 init)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, weights_dtype(cfg)), "attn_implementation": cfg.attn_implementation}
    if cfg.weights == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    else:
        config = architecture_config(model_path)
        # the tokenizer's special ids go into the config (as the registry's random LLMs do): generation stops at EOS
        tokenizer = load_tokenizer(cfg, model_path)
        config.update({k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        torch.manual_seed(cfg.seed if seed is None else seed)  # policy and reference draw the same weights
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.config.use_cache = False  # training never decodes; the cache only costs memory
    return model


def parameter_count(model) -> int:
    """Parameters of the whole model, also when ZeRO-3 holds only this rank's shard."""
    return int(sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()))


def reference_model(cfg: TrainConfig, model_path: str, ref_model_path: Optional[str]):
    """The DPO reference TRL is handed, or None when TRL needs none (LoRA, precomputed log-probs, SFT).

    A random-weight policy cannot be re-read from a path, so its reference is built again from
    the same seed: both start equal, as a frozen copy of the policy would.
    """
    if cfg.method != "dpo" or cfg.lora:
        return None
    if ref_model_path:
        return build_model(replace(cfg, weights="pretrained"), ref_model_path)
    if cfg.precompute_ref_log_probs:
        return None  # TRL runs the untrained policy over the set once, before the first step
    if cfg.weights == "random":
        return build_model(cfg, model_path)
    return None  # TRL loads a frozen copy of `model` itself

