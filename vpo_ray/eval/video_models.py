"""`vpo eval` across text-to-video models, and a second video judge as a reward-hacking guard.

    prompt sources (original, vpo, ...) x T2V models (the preset's, plus name=path tuned ones)
      -> every source's prompts rendered by every model on the same seeds; rows are named
         "<source>" for the preset's model and "<source>+<name>" for another, so with a
         video-DPO model named vdpo the table holds original | vpo | original+vdpo | vpo+vdpo
      -> the training checklist judge, then (holdout_judge) a second VLM that no training
         step ever saw, answering the same checklist.

Why the second judge: video-DPO and VPO's video pairs are both chosen by the checklist
judge, so a model can learn what that judge likes rather than what the query asks for
(reward hacking). A gain the training judge sees and the second judge does not is flagged
in metrics.json `guard` (training judge's win rate above 50% with its interval, second
judge's at or below 50%).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from vpo_ray.config import ConfigError
from vpo_ray.pipeline.video_judge import VideoJudge

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class T2VModel:
    name: str  # "" = the preset's model (rows keep their source name)
    path: str  # what the renderer loads: a pipeline dir or a registry name


def resolve_pipeline(path: str) -> str:
    """A diffusers pipeline dir or a `vpo train video-dpo` run folder (vpo_ray/runs.py), or a registry
    text-to-video name; anything else is a ConfigError naming it."""
    from vpo_ray.models.registry import MODELS
    from vpo_ray.runs import model_dir

    if path in MODELS and MODELS[path].role == "t2v":
        return path
    local = model_dir(path) if os.path.isdir(os.path.expanduser(path)) else None
    if local is None or not os.path.isfile(os.path.join(local, "model_index.json")):
        raise ConfigError(f"t2v_models: {path!r} is neither a diffusers pipeline dir, a `vpo train video-dpo` "
                          "run folder, nor a registry text-to-video name")
    return os.path.abspath(local)


def parse_t2v_models(specs: tuple[str, ...], base: str, source_names: list[str]) -> list[T2VModel]:
    """The preset's model first, then each `name=path`; names unique and unlike any source's."""
    out = [T2VModel("", base)]
    for spec in specs:
        name, sep, path = (x.strip() for x in spec.partition("="))
        if not sep or not path or not _NAME_RE.match(name):
            raise ConfigError(f"t2v_models: expected name=path (name of letters, digits, _ . -), got {spec!r}")
        if name in [m.name for m in out] or name in source_names:
            raise ConfigError(f"t2v_models: name {name!r} is used twice (or is a source's name)")
        out.append(T2VModel(name, resolve_pipeline(path)))
    return out


def row_name(source: str, model: T2VModel) -> str:
    return f"{source}+{model.name}" if model.name else source


def explode_for_model(row: dict, seeds_per_prompt: int, seed: int, salt: str, suffix: str) -> list[dict]:
    """run.explode_for_video, with the rows renamed "<source>+<suffix>" for a non-preset model."""
    from vpo_ray.eval.run import explode_for_video

    rows = explode_for_video(row, seeds_per_prompt, seed, salt)
    if suffix:
        for r in rows:
            r["eval_source"] = f"{r['eval_source']}+{suffix}"
    return rows


def pool_name(model: T2VModel) -> str:
    """The placement pool of a video model (vpo_ray/pipeline/placement.py)."""
    return f"t2v[{model.name or 'preset'}]"


def render(ds, models: list[T2VModel], cfg, plan):
    """Every judged prompt x seed rendered by every model: one T2V pool per model (sized by `plan`), unioned."""
    from vpo_ray import storage
    from vpo_ray.eval.run import TASK_CPUS
    from vpo_ray.pipeline import placement
    from vpo_ray.pipeline.flow import RenderStage

    v = cfg.video  # what a rendered clip depends on (not judge_frames or the number of seeds)
    flags = tuple(dict.fromkeys(tuple(v.optimizations) + plan.t2v_flags))
    parts = []
    for m in models:
        pool = plan.pools[pool_name(m)]
        salt = json.dumps([str(m.path), v.num_frames, v.height, v.width, v.num_inference_steps, v.guidance_scale,
                           v.fps])
        part = ds.flat_map(explode_for_model, num_cpus=TASK_CPUS, fn_kwargs=dict(
            seeds_per_prompt=v.seeds_per_prompt, seed=cfg.seed, salt=salt, suffix=m.name))
        part = part.repartition(target_num_rows_per_block=pool.batch_size)  # spread prompts over the GPUs
        parts.append(part.map_batches(RenderStage, fn_constructor_kwargs=dict(
            model=m.path, video=v, out_root=storage.join(cfg.out, "render"), optimizations=flags,
            warmup_steps=v.warmup_steps), **placement.map_kwargs(pool)))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


class SecondJudge(VideoJudge):
    """The holdout judge: the VideoJudge stage writing `holdout_checklist_json` / `holdout_score` /
    `holdout_error`, leaving the training judge's columns as they were."""

    def __call__(self, batch: dict) -> dict:
        kept = {k: batch[k] for k in ("checklist_json", "score", "video_error") if k in batch}
        out = super().__call__(batch)
        out["holdout_checklist_json"] = out["checklist_json"]
        out["holdout_score"] = out["score"]
        out["holdout_error"] = np.asarray([str(e or "") for e in out["video_error"]], dtype=object)
        out.update(kept)
        return out


def holdout_record(row: dict) -> dict:
    """The second judge's fields of a videos.jsonl record ({} without a second judge)."""
    if "holdout_score" not in row:
        return {}
    return {"holdout_score": float(row.get("holdout_score") or 0.0),
            "holdout_checklist": json.loads(row.get("holdout_checklist_json") or "[]"),
            "holdout_error": str(row.get("holdout_error") or "")}


def add_holdout_metrics(metrics: dict, videos: list[dict], cfg, checklist: list[dict]) -> Optional[dict]:
    """Per source `holdout` video metrics (the second judge, on `checklist`: load_checklist's
    as_dicts()) and the guard; None without a second judge."""
    from vpo_ray.eval import metrics as M

    if not cfg.holdout_judge:
        return None
    judged = [dict(v, score=v["holdout_score"], checklist=v["holdout_checklist"], error=v["error"] or v["holdout_error"])
              for v in videos if "holdout_score" in v]
    baseline = {(v["query_id"], v["seed"]): v["score"] for v in judged
                if v["source"] == "original" and not v["error"] and v["checklist"]}
    args = dict(n_boot=cfg.bootstrap, seed=cfg.seed, ci=cfg.ci, tie_tolerance=cfg.tie_tolerance)
    guard = {}
    for name, entry in metrics.items():
        mine = [v for v in judged if v["source"] == name]
        entry["holdout"] = M.video_metrics(mine, checklist, baseline=None if name == "original" else baseline,
                                           score=cfg.video_score, **args)
        train_win, held_win = (entry.get("video") or {}).get("win_rate"), entry["holdout"].get("win_rate")
        if train_win and held_win and train_win.get("value") is not None:
            lo = (train_win.get("ci") or [train_win["value"]])[0]
            guard[name] = {"training_judge_win": train_win["value"], "second_judge_win": held_win["value"],
                           "suspect": bool(lo > 50.0 and (held_win["value"] or 0.0) <= 50.0)}
    return guard
