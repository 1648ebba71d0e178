"""`vpo bench video-sampling|llm-stages|train-step|video-dpo-step|pipeline|gpu-faults`: print one JSON record, write
it (and a PNG) under --out.

    vpo bench video-sampling --preset cogvideox-2b --out runs/bench --videos 3 baseline=[vae-tiling]
    vpo bench llm-stages --preset tiny --out runs/bench llm.rows=4 llm.phases=[engine,verdict]
    vpo bench train-step --preset tiny --out runs/bench train.steps=2
    vpo bench video-dpo-step --preset cogvideox-2b --out runs/bench workers=[1,4]
    vpo bench pipeline --preset paper --out runs/bench pipeline.limit=20 pipeline.queries=PATH
    vpo bench gpu-faults --out runs/bench          # CUDA OOM / hung-call drill (vpo_ray/bench/gpu_faults.py)

`--preset tiny` runs everything on CPU in CI time (the harness, not speed); any other
preset or registry name builds the real architecture with random weights. Further
settings are `key=value` overrides of `BenchConfig` (vpo_ray/bench/config.py); video-dpo-step takes
`BenchVideoDPOConfig` (vpo_ray/train/video_dpo_config.py) instead.
"""
from __future__ import annotations

import argparse

BENCHMARKS = ("video-sampling", "llm-stages", "train-step", "video-dpo-step", "pipeline", "gpu-faults")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    parser.add_argument("--preset", default=None, help="tiny | a registry model name | pipeline: a preset (default: tiny)")
    parser.add_argument("--out", default=None, help="output directory (default runs/bench)")
    parser.add_argument("--videos", type=int, default=None, help="timed videos per variant (video-sampling)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per variant, excluded from figures")
    parser.add_argument("--config", default=None, help="YAML file with BenchConfig fields")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="BenchConfig overrides")


def run_bench(cfg) -> dict:
    if cfg.name == "video-sampling":
        from vpo_ray.bench import video_sampling as mod
    elif cfg.name == "llm-stages":
        from vpo_ray.bench import llm_stages as mod
    elif cfg.name == "pipeline":
        from vpo_ray.bench import pipeline as mod
    elif cfg.name == "gpu-faults":
        from vpo_ray.bench import gpu_faults as mod
    else:
        from vpo_ray.bench import train_step as mod
    return mod.run(cfg)


def run(args: argparse.Namespace) -> int:
    from vpo_ray.bench.common import print_record
    from vpo_ray.bench.config import BenchConfig
    from vpo_ray.config import load_config

    if args.name == "video-dpo-step":  # the video model's training step: its own config
        from vpo_ray.bench import video_dpo_step
        from vpo_ray.train.video_dpo_config import BenchVideoDPOConfig

        print_record(video_dpo_step.run(load_config(BenchVideoDPOConfig, args.config, args.overrides,
                                                    preset=args.preset, out=args.out, warmup=args.warmup)))
        return 0
    cfg = load_config(BenchConfig, args.config, args.overrides, name=args.name, preset=args.preset, out=args.out,
                      videos=args.videos, warmup=args.warmup)
    record = run_bench(cfg)
    print_record(record)
    return 0
