"""Seeded per-row sampling for batched generation (pipeline engine, HF `generate`, serve), and the
per-row forced lengths that weights=random runs end their rows at (vpo_ray/models/random_weights.py).

Every row draws its uniforms from a counter-based generator: u = hash(row seed, step),
where `step` is how many tokens the row has generated so far. Nothing is stateful and
nothing loops over rows, so one sampling call is a handful of tensor ops over the whole
batch: it runs at batch 256 without a Python loop, fits inside a captured CUDA graph or a
`torch.compile` region, and a row's draw depends only on (seed, step), never on which
other rows share the batch or in which order they were admitted. Rows with temperature 0
stay greedy.

The hash is "lowbias32" (Chris Wellons' integer hash) applied three times to
(step, low 32 bits of the seed, high 31 bits of the seed), computed in int64 tensors with
32-bit products split so that no intermediate overflows int64: the same bits on CPU, on
CUDA and in inductor-generated code. The top 24 bits give a float32 uniform in [0, 1).
"""
from __future__ import annotations

from typing import Sequence


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest of the stop strings; whole if none occurs."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for int64 tensors 0 <= x < 2**32, with every product below 2**49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_uniforms(seeds, steps):
    """float32 uniforms in [0, 1), one per row, from int64 tensors `seeds` (>= 0) and `steps` (>= 0)."""
    import torch

    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    h = _hash32(_hash32(_hash32(steps & _MASK32) ^ lo) ^ hi)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def sample_rows(logits, temperatures, top_ps, seeds, steps, top_k: int = 0):
    """One token id per row: temperature + nucleus (top-p) sampling by inverse CDF over the
    probabilities sorted high to low, with the row's counter-based uniform; greedy where the
    temperature is 0.

    logits (B, V) any float dtype; temperatures, top_ps (B,) float32; seeds, steps (B,) int64.
    A token stays in the nucleus while the mass ranked strictly above it is < top_p (so at
    least one token always stays). Ties keep vocabulary order (stable sort).

    `top_k` > 0 runs the top-k pre-filter (`sample_rows_top_k`) and takes the full sort's
    token for the rows it cannot decide: the same tokens, with both computed (for eager calls;
    the decoder's step sorts only the rows that need it).
    """
    import torch

    probs, u = _probs_and_uniforms(logits, temperatures, seeds, steps)
    chosen = _sample_sorted(probs, top_ps, u)
    if top_k and top_k < probs.shape[-1]:
        fast, undecided = _sample_top_k(probs, top_ps, u, top_k)
        chosen = torch.where(undecided, chosen, fast)
    return torch.where(temperatures > 0, chosen, logits.argmax(dim=-1))


def sample_rows_top_k(logits, temperatures, top_ps, seeds, steps, top_k: int):
    """(token ids, undecided) per row without the full-vocabulary sort: top-p within the `top_k`
    most likely tokens. Where the row's nucleus may reach past them (it keeps a token whose
    probability equals the k-th's: tokens outside may tie with it, and past it the mass is
    unknown), `undecided` is True and the token is not valid: the caller takes
    `sample_rows(...)` for that row. Elsewhere the token is exactly the full sort's: the kept
    probabilities are the full sort's first entries in the same order (ties by vocabulary
    index), and their running sums are the same prefix sums (CPU sums in order; on CUDA the
    scan over k instead of V entries may round a sum's last bit differently, so a draw that
    lands on a boundary can pick the neighbouring token, as bf16 batching already may).
    Fixed shapes, no host sync: capturable in a CUDA graph.
    """
    import torch

    probs, u = _probs_and_uniforms(logits, temperatures, seeds, steps)
    chosen, undecided = _sample_top_k(probs, top_ps, u, min(top_k, probs.shape[-1]))
    greedy = temperatures <= 0
    return torch.where(greedy, logits.argmax(dim=-1), chosen), undecided & ~greedy


def _probs_and_uniforms(logits, temperatures, seeds, steps):
    import torch

    scaled = logits.float() / temperatures.clamp_min(1e-6)[:, None]
    return torch.softmax(scaled, dim=-1), row_uniforms(seeds, steps)


