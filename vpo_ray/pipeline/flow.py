"""The Ray Data flow of `vpo generate`: stages, their pools (placement.py) and how rows move between them.

    rows -> rewrite (optimizer pool or teacher endpoint) -> critique+refine (judge pool)   [sft ends here]
         -> explode: one row per (rendered prompt, seed; render=all: every sample), one row per block
         -> render (T2V pool, one actor per GPU) -> video judge pool

When optimizer and judge are one model (the paper preset), one pool does rewrite and
critique with one copy of the weights (`RewriteAndJudge`). Before rendering the rows are
cut into one-row blocks: Ray Data hands an actor a whole block (it merges small blocks up
to batch_size but never splits a big one), so a 32-prompt block from one judge batch
would otherwise render on one GPU while the others wait.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

import numpy as np

from vpo_ray import faults, storage
from vpo_ray.config import GenerateConfig, StageConfig, to_dict
from vpo_ray.pipeline import placement
from vpo_ray.schema import Flags

# (stage class, pool name) -> the class to map with; the pipeline benchmark times calls this way.
Wrap = Callable[[type, str], type]


def explode_for_render(row: dict, seeds_per_prompt: int, seed: int, model: str, render: str = "all") -> list[dict]:
    """One row per (rendered prompt, seed); a query with none keeps one marker row.

    render=all: every sample with a prompt (official: all K are rendered and judged);
    render=passing: only the samples the judge accepted.
    """
    from vpo_ray.pipeline.finalise import passing

    base = {k: row[k] for k in ("query_id", "query", "text", "flags_json", "candidates_json", "error", "error_stage")}
    if row["error"]:
        return [dict(base, n_rows=1, sample_idx=-1, prompt="", seed=0, negative_prompt="", aspect_ratio="")]
    flags = Flags.from_json(row["flags_json"])
    cands = json.loads(row["candidates_json"])
    chosen = [c for c in cands if (passing(c) if render == "passing" else c["prompt"] and not c.get("error"))]
    jobs = []
    for c in chosen:
        for s in range(seeds_per_prompt):
            # The user's -seed flag fixes the first seed, as a T2V service would.
            video_seed = (flags.seed + s) if flags.seed is not None else (seed * 1000 + s)
            jobs.append(dict(base, sample_idx=c["sample_idx"], prompt=c["prompt"], seed=int(video_seed),
                             negative_prompt=flags.negative_prompt or "", aspect_ratio=flags.aspect_ratio or ""))
    if not jobs:
        return [dict(base, n_rows=1, sample_idx=-1, prompt="", seed=0, negative_prompt="", aspect_ratio="")]
    return [dict(j, n_rows=len(jobs)) for j in jobs]


class RenderStage:
    """Wraps the T2V renderer: renders rows that carry a prompt, passes the rest through."""

    def __init__(self, **kwargs):
        from vpo_ray.pipeline.t2v import T2VRenderer

        self.inner = T2VRenderer(**kwargs)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["query_id"])
        todo = [i for i in range(n) if not batch["error"][i] and batch["prompt"][i]]
        out = {k: list(v) for k, v in batch.items()}
        for col in ("video_uri", "model", "frames", "fps"):
            out.setdefault(col, [""] * n if col in ("video_uri", "model") else [0] * n)
        if todo:
            sub = {k: np.asarray([batch[k][i] for i in todo], dtype=object if batch[k].dtype == object else None)
                   for k in ("query_id", "sample_idx", "prompt", "negative_prompt", "seed", "aspect_ratio")}
            res = self.inner(sub)
            for pos, i in enumerate(todo):
                for col in ("video_uri", "model", "frames", "fps"):
                    out[col][i] = res[col][pos]
                if res["error"][pos]:  # marks the video, not the query, as failed
                    out["video_error"] = out.get("video_error", [""] * n)
                    out["video_error"][i] = str(res["error"][pos])  # T2VRenderer says "render: <why>"
        out.setdefault("video_error", [""] * n)
        return {k: np.asarray(v, dtype=object) if k in ("video_uri", "model", "video_error") else np.asarray(v)
                for k, v in out.items()}


class RewriteAndJudge:
    """Rewrite, then critique and refine, in one actor: one copy of the LLM when optimizer and judge are one model."""

    def __init__(self, rewrite: dict, judge: dict):
        from vpo_ray.pipeline.llm import Critic, Rewriter

        self.rewriter = Rewriter(**rewrite)
        self.critic = Critic(**judge)  # same (model, device): llm.shared_engine hands back the rewriter's engine

    def __call__(self, batch: dict) -> dict:
        return self.critic(self.rewriter(batch))


# ---------------------------------------------------------------------------- pools

def guarded(stage: StageConfig, out: str) -> dict:
    """The watchdog settings of a stage's actors (pipeline/guard.py); struck rows are kept under out/watchdog."""
    return dict(watchdog_s=stage.watchdog_s,
                strikes_dir=storage.join(out, "watchdog") if stage.watchdog_s > 0 else None)


