"""Per query: its judged candidates (and videos) in, its training rows or its error row out.

SFT target (`sft_select`):
  * first (the recipe): candidates in sample order; the first that passed the judge gives
    its prompt, or, having been rejected and refined, its refinement. With K=1 (the
    default for sft) that is the paper's SFT set: the teacher's prompt when the judge
    accepts it, else the judge's refinement of it.
  * best-of-k (ablation): the passing candidate the judge was most confident in (ties to
    the lowest sample_idx), else the first refinement.
DPO rows: vpo_ray.data.pairs (text pairs, then the video pair, `max_pairs_per_query`).

The row's prompt is the optimizer's chat for the query as the optimizer saw it
(prompts.optimizer_input), so SFT, DPO and serving share one input format. A row built
from a text that was cut at its token limit and kept (truncation=keep) says
`truncated: true`. A query without a row gets one error row; when every failure behind
it was a cut generation its reason is "truncated".
"""
from __future__ import annotations

import json
from typing import Optional

from vpo_ray import prompts
from vpo_ray.config import GenerateConfig
from vpo_ray.data.checklist import Checklist
from vpo_ray.schema import error_row, sft_row

TRUNCATED = "truncated"


def passing(c: dict) -> bool:
    """A candidate with a prompt that the judge accepted."""
    return bool(c.get("judge") and c["judge"]["verdict"] and c.get("prompt"))


def _cut(c: dict, refined: bool) -> bool:
    return bool(c.get("truncated") or (c.get("judge") or {}).get("truncated") or (refined and c.get("refine_truncated")))


def sft_target(cands: list[dict], select: str) -> Optional[tuple[str, str, bool]]:
    """(target text, "passing" | "refined", truncated) under `select`, or None."""
    if select == "best-of-k":
        ok = [c for c in cands if passing(c)]
        if ok:
            best = max(ok, key=lambda c: (c["judge"]["confidence"], -c["sample_idx"]))
            return best["prompt"], "passing", _cut(best, False)
        refined = [c for c in cands if c.get("refined")]
        return (refined[0]["refined"], "refined", _cut(refined[0], True)) if refined else None
    for c in sorted(cands, key=lambda c: c["sample_idx"]):
        if passing(c):
            return c["prompt"], "passing", _cut(c, False)
        if c.get("refined"):
            return c["refined"], "refined", _cut(c, True)
    return None


def failure_reason(cands: list[dict], default: str) -> str:
    """"truncated" when every failed generation behind a missing row was cut, else `default`."""
    reasons = [e.split(": ", 1)[-1] for c in cands for e in (c.get("error"), c.get("refine_error")) if e]
    return TRUNCATED if reasons and all(r == TRUNCATED for r in reasons) else default


class Finaliser:
    """The job's rules and texts, applied to one query at a time on the driver."""

    def __init__(self, cfg: GenerateConfig, templates: prompts.Templates, checklist: Optional[Checklist] = None):
        self.cfg = cfg
        self.templates = templates
        self.weights = checklist.weights() if checklist is not None else None

    def query_text(self, q: dict) -> str:
        return prompts.optimizer_input(q, self.cfg.prompts.optimizer_input)

    def sft(self, q: dict, cands: list[dict]) -> dict:
        target = sft_target(cands, self.cfg.sft_select)
        if target is None:
            reason = failure_reason(cands, "no candidate passed the judge and none was refined")
            return {"query_id": q["query_id"], "error": error_row(q["query_id"], "refine", reason)}
        text, how, cut = target
        msgs = prompts.optimizer_messages(self.query_text(q), self.templates)
        return {"query_id": q["query_id"], "rows": [sft_row(q["query_id"], msgs, text, truncated=cut)], "how": how}

    def dpo(self, q: dict, cands: list[dict], videos: list[dict]) -> dict:
        """The query's DPO rows by the VPO pair rules (vpo_ray.data.pairs), or its error row."""
        from vpo_ray.data import pairs

        qid, text = q["query_id"], self.query_text(q)
        cand_rows = [{"query_id": qid, "query": text, "sample_idx": c["sample_idx"], "prompt": c["prompt"],
                      "judge_json": json.dumps(c["judge"]) if c.get("judge") else "", "refined": c.get("refined"),
                      "truncated": _cut(c, False), "refine_truncated": bool(c.get("refine_truncated"))}
                     for c in cands]
        judged = [v for v in videos if not v.get("error") and v.get("checklist")]
        video_rows = [dict(v, query_id=qid, query=text, checklist_json=json.dumps(v["checklist"])) for v in judged]
        cfg = self.cfg
        text_pairs = pairs.text_pairs(cand_rows)
        video_pairs = pairs.video_pairs({qid: video_rows}, self.weights, margin=cfg.pair_margin,
                                        select=cfg.pair_select, score=cfg.video_score) if video_rows else []
        rows = pairs.build_dpo_set(text_pairs, video_pairs, cfg.max_pairs_per_query, self.templates)
        if rows:
            return {"query_id": qid, "rows": rows, "how": rows[0]["source"]}
        rendered = [v for v in videos if v.get("video_uri") and not v.get("error")]
        if videos and not any(v.get("video_uri") for v in videos):
            return {"query_id": qid, "error": error_row(qid, "render", "no video could be rendered")}
        if videos and not rendered:  # rendered, but the video judge failed on every one
            return {"query_id": qid, "error": error_row(qid, "video_judge", "no video could be judged")}
        reason = f"no preference pair ({len(rendered)} videos, no refinement of a rejected sample)"
        return {"query_id": qid, "error": error_row(qid, "pairs", reason)}
