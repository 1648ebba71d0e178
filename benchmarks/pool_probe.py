"""How a Ray Data actor pool of N GPU actors spreads rows: Ray Data's defaults against vpo_ray's pool settings.

    python benchmarks/pool_probe.py --actors 4 --rows 12 --row-s 8 --stagger-s 5 [--gpu]

Each actor "loads" for (its start order) x stagger_s seconds, then works row_s seconds a
row (busy matmuls on its GPU with --gpu). Prints one JSON line per setting: rows by actor
and wall seconds. "default" is ActorPoolStrategy(size=N) as Ray Data ships it (two calls
per actor, as the T2V stage's overlap uses); "vpo" is placement.map_kwargs +
placement.start_together (docs/PLACEMENT.md, "Every actor busy").
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time


def run(setting: str, args) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    from vpo_ray.bench.pool_probe import StaggeredWorker
    from vpo_ray.pipeline import placement

    counter = tempfile.mkdtemp() + "/started"
    kwargs = dict(counter=counter, stagger_s=args.stagger_s, row_s=args.row_s, gpu=args.gpu)
    ds = ray.data.from_items([{"id": i} for i in range(args.rows)], override_num_blocks=args.rows)
    gpus = 1.0 if args.gpu else 0.0
    if setting == "default":
        out = ds.map_batches(StaggeredWorker, fn_constructor_kwargs=kwargs, batch_size=1, num_gpus=gpus or None,
                             num_cpus=0.25, compute=ActorPoolStrategy(size=args.actors, max_concurrent_calls_per_actor=2))
    else:  # 0.25 CPU an actor: the probe's rows are sleeps or GPU work, and a laptop has few cores
        pool = placement.Pool("probe", args.actors, args.actors, gpus, 0.25, batch_size=1, concurrency=2)
        out = placement.start_together(ds.map_batches(StaggeredWorker, fn_constructor_kwargs=kwargs,
                                                      **placement.map_kwargs(pool)), timeout_s=600)
    t0 = time.time()
    counts: dict = {}
    for row in out.iter_rows():
        counts[int(row["actor"])] = counts.get(int(row["actor"]), 0) + 1
    rows = sorted(counts.values(), reverse=True) + [0] * (args.actors - len(counts))
    return {"setting": setting, "rows_by_actor": rows, "wall_s": round(time.time() - t0, 1),
            "even_split_after_last_load_s": args.rows / args.actors * args.row_s + (args.actors - 1) * args.stagger_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--actors", type=int, default=4)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--row-s", type=float, default=8.0)
    p.add_argument("--stagger-s", type=float, default=5.0)
    p.add_argument("--gpu", action="store_true", help="one GPU per actor, rows are matmuls")
    args = p.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for setting in ("default", "vpo"):
        print(json.dumps(run(setting, args)), flush=True)


if __name__ == "__main__":
    main()
