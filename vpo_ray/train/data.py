"""Training sets: find the files, check every row on the driver, load them for TRL.

`validate_training_set` runs before any Ray worker starts, so a bad row costs seconds,
not a cluster start: it names the file, the row (0-based) and the field at fault.
Workers then read the same files with `datasets.load_dataset` and keep only the
columns TRL reads (`messages`; `prompt`/`chosen`/`rejected`). An SFT set goes to TRL as
prompt/completion (`prompt` = the chat up to the last turn, `completion` = the
assistant's answer), so TRL's SFTTrainer puts the loss on the response tokens only, as
LLaMA-Factory (the official recipe) does; `completion_only_loss=False` keeps `messages`
and trains on every token.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from vpo_ray import storage
from vpo_ray.config import ConfigError

# The columns TRL reads, per method; every other column (query_id, source, scores_json) is dropped.
TRL_COLUMNS = {"sft": ("messages",), "dpo": ("prompt", "chosen", "rejected")}
ROLES = ("system", "user", "assistant")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
# Files `vpo generate` writes next to the set that are not training rows.
NOT_ROWS = ("errors", "duplicates", "candidates", "videos", "summary", "config", "metrics")


class DataError(ConfigError):
    """A training row is malformed; the message names the file, row and field."""


@dataclass(frozen=True)
class DataReport:
    files: tuple[str, ...]
    rows: int
    max_tokens: int  # longest row (prompt + longest completion), in tokens


def _is_dir(uri: str) -> bool:
    if storage.is_local(uri):
        return os.path.isdir(storage.local_path(uri))
    fs, p = storage.fs_for(uri)
    return fs.isdir(p)


def find_data_files(path: str, method: str) -> list[str]:
    """A file, or a directory written by `vpo generate` (`sft.parquet`, `dpo.jsonl`, ...)."""
    if not path:
        raise DataError("data: no training set given (--data PATH)")
    if not storage.exists(path):
        raise DataError(f"data: {path} does not exist")
    if not _is_dir(path):
        if path.endswith(DATA_SUFFIXES):
            return [path]
        raise DataError(f"data: {path} is neither a .parquet/.jsonl/.json file nor a directory holding one")
    names = storage.listdir(path)
    for suffix in DATA_SUFFIXES:
        if f"{method}{suffix}" in names:
            return [storage.join(path, f"{method}{suffix}")]
    other = tuple(m for m in TRL_COLUMNS if m != method)  # a DPO set is no SFT set, and back
    files = [n for n in names if n.endswith(DATA_SUFFIXES) and not n.startswith((".", "_"))
             and not n.split(".")[0].startswith(NOT_ROWS + other)]
    kinds = {os.path.splitext(n)[1] for n in files}
    if not files:
        raise DataError(f"data: no {method}.parquet/{method}.jsonl (or other data file) in {path}")
    if len(kinds) > 1:
        raise DataError(f"data: {path} mixes file types {sorted(kinds)}; keep one format per directory")
    return [storage.join(path, n) for n in files]


def _format(files: list[str]) -> str:
    return "parquet" if files[0].endswith(".parquet") else "json"


def iter_raw_rows(uri: str) -> Iterator[tuple[int, Any]]:
    """(row number, row) as stored, without type coercion, so a bad row is seen as it is."""
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, p = storage.fs_for(uri)
        try:
            table = pq.read_table(p, filesystem=fs)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise DataError(f"{uri}: not a readable parquet file: {e}") from None
        for i, row in enumerate(table.to_pylist()):
            yield i, row
        return
    text = storage.read_text(uri)
    if uri.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{uri}: not valid JSON: {e}") from None
        yield from enumerate(rows)
        return
    for i, line in enumerate(l for l in text.split("\n") if l.strip()):  # not splitlines: U+2028 is data
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{uri} row {i}: not valid JSON ({e.msg})") from None


def _check_messages(value: Any, field: str, where: str, *, assistant_last: bool = False,
                    only_assistant: bool = False) -> None:
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: field '{field}' must be a list of chat messages, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: field '{field}' is empty")
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{field}[{j}]' must be a message object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field '{field}[{j}].role' must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{field}[{j}].content' must be a string, got {type(content).__name__}")
        if only_assistant and role != "assistant":
            raise DataError(f"{where}: field '{field}[{j}].role' must be 'assistant', got {role!r}")
    if assistant_last or only_assistant:
        last = value[-1]
        if last["role"] != "assistant":
            raise DataError(f"{where}: field '{field}' must end with an assistant message")
        if not last["content"].strip():
            raise DataError(f"{where}: field '{field}' has an empty assistant message")


def check_row(row: Any, method: str, where: str) -> None:
    """Raise DataError naming `where` (file + row) and the field if `row` cannot train."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [c for c in TRL_COLUMNS[method] if c not in row or row[c] is None]
    if missing:
        raise DataError(f"{where}: missing field '{missing[0]}' (a {method} row needs {', '.join(TRL_COLUMNS[method])})")
    if method == "sft":
        _check_messages(row["messages"], "messages", where, assistant_last=True)
        return
    _check_messages(row["prompt"], "prompt", where)
    if row["prompt"][-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt' must end with a user message, not an assistant one")
    _check_messages(row["chosen"], "chosen", where, only_assistant=True)
    _check_messages(row["rejected"], "rejected", where, only_assistant=True)
    if row["chosen"][-1]["content"].strip() == row["rejected"][-1]["content"].strip():
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical (no preference to learn)")


def _n_tokens(tokenizer, messages: list) -> int:
    ids = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def row_tokens(tokenizer, row: dict, method: str) -> int:
    if method == "sft":
        return _n_tokens(tokenizer, row["messages"])
    prompt = list(row["prompt"])
    return max(_n_tokens(tokenizer, prompt + list(row["chosen"])), _n_tokens(tokenizer, prompt + list(row["rejected"])))


def validate_training_set(path: str, method: str, tokenizer=None, max_length: Optional[int] = None) -> DataReport:
    """Check every row of the set at `path`; a bad or over-long row raises DataError naming it."""
    if method not in TRL_COLUMNS:
        raise DataError(f"method: expected one of {sorted(TRL_COLUMNS)}, got {method!r}")
    files = find_data_files(path, method)
    rows, longest = 0, 0
    for uri in files:
        for i, row in iter_raw_rows(uri):
            where = f"{uri} row {i}"
            check_row(row, method, where)
            if tokenizer is not None:
                n = row_tokens(tokenizer, row, method)
                longest = max(longest, n)
                if max_length and n > max_length:
                    raise DataError(f"{where}: {n} tokens exceed max_length={max_length} "
                                    f"(field '{'messages' if method == 'sft' else 'prompt+chosen/rejected'}'); "
                                    "shorten the row or raise max_length")
            rows += 1
    if rows == 0:
        raise DataError(f"data: {path} holds no rows")
    return DataReport(files=tuple(files), rows=rows, max_tokens=longest)


def as_prompt_completion(row: dict) -> dict:
    """An SFT `messages` row as TRL's conversational prompt/completion pair."""
    return {"prompt": list(row["messages"][:-1]), "completion": list(row["messages"][-1:])}


def load_for_trl(path: str, method: str, cache_dir: Optional[str] = None, completion_only_loss: bool = True):
    """The training set as a `datasets.Dataset` holding only the columns TRL reads
    (an SFT set as prompt/completion when `completion_only_loss`)."""
    import datasets

    files = find_data_files(path, method)
    ds = datasets.load_dataset(_format(files), data_files=files, split="train", cache_dir=cache_dir)
    keep = TRL_COLUMNS[method]
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    if method == "sft" and completion_only_loss:
        ds = ds.map(as_prompt_completion, remove_columns=["messages"])
    return ds
