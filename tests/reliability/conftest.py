"""Reliability suite plumbing: the `rel` figures fixture, outcome bookkeeping, the table.

The table of what was tried and what survived is printed in the terminal summary (so it
shows in CI logs) and written as JSON to $VPO_RELIABILITY_OUT (a file path, or a folder
that gets reliability.json), else to the session's pytest temp dir.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

from relsupport import DPO_EXTRA, DPO_QUERIES, HEAVY, RESULTS, SFT_QUERIES, Entry, gen_cfg

_T0 = time.time()


@pytest.fixture(autouse=True, scope="session")
def _quiet_ray_data():
    """Ray Data logs per-operator stats dicts at DEBUG; a failing test's report would drown in them."""
    import ray.data  # noqa: F401 - importing it configures its loggers, so set the level after

    logging.getLogger("ray.data").setLevel(logging.INFO)


@pytest.fixture
def rel(request):
    """Figures entry of this test: rel(kind, area, case) adds one; the call returns it."""
    made: list[Entry] = []

    def add(kind: str, area: str, case: str, tried: int = 1) -> Entry:
        e = Entry(kind=kind, area=area, case=case, tried=tried, nodeid=request.node.nodeid)
        RESULTS.append(e)
        made.append(e)
        return e

    request.node._rel_entries = made
    return add


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    entries = getattr(item, "_rel_entries", None)
    if not entries:
        return
    if rep.when == "call" or (rep.when == "setup" and (rep.failed or rep.skipped)):
        if hasattr(rep, "wasxfail"):
            state = "xpassed" if rep.passed else "xfailed"
            reason = rep.wasxfail
        elif rep.passed:
            state, reason = "passed", ""
        elif rep.skipped:
            state = "skipped"
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        else:
            state = "failed"
            crash = getattr(rep.longrepr, "reprcrash", None)
            reason = crash.message.splitlines()[0] if crash else str(rep.longrepr).splitlines()[-1]
        for e in entries:
            e.outcome = state
            e.reason = (reason or "")[:300]
            e.survived = e.tried if state in ("passed", "xpassed") else 0


_OTHER_OUTCOMES: dict[str, str] = {}  # outcome of tests outside this folder that an entry counts (covered_by)


