"""Query in, model output out: the two text touches of the serving path.

`split_query` is ingest's `parse_query` (flags such as `-ar 16:9`, `-neg blur` leave the
text and land in `schema.Flags`), so a served query is cleaned exactly like a training
query. `clean_output` drops what a decoder can emit but a prompt must not carry.
"""
from __future__ import annotations

import re

from vpo_ray.data.clean import parse_query
from vpo_ray.schema import Flags


def split_query(raw: str) -> tuple[str, Flags]:
    """(cleaned text, Flags), exactly as ingest cleans a training query."""
    return parse_query(raw)


_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")


def clean_output(text: str) -> str:
    """Decoded completion without control characters or U+FFFD (split byte sequences)."""
    return _BAD_CHARS.sub("", text or "").strip()
