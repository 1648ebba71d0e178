"""`vpo generate sft|dpo`: raw queries -> the SFT set or the DPO set, streamed on Ray Data.

    ingest (driver) -> rewrite (optimizer pool or teacher endpoint) -> critique+refine (judge pool)
      sft: -> per query: passing prompt, else refined one (pipeline/finalise.py) -> sft.{parquet,jsonl}
      dpo: -> explode every sample (render=all) x seeds -> render (T2V pool) -> video judge pool
           -> per query: text pair (rejected vs refined), else video pair -> dpo.{parquet,jsonl}

Rows stay per query until the DPO explode, so a query's K candidates are judged
together. The driver consumes the stream, finalises a query once all its rows have
arrived, and appends finished queries to `parts/` in atomic files: a rerun (or a
crashed driver) skips every query id already there. Every input query id ends in
exactly one of: the output set, duplicates.jsonl, errors.jsonl. The Ray Data stages and
their pools are in flow.py and placement.py (docs/PLACEMENT.md).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Any, Iterable, Optional

import numpy as np

from vpo_ray import prompts, storage
from vpo_ray.config import GenerateConfig, check_weights, load_config, to_dict
from vpo_ray.pipeline import video_dpo_set
from vpo_ray.pipeline.flow import RenderStage, build_dataset, explode_for_render, resolve_models  # noqa: F401
from vpo_ray.schema import error_row

log = logging.getLogger("vpo.generate")

FLUSH_EVERY_S = float(os.environ.get("VPO_PART_FLUSH_S", "5"))  # a crash loses at most this much finished work


# ---------------------------------------------------------------------------- small helpers

def check_config(cfg: GenerateConfig) -> None:
    """Refuse settings the pipeline cannot run with, naming the key, before any work starts."""
    from vpo_ray.config import ConfigError

    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {rule}, got {_get(cfg, key)!r}")

    need(cfg.kind in ("sft", "dpo"), "kind", "expected 'sft' or 'dpo'")
    check_weights(cfg.weights)
    need(cfg.output_format in ("parquet", "jsonl"), "output_format", "expected parquet or jsonl")
    need(cfg.num_samples is None or cfg.num_samples >= 1, "num_samples", "must be >= 1 (or null: sft 1, dpo 4)")
    need(cfg.truncation in ("error", "keep"), "truncation", "expected error or keep")
    need(cfg.sft_select in ("first", "best-of-k"), "sft_select", "expected first or best-of-k")
    need(cfg.render in ("all", "passing"), "render", "expected all or passing")
    need(cfg.pair_select in ("first", "largest-gap"), "pair_select", "expected first or largest-gap")
    need(cfg.video_score in ("binary", "soft"), "video_score", "expected binary or soft")
    need(cfg.limit is None or cfg.limit >= 0, "limit", "must be >= 0 (or null for all)")
    need(cfg.near_dup_threshold > 0, "near_dup_threshold", "must be > 0 (> 1 switches near-dedup off)")
    need(cfg.max_query_chars >= 1, "max_query_chars", "must be >= 1")
    need(cfg.max_pairs_per_query >= 1, "max_pairs_per_query", "must be >= 1")
    need(bool(cfg.query_column), "query_column", "must not be empty")
    for name in ("sampling", "judge_sampling"):
        need(getattr(cfg, name).max_new_tokens >= 1, f"{name}.max_new_tokens", "must be >= 1")
        need(getattr(cfg, name).temperature >= 0, f"{name}.temperature", "must be >= 0")
        need(0 < getattr(cfg, name).top_p <= 1, f"{name}.top_p", "expected 0 < top_p <= 1")
    for name in ("rewrite_stage", "judge_stage", "t2v_stage", "video_judge_stage"):
        st = getattr(cfg, name)
        need(st.min_actors >= 1, f"{name}.min_actors", "must be >= 1")
        need(st.max_actors >= st.min_actors, f"{name}.max_actors", f"must be >= min_actors ({st.min_actors})")
        need(st.batch_size >= 1, f"{name}.batch_size", "must be >= 1")
        need(st.num_cpus >= 0, f"{name}.num_cpus", "must be >= 0")
        need(st.num_gpus >= 0, f"{name}.num_gpus", "must be >= 0")
        need(st.watchdog_s >= 0, f"{name}.watchdog_s", "must be >= 0 (0 = no watchdog)")
    for key in ("num_frames", "height", "width", "num_inference_steps", "fps", "seeds_per_prompt", "judge_frames"):
        need(getattr(cfg.video, key) >= 1, f"video.{key}", "must be >= 1")
    need(cfg.video.warmup_steps >= 0, "video.warmup_steps", "must be >= 0")
    from vpo_ray.pipeline.t2v import parse_optimizations
    try:
        parse_optimizations(cfg.video.optimizations)
    except ValueError as e:
        raise ConfigError(f"video.{e}") from None
    for name in ("judge_endpoint", "teacher_endpoint"):
        ep = getattr(cfg, name)
        if ep.base_url is not None:
            need(ep.base_url.startswith(("http://", "https://")), f"{name}.base_url", "expected an http(s) URL")
        need(ep.max_concurrency >= 1, f"{name}.max_concurrency", "must be >= 1")
        need(ep.max_retries >= 0, f"{name}.max_retries", "must be >= 0")
        need(ep.timeout_s > 0, f"{name}.timeout_s", "must be > 0")
        need(ep.backoff_s >= 0, f"{name}.backoff_s", "must be >= 0")
        need(ep.max_tokens is None or ep.max_tokens >= 1, f"{name}.max_tokens", "must be >= 1 (or null: not sent)")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _completed(out: str) -> dict[str, dict]:
    """query_id -> finished record, from every part written so far."""
    done: dict[str, dict] = {}
    parts = storage.join(out, "parts")
    for name in storage.listdir(parts):
        if not name.endswith(".jsonl") or name.startswith("."):
            continue
        for rec in storage.read_jsonl(storage.join(parts, name)):
            done.setdefault(rec["query_id"], rec)
    return done


class _PartWriter:
    """Buffers finished query records; writes them as one atomic part file per flush."""

    def __init__(self, out: str):
        self.dir = storage.join(out, "parts")
        storage.makedirs(self.dir)
        self.buf: list[dict] = []
        self.last = time.monotonic()
        self.written = 0

    def add(self, rec: dict) -> None:
        self.buf.append(rec)
        if time.monotonic() - self.last > FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            storage.write_jsonl(storage.join(self.dir, storage.unique_name(f"part-{int(time.time())}", ".jsonl")), self.buf)
            self.written += len(self.buf)
            self.buf = []
        self.last = time.monotonic()




# ---------------------------------------------------------------------------- the job

def _record_from_rows(qrows: list[dict], qinfo: dict, cfg: GenerateConfig, fin) -> dict:
    first = qrows[0]
    if first["error"]:
        stage = first["error_stage"] or "rewrite"
        return {"query_id": qinfo["query_id"], "error": error_row(qinfo["query_id"], stage, str(first["error"]).split(":")[-1].strip() or "failed", str(first["error"]))}
    cands = json.loads(first["candidates_json"])
    if cfg.kind == "sft":
        rec = fin.sft(qinfo, cands)
    else:
        videos = []
        for r in qrows:
            if r.get("sample_idx", -1) < 0:
                continue
            v = {k: r.get(k) for k in ("sample_idx", "seed", "prompt", "video_uri", "model", "frames", "fps", "score")}
            v["checklist"] = json.loads(r.get("checklist_json") or "[]")
            v["truncated"] = any(c.get("truncated") for c in cands if c["sample_idx"] == v["sample_idx"])
            v["error"] = r.get("video_error") or ""
            videos.append(v)
        rec = fin.dpo(qinfo, cands, videos)
        rec["videos"] = videos
    rec["candidates"] = cands
    return rec


def _to_py(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def stream_and_finalise(ds, queries: dict[str, dict], cfg: GenerateConfig, writer: _PartWriter, fin) -> dict:
    pending: dict[str, list[dict]] = collections.defaultdict(list)
    t0 = time.monotonic()
    finished = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["query_id"])
        for i in range(n):
            row = {k: _to_py(v[i]) for k, v in batch.items()}
            qid = row["query_id"]
            pending[qid].append(row)
            if len(pending[qid]) >= int(row.get("n_rows", 1)):
                writer.add(_record_from_rows(pending.pop(qid), queries[qid], cfg, fin))
                finished += 1
        rate = finished / max(time.monotonic() - t0, 1e-9)
        log.info("finalised %d/%d queries (%.2f/s)", finished, len(queries), rate)
    writer.flush()
    lost = sorted(pending)
    if lost:  # incomplete groups would mean a pipeline bug; record rather than drop
        for qid in lost:
            writer.add({"query_id": qid, "error": error_row(qid, "pairs", "incomplete row group")})
        writer.flush()
    return {"finished": finished, "seconds": time.monotonic() - t0}


def _write_set(out: str, name: str, rows: list[dict], fmt: str) -> str:
    """Write a training set atomically as parquet or jsonl; returns its URI."""
    if fmt == "jsonl":
        uri = storage.join(out, f"{name}.jsonl")
        storage.write_jsonl(uri, rows)
        return uri
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from vpo_ray.schema import arrow_schema

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(name)), buf)
    uri = storage.join(out, f"{name}.parquet")
    storage.write_bytes(uri, buf.getvalue())
    return uri


def run_generate(cfg: GenerateConfig, wrap=None) -> dict:
    """Run the whole job; returns (and writes) the summary. `wrap(cls, pool)`: see flow.Wrap (benchmarks)."""
    from vpo_ray.data.ingest import ingest

    from vpo_ray.data.checklist import load_checklist
    from vpo_ray.pipeline.finalise import Finaliser

    check_config(cfg)
    cfg = video_dpo_set.configure(cfg)  # the video model's preference set keeps latents at render time
    templates = prompts.load_templates(cfg.prompts)  # a bad template or checklist fails before any work
    checklist = load_checklist(cfg.checklist)  # checked for sft runs too: `vpo loop` fails before SFT
    t_start = time.monotonic()
    out = cfg.out
    storage.makedirs(out)
    # Every place this run writes through temp files; a crashed earlier run may have left some.
    swept = sum(storage.sweep_tmp(d) for d in (out, storage.join(out, "parts"), storage.join(out, "videos")))
    if swept:
        log.info("removed %d temp files over an hour old (a crashed write leaves one) under %s", swept, out)
    storage.write_json(storage.join(out, "config.json"), to_dict(cfg))

    t = time.monotonic()
    ing = ingest(cfg.queries, cfg.query_column, cfg.max_query_chars, cfg.near_dup_threshold, cfg.seed, cfg.limit)
    ingest_s = time.monotonic() - t
    storage.write_jsonl(storage.join(out, "duplicates.jsonl"), ing.duplicates)
    queries = {q["query_id"]: q for q in ing.queries}

    done = _completed(out)
    todo = [q for qid, q in queries.items() if qid not in done]
    log.info("%d queries: %d done in earlier runs, %d to process", len(queries), len(queries) - len(todo), len(todo))
    stream = {"finished": 0, "seconds": 0.0}
    if todo:
        from vpo_ray.ray_utils import init_ray

        models = resolve_models(cfg)
        init_ray(cfg.ray)
        rows = [dict(q, error="", error_stage="") for q in todo]
        writer = _PartWriter(out)
        ds, plan = build_dataset(rows, cfg, models, wrap=wrap, templates=templates, checklist=checklist)
        stream = stream_and_finalise(ds, {q["query_id"]: q for q in todo}, cfg, writer,
                                     Finaliser(cfg, templates, checklist))
        stream["placement"] = plan.to_dict()
        done = _completed(out)

    return _consolidate(cfg, ing, done, queries, ingest_s, stream, time.monotonic() - t_start)


def _truncation_counts(cfg: GenerateConfig, cands: list[dict], rows: list[dict]) -> dict:
    """Generations that reached their token limit, per stage, and output rows marked as built from one."""
    def cut(c: dict, stage: str, mark: bool) -> bool:
        return mark or any(e == f"{stage}: truncated" for e in (c.get("error"), c.get("refine_error")))

    return {"policy": cfg.truncation,
            "rewrite": sum(cut(c, "rewrite", bool(c.get("truncated"))) for c in cands),
            "critique": sum(cut(c, "critique", bool((c.get("judge") or {}).get("truncated"))) for c in cands),
            "refine": sum(cut(c, "refine", bool(c.get("refine_truncated"))) for c in cands),
            "rows_marked": sum(1 for r in rows if r.get("truncated"))}


def _consolidate(cfg, ing, done: dict, queries: dict, ingest_s: float, stream: dict, wall_s: float) -> dict:
    out = cfg.out
    recs = [done[qid] for qid in queries if qid in done]
    rows = [r for rec in recs for r in rec.get("rows", [])]
    if cfg.kind == "dpo":  # text pairs first, as the DPO set is defined
        rows.sort(key=lambda r: r["source"] != "text")
    errors = list(ing.errors) + [rec["error"] for rec in recs if "error" in rec]
    set_uri = _write_set(out, cfg.kind, rows, cfg.output_format)
    storage.write_jsonl(storage.join(out, "errors.jsonl"), errors)
    storage.write_jsonl(storage.join(out, "candidates.jsonl"),
                        ({"query_id": rec["query_id"], "candidates": rec.get("candidates", [])} for rec in recs))
    videos = [dict(v, query_id=rec["query_id"]) for rec in recs for v in rec.get("videos", [])]
    if cfg.kind == "dpo":
        storage.write_jsonl(storage.join(out, "videos.jsonl"), videos)

    by_reason = collections.Counter(f"{e['stage']}: {e['reason']}" for e in errors)
    by_stage = collections.Counter(e["stage"] for e in errors)
    cands = [c for rec in recs for c in rec.get("candidates", [])]
    judged = [c for c in cands if c.get("judge")]
    n_in = ing.input_count
    n_ok = sum(1 for rec in recs if "rows" in rec)
    rendered = [v for v in videos if v.get("video_uri") and not v.get("error")]
    summary = {
        "kind": cfg.kind,
        "weights": cfg.weights,  # random: real architectures, random weights; lengths and verdicts as drawn
        "input_queries": n_in,
        "output_rows": len(rows),
        "output_queries": n_ok,
        "duplicates": len(ing.duplicates),
        "errors": len(errors),
        "accounted": n_ok + len(ing.duplicates) + len(errors) == n_in,
        "processed_this_run": stream["finished"],
        "resumed_from_earlier_runs": len(recs) - stream["finished"],
        "stages": {
            "ingest": {"rows_in": n_in, "rows_out": len(ing.queries), "errors": by_stage.get("ingest", 0),
                       "duplicates": len(ing.duplicates), "seconds": round(ingest_s, 3)},
            "rewrite": {"rows_in": len(ing.queries), "candidates_out": len(cands),
                        "errors": by_stage.get("rewrite", 0)},
            "critique": {"rows_in": len(cands), "judged": len(judged),
                         "passed": sum(1 for c in judged if c["judge"]["verdict"]),
                         "errors": by_stage.get("critique", 0)},
            "refine": {"rows_in": sum(1 for c in judged if not c["judge"]["verdict"]),
                       "refined": sum(1 for c in cands if c.get("refined")), "errors": by_stage.get("refine", 0)},
        },
        "truncated": _truncation_counts(cfg, cands, rows),
        "errors_by_reason": dict(by_reason.most_common()),
        "pipeline_seconds": round(stream["seconds"], 3),
        "placement": stream.get("placement"),
        "wall_seconds": round(wall_s, 3),
        "output": set_uri,
    }
    if cfg.kind == "dpo":
        summary["stages"]["render"] = {"rows_in": len(videos), "videos": len(rendered),
                                       "errors": sum(1 for v in videos if v.get("error")) + by_stage.get("render", 0),
                                       "videos_per_s": round(len(rendered) / stream["seconds"], 4) if stream["seconds"] else None}
        summary["stages"]["video_judge"] = {"rows_in": len(rendered), "judged": sum(1 for v in rendered if v["checklist"]),
                                            "errors": by_stage.get("video_judge", 0)}
        summary["stages"]["pairs"] = {"text_pairs": sum(1 for r in rows if r["source"] == "text"),
                                      "video_pairs": sum(1 for r in rows if r["source"] == "video"),
                                      "no_pair": by_stage.get("pairs", 0)}
        if cfg.video_dpo_set:
            summary["stages"]["video_dpo_set"] = video_dpo_set.write(cfg, videos)
    else:
        summary["stages"]["sft"] = {"rows_out": len(rows),
                                    "from_passing": sum(1 for rec in recs if rec.get("how") == "passing"),
                                    "from_refined": sum(1 for rec in recs if rec.get("how") == "refined")}
    storage.write_json(storage.join(out, "summary.json"), summary)
    from vpo_ray.data.card import dataset_card  # `datasets.load_dataset(out)` reads the set through it

    storage.write_text(storage.join(out, "README.md"), dataset_card(cfg.kind, os.path.basename(set_uri), summary))
    return summary


# ---------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    p.add_argument("kind", choices=["sft", "dpo"], help="which training set to build")
    p.add_argument("--queries", help="query file (json/jsonl/parquet/csv) or hf://dataset[:split]")
    p.add_argument("--out", help="output directory or URI")
    p.add_argument("--preset", help="model preset (tiny, paper, qwen)")
    p.add_argument("--optimizer", help="model that samples candidates (default: the preset's)")
    p.add_argument("--config", help="YAML config (GenerateConfig)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_samples=4 video.num_frames=9")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from vpo_ray.config import load_config_with_defaults
    from vpo_ray.models.registry import preset_job_defaults

    fields = dict(kind=args.kind, queries=args.queries, out=args.out, preset=args.preset, optimizer=args.optimizer)
    preset = load_config(GenerateConfig, args.config, args.overrides, **fields).preset
    cfg = load_config_with_defaults(GenerateConfig, args.config, args.overrides, preset_job_defaults(preset), **fields)
    if not cfg.queries:
        from vpo_ray.config import ConfigError
        raise ConfigError("queries: no query file given (--queries PATH or queries=PATH)")
    summary = run_generate(cfg)
    print(json.dumps({k: summary[k] for k in ("input_queries", "output_rows", "duplicates", "errors", "accounted",
                                              "wall_seconds", "output")}, indent=2))
    return 0 if summary["accounted"] else 1
