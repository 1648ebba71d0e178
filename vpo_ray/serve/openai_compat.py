"""OpenAI shapes of the answers: chat completions (whole or as server-sent events) and models.

The official `openai` client reads these (tests/test_serve_openai.py drives it). A chat
choice's `content` is the optimized prompt (parsed from the model's completion, as
/v1/optimize returns it) and `finish_reason` is the engine's: "length" when the token
limit cut the completion. With `stream: true` the same completion goes out as SSE
chunks once it is finished: the prompt is parsed from the whole completion, so there
is nothing correct to send earlier (time to first chunk = time to the whole answer).
Our own fields ride along under `vpo` (query text, flags, fallbacks, model version).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Iterator


def usage(out: dict) -> dict:
    completion = sum(out["completion_tokens"])
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": completion,
            "total_tokens": out["prompt_tokens"] + completion}


def chat_completion(result: dict, out: dict, model: str, latency_ms: float) -> dict:
    """The `chat.completion` object for one optimized request (`result` from the ingress)."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": out["model_version"],
        "choices": [{"index": i, "message": {"role": "assistant", "content": prompt, "refusal": None},
                     "finish_reason": reason, "logprobs": None}
                    for i, (prompt, reason) in enumerate(zip(result["prompts"], out["finish_reasons"]))],
        "usage": usage(out),
        "vpo": {"text": result["text"], "flags": result["flags"], "fallbacks": result["fallbacks"],
                "model_version": out["model_version"], "latency_ms": latency_ms},
    }


def _event(doc) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


def chat_chunks(completion: dict, include_usage: bool) -> Iterator[str]:
    """A finished `chat.completion` as `chat.completion.chunk` SSE events, then `[DONE]`.

    Per choice: the role, the content, then an empty delta with the finish reason. With
    `include_usage` every chunk has `usage: null` and a last chunk with no choices
    carries the counts (OpenAI's `stream_options.include_usage`).
    """
    head = {k: completion[k] for k in ("id", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk"
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish_reason=None) -> str:
        return _event({**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                                            "logprobs": None}], **extra})

    for choice in completion["choices"]:
        i = choice["index"]
        yield chunk(i, {"role": "assistant", "content": ""})
        yield chunk(i, {"content": choice["message"]["content"]})
        yield chunk(i, {}, choice["finish_reason"])
    if include_usage:
        yield _event({**head, "choices": [], "usage": completion["usage"]})
    yield "data: [DONE]\n\n"


def model_card(name: str, version: str) -> dict:
    """One entry of GET /v1/models (`version`: our fingerprint of the weights)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "vpo_ray", "version": version}
