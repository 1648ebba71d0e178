"""Run folders: how one job's output becomes the next job's input, resolved one way everywhere.

    vpo generate --out D  ->  D/{sft,dpo}.{parquet,jsonl}, D/README.md (dataset card), D/summary.json
    vpo train    --out D  ->  D/model/ (the exported optimizer), D/metrics.jsonl, D/summary.json
    vpo loop     --out D  ->  D/loop_summary.json naming the last export (D/round_k/<kind>/model)

A model argument anywhere (train `model`/`ref_model`, generate `optimizer`, eval
`sources`, serve `model`) may name the model folder itself or the run folder that holds
it: `models.registry.model_path` sends every local path through `model_dir`, and a
training data argument may name a generate run folder (`train/data.py`). So the job
YAMLs (jobs/*.yaml) and the manifests (cluster/) name only the `out` of the job before.
"""
from __future__ import annotations

import json
import os

from vpo_ray.config import ConfigError

EXPORT_DIR = "model"  # where `vpo train` exports, below its out folder
LOOP_SUMMARY = "loop_summary.json"


class RunFolderError(ConfigError):
    """A local folder given as a model is neither a model nor a run folder (a config error: the path)."""


def is_model_folder(path: str) -> bool:
    """A diffusers pipeline (model_index.json) or a transformers model: a config.json with a
    `model_type`. Run folders hold a config.json too (the job's settings), without one."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return True
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "model_type" in cfg


def train_export(out: str) -> str:
    """The model folder `vpo train --out OUT` writes (OUT/model)."""
    return os.path.join(out, EXPORT_DIR)


def model_dir(path: str) -> str:
    """The model folder for `path`: a model folder as is; a `vpo train` run folder's model/;
    a `vpo loop` folder's last optimizer. A hub id, a registry name, a remote URI or a
    path that does not exist comes back unchanged (the loader reports it)."""
    local = os.path.expanduser(path)
    if "://" in path or not os.path.isdir(local):
        return path
    if is_model_folder(local):
        return local
    if is_model_folder(train_export(local)):
        return train_export(local)
    summary = os.path.join(local, LOOP_SUMMARY)
    if os.path.isfile(summary):
        with open(summary, encoding="utf-8") as f:
            optimizer = json.load(f).get("optimizer")
        if optimizer and optimizer != path:
            return model_dir(optimizer)
    raise RunFolderError(
        f"{path} is not a model folder (model_index.json, or config.json with a model_type), nor a "
        "`vpo train` run folder "
        f"({EXPORT_DIR}/config.json), nor a `vpo loop` folder ({LOOP_SUMMARY}): did the job that "
        "writes it finish, and does this path name its `out`?")
