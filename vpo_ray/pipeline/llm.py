"""LLM stages: the optimizer that rewrites queries, the judge that critiques and refines.

One `LLMEngine` per actor loads the model once and serves batched, left-padded
`generate` calls. Sampling is seeded per output row (vpo_ray.sampling), so a row's
text depends only on (seed, query_id, sample_idx) and not on which other rows shared
its batch: a rerun after a killed actor reproduces the same content.

The local judge reads its verdict by forced choice: after its step-by-step reasoning,
the prompt is continued with "Final Judgement (Yes or No):" and the next-token
probabilities of Yes vs No decide. A verdict is never unparseable and carries a
confidence; the tiny preset's random models still drive every branch.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from vpo_ray import prompts
from vpo_ray.config import JudgeEndpointConfig, SamplingConfig
from vpo_ray.models import random_weights
from vpo_ray.sampling import cut_at_stop, forced_length, row_sampler
from vpo_ray.schema import Judgement

log = logging.getLogger(__name__)


def row_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from the run seed and a row's identity."""
    h = hashlib.sha256(json.dumps([seed, *keys], default=str).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Completion:
    """One generated row: its text (cut at the first stop string), why it ended, its length.

    finish_reason is "stop" when the model ended it (EOS or a stop string) and "length"
    when it ran into its token limit: callers turn a cut rewrite or critique into an
    error row instead of using it as if it were complete.
    """
    text: str
    finish_reason: str  # "stop" | "length"
    n_tokens: int  # generated tokens up to (not counting) EOS


class LLMEngine:
    """A causal LM loaded once; batched generation and forced-choice scoring."""

    def __init__(self, model: str, device: Optional[str] = None, dtype: Optional[str] = None,
                 max_input_tokens: int = 1536):
        import torch
        from vpo_ray.models.registry import load_causal_lm, yes_no_token_ids

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tok = load_causal_lm(model, device=self.device, dtype=dtype)
        self.model.eval()
        self.model_name = str(model)
        self.yes_ids, self.no_ids = yes_no_token_ids(self.tok)
        self.max_input_tokens = max_input_tokens
        # weights=random: the output model rows end by (vpo_ray/models/random_weights.py); None = real weights
        self.random_outputs = random_weights.outputs_of(self.model)

    def _encode(self, messages_list: Sequence[list], prefills: Optional[Sequence[str]] = None):
        texts = []
        for i, msgs in enumerate(messages_list):
            t = self.tok.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True)
            texts.append(t + (prefills[i] if prefills else ""))
        self.tok.truncation_side = "left"  # keep the end of the prompt: the question being asked
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                       truncation=True, max_length=self.max_input_tokens)
        return {k: v.to(self.device) for k, v in enc.items()}

    def generate(self, messages_list: Sequence[list], row_seeds: Sequence[int], sampling: SamplingConfig,
                 prefills: Optional[Sequence[str]] = None, stop: Sequence[str] = (),
                 max_new_tokens: Optional[Sequence[int]] = None,
                 forced_lengths: Optional[Sequence[int]] = None) -> list[Completion]:
        """One completion per message list; row i is sampled with generator seeded row_seeds[i].

        `max_new_tokens` (per row) lowers a row's limit below `sampling.max_new_tokens`.
        `forced_lengths` (per row; weights=random, whose models never stop on their own): row
        i ends after exactly forced_lengths[i] tokens as a natural stop (EOS is masked before
        and forced there; finish_reason "stop", n_tokens == forced_lengths[i]), unless its
        limit comes first ("length"). Stop strings still cut the text.
        """
        torch = self.torch
        if not messages_list:
            return []
        limits = [min(int(m), sampling.max_new_tokens) for m in max_new_tokens] if max_new_tokens is not None \
            else [sampling.max_new_tokens] * len(messages_list)
        enc = self._encode(messages_list, prefills)
        processors = []
        if forced_lengths is not None:
            processors.append(forced_length(forced_lengths, limits, enc["input_ids"].shape[1], self.tok.eos_token_id))
        kwargs: dict = dict(max_new_tokens=max(limits), do_sample=False, num_beams=1,
                            pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
                            temperature=None, top_p=None, top_k=None)  # sampling is the row sampler's job
        if len(set(limits)) > 1:
            processors.append(row_length_limit(limits, enc["input_ids"].shape[1], self.tok.eos_token_id))
        if sampling.temperature > 0:
            n = len(row_seeds)
            processors.append(row_sampler([sampling.temperature] * n, [sampling.top_p] * n, list(row_seeds),
                                          self.device))
        if processors:
            kwargs["logits_processor"] = processors
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        return [self._completion(row, limit, stop) for row, limit in zip(out[:, enc["input_ids"].shape[1]:], limits)]

    def _completion(self, ids, limit: int, stop: Sequence[str]) -> Completion:
        ids = ids.tolist()
        eos = self.tok.eos_token_id
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        end = next((k for k, t in enumerate(ids) if t in eos_ids), None)
        n = len(ids) if end is None else end
        n = min(n, limit)  # an EOS at position `limit` is the row limit's, not the model's
        raw = self.tok.decode(ids[:n], skip_special_tokens=True)
        text = cut_at_stop(raw, stop)
        ended = (end is not None and end < limit) or len(text) < len(raw)
        return Completion(text=text.strip(), finish_reason="stop" if ended else "length", n_tokens=n)

    def yes_probability(self, messages_list: Sequence[list], prefills: Sequence[str]) -> np.ndarray:
        """P(Yes) / (P(Yes) + P(No)) of the next token after each prefill."""
        torch = self.torch
        enc = self._encode(messages_list, prefills)
        with torch.inference_mode():
            logits = self.model(**enc).logits[:, -1, :].float()
        probs = logits.softmax(-1)
        p_yes = probs[:, self.yes_ids].sum(-1)
        p_no = probs[:, self.no_ids].sum(-1)
        return (p_yes / (p_yes + p_no).clamp_min(1e-12)).cpu().numpy()


