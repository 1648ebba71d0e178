"""Is a raw value usable as a query? `validate_raw` says yes (the str) or why not (`Invalid`).

A reader hands over whatever a record held (str, bytes, None, a number, or an `Unreadable`
marker for a record it could not decode); validation turns each into a str or an `Invalid`
whose message names the row, so ingest can write one error row per bad record.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Union

@dataclass(frozen=True)
class Invalid:
    """A row that cannot be a query. `reason` is short and groupable, `message` names the row."""
    reason: str
    message: str

    def __bool__(self) -> bool:  # falsy, like prompts.ParseFailure
        return False


@dataclass(frozen=True)
class Unreadable:
    """A record the reader could not turn into a value (bad JSON line, missing field)."""
    reason: str
    detail: str


def validate_raw(value: Any, row: int, max_chars: int) -> Union[str, Invalid]:
    """The raw query as a str, or `Invalid` saying why row `row` cannot be used."""
    def bad(reason: str, extra: str = "") -> Invalid:
        return Invalid(reason, f"row {row}: {reason}{extra}")

    if isinstance(value, Unreadable):
        return bad(value.reason, f" ({value.detail})" if value.detail else "")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return bad("invalid UTF-8", f" (byte {e.start})")
    if value is None:
        return bad("missing query (null)")
    if not isinstance(value, str):
        return bad("query is not a string", f" (got {type(value).__name__}: {str(value)[:60]!r})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return bad("invalid UTF-8", f" (lone surrogate at character {e.start})")
    if not value.strip():
        return bad("empty query")
    if len(value) > max_chars:
        return bad("query too long", f" ({len(value)} > {max_chars} characters)")
    if "\x00" in value:
        return bad("binary data", " (contains NUL)")
    unprintable = sum(1 for ch in value if ch == "\ufffd" or (unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn")
                                                                and ch not in "\n\t\r"))
    if unprintable > max(2, len(value) // 10):
        return bad("binary data", f" ({unprintable} of {len(value)} characters are control/unprintable)")
    return value
