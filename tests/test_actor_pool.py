"""Every actor of a pool gets rows (the "all GPUs busy" fix, docs/PLACEMENT.md), checked with dummy work.

Four actors that finish starting 0-3 s apart take rows that each sleep a little: with the
pool settings of placement.map_kwargs and placement.start_together every actor gets rows,
and a single many-row block is spread over all of them once cut into one-row blocks (the
pipeline does this before rendering). What is asserted is who got rows, never how fast.
"""
from __future__ import annotations

import pytest

from vpo_ray.bench.pool_probe import StaggeredWorker
from vpo_ray.pipeline import placement


def rows_by_actor(ds, counter: str) -> dict[int, int]:
    pool = placement.Pool("probe", 4, 4, 0.0, 0.5, batch_size=1, concurrency=1)
    out = ds.map_batches(StaggeredWorker, fn_constructor_kwargs=dict(counter=counter), **placement.map_kwargs(pool))
    placement.start_together(out, timeout_s=300)
    counts: dict[int, int] = {}
    for row in out.iter_rows():
        counts[int(row["actor"])] = counts.get(int(row["actor"]), 0) + 1
    return counts


@pytest.mark.timeout(600)
def test_every_actor_of_a_staggered_pool_gets_rows(ray_session, tmp_path):
    ds = ray_session.data.from_items([{"id": i} for i in range(8)], override_num_blocks=8)
    counts = rows_by_actor(ds, str(tmp_path / "started"))
    assert sum(counts.values()) == 8
    assert len(counts) == 4, f"rows by actor: {sorted(counts.values())}"


@pytest.mark.timeout(600)
def test_one_big_block_is_spread_over_the_pool_once_cut_into_rows(ray_session, tmp_path):
    ds = ray_session.data.from_items([{"id": i} for i in range(8)], override_num_blocks=1)
    counts = rows_by_actor(ds.repartition(target_num_rows_per_block=1), str(tmp_path / "started"))
    assert sum(counts.values()) == 8
    assert len(counts) == 4, f"rows by actor: {sorted(counts.values())}"
