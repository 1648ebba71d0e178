"""LLM stages: the optimizer that rewrites queries, the judge that critiques and refines.

One `LLMEngine` (vpo_ray.pipeline.llm_engine) per actor loads the model once and serves
batched `generate` calls. Sampling is seeded per output row (vpo_ray.sampling), so a row's
text depends only on (seed, query_id, sample_idx) and not on which other rows shared
its batch: a rerun after a killed actor reproduces the same content.

The stages follow the VPO recipe (docs/FIDELITY.md): the optimizer gets one user turn
built from the query as typed (prompts.py); the rewriter runs on the local optimizer or
on a teacher endpoint; the local judge reasons, then reads its verdict by forced choice
(the next-token P(Yes) vs P(No) after "Final Judgement (Yes or No):", sampled at the
judge's temperature); a rejected prompt is refined after the judge's reflection. A
generation that reaches its token limit is an error "truncated", or is kept and marked
with truncation=keep (the tiny preset's default).
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Optional

import numpy as np

from vpo_ray import prompts
from vpo_ray.config import EndpointConfig, LLMEngineConfig, SamplingConfig
from vpo_ray.models import random_weights
from vpo_ray.pipeline.guard import RowFailure, StageGuard
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

TRUNCATED = "truncated"  # the reason of an item whose generation reached its token limit


class LocalGenerator:
    """The rewriter's local back-end: the optimizer LLM, one seeded row per sample."""

    def __init__(self, model: str, sampling: SamplingConfig, device: Optional[str] = None,
                 engine: Optional[dict] = None):
        self.engine = shared_engine(model, device, LLMEngineConfig(**(engine or {})))
        self.sampling = sampling

    def generate(self, messages_list: list[list[dict]], seeds: list[int]) -> list[Completion | str]:
        # "\nUser Query:" ends a model that starts a new turn by itself (a stop, not a cut).
        return self.engine.generate(messages_list, seeds, self.sampling, stop=("\nUser Query:",),
                                    **random_weights.stage_lengths(self.engine, "rewrite", seeds,
                                                                   self.sampling.max_new_tokens))


class EndpointGenerator:
    """The rewriter's endpoint back-end: a teacher (GPT-4o in the paper) behind an
    OpenAI-compatible API, with the judge's retries, concurrency bound and error accounting."""

    def __init__(self, cfg: EndpointConfig, sampling: SamplingConfig):
        from vpo_ray.pipeline.endpoint import ChatEndpoint

        self.endpoint = ChatEndpoint(cfg, sampling, role="teacher")

    def generate(self, messages_list: list[list[dict]], seeds: list[int]) -> list[Completion | str]:
        def one(item):
            msgs, seed = item
            reply = self.endpoint.call(lambda: self.endpoint.chat(msgs, seed))
            if isinstance(reply, str):  # a Failure
                return str(reply)
            return Completion(reply.text.strip(), "length" if reply.finish_reason == "length" else "stop", 0)

        return self.endpoint.map(one, list(zip(messages_list, seeds)))


def _row_error(stage: str, reasons: list[str], fallback: Optional[str] = None) -> str:
    """A query's error when none of its items made it: the items' one shared reason (e.g.
    "truncated"), else `fallback`, else the first of their reasons."""
    distinct = sorted(set(reasons))
    return f"{stage}: {distinct[0] if len(distinct) == 1 or fallback is None else fallback}"


