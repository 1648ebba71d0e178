"""Where the stages' actor pools go: one rule for `vpo generate`, `vpo eval` and `vpo bench pipeline`.

The rule (docs/PLACEMENT.md has the reasoning and the figures it rests on):

  1. Text-to-video takes every GPU: one T2V actor per GPU, `num_gpus = 1 - side_share`
     (> 0.5, so two T2V actors never share a GPU).
  2. The LLM/VLM ("side") pools share what is left: `side_actors` actors per pool
     (default 1), each `num_gpus = side_share / (all side actors)`. Ray packs fractional
     GPU requests best-fit (src/ray/common/scheduling/resource_instance_set.cc), so every
     side actor lands on one GPU, whatever order the actors are created in; that GPU still
     holds its T2V actor and renders too.
  3. Rewrite and judge share one pool (one copy of the weights) when they are the same
     model, unless `share_llm` is off.
  4. Memory: the GPU that may hold the T2V actor plus every side actor must fit in
     `memory_headroom` of a GPU (registry `gpu_gib` figures + 0.6 GiB of CUDA context per
     process). If not, T2V actors decode with VAE tiling (`gpu_gib_tiled`); if that still
     does not fit, the side pools get dedicated GPUs (`num_gpus = 1/k`, k side actors per
     GPU by memory) and T2V takes the rest with whole GPUs.
  5. No GPU at all (CPU runs, the tiny preset): the `*_stage` configs as given, with CPU
     requests scaled so that every pool can start at once.

`placement.mode=manual` takes every `*_stage` as given. The job then checks the plan
against the cluster (`await_resources`): what it has now, or what its autoscaler can grow
it to; it asks the autoscaler for the bundles and waits, logging which pool waits for what.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from vpo_ray.config import ConfigError, PlacementConfig, StageConfig

log = logging.getLogger("vpo.placement")

CUDA_CONTEXT_GIB = 0.6  # per process that touches a GPU (CUDA context + allocator slack)
DEFAULT_GPU_GIB = 79.0  # an "80 GB" H100 reports 79.2 GiB
SIDE_ROLES = ("optimizer", "judge", "video_judge")
AUTOSCALER_WAIT_S = 1800.0  # wait_for_resources_s=None with an autoscaler that can grow the cluster


@dataclass(frozen=True)
class PoolRequest:
    """What a job asks for: one actor pool of a model role."""
    name: str  # pool name in logs and records: rewrite, judge, t2v, video_judge, rewrite[sft], ...
    role: str  # optimizer | judge | t2v | video_judge
    stage: StageConfig  # the job's *_stage settings (batch size, CPUs; actors and GPUs in manual mode)
    gpu_gib: float = 0.0  # one actor's peak GPU memory (untiled VAE for T2V)
    gpu_gib_tiled: Optional[float] = None  # T2V with VAE tiling; None = no such option
    concurrency: int = 1  # calls one actor runs at once (T2V with "overlap": 2)


@dataclass(frozen=True)
class Pool:
    """What placement decides for one pool (`map_kwargs` turns it into map_batches arguments)."""
    name: str
    min_actors: int
    max_actors: int
    num_gpus: float
    num_cpus: float
    batch_size: int
    concurrency: int = 1
    accelerator_type: Optional[str] = None  # the stage's GPU type pin (StageConfig.accelerator_type)


@dataclass
class Plan:
    layout: str  # cpu | shared | dedicated | manual
    gpus: int  # GPUs planned for
    pools: dict[str, Pool]
    t2v_flags: tuple[str, ...] = ()  # T2V flags the plan adds ("vae-tiling" when memory needs it)
    notes: list[str] = field(default_factory=list)

    def need(self) -> dict[str, float]:
        """GPUs and CPUs every pool's minimum asks for at once."""
        return {"GPU": sum(p.num_gpus * p.min_actors for p in self.pools.values()),
                "CPU": sum(p.num_cpus * p.min_actors for p in self.pools.values())}

    def describe(self) -> str:
        pools = "; ".join(f"{p.name}: {p.min_actors}{'' if p.max_actors == p.min_actors else f'-{p.max_actors}'}"
                          f" x {p.num_gpus:.3g} GPU, {p.num_cpus:.3g} CPU" for p in self.pools.values())
        extra = f"; T2V flags +{','.join(self.t2v_flags)}" if self.t2v_flags else ""
        return f"placement {self.layout} on {self.gpus} GPU(s): {pools}{extra}"

    def to_dict(self) -> dict:
        return {"layout": self.layout, "gpus": self.gpus, "t2v_flags": list(self.t2v_flags), "notes": self.notes,
                "pools": {k: dataclasses.asdict(p) for k, p in self.pools.items()}}


