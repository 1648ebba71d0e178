"""The placement rule (vpo_ray/pipeline/placement.py, docs/PLACEMENT.md) as tables, and the start-up wait."""
from __future__ import annotations

import dataclasses
import itertools
import logging

import pytest

from vpo_ray.config import ConfigError, PlacementConfig, StageConfig
from vpo_ray.pipeline import placement
from vpo_ray.pipeline.placement import ClusterView, PoolRequest, await_resources, fit_cpus, plan_pools

H100, H200 = 79.0, 139.0


def paper(shared_llm: bool = True, kind: str = "dpo") -> list[PoolRequest]:
    """The paper preset's pools with the registry's memory figures (Llama-3-8B, CogVideoX-2B, Qwen2-VL-7B)."""
    llm = placement.model_gib("llama3-8b-instruct")[0]
    t2v, t2v_tiled = placement.model_gib("cogvideox-2b")
    vlm = placement.model_gib("qwen2-vl-7b-instruct")[0]
    out = ([PoolRequest("llm", "optimizer", StageConfig(), llm)] if shared_llm else
           [PoolRequest("rewrite", "optimizer", StageConfig(), llm), PoolRequest("judge", "judge", StageConfig(), llm)])
    if kind == "dpo":
        out += [PoolRequest("t2v", "t2v", StageConfig(batch_size=1), t2v, t2v_tiled, concurrency=2),
                PoolRequest("video_judge", "video_judge", StageConfig(batch_size=4), vlm)]
    return out


def table(plan) -> dict:
    return {name: (p.min_actors, round(p.num_gpus, 4)) for name, p in plan.pools.items()}


def best_fit(plan, gpus: int, order: list[str]) -> list[list[tuple[str, float]]]:
    """Place the plan's actors the way Ray's raylet does for fractional GPUs (best-fit instance; whole GPUs
    for a request of 1, src/ray/common/scheduling/resource_instance_set.cc), pools created in `order`."""
    free = [1.0] * gpus
    held: list[list[tuple[str, float]]] = [[] for _ in range(gpus)]
    for name in order:
        pool = plan.pools[name]
        for _ in range(pool.min_actors):
            need = pool.num_gpus
            fits = [i for i in range(gpus) if free[i] >= need - 1e-9]
            assert fits, f"{name}: no GPU left for an actor of {need} GPU (free {free})"
            i = min(fits, key=lambda k: free[k] - need)
            free[i] -= need
            held[i].append((name, need))
    return held


@pytest.mark.parametrize("gpus, memory, shared, expected, tiling", [
    # 4 x H100, rewrite and judge one model (the paper preset): every GPU renders, GPU 0 also hosts the LLM + VLM
    (4, H100, True, {"llm": (1, 0.125), "t2v": (4, 0.75), "video_judge": (1, 0.125)}, ()),
    (1, H100, True, {"llm": (1, 0.125), "t2v": (1, 0.75), "video_judge": (1, 0.125)}, ()),
    (8, H100, True, {"llm": (1, 0.125), "t2v": (8, 0.75), "video_judge": (1, 0.125)}, ()),
    # separate rewrite and judge copies fit beside a T2V actor on an H200 ...
    (4, H200, False, {"rewrite": (1, 0.0833), "judge": (1, 0.0833), "t2v": (4, 0.75), "video_judge": (1, 0.0833)}, ()),
])
def test_shared_layout(gpus, memory, shared, expected, tiling):
    plan = plan_pools(paper(shared), PlacementConfig(), gpus, memory)
    assert plan.layout == "shared"
    assert table(plan) == expected
    assert plan.t2v_flags == tiling
    for order in itertools.permutations(plan.pools):  # whatever order Ray creates the actors in
        held = best_fit(plan, gpus, list(order))
        assert [sum(1 for n, _ in g if n == "t2v") for g in held] == [1] * gpus, "one video actor on every GPU"


def test_dedicated_layout_when_a_gpu_cannot_hold_a_video_actor_and_every_llm():
    # ... but not on an H100: 28.6 + 3 x ~19 GiB > 71 GiB usable even with a tiled VAE (17.1 GiB)
    plan = plan_pools(paper(shared_llm=False), PlacementConfig(), 4, H100)
    assert plan.layout == "dedicated"
    assert table(plan) == {"rewrite": (1, 0.3333), "judge": (1, 0.3333), "t2v": (3, 1.0), "video_judge": (1, 0.3333)}
    for order in itertools.permutations(plan.pools):
        held = best_fit(plan, 4, list(order))
        assert sorted(sum(1 for n, _ in g if n == "t2v") for g in held) == [0, 1, 1, 1]


def test_tiled_vae_when_only_that_fits():
    plan = plan_pools(paper(shared_llm=False), PlacementConfig(), 4, 90.0)  # 81 GiB usable: 86 untiled, 75 tiled
    assert plan.layout == "shared" and plan.t2v_flags == ("vae-tiling",)


def test_too_little_memory_is_an_error_naming_the_way_out():
    with pytest.raises(ConfigError, match="side_actors|phase by phase"):
        plan_pools(paper(shared_llm=False), PlacementConfig(), 1, H100)
    with pytest.raises(ConfigError, match="more than the .* usable"):
        plan_pools(paper(), PlacementConfig(), 4, 16.0)


def test_text_only_jobs_split_the_gpus_between_llm_pools():
    assert table(plan_pools(paper(False, kind="sft"), PlacementConfig(), 4, H100)) == {
        "rewrite": (2, 1.0), "judge": (2, 1.0)}
    assert table(plan_pools(paper(False, kind="sft"), PlacementConfig(), 1, H100)) == {
        "rewrite": (1, 0.5), "judge": (1, 0.5)}


