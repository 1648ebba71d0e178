"""The HF `generate` back-end of the LLM engine: for architectures the static decoder does
not cover, and as the reference the static back-end is tested against.

Rows go in left-padded batches of `max_batch_rows`; per-row limits force EOS once a row has
its tokens, stop strings end rows through `generate`'s own stop-string criterion, and the
per-row sampler (vpo_ray.sampling.RowSampler) draws with the same (seed, step) uniforms as
the static back-end.
"""
from __future__ import annotations

from typing import Sequence


def row_length_limit(limits: Sequence[int], prompt_len: int, eos_token_id):
    """A logits processor that ends row i (forces EOS) once it has generated limits[i] tokens."""
    import torch
    from transformers import LogitsProcessor

    eos = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id

    class RowLengthLimit(LogitsProcessor):
        def __call__(self, input_ids, scores):
            done = torch.tensor([input_ids.shape[1] - prompt_len >= n for n in limits], device=scores.device)
            if done.any():
                scores = scores.clone()
                scores[done] = float("-inf")
                scores[done, eos] = 0.0
            return scores

    return RowLengthLimit()


def no_eos_before_limit(ban: Sequence[bool], eos_ids: Sequence[int]):
    """A logits processor: rows with ban[i] cannot sample EOS (run it before `row_length_limit`,
    which still ends them at their limit)."""
    import torch
    from transformers import LogitsProcessor

    class NoEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            rows = torch.tensor([i for i, b in enumerate(ban) if b], dtype=torch.long, device=scores.device)
            scores = scores.clone()
            scores[rows[:, None], torch.tensor(list(eos_ids), device=scores.device)] = float("-inf")
            return scores

    return NoEos()


def hf_generate_rows(engine, rows: list, stop: Sequence[str]) -> list[list[int]]:
    """Raw generated ids per row (EOS and padding included; the engine cuts them)."""
    import torch

    from vpo_ray.sampling import row_sampler

    out: list = [None] * len(rows)
    pad = engine._pad_id()
    eos = engine.eos_ids or None
    step = max(1, engine.cfg.max_batch_rows)
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        limits = [r.limit for r in chunk]
        width = max(len(r.ids) for r in chunk)
        ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in chunk], device=engine.device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in chunk], device=engine.device)
        processors = []
        if eos and any(r.no_eos for r in chunk):
            processors.append(no_eos_before_limit([r.no_eos for r in chunk], eos))
        if len(set(limits)) > 1 or min(limits) == 0:
            processors.append(row_length_limit(limits, width, eos))
        processors.append(row_sampler([r.temperature for r in chunk], [r.top_p for r in chunk],
                                      [r.seed for r in chunk], engine.device))
        kwargs = dict(max_new_tokens=max(1, max(limits)), do_sample=False, num_beams=1, pad_token_id=pad,
                      eos_token_id=eos, temperature=None, top_p=None, top_k=None, logits_processor=processors)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=engine.tok)
        with torch.inference_mode():
            gen = engine.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for j, new in enumerate(gen[:, width:].tolist()):
            out[start + j] = new
    return out
