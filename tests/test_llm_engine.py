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


def test_weights_random_rows_end_where_the_reference_forced_length_processor_ends_them(tiny_cache):
    """weights=random: the engine carries the output model, and rows given its drawn lengths end where
    HF `generate` with the reference processors (vpo_ray.sampling.forced_length + row sampler) ends them."""
    import torch

    from vpo_ray.config import RandomOutputsConfig
    from vpo_ray.models import random_weights, registry
    from vpo_ray.sampling import forced_length, row_sampler

    outputs = RandomOutputsConfig(rewrite_tokens=7, length_spread=0.5, min_tokens=2)
    eng = LLMEngine(registry.model_ref("tiny", "optimizer", "random", outputs), device="cpu")
    assert eng.random_outputs == outputs
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.95)
    msgs, seeds = [_msgs(t) for t in ROWS], [31, 32, 33, 34, 35]
    lengths = random_weights.draw_lengths(eng.random_outputs, "rewrite", seeds, sampling.max_new_tokens) + [30]
    msgs, seeds = msgs + [_msgs("one more")], seeds + [36]  # and one row forced past its limit
    assert len(set(lengths)) > 2
    got = eng.generate(msgs, seeds, sampling, forced_lengths=lengths)

    prompts = eng.prompt_ids(msgs)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    processors = [forced_length(lengths, [12] * len(msgs), width, eng.eos_ids),
                  row_sampler([0.9] * len(msgs), [0.95] * len(msgs), seeds, "cpu")]
    with torch.inference_mode():
        ref = eng.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 logits_processor=processors, eos_token_id=eng.eos_ids, pad_token_id=0)[:, width:]
    for i, (row, c) in enumerate(zip(ref.tolist(), got)):
        n = next((k for k, t in enumerate(row) if t in eng.eos_ids), 12)
        assert (c.n_tokens, c.finish_reason) == (min(lengths[i], 12), "stop" if lengths[i] < 12 else "length"), i
        assert n == c.n_tokens and c.text == eng.tok.decode(row[:n], skip_special_tokens=True).strip(), i


# ---------------------------------------------------------------------------- the batched engine

ROWS = ["a red kite", "waves crashing on rocks at dusk", "city", "a fox running through a snowy forest at dawn",
        "two robots"]


def _engine(**cfg):
    from vpo_ray.config import LLMEngineConfig
    from vpo_ray.models.registry import get_spec, model_path

    return LLMEngine(model_path(get_spec("tiny", "optimizer")), device="cpu", config=LLMEngineConfig(**cfg))


def test_a_row_does_not_depend_on_batch_slot_refill_or_waves(engine):
    sampling = SamplingConfig(max_new_tokens=14, temperature=0.9, top_p=0.95)
    msgs, seeds, limits = [_msgs(t) for t in ROWS], [11, 12, 13, 14, 15], [14, 5, 9, 14, 3]
    alone = [engine.generate([m], [s], sampling, max_new_tokens=[lim])[0] for m, s, lim in zip(msgs, seeds, limits)]
    for cfg in ({"max_batch_rows": 2, "sync_every": 3},  # rows wait, then fill slots that others freed
                {"max_batch_rows": 2, "sync_every": 3, "refill_every_check": False, "refill_min_free": 2},
                {"max_batch_rows": 2, "sync_every": 2, "prefill_chunk_tokens": 8},  # prompts cached piece by piece
                {"max_batch_rows": 8, "continuous": False},  # one wave
                {"max_batch_rows": 2, "continuous": False, "prefill_tokens": 16}):  # waves, one-row prefills
        e = _engine(**cfg)
        assert e.generate(msgs, seeds, sampling, max_new_tokens=limits) == alone, cfg
    assert e.stats["prefill_batches"] >= 3 and e.stats["slots"] == 2


