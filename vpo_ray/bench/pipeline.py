"""`vpo bench pipeline`: the real `vpo generate dpo` on N queries, measured per stage, per pool and per GPU.

    ingest -> rewrite -> critique -> refine -> render -> video judge -> pairs

runs exactly as `vpo generate dpo --preset P weights=random` would (placement, pools,
flow), with every stage class timed by bench/pool_events.py and every GPU's NVML
utilization sampled. The record gives, per pool: actors and their GPUs, load time,
rows/s, generated tokens/s (LLM pools), busy share and seconds spent waiting for input;
per GPU: busy fraction and peak memory; end to end: videos/s, queries/s, GPU-hours per
1,000 queries and its split by stage, all over the steady-state window (every T2V actor
rendering; bench/pool_events.steady_window) and extrapolated from it, which the record
says. The ratio to the T2V stage alone on the same GPUs needs that rate: measured after
the pipeline (`pipeline.t2v_alone_videos_per_gpu`), or read from a `video-sampling`
scaling record (`pipeline.reference`).
"""
from __future__ import annotations

import shutil
import time
from typing import Any, Optional

from vpo_ray import storage
from vpo_ray.bench import common, pool_events
from vpo_ray.bench.config import BenchConfig
from vpo_ray.config import GenerateConfig, to_dict


def generate_config(cfg: BenchConfig, out: str) -> GenerateConfig:
    """The `vpo generate dpo` config the benchmark runs (preset job defaults apply, as on the CLI)."""
    from importlib import resources

    from vpo_ray.config import load_config_with_defaults
    from vpo_ray.models.registry import preset_job_defaults

    p = cfg.pipeline
    queries = p.queries or str(resources.files("vpo_ray.data").joinpath("demo_queries.json"))
    fields = dict(kind="dpo", queries=queries, out=out, preset=cfg.preset)
    overrides = [f"limit={p.limit}", f"num_samples={p.num_samples}", f"weights={p.weights}", *p.generate]
    return load_config_with_defaults(GenerateConfig, None, overrides, preset_job_defaults(cfg.preset), **fields)


