"""Python client of the `vpo serve` HTTP API.

    from vpo_ray.serve.client import OptimizerClient
    client = OptimizerClient("http://127.0.0.1:8000")          # token: arg or $VPO_SERVE_TOKEN
    client.optimize("a cat playing piano -ar 16:9", n=2)["prompts"]

503 (over capacity, or not answerable within the request's deadline), the other 408/429/5xx
answers and connection failures are retried under vpo_ray.http_retry's policy (the server's
Retry-After, capped, else jittered exponential backoff); `deadline_s` sends each request's
deadline (X-VPO-Deadline-S), so an overloaded server refuses it at once instead of queueing it
past that time; other 4xx answers raise `OptimizerClientError` at once with the
field and code the server named. Every call has a timeout. For /v1/chat/completions
any OpenAI client works too (`openai.OpenAI(base_url=URL + "/v1", api_key=TOKEN)`).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import requests

from vpo_ray.http_retry import RetryPolicy, Retryable, call_with_retries, retry_after_s, retryable_status


class OptimizerClientError(RuntimeError):
    """The server refused a request (or retries ran out); `status`, `field`, `code` as the server said."""

    def __init__(self, status: Optional[int], message: str, field: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(f"{status}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.field = field
        self.code = code  # e.g. invalid_value, unsupported_parameter, invalid_api_key
        self.message = message


class OptimizerClient:
    def __init__(self, base_url: str, token: Optional[str] = None, timeout_s: float = 60.0,
                 max_retries: int = 4, backoff_s: float = 0.5, max_retry_after_s: float = 30.0,
                 token_env: str = "VPO_SERVE_TOKEN", session: Optional[requests.Session] = None,
                 deadline_s: Optional[float] = None):
        self.base_url = base_url.rstrip("/")
        self.deadline_s = deadline_s  # None: the server's default deadline
        self.token = token if token is not None else os.environ.get(token_env)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.session = session or requests.Session()

    # -- API

    def optimize(self, query: str, n: int = 1, seed: Optional[int] = None, temperature: Optional[float] = None,
                 **extra: Any) -> dict:
        """POST /v1/optimize -> {prompts, query, text, flags, latency_ms, model, model_version, ...}."""
        body = {"query": query, "n": n, **extra}
        if seed is not None:
            body["seed"] = seed
        if temperature is not None:
            body["temperature"] = temperature
        return self._request("POST", "/v1/optimize", body)

    def chat(self, messages: list[dict], **params: Any) -> dict:
        """POST /v1/chat/completions (OpenAI shape)."""
        return self._request("POST", "/v1/chat/completions", {"messages": messages, **params})

    def models(self) -> dict:
        return self._request("GET", "/v1/models")

    def health(self) -> bool:
        try:
            r = self.session.get(self.base_url + "/healthz", timeout=min(self.timeout_s, 10.0))
            return r.status_code == 200
        except requests.RequestException:
            return False

    # -- plumbing

    def _request(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if self.deadline_s is not None:
            headers["X-VPO-Deadline-S"] = f"{self.deadline_s:g}"

        def attempt() -> dict:
            try:
                response = self.session.request(method, self.base_url + path, json=body, headers=headers,
                                                timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as e:
                raise Retryable(f"{type(e).__name__}: {e}") from None
            if response.status_code < 400:
                return response.json()
            field, message, code = _error_of(response)
            if not retryable_status(response.status_code):
                raise OptimizerClientError(response.status_code, message, field, code)
            raise Retryable(message, retry_after_s(response.headers), response.status_code)

        try:
            return call_with_retries(attempt, RetryPolicy(self.max_retries, self.backoff_s, self.max_retry_after_s))
        except Retryable as e:
            raise OptimizerClientError(e.status, f"gave up after {self.max_retries + 1} attempts: {e}") from None


def _error_of(response: requests.Response) -> tuple[Optional[str], str, Optional[str]]:
    """(field, message, code) of an error answer (validation.ApiError's body)."""
    try:
        err = response.json().get("error", {})
        return err.get("param", err.get("field")), str(err.get("message", response.reason)), err.get("code")
    except (ValueError, AttributeError):
        return None, (response.text or response.reason or "")[:500], None
