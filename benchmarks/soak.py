"""Soak of vpo_ray on one machine: `vpo serve` under steady load, then `vpo generate` over real
queries, with the resident memory (RSS) of every Ray actor and Serve replica sampled over time.

    python benchmarks/soak.py --out runs/bench/soak --queries ../shared/data/vpo_dpo_queries.json
    python benchmarks/soak.py --out DIR --queries Q.json --serve-minutes 1 --generate-queries 20  # quick check

Phase 1, serve: a local Ray instance, the `vpo serve` app of the tiny preset deployed in
process (127.0.0.1, no auth); a closed-loop probe measures capacity (requests/s), then
open-loop clients send requests at --load x capacity for --serve-minutes (steady load: a
fixed arrival rate, not "as fast as answers come back").
Phase 2, generate: `run_generate` (kind --kind, the tiny preset's job defaults, key=value
overrides after the options) over the first --generate-queries rows of --queries, read by
path (never copied into the repository).

A sampler thread reads every ALIVE actor of this Ray instance from the GCS actor table
(Serve's controller, proxy and replicas, the Ray Data stage actors) and its process's RSS
(psutil; one machine) every --sample-s seconds. RSS growth after warm-up, per actor: the
median of its last 3 samples over the median of the 3 samples from the end of warm-up
(--warmup-share of the phase), minus 1. The target is <= 10% for every actor.

Writes DIR/soak.json and DIR/soak.png (RSS per actor over time for both phases, and the
serve latency and error rate per minute) and prints the JSON record.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

from serve_overload import QUERIES, open_loop, percentile  # benchmarks/ (the script's own folder)

TARGET_GROWTH = 0.10


# ---------------------------------------------------------------------------- RSS sampling

class RssSampler(threading.Thread):
    """Every `every_s`: RSS of each ALIVE actor of the connected Ray instance, keyed by class and id."""

    def __init__(self, every_s: float):
        super().__init__(daemon=True)
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.stop = threading.Event()
        self.series: dict[str, list[tuple[float, float, int]]] = {}  # name -> (t_s, rss_mib, pid)
        self.phase = ""

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        import psutil
        from ray._private import state

        t = round(time.monotonic() - self.t0, 1)
        for info in state.actors().values():
            pid = info.get("Pid")
            if info.get("State") != "ALIVE" or not pid:
                continue
            try:
                rss = psutil.Process(int(pid)).memory_info().rss / 2**20
            except psutil.Error:
                continue
            name = f"{self.phase}/{info.get('ActorClassName') or '?'}#{info['ActorID'][:6]}"
            self.series.setdefault(name, []).append((t, round(rss, 1), int(pid)))

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)


def growth(points: list[tuple[float, float, int]], warm_at: float) -> dict:
    """RSS figures of one actor: start, at the end of warm-up, at the end, growth after warm-up."""
    after = [p for p in points if p[0] >= warm_at]
    out = {"samples": len(points), "start_mib": points[0][1], "max_mib": max(p[1] for p in points),
           "end_mib": points[-1][1], "restarts": len({p[2] for p in points}) - 1}
    if len(after) >= 6:
        warm = statistics.median(p[1] for p in after[:3])
        end = statistics.median(p[1] for p in after[-3:])
        out.update(warm_mib=round(warm, 1), growth_after_warmup=round(end / warm - 1, 4))
    return out


def phase_figures(sampler: RssSampler, phase: str, t_start: float, t_end: float, warmup_share: float) -> dict:
    warm_at = t_start + warmup_share * (t_end - t_start)
    actors = {name.split("/", 1)[1]: growth(pts, warm_at) for name, pts in sampler.series.items()
              if name.startswith(phase + "/")}
    measured = [a["growth_after_warmup"] for a in actors.values() if "growth_after_warmup" in a]
    return {"start_s": t_start, "end_s": t_end, "warmup_until_s": round(warm_at, 1), "actors": actors,
            "max_growth_after_warmup": max(measured) if measured else None,
            "within_target": bool(measured) and max(measured) <= TARGET_GROWTH}


# ---------------------------------------------------------------------------- phase 1: serve

async def closed_loop(url: str, concurrency: int, seconds: float, timeout_s: float) -> float:
    """Requests/s answered 200 by `concurrency` clients sending back to back (the capacity probe)."""
    import aiohttp

    done, deadline, i = 0, time.perf_counter() + seconds, 0

    async def client(session) -> None:
        nonlocal done, i
        while time.perf_counter() < deadline:
            i += 1
            async with session.post(url + "/v1/optimize", json={"query": QUERIES[i % len(QUERIES)], "seed": i}) as r:
                await r.read()
                done += r.status == 200

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


def per_minute(records: list[dict], t_start: float) -> list[dict]:
    rows = []
    for minute in range(int(max((r["t_s"] for r in records), default=t_start) - t_start) // 60 + 1):
        rs = [r for r in records if minute * 60 <= r["t_s"] - t_start < (minute + 1) * 60]
        ok = [r["latency_ms"] for r in rs if r["status"] == 200]
        rows.append({"minute": minute, "requests": len(rs), "errors": len(rs) - len(ok),
                     "p50_ms": percentile(ok, 0.5), "p99_ms": percentile(ok, 0.99)})
    return rows


def serve_phase(args, sampler: RssSampler, port: int) -> dict:
    from ray import serve

    from vpo_ray.serve.app import app_from_config, config_from_args, http_options

    cfg = config_from_args({"port": port, "preset": args.preset, "auth_token_env": "",
                            "max_new_tokens": args.max_new_tokens, "max_batch_size": 8,
                            "autoscaling": {"min_replicas": args.replicas, "max_replicas": args.replicas}})
    sampler.phase = "serve"
    serve.start(http_options=http_options(cfg))
    serve.run(app_from_config(cfg), name=cfg.app_name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(closed_loop(url, 2, 5.0, args.timeout_s))  # warm-up: load, first batches
        capacity = asyncio.run(closed_loop(url, args.probe_concurrency, args.probe_s, args.timeout_s))
        rate = max(0.2, args.load * capacity)
        print(f"[soak] serve capacity {capacity:.2f} req/s; steady load {rate:.2f} req/s for "
              f"{args.serve_minutes} min", file=sys.stderr, flush=True)
        t_start = sampler.now()
        records, _ = asyncio.run(open_loop(url, rate, args.serve_minutes * 60, args.timeout_s, sampler.t0))
        t_end = sampler.now()
    finally:
        serve.shutdown()
    ok = [r["latency_ms"] for r in records if r["status"] == 200]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"capacity_rps": round(capacity, 3), "offered_rps": round(rate, 3), "requests": len(records),
            "statuses": statuses, "error_rate": round(1 - len(ok) / max(1, len(records)), 5),
            "p50_ms": percentile(ok, 0.5), "p99_ms": percentile(ok, 0.99),
            "per_minute": per_minute(records, t_start),
            **phase_figures(sampler, "serve", t_start, t_end, args.warmup_share)}


# ---------------------------------------------------------------------------- phase 2: generate

def generate_phase(args, sampler: RssSampler) -> dict:
    from vpo_ray.config import GenerateConfig, load_config_with_defaults
    from vpo_ray.models.registry import preset_job_defaults
    from vpo_ray.pipeline.generate import run_generate

    out = str(Path(args.out) / "generate")
    cfg = load_config_with_defaults(GenerateConfig, None, args.overrides, preset_job_defaults(args.preset),
                                    kind=args.kind, queries=args.queries, out=out, preset=args.preset,
                                    limit=args.generate_queries)
    sampler.phase = "generate"
    t_start = sampler.now()
    summary = run_generate(cfg)
    t_end = sampler.now()
    n_in = summary["input_queries"]
    return {"kind": args.kind, "queries": n_in, "output_rows": summary["output_rows"],
            "error_rows": summary["errors"], "error_rate": round(summary["errors"] / max(1, n_in), 4),
            "errors_by_reason": summary["errors_by_reason"], "accounted": summary["accounted"],
            "queries_per_s": round(n_in / max(1e-9, summary["pipeline_seconds"]), 3),
            "wall_s": summary["wall_seconds"], **phase_figures(sampler, "generate", t_start, t_end, args.warmup_share)}


# ---------------------------------------------------------------------------- figure

def plot(record: dict, series: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in ("serve", "generate") if p in record]
    fig, axes = plt.subplots(1, len(phases) + ("serve" in record), figsize=(5.5 * (len(phases) + 1), 4.2))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, phase in zip(axes, phases):
        fig_p = record[phase]
        for name, pts in sorted(series.items()):
            if name.startswith(phase + "/"):
                g = fig_p["actors"].get(name.split("/", 1)[1], {}).get("growth_after_warmup")
                label = name.split("/", 1)[1] + (f" ({g:+.1%})" if g is not None else "")
                ax.plot([(p[0] - fig_p["start_s"]) / 60 for p in pts], [p[1] for p in pts], label=label)
        ax.axvline((fig_p["warmup_until_s"] - fig_p["start_s"]) / 60, color="grey", ls=":", label="end of warm-up")
        ax.set_xlabel("minutes into the phase")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title(f"{phase}: RSS per actor (growth after warm-up)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if "serve" in record:
        ax = axes[-1]
        rows = record["serve"]["per_minute"]
        ax.plot([r["minute"] for r in rows], [r["p50_ms"] for r in rows], marker="o", label="p50")
        ax.plot([r["minute"] for r in rows], [r["p99_ms"] for r in rows], marker="^", label="p99")
        ax.set_xlabel("minute of steady load")
        ax.set_ylabel("latency of answered requests (ms)")
        ax.set_title(f"serve at {record['serve']['offered_rps']} req/s: error rate "
                     f"{record['serve']['error_rate']:.2%}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for soak.json, soak.png and the generate output")
    p.add_argument("--queries", help="query file for the generate phase (e.g. ../shared/data/vpo_dpo_queries.json)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--phases", default="serve,generate", help="comma list of serve, generate")
    p.add_argument("--serve-minutes", type=float, default=10.0)
    p.add_argument("--load", type=float, default=0.5, help="offered load as a share of the measured capacity")
    p.add_argument("--probe-s", type=float, default=20.0, help="capacity probe length")
    p.add_argument("--probe-concurrency", type=int, default=8)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request")
    p.add_argument("--kind", default="dpo", choices=["sft", "dpo"])
    p.add_argument("--generate-queries", type=int, default=2000)
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling interval")
    p.add_argument("--warmup-share", type=float, default=0.2, help="share of each phase counted as warm-up")
    p.add_argument("--ray-cpus", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="GenerateConfig key=value overrides for the generate phase")
    args = p.parse_args(argv)
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if "generate" in phases and not args.queries:
        p.error("--queries is needed for the generate phase")
    for k, v in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VPO_PROGRESS": "0"}.items():
        os.environ.setdefault(k, v)

    from vpo_ray.config import RayConfig
    from vpo_ray.ray_utils import init_ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray = init_ray(RayConfig(num_cpus=args.ray_cpus, log_to_driver=False))
    record: dict = {"benchmark": "soak", "host": platform.node(), "cpus": os.cpu_count(), "preset": args.preset,
                    "sample_s": args.sample_s, "warmup_share": args.warmup_share, "target_growth": TARGET_GROWTH}
    sampler = RssSampler(args.sample_s)
    sampler.start()
    try:
        if "serve" in phases:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            record["serve"] = serve_phase(args, sampler, port)
        if "generate" in phases:
            record["generate"] = generate_phase(args, sampler)
    finally:
        sampler.stop.set()
        sampler.join(30)
        ray.shutdown()
    record["within_target"] = all(record[p]["within_target"] for p in phases)
    (out / "soak.json").write_text(json.dumps({**record, "series": sampler.series}, indent=1) + "\n")
    plot(record, sampler.series, out / "soak.png")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