def test_queued_rows_take_free_slots_at_every_check_shortest_prompt_first(engine):
    sampling = SamplingConfig(max_new_tokens=14, temperature=0.9, top_p=0.95)
    msgs = [_msgs(t) for t in ROWS] + [_msgs(t + ", seen from above") for t in ROWS]
    seeds, limits = list(range(40, 50)), [3, 14, 5, 9, 2, 11, 4, 7, 13, 6]
    lengths = [len(p) for p in engine.prompt_ids(msgs)]
    runs = {}
    for every_check in (True, False):
        e = _engine(max_batch_rows=4, sync_every=2, refill_every_check=every_check, refill_min_free=3)
        runs[every_check] = (e.generate(msgs, seeds, sampling, max_new_tokens=limits), e.stats["admitted_at_check"],
                             e.stats["decode_steps"])
    assert runs[True][0] == runs[False][0]  # a row's text does not depend on when it got a slot
    for _, admitted, _ in runs.values():  # the queue is served shortest prompt first
        in_queue_order = [admitted[i] for i in sorted(range(10), key=lambda i: lengths[i])]
        assert in_queue_order == sorted(in_queue_order)
    every, waiting = runs[True][1], runs[False][1]
    assert all(a <= b for a, b in zip(every, waiting)) and every != waiting  # no row later, some earlier
    assert runs[True][2] < runs[False][2]  # fuller slots: fewer decode steps for the same rows


def test_chunked_prefill_generates_what_whole_prompt_prefill_does_while_others_decode(engine):
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.95)
    msgs, seeds, limits = [_msgs(t) for t in ROWS], [21, 22, 23, 24, 25], [12, 3, 8, 12, 5]
    whole = _engine(max_batch_rows=2, sync_every=2).generate(msgs, seeds, sampling, max_new_tokens=limits)
    e = _engine(max_batch_rows=2, sync_every=2, prefill_chunk_tokens=8)
    assert e.generate(msgs, seeds, sampling, max_new_tokens=limits) == whole
    s = e.stats
    assert min(len(p) for p in e.prompt_ids(msgs)) > 8  # so every prompt took several pieces
    assert s["prefill_batches"] >= 2 * len(ROWS) and s["prefill_tokens"] == sum(len(p) for p in e.prompt_ids(msgs))
    # some row began decoding checks after it got its slot: its pieces ran between other rows' decode runs
    assert any(b > a for a, b in zip(s["admitted_at_check"], s["started_at_check"]))


def test_top_k_prefilter_generates_what_the_full_sort_does():
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=0.9)
    msgs, seeds = [_msgs(t) for t in ROWS], [5, 6, 7, 8, 9]
    full = _engine(sampler_top_k=0).generate(msgs, seeds, sampling)
    sorted_share = {}
    for k in (64, 4000):  # of a 4096-token vocabulary: the tiny random model is flat, so 64 never decides
        e = _engine(sampler_top_k=k, max_batch_rows=2)
        assert e.generate(msgs, seeds, sampling) == full, k
        sorted_share[k] = e.stats["sampler_full_sort_tokens"] / (e.stats["sampled_tokens"] - len(msgs))
    assert sorted_share[64] == 1.0 and sorted_share[4000] < 0.5


def test_static_backend_generates_what_hf_generate_does():
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9)
    msgs, seeds = [_msgs(t) for t in ROWS[:3]], [3, 4, 5]
    static, hf = _engine(backend="static"), _engine(backend="hf")
    assert static.backend == "static" and hf.backend == "hf"
    assert static.generate(msgs, seeds, sampling) == hf.generate(msgs, seeds, sampling)
    forced = [3, None, 20]  # forced, free, forced past the cap of 10
    assert static.generate(msgs, seeds, sampling, forced_lengths=forced) == \
        hf.generate(msgs, seeds, sampling, forced_lengths=forced)


def test_verdict_prefill_equals_one_forward_per_prompt(engine):
    """The old path read P(Yes) from a plain forward of each prompt; the bucketed prefill must agree."""
    import torch

    from vpo_ray.models.registry import yes_no_probs

    msgs = [_msgs(t) for t in ROWS]
    prefills = ["Step-by-step verification: ok.\nFinal Judgement (Yes or No):"] * 3 + ["x"] * 2
    got = _engine(prefill_tokens=40).yes_probability(msgs, prefills)  # several length buckets
    ref = []
    with torch.inference_mode():
        for ids in engine.prompt_ids(msgs, prefills):
            py, pn = yes_no_probs(engine.model(input_ids=torch.tensor([ids])).logits, engine.yes_ids, engine.no_ids)
            ref.append(float(py / (py + pn)))
    assert abs(got - ref).max() < 1e-5
    assert abs(_engine(backend="hf").yes_probability(msgs, prefills) - ref).max() < 1e-5


