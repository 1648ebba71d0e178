"""Per-step training metrics: read metrics.jsonl, summarise it, draw loss.png."""
from __future__ import annotations

import io
import math
from typing import Optional

from vpo_ray import storage

# Curves drawn under the loss, when the run logged them (DPO logs the reward ones).
EXTRA_PANELS = (("learning_rate", "learning rate"), ("rewards/margins", "DPO reward margin"),
                ("rewards/accuracies", "DPO reward accuracy"), ("tokens_per_second", "tokens / s"))


def read_steps(uri: str) -> list[dict]:
    """Step rows from metrics.jsonl, one per step (the last entry wins if a step repeats)."""
    by_step: dict[int, dict] = {}
    for row in storage.read_jsonl(uri):
        if "loss" in row and "step" in row:
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def _mean(xs: list[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def summarise(rows: list[dict], window: int = 5) -> dict:
    """First/last-window means of the loss (and DPO reward numbers) for reports and tests."""
    if not rows:
        return {"steps_logged": 0}
    w = max(1, min(window, len(rows) // 2 or 1))
    out: dict = {"steps_logged": len(rows), "last_step": rows[-1]["step"],
                 "loss_first": _mean([r["loss"] for r in rows[:w]]), "loss_last": _mean([r["loss"] for r in rows[-w:]])}
    for key in ("rewards/accuracies", "rewards/margins", "tokens_per_second"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[f"{key}_last"] = _mean(vals[-w:])
    return out


def plot_losses(rows: list[dict], uri: str, title: str = "") -> None:
    """loss.png: the loss per step, with learning rate / DPO rewards / throughput below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss")] + [(k, label) for k, label in EXTRA_PANELS if any(k in r for r in rows)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 60 else None, lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
