"""The records of vpo_ray, named once (ARCHITECTURE.md, "Records").

Rows travel through Ray Data as flat dicts of arrow-friendly values. Nested values
whose fields vary (flags, judge output, checklist answers, scores) travel as JSON
strings in columns ending in `_json`, so blocks never disagree on an inferred arrow
type; `decode_row` turns them back into Python objects. Training sets (SFT, DPO) use
TRL's conversational columns (`messages`, `prompt`/`chosen`/`rejected`) unencoded.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

# Stage names, as they appear in errors.jsonl and summary.json.
STAGES = ("ingest", "rewrite", "critique", "refine", "render", "video_judge", "pairs", "train", "serve")


def normalise_text(text: str) -> str:
    """Form used for ids and exact dedup: NFKC, lower case, single spaces, no edge punctuation."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = re.sub(r"\s+", " ", t).strip()
    return t.strip(" .,;:!?\"'")


def query_id(text: str) -> str:
    """Stable id of a query: sha1 of its normalised cleaned text (16 hex chars)."""
    return hashlib.sha1(normalise_text(text).encode("utf-8")).hexdigest()[:16]


@dataclass
class Flags:
    """Midjourney/Pika-style options parsed out of a raw query."""
    aspect_ratio: Optional[str] = None  # "16:9"
    negative_prompt: Optional[str] = None
    camera: Optional[str] = None  # "zoom in", "pan left"
    motion: Optional[int] = None
    seed: Optional[int] = None
    fps: Optional[int] = None
    guidance: Optional[float] = None
    extra: dict = field(default_factory=dict)  # unknown -flags kept verbatim

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, {})}, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "Flags":
        return cls(**json.loads(text)) if text else cls()


@dataclass
class Query:
    query_id: str
    query: str  # as given
    text: str  # cleaned, flags removed
    flags_json: str = "{}"
    source_row: int = -1  # row number in the input file, for error messages

    def to_row(self) -> dict:
        return asdict(self)


@dataclass
class Judgement:
    verdict: bool  # True = passes all three principles
    confidence: float  # P(verdict) from the forced Yes/No choice, or 1.0 for parsed endpoint output
    reasons: str  # the judge's step-by-step analysis
    truncated: bool = False  # the critique hit its token limit and was kept (truncation=keep)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass
class Candidate:
    query_id: str
    sample_idx: int
    prompt: str  # the optimizer's rewrite
    judge_json: str = ""  # Judgement as JSON; "" before critique
    refined: Optional[str] = None  # the judge's refinement of a rejected prompt

    def to_row(self) -> dict:
        return asdict(self)


@dataclass
class ChecklistAnswer:
    id: str
    answer: bool
    p_yes: float


@dataclass
class Video:
    query_id: str
    sample_idx: int
    seed: int
    model: str
    video_uri: str
    frames: int
    fps: int
    prompt: str = ""
    checklist_json: str = "[]"  # list[ChecklistAnswer] as JSON
    score: float = 0.0

    def to_row(self) -> dict:
        return asdict(self)


def error_row(query_id: str, stage: str, reason: str, detail: str = "") -> dict:
    """An input id that did not make it, and why. `reason` is short and groupable."""
    assert stage in STAGES, stage
    return {"query_id": query_id, "stage": stage, "reason": reason, "error": detail or reason}


def _turns(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def sft_row(query_id: str, prompt: list[dict], assistant: str, truncated: bool = False) -> dict:
    """`prompt`: the optimizer's chat (prompts.optimizer_messages); `truncated`: a text in the
    row was cut at its token limit and kept (GenerateConfig.truncation=keep)."""
    return {"query_id": query_id, "messages": _turns(prompt) + [{"role": "assistant", "content": assistant}],
            "truncated": bool(truncated)}


def dpo_row(query_id: str, prompt: list[dict], chosen: str, rejected: str, source: str,
            scores: Optional[dict] = None, truncated: bool = False) -> dict:
    assert source in ("text", "video"), source
    return {
        "query_id": query_id,
        "prompt": _turns(prompt),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "source": source,
        "scores_json": json.dumps(scores or {}, sort_keys=True),
        "truncated": bool(truncated),
    }


def video_dpo_row(query_id: str, sample_idx: int, prompt: str, model: str, chosen: dict, rejected: dict,
                  scores: Optional[dict] = None) -> dict:
    """One row of the video preference set (`vpo train video-dpo`): two videos of one prompt.

    Diffusion-DPO conditions both videos on one text, so a pair is two seeds of the same
    prompt, rendered by `model`. `chosen`/`rejected` are {"seed", "video_uri", "latents_uri",
    "score"}: the latents (safetensors, the renderer's denoised output: what training reads)
    sit beside the mp4 (what people watch). URIs are relative to the set's folder when
    the files are under it, so a run folder can move.
    """
    row = {"query_id": query_id, "sample_idx": int(sample_idx), "prompt": prompt, "model": model}
    for side, video in (("chosen", chosen), ("rejected", rejected)):
        row[f"{side}_seed"] = int(video["seed"])
        row[f"{side}_video"] = str(video["video_uri"])
        row[f"{side}_latents"] = str(video["latents_uri"])
        row[f"{side}_score"] = float(video["score"])
    row["scores_json"] = json.dumps(scores or {}, sort_keys=True)
    return row


SFT_COLUMNS = ("query_id", "messages", "truncated")
DPO_COLUMNS = ("query_id", "prompt", "chosen", "rejected", "source", "scores_json", "truncated")
ERROR_COLUMNS = ("query_id", "stage", "reason", "error")
VIDEO_DPO_COLUMNS = ("query_id", "sample_idx", "prompt", "model", "chosen_seed", "chosen_video", "chosen_latents",
                     "chosen_score", "rejected_seed", "rejected_video", "rejected_latents", "rejected_score",
                     "scores_json")


def arrow_schema(kind: str):
    """Arrow schema of the SFT or DPO set (explicit, so an empty set still has columns)."""
    import pyarrow as pa

    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    if kind == "sft":
        return pa.schema([("query_id", pa.string()), ("messages", msgs), ("truncated", pa.bool_())])
    if kind == "dpo":
        return pa.schema([("query_id", pa.string()), ("prompt", msgs), ("chosen", msgs), ("rejected", msgs),
                          ("source", pa.string()), ("scores_json", pa.string()), ("truncated", pa.bool_())])
    if kind == "video_dpo":
        types = {"sample_idx": pa.int64(), "chosen_seed": pa.int64(), "rejected_seed": pa.int64(),
                 "chosen_score": pa.float64(), "rejected_score": pa.float64()}
        return pa.schema([(c, types.get(c, pa.string())) for c in VIDEO_DPO_COLUMNS])
    raise ValueError(f"no arrow schema for {kind!r}")


def decode_row(row: dict) -> dict:
    """Replace every `x_json` column by `x` holding the decoded value."""
    out = {}
    for k, v in row.items():
        if k.endswith("_json") and isinstance(v, str):
            out[k[:-5]] = json.loads(v) if v else None
        else:
            out[k] = v
    return out


def validate_columns(row: dict, required: tuple[str, ...], where: str) -> None:
    missing = [c for c in required if c not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")


def as_jsonable(value: Any) -> Any:
    """numpy/arrow values -> plain Python for json.dumps."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: as_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_jsonable(v) for v in value]
    return value
