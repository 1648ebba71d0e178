"""Stage actors under GPU faults: a row that fails is that row's error; a hung call ends the actor.

Failing rows. A batched model call that raises (CUDA out of memory above all) is retried in
halves, down to single rows, after the CUDA cache is freed; a call of a single row that ran
out of memory gets one retry. A row that still fails alone becomes that row's `RowFailure`
and the actor goes on with the rest. Sampling is seeded per row (vpo_ray.sampling), so
splitting a batch changes no row's output.

Hung calls. A watchdog timer ends the process (os._exit) when a guarded call runs past
`watchdog_s`. Ray Data creates its actor pools with max_restarts=-1 and max_task_retries=-1
(`ActorPoolMapOperator._apply_default_remote_args`, Ray 2.60), so Ray starts a new actor
and runs the task again: the rows are retried, not lost. Ending the process frees its CUDA
context; nothing resets the GPU, and other processes on it carry on. Before exiting, the
watchdog gives every row of the hung call a strike (a small JSON file under `strikes_dir`,
which restarted actors share); on the retry, struck rows run one at a time, and a row struck
`max_strikes` times becomes a RowFailure without running again, so a row that always hangs
cannot stall a job forever.

Every guarded call first calls the fault hook (`vpo_ray.faults.fire(stage, rows=...)`), so
the CPU tests and the GPU drill inject their faults exactly where a real one would strike.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from vpo_ray import faults, storage

log = logging.getLogger("vpo.guard")

WATCHDOG_EXIT_CODE = 75  # the exit status of a process the watchdog ended (EX_TEMPFAIL: retry it)
MAX_STRIKES = 2  # a row whose call hung this many times is an error row, not run again


@dataclass(frozen=True)
class RowFailure:
    """Why a row produced no output. `reason` is short, groupable and has no colon (it ends
    up after "<stage>: " in an error row); `detail` is the exception's text."""
    reason: str
    detail: str = ""


