"""`vpo bench` configs: one section per benchmark (video sampling, LLM stages, train step, pipeline).

Loaded like every job config (`load_config(BenchConfig, path, overrides)`); the names are
also importable from vpo_ray.config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vpo_ray.config import ConfigError, RayConfig, check_rules, check_weights


@dataclass(frozen=True)
class BenchVideoConfig:
    """Overrides of the benchmarked model's generation defaults; None = its registry entry's value."""
    num_frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    fps: Optional[int] = None

    def __post_init__(self) -> None:
        check_rules(self, *((getattr(self, k) is None or getattr(self, k) >= 1, k, "must be >= 1 (or null)")
                            for k in ("num_frames", "height", "width", "num_inference_steps", "fps")),
                    (self.guidance_scale is None or self.guidance_scale >= 0, "guidance_scale", "must be >= 0"))


LLM_BENCH_PHASES = ("engine", "verdict", "baseline", "vlm", "stages", "invariance", "ablations", "compile")
# The default run: the engine against the old path for every stage, in <= 9 minutes on one H100
# (ablations and compile are opt-in: `llm.phases=[ablations,compile]`).
LLM_BENCH_DEFAULT_PHASES = ("engine", "stages", "baseline", "verdict", "vlm", "invariance")


@dataclass(frozen=True)
class BenchLLMConfig:
    """`vpo bench llm-stages`: the LLM engine (rewrite/critique/refine decode, verdict prefill) and the VLM judge."""
    # LLM architectures, random weights; () = the preset's optimizer and judge (registry.PRESETS; a
    # preset that is not one there: the paper's)
    models: tuple[str, ...] = ()
    vlm_models: tuple[str, ...] = ()  # video judge architectures, random weights; () = the preset's video judge
    phases: tuple[str, ...] = LLM_BENCH_DEFAULT_PHASES  # run in this order: a cut-off run keeps the first ones
    rows: int = 512  # rewrite rows through the engine (engine phase)
    batch_size: int = 256  # engine slots: rows decoded at once
    prompt_tokens: tuple[int, ...] = (180, 420)  # rewrite prompt lengths (template + query), uniform
    max_new_tokens: int = 256  # stage cap; each row's length is drawn by the weights=random output model
    temperature: float = 0.9  # the rewrite stage's sampling
    top_p: float = 0.95
    # rows of each decode stage (rewrite, critique) through the old path (left-padded HF generate), slow;
    # the first rows of the engine's workload for that stage, so both paths generate the same lengths
    baseline_rows: int = 16
    baseline_batch: int = 8  # the old path's batch (the stages' Ray batch before the engine)
    ablation_rows: int = 384  # rows of each ablation variant (one workload; > batch_size so slots get refilled)
    stage_rows: int = 256  # rows of the critique and refine shapes (stages phase)
    verdict_rows: int = 256  # judge prompts (prompt + reasoning + answer prefix), one prefill each
    verdict_tokens: tuple[int, ...] = (450, 900)  # their lengths, uniform
    verdict_baseline_rows: int = 64  # the old verdict path (left-padded batches, full logits) on a subset
    invariance_rows: int = 8  # rows generated alone and compared with the same rows in the big batch
    vlm_videos: int = 16  # videos judged per VLM variant
    vlm_baseline_videos: int = 4  # videos through the plain per-question HF forward
    vlm_questions: int = 8  # checklist questions per video
    vlm_frames: int = 8  # sampled frames per video
    vlm_video_size: tuple[int, ...] = (480, 720)  # frame height, width before the processor's resize (CogVideoX)

    def __post_init__(self) -> None:
        for p in self.phases:
            if p not in LLM_BENCH_PHASES:
                raise ConfigError(f"llm.phases: unknown phase {p!r} (known: {', '.join(LLM_BENCH_PHASES)})")
        for key in ("prompt_tokens", "verdict_tokens"):
            v = getattr(self, key)
            if len(v) != 2 or v[0] < 1 or v[0] > v[1]:
                raise ConfigError(f"llm.{key}: expected [low, high] with 1 <= low <= high, got {list(v)}")
        if len(self.vlm_video_size) != 2 or min(self.vlm_video_size) < 28:
            raise ConfigError(f"llm.vlm_video_size: expected [height, width] >= 28, got {list(self.vlm_video_size)}")


@dataclass(frozen=True)
class BenchTrainConfig:
    """`vpo bench train-step`: SFT and DPO optimizer steps of the optimizer LLM."""
    model: str = "qwen2.5-1.5b-instruct"  # architecture, random weights
    seq_len: int = 512
    batch_size: int = 4  # sequences per step (DPO: pairs)
    steps: int = 5  # timed steps after warm-up
    methods: tuple[str, ...] = ("sft", "dpo")
    gradient_checkpointing: bool = False
    # trl: `vpo train` itself (Ray Train + TRL + DeepSpeed, weights=random) on a synthetic set;
    # deepspeed: a bare DeepSpeed loop on Ray Train workers (no TRL); torch: one process
    engine: str = "deepspeed"
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 2 shards optimizer state + gradients, 3 also the weights
    workers: int = 1  # Ray Train workers (data-parallel ranks, one GPU each on CUDA)
    # engine=trl: runs in order, each "METHOD:WORKERS:STAGE:BATCH[:offload|gc|precompute|nopack]"
    # (vpo_ray/bench/train_stack.py); () = one run per method from workers/zero_stage/batch_size
    runs: tuple[str, ...] = ()
    warmup_steps: int = 2  # engine=trl: optimizer steps before the timed ones, left out of the figures
    row_tokens: int = 512  # engine=trl, SFT: tokens of one row (prompt + response) before packing
    attn_implementation: str = "sdpa"  # engine=trl: transformers attention kernel
    cpus_per_worker: Optional[float] = None  # engine=trl: None = the node's CPUs shared by the workers
    label: str = ""  # engine=trl: suffix of the record's name, to keep several commands' records apart

    def __post_init__(self) -> None:
        if self.engine not in ("deepspeed", "torch", "trl"):
            raise ConfigError(f"train.engine: expected trl | deepspeed | torch, got {self.engine!r}")
        if self.zero_stage not in (2, 3) or self.workers < 1:
            raise ConfigError("train.zero_stage must be 2 or 3 (the shipped ZeRO configs) and train.workers >= 1")
        if self.engine == "torch" and self.workers != 1:
            raise ConfigError("train.workers > 1 needs train.engine=deepspeed (the torch engine is one process)")


@dataclass(frozen=True)
class BenchPipelineConfig:
    """`vpo bench pipeline`: the real `vpo generate dpo` on N queries, timed per stage, per pool and per GPU."""
    queries: str = ""  # query file; "" = the built-in demo queries (GPU: the bundle's copy)
    limit: int = 20  # N queries (shuffled with the seed, as `vpo generate limit=N`)
    num_samples: int = 4  # K rewrites per query
    weights: str = "random"  # the preset's models at real size with random weights (the tiny preset's are random)
    t2v_alone_videos_per_gpu: int = 0  # > 0: then the T2V stage alone on the same GPUs, this many videos each
    reference: Optional[str] = None  # else a `video-sampling` record whose scaling run gives the T2V-alone rate
    generate: tuple[str, ...] = ()  # GenerateConfig key=value overrides, e.g. "video.optimizations=[compile,overlap]"

    def __post_init__(self) -> None:
        check_weights(self.weights, "pipeline.weights")
        if self.limit < 1 or self.num_samples < 1 or self.t2v_alone_videos_per_gpu < 0:
            raise ConfigError("pipeline.limit and pipeline.num_samples must be >= 1, t2v_alone_videos_per_gpu >= 0")


@dataclass(frozen=True)
class BenchConfig:
    name: str = "video-sampling"  # video-sampling | llm-stages | train-step | pipeline | gpu-faults
    preset: str = "tiny"  # tiny, or a registry model name: its real architecture with random weights (pipeline: a preset)
    out: str = "runs/bench"
    videos: int = 4  # timed videos per variant; steady state = the videos-1 gaps between completions
    warmup: int = 1  # warm-up renders per variant (compile, autotuning), excluded from every figure
    warmup_steps: int = 2  # denoising steps of a warm-up render (shapes, not step count, decide compiling)
    device: Optional[str] = None  # None: cuda if available, else cpu
    dtype: Optional[str] = None  # None: bfloat16 on GPU, float32 on CPU
    video: BenchVideoConfig = BenchVideoConfig()
    variants: tuple[str, ...] = ("baseline", "attention", "optimized", "ray", "quantized", "cache", "memory")
    baseline: tuple[str, ...] = ()  # flags of the naive path (vpo_ray.pipeline.t2v.OPTIMIZATIONS)
    baseline_videos: int = 1  # the naive path is slow; one video gives its per-video and per-step time
    optimizations: tuple[str, ...] = ("fuse-qkv", "attn=cudnn", "compile")  # exact (no step skipping)
    attention_fused_too: bool = True  # attention variant: time each kernel without and with fused QKV
    # each a comma-joined flag set swapped into `optimizations` (no step skipped; FP8 precision)
    quantized: tuple[str, ...] = ("linear=fp8",)
    caches: tuple[str, ...] = ("cache=taylorseer-lite:6",)  # each timed as optimizations + this flag
    scaling_actors: tuple[int, ...] = ()  # scaling variant: actor counts; () = 1, 2, 4, 8 up to the GPUs (CPU: 1, 2)
    scaling_videos_per_actor: int = 3  # >= 3 gives each actor two gaps for its steady rate
    cache_videos: int = 2
    memory_modes: tuple[str, ...] = ("vae-tiling", "offload=model,vae-tiling", "offload=sequential,vae-tiling")
    memory_steps: int = 2  # peak memory does not depend on the step count
    llm: BenchLLMConfig = BenchLLMConfig()
    train: BenchTrainConfig = BenchTrainConfig()
    pipeline: BenchPipelineConfig = BenchPipelineConfig()
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        if self.name not in ("video-sampling", "llm-stages", "train-step", "pipeline", "gpu-faults"):
            raise ConfigError("name: expected video-sampling | llm-stages | train-step | pipeline | gpu-faults, "
                              f"got {self.name!r}")
        known = ("baseline", "attention", "optimized", "ray", "scaling", "quantized", "cache", "memory")
        for v in self.variants:
            if v not in known:
                raise ConfigError(f"variants: unknown variant {v!r} (known: {', '.join(known)})")
        if self.scaling_videos_per_actor < 2 or any(int(c) < 1 for c in self.scaling_actors):
            raise ConfigError("scaling_videos_per_actor must be >= 2 and scaling_actors counts >= 1")
        if self.videos < 1 or self.warmup < 0 or self.warmup_steps < 1:
            raise ConfigError("videos must be >= 1, warmup >= 0 and warmup_steps >= 1")
