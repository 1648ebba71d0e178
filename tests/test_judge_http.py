"""The OpenAI-compatible judge back-end against a scripted local server on 127.0.0.1."""
import pytest
from chat_server import GOOD_NO, GOOD_YES, REFINED, Script, chat_server

from vpo_ray.config import EndpointConfig, SamplingConfig
from vpo_ray.pipeline.judge_http import HttpJudge
from vpo_ray.schema import Judgement


@pytest.fixture
def server():
    script = Script()
    with chat_server(script) as url:
        yield url, script


def judge(url, truncation="error", keep_multiline=False, sampling=None, **kw):
    cfg = EndpointConfig(base_url=url, max_retries=kw.pop("max_retries", 3), timeout_s=kw.pop("timeout_s", 2.0),
                         backoff_s=0.01, **kw)
    return HttpJudge(cfg, sampling or SamplingConfig(temperature=0.0), truncation=truncation,
                     keep_multiline=keep_multiline)


def test_verdicts_and_reasons(server):
    url, script = server
    script.plan = {"prompt-yes": [("ok", GOOD_YES)], "prompt-no": [("ok", GOOD_NO)]}
    out = judge(url).judge([("q1", "query", "prompt-yes", 0), ("q2", "query", "prompt-no", 0)])
    assert isinstance(out[0], Judgement) and out[0].verdict is True
    assert out[1].verdict is False and "drops the subject" in out[1].reasons


@pytest.mark.parametrize("first", [("status", 429), ("status", 500), ("status", 503), ("garbage", None),
                                   ("schema", None), ("ok", "I think it is fine."), ("sleep", 1.0)])
def test_transient_failures_are_retried(server, first):
    url, script = server
    script.plan = {"P": [first, ("ok", GOOD_NO)]}
    j = judge(url, timeout_s=0.5)
    (v,) = j.judge([("q", "query", "P", 0)])
    assert isinstance(v, Judgement) and v.verdict is False
    assert script.calls["P"] == 2 and j.stats["retries"] == 1


def test_persistent_failure_becomes_an_error_not_an_exception(server):
    url, script = server
    script.plan = {"prompt-down": [("status", 500)], "prompt-mute": [("ok", "no verdict here")]}
    (a, b) = judge(url, max_retries=2).judge([("q", "x", "prompt-down", 0), ("q", "x", "prompt-mute", 1)])
    assert isinstance(a, str) and "HTTP 500" in a and "3 attempts" in a
    assert isinstance(b, str) and "malformed judge output" in b
    assert script.calls["prompt-down"] == 3


def test_client_errors_are_not_retried(server):
    url, script = server
    script.plan = {"P": [("status", 400)]}
    (v,) = judge(url).judge([("q", "x", "P", 0)])
    assert isinstance(v, str) and "HTTP 400" in v and script.calls["P"] == 1


def test_concurrency_is_bounded(server):
    url, script = server
    script.plan = {f"p{i}": [("slow", GOOD_YES)] for i in range(12)}
    out = judge(url, max_concurrency=3).judge([("q", "x", f"p{i}", 0) for i in range(12)])
    assert all(isinstance(v, Judgement) for v in out)
    assert script.max_active <= 3


def test_refine_and_key_from_env(server, monkeypatch):
    url, script = server
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    script.plan = {"Based on your judgement": [("ok", "no markers"), ("ok", REFINED)]}
    j = judge(url, api_key_env="MY_JUDGE_KEY")
    assert j.refine([("q", "a lake", "bad prompt", 0, "drops the lake")]) == [("A calm lake at dawn.", False)]
    assert script.auth[-1] == "Bearer sk-test-123"


def test_refine_failure_is_empty(server):
    url, script = server
    script.plan = {"Based on your judgement": [("status", 500)]}
    (r,) = judge(url, max_retries=1).refine([("q", "a lake", "bad", 0, "r")])
    assert isinstance(r, str) and "HTTP 500" in r


def test_unreachable_endpoint():
    (v,) = judge("http://127.0.0.1:9/v1", max_retries=1, timeout_s=0.5).judge([("q", "x", "p", 0)])
    assert isinstance(v, str) and "connection error" in v


# ---------------------------------------------------------------------------- the official exchange

def test_requests_follow_the_official_calls(server):
    """gpt4o_infer.py: system + user turn, temperature 0.7, no max_tokens, no top_p."""
    url, script = server
    judge(url, sampling=SamplingConfig(temperature=0.7, top_p=1.0)).judge([("q", "a cat -ar 16:9", "A cat.", 0)])
    (body,) = script.bodies
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "You are ChatGPT" in body["messages"][0]["content"]
    assert 'User Query: “a cat -ar 16:9”' in body["messages"][1]["content"]
    assert body["temperature"] == 0.7 and "max_tokens" not in body and "top_p" not in body
    judge(url, max_tokens=512).judge([("q", "a dog", "A dog.", 0)])
    assert script.bodies[-1]["max_tokens"] == 512


def test_refine_turn_follows_the_critique(server):
    url, script = server
    script.plan = {"Based on your judgement": [("ok", REFINED)]}
    judge(url).refine([("q", "a lake", "bad prompt", 0, "drops the lake")])
    msgs = script.bodies[-1]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == "Step-by-step verification: drops the lake\nFinal Judgement (Yes or No): No"
    assert msgs[3]["content"].endswith("Final Refined Prompt: [[start]] xxx [[end]]")


def test_cut_critique_is_truncated_not_a_verdict(server):
    url, script = server
    script.plan = {"P": [("cut", "Step-by-step verification: the prompt")]}
    (v,) = judge(url).judge([("q", "query", "P", 0)])
    assert v == "truncated" and script.calls["P"] == 1  # the same limit again would cut it again


@pytest.mark.parametrize("reply, keep_multiline, expected", [
    ("Reflection: x\nFinal Refined Prompt: [[start]] First. [[end]] [[start]] Second. [[end]]", False,
     ("First.", False)),
    ("[[start]] line one\nline two [[end]]", False, "refined prompt holds a newline"),
    ("[[start]] line one\nline two [[end]]", True, ("line one\nline two", False)),
])
def test_refinement_rules(server, reply, keep_multiline, expected):
    url, script = server
    script.plan = {"Based on your judgement": [("ok", reply)]}
    (r,) = judge(url, keep_multiline=keep_multiline).refine([("q", "a lake", "bad", 0, "r")])
    assert r == expected
    assert script.calls["Based on your judgement"] == 1  # a multi-line refinement is dropped, not asked again


@pytest.mark.parametrize("truncation, expected", [("error", "truncated"), ("keep", ("A calm lake at", True))])
def test_refinement_cut_inside_its_block(server, truncation, expected):
    url, script = server
    script.plan = {"Based on your judgement": [("cut", "Reflection: fine.\nFinal Refined Prompt: [[start]] A calm lake at")]}
    assert judge(url, truncation=truncation).refine([("q", "a lake", "bad", 0, "r")]) == [expected]


def test_complete_block_in_a_reply_cut_later_is_used(server):
    url, script = server
    script.plan = {"Based on your judgement": [("cut", "[[start]] A calm lake. [[end]] and then it rambled")]}
    assert judge(url).refine([("q", "a lake", "bad", 0, "r")]) == [("A calm lake.", False)]