def test_no_gpu_or_manual_mode_takes_the_stage_configs_as_given():
    reqs = [PoolRequest("rewrite", "optimizer", StageConfig(min_actors=2, max_actors=3, num_gpus=0.5, batch_size=4)),
            PoolRequest("judge", "http", StageConfig(num_cpus=2.0))]
    cpu = plan_pools(reqs, PlacementConfig(), 0)
    assert cpu.layout == "cpu" and table(cpu) == {"rewrite": (2, 0.0), "judge": (1, 0.0)}
    manual = plan_pools(reqs, PlacementConfig(mode="manual"), 4)
    assert manual.pools["rewrite"].max_actors == 3 and manual.pools["rewrite"].num_gpus == 0.5
    # a pool that holds no model (an HTTP judge) stays on CPUs in every layout
    assert plan_pools(paper() + reqs[1:], PlacementConfig(), 4, H100).pools["judge"].num_gpus == 0.0


def test_several_video_models_split_the_gpus_and_pins_are_kept():
    t2v, tiled = placement.model_gib("cogvideox-2b")
    reqs = paper()[:1] + [PoolRequest(f"t2v[{n}]", "t2v", StageConfig(batch_size=1, accelerator_type="H100"), t2v,
                                      tiled) for n in ("preset", "dpo1")]
    plan = plan_pools(reqs, PlacementConfig(), 4, H100)
    assert table(plan) == {"llm": (1, 0.25), "t2v[preset]": (2, 0.75), "t2v[dpo1]": (2, 0.75)}
    assert placement.map_kwargs(plan.pools["t2v[dpo1]"])["accelerator_type"] == "H100"
    assert "accelerator_type" not in placement.map_kwargs(plan.pools["llm"])
    with pytest.raises(ConfigError, match="3 text-to-video pools need a GPU each, there are 2"):
        plan_pools(reqs + [dataclasses.replace(reqs[1], name="t2v[dpo2]")], PlacementConfig(), 2, H100)


def test_cpu_requests_scale_down_to_fit():
    reqs = [PoolRequest(k, "optimizer", StageConfig(num_cpus=1.0)) for k in ("rewrite", "judge", "t2v", "video")]
    plan = fit_cpus(plan_pools(reqs, PlacementConfig(), 0), 2.0)
    assert plan.need()["CPU"] <= 2.0
    assert fit_cpus(plan_pools(reqs, PlacementConfig(), 0), 8.0).need()["CPU"] == 4.0


def test_model_memory_comes_from_the_registry():
    from vpo_ray.models.random_weights import RandomModel

    assert placement.model_gib("cogvideox-2b") == (28.0, 16.5)
    assert placement.model_gib(RandomModel("llama3-8b-instruct")) == (19.0, None)
    assert placement.model_gib("meta-llama/Meta-Llama-3-8B-Instruct") == (19.0, None)  # a hub id of an entry
    assert placement.model_gib("tiny-judge") == (0.0, None)


# ---------------------------------------------------------------------------- waiting for the cluster

def views(*resources, grow=None):
    """A cluster that has each of `resources` in turn (the last one from then on)."""
    seq = list(resources)

    def view():
        return ClusterView(now=seq.pop(0) if len(seq) > 1 else seq[0], max=grow)
    return view


def fake_clock():
    t = [0.0]
    return (lambda: t[0]), (lambda s: t.__setitem__(0, t[0] + s))


def gpu_plan():
    return plan_pools(paper(), PlacementConfig(), 4, H100)


def test_a_cluster_that_fits_starts_at_once():
    assert await_resources(gpu_plan(), PlacementConfig(), views({"GPU": 4.0, "CPU": 16.0})) == 0.0


def test_a_fixed_cluster_too_small_fails_at_once_naming_the_pool():
    with pytest.raises(ConfigError, match=r"cannot start: .*t2v \(4 x 0.75 GPU"):
        await_resources(gpu_plan(), PlacementConfig(), views({"GPU": 2.0, "CPU": 16.0}))


def test_an_autoscaler_that_cannot_grow_enough_fails_at_once():
    with pytest.raises(ConfigError, match="can grow to only 2 GPU"):
        await_resources(gpu_plan(), PlacementConfig(), views({"CPU": 1.0}, grow={"GPU": 2.0, "CPU": 64.0}))


def test_an_autoscaling_cluster_is_waited_for_with_a_log_line_naming_the_pool(caplog, monkeypatch):
    monkeypatch.setattr(placement, "_request_bundles", lambda plan: None)
    clock, sleep = fake_clock()
    view = views(*[{"CPU": 0.0}] * 8, {"GPU": 2.0, "CPU": 16.0}, {"GPU": 4.0, "CPU": 16.0},
                 grow={"GPU": 8.0, "CPU": 64.0})
    with caplog.at_level(logging.WARNING, logger="vpo.placement"):
        waited = await_resources(gpu_plan(), PlacementConfig(wait_log_every_s=10.0), view, sleep=sleep, clock=clock)
    assert waited > 0
    lines = [r.getMessage() for r in caplog.records if "waiting for resources" in r.getMessage()]
    assert lines and "t2v (4 x 0.75 GPU" in lines[0] and "can grow to 8 GPU" in lines[0]
    assert len(lines) < 8, "one line per wait_log_every_s, not per poll"


def test_waiting_stops_at_the_timeout_naming_what_is_missing(monkeypatch):
    monkeypatch.setattr(placement, "_request_bundles", lambda plan: None)
    clock, sleep = fake_clock()
    with pytest.raises(ConfigError, match=r"gave up after .* still waiting: .*t2v"):
        await_resources(gpu_plan(), PlacementConfig(wait_for_resources_s=60.0), views({"GPU": 3.0, "CPU": 16.0}),
                        sleep=sleep, clock=clock)
