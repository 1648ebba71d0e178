"""`vpo loop`: the whole VPO recipe, round after round, on one Ray instance.

    round_0/sft_data  <- generate sft (preset optimizer)      round_0/sft  <- train SFT
    round_k/dpo_data  <- generate dpo (optimizer of round k-1) round_k/dpo  <- train DPO   (k = 1..N)

Each DPO round starts from the previous round's export and uses it as the frozen
reference. Every stage writes its own folder; a stage whose summary.json is there
is skipped, so re-running the same command continues where a crash stopped it.

Settings per stage go in as prefixed overrides: `gen.num_samples=4`, `sft.max_steps=20`,
`dpo.beta=0.2`, `train.deepspeed_stage=3` (both trainings), or a YAML file with
`generate:`, `train:`, `sft:` and `dpo:` sections.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from vpo_ray import storage
from vpo_ray.config import (ConfigError, GenerateConfig, TrainConfig, load_config, load_config_with_defaults,
                            parse_override)
from vpo_ray.models.registry import preset_job_defaults

log = logging.getLogger("vpo.loop")

SECTIONS = {"gen": "generate", "generate": "generate", "train": "train", "sft": "sft", "dpo": "dpo"}


def split_overrides(overrides: list[str], yaml_path: Optional[str] = None) -> tuple[dict, dict]:
    """(YAML values, overrides) per section: `sft.max_steps=3` -> overrides["sft"] == ["max_steps=3"]."""
    values: dict[str, dict] = {"generate": {}, "train": {}, "sft": {}, "dpo": {}}
    out: dict[str, list[str]] = {"generate": [], "train": [], "sft": [], "dpo": []}
    if yaml_path:
        import yaml

        data = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"loop config {yaml_path}: expected sections generate/train/sft/dpo")
        for section, given in data.items():
            if section not in SECTIONS or not isinstance(given, dict):
                raise ConfigError(f"loop config {yaml_path}: unknown section '{section}' (known: generate, train, sft, dpo)")
            values[SECTIONS[section]].update(dict(_flatten(given)))
    for item in overrides:
        key, _ = parse_override(item)
        section, _, rest = key.partition(".")
        if section not in SECTIONS or not rest:
            raise ConfigError(f"loop override '{item}': prefix it with gen., train., sft. or dpo.")
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


def run_loop(rounds: int, queries: str, out: str, preset: str = "tiny", overrides: Optional[list[str]] = None,
             config_path: Optional[str] = None, generate_fn: Optional[Callable[[GenerateConfig], dict]] = None,
             train_fn: Optional[Callable[[TrainConfig], dict]] = None) -> dict:
    """SFT round then `rounds` DPO rounds; returns (and writes) DIR/loop_summary.json."""
    if rounds < 0:
        raise ConfigError(f"rounds: expected >= 0 DPO rounds, got {rounds}")
    if not queries:
        raise ConfigError("queries: no query file given (--queries PATH)")
    if generate_fn is None:
        from vpo_ray.pipeline.generate import run_generate as generate_fn
    if train_fn is None:
        from vpo_ray.train.runner import train as train_fn
    values, sections = split_overrides(overrides or [], config_path)
    # As `vpo generate --preset` does: the preset's job settings fill only keys the YAML
    # sections and overrides leave unset. They are generate settings; training has none.
    gen_defaults = preset_job_defaults(preset)

    def gen_cfg(kind: str, data_dir: str, optimizer: Optional[str]) -> GenerateConfig:
        return load_config_with_defaults(GenerateConfig, None, sections["generate"], gen_defaults, **{
            **values["generate"], "kind": kind, "queries": queries, "out": data_dir, "preset": preset,
            "optimizer": optimizer})

    def train_cfg(kind: str, data_dir: str, train_dir: str, optimizer: Optional[str]) -> TrainConfig:
        return load_config(TrainConfig, None, sections["train"] + sections[kind], **{
            **values["train"], **values[kind], "method": kind, "data": data_dir, "out": train_dir,
            "preset": preset, "model": optimizer})

    for kind in ("sft", "dpo") if rounds else ("sft",):  # every stage's settings fail now, not hours in
        gen_cfg(kind, out, None)
        train_cfg(kind, out, out, None)
    t0 = time.perf_counter()
    storage.makedirs(out)
    history: list[dict] = []

    def stage(kind: str, k: int, optimizer: Optional[str]) -> str:
        """Build round k's set with `optimizer`, train on it; returns the exported model."""
        rdir = storage.join(out, f"round_{k}")
        data_dir, train_dir = storage.join(rdir, f"{kind}_data"), storage.join(rdir, kind)
        gen = _done(data_dir)
        if gen is None:
            gcfg = gen_cfg(kind, data_dir, optimizer)
            log.info("round %d: building the %s set with %s", k, kind, optimizer or f"the {preset} optimizer")
            gen = generate_fn(gcfg)
        trained = _done(train_dir)
        if trained is None:
            tcfg = train_cfg(kind, data_dir, train_dir, optimizer)
            log.info("round %d: training %s from %s", k, kind.upper(), optimizer or f"the {preset} optimizer")
            trained = train_fn(tcfg)
        history.append({"round": k, "kind": kind, "data": data_dir, "generate": _brief(gen),
                        "train": {key: trained.get(key) for key in ("model", "global_step", "metrics", "wall_seconds")}})
        return trained["model"]

    current = stage("sft", 0, None)
    for k in range(1, rounds + 1):
        current = stage("dpo", k, current)
    summary = {"rounds": rounds, "queries": queries, "out": out, "optimizer": current, "history": history,
               "wall_seconds": round(time.perf_counter() - t0, 2)}
    storage.write_json(storage.join(out, "loop_summary.json"), summary)
    return summary


def _brief(gen: dict) -> dict:
    keys = ("input_queries", "output_rows", "duplicates", "errors", "output", "wall_seconds")
    return {k: gen[k] for k in keys if k in gen}


def add_arguments(p) -> None:
    p.add_argument("--rounds", type=int, default=1, help="DPO rounds after the SFT round (default 1)")
    p.add_argument("--queries", help="query file (json/jsonl/parquet/csv) or hf://dataset[:split]")
    p.add_argument("--out", default="runs/loop", help="output directory; round_k/ folders go here")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--config", help="YAML with generate:/train:/sft:/dpo: sections")
    p.add_argument("overrides", nargs="*", help="prefixed overrides: gen.num_samples=4 sft.max_steps=20 dpo.beta=0.2")


def run(args) -> int:
    from vpo_ray.train.data import DataError
    from vpo_ray.train.runner import TrainError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        summary = run_loop(args.rounds, args.queries, args.out, args.preset, args.overrides, args.config)
    except DataError as e:
        print(f"vpo loop: bad training data: {e}", file=sys.stderr)
        return 2
    except TrainError as e:
        print(f"vpo loop: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"optimizer": summary["optimizer"], "rounds": summary["rounds"],
                      "wall_seconds": summary["wall_seconds"]}, indent=2))
    return 0
