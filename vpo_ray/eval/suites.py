"""Test query sets for `vpo eval`: the built-in small sets and public prompt suites.

`cfg.queries` names one of:
  * "" or `builtin:NAME`: a set shipped in vpo_ray/eval/data/ (`tiny`: 12 hand-written
    queries, short and detailed, with flags, non-English, and 3 unsafe ones).
  * `SUITE` or `SUITE:SOURCE`: a public suite (SUITES below). SOURCE is a local file or
    folder, or a Hugging Face dataset id; without it the suite's default HF id is loaded.
    The text column is found among the suite's usual names unless `query_column` is set.
  * a path (json/jsonl/parquet/csv as `vpo generate` reads them, .txt one query a line, or a
    folder of .txt files) or `hf://name[:split]`.

Rows come back as (row number, raw text, category or None); `ingest` then cleans, parses
flags and dedups them exactly as for training data. Loading from the Hub needs network or
a populated cache: offline, the error says how to fetch the data elsewhere and pass a path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vpo_ray import storage
from vpo_ray.data.ingest import IngestError, read_queries

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN = {"tiny": "tiny_queries.jsonl"}


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    hf_id: Optional[str]  # default Hub dataset; None = a path must be given
    split: str = "train"
    hf_kwargs: tuple = ()  # extra load_dataset arguments, e.g. (("data_dir", "monetbench"),)
    columns: tuple[str, ...] = ("prompt", "text", "query", "caption")  # text column: first present wins
    category_columns: tuple[str, ...] = ("category", "dimension")


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("monetbench", "MonetBench, the VisionReward T2V prompt benchmark (the VPO paper's video-level test set)",
          "THUDM/VisionRewardDB-Video", split="test", hf_kwargs=(("data_dir", "monetbench"),),
          columns=("prompt", "prompt_en", "text", "caption", "query")),
    Suite("vbench", "VBench prompt suite: prompts/all_dimension.txt, a prompts_per_dimension/ folder "
          "(file name = dimension), or VBench_full_info.json", None,
          columns=("prompt_en", "prompt", "text"), category_columns=("dimension", "category")),
    Suite("t2v-safety", "T2V safety prompts: SafeSora-Eval by default, or a T2VSafetyBench folder of "
          "per-aspect .txt files (file name = aspect)", "PKU-Alignment/SafeSora-Eval", split="eval",
          columns=("prompt_text", "prompt", "text", "query"), category_columns=("category", "aspect", "harm_label")),
)}

_STRUCTURED = (".json", ".jsonl", ".ndjson", ".parquet", ".pq", ".csv", ".tsv")


@dataclass
class LoadedQueries:
    rows: list[tuple[int, Any, Optional[str]]]  # (row, raw value, category)
    name: str  # what was loaded, for the report ("builtin:tiny", "monetbench:THUDM/...", a path)
    column: Optional[str]


def describe() -> str:
    lines = [f"builtin:{k}  ({BUILTIN[k]})" for k in BUILTIN]
    lines += [f"{s.name}[:PATH|HF_ID]  {s.description}" + (f"; default {s.hf_id}" if s.hf_id else "")
              for s in SUITES.values()]
    return "\n".join(lines)


def load(spec: str, column: Optional[str] = None) -> LoadedQueries:
    """The raw queries named by `spec` (see the module docstring)."""
    spec = (spec or "").strip()
    if not spec or spec == "builtin":
        spec = "builtin:tiny"
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise IngestError(f"queries={spec}: no built-in set {name!r} (known: {', '.join(BUILTIN)})")
        return LoadedQueries(_read_file(str(DATA_DIR / BUILTIN[name]), (column or "query",), ("category",)),
                             spec, column or "query")
    name, _, source = spec.partition(":")
    if name in SUITES and not (source.startswith("//") or os.path.exists(spec)):  # not s3://, not a file
        return _load_suite(SUITES[name], source, column)
    if spec.startswith("hf://"):
        col = column or "query"
        return LoadedQueries([(r, v, None) for r, v in read_queries(spec, col)], spec, col)
    cols = (column,) if column else ("query", "prompt", "text")
    return LoadedQueries(_read_path(spec, cols, ("category",)), spec, column)


def _load_suite(suite: Suite, source: str, column: Optional[str]) -> LoadedQueries:
    cols = (column,) if column else suite.columns
    if source and (os.path.exists(source) or not storage.is_local(source) or source.startswith((".", "/", "~"))):
        return LoadedQueries(_read_path(source, cols, suite.category_columns), f"{suite.name}:{source}", column)
    hf_id = source or suite.hf_id
    if not hf_id:
        raise IngestError(f"queries={suite.name}: this suite has no Hugging Face default; give a path, e.g. "
                          f"queries={suite.name}:/data/VBench/prompts/all_dimension.txt ({suite.description})")
    return _load_hf(suite, hf_id, cols)


def _load_hf(suite: Suite, hf_id: str, cols: tuple[str, ...]) -> LoadedQueries:
    kwargs = dict(suite.hf_kwargs) if hf_id == suite.hf_id else {}
    where = ", ".join([hf_id] + [f"{k}={v}" for k, v in kwargs.items()] + [f"split {suite.split}"])
    try:
        import datasets

        ds = datasets.load_dataset(hf_id, split=suite.split, **kwargs)
    except Exception as e:  # offline, unknown id, gated: one message that says what to do
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = ("downloads are off (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached or the id is wrong")
        raise IngestError(
            f"cannot load suite {suite.name!r} from the Hugging Face Hub ({where}): {hint}. Fetch it where there is "
            f"network (`huggingface-cli download --repo-type dataset {hf_id} --local-dir DIR`) and pass the file: "
            f"queries={suite.name}:DIR/<file> (json/jsonl/parquet/csv/txt), or set HF_HOME to a cache holding it. "
            f"({type(e).__name__}: {str(e)[:200]})") from None
    col = next((c for c in cols if c in ds.column_names), None)
    if col is None:
        raise IngestError(f"suite {suite.name!r} ({where}): none of the columns {', '.join(cols)} "
                          f"(columns: {', '.join(ds.column_names)}); set query_column=NAME")
    cat = next((c for c in suite.category_columns if c in ds.column_names), None)
    texts = ds[col]
    cats = [_category(v) for v in ds[cat]] if cat else [None] * len(texts)
    return LoadedQueries([(i, t, c) for i, (t, c) in enumerate(zip(texts, cats))], f"{suite.name}:{hf_id}", col)


def _category(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or None
    return str(value)


def _read_path(path: str, cols: tuple[str, ...], cat_cols: tuple[str, ...]) -> list[tuple[int, Any, Optional[str]]]:
    local = storage.local_path(path) if storage.is_local(path) else None
    if local and os.path.isdir(local):
        files = sorted(Path(local).glob("*.txt"))
        if not files:
            raise IngestError(f"{path}: a folder without .txt prompt files")
        rows, n = [], 0
        for f in files:  # one file per dimension/aspect (VBench, T2VSafetyBench): the stem is the category
            for _, text in _read_txt(str(f)):
                rows.append((n, text, f.stem))
                n += 1
        return rows
    if path.lower().endswith(".txt"):
        return [(r, t, None) for r, t in _read_txt(path)]
    if not path.lower().endswith(_STRUCTURED):
        raise IngestError(f"{path}: unknown query file type (expected .txt, a folder of .txt, "
                          f"{', '.join(_STRUCTURED)}, or hf://name)")
    return _read_file(path, cols, cat_cols)


def _read_txt(path: str) -> list[tuple[int, str]]:
    try:
        text = storage.read_text(path)
    except (storage.StorageError, UnicodeDecodeError) as e:
        raise IngestError(f"{path}: cannot read: {e}") from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]


def _read_file(path: str, cols: tuple[str, ...], cat_cols: tuple[str, ...]) -> list[tuple[int, Any, Optional[str]]]:
    """A structured file through ingest.read_queries, with the first of `cols` it has."""
    last: Optional[IngestError] = None
    for col in cols:
        try:
            rows = read_queries(path, col)
        except IngestError as e:
            if f"'{col}'" not in str(e):  # not a missing-column problem: report it as is
                raise
            last = e
            continue
        texts = dict(rows)
        cats: dict[int, Optional[str]] = {}
        for cat in cat_cols:
            try:
                found = {r: _category(v) if isinstance(v, (str, int, float, list, tuple)) else None
                         for r, v in read_queries(path, cat)}
            except IngestError:
                continue
            if any(c is not None and c != texts.get(r) for r, c in found.items()):  # a list of plain strings has none
                cats = found
                break
        return [(r, v, cats.get(r)) for r, v in rows]
    raise IngestError(f"{path}: none of the columns {', '.join(cols)} found; set query_column=NAME ({last})")

