"""`python -m vpo_ray.data.study FILE...`: what a query set looks like to ingest.

Per file: the ingest summary (queries, exact/near duplicates, errors) with its wall and CPU
seconds; then, over all files, how many queries each flag appears in, with a few examples
as written. Used to check the flag grammar against a new source before a run.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Iterable, Optional

from vpo_ray.data.clean import parse_query, strip_markup
from vpo_ray.data.flags import find_flags
from vpo_ray.data.ingest import ingest
from vpo_ray.data.readers import read_queries
from vpo_ray.schema import Flags


def flag_stats(raw_queries: Iterable[str], examples: int = 3) -> dict:
    """Per flag: how many queries set it, and a few examples of it as written."""
    counts: dict[str, int] = {}
    seen: dict[str, list] = {}
    changed = 0
    for raw in raw_queries:
        if not isinstance(raw, str):
            continue
        text, flags = parse_query(raw)
        changed += text != " ".join(raw.split())
        parsed = json.loads(flags.to_json())
        values = {**{k: v for k, v in parsed.items() if k != "extra"},
                  **{f"extra.{k}": v for k, v in parsed.get("extra", {}).items()}}
        for key, value in values.items():
            counts[key] = counts.get(key, 0) + 1
            if key in ("extra.message", "extra.font", "extra.seed") and len(seen.setdefault(key, [])) < examples:
                seen[key].append(str(value))  # not written as a -flag: show the value
        markup_free = strip_markup(raw, Flags())
        for f in find_flags(markup_free):
            key = "extra." + f.field[6:] if f.field.startswith("extra:") else f.field
            if len(seen.setdefault(key, [])) < examples:
                seen[key].append(" ".join(markup_free[f.start:f.end + (60 if f.field == "negative_prompt" else 0)]
                                          .split()))
    order = sorted(counts, key=lambda k: (-counts[k], k))
    return {"text_changed_by_cleaning": changed,
            "flags": {k: {"queries": counts[k], "examples": seen.get(k, [])} for k in order}}


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m vpo_ray.data.study FILE...`: ingest summary, timing and flag statistics."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--column", default="query")
    ap.add_argument("--threshold", type=float, default=0.85)
    ap.add_argument("--max-chars", type=int, default=2000)
    args = ap.parse_args(argv)
    raws: list = []
    for source in args.sources:
        rows = read_queries(source, args.column)
        raws += [v for _, v in rows]
        t0, c0 = time.perf_counter(), time.process_time()
        res = ingest(source, args.column, args.max_chars, args.threshold, rows=rows)
        print(json.dumps({"source": source, **res.summary(), "wall_s": round(time.perf_counter() - t0, 2),
                          "cpu_s": round(time.process_time() - c0, 2)}, ensure_ascii=False))
    if len(args.sources) > 1:
        t0, c0 = time.perf_counter(), time.process_time()
        res = ingest("(all)", rows=list(enumerate(raws)), max_chars=args.max_chars, near_dup_threshold=args.threshold)
        print(json.dumps({"source": "all combined", **res.summary(), "wall_s": round(time.perf_counter() - t0, 2),
                          "cpu_s": round(time.process_time() - c0, 2)}))
    stats = flag_stats(raws)
    print(f"text changed by cleaning: {stats['text_changed_by_cleaning']} of {len(raws)}")
    for key, st in stats["flags"].items():
        print(f"{st['queries']:6d}  {key:16s} {' | '.join(st['examples'])}"[:230])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
