"""Same-prompt video pairs for the video model's Diffusion-DPO: the rule, as a table."""
from __future__ import annotations

import json

import pytest

from vpo_ray.data.video_pairs import pick_pair, same_prompt_pairs

W = {"a": 2.0, "b": 1.0, "c": 0.5}  # question weights: score = weighted sum of yes answers


def video(seed, answers, qid="q1", sample_idx=0, prompt="a cat on a piano", **extra):
    checklist = [{"id": k, "answer": bool(v), "p_yes": float(v)} for k, v in zip("abc", answers)]
    return {"query_id": qid, "sample_idx": sample_idx, "seed": seed, "prompt": prompt,
            "checklist_json": json.dumps(checklist), **extra}


@pytest.mark.parametrize("answers, select, expect", [
    # (answers per seed in render order, select, (chosen seed, rejected seed) or None)
    ([(1, 1, 1), (0, 1, 1)], "first", (0, 1)),           # dominates, gap 2 > 0.5
    ([(0, 1, 1), (1, 1, 1)], "first", (1, 0)),           # the better one may come second
    ([(1, 0, 1), (0, 1, 1)], "first", None),             # higher score (2.5 vs 1.5) but no dominance
    ([(1, 1, 1), (1, 1, 0)], "first", None),             # dominates, gap exactly 0.5 = margin: not enough
    ([(1, 1, 1), (1, 1, 1)], "first", None),             # equal answers: no preference
    ([(1, 1, 0), (1, 0, 0), (0, 0, 0)], "first", (0, 1)),  # first qualifying (i, j) in order: gap 1
    ([(1, 1, 0), (1, 0, 0), (0, 0, 0)], "largest-gap", (0, 2)),  # largest gap: 3
    ([(0, 0, 1), (1, 1, 1), (0, 0, 0)], "first", (1, 0)),  # i scans first: seed 1 over seed 0 (gap 3)
])
def test_pair_rule_table(answers, select, expect):
    group = [video(seed, a) for seed, a in enumerate(answers)]
    got = pick_pair(group, W, margin=0.5, select=select)
    assert (None if got is None else (group[got[0]]["seed"], group[got[1]]["seed"])) == expect
    if got is not None:
        assert got[2] - got[3] > 0.5


def test_one_pair_per_prompt_and_only_within_a_prompt():
    rows = [video(0, (1, 1, 1)), video(1, (0, 0, 0)), video(2, (0, 1, 0)),  # q1 prompt 0: three seeds
            video(0, (1, 1, 1), sample_idx=1, prompt="a dog"), video(1, (0, 1, 1), sample_idx=1, prompt="a dog"),
            video(0, (1, 1, 1), qid="q2"),  # one seed only: no pair
            video(1, (0, 0, 0), qid="q2", sample_idx=5, prompt="another prompt")]  # a lone video of another prompt
    pairs = same_prompt_pairs(rows, W, margin=0.5)
    assert [(p["query_id"], p["sample_idx"]) for p in pairs] == [("q1", 0), ("q1", 1)]
    first = pairs[0]
    assert (first["chosen"]["seed"], first["rejected"]["seed"]) == (0, 1)
    assert first["prompt"] == "a cat on a piano" and first["scores"]["gap"] == 3.5
    assert first["scores"]["videos"] == 3


def test_failed_and_unjudged_videos_take_no_part():
    rows = [video(0, (1, 1, 1), error="render: OOM"), video(1, (0, 0, 0)),
            {"query_id": "q1", "sample_idx": 0, "seed": 2, "prompt": "a cat on a piano", "checklist_json": "[]"}]
    assert same_prompt_pairs(rows, W) == []


def test_stored_scores_when_no_weights_are_given():
    a, b = video(0, (1, 1, 0), score=0.9), video(1, (1, 0, 0), score=0.2)
    assert pick_pair([a, b], None, margin=0.5)[:2] == (0, 1)
    assert pick_pair([a, b], None, margin=0.7) is None


def test_malformed_rows_name_the_video():
    bad = dict(video(1, (1, 1, 1)), checklist_json="not json")
    with pytest.raises(ValueError, match="query_id 'q1' sample_idx 0 seed 1: checklist"):
        same_prompt_pairs([video(0, (0, 0, 0)), bad], W)
    short = dict(video(1, (1, 1, 1)), checklist_json=json.dumps([{"id": "a", "answer": True}]))
    with pytest.raises(ValueError, match="seed 1: checklist questions"):
        same_prompt_pairs([video(0, (0, 0, 0)), short], W)
    with pytest.raises(ValueError, match="2 different prompts"):
        same_prompt_pairs([video(0, (0, 0, 0)), video(1, (1, 1, 1), prompt="other")], W)
    with pytest.raises(ValueError, match="select"):
        pick_pair([video(0, (0, 0, 0)), video(1, (1, 1, 1))], W, select="best")
