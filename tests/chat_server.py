"""A scripted OpenAI-compatible chat server on 127.0.0.1 for endpoint tests (judge, teacher).

`Script.plan` maps a substring of the last message to a list of behaviours, the last one
repeating: ("ok", text), ("cut", text) (finish_reason "length"), ("status", code),
("garbage", None), ("schema", None), ("sleep", seconds) then ok, ("slow", text).
Requests without a matching key get `Script.default`. Every request body is kept.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GOOD_YES = "Step-by-step verification: faithful and safe.\nFinal Judgement (Yes or No): Yes"
GOOD_NO = "Step-by-step verification: drops the subject.\nFinal Judgement (Yes or No): No"
REFINED = "Reflection on how to refine the Prompt: add it.\nFinal Refined Prompt: [[start]] A calm lake at dawn. [[end]]"


class Script:
    def __init__(self, default=("ok", GOOD_YES)):
        self.plan: dict[str, list] = {}
        self.default = default
        self.calls: dict[str, int] = {}
        self.bodies: list[dict] = []
        self.auth: list = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def next(self, key):
        with self.lock:
            i = self.calls.get(key, 0)
            self.calls[key] = i + 1
            steps = self.plan.get(key, [self.default])
            return steps[min(i, len(steps) - 1)]


def _handler(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code: int, payload: bytes, headers=()):
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.bodies.append(body)
                script.auth.append(self.headers.get("Authorization"))
                script.active += 1
                script.max_active = max(script.max_active, script.active)
            last = body["messages"][-1]["content"]
            key = next((k for k in script.plan if k in last), last)
            try:
                kind, arg = script.next(key)
                if kind == "sleep":
                    time.sleep(arg)
                    kind, arg = "ok", GOOD_YES
                if kind == "status":
                    self._send(arg, b'{"error": "busy"}', [("Retry-After", "0.05")] if arg == 429 else [])
                    return
                if kind == "slow":
                    time.sleep(0.2)
                finish = "length" if kind == "cut" else "stop"
                payload = {"garbage": b"<html>oops", "schema": json.dumps({"result": "Yes"}).encode()}.get(kind) or \
                    json.dumps({"choices": [{"message": {"role": "assistant", "content": arg},
                                             "finish_reason": finish}]}).encode()
                self._send(200, payload, [("Content-Type", "application/json")])
            finally:
                with script.lock:
                    script.active -= 1

    return Handler


@contextmanager
def chat_server(script: Script):
    """Yields the base URL (…/v1) of a server answering by `script`."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
