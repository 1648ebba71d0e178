"""Fault injection for drills and tests: one hook, driven by the environment, off unless VPO_FAULTS is set.

Product code calls `fire(point, ...)` at a few named points. When VPO_FAULTS names that
point and its filters match, the hook does what the spec says; when VPO_FAULTS is unset the
call returns after one environment lookup. CPU tests and GPU drills (killed workers,
out-of-memory, hung calls, node loss) share the hook, so a drill takes the code path that a
real fault takes.

Grammar of VPO_FAULTS:

    faults := spec (";" spec)*
    spec   := point ":" action ("," key "=" value)*

points (where `fire` is called):
    rewrite, critique     the LLM stages' model calls; rows = the query ids in the call
    render                one video's denoising or decoding; rows = [its query id]
    video_judge           one batched checklist pass (split down to one video on failure); rows = its query ids
    train_step            after each optimizer step of a Ray Train worker; step, rank, world
actions:
    raise   RuntimeError("injected fault ...")
    oom     torch.OutOfMemoryError; in a process that uses CUDA a real one (an allocation of
            more than the free GPU memory, refused by the CUDA allocator)
    hang    the call blocks (`seconds=`, default: until the process is ended); in a process
            that uses CUDA it waits on a spinning GPU kernel, as a hung GPU call does
    exit    os._exit(1): the process dies as a killed worker does
filters and settings (every filter given must match):
    row=ID        the call's rows include this query id
    step=N        train_step at this global step
    rank=N|last   train_step on this rank (last = world size - 1)
    times=N       fire at most N times over all processes (slots in VPO_FAULTS_DIR, which
                  restarted processes must share); default: every matching call
    seconds=S     hang: how long

VPO_FAULTS_DIR, if set, records every firing as one JSON file (point, action, rows, step,
rank, pid, host); `fired(dir)` reads them back. `times=` needs it.

    VPO_FAULTS="render:oom,row=3f2a9c;critique:hang,times=1"   # every render of one query OOMs;
                                                              # one judge call hangs once
    VPO_FAULTS="train_step:exit,step=3,rank=last,times=1"      # the last rank dies at step 3, once

Drivers forward both variables to the actors they start (`env_vars()`), so a spec set where
`vpo generate` / `vpo train` runs reaches every stage actor and training worker.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Optional, Sequence

from vpo_ray.config import ConfigError

ENV = "VPO_FAULTS"
DIR_ENV = "VPO_FAULTS_DIR"
POINTS = ("rewrite", "critique", "render", "video_judge", "train_step")
ACTIONS = ("raise", "oom", "hang", "exit")
_KEYS = ("row", "step", "rank", "times", "seconds")
_HANG_CHUNK_S = 1.0  # a hang is a loop of waits this long (a GPU kernel of about this length on CUDA)


@dataclass(frozen=True)
class Fault:
    """One parsed spec of VPO_FAULTS."""
    text: str  # the spec as written (names it in errors and records)
    point: str  # one of POINTS
    action: str  # one of ACTIONS
    row: Optional[str] = None  # only calls whose rows include this query id
    step: Optional[int] = None  # train_step: only at this global step
    rank: Optional[str] = None  # train_step: "N" or "last"
    times: Optional[int] = None  # at most this many firings over all processes; None = every match
    seconds: Optional[float] = None  # hang: how long; None = until the process is ended

    def matches(self, point: str, rows: Sequence[str], step: Optional[int], rank: Optional[int],
                world: Optional[int]) -> bool:
        if point != self.point or (self.row is not None and self.row not in rows):
            return False
        if self.step is not None and step != self.step:
            return False
        if self.rank is not None:
            want = (world - 1 if world else None) if self.rank == "last" else int(self.rank)
            return rank is not None and rank == want
        return True

    @property
    def slug(self) -> str:
        import hashlib

        return f"{self.point}-{self.action}-{hashlib.sha1(self.text.encode()).hexdigest()[:10]}"


def _bad(spec: str, why: str) -> ConfigError:
    return ConfigError(f"{ENV}: spec {spec!r}: {why}")


def _number(spec: str, key: str, value: str, kind: type):
    try:
        out = kind(value)
    except ValueError:
        raise _bad(spec, f"{key}= expects a number, got {value!r}") from None
    if out < 0 or (key == "times" and out < 1):
        raise _bad(spec, f"{key}= must be {'>= 1' if key == 'times' else '>= 0'}, got {value!r}")
    return out


def parse_spec(spec: str) -> Fault:
    head, *pairs = [p.strip() for p in spec.split(",")]
    point, sep, action = (s.strip() for s in head.partition(":"))
    if not sep:
        raise _bad(spec, "expected point:action (e.g. render:oom)")
    if point not in POINTS:
        raise _bad(spec, f"unknown point {point!r} (one of {', '.join(POINTS)})")
    if action not in ACTIONS:
        raise _bad(spec, f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    fields: dict = {}
    for pair in pairs:
        key, sep, value = (s.strip() for s in pair.partition("="))
        if not sep or not value:
            raise _bad(spec, f"expected key=value, got {pair!r}")
        if key not in _KEYS:
            raise _bad(spec, f"unknown key {key!r} (one of {', '.join(_KEYS)})")
        if key in fields:
            raise _bad(spec, f"{key}= given twice")
        if key in ("step", "times"):
            fields[key] = _number(spec, key, value, int)
        elif key == "seconds":
            fields[key] = _number(spec, key, value, float)
        elif key == "rank" and value != "last":
            fields[key] = str(_number(spec, key, value, int))
        else:
            fields[key] = value
    if point != "train_step" and ("step" in fields or "rank" in fields):
        raise _bad(spec, "step= and rank= apply to train_step only")
    if "seconds" in fields and action != "hang":
        raise _bad(spec, "seconds= applies to hang only")
    if "times" in fields and not os.environ.get(DIR_ENV):
        raise _bad(spec, f"times= needs {DIR_ENV}: a directory that every process (and its restarts) shares")
    return Fault(text=spec.strip(), point=point, action=action, **fields)


def parse(text: str) -> list[Fault]:
    """Every spec of a VPO_FAULTS value; ConfigError naming the first bad one."""
    return [parse_spec(s) for s in text.split(";") if s.strip()]


_parsed: tuple[str, list[Fault]] = ("", [])


def active() -> list[Fault]:
    """The faults VPO_FAULTS asks for in this process (parsed once per distinct value)."""
    global _parsed
    raw = os.environ.get(ENV, "")
    if raw != _parsed[0]:
        _parsed = (raw, parse(raw))
    return _parsed[1]


def env_vars() -> dict[str, str]:
    """VPO_FAULTS and VPO_FAULTS_DIR as set here, for the runtime env of actors and workers
    (checked here, so a bad spec fails in the driver before any actor starts); {} if unset."""
    if not os.environ.get(ENV):
        return {}
    active()
    return {k: os.environ[k] for k in (ENV, DIR_ENV) if os.environ.get(k)}


def fire(point: str, rows: Sequence[str] = (), step: Optional[int] = None, rank: Optional[int] = None,
         world: Optional[int] = None) -> None:
    """The hook: does what a matching VPO_FAULTS spec says; returns at once when none is set."""
    if not os.environ.get(ENV):
        return
    for fault in active():
        if fault.matches(point, [str(r) for r in rows], step, rank, world):
            context = {"rows": [str(r) for r in rows][:16], "step": step, "rank": rank}
            if _claim(fault, context):
                _act(fault)


def due(point: str, rows: Sequence[str] = (), step: Optional[int] = None, rank: Optional[int] = None,
        world: Optional[int] = None) -> bool:
    """Whether a VPO_FAULTS spec matches this call (what `fire` would look at), without firing it:
    for a caller that must first reach a state the drill is about (a registered checkpoint)."""
    return bool(os.environ.get(ENV)) and any(f.matches(point, [str(r) for r in rows], step, rank, world)
                                             for f in active())


def _claim(fault: Fault, context: dict) -> bool:
    """Record this firing; False when a `times=` fault has used all its slots."""
    folder = os.environ.get(DIR_ENV)
    if not folder:
        return True
    os.makedirs(folder, exist_ok=True)
    record = json.dumps({"spec": fault.text, "point": fault.point, "action": fault.action, **context,
                         "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
    names = ([f"{fault.slug}-{n}.json" for n in range(1, fault.times + 1)] if fault.times
             else [f"{fault.slug}-x{os.getpid()}-{uuid.uuid4().hex[:8]}.json"])
    for name in names:
        try:  # O_EXCL: of two processes racing for a slot, exactly one gets it
            fd = os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(record + "\n")
        return True
    return False


def fired(folder: str) -> list[dict]:
    """Every firing recorded in `folder` (VPO_FAULTS_DIR), oldest first."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in os.listdir(folder):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                out.append(json.loads(f.read()))
    return sorted(out, key=lambda r: r["time"])


def _cuda_in_use() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def _act(fault: Fault) -> None:
    where = f"injected by {ENV} ({fault.text})"
    print(f"[vpo faults] {fault.action} at {fault.point} pid {os.getpid()}: {fault.text}", file=sys.stderr, flush=True)
    if fault.action == "raise":
        raise RuntimeError(f"injected fault at {fault.point} ({fault.text})")
    if fault.action == "exit":
        os._exit(1)
    import torch

    if fault.action == "oom":
        if _cuda_in_use():  # the allocator's own error, after it has tried to free cached blocks
            free, _ = torch.cuda.mem_get_info()
            torch.empty(free + (1 << 30), dtype=torch.uint8, device="cuda")
        raise torch.OutOfMemoryError(f"CUDA out of memory ({where})")
    deadline = time.monotonic() + (fault.seconds if fault.seconds is not None else float("inf"))
    while time.monotonic() < deadline:  # hang
        if _cuda_in_use():
            torch.cuda._sleep(int(_HANG_CHUNK_S * 1e9))  # ~1 s of a spinning kernel at ~1 GHz
            torch.cuda.synchronize()
        else:
            time.sleep(min(_HANG_CHUNK_S, max(deadline - time.monotonic(), 0.0)))
