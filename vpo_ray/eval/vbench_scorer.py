"""VBench dimension scores for `vpo eval` (`video_scorers` holding `vbench`), via the optional `vbench` package.

The paper reports VBench dimensions next to its MonetBench (VisionReward) score; vpo_ray
hands the rendered videos to VBench's own scorers rather than re-implementing them.
Set-up (GPU nodes): `pip install vpo_ray[vbench]` and VBench's weights in a local folder
(`vbench.cache_dir`, exported as VBENCH_CACHE_DIR before vbench is imported); VBench
runs with `local=True`, so it never downloads.

Per source, the source's videos are linked into one folder named as VBench expects, and
`VBench(device, full_info, out).evaluate(folder, name, prompt_list, dimension_list,
local=True, mode=...)` scores them:
  * custom_input: files `<n>.mp4` with prompt_list {file: the query}; VBench's dimensions
    that need no extra prompt information (subject_consistency, motion_smoothness, ...).
  * vbench_standard: files `<VBench prompt>-<i>.mp4` (i = seed index); for VBench's own
    prompt suite (`queries=vbench`), every dimension.
VBench returns {dimension: (mean, [{"video_path", "video_results"}, ...])}; each video's
value comes back to its (source, query_id, seed). No figure of this module's is claimed
by the project: its test drives it with a fake `vbench` module.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict
from typing import Optional

from vpo_ray import storage
from vpo_ray.config import ConfigError, VBenchConfig

log = logging.getLogger(__name__)


def _import_vbench(cfg: VBenchConfig):
    if cfg.cache_dir:
        os.environ["VBENCH_CACHE_DIR"] = os.path.expanduser(cfg.cache_dir)  # read by vbench at import
    try:
        import vbench
    except ImportError as e:
        raise ConfigError("video_scorers: 'vbench' needs the optional vbench package "
                          f"(pip install 'vpo_ray[vbench]'): {e}") from None
    return vbench


def _stage(videos: list[dict], folder: str, queries: dict[str, str], mode: str) -> tuple[dict, dict]:
    """Link the videos into `folder`; ({file path: (query_id, seed)}, prompt_list)."""
    os.makedirs(folder, exist_ok=True)
    where, prompt_list = {}, {}
    seed_rank: dict[str, list[int]] = defaultdict(list)
    for v in sorted(videos, key=lambda v: (v["query_id"], v["seed"])):
        seed_rank[v["query_id"]].append(v["seed"])
    for n, v in enumerate(videos):
        query = queries[v["query_id"]]
        if mode == "vbench_standard":
            name = f"{query}-{seed_rank[v['query_id']].index(v['seed'])}.mp4"
        else:
            name = f"{n:06d}.mp4"
        path = os.path.join(folder, name)
        if storage.is_local(v["video_uri"]):
            src = storage.local_path(v["video_uri"])
            if not os.path.exists(path):
                os.symlink(os.path.abspath(src), path)
        else:
            with open(path, "wb") as fh:
                fh.write(storage.read_bytes(v["video_uri"]))
        where[os.path.abspath(path)] = (v["query_id"], v["seed"])
        prompt_list[name] = query
    return where, prompt_list


def score_videos(videos: list[dict], queries: dict[str, str], cfg: VBenchConfig, work_dir: str,
                 device: Optional[str] = None) -> dict[tuple[str, str, int], dict[str, float]]:
    """{(source, query_id, seed): {dimension: score}} for the judged videos of every source.

    `videos`: eval's video records ({source, query_id, seed, video_uri, error}); those with
    an error or no file are skipped. `queries`: {query_id: the query VBench compares with}.
    """
    vbench = _import_vbench(cfg)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    out: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    by_source: dict[str, list[dict]] = defaultdict(list)
    for v in videos:
        if not v.get("error") and v.get("video_uri"):
            by_source[v["source"]].append(v)
    for source, vids in by_source.items():
        folder = os.path.join(work_dir, "videos", source)
        shutil.rmtree(folder, ignore_errors=True)  # a rerun stages afresh
        where, prompt_list = _stage(vids, folder, queries, cfg.mode)
        bench = vbench.VBench(device, full_info, os.path.join(work_dir, "results"))
        results = bench.evaluate(videos_path=folder, name=source,
                                 prompt_list=prompt_list if cfg.mode == "custom_input" else [],
                                 dimension_list=list(cfg.dimensions), local=True, mode=cfg.mode)
        if results is None:  # older VBench versions only write the JSON
            results = storage.read_json(os.path.join(work_dir, "results", f"{source}_eval_results.json"))
        for dim, (_, per_video) in results.items():
            for item in per_video:
                key = where.get(os.path.abspath(item["video_path"]))
                if key is not None:
                    out[(source, *key)][dim] = float(item["video_results"])
        log.info("vbench: scored %d videos of %s on %s", len(vids), source, ", ".join(cfg.dimensions))
    return dict(out)
