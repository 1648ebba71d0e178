"""The `vpo generate dpo` hook that writes the video preference set (`video_dpo_set=true`).

    generate dpo, video.seeds_per_prompt >= 2, video.keep_latents (set here)
      -> every passing prompt rendered with N seeds, latents kept beside each mp4
      -> judged videos -> same-prompt pairs (vpo_ray.data.video_pairs) -> DIR/video_dpo.parquet

`configure` runs before any work (it refuses settings that cannot give a pair and turns
on the renderer's latents); `write` runs when the DPO set is written, over every video
of the run (resumed ones included), so a rerun rewrites the same set. A video whose
latents file is missing takes no part (counted in the summary).
"""
from __future__ import annotations

import logging

from vpo_ray import schema, storage
from vpo_ray.config import ConfigError, GenerateConfig, replace

log = logging.getLogger("vpo.generate")

SET_NAME = "video_dpo"  # DIR/video_dpo.parquet (or .jsonl), beside dpo.parquet


def configure(cfg: GenerateConfig) -> GenerateConfig:
    """`cfg` with the renderer keeping latents when the set is asked for; ConfigError if it cannot form."""
    if not cfg.video_dpo_set:
        return cfg
    if cfg.kind != "dpo":
        raise ConfigError(f"video_dpo_set: the video preference set comes from rendered videos (kind=dpo), "
                          f"got kind={cfg.kind!r}")
    if cfg.video.seeds_per_prompt < 2:
        raise ConfigError("video_dpo_set: pairs are two seeds of one prompt, so video.seeds_per_prompt must be "
                          f">= 2, got {cfg.video.seeds_per_prompt}")
    return cfg if cfg.video.keep_latents else replace(cfg, **{"video.keep_latents": True})


def _relative(uri: str, root: str) -> str:
    """`uri` relative to the set's folder when it lies under it (a run folder can then move)."""
    prefix = storage.join(root, "")  # root as the renderer's joins spell it, with a trailing slash
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def pair_rows(cfg: GenerateConfig, videos: list[dict]) -> tuple[list[dict], dict]:
    """(schema.video_dpo_row rows, counts) from the run's video records (each with query_id)."""
    from vpo_ray.data.checklist import load_checklist
    from vpo_ray.data.video_pairs import same_prompt_pairs
    from vpo_ray.pipeline.t2v import latents_uri

    usable, no_latents = [], 0
    for v in videos:
        if v.get("error") or not v.get("video_uri"):
            continue
        if not storage.exists(latents_uri(v["video_uri"])):
            no_latents += 1
            continue
        usable.append(v)
    weights = load_checklist(cfg.checklist).weights()  # the run's checklist (a shipped name or a file)
    select = cfg.pair_select  # follows the optimizer's video-pair choice
    pairs = same_prompt_pairs(usable, weights, cfg.pair_margin, select)
    rows = []
    for p in pairs:
        sides = {}
        for side in ("chosen", "rejected"):
            v = p[side]
            sides[side] = {"seed": v["seed"], "video_uri": _relative(v["video_uri"], cfg.out),
                           "latents_uri": _relative(latents_uri(v["video_uri"]), cfg.out),
                           "score": p["scores"][f"{side}_score"]}
        model = str(p["chosen"].get("model") or "")
        rows.append(schema.video_dpo_row(p["query_id"], p["sample_idx"], p["prompt"], model, sides["chosen"],
                                         sides["rejected"], {**p["scores"], "margin": cfg.pair_margin,
                                                             "select": select}))
    prompts = {(v["query_id"], v["sample_idx"]) for v in usable}
    counts = {"prompts": len(prompts), "pairs": len(rows), "prompts_without_pair": len(prompts) - len(rows),
              "videos_without_latents": no_latents}
    return rows, counts


def write(cfg: GenerateConfig, videos: list[dict]) -> dict:
    """Write DIR/video_dpo.{parquet,jsonl}; returns the summary entry ({} when the set is off)."""
    if not cfg.video_dpo_set:
        return {}
    from vpo_ray.pipeline.generate import _write_set

    rows, counts = pair_rows(cfg, videos)
    uri = _write_set(cfg.out, SET_NAME, rows, cfg.output_format)
    log.info("video preference set: %d pairs from %d prompts -> %s", counts["pairs"], counts["prompts"], uri)
    return {**counts, "output": uri}
