"""The optimizer model behind the Serve deployment: load once, generate batches.

Independent of Ray so it can be tested and benchmarked alone. One `generate` call
serves many requests: each request's query is expanded into `n` rows, all rows are
left-padded into one batch, and every row samples with its own temperature and its
own random stream (`RowSampler`), so a request's output does not depend on which
other requests shared its batch, and a request with a `seed` is reproducible.

Every row says why it ended (`finish_reasons`, as OpenAI's `finish_reason`): "stop" when
the model ended its turn or a stop string cut it, "length" when it ran into the
request's `max_new_tokens` (the text is then an unfinished prompt).
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Optional

from vpo_ray.config import ServeConfig
from vpo_ray.models import random_weights
from vpo_ray.prompts import load_templates, optimizer_messages
from vpo_ray.sampling import cut_at_stop, forced_length, row_sampler_class

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    """One request as the model deployment sees it (already validated by the ingress)."""
    text: str  # what the optimizer rewrites
    n: int = 1
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    seed: Optional[int] = None  # row j of the request samples with seed + j
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # a row's text ends before the first of these (OpenAI `stop`)


@dataclass
class GenResult:
    texts: list[str]  # n raw completions, not yet parsed
    prompt_tokens: int
    completion_tokens: list[int]
    finish_reasons: list[str]  # per row: "stop" (end of turn or a stop string) | "length" (max_new_tokens)
    batch_rows: int  # rows in the generate call this request shared
    batch_requests: int
    model: str = ""
    model_version: str = ""


# ---------------------------------------------------------------------------- model

def served_name(cfg: ServeConfig) -> str:
    if cfg.served_model_name:
        return cfg.served_model_name
    if cfg.model:
        return os.path.basename(os.path.normpath(cfg.model)) or "vpo-optimizer"
    return f"vpo-optimizer-{cfg.preset}"


def fingerprint(path: str) -> str:
    """Short stable id of a model directory: names, sizes and config.json contents."""
    h = hashlib.sha1()
    if os.path.isdir(path):
        for root, _, files in sorted(os.walk(path)):
            for f in sorted(files):
                p = os.path.join(root, f)
                h.update(os.path.relpath(p, path).encode())
                h.update(str(os.path.getsize(p)).encode())
        cfg = os.path.join(path, "config.json")
        if os.path.exists(cfg):
            with open(cfg, "rb") as fh:
                h.update(fh.read())
    else:
        h.update(path.encode())
    return h.hexdigest()[:12]


def model_source(cfg: ServeConfig):
    """What the registry loads: cfg.model (path, hub id or registry name), else the preset's optimizer."""
    from vpo_ray.models import registry  # the one place model ids live

    if cfg.weights == "random":  # the architecture of cfg.model (a registry name) or of the preset's optimizer
        return registry.model_ref(cfg.model or cfg.preset, "optimizer", "random", cfg.random_outputs)
    return cfg.model or registry.get_spec(cfg.preset, "optimizer")


def load_model(cfg: ServeConfig, device: str):
    """(model, tokenizer, local path) through the registry: left padding, pad token set."""
    from vpo_ray.models import registry

    source = model_source(cfg)
    path = registry.model_path(source)  # builds the tiny preset once per cache dir
    model, tok = registry.load_causal_lm(source, device=device, dtype=cfg.dtype)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok, path


class OptimizerEngine:
    """The optimizer loaded once per replica; `generate` serves a list of requests."""

    def __init__(self, cfg: ServeConfig, device: Optional[str] = None):
        import torch

        self.cfg = cfg
        self.device = device or ("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        if self.device == "cpu":
            torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.num_cpus)))
        self.model, self.tokenizer, self.path = load_model(cfg, self.device)
        self.random_outputs = random_weights.outputs_of(self.model)  # weights=random: the output-length model
        self.templates = load_templates(cfg.prompts)  # the optimizer's training format
        self.name = served_name(cfg)
        self.version = cfg.model_version or fingerprint(self.path)
        self._sampler_cls = row_sampler_class()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.stop_ids = eos  # end of turn (and <|endoftext|> for Qwen2-style models)
        self.generate([GenRequest("warm-up", temperature=0.0, max_new_tokens=1)])  # first request pays no setup
        log.info("optimizer %s (%s) loaded from %s on %s", self.name, self.version, self.path, self.device)

    def info(self) -> dict:
        return {"model": self.name, "model_version": self.version, "device": self.device}

    def prompt_text(self, text: str) -> str:
        return self.tokenizer.apply_chat_template(optimizer_messages(text, self.templates), tokenize=False,
                                                  add_generation_prompt=True)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """One left-padded `generate` call for all rows of all requests."""
        import torch

        prompts, temps, top_ps, seeds, owners = [], [], [], [], []
        for r_i, r in enumerate(requests):
            base_seed = r.seed if r.seed is not None else secrets.randbits(62)
            p = self.prompt_text(r.text)
            for j in range(r.n):
                prompts.append(p)
                temps.append(float(r.temperature))
                top_ps.append(float(r.top_p))
                seeds.append((base_seed + j) % (2 ** 63))
                owners.append(r_i)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        max_new = max(r.max_new_tokens for r in requests)
        processors = [self._sampler_cls(temps, top_ps, seeds, self.device)]
        if self.random_outputs is not None:  # weights=random: rewrites end at drawn lengths, as in the pipeline
            limits = [requests[r_i].max_new_tokens for r_i in owners]
            lengths = random_weights.draw_lengths(self.random_outputs, "rewrite", seeds, max_new)
            processors.insert(0, forced_length(lengths, limits, enc["input_ids"].shape[1], self.stop_ids))
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, num_beams=1, logits_processor=processors,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids or None,
                temperature=None, top_p=None, top_k=None,
            )
        new_tokens = out[:, enc["input_ids"].shape[1]:].cpu()
        stops = set(self.stop_ids) | ({self.tokenizer.pad_token_id} - {None})
        results = [GenResult(texts=[], prompt_tokens=0, completion_tokens=[], finish_reasons=[],
                             batch_rows=len(prompts), batch_requests=len(requests), model=self.name,
                             model_version=self.version) for _ in requests]
        for row, r_i in enumerate(owners):
            text, n_tokens, reason = self._row(new_tokens[row].tolist(), requests[r_i], stops)
            res = results[r_i]
            res.texts.append(text)
            res.completion_tokens.append(n_tokens)
            res.finish_reasons.append(reason)
            res.prompt_tokens = int(enc["attention_mask"][row].sum())
        return results

    def _row(self, ids: list[int], request: GenRequest, stops: set) -> tuple[str, int, str]:
        """(text, completion tokens, finish reason) of one generated row."""
        ids = ids[: request.max_new_tokens]
        end = next((k for k, t in enumerate(ids) if t in stops), None)  # first end-of-turn/padding
        reason = "stop" if end is not None else "length"
        ids = ids if end is None else ids[:end]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = cut_at_stop(text, request.stop)
        if len(cut) < len(text):  # a stop string ended it; usage counts the tokens of what is kept
            return cut, len(self.tokenizer(cut, add_special_tokens=False)["input_ids"]), "stop"
        return text, len(ids), reason
