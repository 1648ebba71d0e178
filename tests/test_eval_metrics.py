"""Evaluation metrics on hand-made judge outputs with known answers (pure numpy, no Ray)."""
import numpy as np
import pytest

from vpo_ray.data.checklist import ChecklistItem, load_checklist

DEFAULT_CHECKLIST = load_checklist("vpo_ray").items
from vpo_ray.eval import metrics as M
from vpo_ray.eval import report


def test_rate_is_the_percentage_and_its_interval_contains_it():
    r = M.rate([True, False, False, True, True], n_boot=500, seed=1)
    assert r["value"] == pytest.approx(60.0)
    assert r["n"] == 5
    lo, hi = r["ci"]
    assert 0.0 <= lo <= 60.0 <= hi <= 100.0 and lo < hi
    assert M.rate([True] * 7, n_boot=200)["ci"] == [100.0, 100.0]  # no spread to resample
    assert M.rate([], n_boot=200) == {"value": None, "ci": None, "n": 0}
    assert M.rate([True, False], n_boot=0)["ci"] is None  # bootstrap=0: no intervals


def test_interval_shrinks_with_more_queries():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        flags = rng.random(n) < 0.3
        r = M.rate(flags, n_boot=1000, seed=0)
        assert r["ci"][0] <= r["value"] <= r["ci"][1]
        widths.append(r["ci"][1] - r["ci"][0])
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < 5.0  # ~ 2 * 1.96 * sqrt(.21/2000) * 100 = 4.0 points


def test_bootstrap_is_seeded_and_uses_the_requested_level():
    x = np.arange(50) % 7
    assert M.bootstrap_ci(x, 300, seed=3) == M.bootstrap_ci(x, 300, seed=3)
    assert M.bootstrap_ci(x, 300, seed=3) != M.bootstrap_ci(x, 300, seed=4)
    lo90, hi90 = M.bootstrap_ci(x, 2000, seed=0, ci=0.90)
    lo99, hi99 = M.bootstrap_ci(x, 2000, seed=0, ci=0.99)
    assert lo99 < lo90 < x.mean() < hi90 < hi99


def test_text_metrics_count_errors_and_unjudged_rows_apart():
    rows = [
        {"query_id": "a", "error": "", "prompt": "one two", "aligned": True, "unsafe": False, "imprecise": False, "refusal": False},
        {"query_id": "b", "error": "", "prompt": "one two three four", "aligned": False, "unsafe": True, "imprecise": True, "refusal": False},
        {"query_id": "c", "error": "", "prompt": "x", "aligned": True, "unsafe": None, "imprecise": False, "refusal": True},
        {"query_id": "d", "error": "rewrite: empty output", "prompt": "", "aligned": None, "unsafe": None,
         "imprecise": None, "refusal": None},
    ]
    t = M.text_metrics(rows, n_boot=100)
    assert t["prompts"] == 3 and t["errors"] == 1
    assert t["aligned"]["value"] == pytest.approx(200 / 3) and t["aligned"]["n"] == 3
    assert t["unsafe"]["value"] == pytest.approx(50.0) and t["unsafe"]["n"] == 2  # c unjudged
    assert t["unjudged"] == {"aligned": 0, "unsafe": 1, "imprecise": 0, "refusal": 0}
    assert t["imprecise"]["value"] == pytest.approx(100 / 3)
    assert t["refusal"]["value"] == pytest.approx(100 / 3)
    assert t["mean_prompt_words"] == pytest.approx((2 + 4 + 1) / 3)


def test_dimension_scores_are_weighted_means_per_dimension():
    checklist = [ChecklistItem("a1", "q", 2.0, "alignment"), ChecklistItem("a2", "q", 1.0, "alignment"),
                 ChecklistItem("m1", "q", 1.0, "motion"), ChecklistItem("s1", "q", 3.0, "safety")]
    answers = [{"id": "a1", "answer": True, "p_yes": 0.9}, {"id": "a2", "answer": False, "p_yes": 0.3},
               {"id": "m1", "answer": True, "p_yes": 0.6}, {"id": "zz", "answer": True, "p_yes": 1.0}]
    d = M.dimension_scores(answers, checklist, score="soft")
    assert d == pytest.approx({"alignment": (2 * 0.9 + 0.3) / 3, "motion": 0.6})  # no safety answer, unknown id ignored
    # binary (the default, VisionReward/VPO's rule): yes answers count 1, no answers 0
    assert M.dimension_scores(answers, checklist) == pytest.approx({"alignment": 2 / 3, "motion": 1.0})
    assert M.dimensions_of(DEFAULT_CHECKLIST) == ["alignment", "quality", "motion", "physics", "safety"]
    assert M.max_score(checklist) == 7.0
    as_dicts = [{"id": c.id, "weight": c.weight, "dimension": c.dimension} for c in checklist]
    assert M.dimension_scores(answers, as_dicts, score="soft") == pytest.approx(d)


