"""`vpo loop`: the whole VPO recipe, round after round, on one Ray instance.

    round_0/sft_data  <- generate sft (preset optimizer)      round_0/sft  <- train SFT
    round_k/dpo_data  <- generate dpo (optimizer of round k-1) round_k/dpo  <- train DPO   (k = 1..N)

The SFT set and the DPO sets are built from different query files (`--sft-queries`,
`--dpo-queries`), as in the paper: thu-coai/VPO data/sft_prompts.json (11,640 queries)
and data/dpo_prompts.json (9,956), one query in common. `--queries` alone gives one file
to every stage (logged: that departs from the recipe).

Each DPO round starts from the previous round's export and uses it as the frozen
reference. Every stage writes its own folder; a stage whose summary.json is there
is skipped, so re-running the same command continues where a crash stopped it.

`--tune` picks what the DPO rounds train: the optimizer (the VPO method, default), the
video model (Diffusion-DPO on same-prompt video pairs, vpo_ray/train/video_dpo.py), or
both. With the video model tuned, round k's set is also the video preference set
(video_dpo_set, >= 2 seeds per prompt), round_k/video_dpo trains the T2V model from the
previous round's, and round k+1 renders with it.

Settings per stage go in as prefixed overrides: `gen.num_samples=4`, `sft.max_steps=20`,
`dpo.beta=0.2`, `train.deepspeed_stage=3` (both optimizer trainings), `video_dpo.beta=2500`,
or a YAML file with `generate:`, `train:`, `sft:`, `dpo:` and `video_dpo:` sections.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Callable, Optional

from vpo_ray import storage
from vpo_ray.config import (ConfigError, GenerateConfig, TrainConfig, load_config, load_config_with_defaults,
                            parse_override, read_yaml_mapping)
from vpo_ray.models.registry import preset_job_defaults
from vpo_ray.train.video_dpo_config import VideoDPOConfig

log = logging.getLogger("vpo.loop")

SECTIONS = {"gen": "generate", "generate": "generate", "train": "train", "sft": "sft", "dpo": "dpo",
            "video_dpo": "video_dpo"}
TUNE = ("optimizer", "video", "both")  # what the DPO rounds train
# Generate settings a round that tunes the video model needs unless the user sets them:
# two seeds per prompt, so that two videos of one prompt can pair (Diffusion-DPO).
VIDEO_ROUND_DEFAULTS = {"video.seeds_per_prompt": 2}


def split_overrides(overrides: list[str], yaml_path: Optional[str] = None) -> tuple[dict, dict]:
    """(YAML values, overrides) per section: `sft.max_steps=3` -> overrides["sft"] == ["max_steps=3"]."""
    values: dict[str, dict] = {name: {} for name in set(SECTIONS.values())}
    out: dict[str, list[str]] = {name: [] for name in set(SECTIONS.values())}
    if yaml_path:
        data = read_yaml_mapping(yaml_path)
        for section, given in data.items():
            if section not in SECTIONS or not isinstance(given, dict):
                raise ConfigError(f"loop config {yaml_path}: unknown section '{section}' "
                                  "(known: generate, train, sft, dpo, video_dpo)")
            values[SECTIONS[section]].update(dict(_flatten(given)))
    for item in overrides:
        key, _ = parse_override(item)
        section, _, rest = key.partition(".")
        if section not in SECTIONS or not rest:
            raise ConfigError(f"loop override '{item}': prefix it with gen., train., sft., dpo. or video_dpo.")
        out[SECTIONS[section]].append(item[len(section) + 1:])
    return values, out


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _done(out: str) -> Optional[dict]:
    uri = storage.join(out, "summary.json")
    return storage.read_json(uri) if storage.exists(uri) else None


def _query_files(rounds: int, queries: str, dpo_queries: Optional[str], tune: str) -> dict:
    """{"sft": file, "dpo": file} after checking the loop's own arguments."""
    if rounds < 0:
        raise ConfigError(f"rounds: expected >= 0 DPO rounds, got {rounds}")
    if not queries:
        raise ConfigError("queries: no SFT query file given (--sft-queries PATH)")
    if tune not in TUNE:
        raise ConfigError(f"tune: expected one of {', '.join(TUNE)}, got {tune!r}")
    if rounds and not dpo_queries:
        log.warning("one query file for the SFT and the DPO sets; the recipe uses two (--sft-queries, --dpo-queries)")
    return {"sft": queries, "dpo": dpo_queries or queries}