def shares_llm(cfg: GenerateConfig, models: dict) -> bool:
    return (cfg.placement.share_llm and cfg.judge_endpoint.base_url is None and cfg.teacher_endpoint.base_url is None
            and models["optimizer"] == models["judge"])


def pool_requests(cfg: GenerateConfig, models: dict) -> list[placement.PoolRequest]:
    """The actor pools this job asks placement for, in flow order."""
    def req(name: str, role: str, stage, model, concurrency: int = 1) -> placement.PoolRequest:
        gib, tiled = placement.model_gib(model)
        return placement.PoolRequest(name, role, stage, gib, tiled, concurrency)

    if shares_llm(cfg, models):
        out = [req("llm", "optimizer", cfg.rewrite_stage, models["optimizer"])]
    else:
        if cfg.teacher_endpoint.base_url is None:
            out = [req("rewrite", "optimizer", cfg.rewrite_stage, models["optimizer"])]
        else:  # the teacher endpoint writes the rewrites: a CPU pool
            out = [placement.PoolRequest("rewrite", "http", cfg.rewrite_stage)]
        if cfg.judge_endpoint.base_url is None:
            out.append(req("judge", "judge", cfg.judge_stage, models["judge"]))
        else:  # an HTTP judge holds no model: a CPU pool
            out.append(placement.PoolRequest("judge", "http", cfg.judge_stage))
    if cfg.kind == "dpo":
        overlap = 2 if "overlap" in cfg.video.optimizations else 1
        out.append(req("t2v", "t2v", cfg.t2v_stage, models["t2v"], concurrency=overlap))
        out.append(req("video_judge", "video_judge", cfg.video_judge_stage, models["video_judge"]))
    return out


def llm_stage_kwargs(cfg: GenerateConfig, models: dict, templates=None) -> tuple[dict, dict]:
    """Constructor arguments of the Rewriter and the Critic (also RewriteAndJudge's two halves).

    `templates`: prompts.load_templates(cfg.prompts), loaded here when not given.
    """
    from vpo_ray import prompts

    templates = templates or prompts.load_templates(cfg.prompts)
    engine = to_dict(cfg.llm_engine)
    rewrite = dict(model=models["optimizer"], num_samples=cfg.samples, sampling=to_dict(cfg.sampling),
                   seed=cfg.seed, endpoint=to_dict(cfg.teacher_endpoint), templates=templates,
                   optimizer_input=cfg.prompts.optimizer_input, truncation=cfg.truncation, engine=engine,
                   **guarded(cfg.rewrite_stage, cfg.out))
    judge = dict(model=models["judge"], sampling=to_dict(cfg.judge_sampling), endpoint=to_dict(cfg.judge_endpoint),
                 refine=cfg.refine, seed=cfg.seed, templates=templates, truncation=cfg.truncation,
                 keep_multiline=cfg.refine_keep_multiline, reflection=cfg.refine_reflection, engine=engine,
                 **guarded(cfg.judge_stage, cfg.out))
    return rewrite, judge


