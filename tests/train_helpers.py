"""Helpers for the training tests: the tiny optimizer model and small synthetic sets."""
from __future__ import annotations

import json
import random
from pathlib import Path

from vpo_ray import schema
from vpo_ray.prompts import optimizer_messages

SUBJECTS = ["cat", "dog", "city", "forest", "robot", "ship", "bird", "horse", "car", "river",
            "mountain", "child", "dancer", "train", "garden", "storm"]
ACTIONS = ["running", "sleeping", "at night", "in the rain", "jumping", "flying", "spinning", "glowing"]
STYLE = "cinematic wide shot, warm golden light, slow camera push in, sharp detail"


def tiny_model_path(cache: Path) -> str:
    """The tiny preset's optimizer (random-weight Qwen2 + byte-level BPE with a chat template)."""
    from vpo_ray.models.registry import get_spec, model_path

    return model_path(get_spec("tiny", "optimizer"))


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = f"a {rng.choice(SUBJECTS)} {rng.choice(ACTIONS)}"
        msgs = optimizer_messages(q)
        rows.append(schema.sft_row(schema.query_id(f"{q} {i}"), msgs, f"{q}, {STYLE}."))
    return rows


def dpo_rows(n: int, seed: int = 0) -> list[dict]:
    """Chosen is always the query plus one fixed descriptive style (learnable); rejected is random words."""
    rng = random.Random(seed)
    words = SUBJECTS + ACTIONS
    rows = []
    for i in range(n):
        q = f"a {rng.choice(SUBJECTS)} {rng.choice(ACTIONS)}"
        msgs = optimizer_messages(q)
        rejected = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))
        rows.append(schema.dpo_row(schema.query_id(f"{q} {i}"), msgs, f"{q}, {STYLE}.", rejected, "text",
                                   {"chosen": 1.0, "rejected": 0.0}))
    return rows


def write_parquet(rows: list[dict], path: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_jsonl(rows: list[dict], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class FakeGenerate:
    """Stands in for `run_generate`: writes the set where it would (`<out>/<kind>.parquet`,
    errors.jsonl, summary.json) and records each call's kind and optimizer."""

    def __init__(self, n_sft: int = 16, n_dpo: int = 48):
        self.n = {"sft": n_sft, "dpo": n_dpo}
        self.calls: list[dict] = []

    def __call__(self, cfg):
        self.calls.append({"kind": cfg.kind, "optimizer": cfg.optimizer, "out": cfg.out})
        make = sft_rows if cfg.kind == "sft" else dpo_rows
        write_parquet(make(self.n[cfg.kind], seed=len(self.calls)), Path(cfg.out) / f"{cfg.kind}.parquet")
        write_jsonl([{"query_id": "q0", "stage": "rewrite", "reason": "parse", "error": "no prompt"}],
                    Path(cfg.out) / "errors.jsonl")
        summary = {"input_queries": self.n[cfg.kind] + 1, "output_rows": self.n[cfg.kind], "errors": 1,
                   "output": cfg.out}
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary))
        return summary
