"""Query files in, (row, raw value) pairs out: JSON, JSONL, CSV/TSV, Parquet, `hf://` datasets.

A whole-file problem (missing, not UTF-8, not JSON, no such column) raises `IngestError`
naming the path and the spot; a per-record problem (one bad JSONL line, an object without
the column) comes back as a `validate.Unreadable` value for validation to turn into an
error row, so one bad line never costs the rest of the file.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

from vpo_ray import storage
from vpo_ray.data.validate import Unreadable


class IngestError(ValueError):
    """A query source cannot be read; the message names the path (and row) and the problem."""


def _decode(data: bytes, source: str) -> str:
    """UTF-8 text of a file (a BOM is fine); anything else raises IngestError naming the spot."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise IngestError(f"{source}: invalid UTF-16 at byte {e.start}") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise IngestError(f"{source}: not UTF-8 text (NUL byte at byte {nul}, line {line}); "
                          "UTF-16 without a BOM? Save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise IngestError(f"{source}: not valid UTF-8 (byte {e.start}, line {line}: "
                          f"{data[max(0, e.start - 20):e.start + 5]!r}); latin-1/cp1252? Save it as UTF-8") from None


def _pick(record: Any, column: str) -> Any:
    if isinstance(record, dict):
        if column not in record:
            return Unreadable(f"object has no '{column}' field", f"fields: {', '.join(map(str, list(record)[:8]))}")
        return record[column]
    return record


def _check_column(rows: list[tuple[int, Any]], source: str, column: str) -> None:
    """A file of objects none of which has `column` is the wrong column, not N row errors."""
    objects = [v for _, v in rows if isinstance(v, dict)]
    if objects and not any(column in o for o in objects):
        seen = sorted({str(k) for o in objects[:100] for k in o})
        raise IngestError(f"{source}: no '{column}' field in any record (fields: {', '.join(seen[:12])})")


def _read_json(text: str, source: str, column: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one value per line: it is JSONL named .json
            return _read_jsonl(text, source, column)
        raise IngestError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:  # json's C decoder recurses per nesting level
        raise IngestError(f"{source}: JSON nested too deeply to read (expected a flat list of strings "
                          f"or of objects with '{column}')") from None
    if not isinstance(data, list):
        raise IngestError(f"{source}: JSON top level is {type(data).__name__}, expected a list of strings "
                          f"or of objects with '{column}'")
    rows = list(enumerate(data))
    _check_column(rows, source, column)
    return [(i, _pick(v, column)) for i, v in rows]


def _read_jsonl(text: str, source: str, column: str) -> list[tuple[int, Any]]:
    rows = []
    for i, line in enumerate(text.split("\n")):  # row = 0-based line number; blank lines skipped; not splitlines: U+2028 is data
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((i, Unreadable("invalid JSON line", f"line {i + 1} column {e.colno}: {e.msg}")))
        except RecursionError:
            rows.append((i, Unreadable("invalid JSON line", f"line {i + 1}: nested too deeply to read")))
    _check_column(rows, source, column)
    return [(i, v if isinstance(v, Unreadable) else _pick(v, column)) for i, v in rows]


def _read_csv(text: str, source: str, column: str) -> list[tuple[int, Any]]:
    dialect = "excel-tab" if source.lower().endswith(".tsv") else "excel"
    reader = csv.reader(io.StringIO(text, newline=""), dialect=dialect)
    try:
        header = next(reader)
    except StopIteration:
        raise IngestError(f"{source}: empty CSV file (no header)") from None
    except csv.Error as e:
        raise IngestError(f"{source}: unreadable CSV header: {e}") from None
    names = [h.strip() for h in header]
    if column not in names:
        raise IngestError(f"{source}: no column '{column}' (columns: {', '.join(names)})")
    col = names.index(column)
    rows: list[tuple[int, Any]] = []
    i = 0
    while True:  # row = 0-based data row (header excluded)
        try:
            rec = next(reader)
        except StopIteration:
            return rows
        except csv.Error as e:
            raise IngestError(f"{source}: unreadable CSV at row {i} (line {reader.line_num}): {e}") from None
        if rec:
            rows.append((i, rec[col] if col < len(rec) else Unreadable(
                f"no '{column}' cell", f"{len(rec)} of {len(names)} columns")))
        i += 1


def _read_parquet(source: str, column: str) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        if storage.is_local(source):
            pf = pq.ParquetFile(storage.local_path(source))
        else:
            fs, path = storage.fs_for(source)
            pf = pq.ParquetFile(fs.open(path, "rb"))
        names = pf.schema_arrow.names
        if column not in names:
            raise IngestError(f"{source}: no column '{column}' (columns: {', '.join(names)})")
        values = pf.read(columns=[column]).column(column).to_pylist()
    except IngestError:
        raise
    except FileNotFoundError:
        raise IngestError(f"{source}: file not found") from None
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not parquet
        raise IngestError(f"{source}: not a readable parquet file: {e}") from None
    return list(enumerate(values))


def _read_hf(source: str, column: str) -> list[tuple[int, Any]]:
    spec = source[len("hf://"):]
    name, _, split = spec.partition(":")
    split = split or "train"
    if not name:
        raise IngestError(f"{source}: no dataset name (expected hf://name[:split])")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all say the same to the user
        raise IngestError(f"cannot load Hugging Face dataset '{name}' split '{split}': "
                          f"{type(e).__name__}: {str(e)[:300]} (offline? HF_DATASETS_OFFLINE/HF_HUB_OFFLINE "
                          "must be unset and the Hub reachable, or the dataset cached)") from None
    if column not in ds.column_names:
        raise IngestError(f"{source}: no column '{column}' (columns: {', '.join(ds.column_names)})")
    return list(enumerate(ds[column]))


_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
            ".csv": "csv", ".tsv": "csv"}


def read_queries(source: str, column: str = "query") -> list[tuple[int, Any]]:
    """(row, raw value) for every record of `source`; values are checked later by validate_raw.

    `source`: a path or URI ending in .json (a list of strings or of objects with `column`),
    .jsonl/.ndjson, .parquet/.pq, .csv/.tsv (`column` names the column), or `hf://name[:split]`
    (split defaults to train). Rows are 0-based record positions (JSONL: line number, CSV:
    data row). Per-record problems (a bad JSONL line, an object without `column`) come back
    as values that validate_raw rejects; whole-file problems raise IngestError.
    """
    if not isinstance(source, str) or not source.strip():
        raise IngestError(f"no query source given (got {source!r})")
    if source.startswith("hf://"):
        return _read_hf(source, column)
    ext = os.path.splitext(source.rstrip("/"))[1].lower()
    fmt = _FORMATS.get(ext)
    if fmt is None:
        raise IngestError(f"{source}: unknown format '{ext or '(no extension)'}' "
                          f"(expected {', '.join(sorted(_FORMATS))} or hf://name[:split])")
    if storage.is_local(source) and not os.path.isfile(storage.local_path(source)):
        what = "is a directory" if os.path.isdir(storage.local_path(source)) else "file not found"
        raise IngestError(f"{source}: {what}")
    if fmt == "parquet":
        return _read_parquet(source, column)
    try:
        data = storage.read_bytes(source)
    except storage.StorageError as e:
        raise IngestError(f"{source}: {e}") from None
    text = _decode(data, source)
    return {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv}[fmt](text, source, column)
