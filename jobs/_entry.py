"""The one helper every job module calls: `vpo <subcommand> --config FILE [key=value ...]`.

A job module names its `vpo` subcommand (e.g. ["generate", "sft"]); everything else
(the config file, dotted overrides, other flags) passes through to `vpo_ray.cli.main`
untouched, so the jobs follow the CLI as it grows. `--config` defaults to the YAML next
to the module, resolved against the module's folder, so a job runs from any directory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def default_config(module_file: str) -> Path:
    """jobs/<name>.py -> jobs/<name>.yaml."""
    return Path(module_file).with_suffix(".yaml")


def positional_from_config(key: str, config: Path, rest: Sequence[str], default: str) -> str:
    """A value a subcommand takes as a positional (`vpo bench NAME`), read like a config key:
    the last `key=value` override, else the YAML's `key`, else `default`."""
    for item in reversed(list(rest)):
        if item.startswith(f"{key}="):
            return item.split("=", 1)[1]
    if config.is_file():
        from vpo_ray.config import read_yaml_mapping

        data = read_yaml_mapping(config)
        if data.get(key):
            return str(data[key])
    return default


def build_argv(subcommand: Sequence[str], module_file: str, argv: Optional[Sequence[str]] = None,
               positional: Optional[tuple[str, str]] = None) -> list[str]:
    """The argv handed to `vpo`: subcommand, --config, then the caller's remaining arguments.

    `positional=(key, default)` appends a config key's value to the subcommand for commands
    that take it positionally (`vpo bench video-sampling`), so the YAML stays the one place.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{Path(module_file).stem}",
        description=f"ray job entry point for `vpo {' '.join(subcommand)}`; "
                    "other arguments (key=value overrides, flags) go to it unchanged",
        add_help=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    known, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if known.help:
        parser.print_help()
        return [*subcommand, "--help"]
    config = Path(known.config) if known.config else default_config(module_file)
    if not config.exists() and not config.is_absolute():
        beside = Path(module_file).parent / config.name  # `--config jobs/x.yaml` from another cwd
        config = beside if beside.exists() else config
    head = list(subcommand)
    if positional:
        head.append(positional_from_config(positional[0], config, rest, positional[1]))
    return [*head, "--config", str(config), *rest]


def run(subcommand: Sequence[str], module_file: str, argv: Optional[Sequence[str]] = None,
        positional: Optional[tuple[str, str]] = None) -> int:
    from vpo_ray.cli import main

    return main(build_argv(subcommand, module_file, argv, positional))
