"""Soak of vpo_ray on one machine: `vpo serve` under steady load, then `vpo generate` over real
queries, with the resident memory (RSS) of every Ray actor and Serve replica sampled over time.

    python benchmarks/soak.py --out runs/bench/soak --queries ../shared/data/vpo_dpo_queries.json
    python benchmarks/soak.py --out DIR --queries Q.json --serve-minutes 1 --generate-queries 20  # quick check
    python benchmarks/soak.py --out DIR --queries Q.json --phases generate --generate-queries 40   # faults, CPU

Phase 1, serve: a local Ray instance, the `vpo serve` app of the tiny preset deployed in
process (127.0.0.1, no auth); a closed-loop probe measures capacity (requests/s), then
open-loop clients send requests at --load x capacity for --serve-minutes (steady load: a
fixed arrival rate, not "as fast as answers come back").
Phase 2, generate: `run_generate` (kind --kind, the tiny preset's job defaults, key=value
overrides after the options) over --generate-queries rows of --queries, read by path (never
copied into the repository), with faults injected through VPO_FAULTS (vpo_ray/faults.py):
--faults (default DEFAULT_FAULTS: transient OOMs, exceptions, hung calls and worker exits in
every stage, and two queries that always fail; `{row0}`, `{row1}` name the first two kept
query ids). Then the output is checked query id by query id: every id ingest kept ends in
exactly one of the set or errors.jsonl, every duplicate in duplicates.jsonl, every ingest
error in errors.jsonl. `lost` must be 0 (the script exits 1 otherwise).

A sampler thread reads every ALIVE actor of this Ray instance from the GCS actor table
(Serve's controller, proxy and replicas, the Ray Data stage actors) and its process's RSS
(psutil; one machine) every --sample-s seconds. RSS growth after warm-up, per actor: the
median of its last 3 samples over the median of the 3 samples from the end of warm-up
(--warmup-share of the phase), minus 1. The target is <= 10% for every actor.

Writes DIR/soak.json and DIR/soak.png (RSS per actor over time for both phases with the
faults' firing times, the serve latency per minute, the generate phase's query accounting)
and prints the JSON record.
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
# Injected in the generate phase: each stage meets out-of-memory errors, exceptions, hung calls
# (ended by the watchdog) and worker exits a few times; {row0} always fails its rewrite and
# {row1} every render. Seeded per row, so retried rows give the same output.
DEFAULT_FAULTS = ("rewrite:oom,times=3; rewrite:exit,times=1; critique:raise,times=3; critique:hang,times=1; "
                  "render:oom,times=2; render:exit,times=1; video_judge:oom,times=2; video_judge:hang,times=1; "
                  "rewrite:raise,row={row0}; render:oom,row={row1}")


# ---------------------------------------------------------------------------- RSS sampling

class RssSampler(threading.Thread):
    """Every `every_s`: RSS of each ALIVE actor of the connected Ray instance, keyed by class and id."""

    def __init__(self, every_s: float):
        super().__init__(daemon=True)
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.t_wall = time.time()  # the same instant on the wall clock (fault records carry wall time)
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


def growth(points: list[tuple[float, float, int]], warm_at: float, warm_s: float) -> dict:
    """RSS figures of one actor: start, at the end of warm-up, at the end, growth after warm-up.

    Growth is that of the process alive at the end: a restarted actor's new process (a new pid)
    gets its own warm-up of `warm_s` from its first sample."""
    last = [p for p in points if p[2] == points[-1][2]]
    after = [p for p in last if p[0] >= max(warm_at, last[0][0] + warm_s)]
    out = {"samples": len(points), "start_mib": points[0][1], "max_mib": max(p[1] for p in points),
           "end_mib": points[-1][1], "restarts": len({p[2] for p in points}) - 1}
    if len(after) >= 6:
        warm = statistics.median(p[1] for p in after[:3])
        end = statistics.median(p[1] for p in after[-3:])
        out.update(warm_mib=round(warm, 1), growth_after_warmup=round(end / warm - 1, 4))
    return out


def phase_figures(sampler: RssSampler, phase: str, t_start: float, t_end: float, warmup_share: float) -> dict:
    warm_at = t_start + warmup_share * (t_end - t_start)
    actors = {name.split("/", 1)[1]: growth(pts, warm_at, warm_at - t_start)
              for name, pts in sampler.series.items() if name.startswith(phase + "/")}
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

def fault_spec(template: str, kept_ids: list[str]) -> str:
    """--faults with {row0}, {row1}, ... replaced by the kept query ids in ingest order."""
    return template.format(**{f"row{i}": q for i, q in enumerate(kept_ids[:10])})


def account_ids(cfg, ing) -> dict:
    """Query id by query id: what ingest kept ends in the set or in errors.jsonl (not both), every
    duplicate row in duplicates.jsonl, every ingest error in errors.jsonl."""
    from vpo_ray import storage

    set_ids = {r["query_id"] for r in _read_set(cfg.out, cfg.kind)}
    errors = list(storage.read_jsonl(storage.join(cfg.out, "errors.jsonl")))
    err_ids = {e["query_id"] for e in errors}
    dup_rows = {d["source_row"] for d in storage.read_jsonl(storage.join(cfg.out, "duplicates.jsonl"))}
    kept = [q["query_id"] for q in ing.queries]
    missing = [q for q in kept if q not in set_ids and q not in err_ids]
    both = sorted(set(kept) & set_ids & err_ids)
    missing_dups = sorted({d["source_row"] for d in ing.duplicates} - dup_rows)
    missing_ingest = sorted({e["query_id"] for e in ing.errors} - err_ids)
    by_stage: dict[str, int] = {}
    for e in errors:
        by_stage[e["stage"]] = by_stage.get(e["stage"], 0) + 1
    return {"input_rows": ing.input_count, "kept": len(kept), "in_set": len(set(kept) & set_ids),
            "error_rows": len(set(kept) & err_ids), "ingest_errors": len(ing.errors),
            "duplicates": len(ing.duplicates), "errors_by_stage": by_stage,
            "lost": len(missing) + len(missing_dups) + len(missing_ingest), "missing_ids": missing[:20],
            "missing_duplicate_rows": missing_dups[:20], "missing_ingest_errors": missing_ingest[:20],
            "in_set_and_errors": both[:20]}


def _read_set(out: str, kind: str) -> list[dict]:
    import pyarrow.parquet as pq

    from vpo_ray import storage

    path = Path(out) / f"{kind}.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else list(storage.read_jsonl(f"{out}/{kind}.jsonl"))


def generate_phase(args, sampler: RssSampler) -> dict:
    from vpo_ray import faults
    from vpo_ray.config import GenerateConfig, load_config_with_defaults
    from vpo_ray.data.ingest import ingest
    from vpo_ray.models.registry import preset_job_defaults
    from vpo_ray.pipeline.generate import run_generate

    out = str(Path(args.out) / "generate")
    watchdogs = [f"{s}.watchdog_s={args.watchdog_s}" for s in ("rewrite_stage", "judge_stage", "t2v_stage",
                                                                 "video_judge_stage")] if args.faults else []
    cfg = load_config_with_defaults(GenerateConfig, None, [*watchdogs, *args.overrides],
                                    preset_job_defaults(args.preset), kind=args.kind, queries=args.queries, out=out,
                                    preset=args.preset, limit=args.generate_queries)
    ing = ingest(cfg.queries, cfg.query_column, cfg.max_query_chars, cfg.near_dup_threshold, cfg.seed, cfg.limit)
    spec = fault_spec(args.faults, [q["query_id"] for q in ing.queries]) if args.faults else ""
    fired_dir = str(Path(args.out) / "faults_fired")
    if spec:
        os.environ.update({faults.ENV: spec, faults.DIR_ENV: fired_dir})
    sampler.phase = "generate"
    t_start = sampler.now()
    try:
        summary = run_generate(cfg)
    finally:
        os.environ.pop(faults.ENV, None)
        os.environ.pop(faults.DIR_ENV, None)
    t_end = sampler.now()
    fired = [{"t_s": round(f["time"] - sampler.t_wall, 1), "point": f["point"], "action": f["action"],
              "rows": f["rows"][:4], "pid": f["pid"]} for f in faults.fired(fired_dir)]
    n_in = summary["input_queries"]
    return {"kind": args.kind, "queries": n_in, "output_rows": summary["output_rows"],
            "error_rows": summary["errors"], "error_rate": round(summary["errors"] / max(1, n_in), 4),
            "errors_by_reason": summary["errors_by_reason"], "accounted": summary["accounted"],
            "faults_spec": spec, "faults_fired": fired, "accounting": account_ids(cfg, ing),
            "queries_per_s": round(n_in / max(1e-9, summary["pipeline_seconds"]), 3),
            "wall_s": summary["wall_seconds"], **phase_figures(sampler, "generate", t_start, t_end, args.warmup_share)}


# ---------------------------------------------------------------------------- figure

def _label(ax, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _plot_rss(ax, phase: str, fig_p: dict, series: dict) -> None:
    for name, pts in sorted(series.items()):
        if name.startswith(phase + "/"):
            g = fig_p["actors"].get(name.split("/", 1)[1], {}).get("growth_after_warmup")
            label = name.split("/", 1)[1].lstrip("_") + (f" ({g:+.1%})" if g is not None else "")  # "_x": no legend
            color = None
            for pid in dict.fromkeys(p[2] for p in pts):  # one segment per process: a restart is a break
                seg = [p for p in pts if p[2] == pid]
                line, = ax.plot([(p[0] - fig_p["start_s"]) / 60 for p in seg], [p[1] for p in seg], color=color,
                                label=label if color is None else None)
                color = line.get_color()
    ax.axvline((fig_p["warmup_until_s"] - fig_p["start_s"]) / 60, color="grey", ls=":", label="end of warm-up")
    for i, f in enumerate(fig_p.get("faults_fired", [])):
        ax.axvline((f["t_s"] - fig_p["start_s"]) / 60, color="red", alpha=0.35, lw=0.8,
                   label="fault fired" if i == 0 else None)
    _label(ax, "minutes into the phase", "RSS (MiB)", f"{phase}: RSS per actor (growth after warm-up)", 6)


def _plot_latency(ax, serve: dict) -> None:
    rows = serve["per_minute"]
    ax.plot([r["minute"] for r in rows], [r["p50_ms"] for r in rows], marker="o", label="p50")
    ax.plot([r["minute"] for r in rows], [r["p99_ms"] for r in rows], marker="^", label="p99")
    _label(ax, "minute of steady load", "latency of answered requests (ms)",
           f"serve at {serve['offered_rps']} req/s: error rate {serve['error_rate']:.2%}", 7)


def _plot_accounting(ax, gen: dict) -> None:
    acc = gen["accounting"]
    bars = {"in the set": acc["in_set"], **{f"error: {k}": v for k, v in sorted(acc["errors_by_stage"].items())},
            "duplicates": acc["duplicates"], "lost": acc["lost"]}
    ax.barh(list(bars), list(bars.values()), color=["tab:green"] + ["tab:orange"] * (len(bars) - 3)
            + ["tab:blue", "tab:red"])
    for i, v in enumerate(bars.values()):
        ax.text(v, i, f" {v}", va="center", fontsize=7)
    kinds: dict[str, int] = {}
    for f in gen["faults_fired"]:
        kinds[f"{f['point']}:{f['action']}"] = kinds.get(f"{f['point']}:{f['action']}", 0) + 1
    ax.set_xlabel("rows")
    fired = [f"{k} x{n}" for k, n in sorted(kinds.items())]
    ax.set_title(f"generate: {acc['input_rows']} input rows, {len(gen['faults_fired'])} faults fired, "
                 f"{acc['lost']} lost\n" + "\n".join(", ".join(fired[i:i + 4]) for i in range(0, len(fired), 4)),
                 fontsize=7)
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")


def plot(record: dict, series: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in ("serve", "generate") if p in record]
    panels = len(phases) + ("serve" in record) + ("generate" in record)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, phase in zip(axes, phases):
        _plot_rss(ax, phase, record[phase], series)
    extra = axes[len(phases):]
    if "serve" in record:
        _plot_latency(extra.pop(0), record["serve"])
    if "generate" in record:
        _plot_accounting(extra.pop(0), record["generate"])
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
    p.add_argument("--faults", default=DEFAULT_FAULTS, help="VPO_FAULTS for the generate phase ('' = none)")
    p.add_argument("--watchdog-s", type=float, default=30.0, help="stage watchdog while faults are injected")
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
    record["lost"] = record["generate"]["accounting"]["lost"] if "generate" in record else None
    (out / "soak.json").write_text(json.dumps({**record, "series": sampler.series}, indent=1) + "\n")
    plot(record, sampler.series, out / "soak.png")
    print(json.dumps(record))
    return 1 if record["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