def run_loop(rounds: int, queries: str, out: str, preset: str = "tiny", overrides: Optional[list[str]] = None,
             config_path: Optional[str] = None, generate_fn: Optional[Callable[[GenerateConfig], dict]] = None,
             train_fn: Optional[Callable[[TrainConfig], dict]] = None, tune: str = "optimizer",
             video_train_fn: Optional[Callable] = None, dpo_queries: Optional[str] = None,
             weights: Optional[str] = None) -> dict:
    """SFT round on `queries`, then `rounds` DPO rounds on `dpo_queries` (None: `queries` too)
    tuning `tune`; returns (and writes) DIR/loop_summary.json.

    `weights` ("pretrained" | "random") sets both `gen.weights` and `train.weights` unless they are given.
    """
    query_files = _query_files(rounds, queries, dpo_queries, tune)
    if weights is not None:
        overrides = [f"gen.weights={weights}", f"train.weights={weights}"] + list(overrides or [])
    generate_fn, train_fn, video_train_fn = _stage_functions(generate_fn, train_fn, video_train_fn)
    values, sections = split_overrides(overrides or [], config_path)
    video = tune in ("video", "both")
    # As `vpo generate --preset` does: the preset's job settings fill only keys the YAML
    # sections and overrides leave unset. They are generate settings; training has none.
    gen_defaults = preset_job_defaults(preset)

    def gen_cfg(kind: str, data_dir: str, optimizer: Optional[str], t2v: Optional[str] = None) -> GenerateConfig:
        video_set = video and kind == "dpo"  # this set also tunes the video model
        extra = {"video_dpo_set": True, "t2v": t2v} if video_set else {}
        defaults = {**gen_defaults, **VIDEO_ROUND_DEFAULTS} if video_set else gen_defaults
        return load_config_with_defaults(GenerateConfig, None, sections["generate"], defaults, **{
            **values["generate"], "kind": kind, "queries": query_files[kind], "out": data_dir, "preset": preset,
            "optimizer": optimizer, **extra})

    def train_cfg(kind: str, data_dir: str, train_dir: str, model: Optional[str]):
        if kind == "video_dpo":
            return load_config(VideoDPOConfig, None, sections[kind], **{
                **values[kind], "data": data_dir, "out": train_dir, "preset": preset, "model": model})
        return load_config(TrainConfig, None, sections["train"] + sections[kind], **{
            **values["train"], **values[kind], "method": kind, "data": data_dir, "out": train_dir,
            "preset": preset, "model": model})

    from vpo_ray.pipeline.generate import check_config as check_generate  # rules across keys (num_samples, ...)

    for kind in ("sft", "dpo") if rounds else ("sft",):  # every stage's settings fail now, not hours in
        check_generate(gen_cfg(kind, out, None))
        train_cfg(kind, out, out, None)
    if video and rounds:
        train_cfg("video_dpo", out, out, None)
    t0 = time.perf_counter()
    storage.makedirs(out)
    history: list[dict] = []

    def stage(kind: str, k: int, data_dir: str, model: Optional[str]) -> str:
        """Train `kind` on round k's set from `model`; returns the exported model."""
        train_dir = storage.join(out, f"round_{k}", kind)
        trained = _done(train_dir)
        if trained is None:
            log.info("round %d: training %s from %s", k, kind, model or f"the {preset} model")
            fn = video_train_fn if kind == "video_dpo" else train_fn
            trained = fn(train_cfg(kind, data_dir, train_dir, model))
        history[-1]["train" if kind != "video_dpo" else "video_dpo"] = {
            key: trained.get(key) for key in ("model", "global_step", "metrics", "wall_seconds")}
        return trained["model"]

    def build(kind: str, k: int, optimizer: Optional[str], t2v: Optional[str] = None) -> str:
        data_dir = storage.join(out, f"round_{k}", f"{kind}_data")
        gen = _done(data_dir)
        if gen is None:
            log.info("round %d: building the %s set with %s", k, kind, optimizer or f"the {preset} optimizer")
            gen = generate_fn(gen_cfg(kind, data_dir, optimizer, t2v))
        history.append({"round": k, "kind": kind, "data": data_dir, "t2v": t2v, "generate": _brief(gen)})
        return _trainable(data_dir, k, kind, gen)

    optimizer, t2v = stage("sft", 0, build("sft", 0, None), None), None
    for k in range(1, rounds + 1):
        data_dir = build("dpo", k, optimizer, t2v)
        if video:  # the next round renders with this round's video model
            t2v = stage("video_dpo", k, data_dir, t2v)
        if tune != "video":
            optimizer = stage("dpo", k, data_dir, optimizer)
    summary = {"rounds": rounds, "tune": tune, "queries": query_files, "out": out, "optimizer": optimizer,
               "t2v": t2v, "history": history, "wall_seconds": round(time.perf_counter() - t0, 2)}
    storage.write_json(storage.join(out, "loop_summary.json"), summary)
    return summary