# ---------------------------------------------------------------------------- the rule

def _as_given(r: PoolRequest, num_gpus: Optional[float] = None) -> Pool:
    s = r.stage
    return Pool(r.name, s.min_actors, s.max_actors, s.num_gpus if num_gpus is None else num_gpus, s.num_cpus,
                s.batch_size, r.concurrency, getattr(s, "accelerator_type", None))


def _sized(r: PoolRequest, actors: int, num_gpus: float) -> Pool:
    return Pool(r.name, actors, actors, round(num_gpus, 6), r.stage.num_cpus, r.stage.batch_size, r.concurrency,
                getattr(r.stage, "accelerator_type", None))


def plan_pools(requests: list[PoolRequest], cfg: PlacementConfig, gpus: int,
               gpu_memory_gib: float = DEFAULT_GPU_GIB) -> Plan:
    """The placement of `requests` on `gpus` GPUs of `gpu_memory_gib` each (pure: CPU-testable)."""
    if cfg.mode == "manual":
        return Plan("manual", gpus, {r.name: _as_given(r) for r in requests})
    if gpus <= 0:
        return Plan("cpu", 0, {r.name: _as_given(r, num_gpus=0.0) for r in requests},
                    notes=["no GPU: pools as configured in the *_stage settings"])
    plan = _gpu_plan(requests, cfg, gpus, cfg.memory_headroom * gpu_memory_gib)
    for r in requests:  # pools that hold no model (an HTTP judge) run on CPUs as configured
        plan.pools.setdefault(r.name, _as_given(r, num_gpus=0.0))
    plan.pools = {r.name: plan.pools[r.name] for r in requests}  # flow order, for logs and waiting
    return plan


def _gpu_plan(requests: list[PoolRequest], cfg: PlacementConfig, gpus: int, budget: float) -> Plan:
    t2v = [r for r in requests if r.role == "t2v"]
    side = [r for r in requests if r.role in SIDE_ROLES]
    per_pool = cfg.side_actors
    n_side = per_pool * len(side)
    if not t2v:
        return _text_only(side, cfg, gpus, budget)
    if len(t2v) > gpus:
        raise ConfigError(f"placement: {len(t2v)} text-to-video pools need a GPU each, there are {gpus}; "
                          "use placement.mode=manual with fractional t2v_stage.num_gpus, or fewer video models")
    per_t2v = gpus // len(t2v)  # several video models (eval t2v_models) split the GPUs
    side_gib = sum(r.gpu_gib + CUDA_CONTEXT_GIB for r in side) * per_pool
    for tiled in (False, True):
        if tiled and any(v.gpu_gib_tiled is None for v in t2v):
            break
        t2v_gib = max((v.gpu_gib_tiled if tiled else v.gpu_gib) for v in t2v) + CUDA_CONTEXT_GIB
        if not side or t2v_gib + side_gib <= budget:
            side_gpus = cfg.side_share / n_side if side else 0.0
            pools = {r.name: _sized(r, per_pool, side_gpus) for r in side}
            pools.update({r.name: _sized(r, per_t2v, 1.0 - cfg.side_share if side else 1.0) for r in t2v})
            notes = [f"worst GPU (its T2V actor + every LLM/VLM actor): {t2v_gib + side_gib:.1f} GiB "
                     f"of {budget:.1f} GiB usable"]
            return Plan("shared", gpus, pools, ("vae-tiling",) if tiled else (), notes)
    return _dedicated(t2v, side, per_pool, gpus, budget)


