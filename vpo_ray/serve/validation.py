"""Request checking for the HTTP API: every rejection names the field at fault.

Pure Python (no Ray, no FastAPI) so the rules are unit-tested directly. Status codes:
400 malformed JSON, 413 body over `max_body_bytes`, 422 a field of the wrong type, out of
range, missing or unknown. The error body is always
`{"error": {"field": ..., "message": ..., "type": ..., "param": ...}}` (`param` and
`type` make it read as an OpenAI error too). Messages name fields, types and limits; they
never repeat text a caller sent (credentials included), only an out-of-range number or an
unknown field's name cut to 64 characters.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Optional

from vpo_ray.config import ServeConfig

MAX_SEED = 2 ** 63 - 1
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """A request the API refuses; `body()` is the JSON error document."""

    def __init__(self, status: int, field: Optional[str], message: str, kind: str = "invalid_request_error",
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message, "type": self.kind, "param": self.field}}


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, field, message)


@dataclass(frozen=True)
class OptimizeRequest:
    query: str
    n: int
    temperature: float
    top_p: float
    seed: Optional[int]
    max_new_tokens: int


# ---------------------------------------------------------------------------- JSON body

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes, max_body_bytes: int) -> dict:
    """Bytes -> JSON object, or ApiError (413 too big, 400 malformed, 422 not an object)."""
    if len(raw) > max_body_bytes:
        raise ApiError(413, "body", f"request body is {len(raw)} bytes; the limit is {max_body_bytes}")
    if not raw.strip():
        raise ApiError(400, "body", "request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "body", f"request body is not UTF-8 (byte {e.start})") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        msg = f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) \
            else f"malformed JSON: {e}"
        raise ApiError(400, "body", msg) from None
    if not isinstance(doc, dict):
        raise ApiError(422, "body", f"expected a JSON object, got {_json_type(doc)}")
    return doc


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


# ---------------------------------------------------------------------------- fields

def _check_unknown(doc: dict, known: tuple[str, ...], prefix: str = "") -> None:
    for k in doc:
        if k not in known:
            shown = k if len(k) <= 64 else k[:64] + "..."
            raise invalid(prefix + shown, f"unknown field '{shown}' (known: {', '.join(known)})")


def _int(doc: dict, key: str, default: Optional[int], lo: int, hi: int, field: Optional[str] = None) -> Optional[int]:
    field = field or key
    v = doc.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise invalid(field, f"'{field}' must be an integer, got {_json_type(v)}")
    v = int(v)
    if not lo <= v <= hi:
        raise invalid(field, f"'{field}' must be between {lo} and {hi}, got {v}")
    return v


def _float(doc: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = doc.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise invalid(key, f"'{key}' must be a number, got {_json_type(v)}")
    v = float(v)
    if v > hi or v < lo or (lo_open and v == lo):
        bound = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise invalid(key, f"'{key}' must be {bound} and at most {hi}, got {v}")
    return v


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_query(value: Any, field: str, max_chars: int) -> str:
    """The query as text the model can take: a non-empty string within the length limit.

    C0 control characters (NUL, ESC, ...) are replaced by spaces; lone UTF-16 surrogates
    (which JSON escapes can carry) are refused, since no tokenizer can encode them.
    """
    if not isinstance(value, str):
        raise invalid(field, f"'{field}' must be a string, got {_json_type(value)}")
    if len(value) > max_chars:
        raise invalid(field, f"'{field}' is {len(value)} characters; the limit is {max_chars}")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise invalid(field, f"'{field}' contains a lone UTF-16 surrogate (invalid Unicode)")
    text = unicodedata.normalize("NFC", _CONTROL.sub(" ", value)).strip()
    if not text:
        raise invalid(field, f"'{field}' is empty")
    return text


def parse_optimize(doc: dict, cfg: ServeConfig) -> OptimizeRequest:
    """`POST /v1/optimize` body: {query, n?, seed?, temperature?, top_p?, max_new_tokens?}."""
    _check_unknown(doc, ("query", "n", "seed", "temperature", "top_p", "max_new_tokens"))
    if "query" not in doc or doc["query"] is None:
        raise invalid("query", "'query' is required")
    return OptimizeRequest(
        query=clean_query(doc["query"], "query", cfg.max_query_chars),
        n=_int(doc, "n", 1, 1, cfg.max_n),
        temperature=_float(doc, "temperature", cfg.temperature, 0.0, cfg.max_temperature),
        top_p=_float(doc, "top_p", cfg.top_p, 0.0, 1.0, lo_open=True),
        seed=_int(doc, "seed", None, 0, MAX_SEED),
        max_new_tokens=_int(doc, "max_new_tokens", cfg.max_new_tokens, 1, cfg.max_new_tokens),
    )


# ---------------------------------------------------------------------------- chat

CHAT_FIELDS = ("model", "messages", "n", "temperature", "top_p", "seed", "max_tokens", "max_completion_tokens",
               "stream", "user")


def _message_text(msg: Any, i: int) -> tuple[str, Optional[str]]:
    field = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise invalid(field, f"'{field}' must be an object, got {_json_type(msg)}")
    _check_unknown(msg, ("role", "content", "name", "tool_calls", "tool_call_id"), prefix=field + ".")
    role = msg.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise invalid(field + ".role", f"'{field}.role' must be one of {', '.join(CHAT_ROLES)}")
    content = msg.get("content")
    if content is None:
        return role, None
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):  # OpenAI content parts: only text parts carry a query
        texts = []
        for j, part in enumerate(content):
            pf = f"{field}.content[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(pf, f"'{pf}' must be a text part {{\"type\": \"text\", \"text\": \"...\"}}")
            texts.append(part["text"])
        return role, "\n".join(texts)
    raise invalid(field + ".content", f"'{field}.content' must be a string or a list of text parts")


def parse_chat(doc: dict, cfg: ServeConfig, served_model: str) -> tuple[OptimizeRequest, str]:
    """OpenAI chat body -> (request for the last user message, model id to answer with)."""
    _check_unknown(doc, CHAT_FIELDS)
    model = doc.get("model", served_model)
    if not isinstance(model, str):
        raise invalid("model", f"'model' must be a string, got {_json_type(model)}")
    if model != served_model:
        # the requested name is not echoed: error bodies never repeat request values
        raise ApiError(404, "model", f"the requested model is not served here; this server serves "
                       f"'{served_model}' (GET /v1/models)", kind="model_not_found")
    if doc.get("stream") not in (None, False):
        raise invalid("stream", "'stream' must be false: streaming is not supported")
    if doc.get("user") is not None and not isinstance(doc["user"], str):
        raise invalid("user", "'user' must be a string")
    messages = doc.get("messages")
    if messages is None:
        raise invalid("messages", "'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty array")
    if len(messages) > 256:
        raise invalid("messages", "'messages' holds more than 256 messages")
    query_at = None
    for i, msg in enumerate(messages):
        role, text = _message_text(msg, i)
        if role == "user":
            query_at = (i, text)
    if query_at is None:
        raise invalid("messages", "'messages' holds no user message (the last one is the query)")
    i, text = query_at
    if text is None:
        raise invalid(f"messages[{i}].content", f"'messages[{i}].content' is required for the query")
    max_tok = _int(doc, "max_completion_tokens", None, 1, cfg.max_new_tokens)
    if max_tok is None:
        max_tok = _int(doc, "max_tokens", cfg.max_new_tokens, 1, cfg.max_new_tokens)
    req = OptimizeRequest(
        query=clean_query(text, f"messages[{i}].content", cfg.max_query_chars),
        n=_int(doc, "n", 1, 1, cfg.max_n),
        temperature=_float(doc, "temperature", cfg.temperature, 0.0, cfg.max_temperature),
        top_p=_float(doc, "top_p", cfg.top_p, 0.0, 1.0, lo_open=True),
        seed=_int(doc, "seed", None, 0, MAX_SEED),
        max_new_tokens=max_tok,
    )
    return req, model


# ---------------------------------------------------------------------------- render jobs

def parse_render(doc: dict, cfg: ServeConfig) -> tuple[OptimizeRequest, Optional[int]]:
    """`POST /v1/render` body: {query, seed?, temperature?, video_seed?}: one prompt, one video."""
    _check_unknown(doc, ("query", "seed", "temperature", "video_seed"))
    if "query" not in doc or doc["query"] is None:
        raise invalid("query", "'query' is required")
    req = OptimizeRequest(
        query=clean_query(doc["query"], "query", cfg.max_query_chars), n=1,
        temperature=_float(doc, "temperature", cfg.temperature, 0.0, cfg.max_temperature),
        top_p=cfg.top_p, seed=_int(doc, "seed", None, 0, MAX_SEED), max_new_tokens=cfg.max_new_tokens,
    )
    return req, _int(doc, "video_seed", None, 0, 2 ** 32 - 1)