def is_oom(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def failure_of(e: BaseException) -> RowFailure:
    detail = " ".join(str(e).split())[:500]
    if is_oom(e):
        return RowFailure("out of GPU memory", detail)
    short = detail[:200].replace(":", ";")  # a colon would split the reason in the error row
    return RowFailure(f"{type(e).__name__} ({short})" if short else type(e).__name__, detail)


def _free_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class StageGuard:
    """Runs a stage's model calls: failing rows become RowFailures, hung calls end the process.

    `stage` names the fault point and the log lines; `watchdog_s` bounds one call (0 = no
    watchdog); `strikes_dir` (shared storage, e.g. the run's out/watchdog) remembers which
    rows were in a hung call across actor restarts.
    """

    def __init__(self, stage: str, watchdog_s: float = 0.0, strikes_dir: Optional[str] = None,
                 max_strikes: int = MAX_STRIKES):
        self.stage = stage
        self.watchdog_s = float(watchdog_s)
        self.strikes_dir = storage.join(strikes_dir, stage) if strikes_dir else None
        self.max_strikes = max_strikes
        if self.watchdog_s > 0 and self.strikes_dir is None:
            log.warning("%s: watchdog without strikes_dir: a row that always hangs is retried forever", stage)

    def run(self, fn: Callable[[list], list], items: Sequence[Any], rows: Sequence[str],
            keys: Optional[Sequence[str]] = None, max_batch: Optional[int] = None) -> list:
        """fn(some items) -> one result per item, for every item; a failed item's result is a RowFailure.

        rows[i]: item i's query id (what fault specs match); keys[i]: its identity for strikes
        (default rows[i]); max_batch: the most items per call (default: all in one call).
        """
        keys = list(keys) if keys is not None else [str(r) for r in rows]
        out: list = [None] * len(items)
        strikes = self._strikes(keys)
        fresh = [i for i, s in enumerate(strikes) if s == 0]
        groups = [fresh[k:k + (max_batch or len(fresh))] for k in range(0, len(fresh), max_batch or len(fresh) or 1)]
        for i, s in enumerate(strikes):
            if s >= self.max_strikes:
                out[i] = RowFailure(f"hung {s} times past the {self.watchdog_s:g} s watchdog",
                                    f"{self.stage}: every call with this row hung; not run again")
            elif s > 0:  # it was in a hung call: alone this time, so a batch-mate is not blamed twice
                groups.append([i])
        for idx in groups:
            self._solve(fn, items, rows, keys, idx, out, retried=False)
        return out

    def call_one(self, fn: Callable[[], Any], row: str, key: Optional[str] = None) -> Any:
        """fn() for one row under the guard; raises RowFailed if the row failed."""
        (result,) = self.run(lambda _: [fn()], [None], [row], [key or row])
        if isinstance(result, RowFailure):
            raise RowFailed(result)
        return result

    # -- internals ----------------------------------------------------------------------

    def _solve(self, fn, items, rows, keys, idx: list[int], out: list, retried: bool) -> None:
        try:
            with self._watch([keys[i] for i in idx]):
                faults.fire(self.stage, rows=[rows[i] for i in idx])
                results = fn([items[i] for i in idx])
            if len(results) != len(idx):
                raise RuntimeError(f"{self.stage}: {len(results)} results for {len(idx)} rows")
        except Exception as e:  # noqa: BLE001 - a row's failure becomes its RowFailure
            oom = is_oom(e)
            if oom:
                _free_cuda_cache()
            log.warning("%s: a call of %d row(s) failed (%s: %s)%s", self.stage, len(idx), type(e).__name__,
                        " ".join(str(e).split())[:300], "; retrying in halves" if len(idx) > 1 else "")
            if len(idx) > 1:
                half = len(idx) // 2
                self._solve(fn, items, rows, keys, idx[:half], out, retried=True)
                self._solve(fn, items, rows, keys, idx[half:], out, retried=True)
            elif oom and not retried:
                self._solve(fn, items, rows, keys, idx, out, retried=True)
            else:
                out[idx[0]] = failure_of(e)
            return
        for i, r in zip(idx, results):
            out[i] = r

    @contextlib.contextmanager
    def _watch(self, keys: list[str]):
        if self.watchdog_s <= 0:
            yield
            return
        timer = threading.Timer(self.watchdog_s, self._expire, (keys,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _expire(self, keys: list[str]) -> None:
        """The watchdog's end of a hung call: strike its rows, then end this process for Ray to restart."""
        try:
            self._strike(keys)
        except Exception as e:  # noqa: BLE001 - the exit must happen even if storage fails
            log.error("%s: could not record strikes: %s", self.stage, e)
        print(f"[vpo watchdog] {self.stage}: a call of {len(keys)} row(s) ran past {self.watchdog_s:g} s; "
              f"ending actor process {os.getpid()} so that Ray restarts it and retries the rows",
              file=sys.stderr, flush=True)
        os._exit(WATCHDOG_EXIT_CODE)

    def _strike_uri(self, key: str) -> str:
        return storage.join(self.strikes_dir, hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")

    def _strikes(self, keys: list[str]) -> list[int]:
        if self.strikes_dir is None or self.watchdog_s <= 0 or not storage.exists(self.strikes_dir):
            return [0] * len(keys)
        present = set(storage.listdir(self.strikes_dir))
        out = []
        for key in keys:
            uri = self._strike_uri(key)
            out.append(int(storage.read_json(uri)["strikes"]) if uri.rsplit("/", 1)[-1] in present else 0)
        return out

    def _strike(self, keys: list[str]) -> None:
        if self.strikes_dir is None:
            return
        storage.makedirs(self.strikes_dir)
        for key, n in zip(keys, self._strikes(keys)):
            storage.write_json(self._strike_uri(key), {"key": key, "stage": self.stage, "strikes": n + 1,
                                                      "watchdog_s": self.watchdog_s, "at": time.time()})


class RowFailed(RuntimeError):
    """A single-row call (StageGuard.call_one) failed; carries the RowFailure."""

    def __init__(self, failure: RowFailure):
        super().__init__(failure.reason)
        self.failure = failure
