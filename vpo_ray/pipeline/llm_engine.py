"""The local LLM engine behind rewrite, critique and refine: batched seeded generation and
the forced-choice verdict.

Two back-ends share one contract (`generate` -> Completion per row, `yes_probability`):

- static (Llama / Qwen2 / Mistral): vpo_ray.pipeline.decoder's own decode loop over the HF
  model's weights. Rows are admitted into the slots of a static KV cache, shortest prompts
  first, in prefill batches bounded by a token budget; the decode step advances every live
  row, is captured as a CUDA graph per KV-length bucket, and runs `sync_every` steps between
  host checks. A finished row's slot is refilled from the queue at the next check (continuous
  batching), prompts optionally cached in bounded pieces between decode runs, the top-p draw
  made within the top-k tokens unless a row needs the full sort (vpo_ray.pipeline.scheduler,
  vpo_ray.sampling), and stop strings end rows at those checks, not after the whole batch is done.
- hf: `model.generate` with the same per-row sampler (vpo_ray.sampling) as a logits
  processor; for other architectures, or `LLMEngineConfig(backend="hf")`.

Either way a row's draw at step t is hash(seed, t) (vpo_ray.sampling), so on CPU a row's
text depends only on its seed and prompt, never on its batch, its slot, or when it was
admitted. The verdict is a prefill only: prompts sorted by length, packed into batches of
at most `prefill_tokens` (right-padded to the longest in the batch), and P(Yes)/(P(Yes)+P(No))
read from the last position's logits; no decode loop.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from vpo_ray.config import LLMEngineConfig, SamplingConfig
from vpo_ray.models import random_weights
from vpo_ray.sampling import cut_at_stop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """One generated row: its text (cut at the first stop string), why it ended, its length.

    finish_reason is "stop" when the model ended it (EOS, a stop string, or a forced length)
    and "length" when it ran into its token limit: callers turn a cut rewrite or critique
    into an error row instead of using it as if it were complete.
    """
    text: str
    finish_reason: str  # "stop" | "length"
    n_tokens: int  # generated tokens up to (not counting) EOS; up to the end of a stop string


@dataclass
class _Row:
    index: int  # position in the caller's list
    ids: list  # prompt token ids
    seed: int
    temperature: float
    top_p: float
    limit: int  # most tokens this row may generate
    forced: bool  # the limit is a forced length (a natural stop), not a cap
    no_eos: bool = False  # EOS may not end this row (forced lengths: it ends at its limit)


@dataclass
class _RowOut:
    ids: list  # generated ids, EOS and anything after it removed
    ended: str  # "eos" | "limit" | "stop"


def stop_prefix(decode, ids: list, stop: Sequence[str]) -> Optional[int]:
    """The fewest leading tokens of `ids` whose text contains a stop string, or None."""
    if not stop or not any(s in decode(ids) for s in stop):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:  # the text of a longer prefix extends a shorter one's: containment is monotone
        mid = (lo + hi) // 2
        if any(s in decode(ids[:mid]) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    return lo


class LLMEngine:
    """A causal LM loaded once; batched generation and forced-choice scoring."""

    def __init__(self, model, device: Optional[str] = None, dtype: Optional[str] = None,
                 max_input_tokens: int = 1536, config: Optional[LLMEngineConfig] = None, tokenizer=None):
        """`model`: a registry name, local path, hub id or ModelSpec (loaded with its tokenizer),
        or an already built HF causal LM (then `tokenizer` may be None: token-level calls only)."""
        import torch

        self.torch = torch
        self.cfg = config or LLMEngineConfig()
        if isinstance(model, torch.nn.Module):
            self.model, self.tok = model, tokenizer
            self.device = str(device or next(model.parameters()).device)
        else:
            from vpo_ray.models.registry import load_causal_lm

            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model, self.tok = load_causal_lm(model, device=self.device, dtype=dtype)
        self.model.eval()
        self.model_name = getattr(model, "name_or_path", None) or str(model)[:200]
        # weights=random: the output model rows end by (vpo_ray/models/random_weights.py); None = real weights
        self.random_outputs = random_weights.outputs_of(self.model)
        self.max_input_tokens = max_input_tokens
        self.eos_ids = self._eos_ids()
        self.yes_ids = self.no_ids = None
        if self.tok is not None:
            from vpo_ray.models.registry import yes_no_token_ids

            self.yes_ids, self.no_ids = yes_no_token_ids(self.tok)
        self.backend = self._pick_backend()
        self._weights = None
        self._batch = None  # the current DecodeBatch, reused while shapes fit
        self.stats: dict = {}

    def _eos_ids(self) -> list[int]:
        ids = []
        for src in (getattr(self.model, "generation_config", None), self.tok):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
                if e is not None and int(e) not in ids:
                    ids.append(int(e))
        return ids

    def _pick_backend(self) -> str:
        from vpo_ray.pipeline.decoder import unsupported_reason

        want = self.cfg.backend
        reason = unsupported_reason(self.model)
        if want == "static" and reason:
            raise ValueError(f"LLMEngine backend=static cannot run {self.model_name}: {reason}")
        if want == "auto" and reason:
            log.info("LLMEngine: %s; using HF generate", reason)
        return "hf" if want == "hf" or reason else "static"

    @property
    def weights(self):
        """The static decoder's view of the weights, shared by every engine on this model (fused once)."""
        if self._weights is None:
            from vpo_ray.pipeline.decoder import DecoderWeights

            self._weights = getattr(self.model, "_vpo_decoder_weights", None) or DecoderWeights(self.model)
            self.model._vpo_decoder_weights = self._weights
        return self._weights

    def prepare(self, rows: int, prompt_tokens: int, new_tokens: int) -> None:
        """Size the KV cache for `rows` rows of up to `prompt_tokens` + `new_tokens` now (static
        back-end), so later calls that fit reuse it and the CUDA graphs captured on it."""
        if self.backend == "static":
            from vpo_ray.pipeline.scheduler import decode_batch_for

            with self.torch.inference_mode():
                decode_batch_for(self, rows, prompt_tokens + new_tokens, new_tokens, pin=True)

    def release(self) -> None:
        """Free the KV cache and CUDA graphs (the next generate call allocates them again)."""
        self._batch = None

    # ------------------------------------------------------------------ text in, text out

    def prompt_ids(self, messages_list: Sequence[list], prefills: Optional[Sequence[str]] = None) -> list[list[int]]:
        """Chat-templated token ids per row (+ prefill), keeping the last `max_input_tokens`."""
        out = []
        for i, msgs in enumerate(messages_list):
            text = self.tok.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True)
            ids = self.tok(text + (prefills[i] if prefills else ""), add_special_tokens=False)["input_ids"]
            out.append(list(ids[-self.max_input_tokens:]))  # keep the end: the question being asked
        return out

    def generate(self, messages_list: Sequence[list], row_seeds: Sequence[int], sampling: SamplingConfig,
                 prefills: Optional[Sequence[str]] = None, stop: Sequence[str] = (),
                 max_new_tokens: Optional[Sequence[int]] = None,
                 forced_lengths: Optional[Sequence[Optional[int]]] = None) -> list[Completion]:
        """One completion per message list; row i samples with seed row_seeds[i].

        `max_new_tokens` (per row) lowers a row's limit below `sampling.max_new_tokens`.
        `forced_lengths` (per row; weights=random, whose models never stop on their own): row
        i ends after exactly forced_lengths[i] tokens as a natural stop (EOS is masked until
        then; finish_reason "stop", n_tokens == forced_lengths[i]), unless its limit comes
        first ("length", EOS still masked). A None entry leaves that row unforced. Stop
        strings still cut the text.
        """
        if not messages_list:
            return []
        n = len(messages_list)
        if len(row_seeds) != n:
            raise ValueError(f"generate: {n} message lists but {len(row_seeds)} seeds")
        caps = self._limits(n, sampling, max_new_tokens)
        forced = [None] * n if forced_lengths is None else list(forced_lengths)
        if len(forced) != n:
            raise ValueError(f"generate: {n} rows but {len(forced)} forced_lengths")
        is_forced = [f is not None and int(f) < cap for f, cap in zip(forced, caps)]
        limits = [int(f) if yes else cap for f, yes, cap in zip(forced, is_forced, caps)]
        outs = self.generate_ids(self.prompt_ids(messages_list, prefills), row_seeds, [sampling.temperature] * n,
                                 [sampling.top_p] * n, limits, forced=is_forced, stop=stop,
                                 no_eos=[f is not None for f in forced])
        return [self._completion(o, stop) for o in outs]

    @staticmethod
    def _limits(n: int, sampling: SamplingConfig, max_new_tokens) -> list[int]:
        limits = [sampling.max_new_tokens] * n
        if max_new_tokens is not None:
            if len(max_new_tokens) != n:
                raise ValueError(f"generate: {n} rows but {len(max_new_tokens)} max_new_tokens")
            limits = [min(int(m), lim) for m, lim in zip(max_new_tokens, limits)]
        for i, lim in enumerate(limits):
            if lim < 0:
                raise ValueError(f"generate: row {i}: token limit {lim} < 0")
        return limits

    def _completion(self, out: _RowOut, stop: Sequence[str]) -> Completion:
        raw = self.tok.decode(out.ids, skip_special_tokens=True)
        text = cut_at_stop(raw, stop)
        ended = out.ended != "limit" or len(text) < len(raw)
        return Completion(text=text.strip(), finish_reason="stop" if ended else "length", n_tokens=len(out.ids))

    def yes_probability(self, messages_list: Sequence[list], prefills: Sequence[str]) -> np.ndarray:
        """P(Yes) / (P(Yes) + P(No)) of the next token after each prefill."""
        if not messages_list:
            return np.zeros(0)
        return self.yes_probability_ids(self.prompt_ids(messages_list, prefills), self.yes_ids, self.no_ids)

    # ------------------------------------------------------------------ token level

    def generate_ids(self, prompts: Sequence[list], seeds: Sequence[int], temperatures: Sequence[float],
                     top_ps: Sequence[float], limits: Sequence[int], forced: Optional[Sequence[bool]] = None,
                     stop: Sequence[str] = (), no_eos: Optional[Sequence[bool]] = None) -> list[_RowOut]:
        """Generated ids per row (EOS removed) and why each ended ("eos" | "limit" | "stop").

        `forced` rows end at their limit as a natural stop; `no_eos` rows (default: the forced
        ones) cannot end by EOS."""
        forced = forced or [False] * len(prompts)
        no_eos = forced if no_eos is None else no_eos
        rows = [_Row(i, list(p), int(s) & ((1 << 63) - 1), float(t), float(tp), int(lim), bool(f), bool(b))
                for i, (p, s, t, tp, lim, f, b) in enumerate(zip(prompts, seeds, temperatures, top_ps, limits,
                                                                  forced, no_eos))]
        for r in rows:
            if not r.ids:
                raise ValueError(f"generate: row {r.index}: empty prompt")
        if stop and self.tok is None:
            raise ValueError("generate: stop strings need a tokenizer")
        t0 = time.perf_counter()
        outs = self._generate_static(rows, stop) if self.backend == "static" else self._generate_hf(rows, stop)
        self.stats["generate_s"] = time.perf_counter() - t0
        for r, o in zip(rows, outs):
            if o.ended == "limit" and r.forced:
                o.ended = "stop"
        return outs

    def _finish(self, row: _Row, ids: list, stop: Sequence[str]) -> _RowOut:
        """Cut a row's raw generated ids at its first EOS, its limit, or the end of its first stop string."""
        end = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
        ids = ids[:row.limit] if end is None else ids[:min(end, row.limit)]
        ended = "eos" if end is not None and end < row.limit else "limit"
        m = stop_prefix(lambda x: self.tok.decode(x, skip_special_tokens=True), ids, stop) if stop else None
        if m is not None:
            return _RowOut(ids[:m], "stop")
        return _RowOut(ids, ended)

    def yes_probability_ids(self, prompts: Sequence[list], yes_ids, no_ids) -> np.ndarray:
        """Forced-choice P(yes) per prompt from one prefill each, in length-sorted, token-budgeted batches."""
        torch = self.torch
        out = np.zeros(len(prompts))
        t0 = time.perf_counter()
        for chunk in self._prefill_chunks(prompts):
            with torch.inference_mode():
                logits = self._last_logits([prompts[i] for i in chunk])
            probs = logits.float().softmax(-1)
            p_yes, p_no = probs[:, list(yes_ids)].sum(-1), probs[:, list(no_ids)].sum(-1)
            out[chunk] = (p_yes / (p_yes + p_no).clamp_min(1e-12)).cpu().numpy()
        self.stats["verdict_s"] = time.perf_counter() - t0
        return out

    def _prefill_chunks(self, prompts: Sequence[list]) -> list[list[int]]:
        """Row indices grouped shortest first, each group padded to its longest within `prefill_tokens`."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        chunks, cur = [], []
        for i in order:
            if cur and len(prompts[i]) * (len(cur) + 1) > self.cfg.prefill_tokens:
                chunks.append(cur)
                cur = []
            cur.append(i)
        return chunks + [cur] if cur else chunks

    def _last_logits(self, rows: list[list]):
        torch = self.torch
        if self.backend == "hf":  # left-padded HF forward, last position only
            width = max(len(r) for r in rows)
            pad = self._pad_id()
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            return self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
        ids, lengths = self._right_pad(rows)
        return self.weights.last_logits(ids, lengths)

    def _pad_id(self) -> int:
        pad = getattr(self.tok, "pad_token_id", None) if self.tok is not None else None
        return int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))

    def _right_pad(self, rows: list[list]):
        torch = self.torch
        width = max(len(r) for r in rows)
        pad = self._pad_id()
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=self.device)
        return ids, torch.tensor([len(r) for r in rows], dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------ back-ends

    def _generate_hf(self, rows: list[_Row], stop: Sequence[str]) -> list[_RowOut]:
        from vpo_ray.pipeline.hf_generate import hf_generate_rows

        return [self._finish(r, ids, stop) for r, ids in zip(rows, hf_generate_rows(self, rows, stop))]

    def _generate_static(self, rows: list[_Row], stop: Sequence[str]) -> list[_RowOut]:
        from vpo_ray.pipeline.scheduler import SlotScheduler

        with self.torch.inference_mode():
            return SlotScheduler(self, rows, stop).run()