class _OutcomeWatcher:
    """Sees every test's report (a conftest hook would only see this folder's tests)."""

    @staticmethod
    def pytest_runtest_logreport(report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            _OTHER_OUTCOMES[report.nodeid] = "xfailed" if hasattr(report, "wasxfail") else report.outcome


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("vpo-reliability-watcher"):
        config.pluginmanager.register(_OutcomeWatcher(), "vpo-reliability-watcher")


def _fold_in_covered() -> None:
    """An entry that points at a test elsewhere takes that test's outcome when it ran in this session."""
    for e in RESULTS:
        ref = e.metrics.get("covered_by")
        hit = next((v for k, v in _OTHER_OUTCOMES.items() if ref and k.endswith(ref.split("/", 1)[-1])), None)
        if hit:
            e.outcome, e.tried = hit, 1
            e.survived = 1 if hit == "passed" else 0
            e.reason = f"ran as {ref}"


def _aggregate() -> dict:
    faults = [e for e in RESULTS if e.kind == "fault"]
    bad = [e for e in RESULTS if e.kind == "bad_input"]
    by_surface: dict[str, dict] = defaultdict(lambda: {"tried": 0, "handled": 0, "failed": 0, "xfailed": 0,
                                                       "skipped": 0})
    for e in bad:
        s = by_surface[e.area]
        if e.outcome == "skipped":
            s["skipped"] += e.tried
            continue
        s["tried"] += e.tried
        s["handled"] += e.survived or 0
        s["xfailed"] += e.tried if e.outcome == "xfailed" else 0
        s["failed"] += e.tried if e.outcome == "failed" else 0
    lost = [e.rows_lost for e in faults if e.rows_lost is not None]
    return {
        "faults_injected": sum(e.tried for e in faults if e.outcome not in ("skipped", "not run")),
        "faults_survived": sum(e.survived or 0 for e in faults),
        "rows_lost": sum(lost),
        "bad_inputs_tried": sum(s["tried"] for s in by_surface.values()),
        "bad_inputs_handled": sum(s["handled"] for s in by_surface.values()),
        "bad_inputs_by_surface": dict(by_surface),
        "security_checks": sum(1 for e in RESULTS if e.kind == "security" and e.outcome not in ("skipped", "not run")),
        "security_passed": sum(1 for e in RESULTS if e.kind == "security" and e.outcome == "passed"),
        "figures": {k: v for e in RESULTS if e.kind == "figure" for k, v in e.metrics.items()},
        "heavy": HEAVY,
    }


def _fmt_metrics(m: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in m.items())


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines


def _report_lines(agg: dict, wall_s: float) -> list[str]:
    lines = [f"faults injected {agg['faults_injected']}, survived {agg['faults_survived']}, rows lost "
             f"{agg['rows_lost']}; bad inputs tried {agg['bad_inputs_tried']}, handled {agg['bad_inputs_handled']}; "
             f"security checks {agg['security_passed']}/{agg['security_checks']} passed; "
             f"{'VPO_HEAVY=1' if agg['heavy'] else 'default repetitions'}; {wall_s:.0f} s", ""]
    faults = [e for e in RESULTS if e.kind == "fault"]
    if faults:
        rows = [["area", "fault", "injected", "survived", "rows lost", "outcome", "measured / reason"]]
        for e in faults:
            note = _fmt_metrics(e.metrics) or ""
            if e.outcome not in ("passed",) and e.reason:
                note = (note + "; " if note else "") + e.reason
            rows.append([e.area, e.case, str(e.tried), str(e.survived if e.survived is not None else "-"),
                         "-" if e.rows_lost is None else str(e.rows_lost), e.outcome, note[:140]])
        lines += ["FAULTS"] + _table(rows) + [""]
    surf = agg["bad_inputs_by_surface"]
    if surf:
        rows = [["surface", "tried", "handled", "xfail", "failed", "skipped"]]
        for k, s in sorted(surf.items()):
            rows.append([k, str(s["tried"]), str(s["handled"]), str(s["xfailed"]), str(s["failed"]), str(s["skipped"])])
        lines += ["BAD INPUTS"] + _table(rows) + [""]
        bad = [e for e in RESULTS if e.kind == "bad_input" and e.outcome in ("failed", "xfailed")]
        for e in bad:
            lines.append(f"  {e.outcome}: [{e.area}] {e.case[:80]}: {e.reason[:150]}")
        if bad:
            lines.append("")
    other = [e for e in RESULTS if e.kind in ("security", "figure")]
    if other:
        groups: dict[tuple, list[Entry]] = {}
        for e in other:
            groups.setdefault((e.kind, e.area, e.case), []).append(e)
        rows = [["kind", "area", "check", "cases", "outcome", "measured / reason"]]
        for (kind, area, case), es in groups.items():
            ran = [e for e in es if e.outcome not in ("skipped", "not run")]
            passed = sum(1 for e in ran if e.outcome == "passed")
            outcome = ("skipped" if not ran else "passed" if passed == len(ran)
                       else ", ".join(sorted({e.outcome for e in ran if e.outcome != "passed"})))
            note = "; ".join(_fmt_metrics(e.metrics) for e in es if e.metrics)
            bad = [e.reason for e in es if e.outcome != "passed" and e.reason]
            if bad:
                note = (note + "; " if note else "") + bad[0]
            rows.append([kind, area, case, f"{passed}/{len(ran)}" if ran else "-", outcome, note[:160]])
        lines += ["SECURITY AND FIGURES"] + _table(rows)
    return lines


def _json_path(config) -> Path:
    target = os.environ.get("VPO_RELIABILITY_OUT")
    if target:
        p = Path(target)
        return p / "reliability.json" if (p.is_dir() or not p.suffix) else p
    return Path(config._tmp_path_factory.getbasetemp()) / "reliability.json"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    wall_s = time.time() - _T0
    _fold_in_covered()
    agg = _aggregate()
    terminalreporter.section("vpo_ray reliability: what was tried and what survived")
    for line in _report_lines(agg, wall_s):
        terminalreporter.write_line(line)
    try:
        path = _json_path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"summary": agg, "wall_seconds": round(wall_s, 1),
                                    "entries": [e.to_json() for e in RESULTS]}, indent=2, default=str))
        terminalreporter.write_line(f"figures written to {path}")
    except OSError as e:  # the table above is the record; a read-only target must not fail the run
        terminalreporter.write_line(f"figures not written: {e}")


# ---------------------------------------------------------------------------- generate runs shared by modules

@pytest.fixture(scope="session")
def sft_queries(tmp_path_factory):
    p = tmp_path_factory.mktemp("rel_queries") / "sft_queries.json"
    p.write_text(json.dumps(SFT_QUERIES, ensure_ascii=False))
    return str(p)


@pytest.fixture(scope="session")
def sft_reference(ray_session, sft_queries, tmp_path_factory):
    """An undisturbed SFT run: the content every disturbed run must reproduce."""
    from vpo_ray.pipeline.generate import run_generate

    out = str(tmp_path_factory.mktemp("sft_reference"))
    summary = run_generate(gen_cfg("sft", sft_queries, out))
    return out, summary


@pytest.fixture(scope="session")
def dpo_queries(tmp_path_factory):
    p = tmp_path_factory.mktemp("dpo_q") / "dpo_queries.json"
    p.write_text(json.dumps(DPO_QUERIES))
    return str(p)


@pytest.fixture(scope="session")
def dpo_reference(ray_session, dpo_queries, tmp_path_factory):
    """An undisturbed DPO run (every stage, videos included): what disturbed runs must reproduce."""
    from vpo_ray.pipeline.generate import run_generate

    out = str(tmp_path_factory.mktemp("dpo_reference"))
    return out, run_generate(gen_cfg("dpo", dpo_queries, out, *DPO_EXTRA))
