"""The local LLM engine's contract: per-row seeded sampling, per-row limits, finish reasons."""
from __future__ import annotations

import pytest

from vpo_ray.config import SamplingConfig
from vpo_ray.pipeline.llm import LLMEngine


@pytest.fixture(scope="module")
def engine(tiny_cache):
    from vpo_ray.models.registry import get_spec, model_path

    return LLMEngine(model_path(get_spec("tiny", "optimizer")), device="cpu")


def _msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_row_limits_and_finish_reasons(engine):
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0)
    rows = [_msgs("a dog"), _msgs("a cat on a mat"), _msgs("city at night")]
    out = engine.generate(rows, [1, 2, 3], sampling, max_new_tokens=[3, 12, 7])
    assert [c.n_tokens <= lim for c, lim in zip(out, (3, 12, 7))] == [True, True, True]
    for c, lim in zip(out, (3, 12, 7)):
        # a random tiny model rarely emits EOS: a row that used its whole limit is "length"
        assert c.finish_reason == ("length" if c.n_tokens == lim else "stop")
    assert out[0].finish_reason == "length" or out[0].n_tokens < 3


def test_a_row_is_the_same_alone_or_batched_with_other_limits(engine):
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.9, top_p=0.95)
    alone = engine.generate([_msgs("a red kite")], [7], sampling, max_new_tokens=[6])[0]
    batched = engine.generate([_msgs("waves crashing on rocks at dusk"), _msgs("a red kite")], [9, 7], sampling,
                              max_new_tokens=[10, 6])[1]
    assert batched == alone


def test_forced_lengths_end_rows_as_natural_stops(engine):
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0)
    rows = [_msgs("a dog"), _msgs("a cat on a mat"), _msgs("city at night")]
    out = engine.generate(rows, [1, 2, 3], sampling, forced_lengths=[4, 9, 30])
    assert [c.n_tokens for c in out] == [4, 9, 12]
    assert [c.finish_reason for c in out] == ["stop", "stop", "length"]  # 30 is past the limit of 12
    # forced lengths sit beside per-row limits: the smaller one decides
    out = engine.generate(rows[:2], [1, 2], sampling, max_new_tokens=[3, 12], forced_lengths=[5, 5])
    assert [(c.n_tokens, c.finish_reason) for c in out] == [(3, "length"), (5, "stop")]
