"""Templates and parsers: malformed model output never raises, it yields a typed failure."""
import pytest

from vpo_ray import prompts
from vpo_ray.prompts import ParseFailure, ParsedJudgement, ParsedRefinement


def test_templates_carry_the_three_principles_and_the_query():
    msgs = prompts.optimizer_messages("a dog surfing")
    text = msgs[-1]["content"]
    for word in ("Harmless", "Aligned", "Helpful", "a dog surfing"):
        assert word in text
    assert prompts.JUDGE_ANSWER_PREFIX in prompts.judge_messages("q", "p")[-1]["content"]
    ref = prompts.refine_messages("q", "p", "Step-by-step verification: bad\nFinal Judgement (Yes or No): No")
    assert [m["role"] for m in ref] == ["system", "user", "assistant", "user"]
    assert "[[start]]" in ref[-1]["content"]


def test_official_optimizer_turn_is_one_user_message_with_the_raw_query():
    """thu-coai/VPO src/llama3_infer.py: [{'role': 'user', 'content': sys_prompt.format(query)}]."""
    msgs = prompts.optimizer_messages("city at night -ar 16:9 -camera zoom in")
    assert [m["role"] for m in msgs] == ["user"]
    assert msgs[0]["content"].startswith("In this task, your goal is to expand the user's short query")
    assert msgs[0]["content"].endswith("User Query:city at night -ar 16:9 -camera zoom in\n\nVideo Prompt:")


def test_optimizer_input_is_the_query_as_typed_unless_switched():
    row = {"query": "  a cat -ar 16:9 -neg blur ", "text": "a cat"}
    assert prompts.optimizer_input(row) == "a cat -ar 16:9 -neg blur"
    assert prompts.optimizer_input(row, "text") == "a cat"


def test_few_shot_adds_examples():
    assert len(prompts.optimizer_messages("x", few_shot=True)) == 1 + 2 * len(prompts.FEW_SHOT_EXAMPLES)


def test_template_sets_and_files(tmp_path):
    from vpo_ray.config import ConfigError, PromptsConfig

    ours = prompts.load_templates(PromptsConfig(template_set="vpo_ray"))
    assert [m["role"] for m in prompts.optimizer_messages("a cat", ours)] == ["system", "user"]
    own = tmp_path / "opt.txt"
    own.write_text("Rewrite {query} for a video. Braces {like this} stay.", encoding="utf-8")
    t = prompts.load_templates(PromptsConfig(optimizer_template=str(own)))
    assert prompts.optimizer_messages("a cat", t) == [
        {"role": "user", "content": "Rewrite a cat for a video. Braces {like this} stay."}]
    assert t.judge == prompts.default_templates().judge  # the other texts stay the set's
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder here")
    with pytest.raises(ConfigError, match=r"prompts.judge: template .*bad.txt lacks the placeholder\(s\) \{query\}"):
        prompts.load_templates(PromptsConfig(judge_template=str(bad)))
    with pytest.raises(ConfigError, match="cannot read template"):
        prompts.load_templates(PromptsConfig(refine_template=str(tmp_path / "missing.txt")))


@pytest.mark.parametrize("text, verdict", [
    ("Step-by-step verification: fine.\nFinal Judgement (Yes or No): Yes", True),
    ("Step-by-step verification: unsafe.\nFinal Judgement (Yes or No): No", False),
    ("step-by-step verification: ok\nfinal judgement: yes.", True),
    ("Final Judgment (Yes or No): **No**", False),
    ("Final Judgement (Yes or No)： Yes", True),  # full-width colon
    ("分析：不安全\nFinal Judgement (Yes or No): No", False),
    ("Final Judgement (Yes or No): Yes\n...restated: Final Judgement (Yes or No): Yes", True),
])
def test_judgement_parses(text, verdict):
    r = prompts.parse_judgement(text)
    assert isinstance(r, ParsedJudgement) and r.verdict is verdict


def test_judgement_reasons_are_kept():
    r = prompts.parse_judgement("Step-by-step verification: it drops the cat.\nFinal Judgement (Yes or No): No")
    assert r.reasons == "it drops the cat."


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("   \n", "empty"),
    ("Looks good to me.", "marker"),
    ("Final Judgement (Yes or No): maybe", "marker"),
    ("Final Judgement (Yes or No): Yes\nFinal Judgement (Yes or No): No", "conflicting"),
    (None, "empty"),
])
def test_judgement_failures_are_typed(text, why):
    r = prompts.parse_judgement(text)
    assert isinstance(r, ParseFailure) and why in r.reason and not r


@pytest.mark.parametrize("text, prompt", [
    ("Reflection on how to refine the prompt: add the cat.\nFinal Refined Prompt: [[start]] A cat on a sofa. [[end]]",
     "A cat on a sofa."),
    ("[[start]]first[[end]] then [[START]] second one [[END]]", "first"),  # the first block, as process_data.py
    ("Final Refined Prompt: [[start]] \"Quoted prompt\" [[end]]", "Quoted prompt"),
    ("[[start]] 一只猫在钢琴上跳舞 🎹 [[end]]", "一只猫在钢琴上跳舞 🎹"),
])
def test_refinement_parses(text, prompt):
    r = prompts.parse_refinement(text)
    assert isinstance(r, ParsedRefinement) and r.prompt == prompt


def test_multiline_refinement_is_dropped_unless_kept():
    text = "[[start]]\nmulti\nline\n[[end]]"
    assert prompts.parse_refinement(text).reason == prompts.MULTILINE
    assert prompts.parse_refinement(text, keep_multiline=True).prompt == "multi\nline"


def test_refinement_keeps_reflection():
    r = prompts.parse_refinement("Reflection on how to refine the prompt: be safe.\nFinal Refined Prompt: [[start]] x [[end]]")
    assert r.reflection == "be safe."


@pytest.mark.parametrize("text, why", [
    ("", "empty output"),
    ("Final Refined Prompt: A cat.", "no '[[start]]"),
    ("Final Refined Prompt: [[start]] A cat.", "without '[[end]]'"),
    ("[[start]]   [[end]]", "empty refined prompt"),
])
def test_refinement_failures(text, why):
    r = prompts.parse_refinement(text)
    assert isinstance(r, ParseFailure) and why in r.reason


def test_video_prompt_cleanup():
    assert prompts.parse_video_prompt('Video Prompt: "A red fox runs."') == "A red fox runs."
    assert prompts.parse_video_prompt("“A fox.”") == "A fox."
    assert isinstance(prompts.parse_video_prompt("  "), ParseFailure)
    assert isinstance(prompts.parse_video_prompt("ab", min_chars=5), ParseFailure)


def test_yes_no():
    assert prompts.parse_yes_no("Yes, clearly") is True
    assert prompts.parse_yes_no("no.") is False
    assert prompts.parse_yes_no("unsure") is None
