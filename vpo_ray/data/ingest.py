"""Raw user queries in, clean `schema.Query` rows out: read, validate, clean, parse flags, dedup.

`ingest()` accounts for every input row: it ends in exactly one of `queries`,
`duplicates` or `errors` (`input_count == len(queries) + len(duplicates) + len(errors)`).
Each step is its own module: `readers` (files -> (row, raw value)), `validate` (raw value
-> str or Invalid), `clean` (str -> cleaned text + Flags, the flag grammar in `flags`).

Identity and dedup: `query_id` = `schema.query_id(cleaned text)`, so case, spacing, edge
punctuation and flags do not make two queries different (`a cat -ar 16:9` == `A cat`).
Exact duplicates share an id; near duplicates are found with MinHash + LSH (see
`vpo_ray.data.minhash.near_duplicates`). The first occurrence (in source order) is kept.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from vpo_ray import schema
from vpo_ray.data.clean import parse_query
from vpo_ray.data.minhash import near_duplicates
from vpo_ray.data.readers import IngestError, read_queries
from vpo_ray.data.validate import Invalid, validate_raw

# The names callers import from here (`from vpo_ray.data.ingest import parse_query`).
__all__ = ["IngestError", "IngestResult", "Invalid", "ingest", "parse_query", "read_queries", "validate_raw"]


@dataclass
class IngestResult:
    queries: list[dict] = field(default_factory=list)  # schema.Query rows, source order
    # {query_id, duplicate_of, kind: exact|near, source_row, query, similarity}; an exact
    # duplicate's query_id is the kept row's id (same cleaned text), a near one's its own.
    duplicates: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # schema.error_row(id, "ingest", reason, "row N: ...")
    input_count: int = 0  # rows taken (after `limit`); == len(queries)+len(duplicates)+len(errors)
    source_count: int = 0  # rows in the source before `limit`

    def summary(self) -> dict:
        kinds = [d["kind"] for d in self.duplicates]
        return {"source_rows": self.source_count, "input": self.input_count, "queries": len(self.queries),
                "exact_duplicates": kinds.count("exact"), "near_duplicates": kinds.count("near"),
                "errors": len(self.errors)}


def _raw_id(row: int, raw: Any) -> str:
    """An id for a row with no usable text: from its row number and raw repr."""
    return schema.query_id(f"row {row}: {ascii(raw)[:2000]}")


def ingest(source: str, column: str = "query", max_chars: int = 2000, near_dup_threshold: float = 0.85,
           seed: int = 0, limit: Optional[int] = None, rows: Optional[Iterable[tuple[int, Any]]] = None
           ) -> IngestResult:
    """Read, validate, clean and dedup the queries of `source` (see read_queries).

    `limit`: shuffle the rows with `random.Random(seed)`, take the first `limit`, then put
    those back in source order (so "first occurrence" still means first in the file).
    `rows`: already-read (row, raw) pairs instead of reading `source` (tests, Ray blocks).
    """
    taken = list(rows) if rows is not None else read_queries(source, column)
    result = IngestResult(source_count=len(taken))
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        random.Random(seed).shuffle(taken)
        taken = sorted(taken[:limit], key=lambda r: r[0])
    result.input_count = len(taken)

    kept: list[dict] = []
    first_of: dict[str, dict] = {}
    for row, raw in taken:
        value = validate_raw(raw, row, max_chars)
        if isinstance(value, Invalid):
            result.errors.append(schema.error_row(_raw_id(row, raw), "ingest", value.reason, value.message))
            continue
        try:
            text, flags = parse_query(value)
        except Exception as e:  # parse_query is meant not to raise; if it does, the row says so
            result.errors.append(schema.error_row(_raw_id(row, raw), "ingest", "cleaning failed",
                                                  f"row {row}: cleaning failed: {type(e).__name__}: {e}"))
            continue
        if not text:
            result.errors.append(schema.error_row(_raw_id(row, raw), "ingest", "nothing left after cleaning",
                                                  f"row {row}: nothing left after cleaning "
                                                  f"(only flags/markup: {value[:80]!r})"))
            continue
        qid = schema.query_id(text)
        if qid in first_of:
            result.duplicates.append({"query_id": qid, "duplicate_of": qid, "kind": "exact", "source_row": row,
                                      "query": value, "similarity": 1.0})
            continue
        q = schema.Query(query_id=qid, query=value, text=text, flags_json=flags.to_json(), source_row=row).to_row()
        first_of[qid] = q
        kept.append(q)

    near = near_duplicates([q["text"] for q in kept], near_dup_threshold)
    for i, q in enumerate(kept):
        if i in near:
            j, sim = near[i]
            result.duplicates.append({"query_id": q["query_id"], "duplicate_of": kept[j]["query_id"], "kind": "near",
                                      "source_row": q["source_row"], "query": q["query"], "similarity": round(sim, 4)})
        else:
            result.queries.append(q)
    result.duplicates.sort(key=lambda d: d["source_row"])
    assert result.input_count == len(result.queries) + len(result.duplicates) + len(result.errors)
    return result
