"""VPO preference pairs (ARCHITECTURE.md, "Pair rules") and the DPO set made from them.

The pair dict is the one format between the rules and the DPO rows:

    {"query_id": str,
     "query":    str,   # what the optimizer was given for this query (its user message)
     "chosen":   str,   # the preferred video prompt
     "rejected": str,   # the dispreferred video prompt
     "source":   "text" | "video",
     "truncated": bool, # chosen or rejected was cut at a token limit and kept (truncation=keep)
     "scores":   dict}  # why this pair; text: {"sample_idx", "judge_confidence"},
                        # video: {"chosen_score", "rejected_score", "gap", "chosen_sample_idx",
                        #         "chosen_seed", "rejected_sample_idx", "rejected_seed"}

Rows come in as schema rows (`Candidate`, `Video`). Neither carries the query text, so
each row may hold a `query` field (joined upstream), or the caller passes `queries`
({query_id: text}); a row with neither raises ValueError naming it. A malformed row
(judge_json not JSON, a checklist that lacks a weighted question) raises too, naming
query_id and sample_idx: those are upstream bugs, not data to skip.

Rules (the official ones are thu-coai/VPO src/process_data.py, process_dpo_data):
  * text: a candidate the judge rejected (judge verdict False) with a non-empty
    refinement that differs from it -> chosen = refined, rejected = prompt.
  * video: within one query, video i over video j when i's checklist answers dominate
    j's over the weighted questions (yes >= on every one, > on one) and score(i) -
    score(j) > margin (strictly: a gap of exactly the margin is not enough; 1e-9 absorbs
    float sums). score = sum of the weights of yes answers (`score="binary"`, official) or
    of the weights times P(yes) (`score="soft"`). Two videos of the same prompt text (other
    seeds) never pair: the preference is over prompts. Of the qualifying pairs,
    `select="first"` takes the first (i, j) with i, then j, in sample order (sample_idx,
    then seed) as the official double loop does; `select="largest-gap"` takes the largest
    gap, ties to the lowest (chosen sample_idx, chosen seed, rejected sample_idx, rejected
    seed). At most one video pair per query.
  * DPO set: text pairs first, then video pairs, at most `max_pairs_per_query` per query
    (official: one, text first).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

from vpo_ray import prompts, schema
from vpo_ray.data.checklist import SCORES, score as checklist_score

_EPS = 1e-9  # score sums are floats: a gap of "exactly" the margin must not pass by rounding


def _where(row: Mapping) -> str:
    return f"query_id {row.get('query_id')!r} sample_idx {row.get('sample_idx')!r}"


def _query_text(row: Mapping, queries: Optional[Mapping[str, str]]) -> str:
    text = row.get("query")
    if not text and queries is not None:
        text = queries.get(row.get("query_id"))
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{_where(row)}: no query text (give rows a 'query' field or pass queries=)")
    return text


def _judgement(row: Mapping) -> Optional[dict]:
    raw = row.get("judge_json")
    if raw is None or raw == "":
        return None  # not critiqued (yet)
    try:
        judge = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{_where(row)}: judge_json is not a JSON object: {e}") from None
    if not isinstance(judge, dict) or not isinstance(judge.get("verdict"), bool):
        raise ValueError(f"{_where(row)}: judge_json has no boolean 'verdict': {str(raw)[:120]!r}")
    return judge


def text_pairs(candidates: Sequence[Mapping], queries: Optional[Mapping[str, str]] = None) -> list[dict]:
    """Text-level pairs: refined (chosen) over the rejected sample, in candidate order."""
    out = []
    for row in candidates:
        judge = _judgement(row)
        if judge is None or judge["verdict"]:
            continue
        refined = (row.get("refined") or "").strip()
        prompt = (row.get("prompt") or "").strip()
        if not refined or not prompt or refined == prompt:
            continue
        out.append({"query_id": row["query_id"], "query": _query_text(row, queries), "chosen": refined,
                    "rejected": prompt, "source": "text",
                    "truncated": bool(row.get("truncated") or row.get("refine_truncated")),
                    "scores": {"sample_idx": row.get("sample_idx"), "judge_confidence": judge.get("confidence")}})
    return out


def dominates(a_answers: Sequence[bool], b_answers: Sequence[bool]) -> bool:
    """a >= b on every checklist question and a > b on at least one."""
    if len(a_answers) != len(b_answers):
        raise ValueError(f"checklists differ in length: {len(a_answers)} vs {len(b_answers)}")
    a, b = [bool(x) for x in a_answers], [bool(x) for x in b_answers]
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def _answers(row: Mapping) -> dict[str, tuple[bool, float]]:
    """{question id: (answer, P(yes))}; P(yes) defaults to the answer when not stored."""
    raw = row.get("checklist_json")
    try:
        items = json.loads(raw) if isinstance(raw, str) else raw
        return {str(it["id"]): (bool(it["answer"]), float(it.get("p_yes", float(bool(it["answer"])))))
                for it in items}
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{_where(row)}: checklist_json is not a list of {{id, answer}}: {e}") from None


SELECT = ("first", "largest-gap")


def _order(x: Any) -> int:
    return -1 if x is None else int(x)


def _query_video_pair(videos: Sequence[Mapping], weights: Mapping[str, float], margin: float,
                      select: str, score: str) -> Optional[tuple]:
    """(i, j, score_i, score_j) of the query's video pair under the rule, or None."""
    answers = [_answers(v) for v in videos]
    for v, ans in zip(videos, answers):
        missing = [q for q in weights if q not in ans]
        if missing:
            raise ValueError(f"{_where(v)}: checklist lacks question(s) {', '.join(missing)}")
    vecs = [[ans[q][0] for q in weights] for ans in answers]
    scores = [checklist_score(ans, weights, score) for ans in answers]
    order = sorted(range(len(videos)), key=lambda k: (_order(videos[k].get("sample_idx")),
                                                      _order(videos[k].get("seed"))))
    best = None
    for rank_i, i in enumerate(order):
        for rank_j, j in enumerate(order):
            vi, vj = videos[i], videos[j]
            if i == j or (vi.get("prompt") or "").strip() == (vj.get("prompt") or "").strip():
                continue
            gap = scores[i] - scores[j]
            if gap <= margin + _EPS or not dominates(vecs[i], vecs[j]):
                continue
            if select == "first":
                return i, j, scores[i], scores[j]
            key = (-round(gap, 9), rank_i, rank_j)
            if best is None or key < best[0]:
                best = (key, i, j, scores[i], scores[j])
    return None if best is None else best[1:]


