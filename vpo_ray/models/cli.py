"""`vpo models`: list presets and registry entries, build the tiny preset, check a model id.

    vpo models list
    vpo models build --preset tiny        # builds into $VPO_CACHE, prints paths and seconds
    vpo models check cogvideox-2b         # reads the config only (no weights); clear error offline
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    sub.add_parser("list", help="presets and registry entries as a table")
    b = sub.add_parser("build", help="build the tiny models of a preset (offline) and print their paths")
    b.add_argument("--preset", default="tiny", help="preset whose tiny models to build (default: tiny)")
    b.add_argument("--all", action="store_true", help="build every tiny entry, not only the preset's")
    c = sub.add_parser("check", help="resolve a model and read only its config")
    c.add_argument("id", help="registry name, local path or Hugging Face id")
    c.add_argument("--json", action="store_true", help="print the result as JSON")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _list() -> int:
    from vpo_ray.models.registry import MODELS, PRESETS, ROLES

    print("Presets")
    print(_table([["preset", *ROLES]] + [[p, *(roles[r] for r in ROLES)] for p, roles in PRESETS.items()]))
    print()
    print("Models")
    rows = [["name", "role", "model_id", "class", "dtype", "gpus", "defaults"]]
    for s in MODELS.values():
        defaults = ", ".join(f"{k}={v}" for k, v in s.kwargs if k != "negative_prompt")
        rows.append([s.name, s.role, s.model_id + (" (tiny, built offline)" if s.tiny else ""), s.model_class,
                     s.dtype, f"{s.num_gpus:g}", defaults])
    print(_table(rows))
    return 0


def _build(preset: str, build_all: bool) -> int:
    from vpo_ray.models.registry import MODELS, PRESETS, ModelLoadError, cache_root, model_path

    if build_all:
        names = [n for n, s in MODELS.items() if s.tiny]
    elif preset in PRESETS:
        names = list(dict.fromkeys(PRESETS[preset].values()))
    else:
        print(f"vpo models build: unknown preset {preset!r} (presets: {', '.join(PRESETS)})", file=sys.stderr)
        return 2
    skipped = [n for n in names if not MODELS[n].tiny]
    for n in skipped:
        print(f"{n}: not a tiny model (real weights are not built; pass a local path)")
    print(f"cache: {cache_root()}")
    total = time.perf_counter()
    for n in names:
        if n in skipped:
            continue
        t0 = time.perf_counter()
        try:
            path = model_path(n)
        except (ModelLoadError, OSError, RuntimeError) as e:
            print(f"vpo models build: {n}: {e}", file=sys.stderr)
            return 1
        print(f"{n:<18} {time.perf_counter() - t0:6.2f}s  {path}")
    print(f"total {time.perf_counter() - total:.2f}s")
    return 0


def _check(model: str, as_json: bool) -> int:
    from vpo_ray.models.registry import ModelLoadError, check_config

    try:
        info = check_config(model)
    except ModelLoadError as e:
        print(f"vpo models check: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    else:
        extra = info.get("model_type") or ""
        print(f"ok: {model} -> {info['path']} ({info['kind']} {info['class']} {extra})".rstrip(" )") + ")")
    return 0


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "models_command", None)
    if action == "list":
        return _list()
    if action == "build":
        return _build(args.preset, args.all)
    if action == "check":
        return _check(args.id, args.json)
    print("usage: vpo models {list,build,check} ...", file=sys.stderr)
    return 2
