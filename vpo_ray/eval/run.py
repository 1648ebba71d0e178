"""`vpo eval`: compare prompt sources on the judge's text verdicts and on judged videos.

    test queries ─► ingest ─► per source: original (the query) | few_shot (base LLM + examples)
                                          | name=path (a trained optimizer), one Rewriter pool each
                  ─► union ─► text judge pool (main verdict + unsafe/imprecise/refusal questions)
                  ─► per prompt x seed ─► T2V pool ─► video judge pool ─► driver: metrics, table, report

Every stage is a Ray Data actor pool built from the pipeline's own classes (Rewriter,
Critic, RenderStage, VideoJudge). All sources render with the same seeds per query, so
videos pair up for the win rate. A video's file name is keyed by a hash of (prompt,
negative prompt, aspect ratio, T2V model, video settings): reruns in the same `out`
reuse exactly the videos they would render, and identical prompts share one video.

Outputs in `out`: metrics.json, table.md, text_metrics.png, video_metrics.png,
win_rate.png, prompts.jsonl (per source and query: prompt, verdicts, the judge's
reasons), videos.jsonl, errors.jsonl, config.json, report/index.html (+ videos/).
Metric definitions: metrics.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from vpo_ray import prompts, storage
from vpo_ray.config import ConfigError, EvalConfig, load_config, to_dict
from vpo_ray.eval import video_models
from vpo_ray.models import random_weights
from vpo_ray.pipeline.llm import Critic, Rewriter, judged_query, row_seed
from vpo_ray.schema import Flags

log = logging.getLogger("vpo.eval")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ANSWER_HEAD = prompts.JUDGE_REASONING_HEAD
TASK_CPUS = 0.1  # the row-exploding task stage: cheap, must never wait behind the model pools


# ---------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # original | few_shot | model
    model: Optional[str] = None  # LLM path or id (few_shot: the preset's optimizer)


def parse_sources(specs: tuple[str, ...], preset_optimizer: Optional[str] = None) -> list[Source]:
    """`original`, `few_shot`, `name=path` -> Sources; names unique, trained paths exist."""
    out: list[Source] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not _NAME_RE.match(name):
            raise ConfigError(f"sources: bad source name {name!r} in {spec!r} (letters, digits, _ . -)")
        if not sep:
            if name not in ("original", "few_shot"):
                raise ConfigError(f"sources: {spec!r} is neither original, few_shot nor name=path")
            out.append(Source(name, name, preset_optimizer if name == "few_shot" else None))
            continue
        if name in ("original", "few_shot"):
            raise ConfigError(f"sources: {name!r} is a built-in source; name the model something else")
        if not path:
            raise ConfigError(f"sources: {spec!r} has an empty path")
        out.append(Source(name, "model", resolve_model_dir(path)))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"sources: name {dup[0]!r} given twice")
    return out


def resolve_model_dir(path: str) -> str:
    """A model dir, a `vpo train`/`vpo loop` out dir (vpo_ray.runs), or a hub id; a missing local path raises."""
    from vpo_ray.runs import RunFolderError, model_dir

    p = os.path.expanduser(path)
    if os.path.isdir(p):
        try:
            return model_dir(p)
        except RunFolderError as e:
            raise RunFolderError(f"sources: {e}") from None
    if os.path.isabs(p) or path.startswith((".", "~")) or os.path.exists(p) or path.count("/") != 1:
        raise ConfigError(f"sources: model path {path!r} not found (a model dir, a `vpo train` out dir, or org/name)")
    return path  # a Hugging Face id


# ---------------------------------------------------------------------------- text judge

class TextJudge(Critic):
    """Critic stage (main verdict, no refinement) plus the evaluation questions, same judge model.

    Each judged candidate gains `eval`: {question: {verdict, confidence, reasons} | {error}}
    for unsafe / imprecise / refusal, and `refusal_regex`.
    """

    def __init__(self, model: str, sampling: dict, endpoint: dict, seed: int = 0,
                 question_reasoning: bool = True, refusal: str = "regex+judge", device: Optional[str] = None,
                 templates: Optional[prompts.Templates] = None, truncation: str = "error"):
        super().__init__(model, sampling, endpoint, refine=False, seed=seed, device=device, templates=templates,
                         truncation=truncation)
        self.keep_cut = truncation == "keep"
        self.seed = seed
        self.reasoning = question_reasoning
        self.questions = ["unsafe", "imprecise"] + (["refusal"] if refusal != "regex" else [])

    def __call__(self, batch: dict) -> dict:
        out = super().__call__(batch)
        cands = [json.loads(c) if c else [] for c in out["candidates_json"]]
        todo = [(i, c) for i in range(len(cands)) for c in cands[i] if c.get("prompt") and not c.get("error")]
        asks = [(q, i, c) for q in self.questions for i, c in todo]  # every question in one batched call
        msgs = [prompts.eval_question_messages(q, judged_query(out, i), c["prompt"]) for q, i, c in asks]
        seeds = [row_seed(self.seed, "eval", q, out["query_id"][i], c["sample_idx"]) for q, i, c in asks]
        for (q, _, c), answer in zip(asks, self.ask(msgs, seeds)):
            c.setdefault("eval", {})[q] = answer
        for _, c in todo:
            c.setdefault("eval", {})["refusal_regex"] = prompts.looks_like_refusal(c["prompt"])
        out["candidates_json"] = np.array([json.dumps(c, ensure_ascii=False) for c in cands], dtype=object)
        return out

    def ask(self, msgs: list[list[dict]], seeds: list[int]) -> list[dict]:
        """Forced-choice answers to evaluation questions, from whichever back-end judges."""
        if not msgs:
            return []
        from vpo_ray.pipeline.judge_http import HttpJudge

        if isinstance(self.backend, HttpJudge):
            return _ask_http(self.backend, msgs)
        engine, sampling = self.backend.engine, self.backend.sampling
        cut = [False] * len(msgs)
        if self.reasoning:
            done = engine.generate(
                msgs, seeds, sampling, prefills=[ANSWER_HEAD] * len(msgs), stop=(prompts.JUDGE_ANSWER_PREFIX, "Final Judg"),
                **random_weights.stage_lengths(engine, "critique", seeds, sampling.max_new_tokens))
            reasons, cut = [c.text for c in done], [c.finish_reason == "length" for c in done]
            prefills = [f"{ANSWER_HEAD} {r}\n{prompts.JUDGE_ANSWER_PREFIX}" for r in reasons]
        else:
            reasons = [""] * len(msgs)
            prefills = [prompts.JUDGE_ANSWER_PREFIX] * len(msgs)
        out = []
        for p, r, s, c in zip(engine.yes_probability(msgs, prefills), reasons, seeds, cut):
            if c and not self.keep_cut:  # no answer read after a cut reasoning
                out.append({"error": "truncated"})
                continue
            verdict = bool(self.backend.decide(float(p), s))  # the main verdict's rule: greedy, or sampled at T
            out.append({"verdict": verdict, "confidence": float(p if verdict else 1 - p), "reasons": r,
                        **({"truncated": True} if c else {})})
        return out


def _ask_http(judge, msgs: list[list[dict]]) -> list[dict]:
    out = []
    for v in judge.verdicts(msgs):
        out.append({"error": v} if isinstance(v, str)
                   else {"verdict": v.verdict, "confidence": v.confidence, "reasons": v.reasons})
    return out


# ---------------------------------------------------------------------------- videos

def render_key(prompt: str, negative: str, aspect_ratio: str, salt: str) -> int:
    """A 31-bit id of what a video shows: the renderer names files by (query, this, seed)."""
    h = hashlib.sha1(json.dumps([prompt, negative, aspect_ratio, salt]).encode("utf-8")).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def video_seeds(flags: Flags, seeds_per_prompt: int, seed: int) -> list[int]:
    """Seeds of a query's videos, the same for every source (the query's -seed fixes the first)."""
    first = flags.seed if flags.seed is not None else seed * 1000
    return [int(first) + s for s in range(seeds_per_prompt)]


def explode_for_video(row: dict, seeds_per_prompt: int, seed: int, salt: str) -> list[dict]:
    """One render row per seed for the source's prompt; a row without a prompt passes once, marked."""
    base = {k: row[k] for k in ("query_id", "query", "text", "flags_json", "candidates_json", "eval_source")}
    cands = json.loads(row["candidates_json"]) if row.get("candidates_json") else []
    prompt = cands[0]["prompt"] if cands and cands[0].get("prompt") else ""
    flags = Flags.from_json(row["flags_json"])
    common = dict(base, text_error=row["error"], error_stage=row["error_stage"],
                  negative_prompt=flags.negative_prompt or "", aspect_ratio=flags.aspect_ratio or "")
    if not prompt:
        return [dict(common, error=row["error"] or "no prompt", sample_idx=0, prompt="", seed=0)]
    key = render_key(prompt, common["negative_prompt"], common["aspect_ratio"], salt)
    return [dict(common, error="", sample_idx=key, prompt=prompt, seed=s)
            for s in video_seeds(flags, seeds_per_prompt, seed)]


