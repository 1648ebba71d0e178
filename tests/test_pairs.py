"""VPO pair rules: text pairs, video pairs (dominance + margin), and the DPO set."""
from __future__ import annotations

import json

import pytest

from vpo_ray import prompts, schema
from vpo_ray.data.pairs import build_dpo_set, dominates, text_pairs, video_pairs

WEIGHTS = {"align": 2.0, "quality": 1.0, "motion": 0.5}
QUERIES = {"q1": "a cat playing piano", "q2": "city at night"}


def cand(qid, idx, prompt, verdict=None, refined=None, query=None):
    judge = "" if verdict is None else schema.Judgement(verdict, 0.9, "reasons").to_json()
    row = schema.Candidate(qid, idx, prompt, judge, refined).to_row()
    if query:
        row["query"] = query
    return row


def video(qid, idx, prompt, answers, seed=0, p_yes=None):
    p_yes = p_yes or [float(a) for a in answers]
    checklist = [{"id": k, "answer": a, "p_yes": p} for k, a, p in zip(WEIGHTS, answers, p_yes)]
    return schema.Video(qid, idx, seed, "tiny-t2v", f"file:///v/{qid}-{idx}-{seed}.mp4", 9, 8, prompt,
                        json.dumps(checklist)).to_row()


# ----------------------------------------------------------------------------- dominance

@pytest.mark.parametrize("a,b,expected", [
    ([True, True, False], [True, False, False], True),
    ([True, True, True], [False, False, False], True),
    ([True, False], [True, False], False),  # equal: not strictly better anywhere
    ([True, False], [False, True], False),  # better on one, worse on another
    ([False, False], [True, False], False),
])
def test_dominates(a, b, expected):
    assert dominates(a, b) is expected


def test_dominates_rejects_checklists_of_different_length():
    with pytest.raises(ValueError, match="differ in length"):
        dominates([True], [True, False])


# ----------------------------------------------------------------------------- text pairs

def test_text_pair_from_rejected_sample_with_refinement():
    rows = [cand("q1", 0, "a cat", verdict=False, refined="A tabby cat plays a grand piano in warm light."),
            cand("q1", 1, "a good prompt", verdict=True, refined=None),
            cand("q1", 2, "rejected, no refinement", verdict=False, refined=None),
            cand("q1", 3, "rejected, blank refinement", verdict=False, refined="   "),
            cand("q1", 4, "same text", verdict=False, refined="same text"),
            cand("q1", 5, "not critiqued yet")]
    (pair,) = text_pairs(rows, QUERIES)
    assert pair["chosen"] == "A tabby cat plays a grand piano in warm light."
    assert pair["rejected"] == "a cat" and pair["source"] == "text" and pair["query"] == "a cat playing piano"
    assert pair["scores"] == {"sample_idx": 0, "judge_confidence": 0.9}


def test_text_pairs_take_query_from_row_and_fail_without_one():
    assert text_pairs([cand("q9", 0, "p", verdict=False, refined="r", query="a fox")])[0]["query"] == "a fox"
    with pytest.raises(ValueError, match="query_id 'q9' sample_idx 0: no query text"):
        text_pairs([cand("q9", 0, "p", verdict=False, refined="r")], QUERIES)


def test_text_pairs_reject_malformed_judge_json_naming_the_row():
    row = cand("q1", 3, "p")
    row["judge_json"] = "{not json"
    with pytest.raises(ValueError, match="query_id 'q1' sample_idx 3: judge_json"):
        text_pairs([row], QUERIES)


# ----------------------------------------------------------------------------- video pairs

def test_video_pair_needs_dominance_and_gap_over_margin():
    vids = {"q1": [video("q1", 0, "prompt A", [True, True, True]),    # 3.5
                   video("q1", 1, "prompt B", [True, False, False])]}  # 2.0
    (pair,) = video_pairs(vids, WEIGHTS, margin=0.5, queries=QUERIES)
    assert (pair["chosen"], pair["rejected"], pair["source"]) == ("prompt A", "prompt B", "video")
    assert pair["scores"]["gap"] == 1.5 and pair["scores"]["chosen_sample_idx"] == 0


def test_gap_of_exactly_the_margin_is_not_enough():
    vids = {"q1": [video("q1", 0, "prompt A", [True, True, True]),    # 3.5
                   video("q1", 1, "prompt B", [True, True, False])]}  # 3.0: gap 0.5
    assert video_pairs(vids, WEIGHTS, margin=0.5, queries=QUERIES) == []
    assert len(video_pairs(vids, WEIGHTS, margin=0.49, queries=QUERIES)) == 1


