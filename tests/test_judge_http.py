"""The OpenAI-compatible judge back-end against a scripted local server on 127.0.0.1."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vpo_ray.config import JudgeEndpointConfig, SamplingConfig
from vpo_ray.pipeline.judge_http import HttpJudge
from vpo_ray.schema import Judgement

GOOD_YES = "Step-by-step verification: faithful and safe.\nFinal Judgement (Yes or No): Yes"
GOOD_NO = "Step-by-step verification: drops the subject.\nFinal Judgement (Yes or No): No"
REFINED = "Reflection on how to refine the prompt: add it.\nFinal Refined Prompt: [[start]] A calm lake at dawn. [[end]]"


class Script:
    """Per-prompt queue of behaviours; the last one repeats."""

    def __init__(self):
        self.plan: dict[str, list] = {}
        self.calls: dict[str, int] = {}
        self.auth: list = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def next(self, key):
        with self.lock:
            i = self.calls.get(key, 0)
            self.calls[key] = i + 1
            steps = self.plan.get(key, [("ok", GOOD_YES)])
            return steps[min(i, len(steps) - 1)]


@pytest.fixture
def server():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.auth.append(self.headers.get("Authorization"))
            key = body["messages"][-1]["content"]
            key = next((k for k in script.plan if k in key), key)
            with script.lock:
                script.active += 1
                script.max_active = max(script.max_active, script.active)
            try:
                kind, arg = script.next(key)
                if kind == "sleep":
                    time.sleep(arg)
                    kind, arg = "ok", GOOD_YES
                if kind == "status":
                    self.send_response(arg)
                    if arg == 429:
                        self.send_header("Retry-After", "0.05")
                    self.end_headers()
                    self.wfile.write(b'{"error": "busy"}')
                    return
                payload = {"garbage": b"<html>oops", "schema": json.dumps({"result": "Yes"}).encode(),
                           }.get(kind) or json.dumps({"choices": [{"message": {"role": "assistant", "content": arg}}]}).encode()
                if kind == "slow":
                    time.sleep(0.2)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)
            finally:
                with script.lock:
                    script.active -= 1

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", script
    httpd.shutdown()


def judge(url, **kw):
    cfg = JudgeEndpointConfig(base_url=url, max_retries=kw.pop("max_retries", 3), timeout_s=kw.pop("timeout_s", 2.0),
                              backoff_s=0.01, **kw)
    return HttpJudge(cfg, SamplingConfig(temperature=0.0))


def test_verdicts_and_reasons(server):
    url, script = server
    script.plan = {"prompt-yes": [("ok", GOOD_YES)], "prompt-no": [("ok", GOOD_NO)]}
    out = judge(url).judge([("q1", "query", "prompt-yes", 0), ("q2", "query", "prompt-no", 0)])
    assert isinstance(out[0], Judgement) and out[0].verdict is True
    assert out[1].verdict is False and "drops the subject" in out[1].reasons


@pytest.mark.parametrize("first", [("status", 429), ("status", 500), ("status", 503), ("garbage", None),
                                   ("schema", None), ("ok", "I think it is fine."), ("sleep", 1.0)])
def test_transient_failures_are_retried(server, first):
    url, script = server
    script.plan = {"P": [first, ("ok", GOOD_NO)]}
    j = judge(url, timeout_s=0.5)
    (v,) = j.judge([("q", "query", "P", 0)])
    assert isinstance(v, Judgement) and v.verdict is False
    assert script.calls["P"] == 2 and j.stats["retries"] == 1


def test_persistent_failure_becomes_an_error_not_an_exception(server):
    url, script = server
    script.plan = {"prompt-down": [("status", 500)], "prompt-mute": [("ok", "no verdict here")]}
    (a, b) = judge(url, max_retries=2).judge([("q", "x", "prompt-down", 0), ("q", "x", "prompt-mute", 1)])
    assert isinstance(a, str) and "HTTP 500" in a and "3 attempts" in a
    assert isinstance(b, str) and "malformed judge output" in b
    assert script.calls["prompt-down"] == 3


def test_client_errors_are_not_retried(server):
    url, script = server
    script.plan = {"P": [("status", 400)]}
    (v,) = judge(url).judge([("q", "x", "P", 0)])
    assert isinstance(v, str) and "HTTP 400" in v and script.calls["P"] == 1


def test_concurrency_is_bounded(server):
    url, script = server
    script.plan = {f"p{i}": [("slow", GOOD_YES)] for i in range(12)}
    out = judge(url, max_concurrency=3).judge([("q", "x", f"p{i}", 0) for i in range(12)])
    assert all(isinstance(v, Judgement) for v in out)
    assert script.max_active <= 3


def test_refine_and_key_from_env(server, monkeypatch):
    url, script = server
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    script.plan = {"Based on your judgement": [("ok", "no markers"), ("ok", REFINED)]}
    j = judge(url, api_key_env="MY_JUDGE_KEY")
    assert j.refine([("q", "a lake", "bad prompt", 0, "drops the lake")]) == ["A calm lake at dawn."]
    assert script.auth[-1] == "Bearer sk-test-123"


def test_refine_failure_is_empty(server):
    url, script = server
    script.plan = {"Based on your judgement": [("status", 500)]}
    assert judge(url, max_retries=1).refine([("q", "a lake", "bad", 0, "r")]) == [""]


def test_unreachable_endpoint():
    (v,) = judge("http://127.0.0.1:9/v1", max_retries=1, timeout_s=0.5).judge([("q", "x", "p", 0)])
    assert isinstance(v, str) and "connection error" in v
