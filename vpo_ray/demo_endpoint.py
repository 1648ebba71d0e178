"""The demo's teacher and judge as an OpenAI-compatible chat endpoint on 127.0.0.1.

POST /v1/chat/completions answers by `model`:
  * TEACHER_MODEL: the optimizer's chat (its last user turn is the run's optimizer template
    with the query in it) -> demo_rules.rewrite(query).
  * JUDGE_MODEL, critique (one user turn: the judge template with query and prompt) ->
    "Step-by-step verification: <one clause per rule>" and "Final Judgement (Yes or No): Yes|No";
    refine (the critique, then the refine turn) -> a reflection naming the failed rules and
    "Final Refined Prompt: [[start]] <rewrite(query)> [[end]]".
GET /v1/models lists both. The query and prompt are read back out of the run's own
templates (any template set works); a chat that fits none is a 400 naming what it expected.
Replies are deterministic: temperature, top_p and seed are accepted and ignored.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from vpo_ray import demo_rules, prompts

TEACHER_MODEL = "demo-teacher"
JUDGE_MODEL = "demo-judge"


def template_pattern(template: str) -> re.Pattern:
    """`template` as a regex whose named groups take back what `{query}` / `{prompt}` held."""
    pattern = re.escape(template)
    for name in ("query", "prompt"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>.*?)", 1)
    return re.compile(pattern, re.DOTALL)


class ChatRules:
    """Reply text for one chat, from demo_rules, given the run's optimizer and judge templates."""

    def __init__(self, optimizer_template: str, judge_template: str):
        self.optimizer = template_pattern(optimizer_template)
        self.judge = template_pattern(judge_template)

    def _user_turns(self, messages: list[dict]) -> list[str]:
        return [str(m.get("content", "")) for m in messages if m.get("role") == "user"]

    def teacher(self, messages: list[dict]) -> str:
        users = self._user_turns(messages)
        m = self.optimizer.fullmatch(users[-1]) if users else None
        if m is None:
            raise ValueError("teacher: the last user turn is not the run's optimizer template")
        return demo_rules.rewrite(m.group("query").strip())

    def judge_reply(self, messages: list[dict]) -> str:
        users = self._user_turns(messages)
        m = self.judge.fullmatch(users[0]) if users else None
        if m is None:
            raise ValueError("judge: the first user turn is not the run's judge template")
        query, prompt = m.group("query").strip(), m.group("prompt").strip()
        verdict = demo_rules.judge(query, prompt)
        if len(users) == 1:  # critique
            return prompts.critique_text(verdict.reasons, verdict.passed)
        failed = ", ".join(verdict.failed) or "none"
        return (f"Reflection on how to refine the Prompt: rules failed: {failed}; keep the subject, swap unsafe "
                f"words, say how the video is shot.\nFinal Refined Prompt: {prompts.REFINE_START} "
                f"{demo_rules.rewrite(query)} {prompts.REFINE_END}")

    def reply(self, body: dict) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages: expected a list of {role, content} objects")
        model = body.get("model")
        if model == TEACHER_MODEL:
            return self.teacher(messages)
        if model == JUDGE_MODEL:
            return self.judge_reply(messages)
        raise ValueError(f"model: expected {TEACHER_MODEL} or {JUDGE_MODEL}, got {model!r}")


def completion(model: str, text: str, n: int) -> dict:
    """An OpenAI chat.completion body holding `text` as its one choice."""
    return {"id": f"chatcmpl-demo-{n}", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": len(text.split()), "total_tokens": len(text.split())}}


def _handler(rules: ChatRules, counts: dict, lock: threading.Lock) -> type:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, doc: dict) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": TEACHER_MODEL, "object": "model"},
                                                            {"id": JUDGE_MODEL, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                text = rules.reply(body)
            except (ValueError, TypeError, AttributeError) as e:
                return self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
            with lock:
                counts[body["model"]] = counts.get(body["model"], 0) + 1
                n = sum(counts.values())
            self._send(200, completion(body["model"], text, n))

        def log_message(self, *args: Any) -> None:  # one line per request would drown the demo's log
            pass
    return Handler


class DemoEndpoint:
    """The endpoint on 127.0.0.1:`port` (0: any free port) in a daemon thread; a context manager."""

    def __init__(self, optimizer_template: str, judge_template: str, port: int = 0):
        self.counts: dict[str, int] = {}  # requests answered, per model
        handler = _handler(ChatRules(optimizer_template, judge_template), self.counts, threading.Lock())
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "DemoEndpoint":
        self.thread = threading.Thread(target=self.server.serve_forever, name="demo-endpoint", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
