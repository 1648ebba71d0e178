"""Same-prompt video pairs: the preference set that tunes the video model (Diffusion-DPO).

Diffusion-DPO scores two samples under one text condition, so unlike the optimizer's
video pairs (two prompts of one query) these are two videos of ONE prompt that differ
only in their seed (VideoDPO's data: N seeds per prompt, a preferred and a dispreferred
one). Preference follows the VPO video rule (vpo_ray.data.pairs): video i over video j
when i's binary checklist answers dominate j's (>= on every question, > on one) and
score(i) - score(j) > margin, the score being the weighted sum of the yes answers.

Input rows are `schema.Video`-like dicts: query_id, sample_idx, seed, prompt,
checklist_json (or checklist), plus whatever the caller wants carried (video_uri, ...).
Rows are grouped by (query_id, sample_idx); within a group, in the order given (the
render order, i.e. seed order):
  * select="first" (the official rule's choice): the first (i, j) in that order, i over j;
  * select="largest-gap": the largest score gap; ties go to the earliest (i, j).
At most one pair per prompt. A group with fewer than two judged videos gives none.
A malformed row raises ValueError naming query_id, sample_idx and seed.
"""
from __future__ import annotations

import json
from typing import Mapping, Optional, Sequence

from vpo_ray.data.checklist import score as checklist_score
from vpo_ray.data.pairs import dominates

SELECT = ("first", "largest-gap")
_EPS = 1e-9  # as in pairs.py: a gap of exactly the margin must not pass by float rounding


def _where(row: Mapping) -> str:
    return f"query_id {row.get('query_id')!r} sample_idx {row.get('sample_idx')!r} seed {row.get('seed')!r}"


def answers_of(row: Mapping) -> dict[str, bool]:
    """{question id: yes?} from `checklist_json` (a JSON list) or `checklist` (a list)."""
    raw = row.get("checklist_json", row.get("checklist")) or []
    try:
        items = json.loads(raw) if isinstance(raw, str) else raw
        return {str(it["id"]): bool(it["answer"]) for it in items}
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{_where(row)}: checklist is not a list of {{id, answer}}: {e}") from None


def _scored(group: Sequence[Mapping], weights: Optional[Mapping[str, float]]) -> tuple[list, list[float]]:
    """(answer vectors over one question order, scores) of a group; raises on mismatched checklists."""
    answers = [answers_of(v) for v in group]
    ids = list(weights) if weights is not None else sorted(answers[0])
    for v, ans in zip(group, answers):
        missing = [q for q in ids if q not in ans]
        if missing or (weights is None and sorted(ans) != ids):
            raise ValueError(f"{_where(v)}: checklist questions {sorted(ans)} do not match {ids}")
    vecs = [[ans[q] for q in ids] for ans in answers]
    scores = [checklist_score({q: (ans[q], float(ans[q])) for q in ids}, weights) if weights is not None
              else float(v.get("score", 0.0))
              for v, ans in zip(group, answers)]
    return vecs, scores


def pick_pair(group: Sequence[Mapping], weights: Optional[Mapping[str, float]] = None, margin: float = 0.5,
              select: str = "first") -> Optional[tuple[int, int, float, float]]:
    """(i, j, score_i, score_j) of the preferred pair within one prompt's videos, or None."""
    if select not in SELECT:
        raise ValueError(f"select: expected one of {', '.join(SELECT)}, got {select!r}")
    if len(group) < 2:
        return None
    vecs, scores = _scored(group, weights)
    best = None
    for i in range(len(group)):
        for j in range(len(group)):
            gap = scores[i] - scores[j]
            if i == j or gap <= margin + _EPS or not dominates(vecs[i], vecs[j]):
                continue
            if select == "first":
                return i, j, scores[i], scores[j]
            if best is None or gap > best[0] + _EPS:
                best = (gap, i, j)
    return None if best is None else (best[1], best[2], scores[best[1]], scores[best[2]])


def same_prompt_pairs(videos: Sequence[Mapping], weights: Optional[Mapping[str, float]] = None,
                      margin: float = 0.5, select: str = "first") -> list[dict]:
    """One pair per (query_id, sample_idx) whose seeds give one; in the order groups first appear.

    Each pair: {"query_id", "sample_idx", "prompt", "chosen": row, "rejected": row,
    "scores": {"chosen_score", "rejected_score", "gap", "videos"}}; rows are the input dicts.
    Rows with an `error` or no checklist are not judged and do not take part.
    """
    groups: dict[tuple, list[Mapping]] = {}
    for row in videos:
        if row.get("error") or not answers_of(row):
            continue
        groups.setdefault((row.get("query_id"), row.get("sample_idx")), []).append(row)
    out = []
    for (qid, sample_idx), group in groups.items():
        prompts = {(v.get("prompt") or "").strip() for v in group}
        if len(prompts) != 1:
            raise ValueError(f"query_id {qid!r} sample_idx {sample_idx!r}: one sample_idx holds "
                             f"{len(prompts)} different prompts")
        picked = pick_pair(group, weights, margin, select)
        if picked is None:
            continue
        i, j, s_i, s_j = picked
        out.append({"query_id": qid, "sample_idx": sample_idx, "prompt": prompts.pop(), "chosen": group[i],
                    "rejected": group[j], "scores": {"chosen_score": s_i, "rejected_score": s_j,
                                                     "gap": round(s_i - s_j, 9), "videos": len(group)}})
    return out
