"""Admission control of the serve ingress: refuse at once what cannot be answered within its deadline.

Past its capacity a queue only grows: requests that wait out their timeout hold a place that
requests still worth serving could use, and their clients learn nothing until they give up.
So each request is admitted only when its expected completion fits its deadline:

    expected = (requests in flight + 1) x recent time per completed request

and otherwise answered 503 with `Retry-After` at once (the time the queue needs to shrink
until the request would fit, at least 1 s). "Time per completed request" is measured while
the model is busy: the gaps between consecutive completions (the first from the moment
work started again after an idle spell), averaged over the last `window` completions. A
batch of B answered at once is one long gap and B-1 empty ones, so batching is counted
right whatever the phase of the window; an idle server never looks slow; the figure follows
the replica count as the autoscaler changes it. Until a few completions have been seen
every request is admitted.

One instance per ingress replica; the ingress counts its own requests in flight, so with
several ingress replicas each sees its share of the queue and of the completions.
"""
from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Decision:
    admit: bool
    expected_s: float  # expected time to completion of this request (0 until measured)
    retry_after_s: int  # when refused: seconds until it would fit (>= 1); 0 when admitted


class AdmissionControl:
    """Counts requests in flight, measures the time per completion, decides admissions."""

    def __init__(self, window: int = 64, min_completions: int = 4, max_retry_after_s: int = 60,
                 clock: Callable[[], float] = time.monotonic):
        self.gaps: collections.deque = collections.deque(maxlen=window)  # seconds between recent completions
        self.min_completions = min_completions  # admit everything until this many gaps were measured
        self.max_retry_after_s = max_retry_after_s
        self.clock = clock
        self.in_flight = 0
        self.completions = 0
        self._since: Optional[float] = None  # last completion, or when work started after being idle
        self._lock = threading.Lock()

    def decide(self, deadline_s: float) -> Decision:
        """Admit (and count in flight) or refuse a request that must complete within `deadline_s`."""
        with self._lock:
            expected = 0.0
            if self.completions >= self.min_completions:
                expected = (self.in_flight + 1) * self.per_request_s
                if expected > deadline_s:
                    wait = math.ceil(expected - deadline_s)
                    return Decision(False, expected, min(max(1, wait), self.max_retry_after_s))
            if self.in_flight == 0:
                self._since = self.clock()
            self.in_flight += 1
            return Decision(True, expected, 0)

    def finished(self, completed: bool = True) -> None:
        """An admitted request left; `completed` = the model answered it (failures are not timed)."""
        with self._lock:
            now = self.clock()
            if completed and self._since is not None:
                self.gaps.append(now - self._since)
                self.completions += 1
                self._since = now
            self.in_flight = max(0, self.in_flight - 1)
            if self.in_flight == 0:
                self._since = None  # idle from here: the next gap starts with the next request

    @property
    def per_request_s(self) -> Optional[float]:
        """Mean gap between completions over the window; None before the first."""
        return sum(self.gaps) / len(self.gaps) if self.gaps else None

    def snapshot(self) -> dict:
        with self._lock:
            return {"in_flight": self.in_flight, "per_request_s": self.per_request_s, "completions": self.completions}
