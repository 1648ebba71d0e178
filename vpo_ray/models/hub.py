"""Loading from the Hugging Face hub or local folders: errors that name the model and the fix, dtypes, imports.

Used by the registry (vpo_ray/models/registry.py, which re-exports these names) and by
random_weights.py. Loaders never download when HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import os
from typing import Any, Optional


class ModelLoadError(RuntimeError):
    """A model could not be resolved or loaded; the message names the id and the fix."""


class UnknownModelError(ModelLoadError, KeyError):
    """An unknown preset, role or registry name (also a KeyError for `except KeyError`)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return RuntimeError.__str__(self)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def _trust_remote_code() -> bool:
    return os.environ.get("VPO_TRUST_REMOTE_CODE") == "1"


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)


def _load_error(model_id: str, path: str, err: BaseException, what: str) -> ModelLoadError:
    detail = f"{type(err).__name__}: {' '.join(str(err).split())}"  # one line: the CLI shows it as is
    if _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        return ModelLoadError(f"cannot load {what} '{model_id}': local path {path} not found")
    if not _looks_local(path):
        mode = "downloads are off (HF_HUB_OFFLINE=1)" if offline() else "it could not be downloaded"
        return ModelLoadError(
            f"cannot load {what} '{model_id}': it is not in the local Hugging Face cache and {mode}. "
            f"Download it elsewhere (e.g. `huggingface-cli download {model_id} --local-dir /models/"
            f"{model_id.split('/')[-1]}`) and pass the local path (e.g. `optimizer=/models/...` or "
            f"`--model PATH`), or set HF_HOME to a pre-populated cache. ({detail})")
    return ModelLoadError(f"cannot load {what} '{model_id}' from {path}: {detail}")


def _import(dotted: str) -> Any:
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"model class {dotted} is not available: {e}") from e


def _torch_dtype(name: Optional[str]):
    import torch

    if name in (None, "auto"):
        return name
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ModelLoadError(f"unknown torch dtype {name!r} (e.g. float32, bfloat16, float16)")
    return dt


def _hub_kwargs() -> dict:
    return {"local_files_only": offline(), "trust_remote_code": _trust_remote_code()}


def _transformers_dtype_kw() -> str:
    """transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _diffusers_dtype_kw() -> str:
    """diffusers 0.42 renamed from_pretrained's `torch_dtype` to `dtype` (older ones ignore `dtype`)."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"