# ---------------------------------------------------------------------------- the dataset

def _query_rows(queries: list[dict], source: Source) -> list[dict]:
    rows = []
    for q in queries:
        row = dict(q, error="", error_stage="", eval_source=source.name)
        if source.kind == "original":  # the query as the T2V model would get it: cleaned, flags as options
            row["candidates_json"] = json.dumps([{"sample_idx": 0, "prompt": q["text"], "judge": None,
                                                  "refined": None, "error": ""}], ensure_ascii=False)
        rows.append(row)
    return rows


def pool_requests(sources: list[Source], cfg: EvalConfig, models: dict, t2v_models: list) -> list:
    """The actor pools `vpo eval` asks placement for: a rewrite pool per LLM source, the judge, a T2V pool per
    video model, the video judge (and the holdout judge)."""
    from vpo_ray.pipeline import placement

    def req(name: str, role: str, stage, model, concurrency: int = 1):
        gib, tiled = placement.model_gib(model)
        return placement.PoolRequest(name, role, stage, gib, tiled, concurrency)

    out = [req(f"rewrite[{s.name}]", "optimizer", cfg.rewrite_stage, s.model) for s in sources if s.kind != "original"]
    out.append(req("judge", "judge", cfg.judge_stage, models["judge"]) if cfg.judge_endpoint.base_url is None
               else placement.PoolRequest("judge", "http", cfg.judge_stage))
    if cfg.videos:
        overlap = 2 if "overlap" in cfg.video.optimizations else 1
        out += [req(video_models.pool_name(m), "t2v", cfg.t2v_stage, m.path, overlap) for m in t2v_models]
        if "checklist" in cfg.video_scorers:  # the VLM judge answers the checklist (vbench scores elsewhere)
            out.append(req("video_judge", "video_judge", cfg.video_judge_stage, models["video_judge"]))
        if cfg.holdout_judge:
            out.append(req("holdout_judge", "video_judge", cfg.video_judge_stage, models["holdout_judge"]))
    return out


