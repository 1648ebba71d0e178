"""pytest plugin (loaded by conftest.py): the suite says up front how long it will take and
what it skips, and at the end how long it took.

Before the first test it prints the number of tests, the expected wall time and the skips
it knows of: tests a `skipif` mark turns off here, and the reasons tests were skipped in
the last run on this machine (runtime skips: no PyPI, no chromium, no Python 3.12 ...).
Expected time per test: its time in the last run here (pytest's cache, `.pytest_cache`),
else its time in `tests/durations.json` (a full run on a 2-core machine, committed), else
the average of the known times. Refresh the committed file after a full run with
`cp .pytest_cache/v/vpo/durations tests/durations.json`.
"""
from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from pathlib import Path

REFERENCE = Path(__file__).with_name("durations.json")
_DURATIONS_KEY, _SKIPS_KEY = "vpo/durations", "vpo/skips"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _reference() -> dict:
    try:
        return json.loads(REFERENCE.read_text())
    except (OSError, ValueError):
        return {}


def _marked_skip(item) -> str | None:
    """The reason a `skip` mark, or a `skipif` mark whose condition is already a true bool, gives."""
    for mark in item.iter_markers("skip"):
        return mark.kwargs.get("reason", "skip mark")
    for mark in item.iter_markers("skipif"):
        if mark.args and mark.args[0] is True:
            return mark.kwargs.get("reason", "skipif mark")
    return None


class SuitePlan:
    def __init__(self, config):
        self.config = config
        self.cache = getattr(config, "cache", None)  # None under `-p no:cacheprovider`: no times kept
        self.times: dict[str, float] = {}
        self.skips: Counter = Counter()
        self.expected_s = 0.0
        self.t0 = time.monotonic()

    def pytest_collection_finish(self, session) -> None:
        items = session.items
        if not items:
            return
        last = self.cache.get(_DURATIONS_KEY, {}) if self.cache else {}
        known = {**_reference(), **last}
        fallback = statistics.mean(known.values()) if known else 5.0  # a never-timed test: the average one
        self.expected_s = sum(known.get(i.nodeid, fallback) for i in items)
        untimed = sum(i.nodeid not in known for i in items)
        marked = Counter(r for r in map(_marked_skip, items) if r)
        write = self.config.get_terminal_writer().line
        write(f"suite plan: {len(items)} tests, expected about {_minutes(self.expected_s)} on this machine"
              + (f" ({untimed} never timed, counted at {fallback:.0f} s each)" if untimed else ""))
        for reason, n in marked.most_common():
            write(f"suite plan: will skip {n}: {reason}")
        previous = self.cache.get(_SKIPS_KEY, {}) if self.cache else {}
        for reason, n in sorted(previous.items(), key=lambda kv: -kv[1]):
            if reason not in marked:
                write(f"suite plan: skipped last run ({n}): {reason}")
        slow = [i for i in items if i.get_closest_marker("slow")]
        if slow:
            slow_s = sum(known.get(i.nodeid, fallback) for i in slow)
            write(f"suite plan: {len(slow)} slow tests (about {_minutes(slow_s)}: training, whole loop, real bundle); "
                  "`-m 'not slow'` leaves them out")

    def pytest_runtest_logreport(self, report) -> None:
        self.times[report.nodeid] = self.times.get(report.nodeid, 0.0) + report.duration
        if report.skipped and isinstance(report.longrepr, tuple):
            self.skips[report.longrepr[2].removeprefix("Skipped: ")] += 1

    def pytest_sessionfinish(self, session) -> None:
        if self.cache is None or not self.times:
            return
        merged = {**self.cache.get(_DURATIONS_KEY, {}), **{k: round(v, 2) for k, v in self.times.items()}}
        self.cache.set(_DURATIONS_KEY, merged)
        self.cache.set(_SKIPS_KEY, dict(self.skips))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.times:
            took = time.monotonic() - self.t0
            terminalreporter.write_line(f"suite plan: took {_minutes(took)} (expected about {_minutes(self.expected_s)})")