def _text_only(side: list, cfg: PlacementConfig, gpus: int, budget: float) -> Plan:
    """No video pool (sft, eval without videos): the LLM pools split the GPUs, whole ones where they can."""
    if gpus >= len(side):
        actors = gpus // len(side)
        return Plan("text", gpus, {r.name: _sized(r, actors, 1.0) for r in side},
                    notes=["no text-to-video pool: each LLM pool gets whole GPUs"])
    need = sum(r.gpu_gib + CUDA_CONTEXT_GIB for r in side)
    if need > budget * gpus:
        raise ConfigError(f"placement: the LLM pools need {need:.1f} GiB together, more than the {budget * gpus:.1f} "
                          "GiB usable on the GPUs (placement.gpu_memory_gib x memory_headroom)")
    return Plan("text", gpus, {r.name: _sized(r, 1, gpus / len(side)) for r in side},
                notes=[f"no text-to-video pool: {len(side)} LLM pools share {gpus} GPU(s)"])


def _dedicated(t2v: list, side: list, per_pool: int, gpus: int, budget: float) -> Plan:
    """Side pools on their own GPUs, packed k per GPU by memory; T2V on the rest, whole GPUs."""
    biggest = max(r.gpu_gib for r in side) + CUDA_CONTEXT_GIB
    per_gpu = int(budget // biggest)
    n_side = per_pool * len(side)
    if per_gpu < 1:
        raise ConfigError(f"placement: an LLM/VLM actor needs {biggest:.1f} GiB, more than the {budget:.1f} GiB "
                          "usable on one GPU (placement.gpu_memory_gib x memory_headroom)")
    side_gpus = math.ceil(n_side / per_gpu)
    if side_gpus >= gpus:
        raise ConfigError(f"placement: the LLM/VLM pools need {side_gpus} GPU(s) of their own ({n_side} actors, "
                          f"{per_gpu} per GPU by memory) and text-to-video at least one more, but there are {gpus}; "
                          "use fewer side actors (placement.side_actors), GPUs with more memory, or run the "
                          "stages phase by phase (separate jobs)")
    if gpus - side_gpus < len(t2v):
        raise ConfigError(f"placement: {gpus - side_gpus} GPU(s) left for {len(t2v)} text-to-video pools")
    pools = {r.name: _sized(r, per_pool, 1.0 / per_gpu) for r in side}
    pools.update({r.name: _sized(r, (gpus - side_gpus) // len(t2v), 1.0) for r in t2v})
    return Plan("dedicated", gpus, pools, notes=[
        f"a T2V actor and every LLM/VLM actor do not fit one GPU's {budget:.1f} GiB: {side_gpus} GPU(s) hold the "
        f"LLM/VLM actors ({per_gpu} per GPU), {gpus - side_gpus} render"])


def fit_cpus(plan: Plan, cpus: float) -> Plan:
    """Scale every pool's CPU request so all minimums fit `cpus` at once (GPU requests are not scaled).

    Ray Data pipelines only when every actor pool's minimum can be placed together; a pool
    that cannot start waits forever for CPUs the others hold.
    """
    need = plan.need()["CPU"]
    if need <= cpus or need == 0:
        return plan
    scale = cpus / need * 0.9  # leave room for the task-pool stages and the driver's reads
    plan.notes.append(f"CPU requests scaled by {scale:.2f}: the pools ask for {need:.1f} CPUs, the cluster has {cpus:.1f}")
    log.warning("stage actor pools ask for %.1f CPUs at once, the cluster has %.1f: scaling CPU requests by %.2f "
                "so that all stages run together", need, cpus, scale)
    plan.pools = {k: dataclasses.replace(p, num_cpus=p.num_cpus * scale) for k, p in plan.pools.items()}
    return plan


def map_kwargs(pool: Pool) -> dict:
    """`ds.map_batches(Cls, **map_kwargs(pool))` arguments: the actor pool, its resources and batch size.

    max_tasks_in_flight_per_actor = the calls an actor runs at once: Ray Data's default (2 x
    max_concurrency) queues extra batches on whichever actors are ready first, so with few
    long rows (videos) some actors hold a queue while others (still loading) get none.
    """
    from ray.data import ActorPoolStrategy

    extra: dict[str, Any] = {}
    if pool.concurrency > 1:
        extra = dict(max_concurrent_calls_per_actor=pool.concurrency, enable_true_multi_threading=True)
    compute = ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors,
                                max_tasks_in_flight_per_actor=pool.concurrency, **extra)
    pinned = {"accelerator_type": pool.accelerator_type} if pool.accelerator_type else {}
    return dict(compute=compute, num_gpus=pool.num_gpus or None, num_cpus=pool.num_cpus, batch_size=pool.batch_size,
                **pinned)


def start_together(ds, timeout_s: float):
    """Every actor pool of `ds` waits (up to `timeout_s`) for all its actors before it takes a row.

    Ray Data's `wait_for_min_actors_s`: without it the actors that finish loading first take
    the queued rows and slow starters (model load, compile) get few or none, so a short,
    finite run (a benchmark) measures fewer GPUs than it holds. Pools then start one after
    another (Ray Data starts operators in order), so the long-running jobs leave it off.
    """
    ds.context.wait_for_min_actors_s = int(math.ceil(timeout_s))
    return ds


# ---------------------------------------------------------------------------- the cluster

@dataclass(frozen=True)
class ClusterView:
    """What the cluster has now and what its autoscaler can grow it to (None: no autoscaler config)."""
    now: dict  # ray.cluster_resources()
    max: Optional[dict] = None  # ray._private.state.state.get_max_resources_from_cluster_config()
    gpu_memory_gib: Optional[float] = None  # of a GPU on the driver's node, if it has one

    def gpus(self) -> int:
        have = int(self.now.get("GPU", 0))
        return have if have or not self.max else int(self.max.get("GPU", 0))


def cluster_view() -> ClusterView:
    """The running cluster, as Ray Data's own autoscaling code reads it (Ray 2.60)."""
    import ray

    grow = None
    try:  # published by the autoscaler (KubeRay, cluster launcher); absent on a fixed local instance
        grow = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception as e:  # noqa: BLE001 - an unreadable config is the same as none
        log.debug("no autoscaler config: %s", e)
    memory = None
    try:
        import torch

        if torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:  # noqa: BLE001 - no local GPU: the config or the default says
        memory = None
    return ClusterView(now=dict(ray.cluster_resources()), max=grow or None, gpu_memory_gib=memory)


def _fits(need: dict, have: Optional[dict]) -> bool:
    return have is not None and all(v <= have.get(k, 0.0) + 1e-9 for k, v in need.items() if v > 0)


def _waiting_pools(plan: Plan, have: dict) -> list[str]:
    """Pools whose minimum does not fit what is left after the pools before them (in job order)."""
    left = {"GPU": have.get("GPU", 0.0), "CPU": have.get("CPU", 0.0)}
    out = []
    for p in plan.pools.values():
        need = {"GPU": p.num_gpus * p.min_actors, "CPU": p.num_cpus * p.min_actors}
        if _fits(need, left):
            left = {k: left[k] - need[k] for k in left}
        else:
            out.append(f"{p.name} ({p.min_actors} x {p.num_gpus:.3g} GPU, {p.num_cpus:.3g} CPU)")
    return out


def await_resources(plan: Plan, cfg: PlacementConfig, view: Callable[[], ClusterView] = cluster_view,
                    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> float:
    """Return once the cluster can hold every pool's minimum at once; the seconds waited.

    Fits now: go. Cannot fit even at the autoscaler's maximum, or no autoscaler and no
    wait configured: ConfigError naming the pools. Otherwise ask the autoscaler for the
    bundles (ray.autoscaler.sdk.request_resources) and wait up to the timeout, logging every
    `wait_log_every_s` which pools wait and for what.
    """
    need = plan.need()
    first = view()
    if _fits(need, first.now):
        return 0.0
    timeout = cfg.wait_for_resources_s
    if timeout is None:
        timeout = AUTOSCALER_WAIT_S if first.max is not None else 0.0
    short = ", ".join(_waiting_pools(plan, first.now)) or "all pools together"
    if first.max is not None and not _fits(need, first.max):
        raise ConfigError(f"the stages' actor pools need {_fmt(need)} at once but the cluster can grow to only "
                          f"{_fmt(first.max)} (autoscaler config); waiting: {short}. Lower placement.gpus, "
                          "the *_stage sizes, or raise the node groups' maxReplicas")
    if timeout <= 0:
        raise ConfigError(f"the stages' actor pools need {_fmt(need)} at once but the cluster has {_fmt(first.now)}"
                          f"; cannot start: {short}. Lower <stage>_stage.num_gpus (fractions share a GPU) or "
                          "min_actors, or set placement.wait_for_resources_s to wait for nodes to join")
    _request_bundles(plan)
    t0 = last_log = clock()
    while True:
        now = view()
        if _fits(need, now.now):
            log.info("placement: the cluster now holds every pool (waited %.0f s)", clock() - t0)
            return clock() - t0
        waited = clock() - t0
        if waited >= timeout:
            raise ConfigError(f"gave up after {waited:.0f} s (placement.wait_for_resources_s): the cluster has "
                              f"{_fmt(now.now)}; still waiting: {', '.join(_waiting_pools(plan, now.now))}")
        if clock() - last_log >= cfg.wait_log_every_s or waited == 0:
            log.warning("placement: waiting for resources: %s; the cluster has %s now%s; %.0f s of %.0f s",
                        ", ".join(_waiting_pools(plan, now.now)), _fmt(now.now),
                        f", can grow to {_fmt(now.max)}" if now.max else "", waited, timeout)
            last_log = clock()
        sleep(min(5.0, cfg.wait_log_every_s))


def _request_bundles(plan: Plan) -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        bundles = [{k: v for k, v in (("GPU", p.num_gpus), ("CPU", p.num_cpus)) if v > 0}
                   for p in plan.pools.values() for _ in range(p.min_actors)]
        request_resources(bundles=[b for b in bundles if b])
    except Exception as e:  # noqa: BLE001 - without an autoscaler the request is only a hint
        log.info("placement: could not ask the autoscaler for resources (%s); waiting anyway", e)


def _fmt(res: Optional[dict]) -> str:
    res = res or {}
    return f"{res.get('GPU', 0):g} GPU, {res.get('CPU', 0):g} CPU"


# ---------------------------------------------------------------------------- jobs

def model_gib(model: Any) -> tuple[float, Optional[float]]:
    """(peak GiB of one actor, with VAE tiling or None) for a model reference, from the registry's figures.

    Registry names, hub ids of registry entries and weights=random references use the
    spec's `gpu_gib` / `gpu_gib_tiled`; a local checkpoint folder counts its safetensors +
    4 GiB; anything else counts 0 (noted in the plan by the caller).
    """
    import os

    from vpo_ray.models import random_weights, registry

    rm = random_weights.as_random(model)
    name = rm.name if rm else str(model)
    spec = registry.MODELS.get(name) or next((s for s in registry.MODELS.values() if s.model_id == name), None)
    if spec is not None:
        return float(spec.option("gpu_gib", 0.0)), spec.option("gpu_gib_tiled")
    if os.path.isdir(name):
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(name)
                   for f in files if f.endswith(".safetensors"))
        return size / 2**30 + (4.0 if size else 0.0), None
    return 0.0, None


def job_plan(requests: list[PoolRequest], cfg: PlacementConfig, view: Callable[[], ClusterView] = cluster_view,
             wait: bool = True) -> Plan:
    """The job's plan on the running cluster: sized for its GPUs (or cfg.gpus), CPU requests fitted, waited for."""
    seen = view()
    gpus = cfg.gpus if cfg.gpus is not None else seen.gpus()
    memory = cfg.gpu_memory_gib or seen.gpu_memory_gib or DEFAULT_GPU_GIB
    plan = plan_pools(requests, cfg, gpus, memory)
    cpus = max(seen.now.get("CPU", 0.0), (seen.max or {}).get("CPU", 0.0))
    plan = fit_cpus(plan, cpus) if cpus else plan
    log.info("%s", plan.describe())
    for note in plan.notes:
        log.info("placement: %s", note)
    if wait:
        waited = await_resources(plan, cfg, view)
        if waited:
            plan.notes.append(f"waited {waited:.0f} s for the cluster to hold every pool")
    return plan
