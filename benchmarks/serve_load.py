"""Load benchmark of `vpo serve`: latency percentiles and requests/s against concurrency,
with dynamic batching off (max_batch_size=1) and on (max_batch_size=N), and against the
number of optimizer replicas.

    python benchmarks/serve_load.py --out runs/bench/serve --preset tiny
    python benchmarks/serve_load.py --out DIR --replicas 1,2,4 --replica-gpus 1   # one replica per GPU
    python benchmarks/serve_load.py --out DIR --url http://127.0.0.1:8000   # an already running server
    python benchmarks/serve_load.py --out DIR --batch-sizes 8 --concurrency 16 --overload 1,2,4 --deadline-s 10

Without --url it starts a local Ray instance and deploys the app once per (replica count,
batch setting), with autoscaling pinned to that replica count so only those differ; the
record's `replica_scaling` gives requests/s at the highest concurrency per replica count and
its efficiency against linear. Each concurrency level runs
closed-loop aiohttp clients for --duration-s seconds or --max-requests requests,
whichever comes first; traffic goes to 127.0.0.1 only. Prints one JSON record and writes
DIR/serve_load.json and DIR/serve_load.png.

Overload mode (--overload M1,M2,...): after the closed-loop levels of the first setting, its
highest requests/s is taken as the capacity; then requests arrive open-loop at M x capacity
for --duration-s each, with a deadline (--deadline-s, X-VPO-Deadline-S), and a refused
request is sent again after its Retry-After until answered (benchmarks/serve_overload.py).
Per level: goodput, p50/p99 of accepted attempts, the share of attempts refused and how
fast the refusals came, and requests lost (never answered). Written as the record's
`overload` list and DIR/serve_overload.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = ("127.0.0.1", "localhost", "::1")
QUERIES = ("a cat playing piano", "a dog surfing a wave at sunset -ar 16:9", "an astronaut riding a horse on the moon",
           "city street at night in the rain -neg blurry", "a panda eating bamboo in a misty forest",
           "a red sailboat on a calm lake at dawn", "a chef cooking noodles, close-up", "a fox running through snow")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def run_level(url: str, token: str | None, concurrency: int, duration_s: float, max_requests: int,
                    n: int, timeout_s: float) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies, statuses, batch_reqs = [], {}, []
    issued = 0
    deadline = time.perf_counter() + duration_s

    async def client(session: "aiohttp.ClientSession", worker: int) -> None:
        nonlocal issued
        while time.perf_counter() < deadline and issued < max_requests:
            i = issued
            issued += 1
            body = {"query": QUERIES[i % len(QUERIES)], "n": n, "seed": i}
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/v1/optimize", json=body, headers=headers) as r:
                    await r.read()
                    status = r.status
                    if status == 200:
                        batch_reqs.append(int(r.headers.get("X-VPO-Batch-Requests", "1")))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = -1
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append((time.perf_counter() - t0) * 1000)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    t_start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(session, w) for w in range(concurrency)))
    wall = time.perf_counter() - t_start
    return {
        "concurrency": concurrency, "requests": issued, "ok": len(latencies), "statuses": statuses,
        "seconds": round(wall, 3), "rps": round(len(latencies) / wall, 3) if wall else 0.0,
        "p50_ms": round(percentile(latencies, 0.50), 2), "p95_ms": round(percentile(latencies, 0.95), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "mean_requests_per_generate": round(statistics.mean(batch_reqs), 3) if batch_reqs else None,
    }


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"serve_load: refusing to load {host!r}; only 127.0.0.1/localhost are allowed")
    return url.rstrip("/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(args, max_batch_size: int, port: int, replicas: int = 1) -> str:
    from ray import serve

    from vpo_ray.serve.app import app_from_config, config_from_args, http_options

    top = max(args.concurrency)
    fields = {"port": port, "max_batch_size": max_batch_size, "max_n": min(args.n, max_batch_size),
              "max_new_tokens": args.max_new_tokens, "batch_wait_timeout_s": args.batch_wait_timeout_s,
              "max_ongoing_requests": max(top, max_batch_size), "max_queued_requests": 4 * top,
              "deadline_s": args.deadline_s,  # admission control (None: the request timeout)
              "num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus,
              "auth_token_env": "",  # loopback benchmark: no auth
              "autoscaling": {"min_replicas": replicas, "max_replicas": replicas}}
    if args.model:
        fields["model"] = args.model
    else:
        fields["preset"] = args.preset
    cfg = config_from_args(fields)
    serve.start(http_options=http_options(cfg))
    serve.run(app_from_config(cfg), name=cfg.app_name, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def bench(args, save=lambda record: None) -> dict:
    """All levels; `save(record)` runs after each one, so a run cut off by a time limit keeps what it measured."""
    record = {"benchmark": "serve_load", "host": platform.node(), "cpus": os.cpu_count(),
              "preset": None if args.url else (args.model or args.preset), "n": args.n,
              "max_new_tokens": args.max_new_tokens, "duration_s": args.duration_s,
              "max_requests": args.max_requests, "runs": []}
    if args.url:
        url = check_loopback(args.url)
        for c in args.concurrency:
            level = asyncio.run(run_level(url, args.token, c, args.duration_s, args.max_requests, args.n,
                                          args.timeout_s))
            record["runs"].append({"max_batch_size": None, **level})
        return record

    import ray
    from ray import serve

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        for replicas in args.replicas:
            for bs in args.batch_sizes:
                url = deploy(args, bs, port, replicas)
                asyncio.run(run_level(url, None, 2 * replicas, 2.0, args.warmup * replicas, args.n,
                                      args.timeout_s))  # warm-up: every replica loads and compiles
                for c in args.concurrency:
                    level = asyncio.run(run_level(url, None, c, args.duration_s, args.max_requests, args.n,
                                                  args.timeout_s))
                    record["runs"].append({"replicas": replicas, "max_batch_size": bs, **level})
                    print(json.dumps(record["runs"][-1]), file=sys.stderr, flush=True)
                    record["replica_scaling"] = replica_scaling(record["runs"])
                    save(record)
                if args.overload and "overload" not in record:
                    record["overload"] = overload(args, url, max(r["rps"] for r in record["runs"]), save, record)
    finally:
        serve.shutdown()
        ray.shutdown()
    record["replica_scaling"] = replica_scaling(record["runs"])
    return record


def overload(args, url: str, capacity: float, save, record: dict) -> list[dict]:
    """Open-loop levels at each multiple of `capacity` (requests/s), refused requests retried."""
    from serve_overload import open_loop, overload_figures

    levels: list[dict] = []
    for m in args.overload:
        reqs, attempts = asyncio.run(open_loop(url, m * capacity, args.duration_s, args.timeout_s, time.monotonic(),
                                               deadline_s=args.deadline_s, give_up_s=args.give_up_s))
        levels.append({"multiple": m, "capacity_rps": round(capacity, 3), "deadline_s": args.deadline_s,
                       **overload_figures(m * capacity, reqs, attempts)})
        print(json.dumps(levels[-1]), file=sys.stderr, flush=True)
        save({**record, "overload": levels})
    return levels


def plot_overload(levels: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [lv["multiple"] for lv in levels]
    fig, (ax_rps, ax_lat, ax_ref) = plt.subplots(1, 3, figsize=(14, 4))
    ax_rps.plot(ms, [lv["offered_rps"] for lv in levels], marker="o", ls="--", label="offered")
    ax_rps.plot(ms, [lv["goodput_rps"] for lv in levels], marker="o", label="goodput (answered)")
    ax_lat.plot(ms, [lv["accepted_p50_ms"] for lv in levels], marker="o", label="accepted p50")
    ax_lat.plot(ms, [lv["accepted_p99_ms"] for lv in levels], marker="^", label="accepted p99")
    ax_lat.plot(ms, [lv["refused_p99_ms"] for lv in levels], marker="x", label="refusal p99")
    ax_ref.bar([str(m) for m in ms], [lv["refused_share"] for lv in levels], label="attempts refused (503)")
    for x, lv in zip([str(m) for m in ms], levels):
        ax_ref.annotate(f"lost {lv['lost']}", (x, lv["refused_share"]), ha="center", va="bottom", fontsize=8)
    for ax, ylabel in ((ax_rps, "requests/s"), (ax_lat, "ms"), (ax_ref, "share")):
        ax.set_xlabel("offered load (x capacity)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"vpo serve past capacity ({levels[0]['capacity_rps']} req/s), deadline "
                 f"{levels[0]['deadline_s']} s, refused requests retried after Retry-After", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replica_scaling(runs: list[dict]) -> list[dict]:
    """Per batch setting: requests/s at the top concurrency for each replica count, and rps(r) / (r x rps(1))."""
    out = []
    for bs in sorted({r["max_batch_size"] for r in runs}):
        top = max(r["concurrency"] for r in runs if r["max_batch_size"] == bs)
        by_r = {r["replicas"]: r["rps"] for r in runs if r["max_batch_size"] == bs and r["concurrency"] == top}
        one = by_r.get(1)
        out.append({"max_batch_size": bs, "concurrency": top, "rps": by_r,
                    "efficiency_vs_linear": {k: (round(v / (k * one), 3) if one else None) for k, v in by_r.items()}})
    return out


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_rps) = plt.subplots(1, 2, figsize=(11, 4.2))
    settings = sorted({(r.get("replicas"), r["max_batch_size"]) for r in record["runs"]},
                      key=lambda k: (k[0] or 0, k[1] is None, k[1] or 0))
    several = len({k[0] for k in settings}) > 1
    for reps, bs in settings:
        runs = sorted((r for r in record["runs"] if (r.get("replicas"), r["max_batch_size"]) == (reps, bs)),
                      key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in runs]
        label = "server as is" if bs is None else ("no batching" if bs == 1 else f"max_batch_size={bs}")
        if several:
            label = f"{reps} replica(s), {label}"
        line, = ax_lat.plot(cs, [r["p50_ms"] for r in runs], marker="o", label=f"{label} p50")
        ax_lat.plot(cs, [r["p95_ms"] for r in runs], marker="^", ls="--", color=line.get_color(), label=f"{label} p95")
        ax_rps.plot(cs, [r["rps"] for r in runs], marker="o", color=line.get_color(), label=label)
    for ax, title, ylabel in ((ax_lat, "latency", "ms"), (ax_rps, "throughput", "requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(f"vpo serve {title} ({record.get('preset') or 'remote'}, n={record['n']}, "
                     f"{record['max_new_tokens']} new tokens)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for serve_load.json and serve_load.png")
    p.add_argument("--url", help="load an already running server (127.0.0.1/localhost only) instead")
    p.add_argument("--token", default=os.environ.get("VPO_SERVE_TOKEN"), help="bearer token for --url")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", help="optimizer dir instead of the preset's")
    p.add_argument("--concurrency", type=ints, default=[1, 4, 16], help="comma list (default 1,4,16)")
    p.add_argument("--batch-sizes", type=ints, default=[1, 16], help="max_batch_size settings (1 = no batching)")
    p.add_argument("--duration-s", type=float, default=10.0, help="per concurrency level")
    p.add_argument("--max-requests", type=int, default=2000, help="per concurrency level")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--n", type=int, default=1, help="prompts per request")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    p.add_argument("--ray-cpus", type=int, default=None, help="local Ray instance CPUs (default: all)")
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--replica-gpus", type=float, default=0.0, help="per replica (1 = one replica per GPU)")
    p.add_argument("--replicas", type=ints, default=[1], help="optimizer replica counts, comma list (default 1)")
    p.add_argument("--overload", type=lambda s: [float(x) for x in s.split(",") if x], default=[],
                   help="offered-load multiples of the measured capacity, e.g. 1,2,4 (default: off)")
    p.add_argument("--deadline-s", type=float, default=None, help="request deadline (X-VPO-Deadline-S) in overload")
    p.add_argument("--give-up-s", type=float, default=300.0, help="overload: a request is lost after this long")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(rec: dict) -> None:
        (out / "serve_load.json").write_text(json.dumps(rec, indent=2) + "\n")
        plot(rec, out / "serve_load.png")
        if rec.get("overload"):
            plot_overload(rec["overload"], out / "serve_overload.png")

    record = bench(args, save)
    save(record)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
