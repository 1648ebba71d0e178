"""What each actor of each pool did and when: the event log of `vpo bench pipeline`.

`instrument(log_name)` is a `flow.Wrap`: it subclasses a stage class so that every actor
reports when it finished loading and, per call, when it started and ended, how many rows
came in and out, how many videos it rendered or judged, and (LLM pools) how many tokens
its engine generated. Reports go to one named Ray actor (`EventLog`) without waiting for
it, so the stage's own work is not held up. `pool_stats` turns the log into per-pool
figures over a window (rows/s, tokens/s, busy share, time spent waiting for input).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

LOG_NAME = "vpo_bench_events"


def event_log_class():
    import ray

    @ray.remote(num_cpus=0)
    class EventLog:
        def __init__(self):
            self.events: list[dict] = []

        def add(self, event: dict) -> None:
            self.events.append(event)

        def all(self) -> list[dict]:
            return self.events

    return EventLog


def start_log() -> tuple[Any, str]:
    """(handle, name) of a new named event log actor; `instrument(name)` reports to it."""
    import uuid

    name = f"{LOG_NAME}_{uuid.uuid4().hex[:8]}"  # one log per run, even in a shared Ray session
    return event_log_class().options(name=name, lifetime="non_detached").remote(), name


class _Reporter:
    def __init__(self, pool: str, log_name: str):
        import ray

        self.log = ray.get_actor(log_name)
        ctx = ray.get_runtime_context()
        self.base = {"pool": pool, "actor": f"{os.getpid()}@{ctx.get_node_id()[:8]}",
                     "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
        self.tokens = 0
        self.lock = threading.Lock()

    def send(self, **event: Any) -> None:
        self.log.add.remote(dict(self.base, **event))

    def add_tokens(self, n: int) -> None:
        with self.lock:
            self.tokens += n

    def take_tokens(self) -> int:
        with self.lock:
            n, self.tokens = self.tokens, 0
            return n


def _engines(stage: Any) -> list:
    """The LLM engines a stage object holds (Rewriter.backend.engine, Critic.backend.engine, RewriteAndJudge's two)."""
    found = []
    for obj in (stage, getattr(stage, "rewriter", None), getattr(stage, "critic", None)):
        for holder in (obj, getattr(obj, "backend", None)):
            engine = getattr(holder, "engine", None)
            if engine is not None and hasattr(engine, "generate") and all(engine is not e for e in found):
                found.append(engine)
    return found


def _count_tokens(engine: Any, reporter: _Reporter) -> None:
    generate = engine.generate

    def counted(*args, **kwargs):
        out = generate(*args, **kwargs)
        reporter.add_tokens(sum(int(getattr(c, "n_tokens", 0)) for c in out))
        return out

    engine.generate = counted


def _outcome(batch: dict, out: dict) -> dict:
    def n(key: str, ok) -> Optional[int]:
        return sum(1 for v in out[key] if ok(v)) if key in out else None

    rows_in = len(next(iter(batch.values()))) if batch else 0
    rows_out = len(next(iter(out.values()))) if out else 0
    return {"rows_in": rows_in, "rows_out": rows_out, "videos": n("video_uri", bool),
            "judged": n("checklist_json", lambda v: v not in ("", "[]"))}


def instrument(log_name: str):
    """A `flow.Wrap` that times every actor of every pool into the event log `log_name`."""
    def wrap(cls: type, pool: str) -> type:
        class Timed(cls):
            def __init__(self, *args, **kwargs):
                t0 = time.time()
                super().__init__(*args, **kwargs)
                self._vpo_reporter = _Reporter(pool, log_name)
                for engine in _engines(self):
                    _count_tokens(engine, self._vpo_reporter)
                self._vpo_reporter.send(kind="ready", t0=t0, t1=time.time())

            def __call__(self, batch: dict) -> dict:
                t0 = time.time()
                out = super().__call__(batch)
                rep = self._vpo_reporter
                rep.send(kind="call", t0=t0, t1=time.time(), tokens=rep.take_tokens(), **_outcome(batch, out))
                return out

        Timed.__name__ = Timed.__qualname__ = cls.__name__  # Ray Data names the operator after the class
        return Timed

    return wrap


# ---------------------------------------------------------------------------- figures from the log

def _union(intervals: list[tuple[float, float]], w0: float, w1: float) -> float:
    """Seconds of [w0, w1] covered by the intervals (overlapping calls of one actor count once)."""
    clipped = sorted((max(a, w0), min(b, w1)) for a, b in intervals if b > w0 and a < w1)
    total, end = 0.0, w0
    for a, b in clipped:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def pool_stats(events: list[dict], w0: float, w1: float) -> dict:
    """Per pool, over the window [w0, w1]: actors, rows/s, tokens/s, busy share, seconds waiting for input."""
    span = max(w1 - w0, 1e-9)
    out: dict[str, dict] = {}
    for pool in sorted({e["pool"] for e in events}):
        mine = [e for e in events if e["pool"] == pool]
        calls = [e for e in mine if e["kind"] == "call"]
        actors = sorted({e["actor"] for e in mine})
        inside = [c for c in calls if w0 < c["t1"] <= w1]
        busy = {a: _union([(c["t0"], c["t1"]) for c in calls if c["actor"] == a], w0, w1) for a in actors}
        ready = [e for e in mine if e["kind"] == "ready"]
        out[pool] = {
            "actors": len(actors),
            "gpu_ids": sorted({g for e in ready for g in e.get("gpu_ids", [])}),
            "load_s": round(max((e["t1"] - e["t0"] for e in ready), default=0.0), 1),
            "calls": len(calls), "rows_in": sum(c["rows_in"] for c in calls),
            "rows_per_s": round(sum(c["rows_in"] for c in inside) / span, 4),
            "tokens_per_s": round(sum(c.get("tokens", 0) for c in inside) / span, 1) or None,
            "tokens": sum(c.get("tokens", 0) for c in calls) or None,
            "busy_share": round(sum(busy.values()) / (span * max(1, len(actors))), 3),
            "waited_for_input_s": round(sum(span - b for b in busy.values()), 1),
            "busy_s_total": round(sum(c["t1"] - c["t0"] for c in calls), 1),
        }
    return out


def steady_window(events: list[dict], pool: str = "t2v") -> tuple[float, float, str]:
    """(start, end, how): from the moment every actor of `pool` has finished a call to the first of their last calls.

    That is the span in which every video actor was rendering; a run too short to have one
    (an actor with a single video) falls back to first-to-last completion of the pool.
    """
    calls = [e for e in events if e["pool"] == pool and e["kind"] == "call" and (e.get("videos") or 0) > 0]
    by_actor: dict[str, list[float]] = {}
    for c in calls:
        by_actor.setdefault(c["actor"], []).append(c["t1"])
    if not by_actor:
        return 0.0, 0.0, "no video rendered"
    w0 = max(min(t) for t in by_actor.values())
    w1 = min(max(t) for t in by_actor.values())
    if w1 > w0 and all(len(t) > 1 for t in by_actor.values()):
        return w0, w1, "every video actor rendering: latest first completion to earliest last completion"
    done = sorted(t for ts in by_actor.values() for t in ts)
    return done[0], done[-1], "first to last video completion (too few videos per actor for a steady window)"
