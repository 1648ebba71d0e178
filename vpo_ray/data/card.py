"""The dataset card `vpo generate` writes beside its set, so `datasets.load_dataset(out)` reads it.

A generate folder holds the set (sft/dpo .parquet or .jsonl) among other JSON and JSONL
files of other shapes (summary, candidates, errors); the card's `configs:` block names the
set as the default config's train split, so Hugging Face `datasets` loads only it:

    from datasets import load_dataset
    ds = load_dataset("runs/build_sft", split="train")

The body says what each column and each other file is.
"""
from __future__ import annotations

import yaml

COLUMNS = {
    "sft": {"query_id": "stable hash of the normalised query",
            "messages": "chat turns (system, user = the query, assistant = the optimized prompt)"},
    "dpo": {"query_id": "stable hash of the normalised query", "prompt": "chat turns up to the user query",
            "chosen": "the preferred assistant turn", "rejected": "the other assistant turn",
            "source": "text (judge verdicts) or video (checklist scores)", "scores_json": "the scores behind a pair"},
}
OTHER_FILES = {
    "summary.json": "counts per stage, errors by reason, timings",
    "config.json": "the job's settings",
    "candidates.jsonl": "every sample per query with the judge's verdict and refinement",
    "errors.jsonl": "one row per query that produced no training row, naming stage and reason",
    "duplicates.jsonl": "queries dropped as (near-)duplicates",
    "videos.jsonl": "rendered videos with checklist answers and scores (DPO sets)",
}


def dataset_card(kind: str, set_file: str, summary: dict) -> str:
    """README.md text: YAML front matter with `configs:`, then what the folder holds."""
    meta = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": set_file}]}],
            "tags": ["vpo", "text-to-video", "prompt-optimization", kind]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# VPO {kind.upper()} set", "",
             f"Built by `vpo generate` (kind `{kind}`): {summary.get('output_rows', 0)} rows from "
             f"{summary.get('input_queries', 0)} queries ({summary.get('errors', 0)} errors, "
             f"{summary.get('duplicates', 0)} duplicates).", "",
             "```python", "from datasets import load_dataset",
             "ds = load_dataset(\"<this folder>\", split=\"train\")", "```", "",
             f"## Columns of `{set_file}`", ""]
    lines += [f"- `{col}`: {what}" for col, what in COLUMNS.get(kind, {}).items()]
    lines += ["", "## Other files", ""] + [f"- `{name}`: {what}" for name, what in OTHER_FILES.items()]
    return "\n".join(lines) + "\n"