def _stage_functions(generate_fn, train_fn, video_train_fn) -> tuple:
    """The real stages wherever a caller (a test) gives none."""
    if generate_fn is None:
        from vpo_ray.pipeline.generate import run_generate as generate_fn
    if train_fn is None:
        from vpo_ray.train.runner import train as train_fn
    if video_train_fn is None:
        from vpo_ray.train.video_dpo import train_video_dpo as video_train_fn
    return generate_fn, train_fn, video_train_fn


def _trainable(data_dir: str, k: int, kind: str, gen: dict) -> str:
    """`data_dir`, or a DataError naming the round and why its set has no row to train on (from its summary)."""
    from vpo_ray.train.data import DataError

    if gen.get("output_rows", 1) > 0:
        return data_dir
    reasons = sorted((gen.get("errors_by_reason") or {}).items(), key=lambda item: -item[1])[:3]
    why = "; ".join(f"{n} x {reason}" for reason, n in reasons) or "none recorded"
    hint = (" A DPO set has no pair when every sampled prompt passes the judge and no video pair clears"
            f" pair_margin: sample more (num_samples, sampling.temperature), or take round {k - 1}'s optimizer"
            " as the result." if kind == "dpo" else "")
    raise DataError(f"round {k}: the {kind} set in {data_dir} has no rows to train on; error rows "
                    f"({gen.get('errors', 0)}, {storage.join(data_dir, 'errors.jsonl')}): {why}.{hint}")


def _brief(gen: dict) -> dict:
    keys = ("input_queries", "output_rows", "duplicates", "errors", "output", "wall_seconds")
    return {k: gen[k] for k in keys if k in gen}


def add_arguments(p) -> None:
    p.add_argument("--rounds", type=int, default=1, help="DPO rounds after the SFT round (default 1)")
    p.add_argument("--sft-queries", help="queries of the SFT set (json/jsonl/parquet/csv or hf://dataset[:split])")
    p.add_argument("--dpo-queries", help="queries of the DPO sets (the recipe uses a separate file)")
    p.add_argument("--queries", help="one query file for every set (instead of the two above)")
    p.add_argument("--out", default="runs/loop", help="output directory; round_k/ folders go here")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--tune", choices=TUNE, default="optimizer",
                   help="what the DPO rounds train: the optimizer (VPO, default), the video model (Diffusion-DPO on "
                        "same-prompt video pairs), or both")
    p.add_argument("--weights", choices=["pretrained", "random"], default=None,
                   help="random: the preset's real architectures with random weights, for every stage")
    p.add_argument("--config", help="YAML with generate:/train:/sft:/dpo:/video_dpo: sections")
    p.add_argument("overrides", nargs="*", help="prefixed overrides: gen.num_samples=4 sft.max_steps=20 dpo.beta=0.2 "
                                                "video_dpo.max_steps=50")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.queries and (args.sft_queries or args.dpo_queries):
        raise ConfigError("give --queries or --sft-queries/--dpo-queries, not both")
    summary = run_loop(args.rounds, args.sft_queries or args.queries, args.out, args.preset, args.overrides,
                       args.config, tune=args.tune, dpo_queries=args.dpo_queries or args.queries,
                       weights=args.weights)
    print(json.dumps({"optimizer": summary["optimizer"], "t2v": summary["t2v"], "rounds": summary["rounds"],
                      "wall_seconds": summary["wall_seconds"]}, indent=2))
    return 0