def test_soft_scores_weigh_p_yes_but_dominance_stays_on_answers():
    a = video("q1", 0, "prompt A", [True, True, True], p_yes=[0.6, 0.6, 0.6])  # soft 2.1, binary 3.5
    b = video("q1", 1, "prompt B", [True, False, True], p_yes=[0.6, 0.1, 0.6])  # soft 1.6, binary 2.5
    assert video_pairs({"q1": [a, b]}, WEIGHTS, margin=0.5, score="soft", queries=QUERIES) == []  # gap 0.5
    (pair,) = video_pairs({"q1": [a, b]}, WEIGHTS, margin=0.49, score="soft", queries=QUERIES)
    assert pair["scores"]["chosen_score"] == pytest.approx(2.1) and pair["scores"]["rejected_score"] == pytest.approx(1.6)
    assert video_pairs({"q1": [a, b]}, WEIGHTS, margin=0.5, queries=QUERIES)[0]["scores"]["gap"] == 1.0  # binary


def test_higher_score_without_dominance_makes_no_pair():
    vids = {"q1": [video("q1", 0, "prompt A", [True, False, False]),   # 2.0 but misses quality
                   video("q1", 1, "prompt B", [False, True, False])]}  # 1.0 but has quality
    assert video_pairs(vids, WEIGHTS, queries=QUERIES) == []


# Four videos of one query, answers over (align 2.0, quality 1.0, motion 0.5); binary scores.
FOUR = [("prompt A", [True, False, False]),   # 2.0
        ("prompt B", [True, True, False]),    # 3.0
        ("prompt C", [True, True, True]),     # 3.5
        ("prompt D", [False, False, False])]  # 0.0


@pytest.mark.parametrize("order, select, margin, expected", [
    # first: i, then j, in sample order (the official double loop), not the largest gap
    ([0, 1, 2, 3], "first", 0.5, ("prompt A", "prompt D")),   # A over D (gap 2.0) is met first
    ([1, 0, 2, 3], "first", 0.5, ("prompt B", "prompt A")),   # sample order decides, not list order
    ([0, 1, 2, 3], "first", 2.5, ("prompt B", "prompt D")),   # A-D gap 2.0 too small; B-D 3.0
    ([0, 1, 2, 3], "first", 3.5, None),                       # best gap is 3.5: not > 3.5
    ([0, 1, 2, 3], "largest-gap", 0.5, ("prompt C", "prompt D")),
    ([1, 0, 2, 3], "largest-gap", 0.5, ("prompt C", "prompt D")),
])
def test_video_pair_selection_table(order, select, margin, expected):
    """`order`: which of FOUR is sample 0, 1, 2, 3."""
    vids = [video("q1", sample_idx, *FOUR[which]) for sample_idx, which in enumerate(order)]
    got = video_pairs({"q1": vids}, WEIGHTS, margin=margin, select=select, queries=QUERIES)
    assert (None if not got else (got[0]["chosen"], got[0]["rejected"])) == expected


def test_first_is_in_sample_order_whatever_the_input_order():
    vids = [video("q1", i, *FOUR[i]) for i in range(4)]
    assert video_pairs({"q1": vids[::-1]}, WEIGHTS, queries=QUERIES)[0]["chosen"] == "prompt A"


def test_largest_gap_ties_go_to_the_lowest_sample_idx():
    vids = {"q1": [video("q1", 0, "prompt A", [True, True, False]),   # 3.0
                   video("q1", 1, "prompt B", [True, True, False]),   # 3.0 (same gap as A)
                   video("q1", 2, "prompt D", [False, False, False])]}  # 0.0
    (pair,) = video_pairs(vids, WEIGHTS, select="largest-gap", queries=QUERIES)
    assert (pair["chosen"], pair["rejected"]) == ("prompt A", "prompt D")
    vids["q1"].reverse()
    assert video_pairs(vids, WEIGHTS, select="largest-gap", queries=QUERIES)[0]["chosen"] == "prompt A"


def test_unknown_select_or_score_is_an_error():
    with pytest.raises(ValueError, match="select"):
        video_pairs({}, WEIGHTS, select="best")
    with pytest.raises(ValueError, match="score"):
        video_pairs({}, WEIGHTS, score="probabilistic")