def video_pairs(videos_by_query: Mapping[str, Sequence[Mapping]], weights: Mapping[str, float],
                margin: float = 0.5, select: str = "first", score: str = "binary",
                queries: Optional[Mapping[str, str]] = None) -> list[dict]:
    """Video-level pairs, at most one per query, in `videos_by_query` order (rule: module doc).

    `weights`: {question id: weight} of the checklist (data.checklist.Checklist.weights()).
    """
    if select not in SELECT:
        raise ValueError(f"select: expected one of {', '.join(SELECT)}, got {select!r}")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {', '.join(SCORES)}, got {score!r}")
    if not weights:
        raise ValueError("weights: the checklist has no questions")
    out = []
    for qid, videos in videos_by_query.items():
        prompted = [v for v in videos if (v.get("prompt") or "").strip()]
        if len(prompted) < 2:
            continue
        found = _query_video_pair(prompted, weights, margin, select, score)
        if found is None:
            continue
        i, j, s_i, s_j = found
        vi, vj = prompted[i], prompted[j]
        out.append({"query_id": qid, "query": _query_text({**vi, "query_id": qid}, queries),
                    "chosen": vi["prompt"].strip(), "rejected": vj["prompt"].strip(), "source": "video",
                    "truncated": bool(vi.get("truncated") or vj.get("truncated")),
                    "scores": {"chosen_score": s_i, "rejected_score": s_j, "gap": round(s_i - s_j, 9),
                               "chosen_sample_idx": vi.get("sample_idx"), "chosen_seed": vi.get("seed"),
                               "rejected_sample_idx": vj.get("sample_idx"), "rejected_seed": vj.get("seed")}})
    return out


def build_dpo_set(text_pairs: Sequence[Mapping], video_pairs: Sequence[Mapping],
                  max_pairs_per_query: int = 1, templates: Optional[prompts.Templates] = None) -> list[dict]:
    """schema.dpo_row rows: text pairs first, then video pairs, <= max_pairs_per_query per query.

    The prompt column is the optimizer's chat for the pair's query
    (prompts.optimizer_messages with `templates`), so DPO trains exactly the turn SFT
    taught. A pair repeated (same query, chosen, rejected) is taken once.
    """
    if max_pairs_per_query < 1:
        raise ValueError(f"max_pairs_per_query must be >= 1, got {max_pairs_per_query}")
    rows: list[dict] = []
    per_query: dict[str, int] = {}
    taken: set[tuple[str, str, str]] = set()
    for kind, pairs in (("text", text_pairs), ("video", video_pairs)):
        for n, pair in enumerate(pairs):
            missing = [k for k in ("query_id", "query", "chosen", "rejected") if not pair.get(k)]
            if missing:
                raise ValueError(f"{kind} pair {n} (query_id {pair.get('query_id')!r}): missing {', '.join(missing)}")
            if pair.get("source", kind) != kind:
                raise ValueError(f"{kind} pair {n} (query_id {pair['query_id']!r}): source is {pair['source']!r}")
            qid = pair["query_id"]
            key = (qid, pair["chosen"], pair["rejected"])
            if pair["chosen"] == pair["rejected"] or key in taken or per_query.get(qid, 0) >= max_pairs_per_query:
                continue
            rows.append(schema.dpo_row(qid, prompts.optimizer_messages(pair["query"], templates), pair["chosen"],
                                       pair["rejected"], kind, _jsonable(pair.get("scores")),
                                       truncated=bool(pair.get("truncated"))))
            taken.add(key)
            per_query[qid] = per_query.get(qid, 0) + 1
    return rows


def _jsonable(scores: Any) -> dict:
    return schema.as_jsonable(dict(scores or {}))
