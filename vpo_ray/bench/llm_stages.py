"""`vpo bench llm-stages`: the LLM stages (rewrite, critique, refine, verdict) and the VLM judge.

Real architectures with random weights: `--preset paper` (or any registry preset) measures its
optimizer/judge LLM and its video judge (`--preset tiny`: the tiny models, CPU). Prompts are
random token ids; each row's output length is forced, drawn per row and stage by the
`weights=random` output model (vpo_ray.models.random_weights.draw_lengths, RandomOutputsConfig:
rewrite ~150, critique ~220, refine ~150 tokens, sd 25 %, capped at `llm.max_new_tokens`),
because random weights never emit EOS and real rows end at different lengths, which is what
continuous batching is for. Phases run in `llm.phases` order (default: engine, stages,
baseline, verdict, vlm, invariance; ablations and compile on request) and the record is
written after each one, so a run cut off by its time limit keeps what it measured:

  engine      rewrite through the engine as the pipeline runs it (static KV cache, CUDA graphs,
              continuous batching, `llm.batch_size` slots): generated tok/s, rows/s, decode bandwidth
  stages      critique and refine shapes through the engine
  baseline    the old path for rewrite and critique: left-padded HF `generate`, `llm.baseline_batch`
              rows a call, on the first `llm.baseline_rows` rows of the engine's workloads (same lengths)
  verdict     the judge's forced-choice verdict as a bucketed prefill, and the old path
              (left-padded batches of 8, full logits) on a subset: prompt tok/s, rows/s, MFU
  vlm         vpo_ray.bench.vlm_judge: videos judged per second (prefix reuse vs not vs plain HF)
  invariance  rows generated alone vs in the engine batch: how often bf16 batching changes a token
  ablations   one workload, one change at a time from the engine before #18's second round
              (graphs, continuous batching, refill at 1/8 free, whole prompts, full sort): + refill
              at every host check, + top-k sampler pre-filter, + chunked prefill, all defaults;
              then HF generate at batch 64, eager static loop, waves, 64 slots, no KV-length buckets
  compile     + torch.compile of the step pieces

Figures (vpo_ray.bench.llm_figures): generated tok/s = returned tokens / wall time of the
call (prefill, decode and host checks included); decode bandwidth = (weight bytes + live
K/V bytes read) per step / step time, against the datasheet and a measured copy bandwidth;
prefill MFU = (2 x matmul params x tokens + causal attention + LM head at the last token)
/ time, against the datasheet peak and the measured bf16 matmul rate. Warm-up calls
(graph capture, compile) run first and are excluded.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

from vpo_ray.bench import common, llm_figures
from vpo_ray.bench.config import BenchConfig
from vpo_ray.config import LLMEngineConfig

# Prompt lengths (tokens, uniform) of the judge's two decode stages; output lengths come from the output model.
STAGE_PROMPTS = {"critique": (450, 650),  # judge template + query + candidate prompt
                 "refine": (550, 800)}  # + the judge's reasons
STAGE_SEEDS = {"rewrite": 0, "critique": 3, "refine": 4}  # workload seed per stage (prompts and lengths)


def load_llm(name: str, device: str, dtype: str):
    """(model, vocab size): the tiny optimizer, or the architecture configs/<name>/model.json with random weights."""
    import torch

    from vpo_ray.models import registry

    if name.startswith("tiny"):
        model, tok = registry.load_causal_lm(registry.get_spec("tiny", "optimizer"), device=device, dtype=dtype)
        return model.eval(), len(tok)
    spec = registry.MODELS.get(name) or registry.ModelSpec(name, "optimizer", "(architecture only)",
                                                           "transformers.AutoModelForCausalLM")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # build in the target dtype: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = registry.random_init_from_config(spec, ["model"], device=device, dtype=dtype)["model"]
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), model.config.vocab_size


def bench_models(cfg: BenchConfig) -> tuple[tuple, tuple]:
    """(LLM names, video judge names) to measure: `llm.models` / `llm.vlm_models`, else the preset's roles
    (registry.PRESETS; a preset not listed there, e.g. "real": the paper's)."""
    from vpo_ray.models import registry

    if cfg.preset == "tiny":
        return ("tiny-optimizer",), ("tiny-video-judge",)
    roles = registry.PRESETS.get(cfg.preset, registry.PRESETS["paper"])
    llms = cfg.llm.models or tuple(dict.fromkeys((roles["optimizer"], roles["judge"])))  # one entry if shared
    return tuple(llms), tuple(cfg.llm.vlm_models or (roles["video_judge"],))


def workload(n: int, prompt_tokens, stage: str, cap: int, vocab: int, seed: int) -> tuple[list, list]:
    """(prompts, forced output lengths): random ids in [10, vocab - 300) (clear of special tokens);
    lengths from the weights=random output model for `stage`, below `cap` (as the pipeline draws them)."""
    import random

    from vpo_ray.config import RandomOutputsConfig
    from vpo_ray.models.random_weights import draw_lengths

    rng = random.Random(seed)
    prompts = [[rng.randrange(10, max(11, vocab - 300)) for _ in range(rng.randint(*prompt_tokens))] for _ in range(n)]
    return prompts, draw_lengths(RandomOutputsConfig(), stage, [seed * 1_000_003 + i for i in range(n)], cap)


# The engine as measured before the second round of #18 (refill at 1/8 free slots, whole-prompt
# prefill, full-vocabulary sort): the row each ablation changes one thing of.
BEFORE_ROUND2 = dict(refill_every_check=False, prefill_chunk_tokens=0, sampler_top_k=0)


def ablation_variants(rows: int, longest: int) -> list[tuple[str, dict, Optional[int]]]:
    """(label, engine settings, rows or None for all) of the ablations phase, in run order.
    `longest`: the workload's longest prompt + output; one KV bucket of that length is "no buckets"
    (attention over the whole cache every step) without sizing slots for 64k positions."""
    defaults = LLMEngineConfig()
    # the values tried where a switch is off by default (off until these rows measure it)
    chunk, top_k = defaults.prefill_chunk_tokens or 4096, defaults.sampler_top_k or 256
    both = {"refill_every_check": True, "sampler_top_k": top_k}
    return [("graphs-continuous", BEFORE_ROUND2, None),
            ("+refill-every-check", {**BEFORE_ROUND2, "refill_every_check": True}, None),
            (f"+sampler-top-k-{top_k}", {**BEFORE_ROUND2, "sampler_top_k": top_k}, None),
            (f"+prefill-chunks-{chunk}", {**BEFORE_ROUND2, "prefill_chunk_tokens": chunk}, None),
            ("+refill+top-k", {**BEFORE_ROUND2, **both}, None),  # the two expected to pay, together
            ("hf-generate-b64", dict(backend="hf", max_batch_rows=64), min(rows, 64)),
            ("static-eager", {**BEFORE_ROUND2, "cuda_graphs": False}, None),
            ("graphs-waves", {**BEFORE_ROUND2, "continuous": False}, None),
            ("graphs-continuous-64-slots", {**BEFORE_ROUND2, "max_batch_rows": 64}, None),
            ("graphs-continuous-no-kv-buckets", {**BEFORE_ROUND2, "kv_bucket": longest}, None)]


class LLMBench:
    """One model loaded at a time; each phase adds its figures to the record."""

    def __init__(self, cfg: BenchConfig, device: str, dtype: str, rec: dict):
        self.cfg, self.lc, self.device, self.dtype, self.rec = cfg, cfg.llm, device, dtype, rec
        self.loaded = (None, None, 0)
        self.engine_rows = {}  # model -> first rows' ids from the engine phase (invariance compares them)

    def model(self, name: str):
        if self.loaded[0] != name:
            self.loaded = (None, None, 0)
            common.free_memory(self.device)
            t0 = time.perf_counter()
            model, vocab = load_llm(name, self.device, self.dtype)
            self.loaded = (name, model, vocab)
            self.rec["models"].setdefault(name, {}).update(
                params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                load_s=round(time.perf_counter() - t0, 1))
        return self.loaded[1], self.loaded[2]

    def engine(self, name: str, **cfg):
        from vpo_ray.pipeline.llm_engine import LLMEngine

        model, _ = self.model(name)
        base = {"max_batch_rows": self.lc.batch_size}
        return LLMEngine(model, device=self.device, config=LLMEngineConfig(**{**base, **cfg}))

    def decode(self, name: str, label: str, prompts: list, lengths: list, warmup: bool = True, **cfg) -> dict:
        """One timed generate call (after a short warm-up call of the same engine) and its figures."""
        import torch

        eng = self.engine(name, **cfg)
        n = len(prompts)
        temps, tops = [self.lc.temperature] * n, [self.lc.top_p] * n
        seeds = list(range(1000, 1000 + n))
        if warmup:  # size the cache as the timed call needs it, then capture graphs / compile on it
            eng.prepare(n, max(map(len, prompts)), max(lengths))
            k = min(n, 4)
            eng.generate_ids(prompts[:k], seeds[:k], temps[:k], tops[:k], [8] * k, forced=[True] * k)
        common.sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        outs = eng.generate_ids(prompts, seeds, temps, tops, lengths, forced=[True] * n)
        common.sync(self.device)
        wall = time.perf_counter() - t0
        fig = llm_figures.decode_figures(eng, outs, wall, self.rec.get("ceilings") or {}, self.device)
        fig.update(variant=label, rows=n, config={k: v for k, v in cfg.items()})
        fig.update(common.peak_memory(self.device))
        eng.release()
        self._last_outs = outs
        return fig

    # ------------------------------------------------------------------ phases

    def stage_workload(self, name: str, stage: str, n: int) -> tuple[list, list]:
        """The stage's prompts and forced lengths; the same first rows whatever `n` (the old path
        takes the first rows of the engine's workload)."""
        _, vocab = self.model(name)
        p_range = STAGE_PROMPTS.get(stage, self.lc.prompt_tokens)
        if self.cfg.preset == "tiny":  # CPU: rewrite-sized prompts (the harness, not the figures)
            p_range = self.lc.prompt_tokens
        return workload(n, p_range, stage, self.lc.max_new_tokens, vocab, seed=STAGE_SEEDS[stage])

    def phase_engine(self, name: str) -> dict:
        lc = self.lc
        prompts, lengths = self.stage_workload(name, "rewrite", lc.rows)
        fig = self.decode(name, "engine", prompts, lengths)
        self.engine_rows[name] = (prompts[:lc.invariance_rows], lengths[:lc.invariance_rows],
                                  [o.ids for o in self._last_outs[:lc.invariance_rows]])
        return fig

    def phase_baseline(self, name: str) -> dict:
        """The old path (HF `generate`, left-padded batches, per-row sampler and forced lengths as a
        logits processor) on the first rows of the rewrite and critique workloads."""
        lc = self.lc
        out = {}
        for stage in ("rewrite", "critique"):
            prompts, lengths = self.stage_workload(name, stage, lc.baseline_rows)
            common.guarded(out, stage, lambda: self.decode(name, f"hf-generate-b{lc.baseline_batch}", prompts, lengths,
                                                           backend="hf", max_batch_rows=lc.baseline_batch))
        return out

    def phase_verdict(self, name: str) -> dict:
        return llm_figures.verdict_phase(self, name)

    def phase_stages(self, name: str) -> dict:
        out = {}
        for stage in STAGE_PROMPTS:
            prompts, lengths = self.stage_workload(name, stage, self.lc.stage_rows)
            common.guarded(out, stage, lambda: self.decode(name, "engine", prompts, lengths))
        return out

    def phase_invariance(self, name: str) -> dict:
        """Rows alone (1 slot) vs the same rows inside the engine phase's batch: identical ids on CPU;
        on GPU bf16 matmuls of other shapes may flip a near-tie, so this counts how often."""
        if name not in self.engine_rows:
            return {"skipped": "needs the engine phase first"}
        prompts, lengths, batched = self.engine_rows[name]
        eng = self.engine(name, max_batch_rows=1)
        alone = [eng.generate_ids([p], [1000 + i], [self.lc.temperature], [self.lc.top_p], [lim], forced=[True])[0].ids
                 for i, (p, lim) in enumerate(zip(prompts, lengths))]
        eng.release()
        first_diff = [next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(alone, batched)]
        return {"rows": len(alone), "rows_identical": sum(a == b for a, b in zip(alone, batched)),
                "first_differing_token": first_diff, "tokens_per_row": [len(a) for a in alone]}

    def phase_ablations(self, name: str) -> dict:
        """One workload, one change at a time from the engine before #18's second round
        (`BEFORE_ROUND2`), the new switches first (a run cut off by its time limit keeps them)."""
        lc = self.lc
        _, vocab = self.model(name)
        prompts, lengths = workload(lc.ablation_rows, lc.prompt_tokens, "rewrite", lc.max_new_tokens, vocab, seed=1)
        out = {}
        longest = max(map(len, prompts)) + max(lengths)  # what `decode` sizes the cache for
        for label, cfg, rows in ablation_variants(len(prompts), longest):
            n = rows or len(prompts)
            common.guarded(out, label, lambda: self.decode(name, label, prompts[:n], lengths[:n], **cfg))
            self.write()
        return out
    def phase_compile(self, name: str) -> dict:
        lc = self.lc
        _, vocab = self.model(name)
        prompts, lengths = workload(lc.ablation_rows, lc.prompt_tokens, "rewrite", lc.max_new_tokens, vocab, seed=1)
        t0 = time.perf_counter()
        fig = self.decode(name, "graphs-continuous-compiled", prompts, lengths, compile=True)
        fig["including_compile_s"] = round(time.perf_counter() - t0, 1)
        return fig

    def write(self) -> None:
        common.write_record(self.cfg.out, self.rec["stem"], self.rec)


def run(cfg: BenchConfig) -> dict:
    from vpo_ray import storage
    from vpo_ray.bench import vlm_judge
    from vpo_ray.bench.plotting import plot_llm_stages

    device = common.resolve_device(cfg.device)
    dtype = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    tiny = cfg.preset == "tiny"
    storage.makedirs(cfg.out)
    stem = f"llm_stages_{cfg.preset}"
    models, vlm_models = bench_models(cfg)
    rec = {"benchmark": "llm-stages", "preset": cfg.preset, "stem": stem, "device": common.device_facts(device),
           "versions": common.versions(), "dtype": dtype, "config": dataclasses.asdict(cfg.llm),
           "weights": "tiny preset" if tiny else "random (real architecture config)",
           "warmup_note": "a short call per engine configuration (graph capture, compile) runs first, excluded",
           "llm_models": list(models), "vlm_models": list(vlm_models), "models": {}, "vlm": {}}
    common.guarded(rec, "ceilings", lambda: llm_figures.ceilings(device))
    bench = LLMBench(cfg, device, dtype, rec)
    try:
        for phase in cfg.llm.phases:
            if phase == "vlm":
                bench.loaded = (None, None, 0)
                for name in vlm_models:
                    common.guarded(rec["vlm"], name, lambda n=name: vlm_judge.bench_vlm(n, cfg, device, dtype))
                    _progress(name, phase, rec["vlm"][name])
                    bench.write()
                continue
            for name in models:
                result = common.guarded(rec["models"].setdefault(name, {}), phase,
                                        lambda n=name, p=phase: getattr(bench, f"phase_{p}")(n))
                _progress(name, phase, result)
                bench.write()
                common.free_memory(device)  # a failed phase must not leave its KV cache behind
    except KeyboardInterrupt:  # the time limit (gpu_run.sh sends SIGINT): keep what was measured
        rec["interrupted"] = True
    bench.loaded = (None, None, 0)
    rec["table"] = llm_figures.before_after(rec)
    png = storage.join(cfg.out, f"{stem}.png")
    plot_llm_stages(rec, png)
    rec["png"] = png
    bench.write()
    return rec


def _progress(name: str, phase: str, result) -> None:
    """One log line per phase with its headline figures (the record holds everything)."""
    keys = ("tok_s", "step_ms", "bandwidth_util_datasheet", "prompt_tok_s", "mfu_datasheet", "mfu_vs_measured_matmul",
            "videos_per_s", "rows_identical", "speedup", "error")

    def pick(d):
        return {k: d[k] for k in keys if isinstance(d, dict) and d.get(k) is not None}

    parts = pick(result) if isinstance(result, dict) else {}
    if isinstance(result, dict):
        parts.update({k: pick(v) for k, v in result.items() if isinstance(v, dict) and pick(v)})
    print(f"[llm-stages] {name} {phase}: {parts}", flush=True)
