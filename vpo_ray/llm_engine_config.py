"""`llm_engine.*`: how the local LLM engine (vpo_ray.pipeline.llm_engine) batches, prefills and
samples. Re-exported by vpo_ray.config, where the job configs that carry it live."""
from __future__ import annotations

from dataclasses import dataclass

from vpo_ray.config_loader import ConfigError


@dataclass(frozen=True)
class LLMEngineConfig:
    """How the local LLM engine (vpo_ray.pipeline.llm_engine) batches and decodes."""
    # auto: own static-cache decoder for llama/qwen2/mistral, HF generate otherwise | static | hf
    backend: str = "auto"
    max_batch_rows: int = 256  # rows decoded at once (KV-cache slots); fewer when the cache would not fit
    kv_cache_fraction: float = 0.9  # share of the GPU memory free after loading that slots may take
    cuda_graphs: bool = True  # capture the decode step once per KV-length bucket (CUDA only)
    compile: bool = False  # torch.compile the per-layer pieces and the sampler (fuses norms, rotary, SiLU)
    kv_bucket: int = 256  # decode attention reads the cache up to the next multiple of this past the longest row
    continuous: bool = True  # refill finished rows' slots mid-run; False = waves (a batch drains before the next)
    # admit queued rows into any free slot at every host check (slots stay full); False: wait
    # until refill_min_free slots are free, so refills come as fewer, larger prefill batches.
    # Off until the GPU ablation row measures it (the engine's GPU figures were taken without it).
    refill_every_check: bool = False
    refill_min_free: int = 0  # with refill_every_check off: free slots that trigger a refill; 0 = max(1, slots // 8)
    sync_every: int = 8  # decode steps between host checks (finished rows, stop strings)
    prefill_tokens: int = 16384  # tokens (rows x longest row) in one prefill or verdict batch
    # Prefill admitted prompts in chunks of at most this many tokens between decode runs, so a
    # refill never stalls live rows for more than one chunk (while fewer rows decode than wait,
    # chunks run back to back: a stall that few rows feel fills many slots). 0 = whole prompts at
    # admission. Off by default: exact (tested), but not a fused mixed step, so it bounds the
    # stall without saving work, and a steady refill is already small (see benchmarks/README.md).
    prefill_chunk_tokens: int = 0
    # top-p within the k most likely tokens (torch.topk) instead of sorting the whole vocabulary;
    # a row whose nucleus may reach past them is sampled by the full sort (same tokens; a decode
    # step sorts at most `fallback` rows and lets the rest wait one step). 0 = always the full sort.
    # Off until measured on a GPU: random weights' flat distributions send every row to the full
    # sort, and capturing torch.topk in the decode graph is untried on CUDA.
    sampler_top_k: int = 0

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "static", "hf"):
            raise ConfigError(f"backend: expected auto | static | hf, got {self.backend!r}")
        for key in ("max_batch_rows", "kv_bucket", "sync_every", "prefill_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("refill_min_free", "prefill_chunk_tokens", "sampler_top_k"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ConfigError(f"kv_cache_fraction: must be in (0, 1], got {self.kv_cache_fraction}")
