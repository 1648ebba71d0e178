"""`vpo demo`: the whole VPO loop on the tiny preset and a local Ray instance.

    build SFT set -> train SFT -> build DPO set (SFT optimizer, videos rendered and judged)
    -> train DPO -> serve the DPO optimizer on 127.0.0.1 -> one HTTP request

Everything runs offline: the tiny preset builds random-weight models of the real
classes. The point is the plumbing (every stage, every artifact), not model quality.
Writes DIR/summary.json with rows in/out, errors and seconds per stage.
"""
from __future__ import annotations

import json
import logging
import os
import time
from importlib import resources
from typing import Any, Callable, Optional

from vpo_ray import storage
from vpo_ray.console import StageLine, output_to_file, table

log = logging.getLogger("vpo.demo")

# Small enough for a 2-core laptop in a few minutes; every stage still runs for real. Clip
# size and generation lengths come from the tiny preset's job defaults (run_loop applies them).
TINY_OVERRIDES = [
    "gen.num_samples=2", "gen.rewrite_stage.batch_size=8", "gen.judge_stage.batch_size=8",
    "gen.video.seeds_per_prompt=1", "gen.video_judge_stage.batch_size=4",
    "train.num_workers=2", "train.deepspeed_stage=2", "train.max_length=384", "train.save_steps=4",
    "sft.max_steps=8", "sft.learning_rate=1e-4", "dpo.max_steps=8", "dpo.learning_rate=5e-5",
]


def demo_queries(kind: str = "sft") -> str:
    """The built-in demo query sets: 24 for the SFT set, 12 others (one shared) for the DPO set,
    separate as in the recipe."""
    name = "demo_queries.json" if kind == "sft" else "demo_dpo_queries.json"
    return str(resources.files("vpo_ray.data").joinpath(name))


def stage_rows(loop: dict) -> dict:
    """Per-stage rows in/out, errors and seconds from the loop's round summaries."""
    stages = {}
    for h in loop["history"]:
        gen, tr = h["generate"], h["train"]
        name = f"round_{h['round']}.generate_{h['kind']}"
        stages[name] = {"rows_in": gen.get("input_queries"), "rows_out": gen.get("output_rows"),
                        "duplicates": gen.get("duplicates"), "errors": gen.get("errors"),
                        "seconds": gen.get("wall_seconds")}
        stages[f"round_{h['round']}.train_{h['kind']}"] = {
            "rows_in": gen.get("output_rows"), "rows_out": tr.get("global_step"), "errors": 0,
            "seconds": tr.get("wall_seconds"), "loss_first": (tr.get("metrics") or {}).get("loss_first"),
            "loss_last": (tr.get("metrics") or {}).get("loss_last")}
    return stages


def serve_and_ask(model: str, port: int, query: str) -> dict:
    from ray import serve

    from vpo_ray.config import ServeConfig, load_config
    from vpo_ray.serve.app import start
    from vpo_ray.serve.client import OptimizerClient

    cfg = load_config(ServeConfig, None, [f"model={model}", f"port={port}", "autoscaling.max_replicas=1"])
    t = time.perf_counter()
    start(cfg)
    try:
        reply = OptimizerClient(f"http://127.0.0.1:{port}").optimize(query, n=1, seed=0)
    finally:
        serve.shutdown()
    return {"rows_in": 1, "rows_out": len(reply.get("prompts", [])), "errors": 0,
            "seconds": round(time.perf_counter() - t, 2), "request": query, "reply": reply}


def _reported(fn: Callable[[Any], dict], progress: Optional[StageLine], describe: Callable[[Any], str],
              outcome: Callable[[dict], str]) -> Callable[[Any], dict]:
    """`fn` with one progress line around each call (what it does; what came out)."""
    if progress is None:
        return fn

    def call(cfg):
        progress.begin(describe(cfg))
        result = fn(cfg)
        progress.end(outcome(result))
        return result
    return call


