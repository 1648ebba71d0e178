"""LLM stages: the optimizer that rewrites queries, the judge that critiques and refines.

One `LLMEngine` (vpo_ray.pipeline.llm_engine) per actor loads the model once and serves
batched `generate` calls. Sampling is seeded per output row (vpo_ray.sampling), so a row's
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
from typing import Any, Optional

import numpy as np

from vpo_ray import prompts
from vpo_ray.config import JudgeEndpointConfig, LLMEngineConfig, SamplingConfig
from vpo_ray.models import random_weights
from vpo_ray.pipeline.llm_engine import Completion, LLMEngine  # noqa: F401 - the stages' engine, re-exported
from vpo_ray.schema import Judgement

log = logging.getLogger(__name__)


def row_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from the run seed and a row's identity."""
    h = hashlib.sha256(json.dumps([seed, *keys], default=str).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


_ENGINES: dict = {}


def shared_engine(model: Any, device: Optional[str] = None, config: Optional[LLMEngineConfig] = None) -> LLMEngine:
    """The process's LLMEngine for (model, device, engine settings): stages in one actor that use one model
    share its weights (and its KV cache)."""
    config = config or LLMEngineConfig()
    key = (LLMEngine, model, device, config)  # the class too: a test that swaps LLMEngine gets its own
    if key not in _ENGINES:
        _ENGINES[key] = LLMEngine(model, device=device, config=config)
    return _ENGINES[key]


# ---------------------------------------------------------------------------- rewrite stage

class Rewriter:
    """Ray Data stage: each query row gains `candidates_json` = K optimizer rewrites."""

    def __init__(self, model: str, num_samples: int, sampling: dict, seed: int = 0, device: Optional[str] = None,
                 engine: Optional[dict] = None):
        self.engine = shared_engine(model, device, LLMEngineConfig(**(engine or {})))
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

    def __init__(self, model: str, sampling: SamplingConfig, seed: int, device: Optional[str] = None,
                 engine: Optional[dict] = None):
        self.engine = shared_engine(model, device, LLMEngineConfig(**(engine or {})))
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
                 device: Optional[str] = None, engine: Optional[dict] = None):
        self.sampling = SamplingConfig(**sampling)
        ep = JudgeEndpointConfig(**endpoint)
        if ep.base_url:
            from vpo_ray.pipeline.judge_http import HttpJudge
            self.backend = HttpJudge(ep, self.sampling)
        else:
            self.backend = LocalJudge(model, self.sampling, seed, device=device, engine=engine)
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
