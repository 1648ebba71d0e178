"""The counter-based per-row sampler: a row's draw depends on (seed, step) only, and the
draws follow the temperature / top-p distribution they claim."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vpo_ray.sampling import row_sampler, row_uniforms, sample_rows, sample_rows_top_k


def test_uniforms_do_not_depend_on_the_batch_and_spread_over_0_1():
    seeds = torch.tensor([0, 1, 2**40 + 7, 2**63 - 1, 12345], dtype=torch.int64)
    steps = torch.tensor([0, 5, 3, 1_000_000, 5], dtype=torch.int64)
    batch = row_uniforms(seeds, steps)
    alone = torch.stack([row_uniforms(seeds[i:i + 1], steps[i:i + 1])[0] for i in range(5)])
    assert torch.equal(batch, alone)
    assert len(set(batch.tolist())) == 5  # different (seed, step) -> different draws
    many = row_uniforms(torch.arange(200_000, dtype=torch.int64) * 7919, torch.full((200_000,), 3))
    assert float(many.min()) >= 0.0 and float(many.max()) < 1.0
    counts = np.histogram(many.numpy(), bins=20, range=(0, 1))[0]
    assert np.abs(counts / 10_000 - 1).max() < 0.05  # each bin within 5 % of 10,000
    steps_of_one_seed = row_uniforms(torch.full((200_000,), 42), torch.arange(200_000))
    assert abs(float(steps_of_one_seed.mean()) - 0.5) < 0.005


def _draws(logits_row, temperature, top_p, n=40_000):
    logits = logits_row[None].expand(n, -1)
    return sample_rows(logits, torch.full((n,), temperature), torch.full((n,), top_p),
                       torch.arange(n, dtype=torch.int64) * 104729 + 11, torch.full((n,), 2, dtype=torch.int64))


def test_sampled_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    freq = np.bincount(_draws(logits, 0.7, 1.0).numpy(), minlength=5) / 40_000
    expected = torch.softmax(logits / 0.7, -1).numpy()
    assert np.abs(freq - expected).max() < 0.01


def test_top_p_keeps_only_the_nucleus_renormalised():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # mass above token 2 is 0.8 < 0.9: kept; above token 3 is 0.95 >= 0.9: dropped
    freq = np.bincount(_draws(probs.log(), 1.0, 0.9).numpy(), minlength=4) / 40_000
    assert freq[3] == 0
    assert np.abs(freq[:3] - np.array([0.5, 0.3, 0.15]) / 0.95).max() < 0.01


def test_temperature_zero_is_greedy_and_rows_mix_settings():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    temps = torch.tensor([0.0, 1.0, 0.0, 0.9])
    out = sample_rows(logits, temps, torch.tensor([1.0, 0.9, 0.5, 1.0]), torch.arange(4), torch.zeros(4, dtype=torch.long))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    for i in range(4):  # each row alone draws what it drew in the batch
        alone = sample_rows(logits[i:i + 1], temps[i:i + 1], torch.tensor([[1.0, 0.9, 0.5, 1.0][i]]),
                            torch.tensor([i]), torch.zeros(1, dtype=torch.long))
        assert alone[0] == out[i]


def test_hf_logits_processor_draws_what_sample_rows_draws():
    scores = torch.randn(3, 30, generator=torch.Generator().manual_seed(1))
    proc = row_sampler([1.0, 0.8, 0.0], [0.95, 1.0, 1.0], [5, 6, 7], "cpu")
    first = proc(torch.zeros(3, 10, dtype=torch.long), scores).argmax(-1)
    second = proc(torch.zeros(3, 11, dtype=torch.long), scores).argmax(-1)  # one token generated: step 1
    temps, tops, seeds = torch.tensor([1.0, 0.8, 0.0]), torch.tensor([0.95, 1.0, 1.0]), torch.tensor([5, 6, 7])
    assert torch.equal(first, sample_rows(scores, temps, tops, seeds, torch.zeros(3, dtype=torch.long)))
    assert torch.equal(second, sample_rows(scores, temps, tops, seeds, torch.ones(3, dtype=torch.long)))


@pytest.mark.parametrize("bad_seed", [-1, 2**64 - 1])
def test_out_of_range_seeds_are_folded_into_63_bits(bad_seed):
    proc = row_sampler([1.0], [1.0], [bad_seed], "cpu")
    assert 0 <= int(proc.seeds[0]) < 2**63


def test_top_k_prefilter_draws_the_full_sorts_tokens_and_names_the_rows_it_cannot_decide():
    """Rows of every shape: flat (the nucleus reaches past k), peaked, ties across the k-th token,
    greedy rows; many seeds, steps and top_p values. Decided rows draw the full sort's token;
    `sample_rows(top_k=...)` (pre-filter, full sort where undecided) equals the full sort everywhere."""
    gen = torch.Generator().manual_seed(0)
    decided = undecided = 0
    for scale in (0.5, 2.0, 5.0, 10.0):  # flat -> peaked
        for top_p in (0.3, 0.9, 0.95, 1.0):
            logits = torch.randn(256, 1000, generator=gen) * scale
            logits[:40, :200] = logits[:40, :200].round()  # many equal values, some at the 64th place
            temps = torch.full((256,), 0.9)
            temps[:4] = 0.0
            tops, seeds = torch.full((256,), top_p), torch.arange(256) * 7 + int(scale * 100)
            steps = torch.arange(256) % 13
            full = sample_rows(logits, temps, tops, seeds, steps)
            fast, open_rows = sample_rows_top_k(logits, temps, tops, seeds, steps, top_k=64)
            assert torch.equal(fast[~open_rows], full[~open_rows]), (scale, top_p)
            assert torch.equal(sample_rows(logits, temps, tops, seeds, steps, top_k=64), full)
            assert not open_rows[:4].any()  # greedy rows need no sort
            decided += int((~open_rows).sum())
            undecided += int(open_rows.sum())
    assert decided > 1000 and undecided > 1000  # both paths were exercised


def test_top_k_prefilter_leaves_rows_undecided_when_the_nucleus_may_reach_past_k():
    # top_k=3, top_p=0.85; the k-th kept token is a sentinel: a token outside may tie with it
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02],  # 3rd kept (0.8 above it): the nucleus may go on
                          [0.6, 0.3, 0.05, 0.03, 0.01, 0.01],  # 0.9 above the 3rd: decided within the top 2
                          [0.4, 0.2, 0.1, 0.1, 0.1, 0.1]])  # 3rd kept and tied with tokens outside: which one?
    _, open_rows = sample_rows_top_k(probs.log(), torch.ones(3), torch.full((3,), 0.85), torch.arange(3),
                                     torch.zeros(3, dtype=torch.long), top_k=3)
    assert open_rows.tolist() == [True, False, True]