class Rewriter:
    """Ray Data stage: each query row gains `candidates_json` = K optimizer rewrites.

    The optimizer's input is the query as typed (prompts.optimizer_input, `query`) in the
    template's single user turn. A rewrite that reached its token limit is an error
    "truncated" (truncation=error) or kept with `truncated: true` (truncation=keep).
    """

    def __init__(self, model: str, num_samples: int, sampling: dict, seed: int = 0, device: Optional[str] = None,
                 endpoint: Optional[dict] = None, templates: Optional[prompts.Templates] = None,
                 optimizer_input: str = "query", truncation: str = "error", few_shot: bool = False,
                 engine: Optional[dict] = None, watchdog_s: float = 0.0, strikes_dir: Optional[str] = None):
        self.sampling = SamplingConfig(**sampling)
        ep = EndpointConfig(**(endpoint or {}))
        self.backend = EndpointGenerator(ep, self.sampling) if ep.base_url else \
            LocalGenerator(model, self.sampling, device, engine)
        self.k = num_samples
        self.seed = seed
        self.templates = templates or prompts.default_templates()
        self.input = optimizer_input
        self.keep_cut = truncation == "keep"
        self.few_shot = few_shot
        self.guard = StageGuard("rewrite", watchdog_s, strikes_dir)

    def candidate(self, j: int, out: Completion | str) -> dict:
        cand = {"sample_idx": j, "prompt": "", "judge": None, "refined": None, "error": ""}
        if isinstance(out, str):
            cand["error"] = f"rewrite: {out}"
            return cand
        if out.finish_reason == "length":
            if not self.keep_cut:
                cand["error"] = f"rewrite: {TRUNCATED}"
                return cand
            cand["truncated"] = True
        parsed = prompts.parse_video_prompt(out.text)
        if isinstance(parsed, str):
            cand["prompt"] = parsed
        else:
            cand["error"] = f"rewrite: {parsed.reason}"
        return cand

    def __call__(self, batch: dict) -> dict:
        n = len(batch["query_id"])
        msgs, seeds, owners = [], [], []
        for i in range(n):
            if batch["error"][i]:
                continue
            given = prompts.optimizer_input({"query": batch["query"][i], "text": batch["text"][i]}, self.input)
            for j in range(self.k):
                msgs.append(prompts.optimizer_messages(given, self.templates, few_shot=self.few_shot))
                seeds.append(row_seed(self.seed, "rewrite", batch["query_id"][i], j))
                owners.append((i, j))
        # A row that fails alone (out of GPU memory, ...) is that candidate's error, not the batch's.
        done = self.guard.run(lambda idx: self.backend.generate([msgs[k] for k in idx], [seeds[k] for k in idx]),
                              list(range(len(msgs))), rows=[str(batch["query_id"][i]) for i, _ in owners],
                              keys=[f"{batch['query_id'][i]}/{j}" for i, j in owners])
        per_row: list[list[dict]] = [[] for _ in range(n)]
        for (i, j), out in zip(owners, done):
            per_row[i].append(self.candidate(j, out.reason if isinstance(out, RowFailure) else out))
        out = dict(batch)
        errors = list(batch["error"])
        stages = list(batch["error_stage"])
        for i in range(n):
            if not errors[i] and not any(c["prompt"] for c in per_row[i]):
                reasons = [c["error"].split(": ", 1)[-1] for c in per_row[i]]
                errors[i], stages[i] = _row_error("rewrite", reasons, "no usable rewrite among samples"), "rewrite"
        out["candidates_json"] = np.array([json.dumps(c, ensure_ascii=False) for c in per_row], dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["error_stage"] = np.array(stages, dtype=object)
        return out


# ---------------------------------------------------------------------------- critique + refine

class LocalJudge:
    """Judge back-end on a local model: reasoning, then a forced Yes/No; the refinement
    after a reflection, as the official refine turn asks."""

    def __init__(self, model: str, sampling: SamplingConfig, seed: int, device: Optional[str] = None,
                 templates: Optional[prompts.Templates] = None, truncation: str = "error",
                 keep_multiline: bool = False, reflection: bool = True, engine: Optional[dict] = None):
        self.engine = shared_engine(model, device, LLMEngineConfig(**(engine or {})))
        self.sampling = sampling
        self.seed = seed
        self.templates = templates or prompts.default_templates()
        self.keep_cut = truncation == "keep"
        self.keep_multiline = keep_multiline
        self.reflection = reflection

    def judge(self, items: list[tuple[str, str, str, int]]) -> list[Judgement | str]:
        """items: (query_id, query, prompt, sample_idx) -> Judgement, or an error string.

        A critique cut at its token limit gives no verdict ("truncated"), unless
        truncation=keep: then the verdict is read after the cut reasoning, marked truncated.
        """
        msgs = [prompts.judge_messages(q, p, self.templates) for _, q, p, _ in items]
        seeds = [row_seed(self.seed, "judge", qid, j) for qid, _, _, j in items]
        head = prompts.JUDGE_REASONING_HEAD
        done = self.engine.generate(
            msgs, seeds, self.sampling, prefills=[head] * len(items), stop=(prompts.JUDGE_ANSWER_PREFIX, "Final Judg"),
            **random_weights.stage_lengths(self.engine, "critique", seeds, self.sampling.max_new_tokens))
        out: list[Judgement | str] = [TRUNCATED] * len(items)
        ok = [k for k, c in enumerate(done) if c.finish_reason != "length" or self.keep_cut]
        prefills = [f"{head} {done[k].text}\n{prompts.JUDGE_ANSWER_PREFIX}" for k in ok]
        p_yes = self.engine.yes_probability([msgs[k] for k in ok], prefills) if ok else []
        for k, p in zip(ok, p_yes):
            verdict = self.decide(float(p), seeds[k])
            out[k] = Judgement(verdict=verdict, confidence=float(p if verdict else 1 - p), reasons=done[k].text,
                               truncated=done[k].finish_reason == "length")
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

    def refine(self, items: list[tuple[str, str, str, int, str]]) -> list[tuple[str, bool] | str]:
        """items: (query_id, query, prompt, sample_idx, judge_reasons) -> (refined, truncated) or an error.

        The judge sees its own critique, then writes its reflection and the refined prompt
        between the markers; the first complete block is read (judge_http.read_refinement).
        reflection=False (`refine_reflection`) prefills the answer marker instead: no
        reflection, the model writes the prompt at once (cheaper; random-weight models
        never write the markers themselves, so the tiny preset uses it).
        """
        from vpo_ray.pipeline.judge_http import read_refinement

        msgs = [prompts.refine_messages(q, p, prompts.critique_text(reasons), self.templates)
                for _, q, p, _, reasons in items]
        seeds = [row_seed(self.seed, "refine", qid, j) for qid, _, _, j, _ in items]
        # weights=random: the output model ends rows at drawn lengths and cannot write the
        # markers, so it gets the prefill and its block is closed for it (vpo_ray/models/random_weights.py).
        random_out = getattr(self.engine, "random_outputs", None) is not None
        head = "" if self.reflection and not random_out else f"Final Refined Prompt: {prompts.REFINE_START} "
        done = self.engine.generate(
            msgs, seeds, self.sampling, prefills=[head] * len(items) if head else None,
            **random_weights.stage_lengths(self.engine, "refine", seeds, self.sampling.max_new_tokens))
        tail = f" {prompts.REFINE_END}" if random_out else ""
        out: list[tuple[str, bool] | str] = []
        for c in done:
            got = read_refinement(head + c.text + tail, c.finish_reason == "length", self.keep_cut, self.keep_multiline)
            out.append(got.reason if isinstance(got, prompts.ParseFailure) else got)
        return out


class Critic:
    """Ray Data stage: judge every candidate; refine the rejected ones."""

    def __init__(self, model: str, sampling: dict, endpoint: dict, refine: bool = True, seed: int = 0,
                 device: Optional[str] = None, templates: Optional[prompts.Templates] = None,
                 truncation: str = "error", keep_multiline: bool = False, reflection: bool = True,
                 engine: Optional[dict] = None, watchdog_s: float = 0.0, strikes_dir: Optional[str] = None):
        self.sampling = SamplingConfig(**sampling)
        self.guard = StageGuard("critique", watchdog_s, strikes_dir)
        ep = EndpointConfig(**endpoint)
        policy = dict(templates=templates, truncation=truncation, keep_multiline=keep_multiline)
        if ep.base_url:  # an endpoint always gets the official refine turn (no prefill over a chat API)
            from vpo_ray.pipeline.judge_http import HttpJudge
            self.backend = HttpJudge(ep, self.sampling, **policy)
        else:
            self.backend = LocalJudge(model, self.sampling, seed, device=device, reflection=reflection,
                                      engine=engine, **policy)
        self.refine_enabled = refine

    def _refine(self, batch: dict, rejected: list[tuple[int, dict]]) -> None:
        items = [(batch["query_id"][i], judged_query(batch, i), c["prompt"], c["sample_idx"], c["judge"]["reasons"])
                 for i, c in rejected]
        refined = self.guard.run(self.backend.refine, items, rows=[str(it[0]) for it in items],
                                 keys=[f"refine/{it[0]}/{it[3]}" for it in items])
        for (_, c), r in zip(rejected, refined):
            if isinstance(r, (str, RowFailure)):
                c["refined"], c["refine_error"] = None, f"refine: {r.reason if isinstance(r, RowFailure) else r}"
            else:
                c["refined"] = r[0]
                if r[1]:
                    c["refine_truncated"] = True

    def __call__(self, batch: dict) -> dict:
        n = len(batch["query_id"])
        cands = [json.loads(c) if c else [] for c in batch["candidates_json"]]
        todo = [(i, c) for i in range(n) if not batch["error"][i] for c in cands[i] if c["prompt"] and not c["error"]]
        items = [(batch["query_id"][i], judged_query(batch, i), c["prompt"], c["sample_idx"]) for i, c in todo]
        verdicts = self.guard.run(self.backend.judge, items, rows=[str(it[0]) for it in items],
                                  keys=[f"judge/{it[0]}/{it[3]}" for it in items])
        for (i, c), v in zip(todo, verdicts):
            if isinstance(v, Judgement):
                c["judge"] = {"verdict": v.verdict, "confidence": v.confidence, "reasons": v.reasons}
                if v.truncated:
                    c["judge"]["truncated"] = True
            else:
                c["error"] = f"critique: {v.reason if isinstance(v, RowFailure) else v}"
        if self.refine_enabled:
            self._refine(batch, [(i, c) for i, c in todo if c["judge"] and not c["judge"]["verdict"]])
        out = dict(batch)
        errors, stages = list(batch["error"]), list(batch["error_stage"])
        for i in range(n):
            if not errors[i] and not any(c.get("judge") for c in cands[i]):
                reasons = [c["error"].split(": ", 1)[-1] for c in cands[i] if c["error"]] or ["no candidate judged"]
                errors[i], stages[i] = _row_error("critique", reasons), "critique"
        out["candidates_json"] = np.array([json.dumps(c, ensure_ascii=False) for c in cands], dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["error_stage"] = np.array(stages, dtype=object)
        return out


def judged_query(batch: dict, i: int) -> str:
    """The query the judge checks a prompt against: as the user typed it (flags included,
    which the official critique rules 4-5 read), or the cleaned text where a row has no raw query."""
    return str(batch["query"][i]).strip() if "query" in batch else str(batch["text"][i])
