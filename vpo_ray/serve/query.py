"""Query in, model output out: the two text touches of the serving path.

`split_query` is ingest's `parse_query` (flags such as `-ar 16:9`, `-neg blur` leave the
text and land in `schema.Flags`), so a served query is cleaned exactly like a training
query. `clean_output` drops what a decoder can emit but a prompt must not carry.
"""
from __future__ import annotations

import re

from vpo_ray.schema import Flags


def split_query(raw: str) -> tuple[str, Flags]:
    """(cleaned text, Flags) — vpo_ray.data.ingest.parse_query, or plain text without it."""
    try:
        from vpo_ray.data.ingest import parse_query
    except ModuleNotFoundError as e:  # a build without the data package: no flag parsing
        if not (e.name or "").startswith("vpo_ray.data"):
            raise
        return " ".join(raw.split()), Flags()
    return parse_query(raw)


_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")


def clean_output(text: str) -> str:
    """Decoded completion without control characters or U+FFFD (split byte sequences)."""
    return _BAD_CHARS.sub("", text or "").strip()
