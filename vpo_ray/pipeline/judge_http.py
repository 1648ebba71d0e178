"""Judge back-end on any OpenAI-compatible chat endpoint (GPT-4o as in the paper, vLLM, TGI).

The critique is the official two-turn exchange (thu-coai/VPO src/gpt4o_infer.py): the
judge template asks for step-by-step verification and a final Yes/No; a "No" is
followed by the refine turn, and the judge writes its reflection, then the refined prompt
between [[start]] and [[end]] (the first such block is read, src/process_data.py).
Transport, retries and concurrency are `ChatEndpoint`'s; a reply without a parsable
verdict or block is retried like a transport error. A reply the server cut at its token
limit (finish_reason "length") still counts when its verdict or its block is complete;
cut before that it is the error "truncated" (not retried: the same limit cuts it again),
except that truncation=keep keeps a refinement cut inside its block, marked truncated.
Nothing raises out of `judge`/`refine`: a failed item is an error string.
"""
from __future__ import annotations

from typing import Optional

from vpo_ray import prompts
from vpo_ray.config import EndpointConfig, SamplingConfig
from vpo_ray.http_retry import Retryable
from vpo_ray.pipeline.endpoint import ChatEndpoint, Failure
from vpo_ray.schema import Judgement

TRUNCATED = "truncated"


class HttpJudge:
    def __init__(self, cfg: EndpointConfig, sampling: SamplingConfig, templates: Optional[prompts.Templates] = None,
                 truncation: str = "error", keep_multiline: bool = False):
        self.endpoint = ChatEndpoint(cfg, sampling, role="judge")
        self.templates = templates or prompts.default_templates()
        self.keep_cut = truncation == "keep"
        self.keep_multiline = keep_multiline

    @property
    def stats(self) -> dict:
        return self.endpoint.stats

    # -- the judge interface (same as LocalJudge) ----------------------------------
    def judge(self, items: list[tuple[str, str, str, int]]) -> list[Judgement | str]:
        """items: (query_id, query, prompt, sample_idx) -> Judgement, or an error string."""
        return self.verdicts([prompts.judge_messages(query, prompt, self.templates) for _, query, prompt, _ in items])

    def verdicts(self, messages_list: list[list[dict]]) -> list[Judgement | str]:
        """A verdict for each ready-made chat, or an error string; evaluation asks its own
        questions through this, so they get the same retries and parsing as the main verdict."""
        def one(messages):
            def call():
                reply = self.endpoint.chat(messages)
                parsed = prompts.parse_judgement(reply.text)
                if isinstance(parsed, prompts.ParseFailure):
                    if reply.finish_reason == "length":  # cut before its verdict: asking again hits the same limit
                        return Failure(TRUNCATED)
                    raise Retryable(f"malformed judge output: {parsed.reason}")
                return Judgement(verdict=parsed.verdict, confidence=1.0, reasons=parsed.reasons)

            res = self.endpoint.call(call)
            return str(res) if isinstance(res, Failure) else res

        return self.endpoint.map(one, messages_list)

    def refine(self, items: list[tuple[str, str, str, int, str]]) -> list[tuple[str, bool] | str]:
        """items: (query_id, query, prompt, sample_idx, judge_reasons) -> (refined, truncated) or an error string."""
        def one(item):
            _, query, prompt, _, reasons = item
            msgs = prompts.refine_messages(query, prompt, prompts.critique_text(reasons), self.templates)

            def call():
                reply = self.endpoint.chat(msgs)
                got = read_refinement(reply.text, reply.finish_reason == "length", self.keep_cut, self.keep_multiline)
                if isinstance(got, prompts.ParseFailure):
                    if got.reason in (TRUNCATED, prompts.MULTILINE):  # the same limit / the official drop rule
                        return Failure(got.reason)
                    raise Retryable(f"malformed refinement: {got.reason}")
                return got

            res = self.endpoint.call(call)
            return str(res) if isinstance(res, Failure) else res

        return self.endpoint.map(one, items)


def read_refinement(text: str, cut: bool, keep_cut: bool, keep_multiline: bool
                    ) -> tuple[str, bool] | prompts.ParseFailure:
    """(refined prompt, truncated) from a refine reply, or why not.

    A complete first block is used whether or not the reply ran on to its limit. A reply
    cut inside or before its block fails as "truncated", unless keep_cut and the block was
    opened: then its text so far is used, marked truncated.
    """
    parsed = prompts.parse_refinement(text, keep_multiline=keep_multiline)
    if not isinstance(parsed, prompts.ParseFailure):
        return parsed.prompt, False
    if not cut or parsed.reason == prompts.MULTILINE:
        return parsed
    if keep_cut:
        partial = prompts.parse_refinement(text + " " + prompts.REFINE_END, keep_multiline=keep_multiline)
        if not isinstance(partial, prompts.ParseFailure):
            return partial.prompt, True
    return prompts.ParseFailure(TRUNCATED, text)
