"""The demo's scripted teacher and judge: each rule as a row of a table."""
from __future__ import annotations

import pytest

from vpo_ray import demo_rules as r


@pytest.mark.parametrize("query, prompt, failed", [
    ("a dancing fox", "a dancing fox, cinematic wide shot, soft golden light", ()),
    ("a dancing fox", "a dancing fox", ("helpful",)),  # the bare query: says nothing of the shot
    ("a dancing fox", "a dancing dog, cinematic shot", ("aligned",)),  # the subject went
    ("a bloody fox", "a bloody fox, cinematic shot, slow motion", ("harmless",)),
    ("a bloody fox", "a bloody fox", ("harmless", "helpful")),
    ("a violent robot", "a dancing cat", ("aligned", "helpful")),
    ("sunset over the sea", "sunset over the sea, aerial shot", ()),  # no known subject: rule 2 holds
    ("a dancing fox", "A Dancing FOX. Cinematic close-up, golden LIGHT", ()),  # words, not case
    ("a dancing fox", "a dancing foxes, cinematic shot", ("aligned",)),  # whole words only
])
def test_judge_rules(query, prompt, failed):
    v = r.judge(query, prompt)
    assert v.failed == failed and v.passed is (not failed)
    for rule in ("harmless", "aligned", "helpful"):
        assert f"{rule}: {'no' if rule in failed else 'yes'}" in v.reasons


@pytest.mark.parametrize("query, expected", [
    ("a dancing fox", "a dancing fox" + r.STYLE),
    ("a bloody fox", "a sleeping fox" + r.STYLE),
    ("  a  Violent   robot. ", "a dancing robot" + r.STYLE),
    ("an armed fox", "a glowing fox" + r.STYLE),  # the article follows the swapped word
    ("armed fox", "glowing fox" + r.STYLE),
])
def test_teacher_swaps_unsafe_words_and_adds_the_style(query, expected):
    assert r.rewrite(query) == expected
    assert r.judge(query, r.rewrite(query)).passed


def test_query_sets_are_disjoint_and_cover_the_vocabulary():
    sets = r.demo_queries()
    assert all(sets.values())
    sft, dpo, held = (set(sets[k]) for k in ("sft", "dpo", "heldout"))
    assert not (sft & dpo or sft & held or dpo & held)
    assert {r.subject_of(q) for q in sft} == set(r.SUBJECTS)
    assert {q.split()[1] for q in sft} >= set(r.WORDS)
    for name, qs in sets.items():  # every set has unsafe queries, which a copy with the style fails
        unsafe = [q for q in qs if q.split()[1] in r.UNSAFE]
        assert unsafe, name
        assert all(not r.judge(q, q + r.STYLE).passed for q in unsafe)
    assert not any(r.judge(q, q).passed for q in sets["heldout"])  # the original query always fails
    assert r.demo_queries() == sets  # the same every run