def _sample_sorted(probs, top_ps, u):
    """The full path: every probability sorted high to low (stable), then the nucleus draw."""
    import torch

    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    pick, _ = _nucleus_pick(sorted_p, top_ps, u)
    return order.gather(-1, pick).squeeze(-1)


def _sample_top_k(probs, top_ps, u, k: int):
    """The nucleus draw within the k largest probabilities, ordered as the stable full sort orders them."""
    import torch

    vals, idx = torch.topk(probs, k, dim=-1, sorted=True)
    idx, by_index = torch.sort(idx, dim=-1)  # topk leaves ties in any order: vocabulary order first,
    vals, order = torch.sort(vals.gather(-1, by_index), dim=-1, descending=True, stable=True)  # then stable by value
    pick, keep = _nucleus_pick(vals, top_ps, u)
    undecided = (keep & (vals == vals[:, -1:])).any(-1)  # kept a token tied with the k-th (or all k kept)
    return idx.gather(-1, order.gather(-1, pick)).squeeze(-1), undecided


def _nucleus_pick(sorted_p, top_ps, u):
    """(index into `sorted_p` drawn by inverse CDF over the nucleus (B, 1), nucleus mask (B, N))."""
    import torch

    cum = torch.cumsum(sorted_p, dim=-1)
    keep = cum - sorted_p < top_ps[:, None]
    cum = torch.cumsum(torch.where(keep, sorted_p, torch.zeros_like(sorted_p)), dim=-1)
    target = u * cum[:, -1]
    # right=True: the first index whose cumulative mass exceeds the target. u * total can round up
    # to the total itself: then the last kept token, never a zero-mass one past the nucleus.
    pick = torch.searchsorted(cum, target[:, None], right=True)
    return torch.minimum(pick, (keep.sum(-1, keepdim=True) - 1).clamp_min(0)), keep


def row_sampler_class():
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        """Per-row temperature/top-p sampling for `model.generate(do_sample=False, ...)`.

        `generate` runs greedy; this processor, applied last, turns each row's scores into a
        one-hot choice made by `sample_rows` with the row's seed and step (tokens generated
        so far), so greedy picks exactly the sampled token. The LLM engine's own decode loop
        calls `sample_rows` with the same (seed, step), so both paths draw the same uniforms.
        """

        def __init__(self, temperatures: list[float], top_ps: list[float], seeds: list[int], device):
            self.temps = torch.tensor(temperatures, dtype=torch.float32, device=device)
            self.top_ps = torch.tensor(top_ps, dtype=torch.float32, device=device)
            self.seeds = torch.tensor([int(s) & ((1 << 63) - 1) for s in seeds], dtype=torch.int64, device=device)
            self.prompt_len = None

        def __call__(self, input_ids, scores):
            if self.prompt_len is None:  # first call: nothing generated yet
                self.prompt_len = input_ids.shape[1]
            steps = torch.full_like(self.seeds, input_ids.shape[1] - self.prompt_len)
            chosen = sample_rows(scores, self.temps.to(scores.device), self.top_ps.to(scores.device),
                                 self.seeds.to(scores.device), steps.to(scores.device))
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, chosen[:, None], 0.0)
            return out

    return RowSampler


def row_sampler(temperatures: list[float], top_ps: list[float], seeds: list[int], device):
    """A logits processor to pass to `model.generate(do_sample=False, logits_processor=[...])`."""
    return row_sampler_class()(temperatures, top_ps, seeds, device)


def forced_length(lengths: Sequence[int], limits: Sequence[int], prompt_len: int, eos_token_id):
    """A logits processor: row i cannot end before lengths[i] tokens and ends right there (below its limit)."""
    import torch
    from transformers import LogitsProcessor

    eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    ends = [int(n) if int(n) < int(lim) else None for n, lim in zip(lengths, limits)]

    class ForcedLength(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt_len
            early = [i for i, n in enumerate(ends) if n is None or step < n]
            now = [i for i, n in enumerate(ends) if n is not None and step == n]
            scores = scores.clone()
            if early:
                scores[torch.tensor(early, device=scores.device)[:, None], torch.tensor(eos, device=scores.device)] = \
                    float("-inf")
            if now:
                rows = torch.tensor(now, device=scores.device)
                scores[rows] = float("-inf")
                scores[rows, eos[0]] = 0.0
            return scores

    return ForcedLength()
