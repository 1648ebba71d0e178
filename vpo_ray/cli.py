"""`vpo` console script: a thin dispatcher; each subcommand lives in its own module.

A command module exposes `add_arguments(parser)` and `run(args) -> int` and keeps heavy
imports (torch, ray, transformers) inside functions so `vpo --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# The one place exceptions become exit codes. 2: the user gave something wrong (a path, a
# file, a model id, a config value, training data); 1: the job itself failed. The CLI
# prints a one-line message, never a traceback. First match wins (DataError is a
# ConfigError). Classes are looked up in sys.modules only, so `vpo --help` imports nothing
# heavy: an exception cannot be an instance of a class whose module was never imported.
ERROR_EXITS = (  # (module, class, exit code, what the message starts with)
    ("vpo_ray.train.data", "DataError", 2, "bad training data: "),
    ("vpo_ray.config_loader", "ConfigError", 2, "config error: "),
    ("vpo_ray.data.readers", "IngestError", 2, ""),
    ("vpo_ray.storage", "StorageError", 2, ""),
    ("vpo_ray.models.hub", "ModelLoadError", 2, ""),
    ("vpo_ray.train.runner", "TrainError", 1, ""),
    ("vpo_ray.bundle.spec", "BundleError", 1, ""),
)


def exit_code_for(e: BaseException) -> tuple[int, str] | None:
    """(exit code, message prefix) for an exception the CLI reports in one line, else None."""
    for module, name, code, prefix in ERROR_EXITS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return code, prefix
    return None


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
        mod = importlib.import_module(module)  # a command that does not import is a bug: it fails here
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
    from vpo_ray.storage import apply_umask

    try:
        apply_umask()  # artifacts readable by the group and others unless VPO_UMASK says otherwise
        return int(args._run(args) or 0)
    except Exception as e:  # noqa: BLE001 - only the classes in ERROR_EXITS are caught here
        known = exit_code_for(e)
        if known is None:
            raise
        code, prefix = known
        # a user error reads best as one line; a failed job's message may carry a tool's output
        message = _one_line(e) if code == 2 else (str(e).strip() or type(e).__name__)
        print(f"vpo {args.command}: {prefix}{message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"vpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