_ENGINES: dict = {}


def shared_engine(model: Any, device: Optional[str] = None) -> LLMEngine:
    """The process's LLMEngine for (model, device): stages in one actor that use one model share its weights."""
    key = (LLMEngine, model, device)  # the class too: a test that swaps LLMEngine gets its own
    if key not in _ENGINES:
        _ENGINES[key] = LLMEngine(model, device=device)
    return _ENGINES[key]


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




# ---------------------------------------------------------------------------- rewrite stage

class Rewriter:
    """Ray Data stage: each query row gains `candidates_json` = K optimizer rewrites."""

    def __init__(self, model: str, num_samples: int, sampling: dict, seed: int = 0, device: Optional[str] = None):
        self.engine = shared_engine(model, device)
        self.k = num_samples
        self.sampling = SamplingConfig(**sampling)
        self.seed = seed

    def __call__(self, batch: dict) -> dict:
        n = len(batch["query_id"])
        msgs, seeds, owners = [], [], []
        for i in range(n):
            if batch["error"][i]:
                continue
            for j in range(self.k):
                msgs.append(prompts.optimizer_messages(str(batch["text"][i])))
                seeds.append(row_seed(self.seed, "rewrite", batch["query_id"][i], j))
                owners.append((i, j))
        texts = [c.text for c in self.engine.generate(
            msgs, seeds, self.sampling, stop=("\nUser Query:",),
            **random_weights.stage_lengths(self.engine, "rewrite", seeds, self.sampling.max_new_tokens))]
        per_row: list[list[dict]] = [[] for _ in range(n)]
        for (i, j), text in zip(owners, texts):
            parsed = prompts.parse_video_prompt(text)
            cand = {"sample_idx": j, "prompt": parsed if isinstance(parsed, str) else "",
                    "judge": None, "refined": None,
                    "error": "" if isinstance(parsed, str) else f"rewrite: {parsed.reason}"}
            per_row[i].append(cand)
        out = dict(batch)
        errors = list(batch["error"])
        stages = list(batch["error_stage"])
        cands_json = []
        for i in range(n):
            if not errors[i] and not any(c["prompt"] for c in per_row[i]):
                errors[i], stages[i] = "rewrite: no usable rewrite among samples", "rewrite"
            cands_json.append(json.dumps(per_row[i], ensure_ascii=False))
        out["candidates_json"] = np.array(cands_json, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["error_stage"] = np.array(stages, dtype=object)
        return out


# ---------------------------------------------------------------------------- critique + refine

class LocalJudge:
    """Judge back-end on a local model: reasoning, then forced Yes/No; refine by prefill."""

    def __init__(self, model: str, sampling: SamplingConfig, seed: int, device: Optional[str] = None):
        self.engine = shared_engine(model, device)
        self.sampling = sampling
        self.seed = seed

    def judge(self, items: list[tuple[str, str, str, int]]) -> list[Judgement | str]:
        """items: (query_id, query, prompt, sample_idx) -> Judgement, or an error string."""
        msgs = [prompts.judge_messages(q, p) for _, q, p, _ in items]
        seeds = [row_seed(self.seed, "judge", qid, j) for qid, _, _, j in items]
        head = "Step-by-step verification:"
        reasoning = [c.text for c in self.engine.generate(
            msgs, seeds, self.sampling, prefills=[head] * len(items), stop=(prompts.JUDGE_ANSWER_PREFIX, "Final Judg"),
            **random_weights.stage_lengths(self.engine, "critique", seeds, self.sampling.max_new_tokens))]
        prefills = [f"{head} {r}\n{prompts.JUDGE_ANSWER_PREFIX}" for r in reasoning]
        p_yes = self.engine.yes_probability(msgs, prefills)
        out = []
        for p, r, s in zip(p_yes, reasoning, seeds):
            verdict = self.decide(float(p), s)
            out.append(Judgement(verdict=verdict, confidence=float(p if verdict else 1 - p), reasons=r))
        return out

    def decide(self, p_yes: float, seed: int) -> bool:
        """Greedy at temperature 0; otherwise the verdict token is sampled like any other
        (the paper's judge ran at temperature 0.7), seeded per row for reproducibility."""
        outputs = getattr(self.engine, "random_outputs", None)
        if outputs is not None:  # weights=random: verdicts at the configured pass rate
            return random_weights.judge_passes(outputs, seed)
        t = self.sampling.temperature
        if t <= 0:
            return p_yes >= 0.5
        ly, ln = np.log(max(p_yes, 1e-12)) / t, np.log(max(1 - p_yes, 1e-12)) / t
        p = 1.0 / (1.0 + np.exp(ln - ly))
        return bool(np.random.default_rng(seed).random() < p)

    def refine(self, items: list[tuple[str, str, str, int, str]]) -> list[str]:
        """items: (query_id, query, prompt, sample_idx, judge_reasons) -> refined prompt or ''."""
        msgs = []
        for _, q, p, _, reasons in items:
            judge_out = f"Step-by-step verification: {reasons}\n{prompts.JUDGE_ANSWER_PREFIX} No"
            msgs.append(prompts.refine_messages(q, p, judge_out))
        seeds = [row_seed(self.seed, "refine", qid, j) for qid, _, _, j, _ in items]
        # Prefill the answer marker: the model writes the refined prompt and stops at [[end]].
        prefill = "Final Refined Prompt: [[start]] "
        texts = [c.text for c in self.engine.generate(
            msgs, seeds, self.sampling, prefills=[prefill] * len(items), stop=("[[end]]",),
            **random_weights.stage_lengths(self.engine, "refine", seeds, self.sampling.max_new_tokens))]
        out = []
        for t in texts:
            parsed = prompts.parse_refinement(prefill + t + " [[end]]")
            out.append(parsed.prompt if not isinstance(parsed, prompts.ParseFailure) else "")
        return out


class Critic:
    """Ray Data stage: judge every candidate; refine the rejected ones."""

    def __init__(self, model: str, sampling: dict, endpoint: dict, refine: bool = True, seed: int = 0,
                 device: Optional[str] = None):
        self.sampling = SamplingConfig(**sampling)
        ep = JudgeEndpointConfig(**endpoint)
        if ep.base_url:
            from vpo_ray.pipeline.judge_http import HttpJudge
            self.backend = HttpJudge(ep, self.sampling)
        else:
            self.backend = LocalJudge(model, self.sampling, seed, device=device)
        self.refine_enabled = refine

    def __call__(self, batch: dict) -> dict:
        n = len(batch["query_id"])
        cands = [json.loads(c) if c else [] for c in batch["candidates_json"]]
        todo = [(i, c) for i in range(n) if not batch["error"][i] for c in cands[i] if c["prompt"] and not c["error"]]
        verdicts = self.backend.judge([(batch["query_id"][i], str(batch["text"][i]), c["prompt"], c["sample_idx"])
                                       for i, c in todo])
        for (i, c), v in zip(todo, verdicts):
            if isinstance(v, Judgement):
                c["judge"] = {"verdict": v.verdict, "confidence": v.confidence, "reasons": v.reasons}
            else:
                c["error"] = f"critique: {v}"
        if self.refine_enabled:
            rejected = [(i, c) for i, c in todo if c["judge"] and not c["judge"]["verdict"]]
            refined = self.backend.refine([(batch["query_id"][i], str(batch["text"][i]), c["prompt"], c["sample_idx"],
                                            c["judge"]["reasons"]) for i, c in rejected])
            for (i, c), r in zip(rejected, refined):
                c["refined"] = r or None
                if not r:
                    c["refine_error"] = "refine: empty or unparseable refinement"
        out = dict(batch)
        errors, stages = list(batch["error"]), list(batch["error_stage"])
        for i in range(n):
            if not errors[i] and not any(c.get("judge") for c in cands[i]):
                reasons = sorted({c["error"] for c in cands[i] if c["error"]}) or ["no candidate judged"]
                errors[i], stages[i] = reasons[0], "critique"
        out["candidates_json"] = np.array([json.dumps(c, ensure_ascii=False) for c in cands], dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["error_stage"] = np.array(stages, dtype=object)
        return out
