"""An OpenAI-compatible chat endpoint as a stage back-end; the judge and the teacher share it.

`ChatEndpoint` posts `{model, messages, temperature[, top_p][, max_tokens][, seed]}` to
`<base_url>/chat/completions`: top_p only when below 1, max_tokens only when the config
sets it (the official GPT-4o calls, thu-coai/VPO src/gpt4o_infer.py, send neither), a
seed per item so a rerun asks the same question the same way. Concurrency is bounded
by a thread pool of `max_concurrency`; every request has a timeout; failures are retried
under vpo_ray.http_retry's policy (429/5xx with Retry-After, timeouts, connection errors,
bodies that are not a chat completion, and replies the caller finds malformed). After
the retries an item becomes a `Failure` (a str the stage writes into the item's error):
nothing raises out of `map`. A reply the server cut at its token limit comes back with
finish_reason "length"; the caller decides what a cut text is worth (truncation policy).
The API key is read from the environment variable named in config, never from files.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import requests

from vpo_ray.config import EndpointConfig, SamplingConfig
from vpo_ray.http_retry import RetryPolicy, Retryable, call_with_retries, retry_after_s, retryable_status

log = logging.getLogger(__name__)
T = TypeVar("T")


class Failure(str):
    """The reason an item failed after all retries (a str, so it lands in error rows)."""


class Refused(ValueError):
    """A 4xx other than 408/429: the request itself is wrong, so it is not retried."""


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" | "length" | whatever else the server says


class ChatEndpoint:
    def __init__(self, cfg: EndpointConfig, sampling: SamplingConfig, role: str = "judge"):
        if not cfg.base_url:
            raise ValueError(f"{role}_endpoint.base_url is empty")
        self.cfg = cfg
        self.sampling = sampling
        self.role = role
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.policy = RetryPolicy(cfg.max_retries, cfg.backoff_s, cfg.max_wait_s)
        self.session = requests.Session()
        key = os.environ.get(cfg.api_key_env, "")
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def body(self, messages: list[dict], seed: Optional[int] = None) -> dict:
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.sampling.temperature}
        if self.sampling.top_p < 1.0:
            body["top_p"] = self.sampling.top_p
        if self.cfg.max_tokens is not None:
            body["max_tokens"] = self.cfg.max_tokens
        if seed is not None:
            body["seed"] = int(seed) & 0x7FFFFFFF  # OpenAI takes a 32-bit seed
        return body

    def chat(self, messages: list[dict], seed: Optional[int] = None) -> Reply:
        """One request; raises Retryable (worth another try) or Refused (not)."""
        self._count("requests")
        try:
            r = self.session.post(self.url, json=self.body(messages, seed), headers=self.headers,
                                  timeout=self.cfg.timeout_s)
        except requests.Timeout:
            raise Retryable(f"timeout after {self.cfg.timeout_s:g}s") from None
        except requests.RequestException as e:
            raise Retryable(f"connection error: {type(e).__name__}") from None
        if retryable_status(r.status_code):
            raise Retryable(f"HTTP {r.status_code}", retry_after_s(r.headers), r.status_code)
        if r.status_code >= 400:  # the body never contains our key
            raise Refused(f"HTTP {r.status_code} from {self.role} endpoint")
        try:
            choice = r.json()["choices"][0]
            content, finish = choice["message"]["content"], choice.get("finish_reason") or "stop"
        except (ValueError, KeyError, IndexError, TypeError):
            raise Retryable("reply is not an OpenAI chat completion") from None
        if not isinstance(content, str):
            raise Retryable("reply content is not a string")
        return Reply(content, str(finish))

    def call(self, fn: Callable[[], T]) -> T | Failure:
        """fn() with retries; its failure as a Failure."""
        try:
            return call_with_retries(fn, self.policy, on_retry=lambda e: self._count("retries"))
        except Refused as e:
            self._count("failures")
            return Failure(str(e))
        except Retryable as e:
            self._count("failures")
            return Failure(f"{self.role} endpoint failed after {self.policy.max_retries + 1} attempts: {e}")

    def map(self, fn: Callable[[T], object], items: list[T]) -> list:
        """fn over items on at most max_concurrency threads, results in item order."""
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.max_concurrency, len(items)))) as pool:
            return list(pool.map(fn, items))