class PipelineBench:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.device = common.resolve_device(cfg.device)
        self.cuda = self.device.startswith("cuda")
        self.stem = f"pipeline_{cfg.preset}"
        self.record: dict[str, Any] = {}

    def run(self) -> dict:
        import ray

        from vpo_ray.bench.nvml import GpuSampler
        from vpo_ray.pipeline.generate import run_generate
        from vpo_ray.ray_utils import init_ray

        cfg = self.cfg
        storage.makedirs(cfg.out)
        work = storage.join(cfg.out, f"{self.stem}_run")
        shutil.rmtree(work, ignore_errors=True)  # a benchmark never resumes an earlier run
        gen = generate_config(cfg, work)
        import torch

        gpus = torch.cuda.device_count() if self.cuda else 0
        samplers = [GpuSampler(index=i).start() for i in range(gpus)]
        started_here = not ray.is_initialized()
        init_ray(cfg.ray)
        log, log_name = pool_events.start_log()
        t_ref = time.time()
        try:
            summary = run_generate(gen, wrap=pool_events.instrument(log_name))
            events = ray.get(log.all.remote())
        finally:
            for s in samplers:
                s.stop()
        self.record = self._record(gen, summary, events, samplers, t_ref)
        self.record["t2v_alone"] = self._t2v_alone(gen, gpus, samplers=None)
        self._ratio()
        if started_here:
            ray.shutdown()
        return self._save(events, samplers, t_ref)

    # ---------------------------------------------------------------- figures

    def _record(self, gen: GenerateConfig, summary: dict, events: list[dict], samplers: list, t_ref: float) -> dict:
        w0, w1, how = pool_events.steady_window(events)
        span = max(w1 - w0, 1e-9)
        pools = pool_events.pool_stats(events, w0, w1)
        videos = [e for e in events if e["pool"] == "t2v" and e["kind"] == "call" and e.get("videos")]
        in_window = sum(e["videos"] for e in videos if w0 < e["t1"] <= w1)
        total_videos = sum(e["videos"] for e in videos)
        queries = summary["processed_this_run"] or 1
        videos_per_s = in_window / span if w1 > w0 else None
        gpus = (summary.get("placement") or {}).get("gpus", 0)
        per_query = total_videos / queries
        queries_per_s = videos_per_s / per_query if videos_per_s and per_query else None
        gpu_hours = gpus * 1000 / queries_per_s / 3600 if queries_per_s and gpus else None
        calls = [e for e in events if e["kind"] == "call"]
        run_span = (max(e["t1"] for e in calls) - min(e["t0"] for e in calls)) if calls else None
        span_hours = gpus * run_span / queries * 1000 / 3600 if run_span and gpus else None
        return {
            "benchmark": "pipeline", "preset": self.cfg.preset, "weights": gen.weights,
            "device": common.device_facts(self.device), "versions": common.versions(),
            "config": {"queries": gen.queries, "limit": gen.limit, "num_samples": gen.num_samples,
                       "video": {k: getattr(gen.video, k) for k in ("num_frames", "height", "width",
                                                                   "num_inference_steps", "optimizations")},
                       "random_outputs": to_dict(gen.random_outputs) if gen.weights == "random" else None,
                       "generate_overrides": list(self.cfg.pipeline.generate)},
            "placement": summary.get("placement"),
            "steady_window": {"start_s": round(w0 - t_ref, 1), "end_s": round(w1 - t_ref, 1),
                              "seconds": round(span, 1), "definition": how},
            "stages": pools,
            "gpus": [dict(s.window(w0, w1), index=i) for i, s in enumerate(samplers)],
            "end_to_end": {
                "videos": total_videos, "videos_in_window": in_window, "queries": queries,
                "videos_per_query": round(per_query, 3),
                "videos_per_s": round(videos_per_s, 5) if videos_per_s else None,
                "queries_per_s": round(queries_per_s, 5) if queries_per_s else None,
                "gpus": gpus,
                "gpu_hours_per_1000_queries": round(gpu_hours, 2) if gpu_hours else None,
                "gpu_hours_note": "extrapolated from the steady-state window: GPUs held x 1000 / queries per second",
                "gpu_hours_per_1000_queries_run": round(span_hours, 2) if span_hours else None,
                "gpu_hours_run_note": "GPUs held x (first call to last call) / queries: start-up excluded, the "
                                      "LLM pool's lead and the drain included",
                "gpu_hours_by_stage": _by_stage(pools, gpu_hours),
                "wall_s": summary["wall_seconds"],
            },
            "generate_summary": {k: summary.get(k) for k in ("input_queries", "output_rows", "errors", "accounted",
                                                             "stages", "errors_by_reason")},
        }

    def _t2v_alone(self, gen: GenerateConfig, gpus: int, samplers) -> Optional[dict]:
        """T2V-alone videos/s on the same GPUs: measured now, read from a reference record, or None."""
        p = self.cfg.pipeline
        if p.reference:
            if not storage.exists(p.reference):  # the ratio can still be worked out later from the two records
                return {"videos_per_s": None, "source": p.reference, "error": "reference record not found"}
            ref = storage.read_json(p.reference)
            run = ((ref.get("scaling") or {}).get("runs") or {}).get(str(max(1, gpus))) or {}
            return {"videos_per_s": run.get("videos_per_s"), "source": f"{p.reference} (scaling, {gpus} actors)",
                    "device": (ref.get("device") or {}).get("name")}
        if p.t2v_alone_videos_per_gpu <= 0:
            return None
        from vpo_ray.bench.video_sampling import VideoSamplingBench
        from vpo_ray.bench.config import BenchVideoConfig
        from vpo_ray.config import replace

        v = gen.video  # same clip, steps and flags as the pipeline's T2V pool ("overlap" is the stage's own)
        bench_cfg = replace(self.cfg, **{
            "name": "video-sampling", "preset": "tiny" if gen.preset == "tiny" else _t2v_name(gen),
            "optimizations": [f for f in v.optimizations if f != "overlap"], "warmup": 1 if v.warmup_steps else 0,
            "warmup_steps": max(1, v.warmup_steps),
            "video": to_dict(BenchVideoConfig(v.num_frames, v.height, v.width, v.num_inference_steps,
                                              v.guidance_scale, v.fps))})
        vs = VideoSamplingBench(bench_cfg)
        actors = max(1, gpus) if self.cuda else 1
        res = vs.ray_stage(actors * p.t2v_alone_videos_per_gpu, actors=actors)
        return {"videos_per_s": res.get("videos_per_s"), "source": f"measured after the pipeline: {actors} actor(s), "
                f"{p.t2v_alone_videos_per_gpu} videos each, flags {res.get('flags')}",
                "videos_by_actor": res.get("videos_by_actor")}

    def _ratio(self) -> None:
        alone = (self.record.get("t2v_alone") or {}).get("videos_per_s")
        e2e = self.record["end_to_end"]["videos_per_s"]
        self.record["end_to_end"]["ratio_to_t2v_alone"] = round(e2e / alone, 3) if alone and e2e else None

    def _save(self, events: list[dict], samplers: list, t_ref: float) -> dict:
        from vpo_ray.bench.plotting import plot_pipeline

        cfg = self.cfg
        png = storage.join(cfg.out, f"{self.stem}.png")
        plot_pipeline(self.record, [s.trace(t_ref) for s in samplers], events, t_ref, png)
        self.record["png"] = png
        self.record["summary"] = summarize(self.record)
        common.write_record(cfg.out, self.stem, self.record)
        return self.record


def _t2v_name(gen: GenerateConfig) -> str:
    from vpo_ray.models.registry import get_spec

    return get_spec(gen.preset, "t2v").name


def _by_stage(pools: dict, gpu_hours: Optional[float]) -> Optional[dict]:
    """GPU-hours per 1,000 queries split by each pool's share of the busy time (pools sharing a GPU overlap)."""
    busy = {name: p["busy_s_total"] for name, p in pools.items()}
    total = sum(busy.values())
    if not gpu_hours or not total:
        return None
    return {name: round(gpu_hours * b / total, 3) for name, b in busy.items()}


def summarize(rec: dict) -> dict:
    e2e = rec.get("end_to_end") or {}
    out = {"device": (rec.get("device") or {}).get("name"), "preset": rec.get("preset"), "weights": rec.get("weights"),
           "layout": (rec.get("placement") or {}).get("layout")}
    for k in ("videos_per_s", "queries_per_s", "gpu_hours_per_1000_queries", "ratio_to_t2v_alone", "videos"):
        out[k] = e2e.get(k)
    busy = [g.get("busy_fraction") for g in rec.get("gpus") or [] if g.get("busy_fraction") is not None]
    out["gpu_busy_min"] = round(min(busy), 3) if busy else None
    for name, p in (rec.get("stages") or {}).items():
        out[f"{name}_busy_share"] = p.get("busy_share")
        out[f"{name}_waited_for_input_s"] = p.get("waited_for_input_s")
    return out


def run(cfg: BenchConfig) -> dict:
    return PipelineBench(cfg).run()