def _video(qid, seed, score, p=0.5, error=""):
    return {"query_id": qid, "seed": seed, "score": score, "error": error,
            "checklist": [] if error else [{"id": c.id, "answer": p >= 0.5, "p_yes": p} for c in DEFAULT_CHECKLIST]}


def test_win_rate_counts_ties_half_and_averages_seeds_within_a_query():
    assert M.win_outcome(5.0, 4.0) == 1.0 and M.win_outcome(4.0, 5.0) == 0.0
    assert M.win_outcome(5.0, 5.0 + 1e-9) == 0.5 and M.win_outcome(5.0, 5.1, tie_tolerance=0.2) == 0.5
    baseline = {("q1", 0): 5.0, ("q1", 1): 5.0, ("q2", 0): 6.0, ("q3", 0): 3.0}
    videos = [_video("q1", 0, 6.0), _video("q1", 1, 5.0),  # q1: win + tie = 0.75
              _video("q2", 0, 4.0),  # q2: loss = 0
              _video("q3", 0, 3.0),  # q3: tie = 0.5
              _video("q4", 0, 9.0),  # q4: the original has no video for it: not a pair
              _video("q5", 0, 0.0, error="render: boom")]
    v = M.video_metrics(videos, DEFAULT_CHECKLIST, n_boot=500, baseline=baseline)
    w = v["win_rate"]
    assert w["value"] == pytest.approx(100 * (0.75 + 0 + 0.5) / 3)
    assert (w["pairs"], w["wins"], w["ties"], w["losses"]) == (4, 1, 2, 1)
    assert w["n"] == 3 and w["ci"][0] <= w["value"] <= w["ci"][1]
    assert v["videos"] == 5 and v["errors"] == 1
    # score: per query mean over seeds (q1: 5.5), then over queries
    assert v["score"]["value"] == pytest.approx((5.5 + 4.0 + 3.0 + 9.0) / 4)
    assert "win_rate" not in M.video_metrics(videos, DEFAULT_CHECKLIST, n_boot=10)  # no baseline given


def test_per_dimension_means_over_queries_in_percent():
    videos = [_video("q1", 0, 1.0, p=0.2), _video("q1", 1, 1.0, p=0.4), _video("q2", 0, 1.0, p=0.9)]
    v = M.video_metrics(videos, DEFAULT_CHECKLIST, n_boot=200, score="soft")
    for d in ("alignment", "quality", "motion", "physics", "safety"):
        assert v["dimensions"][d]["value"] == pytest.approx(100 * (0.3 + 0.9) / 2)
        lo, hi = v["dimensions"][d]["ci"]
        assert 30.0 - 1e-9 <= lo <= hi <= 90.0 + 1e-9
    binary = M.video_metrics(videos, DEFAULT_CHECKLIST, n_boot=0)  # q1: no, no -> 0; q2: yes -> 1
    assert binary["dimensions"]["alignment"]["value"] == pytest.approx(100 * (0.0 + 1.0) / 2)


def test_markdown_table_has_the_papers_columns_and_intervals():
    stat = {"value": 12.5, "ci": [5.0, 20.0], "n": 8}
    entry = {"text": {m: stat for m in M.TEXT_METRICS} | {"prompts": 8},
             "video": {"score": {"value": 6.25, "ci": [6.0, 6.5], "n": 8},
                       "dimensions": {d: stat for d in M.dimensions_of(DEFAULT_CHECKLIST)}}}
    challenger = {"text": entry["text"], "video": dict(entry["video"], win_rate={"value": 62.5, "ci": [40.0, 80.0]})}
    result = {"metrics": {"original": entry, "sft": challenger}, "checklist": [c.__dict__ for c in DEFAULT_CHECKLIST],
              "seeds_per_prompt": 1, "n_queries": 8, "queries": "builtin:tiny", "preset": "tiny", "ci": 0.95,
              "bootstrap": 100}
    md = report.markdown_table(result)
    header = next(line for line in md.splitlines() if line.startswith("| Source"))
    for col in ("Aligned", "Unsafe", "Imprecise", "Refusal", "Score", "Alignment", "Quality", "Motion", "Physics",
                "Safety", "Win vs original"):
        assert col in header
    rows = [line for line in md.splitlines() if line.startswith("| original") or line.startswith("| sft")]
    assert len(rows) == 2
    assert "12.5 [5.0, 20.0]" in rows[0] and "6.25 [6.00, 6.50]" in rows[0] and "| — |" in rows[0]
    assert "62.5 [40.0, 80.0]" in rows[1]
    assert rows[0].count("|") == header.count("|")
    assert report.fmt(None) == "—" and report.fmt({"value": 1.0, "ci": None}) == "1.0"