def _building(cfg) -> str:
    return ("build the DPO set with the SFT optimizer (videos rendered and judged)" if cfg.kind == "dpo"
            else "build the SFT set (rewrite, critique, refine)")


def _built(gen: dict) -> str:
    return f"{gen.get('output_rows')} rows, {gen.get('errors')} errors, {gen.get('duplicates')} duplicates"


def _trained(tr: dict) -> str:
    m = tr.get("metrics") or {}
    return f"{tr.get('global_step')} steps, loss {m.get('loss_first', float('nan')):.3f} -> {m.get('loss_last', float('nan')):.3f}"


def run_demo(out: str, queries: str | None = None, port: int = 8011, extra: list[str] | None = None,
             dpo_queries: str | None = None, weights: str | None = None,
             progress: Optional[StageLine] = None) -> dict:
    from vpo_ray.pipeline.generate import run_generate
    from vpo_ray.train.loop import run_loop
    from vpo_ray.train.runner import train

    t0 = time.perf_counter()
    if queries and not dpo_queries:
        dpo_queries = queries  # one file given: it feeds both sets
    queries, dpo_queries = queries or demo_queries("sft"), dpo_queries or demo_queries("dpo")
    generate_fn = _reported(run_generate, progress, _building, _built)
    train_fn = _reported(train, progress, lambda c: f"train {c.method.upper()} on Ray Train + DeepSpeed", _trained)
    loop = run_loop(1, queries, out, preset="tiny", overrides=TINY_OVERRIDES + list(extra or []),
                    dpo_queries=dpo_queries, weights=weights, generate_fn=generate_fn, train_fn=train_fn)
    stages = stage_rows(loop)
    if progress:
        progress.begin(f"serve the DPO optimizer on 127.0.0.1:{port} and ask it once")
    stages["serve"] = serve_and_ask(loop["optimizer"], port, "a corgi surfing a wave at sunset -ar 16:9")
    if progress:
        progress.end(f"{stages['serve']['rows_out']} prompt back")
    summary = {"queries": {"sft": queries, "dpo": dpo_queries}, "optimizer": loop["optimizer"], "stages": stages,
               "wall_seconds": round(time.perf_counter() - t0, 2)}
    storage.write_json(storage.join(out, "summary.json"), summary)
    return summary


def summary_table(summary: dict) -> str:
    rows = [["stage", "rows in", "rows out", "errors", "seconds"]]
    for name, s in summary["stages"].items():
        rows.append([name, s["rows_in"], s["rows_out"], s["errors"], f"{s['seconds']:.1f}"])
    rows.append(["total", None, None, None, f"{summary['wall_seconds']:.1f}"])
    return table(rows)


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--queries", help="SFT query file (default: the built-in demo set of 24 queries)")
    p.add_argument("--dpo-queries", help="DPO query file (default: the built-in set of 12; --queries alone feeds both)")
    p.add_argument("--port", type=int, default=8011, help="port for the serve step on 127.0.0.1")
    p.add_argument("--weights", choices=["pretrained", "random"], default=None,
                   help="random: the tiny architectures from configs/ with stand-in tokenizers (the weights=random path)")
    p.add_argument("overrides", nargs="*", help="loop overrides, e.g. gen.num_samples=4 sft.max_steps=20")


def run(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log_path = os.path.join(args.out, "demo.log")
    with output_to_file(log_path) as console:
        # Everything but the stage lines (Ray, Ray Data, Train, DeepSpeed, TRL, Serve) goes to the file.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        console.write(f"vpo demo: the VPO loop on tiny random-weight models; full log in {log_path}\n")
        summary = run_demo(args.out, args.queries, args.port, args.overrides, dpo_queries=args.dpo_queries,
                           weights=args.weights, progress=StageLine(console, 5))
        import ray

        ray.shutdown()  # inside: Ray's goodbyes go to the log too
    print(summary_table(summary))
    print(f"summary: {os.path.join(args.out, 'summary.json')}")
    print("optimized:", json.dumps(summary["stages"]["serve"]["reply"].get("prompts"), ensure_ascii=False)[:300])
    return 0
