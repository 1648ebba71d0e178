"""Judge back-end on any OpenAI-compatible chat endpoint (vLLM, TGI, hosted APIs).

Bounded concurrency (a thread pool of `max_concurrency`), a timeout per request,
retries with exponential backoff on 429 (honouring Retry-After), 5xx, timeouts,
connection errors, non-JSON or wrong-schema bodies, and judge text without a
parsable verdict. After `max_retries` the item becomes an error string, which the
pipeline records as an error row: nothing raises out of `judge`/`refine`.
The API key is read from the environment variable named in config, never from files.
"""
from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, TypeVar

import requests

from vpo_ray import prompts
from vpo_ray.config import JudgeEndpointConfig, SamplingConfig
from vpo_ray.schema import Judgement

log = logging.getLogger(__name__)
T = TypeVar("T")


class EndpointError(RuntimeError):
    """A retryable failure of one request (status, transport or body)."""


class Failure(str):
    """The reason an item failed after all retries (a str, so it lands in error rows)."""


class HttpJudge:
    def __init__(self, cfg: JudgeEndpointConfig, sampling: SamplingConfig):
        if not cfg.base_url:
            raise ValueError("judge_endpoint.base_url is empty")
        self.cfg = cfg
        self.sampling = sampling
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.session = requests.Session()
        key = os.environ.get(cfg.api_key_env, "")
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.stats = {"requests": 0, "retries": 0, "failures": 0}

    # -- one chat call -------------------------------------------------------------
    def _chat(self, messages: list[dict]) -> str:
        body = {"model": self.cfg.model, "messages": messages,
                "max_tokens": self.sampling.max_new_tokens, "temperature": self.sampling.temperature}
        self.stats["requests"] += 1
        try:
            r = self.session.post(self.url, json=body, headers=self.headers, timeout=self.cfg.timeout_s)
        except requests.Timeout:
            raise EndpointError(f"timeout after {self.cfg.timeout_s:g}s") from None
        except requests.RequestException as e:
            raise EndpointError(f"connection error: {type(e).__name__}") from None
        if r.status_code == 429 or r.status_code >= 500:
            err = EndpointError(f"HTTP {r.status_code}")
            err.retry_after = _retry_after(r)  # type: ignore[attr-defined]
            raise err
        if r.status_code >= 400:
            # 4xx other than 429 will not get better by retrying; the body never contains our key.
            raise ValueError(f"HTTP {r.status_code} from judge endpoint")
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError("reply is not an OpenAI chat completion") from None
        if not isinstance(content, str):
            raise EndpointError("reply content is not a string")
        return content

    def _with_retries(self, fn: Callable[[], T]) -> T | Failure:
        delay = self.cfg.backoff_s
        last = "unknown error"
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return fn()
            except ValueError as e:  # not retryable
                self.stats["failures"] += 1
                return Failure(str(e))
            except EndpointError as e:
                last = str(e)
                if attempt == self.cfg.max_retries:
                    break
                self.stats["retries"] += 1
                wait = getattr(e, "retry_after", None) or delay * (1 + 0.25 * random.random())
                time.sleep(min(wait, 30.0))
                delay *= 2
        self.stats["failures"] += 1
        return Failure(f"judge endpoint failed after {self.cfg.max_retries + 1} attempts: {last}")

    def _map(self, fn: Callable[[T], object], items: list[T]) -> list:
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.max_concurrency, len(items)))) as pool:
            return list(pool.map(fn, items))

    # -- the judge interface (same as LocalJudge) ----------------------------------
    def judge(self, items: list[tuple[str, str, str, int]]) -> list[Judgement | str]:
        return self.verdicts([prompts.judge_messages(query, prompt) for _, query, prompt, _ in items])

    def verdicts(self, messages_list: list[list[dict]]) -> list[Judgement | str]:
        """A verdict for each ready-made chat, or an error string; evaluation asks its own
        questions through this, so they get the same retries and parsing as the main verdict."""
        def one(messages):
            def call():
                parsed = prompts.parse_judgement(self._chat(messages))
                if isinstance(parsed, prompts.ParseFailure):
                    raise EndpointError(f"malformed judge output: {parsed.reason}")
                return Judgement(verdict=parsed.verdict, confidence=1.0, reasons=parsed.reasons)

            res = self._with_retries(call)
            return str(res) if isinstance(res, Failure) else res

        return self._map(one, messages_list)

    def refine(self, items: list[tuple[str, str, str, int, str]]) -> list[str]:
        def one(item):
            _, query, prompt, _, reasons = item
            judge_out = f"Step-by-step verification: {reasons}\n{prompts.JUDGE_ANSWER_PREFIX} No"

            def call():
                text = self._chat(prompts.refine_messages(query, prompt, judge_out))
                parsed = prompts.parse_refinement(text)
                if isinstance(parsed, prompts.ParseFailure):
                    raise EndpointError(f"malformed refinement: {parsed.reason}")
                return parsed.prompt

            res = self._with_retries(call)
            return "" if isinstance(res, Failure) else res

        return self._map(one, items)


def _retry_after(r: requests.Response) -> Optional[float]:
    v = r.headers.get("Retry-After")
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None
