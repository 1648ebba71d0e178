"""`vpo` console script: a thin dispatcher; each subcommand lives in its own module.

A command module exposes `add_arguments(parser)` and `run(args) -> int` and keeps heavy
imports (torch, ray, transformers) inside functions so `vpo --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Errors that mean "the user gave something wrong" (a path, a file, a model id, a config
# value): the CLI prints their one-line message and exits 2, never a traceback. Looked up
# in sys.modules only, so `vpo --help` imports nothing heavy: an exception cannot be an
# instance of a class whose module was never imported.
USER_ERRORS = (("vpo_ray.data.ingest", "IngestError"), ("vpo_ray.storage", "StorageError"),
               ("vpo_ray.models.registry", "ModelLoadError"), ("vpo_ray.train.data", "DataError"))


def _user_error(e: BaseException) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return False


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

COMMANDS = {
    "demo": ("vpo_ray.demo", "run the whole VPO loop on the tiny preset with a local Ray instance"),
    "generate": ("vpo_ray.pipeline.generate", "build the SFT set or the DPO set from raw queries (Ray Data)"),
    "train": ("vpo_ray.train.runner", "train the optimizer with SFT or DPO (Ray Train + TRL + DeepSpeed)"),
    "loop": ("vpo_ray.train.loop", "chain build-SFT, train-SFT, then N rounds of build-DPO and train-DPO"),
    "serve": ("vpo_ray.serve.app", "serve the optimizer over HTTP (Ray Serve)"),
    "eval": ("vpo_ray.eval.run", "evaluate prompt sources on text and video; write tables and an HTML report"),
    "bench": ("vpo_ray.bench.cli", "benchmarks: video-sampling, llm-stages, train-step; the gpu-faults drill"),
    "bundle": ("vpo_ray.bundle", "build an offline wheel bundle for air-gapped GPU nodes"),
    "models": ("vpo_ray.models.cli", "list presets, build the tiny preset, check model ids"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpo", description="VPO prompt optimization for text-to-video, on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("vpo_ray"):
                p.set_defaults(_missing=module)
                continue
            raise
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`--out D a=1`): argparse would reject
    # positionals after optionals, so stray key=value words join `args.overrides`.
    args, extra = parser.parse_known_args(argv)
    bad = [w for w in extra if "=" not in w or w.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"vpo {args.command} takes no key=value overrides: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"vpo {args.command}: not available in this build ({args._missing} missing)", file=sys.stderr)
        return 2
    from vpo_ray.config import ConfigError
    from vpo_ray.storage import apply_umask
    try:
        apply_umask()  # artifacts readable by the group and others unless VPO_UMASK says otherwise
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"vpo {args.command}: config error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only the user-facing classes are caught here
        if not _user_error(e):
            raise
        print(f"vpo {args.command}: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