def test_two_seeds_of_the_same_prompt_never_pair():
    vids = {"q1": [video("q1", 0, "same prompt", [True, True, True], seed=0),
                   video("q1", 0, "same prompt ", [False, False, False], seed=1)]}
    assert video_pairs(vids, WEIGHTS, queries=QUERIES) == []
    vids["q1"].append(video("q1", 1, "other prompt", [False, False, False], seed=0))
    (pair,) = video_pairs(vids, WEIGHTS, queries=QUERIES)
    assert (pair["chosen"], pair["rejected"]) == ("same prompt", "other prompt")
    assert pair["scores"]["chosen_seed"] == 0


def test_one_video_pair_per_query_and_queries_without_pairs_skipped():
    vids = {"q1": [video("q1", i, f"prompt {i}", ans) for i, ans in
                   enumerate([[True, True, True], [True, False, False], [False, False, False]])],
            "q2": [video("q2", 0, "only one video", [True, True, True])]}
    pairs = video_pairs(vids, WEIGHTS, queries=QUERIES)
    assert [p["query_id"] for p in pairs] == ["q1"]


def test_checklist_missing_a_weighted_question_is_an_error():
    bad = video("q1", 1, "prompt B", [True, True])  # no "motion" answer
    with pytest.raises(ValueError, match="query_id 'q1' sample_idx 1: checklist lacks question"):
        video_pairs({"q1": [video("q1", 0, "prompt A", [True, True, True]), bad]}, WEIGHTS, queries=QUERIES)


# ----------------------------------------------------------------------------- DPO set

def _pairs():
    texts = text_pairs([cand("q1", 0, "a cat", verdict=False, refined="A cat plays piano."),
                        cand("q1", 1, "cat piano", verdict=False, refined="A cat at a piano."),
                        cand("q2", 0, "city", verdict=False, refined="A city skyline at night.")], QUERIES)
    vids = video_pairs({"q1": [video("q1", 0, "video A", [True, True, True]),
                               video("q1", 1, "video B", [False, False, False])],
                        "q3": [video("q3", 0, "video C", [True, True, True]),
                               video("q3", 1, "video D", [False, False, False])]},
                       WEIGHTS, queries={**QUERIES, "q3": "a waterfall"})
    return texts, vids


def test_dpo_set_text_first_and_one_pair_per_query():
    texts, vids = _pairs()
    rows = build_dpo_set(texts, vids, max_pairs_per_query=1)
    assert [(r["query_id"], r["source"]) for r in rows] == [("q1", "text"), ("q2", "text"), ("q3", "video")]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "A cat plays piano."}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "a cat"}]
    assert tuple(rows[0]) == schema.DPO_COLUMNS


def test_dpo_set_with_more_pairs_per_query_keeps_text_before_video():
    texts, vids = _pairs()
    rows = build_dpo_set(texts, vids, max_pairs_per_query=3)
    assert [(r["query_id"], r["source"]) for r in rows] == [("q1", "text"), ("q1", "text"), ("q2", "text"),
                                                            ("q1", "video"), ("q3", "video")]
    assert json.loads(rows[3]["scores_json"])["gap"] == 3.5


def test_dpo_prompt_is_the_optimizer_chat_prompt_for_the_query():
    texts, vids = _pairs()
    row = build_dpo_set(texts, vids)[1]
    assert row["prompt"] == prompts.optimizer_messages("city at night")
    assert [m["role"] for m in row["prompt"]] == ["user"]  # official: one user turn, no system message


def test_truncated_texts_mark_their_pairs():
    cut = cand("q1", 0, "a cat", verdict=False, refined="A cat plays.", query="a cat")
    cut["refine_truncated"] = True
    (pair,) = text_pairs([cut])
    assert pair["truncated"] is True
    assert build_dpo_set([pair], [])[0]["truncated"] is True
    a, b = video("q1", 0, "prompt A", [True, True, True]), video("q1", 1, "prompt B", [False, False, False])
    assert video_pairs({"q1": [a, b]}, WEIGHTS, queries=QUERIES)[0]["truncated"] is False
    b["truncated"] = True
    assert video_pairs({"q1": [a, b]}, WEIGHTS, queries=QUERIES)[0]["truncated"] is True


def test_dpo_set_skips_repeated_pairs_and_checks_fields():
    texts, _ = _pairs()
    assert len(build_dpo_set(texts + texts, [], max_pairs_per_query=5)) == 3
    with pytest.raises(ValueError, match="text pair 0 .* missing query"):
        build_dpo_set([{**texts[0], "query": ""}], [])
    with pytest.raises(ValueError, match="max_pairs_per_query"):
        build_dpo_set(texts, [], max_pairs_per_query=0)