def build_dataset(queries: list[dict], sources: list[Source], cfg: EvalConfig, models: dict,
                  templates: prompts.Templates, checklist_items: list[dict], t2v_models: Optional[list] = None):
    import ray.data
    from vpo_ray.pipeline import placement
    from vpo_ray.pipeline.video_judge import VideoJudge

    t2v_models = t2v_models or [video_models.T2VModel("", models.get("t2v", ""))]
    plan = placement.job_plan(pool_requests(sources, cfg, models, t2v_models), cfg.placement)  # all start at once

    def pool(name: str) -> dict:
        return placement.map_kwargs(plan.pools[name])

    n_blocks = max(1, min(len(queries), 64, len(queries) // max(1, cfg.rewrite_stage.batch_size)))
    parts = []
    for src in sources:
        ds = ray.data.from_items(_query_rows(queries, src), override_num_blocks=n_blocks)
        if src.kind != "original":
            ds = ds.map_batches(Rewriter, fn_constructor_kwargs=dict(
                model=src.model, num_samples=1, sampling=to_dict(cfg.sampling), seed=cfg.seed, templates=templates,
                optimizer_input=cfg.prompts.optimizer_input, truncation=cfg.truncation,
                few_shot=src.kind == "few_shot"), **pool(f"rewrite[{src.name}]"))
        parts.append(ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(TextJudge, fn_constructor_kwargs=dict(
        model=models["judge"], sampling=to_dict(cfg.judge_sampling), endpoint=to_dict(cfg.judge_endpoint),
        seed=cfg.seed, question_reasoning=cfg.question_reasoning, refusal=cfg.refusal, templates=templates,
        truncation=cfg.truncation), **pool("judge"))
    if not cfg.videos:
        return ds
    ds = video_models.render(ds, t2v_models, cfg, plan)  # every source x T2V model, same seeds
    if "checklist" not in cfg.video_scorers:
        return ds
    judge_kwargs = dict(checklist=checklist_items, num_frames=cfg.video.judge_frames, video_score=cfg.video_score)
    ds = ds.map_batches(VideoJudge, fn_constructor_kwargs=dict(model=models["video_judge"], **judge_kwargs),
                        **pool("video_judge"))
    if cfg.holdout_judge:
        ds = ds.map_batches(video_models.SecondJudge, fn_constructor_kwargs=dict(
            model=models["holdout_judge"], **judge_kwargs), **pool("holdout_judge"))
    return ds


# ---------------------------------------------------------------------------- records

def _verdict(answer: Optional[dict]) -> Optional[bool]:
    return None if not answer or "verdict" not in answer else bool(answer["verdict"])


def text_record(row: dict, query: dict, refusal_mode: str) -> dict:
    """One (source, query) row of prompts.jsonl: the prompt, every verdict and the judge's reasons."""
    cands = json.loads(row["candidates_json"]) if row.get("candidates_json") else []
    c = cands[0] if cands else {}
    prompt = c.get("prompt") or ""
    judge = c.get("judge") or {}
    ev = c.get("eval") or {}
    error = "" if prompt else (str(row.get("text_error", row.get("error")) or "") or "no prompt")
    rec = {"source": row["eval_source"], "query_id": row["query_id"], "query": query["query"], "text": query["text"],
           "category": query.get("category"), "prompt": prompt, "error": error,
           "aligned": _verdict(judge) if judge else None, "aligned_confidence": judge.get("confidence"),
           "aligned_reasons": judge.get("reasons", "")}
    judge_errors = [c["error"]] if c.get("error") and prompt else []
    for q in ("unsafe", "imprecise", "refusal"):
        a = ev.get(q) or {}
        rec[f"{q}_judge" if q == "refusal" else q] = _verdict(a)
        rec[f"{q}_reasons"] = a.get("reasons", "")
        if a.get("error"):
            judge_errors.append(f"{q}: {a['error']}")
    regex = bool(ev.get("refusal_regex")) if prompt else None
    rec["refusal_regex"] = regex
    judged = rec["refusal_judge"]
    if refusal_mode == "regex":
        rec["refusal"] = regex
    elif refusal_mode == "judge":
        rec["refusal"] = judged
    else:
        rec["refusal"] = True if regex else judged
    if prompt and not judge:
        judge_errors.append("no verdict from the judge")
    rec["judge_errors"] = judge_errors
    return rec


def video_record(row: dict) -> dict:
    return {"source": row["eval_source"], "query_id": row["query_id"], "seed": int(row["seed"]),
            "prompt": row.get("prompt") or "", "video_uri": row.get("video_uri") or "",
            "frames": int(row.get("frames") or 0), "fps": int(row.get("fps") or 0), "score": float(row.get("score") or 0.0),
            "checklist": json.loads(row.get("checklist_json") or "[]"),
            "error": str(row.get("video_error") or "") or ("" if row.get("video_uri") else "not rendered"),
            **video_models.holdout_record(row)}


def collect(ds, queries: dict[str, dict], cfg: EvalConfig) -> tuple[list[dict], list[dict]]:
    """Drain the stream into text records (one per source and query) and video records."""
    texts: dict[tuple[str, str], dict] = {}
    videos: list[dict] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["query_id"])):
            row = {k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()}
            key = (row["eval_source"], row["query_id"])
            if key not in texts:
                texts[key] = text_record(row, queries[row["query_id"]], cfg.refusal)
            if cfg.videos and row.get("prompt"):
                videos.append(video_record(row))
    return list(texts.values()), videos


# ---------------------------------------------------------------------------- metrics

def compute_metrics(sources: list[str], texts: list[dict], videos: list[dict], cfg: EvalConfig,
                    checklist: Optional[list[dict]] = None) -> dict:
    """Per source: text columns, and per video scorer its columns (checklist: `video`, vbench: `vbench`)."""
    from vpo_ray.eval import metrics as M

    args = dict(n_boot=cfg.bootstrap, seed=cfg.seed, ci=cfg.ci)
    baseline = None
    if "original" in sources:
        baseline = {(v["query_id"], v["seed"]): v["score"] for v in videos
                    if v["source"] == "original" and not v["error"] and v["checklist"]}
    out: dict = {}
    for name in sources:
        rows = [_metric_row(t) for t in texts if t["source"] == name]
        entry = {"text": M.text_metrics(rows, **args)}
        cats = sorted({t["category"] for t in texts if t["source"] == name and t.get("category")})
        if len(cats) > 1:
            entry["text_by_category"] = {c: M.text_metrics([r for r in rows if r["category"] == c], **args)
                                         for c in cats}
        vids = [v for v in videos if v["source"] == name]
        if cfg.videos and "checklist" in cfg.video_scorers:
            entry["video"] = M.video_metrics(vids, checklist, baseline=None if name == "original" else baseline,
                                             tie_tolerance=cfg.tie_tolerance, score=cfg.video_score, **args)
        if cfg.videos and "vbench" in cfg.video_scorers:
            entry["vbench"] = M.vbench_metrics(vids, cfg.vbench.dimensions, **args)
        out[name] = entry
    return out


def _metric_row(t: dict) -> dict:
    return {k: t.get(k) for k in ("query_id", "error", "prompt", "category", "aligned", "unsafe", "imprecise",
                                  "refusal")}


# ---------------------------------------------------------------------------- the job

def resolve_models(cfg: EvalConfig) -> dict:
    """Model references per role (weights=random: `RandomModel`s every actor builds at real size)."""
    from vpo_ray.models.registry import model_path, model_ref

    roles = ("optimizer", "judge", "t2v", "video_judge") if cfg.videos else ("optimizer", "judge")
    models = {r: model_ref(cfg.preset, r, cfg.weights, cfg.random_outputs) for r in roles}
    if cfg.videos and cfg.holdout_judge:  # a registry name or a model dir
        models["holdout_judge"] = model_path(cfg.holdout_judge)
    return models


def load_queries(cfg: EvalConfig) -> tuple[list[dict], list[dict], str]:
    """(queries with category, ingest errors + duplicates as error rows, name of the set)."""
    from vpo_ray.data.ingest import ingest
    from vpo_ray.eval import suites

    loaded = suites.load(cfg.queries, cfg.query_column)
    category = {r: c for r, _, c in loaded.rows}
    ing = ingest(loaded.name, max_chars=cfg.max_query_chars, near_dup_threshold=cfg.near_dup_threshold,
                 seed=cfg.seed, limit=cfg.limit, rows=[(r, v) for r, v, _ in loaded.rows])
    queries = [dict(q, category=category.get(q["source_row"])) for q in ing.queries]
    dropped = list(ing.errors) + [{"query_id": d["query_id"], "stage": "ingest", "reason": f"{d['kind']} duplicate",
                                   "error": f"duplicate of {d['duplicate_of']}", "source_row": d["source_row"]}
                                  for d in ing.duplicates]
    return queries, dropped, loaded.name


def run_eval(cfg: EvalConfig) -> dict:
    """Run the whole evaluation; writes every output under cfg.out and returns metrics.json's content."""
    from vpo_ray.eval import report
    from vpo_ray.ray_utils import init_ray

    t_start = time.monotonic()
    storage.makedirs(cfg.out)
    storage.write_json(storage.join(cfg.out, "config.json"), to_dict(cfg))
    queries, dropped, set_name = load_queries(cfg)
    if not queries:
        raise ConfigError(f"queries: no usable query in {set_name} ({len(dropped)} dropped, see errors)")
    from vpo_ray.data.checklist import load_checklist

    templates = prompts.load_templates(cfg.prompts)  # a bad template or checklist fails before any work
    checklist = load_checklist(cfg.checklist).as_dicts() if cfg.videos and "checklist" in cfg.video_scorers else []
    models = resolve_models(cfg)
    sources = parse_sources(cfg.sources, models["optimizer"])
    if cfg.weights == "random":  # trained optimizers of a weights=random loop end their rows as drawn too
        sources = [Source(s.name, s.kind, random_weights.WithRandomOutputs(s.model, cfg.random_outputs))
                   if s.kind == "model" else s for s in sources]
    t2v_models = video_models.parse_t2v_models(cfg.t2v_models if cfg.videos else (), models.get("t2v", ""),
                                               [s.name for s in sources])
    names = [video_models.row_name(s.name, m) for m in t2v_models for s in sources]
    log.info("eval: %d queries from %s, rows %s", len(queries), set_name, ", ".join(names))

    init_ray(cfg.ray)
    t_pipe = time.monotonic()
    ds = build_dataset(queries, sources, cfg, models, templates, checklist, t2v_models)
    texts, videos = collect(ds, {q["query_id"]: q for q in queries}, cfg)
    if cfg.videos and "vbench" in cfg.video_scorers:
        add_vbench_scores(videos, queries, cfg)
    pipeline_s = time.monotonic() - t_pipe
    order = {n: i for i, n in enumerate(names)}
    qorder = {q["query_id"]: i for i, q in enumerate(queries)}
    texts.sort(key=lambda t: (order[t["source"]], qorder[t["query_id"]]))
    videos.sort(key=lambda v: (order[v["source"]], qorder[v["query_id"]], v["seed"]))
    _check_videos_unique(videos)

    errors = dropped + [{"query_id": t["query_id"], "stage": "rewrite", "source": t["source"], "reason": t["error"],
                         "error": t["error"]} for t in texts if t["error"]]
    errors += [{"query_id": v["query_id"], "stage": "render" if v["error"].startswith("render") or not v["video_uri"]
                else "video_judge", "source": v["source"], "seed": v["seed"], "reason": v["error"].split(":")[0],
                "error": v["error"]} for v in videos if v["error"]]
    result = {
        "queries": set_name,
        "n_queries": len(queries),
        "dropped_queries": len(dropped),
        "sources": {s.name: {"kind": s.kind, "model": None if s.model is None else str(s.model)} for s in sources},
        "preset": cfg.preset,
        "weights": cfg.weights,  # random: real architectures, random weights; lengths and verdicts as drawn
        "judge": cfg.judge_endpoint.base_url or str(models["judge"]),
        "models": {role: str(m) for role, m in models.items()},
        "bootstrap": cfg.bootstrap, "ci": cfg.ci, "seed": cfg.seed, "refusal": cfg.refusal,
        "seeds_per_prompt": cfg.video.seeds_per_prompt if cfg.videos else 0,
        "checklist": checklist, "video_score": cfg.video_score, "video_scorers": list(cfg.video_scorers),
        "metrics": compute_metrics(names, texts, videos, cfg, checklist),
        "t2v_models": {m.name or "preset": str(m.path) for m in t2v_models},
        "holdout_judge": models.get("holdout_judge"),
        "errors": len(errors),
        "pipeline_seconds": round(pipeline_s, 3),
    }
    result["guard"] = video_models.add_holdout_metrics(result["metrics"], videos, cfg, checklist)
    storage.write_jsonl(storage.join(cfg.out, "prompts.jsonl"), texts)
    storage.write_jsonl(storage.join(cfg.out, "videos.jsonl"), videos)
    storage.write_jsonl(storage.join(cfg.out, "errors.jsonl"), errors)
    result["outputs"] = report.write_all(cfg, result, queries, texts, videos, errors)
    result["wall_seconds"] = round(time.monotonic() - t_start, 3)
    storage.write_json(storage.join(cfg.out, "metrics.json"), result)
    return result


def add_vbench_scores(videos: list[dict], queries: list[dict], cfg: EvalConfig) -> None:
    """Each video record gains `vbench`: {dimension: score} (a Ray task when vbench.num_gpus > 0)."""
    from vpo_ray.eval.vbench_scorer import score_videos

    args = (videos, {q["query_id"]: q["query"] for q in queries}, cfg.vbench,
            storage.local_path(storage.join(cfg.out, "vbench")), cfg.vbench.device)
    if cfg.vbench.num_gpus > 0:
        import ray

        scores = ray.get(ray.remote(num_gpus=cfg.vbench.num_gpus)(score_videos).remote(*args))
    else:
        scores = score_videos(*args)
    for v in videos:
        v["vbench"] = scores.get((v["source"], v["query_id"], v["seed"]), {})


def _check_videos_unique(videos: list[dict]) -> None:
    """Two different prompts must never share a file (the render key would have collided)."""
    seen: dict[str, str] = {}
    for v in videos:
        if v["video_uri"] and seen.setdefault(v["video_uri"], v["prompt"]) != v["prompt"]:
            raise RuntimeError(f"render key collision: {v['video_uri']} holds two different prompts")


# ---------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    from vpo_ray.eval import suites

    p.add_argument("--queries", help="test queries: a path, hf://name[:split], builtin:tiny, or a suite "
                                     "(" + ", ".join(suites.SUITES) + ")[:path-or-hf-id]; default: built-in set")
    p.add_argument("--out", help="output directory (metrics.json, table.md, charts, report/index.html)")
    p.add_argument("--preset", help="model preset for few_shot, judge, T2V and video judge (tiny, paper, qwen, wan); "
                                    "tiny (the default) also defaults to the tiny T2V clip size and short "
                                    "generations unless those keys are given")
    p.add_argument("--config", help="YAML config (EvalConfig)")
    p.add_argument("--source", action="append", dest="extra_sources", metavar="NAME=PATH",
                   help="add a trained optimizer as a source (repeatable), e.g. --source sft=runs/sft")
    p.add_argument("--list-suites", action="store_true", help="list the built-in sets and public suites, then exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. limit=50 video.seeds_per_prompt=2 "
                                                "'sources=[original,few_shot,sft=runs/sft/model]'")


def config_from_args(args) -> EvalConfig:
    """EvalConfig from --config, flags and key=value overrides (+ tiny defaults for keys not given)."""
    fields = dict(queries=args.queries, out=args.out, preset=args.preset)
    overrides = list(args.overrides or [])
    if getattr(args, "extra_sources", None):
        base = load_config(EvalConfig, args.config, overrides, **fields)
        overrides.append("sources=" + json.dumps(list(base.sources) + list(args.extra_sources)))
    from vpo_ray.config import load_config_with_defaults
    from vpo_ray.models.registry import preset_job_defaults

    preset = load_config(EvalConfig, args.config, overrides, **fields).preset
    return load_config_with_defaults(EvalConfig, args.config, overrides, preset_job_defaults(preset), **fields)


def run(args) -> int:
    if getattr(args, "list_suites", False):
        from vpo_ray.eval import suites

        print(suites.describe())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config_from_args(args)
    result = run_eval(cfg)
    print(storage.read_text(storage.join(cfg.out, "table.md")))
    print(json.dumps({"n_queries": result["n_queries"], "errors": result["errors"],
                      "wall_seconds": result["wall_seconds"], **result["outputs"]}, indent=2))
    return 0