def build_dataset(rows: list[dict], cfg: GenerateConfig, models: dict, wrap: Optional[Wrap] = None,
                  plan: Optional[placement.Plan] = None, templates=None, checklist=None):
    """(dataset, placement plan) of the whole flow over `rows` (query records with error/error_stage).

    `templates`: prompts.load_templates(cfg.prompts); `checklist`: data.checklist.load_checklist(cfg.checklist)
    (both loaded here when not given).
    """
    from vpo_ray.data.checklist import load_checklist

    import ray.data

    from vpo_ray.pipeline.llm import Critic, Rewriter
    from vpo_ray.pipeline.video_judge import VideoJudge

    plan = plan or placement.job_plan(pool_requests(cfg, models), cfg.placement)
    wrap = wrap or (lambda cls, name: cls)

    def stage(ds, cls, name: str, **kwargs):
        extra = {"runtime_env": {"env_vars": env}} if (env := faults.env_vars()) else {}  # drills reach every actor
        return ds.map_batches(wrap(cls, name), fn_constructor_kwargs=kwargs, **placement.map_kwargs(plan.pools[name]),
                              **extra)

    rewrite, judge = llm_stage_kwargs(cfg, models, templates)
    batch = plan.pools["llm" if "llm" in plan.pools else "rewrite"].batch_size
    n_blocks = max(1, min(len(rows), 64, len(rows) // max(1, batch)))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    if "llm" in plan.pools:
        ds = stage(ds, RewriteAndJudge, "llm", rewrite=rewrite, judge=judge)
    else:
        ds = stage(ds, Rewriter, "rewrite", **rewrite)
        ds = stage(ds, Critic, "judge", **judge)
    if cfg.kind == "sft":
        return ds, plan
    ds = ds.flat_map(explode_for_render, num_cpus=0.1, fn_kwargs=dict(  # cheap: never starves the pools
        seeds_per_prompt=cfg.video.seeds_per_prompt, seed=cfg.seed, model=str(models["t2v"]), render=cfg.render))
    ds = ds.repartition(target_num_rows_per_block=plan.pools["t2v"].batch_size)  # spread prompts over the GPUs
    flags = tuple(dict.fromkeys(tuple(cfg.video.optimizations) + plan.t2v_flags))
    ds = stage(ds, RenderStage, "t2v", model=models["t2v"], video=cfg.video, out_root=cfg.out,
               optimizations=flags, warmup_steps=cfg.video.warmup_steps, watchdog_s=cfg.t2v_stage.watchdog_s)
    checklist = checklist or load_checklist(cfg.checklist)
    ds = stage(ds, VideoJudge, "video_judge", model=models["video_judge"], checklist=checklist.as_dicts(),
               num_frames=cfg.video.judge_frames, video_score=cfg.video_score,
               **guarded(cfg.video_judge_stage, cfg.out))
    return ds, plan


def resolve_models(cfg: GenerateConfig) -> dict[str, Any]:
    """Model references per role, resolved on the driver (the tiny preset builds here, once).

    weights=random gives `RandomModel`s that every actor builds at real size. A given
    optimizer is checked here (its config only): a wrong path or an id that is not cached
    offline fails now with ModelLoadError naming it, not later in every actor.
    """
    from vpo_ray.models.random_weights import WithRandomOutputs
    from vpo_ray.models.registry import check_config as check_model, model_path, model_ref

    def ref(role: str):
        return model_ref(cfg.preset, role, cfg.weights, cfg.random_outputs)

    optimizer = cfg.optimizer
    if optimizer:
        check_model(optimizer)
        if cfg.weights == "random":  # trained from random weights (a weights=random loop): it ends rows as drawn too
            optimizer = WithRandomOutputs(optimizer, cfg.random_outputs)
    roles = {"optimizer": optimizer or ref("optimizer"), "judge": ref("judge")}
    if cfg.kind == "dpo":
        # cfg.t2v: a tuned video model (a dir, run folder or registry name; `vpo loop --tune video`)
        roles["t2v"] = model_path(cfg.t2v) if cfg.t2v else ref("t2v")
        roles["video_judge"] = ref("video_judge")
    return roles
