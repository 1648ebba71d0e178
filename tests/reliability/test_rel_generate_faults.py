"""Faults during `vpo generate`: killed stage actors, a killed driver, a misbehaving judge endpoint.

Invariants after each fault: every input row is in exactly one of the set, errors.jsonl or
duplicates.jsonl; no query is finalised twice; and the content (rows sorted by query id,
error rows) equals an undisturbed run with the same seeds, since sampling is seeded per row.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from relsupport import (DPO_EXTRA, DPO_QUERIES, REPO, SFT_QUERIES, accounting, alive_actors, busy, content, gcs_address,
                        gen_cfg, gen_overrides, kill9, pid_alive, read_jsonl, reps, subprocess_env, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STAGE_CLASSES = ("Rewriter", "Critic", "RenderStage", "VideoJudge")


class Chaos:
    """kill -9 stage actors: one killer thread per class, each killing `per_class` times.

    A victim is an ALIVE actor of the class (model loaded). The kill lands while it is
    computing (seen burning CPU) when that happens within `busy_wait_s`, else wherever it
    is; either way after a random extra delay, so kills hit different points of a batch.
    Downstream stages get busy later, and later still when an upstream kill made them
    wait for a restart, so the kills spread over the run.
    """

    def __init__(self, classes, per_class: int, seed: int, busy_wait_s: float = 20.0):
        self.stop = threading.Event()
        self.killed: list[dict] = []
        self.errors: list[BaseException] = []
        self.busy_wait_s = busy_wait_s
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(cls, per_class, random.Random(seed + i)), daemon=True)
                        for i, cls in enumerate(classes)]

    def start(self):
        for t in self.threads:
            t.start()

    def join(self, timeout_s: float):
        self.stop.set()
        for t in self.threads:
            t.join(timeout_s)

    def _victim(self, cls):
        with self.lock:
            dead = {k["pid"] for k in self.killed}
        live = [pid for _, pid in alive_actors(cls) if pid not in dead and pid_alive(pid)]
        return live[0] if live else None

    def _run(self, cls, times, rng):
        try:
            for _ in range(times):
                pid = None
                while pid is None and not self.stop.is_set():
                    pid = self._victim(cls)
                    if pid is None:
                        self.stop.wait(0.2)
                if pid is None:
                    return
                deadline = time.monotonic() + self.busy_wait_s
                was_busy = False
                while not self.stop.is_set() and time.monotonic() < deadline and pid_alive(pid):
                    if busy(pid):
                        was_busy = True
                        break
                if self.stop.wait(rng.uniform(0.0, 0.5)):
                    return
                if kill9(pid):
                    with self.lock:
                        self.killed.append({"class": cls, "pid": pid, "busy": was_busy,
                                            "at_s": round(time.monotonic() - self.t0, 1)})
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)


def chaos_run(cfg, per_class: int, seed: int, busy_wait_s: float = 20.0):
    from vpo_ray.pipeline.generate import run_generate

    chaos = Chaos(STAGE_CLASSES, per_class, seed, busy_wait_s)
    chaos.start()
    try:
        summary = run_generate(cfg)
    finally:
        chaos.join(30)
    assert not chaos.errors, f"chaos thread failed: {chaos.errors!r}"
    return summary, sorted(chaos.killed, key=lambda k: k["at_s"])


@pytest.mark.parametrize("round_", range(reps(1, 2)))
def test_killed_stage_actors_lose_no_rows(round_, dpo_reference, dpo_queries, tmp_path, rel):
    """kill -9 the rewrite, judge, T2V and video-judge actors during one DPO run: Ray restarts
    them, their tasks are retried, and the DPO set equals the undisturbed one."""
    ref_out, ref_summary = dpo_reference
    per_class = reps(1, 2)
    e = rel("fault", "generation", f"kill -9 {'/'.join(STAGE_CLASSES)} actors during a DPO run (round {round_ + 1})",
            tried=0)
    out = str(tmp_path / "chaos")
    # a quick stage (the tiny video judge) may never be seen busy: give up waiting for that well before the run
    # could end (a quarter of the undisturbed run), so its actor is still killed, idle, while the run goes on
    summary, killed = chaos_run(gen_cfg("dpo", dpo_queries, out, *DPO_EXTRA), per_class, seed=1000 + round_,
                                busy_wait_s=min(20.0, ref_summary["wall_seconds"] / 4))
    e.tried = len(killed)
    e.metrics = {"kills": ",".join(f"{k['class']}@{k['at_s']}s{'' if k['busy'] else '(idle)'}" for k in killed),
                 "wall_s": summary["wall_seconds"], "undisturbed_s": ref_summary["wall_seconds"]}
    acc = accounting(out, "dpo", len(DPO_QUERIES), allow_tmp=True)
    e.rows_lost = acc["rows_lost"]
    assert not acc["problems"], acc["problems"]
    assert {k["class"] for k in killed} == set(STAGE_CLASSES), f"not every stage was hit: {killed}"
    got, want = content(out, "dpo"), content(ref_out, "dpo")
    assert got["errors"] == want["errors"] and got["duplicates"] == want["duplicates"]
    assert got["rows"] == want["rows"], "DPO rows differ from the undisturbed run"
    assert summary["output_rows"] == ref_summary["output_rows"] > 0


# ---------------------------------------------------------------------------- the driver dies

def _start_cli(queries: str, out: str, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vpo_ray.cli", "generate", *gen_overrides("sft", queries, out),
           f"ray.address={gcs_address()}"]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def _parts(out: str) -> list[Path]:
    """Finished part files (a `.tmp-` name is a write in progress, which readers skip)."""
    d = Path(out) / "parts"
    return sorted(p for p in d.glob("*.jsonl") if not p.name.startswith(".")) if d.exists() else []


def test_killed_driver_resumes_without_duplicates(sft_reference, sft_queries, tmp_path, rel):
    """SIGKILL `vpo generate` once part files exist, (HEAVY: again on the rerun), then rerun to the end."""
    from vpo_ray.pipeline.generate import run_generate

    ref_out, ref_summary = sft_reference
    kills = reps(1, 3)
    e = rel("fault", "driver", "SIGKILL the `vpo generate` driver after part files exist, rerun", tried=0)
    out = str(tmp_path / "run")
    finished_early = 0
    for i in range(kills):
        before = len(_parts(out))
        proc = _start_cli(sft_queries, out, tmp_path / f"driver_{i}.log")
        try:
            wait_for(lambda: len(_parts(out)) > before or proc.poll() is not None, 240, 0.1)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                e.tried += 1
            else:
                finished_early += 1
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(60)
        for p in _parts(out):  # atomic writes: whatever is there is complete
            for rec in read_jsonl(p):
                assert "query_id" in rec and ("rows" in rec or "error" in rec)
    assert e.tried >= 1, f"the driver finished before any part file appeared; see {tmp_path}/driver_0.log"
    done_before = sum(len(read_jsonl(p)) for p in _parts(out))
    parts_before = len(_parts(out))
    summary = run_generate(gen_cfg("sft", sft_queries, out))
    e.metrics = {"parts_before_rerun": parts_before, "queries_done_before_rerun": done_before,
                 "rerun_processed": summary["processed_this_run"], "rerun_resumed": summary["resumed_from_earlier_runs"]}
    acc = accounting(out, "sft", len(SFT_QUERIES), allow_tmp=True)
    e.rows_lost = acc["rows_lost"]
    assert not acc["problems"], acc["problems"]
    assert summary["resumed_from_earlier_runs"] == done_before > 0
    assert content(out, "sft") == content(ref_out, "sft")


# ---------------------------------------------------------------------------- the judge endpoint misbehaves

GOOD_YES = "Step-by-step verification: faithful and safe.\nFinal Judgement (Yes or No): Yes"
GOOD_NO = "Step-by-step verification: it drops the subject.\nFinal Judgement (Yes or No): No"
REFINED = "Reflection on how to refine the prompt: keep the subject.\nFinal Refined Prompt: [[start]] {q} [[end]]"
PERSISTENT = "UNJUDGEABLE"  # queries holding this word always get 500


class MisbehavingJudge:
    """OpenAI-compatible chat endpoint on 127.0.0.1 that misbehaves at random (seeded)."""

    BEHAVIOURS = (("ok", 50), ("hang", 10), ("429", 12), ("5xx", 12), ("truncated", 8), ("wrong_schema", 8))

    def __init__(self, seed: int, hang_s: float):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.hang_s = hang_s
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.serve(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _pick(self) -> str:
        with self.lock:
            r = self.rng.uniform(0, sum(w for _, w in self.BEHAVIOURS))
            for name, w in self.BEHAVIOURS:
                r -= w
                if r <= 0:
                    return name
            return "ok"

    def serve(self, h, body):
        text = " ".join(str(m.get("content")) for m in body["messages"])
        kind = "persistent" if PERSISTENT in text else self._pick()
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        refine = "Final Refined Prompt" in str(body["messages"][-1]["content"])
        if kind == "hang":
            time.sleep(self.hang_s)  # past the client's timeout; bounded
            kind = "ok"
        if kind in ("persistent", "5xx"):
            return self._send(h, self.rng.choice((500, 502, 503)), b'{"error": "boom"}')
        if kind == "429":
            return self._send(h, 429, b'{"error": "slow down"}', {"Retry-After": "0"})
        if kind == "truncated":
            return self._send(h, 200, b'{"choices": [{"message": {"content": "Step-by')
        if kind == "wrong_schema":
            return self._send(h, 200, json.dumps({"result": GOOD_YES, "choices": "none"}).encode())
        reply = REFINED.format(q="a calm and safe scene") if refine else self.rng.choice((GOOD_YES, GOOD_NO))
        return self._send(h, 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode())

    @staticmethod
    def _send(h, status, data: bytes, headers=None):
        try:
            h.send_response(status)
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:  # the client gave up (timeout): nothing to answer
            pass

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_misbehaving_judge_endpoint_accounts_for_every_id(ray_session, tmp_path, rel):
    from vpo_ray.data.ingest import ingest
    from vpo_ray.pipeline.generate import run_generate

    queries = [q for q in SFT_QUERIES if q] + [f"a {PERSISTENT} storm over the sea", f"{PERSISTENT} city at dawn"]
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(queries, ensure_ascii=False))
    expected_persistent = {q["query_id"] for q in ingest(str(qfile)).queries if PERSISTENT in q["text"]}
    server = MisbehavingJudge(seed=7, hang_s=1.6)
    e = rel("fault", "judge_endpoint", "judge endpoint: random hangs, 429 storms, 5xx, truncated JSON, wrong schema; "
                                       "2 queries always fail", tried=0)
    out = str(tmp_path / "run")
    try:
        summary = run_generate(gen_cfg("sft", str(qfile), out, f"judge_endpoint.base_url={server.url}",
                                       "judge_endpoint.timeout_s=1.0", "judge_endpoint.max_retries=4",
                                       "judge_endpoint.backoff_s=0.05", "judge_endpoint.max_concurrency=4"))
    finally:
        server.close()
    faults = {k: v for k, v in server.counts.items() if k != "ok"}
    e.tried = sum(faults.values())
    e.metrics = {"requests": sum(server.counts.values()), **faults, "output_rows": summary["output_rows"],
                 "error_rows": summary["errors"]}
    acc = accounting(out, "sft", len(queries))
    e.rows_lost = acc["rows_lost"]
    assert not acc["problems"], acc["problems"]
    errors = {r["query_id"]: r for r in read_jsonl(Path(out) / "errors.jsonl")}
    for qid in expected_persistent:
        assert qid in errors and errors[qid]["stage"] == "critique", errors.get(qid)
        assert "judge endpoint failed after 5 attempts" in errors[qid]["error"], errors[qid]
    assert summary["output_rows"] > 0, "the transient faults should have been retried through"
    assert all(server.counts.get(k, 0) > 0 for k in ("hang", "429", "5xx", "truncated", "wrong_schema")), server.counts
