"""The VPO_FAULTS hook (vpo_ray/faults.py) and the stage guard (vpo_ray/pipeline/guard.py), without Ray.

The guard's promises: a row that fails alone is that row's RowFailure and every other row
gets the output it gets undisturbed; an out-of-memory that comes from the batch's size is
absorbed by splitting; a hung call ends the process, strikes its rows, and a row struck
twice is an error instead of a third hang.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from vpo_ray import faults
from vpo_ray.config import ConfigError
from vpo_ray.pipeline.guard import WATCHDOG_EXIT_CODE, RowFailed, RowFailure, StageGuard


@pytest.fixture
def fault_env(monkeypatch, tmp_path):
    """set(spec): VPO_FAULTS=spec with a fresh VPO_FAULTS_DIR; returns that dir."""
    folder = tmp_path / "fired"

    def put(spec: str) -> str:
        monkeypatch.setenv("VPO_FAULTS", spec)
        monkeypatch.setenv("VPO_FAULTS_DIR", str(folder))
        return str(folder)

    monkeypatch.delenv("VPO_FAULTS", raising=False)
    monkeypatch.delenv("VPO_FAULTS_DIR", raising=False)
    return put


# ---------------------------------------------------------------------------- grammar

@pytest.mark.parametrize("spec, names", [
    ("render", "expected point:action"),
    ("paint:oom", "unknown point 'paint'"),
    ("render:explode", "unknown action 'explode'"),
    ("render:oom,row", "expected key=value"),
    ("render:oom,colour=red", "unknown key 'colour'"),
    ("render:oom,row=a,row=b", "row= given twice"),
    ("render:oom,step=3", "step= and rank= apply to train_step only"),
    ("train_step:exit,rank=first", "rank= expects a number"),
    ("train_step:exit,step=-1", "step= must be >= 0"),
    ("render:oom,seconds=5", "seconds= applies to hang only"),
    ("render:hang,seconds=soon", "seconds= expects a number"),
])
def test_a_bad_spec_is_refused_naming_it(spec, names, monkeypatch):
    monkeypatch.setenv("VPO_FAULTS_DIR", "/tmp/unused")
    with pytest.raises(ConfigError) as err:
        faults.parse(f"critique:raise;{spec}")
    assert names in str(err.value) and repr(spec) in str(err.value)


def test_times_needs_a_shared_directory(monkeypatch):
    monkeypatch.delenv("VPO_FAULTS_DIR", raising=False)
    with pytest.raises(ConfigError, match="times= needs VPO_FAULTS_DIR"):
        faults.parse("render:oom,times=1")


def test_unset_means_nothing_fires_and_nothing_is_forwarded(fault_env):
    faults.fire("render", rows=["q1"])
    assert faults.env_vars() == {}
    from vpo_ray.train.callbacks import fault_drill

    assert fault_drill(0, 2) is None  # no train_step drill: training carries no extra callback


def test_env_vars_forward_both_variables_and_check_the_spec(fault_env, monkeypatch):
    folder = fault_env("render:oom,row=q1")
    assert faults.env_vars() == {"VPO_FAULTS": "render:oom,row=q1", "VPO_FAULTS_DIR": folder}
    monkeypatch.setenv("VPO_FAULTS", "render:melt")
    with pytest.raises(ConfigError, match="melt"):
        faults.env_vars()


# ---------------------------------------------------------------------------- firing

def test_filters_pick_the_row_and_the_point(fault_env):
    folder = fault_env("render:oom,row=q2; critique:raise")
    faults.fire("render", rows=["q1", "q3"])  # other rows: nothing
    faults.fire("rewrite", rows=["q2"])  # other point: nothing
    with pytest.raises(torch.OutOfMemoryError, match="injected by VPO_FAULTS"):
        faults.fire("render", rows=["q1", "q2"])
    with pytest.raises(RuntimeError, match="injected fault at critique"):
        faults.fire("critique", rows=["q9"])
    assert [(r["point"], r["action"], r["rows"]) for r in faults.fired(folder)] == [
        ("render", "oom", ["q1", "q2"]), ("critique", "raise", ["q9"])]


def test_train_step_filters_on_step_and_last_rank(fault_env):
    fault_env("train_step:raise,step=3,rank=last")
    for step, rank in ((3, 0), (2, 1), (4, 1)):
        faults.fire("train_step", step=step, rank=rank, world=2)
    with pytest.raises(RuntimeError):
        faults.fire("train_step", step=3, rank=1, world=2)


def test_due_says_what_fire_would_match_without_firing(fault_env):
    assert not faults.due("train_step", step=3, rank=1, world=2)  # unset
    folder = fault_env("train_step:exit,step=3,rank=last,times=1")
    assert faults.due("train_step", step=3, rank=1, world=2)
    assert not faults.due("train_step", step=3, rank=0, world=2) and not faults.due("render", rows=["q"])
    assert faults.fired(folder) == []  # asking claims no slot


def test_times_counts_firings_over_processes(fault_env, tmp_path):
    """`exit` with times=2: the first two processes die, the third runs through."""
    folder = fault_env("rewrite:exit,times=2")
    code = "from vpo_ray import faults; faults.fire('rewrite', rows=['q']); print('survived')"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True) for _ in range(3)]
    assert [r.returncode for r in runs] == [1, 1, 0]
    assert "survived" in runs[2].stdout and "survived" not in runs[0].stdout
    assert len({r["pid"] for r in faults.fired(folder)}) == 2


def test_hang_with_seconds_returns(fault_env):
    fault_env("video_judge:hang,seconds=0.2")
    faults.fire("video_judge", rows=["q"])  # returns: the hang was bounded


# ---------------------------------------------------------------------------- the guard

def square(xs: list) -> list:
    return [x * x for x in xs]


def test_a_row_that_runs_out_of_memory_is_its_own_failure(fault_env):
    fault_env("rewrite:oom,row=q3")
    calls: list[list] = []

    def fn(xs):
        calls.append(list(xs))
        return square(xs)

    rows = [f"q{i}" for i in range(8)]
    got = StageGuard("rewrite").run(fn, list(range(8)), rows)
    assert got[3] == RowFailure("out of GPU memory", got[3].detail)
    assert [g for i, g in enumerate(got) if i != 3] == [i * i for i in range(8) if i != 3]
    assert [2] in calls and not any(3 in c for c in calls)  # narrowed down to the row itself


def test_a_batch_too_big_for_memory_is_split_and_nothing_fails():
    def fn(xs):
        if len(xs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return square(xs)

    got = StageGuard("rewrite").run(fn, list(range(7)), [f"q{i}" for i in range(7)])
    assert got == square(list(range(7)))


def test_a_single_row_gets_one_retry_after_out_of_memory(fault_env):
    fault_env("render:oom,times=1")
    assert StageGuard("render").call_one(lambda: "video", row="q1") == "video"
    fault_env("render:oom")  # every call: the retry fails too
    with pytest.raises(RowFailed) as err:
        StageGuard("render").call_one(lambda: "video", row="q1")
    assert err.value.failure.reason == "out of GPU memory"


def test_other_exceptions_fail_their_row_with_a_one_field_reason():
    def fn(xs):
        if "bad" in xs:
            raise ValueError("cannot decode: frame 3 of 9")
        return [x.upper() for x in xs]

    got = StageGuard("video_judge").run(fn, ["a", "bad", "c"], ["q1", "q2", "q3"])
    assert got[0] == "A" and got[2] == "C"
    assert got[1].reason == "ValueError (cannot decode; frame 3 of 9)" and ":" not in got[1].reason
    assert "frame 3 of 9" in got[1].detail


WATCHDOG_RUN = textwrap.dedent("""
    import json, sys, time
    from vpo_ray.pipeline.guard import StageGuard
    calls = []
    def fn(xs):
        calls.append(list(xs))
        if "slow" in xs:
            time.sleep(60)
        return [x.upper() for x in xs]
    out = StageGuard("render", watchdog_s=1.0, strikes_dir=sys.argv[1]).run(fn, ["a", "slow", "b"], ["q1", "q2", "q3"])
    print(json.dumps({"calls": calls, "out": [getattr(o, "reason", o) for o in out]}))
""")


def test_a_hung_call_ends_the_process_and_a_row_that_always_hangs_becomes_an_error(tmp_path):
    """Attempt 1: the batch hangs -> exit 75, all three rows struck once. Attempt 2 (Ray's retry):
    struck rows run alone; 'slow' hangs again -> exit 75, struck twice. Attempt 3: 'slow' is an
    error without being called, the others come out."""
    strikes = str(tmp_path / "watchdog")
    runs = [subprocess.run([sys.executable, "-c", WATCHDOG_RUN, strikes], capture_output=True, text=True, timeout=120)
            for _ in range(3)]
    assert [r.returncode for r in runs] == [WATCHDOG_EXIT_CODE, WATCHDOG_EXIT_CODE, 0], runs[2].stderr[-2000:]
    assert "ran past 1 s" in runs[0].stderr
    last = json.loads(runs[2].stdout.strip().splitlines()[-1])
    assert last["out"] == ["A", "hung 2 times past the 1 s watchdog", "B"]
    assert ["slow"] not in last["calls"] and sorted(last["calls"]) == [["a"], ["b"]]