def test_stop_strings_end_rows_inside_the_engine(engine):
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, top_p=1.0)
    msgs, seeds = [_msgs(t) for t in ROWS[:2]], [21, 22]
    full = engine.generate(msgs, seeds, sampling)
    stop = full[0].text[len(full[0].text) // 3:][:3]  # a string row 0 writes about a third of the way in
    assert stop.strip() and stop not in full[0].text[:len(full[0].text) // 3]
    e = _engine(sync_every=2)
    cut = e.generate(msgs, seeds, sampling, stop=(stop,))
    assert cut[0].finish_reason == "stop" and cut[0].text == full[0].text[:full[0].text.index(stop)].strip()
    assert cut[0].n_tokens < full[0].n_tokens
    # the row stopped decoding within a check or two of its stop string, not at its 40-token limit
    assert e.stats["sampled_tokens"] - cut[1].n_tokens <= cut[0].n_tokens + 2 * 2 + 4
    assert e.generate(msgs[:1], seeds[:1], sampling, stop=(stop,)) == cut[:1]  # and alone it is the same row


def test_bad_rows_are_named():
    e = _engine()
    with pytest.raises(ValueError, match="3 message lists but 2 seeds"):
        e.generate([_msgs("a")] * 3, [1, 2], SamplingConfig())
    with pytest.raises(ValueError, match="row 1: token limit -1"):
        e.generate([_msgs("a")] * 2, [1, 2], SamplingConfig(), max_new_tokens=[3, -1])


def test_graph_replay_loop_with_a_stand_in_graph(monkeypatch):
    """CUDA graphs cannot be captured on CPU. A stand-in graph that re-runs what would be
    captured checks the replay loop over many KV-length buckets and the fallback to a
    forward-only graph (sampling eagerly) when the whole step cannot be captured."""
    from vpo_ray.pipeline import decoder

    class StandInGraph:
        def __init__(self, fn):
            self.replay = fn

    def capture(self, kv_len, full):
        for _ in range(2):  # warm-up as the real capture does it
            logits = self._forward(kv_len)
            if full:
                self._advance(logits)
        if full:
            raise RuntimeError("operation not permitted when stream is capturing")
        buf = self._forward(kv_len)
        return decoder._Graph(StandInGraph(lambda: buf.copy_(self._forward(kv_len))), buf)

    real_init = decoder.DecodeBatch.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.use_graphs = True

    sampling = SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.95)
    msgs, seeds = [_msgs(t) for t in ROWS], [1, 2, 3, 4, 5]
    eager = _engine(max_batch_rows=2, sync_every=3, kv_bucket=4).generate(msgs, seeds, sampling)
    monkeypatch.setattr(decoder.DecodeBatch, "_capture", capture)
    monkeypatch.setattr(decoder.DecodeBatch, "__init__", init)
    e = _engine(max_batch_rows=2, sync_every=3, kv_bucket=4)
    assert e.generate(msgs, seeds, sampling) == eager
    assert e.stats["graph_mode"] == "forward" and e.stats["graphs"] >= 1


@pytest.mark.slow
def test_compiled_step_generates_what_the_eager_step_does():
    """torch.compile of the step pieces (inductor's CPU back-end here; Triton on GPU)."""
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9)
    msgs, seeds = [_msgs(t) for t in ROWS[:3]], [1, 2, 3]
    assert _engine(compile=True).generate(msgs, seeds, sampling) == _engine().generate(msgs, seeds, sampling)


def test_a_generate_jobs_llm_engine_settings_reach_both_llm_stages(tiny_cache):
    """`vpo generate ... llm_engine.backend=hf max_batch_rows=4`: the rewrite and judge stages run
    with those settings, and one shared actor keeps one engine for both."""
    from vpo_ray.config import GenerateConfig, load_config
    from vpo_ray.pipeline import flow

    cfg = load_config(GenerateConfig, None, ["preset=tiny", "kind=sft", "llm_engine.backend=hf",
                                             "llm_engine.max_batch_rows=4"])
    tiny = flow.resolve_models(cfg)["judge"]
    rewrite, judge = flow.llm_stage_kwargs(cfg, {"optimizer": tiny, "judge": tiny})
    stage = flow.RewriteAndJudge(rewrite=rewrite, judge=judge)
    engine = stage.rewriter.backend.engine  # the Rewriter's local back-end (LocalGenerator)
    assert engine is stage.critic.backend.engine
    assert (engine.backend, engine.cfg.max_batch_rows) == ("hf", 4)
