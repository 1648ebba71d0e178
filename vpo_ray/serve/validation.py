"""Request checking for the HTTP API: pydantic models, and every rejection names its field.

No Ray and no FastAPI here, so the rules are unit-tested directly. A request goes
`parse_json_body` (bytes -> JSON object) -> a model below (`model_validate(doc,
context={"cfg": cfg})`: types, ranges, the config's limits) -> `OptimizeRequest`, the one
shape the model deployment is asked with. Status codes:

- 400 malformed JSON, or an OpenAI parameter this server does not support (`tools`,
  `logprobs: true`, a non-text `response_format`, ...): code `unsupported_parameter`;
- 413 a body over `max_body_bytes`;
- 422 a field of the wrong type, out of range, missing or unknown.

The error body is always `{"error": {"message", "type", "param", "code", "field"}}`: the
OpenAI client reads `message`/`type`/`param`/`code`; `field` (= `param`) is kept for
clients of the first version. Messages name fields, types and limits; they never repeat
text a caller sent (credentials included), only an out-of-range number or an unknown
field's name cut to 64 characters. Pydantic's own messages are not used for that reason.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vpo_ray.config import ServeConfig

MAX_SEED = 2 ** 63 - 1
MAX_MESSAGES = 256
MAX_STOP = 4  # OpenAI's limit on stop sequences
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """A request the API refuses; `body()` is the JSON error document."""

    def __init__(self, status: int, field: Optional[str], message: str, kind: str = "invalid_request_error",
                 headers: Optional[dict] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message
        self.kind = kind
        self.code = code or kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.field, "code": self.code,
                          "field": self.field}}


def invalid(field: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(422, field, message, code=code)


def unsupported(field: str, message: str) -> ApiError:
    return ApiError(400, field, message, code="unsupported_parameter")


@dataclass(frozen=True)
class OptimizeRequest:
    """A checked request, as the model deployment is asked (one per HTTP request)."""
    query: str
    n: int
    temperature: float
    top_p: float
    seed: Optional[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatOptions:
    """What shapes a chat answer rather than its generation."""
    model: str
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


# ---------------------------------------------------------------------------- JSON body

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes, max_body_bytes: int) -> dict:
    """Bytes -> JSON object, or ApiError (413 too big, 400 malformed, 422 not an object)."""
    if len(raw) > max_body_bytes:
        raise ApiError(413, "body", f"request body is {len(raw)} bytes; the limit is {max_body_bytes}",
                       code="body_too_large")
    if not raw.strip():
        raise ApiError(400, "body", "request body is empty; expected a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "body", f"request body is not UTF-8 (byte {e.start})", code="invalid_json") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        msg = f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) \
            else f"malformed JSON: {e}"
        raise ApiError(400, "body", msg, code="invalid_json") from None
    if not isinstance(doc, dict):
        raise invalid("body", f"expected a JSON object, got {json_type(doc)}", code="invalid_type")
    return doc


def json_type(v: Any) -> str:
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


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_query(value: str, max_chars: int) -> str:
    """The query as text the model can take; ValueError (no field name) when it cannot be.

    C0 control characters (NUL, ESC, ...) are replaced by spaces; lone UTF-16 surrogates
    (which JSON escapes can carry) are refused, since no tokenizer can encode them.
    """
    if len(value) > max_chars:
        raise ValueError(f"is {len(value)} characters; the limit is {max_chars}")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError("contains a lone UTF-16 surrogate (invalid Unicode)")
    text = unicodedata.normalize("NFC", _CONTROL.sub(" ", value)).strip()
    if not text:
        raise ValueError("is empty")
    return text


# ---------------------------------------------------------------------------- models

def _cfg(info) -> ServeConfig:
    return (info.context or {}).get("cfg") or ServeConfig()


def _between(v: Optional[float], lo: float, hi: float, lo_open: bool = False) -> Optional[float]:
    if v is not None and (v > hi or v < lo or (lo_open and v == lo)):
        raise ValueError(f"must be {'greater than' if lo_open else 'at least'} {lo} and at most {hi}, got {v}")
    return v


class _Strict(BaseModel):
    """JSON types as given (no "2" for 2, no 2.0 for an integer), unknown keys refused."""
    model_config = ConfigDict(extra="forbid", strict=True)


class _Seeded(_Strict):
    """Seed and temperature: every route that samples takes them."""
    temperature: Optional[float] = Field(None, description="0 = greedy; default: the server's")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="same seed, same answer (row j uses seed + j)")

    @field_validator("temperature")
    @classmethod
    def _temperature_limit(cls, v: Optional[float], info) -> Optional[float]:
        return _between(v, 0.0, _cfg(info).max_temperature)


class _Query(_Strict):
    """A route whose body names the query itself."""
    query: str = Field(description="the text-to-video query; flags such as `-ar 16:9` are parsed out")

    @field_validator("query")
    @classmethod
    def _clean(cls, v: str, info) -> str:
        return clean_query(v, _cfg(info).max_query_chars)


class _Sampling(_Seeded):
    """Sampling fields both /v1/optimize and /v1/chat/completions take."""
    n: int = Field(1, description="prompts to return (at most the server's max_n)")
    top_p: Optional[float] = Field(None, description="nucleus sampling mass, 0 < top_p <= 1")

    @field_validator("n")
    @classmethod
    def _n_limit(cls, v: int, info) -> int:
        _between(v, 1, _cfg(info).max_n)
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p_limit(cls, v: Optional[float]) -> Optional[float]:
        return _between(v, 0.0, 1.0, lo_open=True)

    def request(self, query: str, cfg: ServeConfig, max_new_tokens: Optional[int],
                stop: tuple[str, ...] = ()) -> OptimizeRequest:
        return OptimizeRequest(
            query=query, n=self.n, seed=self.seed, stop=stop,
            temperature=cfg.temperature if self.temperature is None else self.temperature,
            top_p=cfg.top_p if self.top_p is None else self.top_p,
            max_new_tokens=cfg.max_new_tokens if max_new_tokens is None else max_new_tokens)


class OptimizeBody(_Sampling, _Query):
    """`POST /v1/optimize`."""
    max_new_tokens: Optional[int] = Field(None, description="tokens per prompt (at most the server's limit)")

    @field_validator("max_new_tokens")
    @classmethod
    def _token_limit(cls, v: Optional[int], info) -> Optional[int]:
        return _between(v, 1, _cfg(info).max_new_tokens)


class RenderBody(_Seeded, _Query):
    """`POST /v1/render`: one prompt, one video."""
    video_seed: Optional[int] = Field(None, ge=0, le=2 ** 32 - 1)


class TextPart(BaseModel):
    """An OpenAI content part; only text parts carry a query."""
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if not isinstance(v, dict) or v.get("type") != "text" or not isinstance(v.get("text"), str):
            raise ValueError('must be a text part {"type": "text", "text": "..."}')
        return v


class ChatMessage(_Strict):
    role: Literal[CHAT_ROLES]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list] = None
    tool_call_id: Optional[str] = None

    def text(self) -> Optional[str]:
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content)
        return self.content


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str


# OpenAI parameters this server knows and refuses with 400 (an unknown key is a 422).
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "audio",
               "modalities", "prediction", "web_search_options", "reasoning_effort")


class ChatCompletionBody(_Sampling):
    """`POST /v1/chat/completions` (OpenAI): the last user message is the query."""
    model: Optional[str] = Field(None, description="the served model's id (GET /v1/models); default: it")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = Field(None, description="wins over max_tokens")
    stop: Optional[Union[str, list[str]]] = Field(None, description=f"up to {MAX_STOP} stop sequences")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[ResponseFormat] = Field(None, description="only {\"type\": \"text\"}")
    # accepted and ignored (they have no meaning for a prompt rewriter)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    # known to OpenAI, refused with 400 unless off (see unsupported_parameters)
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
    functions: Optional[list] = None
    function_call: Optional[Union[str, dict]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    audio: Optional[dict] = None
    modalities: Optional[list[str]] = None
    prediction: Optional[dict] = None
    web_search_options: Optional[dict] = None
    reasoning_effort: Optional[str] = None

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _token_limit(cls, v: Optional[int], info) -> Optional[int]:
        return _between(v, 1, _cfg(info).max_new_tokens)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: Union[str, list[str], None]) -> Optional[list[str]]:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > MAX_STOP or not all(stops)):
            raise ValueError(f"must hold 1 to {MAX_STOP} non-empty strings")
        return stops

    def unsupported_parameters(self) -> None:
        """400 for an OpenAI feature this server does not offer (off values pass)."""
        off = {"tools": [], "tool_choice": "none", "functions": [], "logprobs": False, "modalities": ["text"]}
        for key in UNSUPPORTED:
            value = getattr(self, key)
            if value is not None and value != off.get(key, object()):
                raise unsupported(key, f"'{key}' is not supported by this server (it returns text prompts only)")
        if self.response_format is not None and self.response_format.type != "text":
            raise unsupported("response_format", "'response_format' supports only {\"type\": \"text\"}")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options", "'stream_options' needs 'stream': true", code="invalid_value")

    def query(self) -> tuple[int, str]:
        """(index, text) of the last user message."""
        last = max((i for i, m in enumerate(self.messages) if m.role == "user"), default=None)
        if last is None:
            raise invalid("messages", "'messages' holds no user message (the last one is the query)")
        text = self.messages[last].text()
        if text is None:
            raise invalid(f"messages[{last}].content", f"'messages[{last}].content' is required for the query",
                          code="missing_required_parameter")
        return last, text


# ---------------------------------------------------------------------------- errors

_EXPECTED = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
             "bool_type": "a boolean", "list_type": "an array", "dict_type": "an object", "model_type": "an object",
             "model_attributes_type": "an object", "int_parsing": "an integer", "float_parsing": "a number"}
_BOUNDS = {"greater_than": "greater than {gt}", "greater_than_equal": "at least {ge}",
           "less_than": "less than {lt}", "less_than_equal": "at most {le}"}
# what a field of several shapes must be, when none of them fits
_UNION_HINTS = {"content": "must be a string or a list of text parts", "stop": "must be a string or a list of strings",
                "tool_choice": "must be a string or an object", "function_call": "must be a string or an object"}


def _field_path(loc: tuple, unknown_key: bool) -> tuple[str, bool]:
    """('messages', 0, 'content', 'list[TextPart]', 1) -> ('messages[0].content[1]', went through a union).

    `unknown_key`: the last part is a key the caller sent that no model has (extra_forbidden)."""
    path, via_union = "", False
    for k, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELD_NAMES or (unknown_key and k == len(loc) - 1):
            path += ("." if path else "") + part
        else:  # a union member's tag ('str', 'list[TextPart]'), not a key of the request
            via_union = True
    return path, via_union


def _message(err: dict, field: str, via_union: bool) -> tuple[str, str]:
    """(message, code) for one pydantic error, in words that never repeat the input."""
    kind, ctx = err["type"], err.get("ctx") or {}
    name = field.rsplit(".", 1)[-1].split("[")[0]
    if kind == "missing":
        return f"'{field}' is required", "missing_required_parameter"
    if kind == "extra_forbidden":
        return f"unknown field '{field}'", "unknown_parameter"
    if via_union and name in _UNION_HINTS and field.endswith(name):
        return f"'{field}' {_UNION_HINTS[name]}, got {json_type(err.get('input'))}", "invalid_type"
    if kind in _EXPECTED:
        return f"'{field}' must be {_EXPECTED[kind]}, got {json_type(err.get('input'))}", "invalid_type"
    if kind == "literal_error":
        return f"'{field}' must be one of {str(ctx.get('expected', '')).replace(chr(39), '')}", "invalid_value"
    if kind in _BOUNDS:
        return f"'{field}' must be {_BOUNDS[kind].format(**ctx)}, got {err.get('input')}", "invalid_value"
    if kind in ("too_short", "too_long"):
        return (f"'{field}' must hold {ctx.get('min_length', 1)} to "
                f"{ctx.get('max_length', MAX_MESSAGES)} items"), "invalid_value"
    if kind == "value_error":
        return f"'{field}' {ctx.get('error')}", "invalid_value"
    return f"'{field}' is invalid ({kind})", "invalid_value"


def _api_error(exc: ValidationError) -> ApiError:
    """The deepest error (a content part rather than the union around it) as a 422."""
    errors = exc.errors(include_url=False, include_context=True)
    located = [(*_field_path(tuple(e["loc"]), e["type"] == "extra_forbidden"), e) for e in errors]
    field, via_union, err = max(located, key=lambda t: t[0].count(".") + t[0].count("["))
    field = field or "body"
    if err["type"] == "extra_forbidden" and len(field) > 64:  # a caller's key: shown cut
        field = field[:64] + "..."
    message, code = _message(err, field, via_union)
    return invalid(field, message, code=code)


_FIELD_NAMES = {name for model in (OptimizeBody, RenderBody, ChatCompletionBody, ChatMessage, StreamOptions,
                                   ResponseFormat, TextPart) for name in model.model_fields}


def _validate(model: type[BaseModel], doc: dict, cfg: ServeConfig):
    try:
        return model.model_validate(doc, context={"cfg": cfg})
    except ValidationError as e:
        raise _api_error(e) from None


# ---------------------------------------------------------------------------- requests

def parse_optimize(doc: dict, cfg: ServeConfig) -> OptimizeRequest:
    """`POST /v1/optimize` body: {query, n?, seed?, temperature?, top_p?, max_new_tokens?}."""
    body = _validate(OptimizeBody, doc, cfg)
    return body.request(body.query, cfg, body.max_new_tokens)


def parse_chat(doc: dict, cfg: ServeConfig, served_model: str) -> tuple[OptimizeRequest, ChatOptions]:
    """OpenAI chat body -> (request for the last user message, how to answer)."""
    body = _validate(ChatCompletionBody, doc, cfg)
    body.unsupported_parameters()
    model = body.model if body.model is not None else served_model
    if model != served_model:
        # the requested name is not echoed: error bodies never repeat request values
        raise ApiError(404, "model", f"the requested model is not served here; this server serves "
                       f"'{served_model}' (GET /v1/models)", kind="invalid_request_error", code="model_not_found")
    i, text = body.query()
    try:
        query = clean_query(text, cfg.max_query_chars)
    except ValueError as e:
        raise invalid(f"messages[{i}].content", f"'messages[{i}].content' {e}") from None
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    req = body.request(query, cfg, limit, tuple(body.stop or ()))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return req, ChatOptions(model=model, stream=body.stream, include_usage=include_usage)


def parse_render(doc: dict, cfg: ServeConfig) -> tuple[OptimizeRequest, Optional[int]]:
    """`POST /v1/render` body: {query, seed?, temperature?, video_seed?}: one prompt, one video."""
    body = _validate(RenderBody, doc, cfg)
    req = OptimizeRequest(query=body.query, n=1, seed=body.seed, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature if body.temperature is None else body.temperature)
    return req, body.video_seed


def _inline(node: Any, defs: dict) -> Any:
    """A JSON schema with its `$ref`s to `$defs` replaced by the definitions (none recurse)."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.rsplit("/", 1)[1]], defs)
        return {k: _inline(val, defs) for k, val in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(x, defs) for x in node]
    return node


def request_schema(model: type[BaseModel]) -> dict:
    """OpenAPI `requestBody` for a route that parses its body itself (to keep 413/400 first)."""
    schema = model.model_json_schema()
    schema = _inline(schema, schema.get("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
