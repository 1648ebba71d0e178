"""Seeded per-row sampling for batched `generate` (pipeline stages and the served optimizer), and the
per-row forced lengths that weights=random runs end their rows at (vpo_ray/models/random_weights.py).

Each output row draws from its own torch.Generator, so a row's text depends only on its
seed and prompt, never on which other rows shared the batch: reruns after a killed
actor reproduce the same content, and a seeded request gives the same answer alone or
batched. Rows with temperature 0 stay greedy.
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


def row_sampler_class():
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        """Per-row temperature/top-p sampling with a per-row torch.Generator.

        `generate` runs greedy (do_sample=False); this processor, applied last, turns each
        sampled row's scores into a one-hot choice drawn from that row's own generator, so
        greedy picks exactly the sampled token. Rows with temperature 0 stay greedy.
        """

        def __init__(self, temperatures: list[float], top_ps: list[float], seeds: list[int], device):
            self.temps = temperatures
            self.top_ps = top_ps
            self.gens = []
            for s in seeds:
                g = torch.Generator(device=device)
                g.manual_seed(int(s))
                self.gens.append(g)

        def __call__(self, input_ids, scores):
            rows = [i for i, t in enumerate(self.temps) if t > 0]
            if not rows:
                return scores
            idx = torch.tensor(rows, device=scores.device)
            temps = torch.tensor([self.temps[i] for i in rows], device=scores.device, dtype=torch.float32)
            logits = scores[idx].float() / temps[:, None]
            probs = torch.softmax(logits, dim=-1)
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            top_p = torch.tensor([self.top_ps[i] for i in rows], device=scores.device)[:, None]
            sorted_p = torch.where(cum - sorted_p >= top_p, torch.zeros_like(sorted_p), sorted_p)  # keep >= 1 token
            cum = torch.cumsum(sorted_p, dim=-1)
            u = torch.stack([torch.rand((), generator=self.gens[i], device=scores.device) for i in rows])
            pick = torch.searchsorted(cum, (u * cum[:, -1])[:, None]).clamp_(max=cum.shape[-1] - 1)
            chosen = order.gather(-1, pick).squeeze(-1)
            out = scores.clone()
            out[idx] = float("-inf")
            out[idx, chosen] = 0.0
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
