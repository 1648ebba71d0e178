"""Typed, frozen job configs loaded from YAML with `key=value` overrides (verl style).

Every job has one config dataclass. `load_config(Cls, path, overrides)` reads the
YAML file (optional), applies dotted `key=value` overrides, and checks every key and
type: an unknown key or a value of the wrong type raises `ConfigError` naming the key.
The loading machinery lives in vpo_ray.config_loader and is re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vpo_ray.config_loader import (ConfigError, _build, given_keys, load_config,  # noqa: F401 (re-exported)
                                   load_config_with_defaults, parse_override, read_yaml_mapping, replace, to_dict)
from vpo_ray.llm_engine_config import LLMEngineConfig  # noqa: F401 (re-exported; generate jobs' llm_engine)


def check_rules(cfg: object, *rules: tuple[bool, str, str]) -> None:
    """Raise ConfigError for the first (ok, field, rule) that does not hold, naming the field and its value.

    A section's check names its own field ("num_frames"); the loader adds the path ("video.").
    """
    for ok, key, rule in rules:
        if not ok:
            raise ConfigError(f"{key}: {rule}, got {getattr(cfg, key)!r}")


# ---------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class SamplingConfig:
    # Official rewriter (thu-coai/VPO src/llama3_infer.py): n=4, temperature 0.9, top-p 0.9,
    # max_tokens 2048. A generation that reaches max_new_tokens is `truncated` (see
    # GenerateConfig.truncation), never used as if complete.
    max_new_tokens: int = 2048  # local generation limit; endpoints get max_tokens only if their config sets it
    temperature: float = 0.9  # diverse K samples per query
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        check_rules(self, (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
                    (self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)"),
                    (0 < self.top_p <= 1, "top_p", "expected 0 < top_p <= 1"))


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None  # None: start a local Ray instance (or join RAY_ADDRESS)
    num_cpus: Optional[int] = None  # only for a local instance
    num_gpus: Optional[int] = None
    log_to_driver: bool = True

    def __post_init__(self) -> None:
        check_rules(self, (self.num_cpus is None or self.num_cpus >= 1, "num_cpus", "must be >= 1 (or null)"),
                    (self.num_gpus is None or self.num_gpus >= 0, "num_gpus", "must be >= 0 (or null)"))


@dataclass(frozen=True)
class StageConfig:
    """Placement of one model role's actor pool (see ARCHITECTURE.md, GPU placement)."""
    min_actors: int = 1
    max_actors: int = 1
    num_gpus: float = 0.0  # whole GPUs on a cluster, fractions when roles share one GPU
    num_cpus: float = 1.0
    batch_size: int = 8
    # GPU model the pool's actors need (Ray's accelerator_type: "A10G", "A100", "H100");
    # None = any. On an autoscaling cluster a worker group must declare it (cluster/README.md).
    accelerator_type: Optional[str] = None
    # A model call (a batch; one video for render and video judge) still running after this
    # many seconds ends its actor: Ray restarts it and retries the rows (pipeline/guard.py). 0 = off.
    watchdog_s: float = 1800.0

    def __post_init__(self) -> None:
        check_rules(self, (self.min_actors >= 1, "min_actors", "must be >= 1"),
                    (self.max_actors >= self.min_actors, "max_actors", f"must be >= min_actors ({self.min_actors})"),
                    (self.batch_size >= 1, "batch_size", "must be >= 1"),
                    (self.num_cpus >= 0, "num_cpus", "must be >= 0"), (self.num_gpus >= 0, "num_gpus", "must be >= 0"))


WEIGHTS = ("pretrained", "random")  # a job's `weights`: released checkpoints, or real architectures with random weights


def check_weights(value: str, key: str = "weights") -> None:
    if value not in WEIGHTS:
        raise ConfigError(f"{key}: expected pretrained or random, got {value!r}")


@dataclass(frozen=True)
class RandomOutputsConfig:
    """What random-weight models answer (`weights=random`, vpo_ray/models/random_weights.py).

    A random LLM never stops and a random judge has no opinion, so each row ends, and each
    verdict falls, as drawn here from the row's own seed: rows flow through every stage with
    the lengths and shares of a real run. Lengths are normal with sd = spread x mean, clipped
    to [min_tokens, the stage's max_new_tokens - 1], and end as a natural stop.
    """
    rewrite_tokens: int = 150  # mean rewrite: one descriptive paragraph (~110 words; the cap is 256)
    critique_tokens: int = 220  # mean step-by-step verification: six rules of ~35 tokens (judge cap 256)
    refine_tokens: int = 150  # mean refined prompt: a rewrite's size
    length_spread: float = 0.25  # sd of a length as a fraction of its mean
    min_tokens: int = 16  # shortest row
    judge_pass_rate: float = 0.5  # share of candidates the judge passes (K=4: two rendered per query)
    checklist_yes_rate: float = 0.7  # share of video checklist answers that are Yes (so video pairs form)

    def __post_init__(self) -> None:
        check_rules(self, *((getattr(self, k) >= 1, k, "must be >= 1")
                            for k in ("rewrite_tokens", "critique_tokens", "refine_tokens", "min_tokens")),
                    *((0.0 <= getattr(self, k) <= 1.0, k, "expected a share in [0, 1]")
                      for k in ("judge_pass_rate", "checklist_yes_rate")),
                    (self.length_spread >= 0, "length_spread", "must be >= 0"))


@dataclass(frozen=True)
class PlacementConfig:
    """How the stages' actor pools share the GPUs (vpo_ray/pipeline/placement.py, docs/PLACEMENT.md)."""
    mode: str = "auto"  # auto: pool sizes and GPU shares from the node's GPUs | manual: the *_stage values as given
    gpus: Optional[int] = None  # GPUs to plan for; None = what the cluster has, or can grow to (autoscaler)
    side_share: float = 0.25  # of each GPU, what the LLM/VLM actors get beside its text-to-video actor (< 0.5)
    side_actors: int = 1  # actors per LLM/VLM pool (rewrite, judge, video judge); raise it only if they starve T2V
    share_llm: bool = True  # one pool (one copy of the weights) rewrites and judges when both are the same model
    gpu_memory_gib: Optional[float] = None  # per GPU; None = read from a local GPU, else 80
    memory_headroom: float = 0.9  # plan pools into at most this share of a GPU's memory
    wait_for_resources_s: Optional[float] = None  # None: 1800 s if an autoscaler can grow the cluster, else fail at once
    wait_log_every_s: float = 30.0  # period of the log line naming the pool that waits

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "manual"):
            raise ConfigError(f"placement.mode: expected auto or manual, got {self.mode!r}")
        if not 0.0 < self.side_share < 0.5:
            raise ConfigError(f"placement.side_share: expected 0 < side_share < 0.5 (two video actors must never "
                              f"fit on one GPU), got {self.side_share}")
        if self.gpus is not None and self.gpus < 0 or self.side_actors < 1:
            raise ConfigError("placement.gpus must be >= 0 and placement.side_actors >= 1")
        if not 0.0 < self.memory_headroom <= 1.0 or self.wait_log_every_s <= 0:
            raise ConfigError("placement.memory_headroom must lie in (0, 1] and wait_log_every_s be > 0")


@dataclass(frozen=True)
class EndpointConfig:
    """An OpenAI-compatible chat endpoint (vLLM, TGI, a hosted API) standing in for a local model.

    Used as `judge_endpoint` (critique + refine) and `teacher_endpoint` (the rewriter, e.g.
    GPT-4o writing the SFT set as in the paper). Both share one client: bounded concurrency,
    retries (vpo_ray.http_retry), and every failed item an error row.
    """
    base_url: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1; None = the local model
    model: str = "gpt-4o"  # the `model` field of each request (the paper's teacher and judge)
    api_key_env: str = "VPO_JUDGE_API_KEY"  # the key is read from this env var, never from config
    max_concurrency: int = 8  # requests in flight per actor
    max_retries: int = 4
    timeout_s: float = 60.0  # per request
    backoff_s: float = 0.5  # first retry delay; doubles each retry (jittered), capped at max_wait_s
    max_wait_s: float = 30.0  # longest single wait, also the cap on a server's Retry-After
    max_tokens: Optional[int] = None  # None: no max_tokens sent (the official GPT-4o calls set none)


@dataclass(frozen=True)
class PromptsConfig:
    """Model-facing texts (vpo_ray/prompts.py reads them; docs/FIDELITY.md, item 1).

    A template is a UTF-8 text file; `{query}` and `{prompt}` are replaced verbatim
    (other braces are left alone). A file key set here replaces that one text of the set.
    """
    template_set: str = "official"  # official: thu-coai/VPO's texts verbatim | vpo_ray: the project's wording
    optimizer_template: Optional[str] = None  # the optimizer's user turn ({query})
    optimizer_system: Optional[str] = None  # a system message for the optimizer (official: none)
    judge_template: Optional[str] = None  # the critique turn ({query}, {prompt})
    judge_system: Optional[str] = None  # the judge's system message
    refine_template: Optional[str] = None  # the refine turn after the critique
    # What the optimizer is given: query = the user's text as typed, flags (-ar, -neg, -camera)
    # included (official); text = flags parsed out (vpo_ray's earlier input).
    optimizer_input: str = "query"

    def __post_init__(self) -> None:
        if self.template_set not in ("official", "vpo_ray"):
            raise ConfigError(f"prompts.template_set: expected official or vpo_ray, got {self.template_set!r}")
        if self.optimizer_input not in ("query", "text"):
            raise ConfigError(f"prompts.optimizer_input: expected query or text, got {self.optimizer_input!r}")


@dataclass(frozen=True)
class VideoConfig:
    num_frames: int = 49  # CogVideoX-2B's native clip length
    height: int = 480
    width: int = 720
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    fps: int = 8
    seeds_per_prompt: int = 1
    judge_frames: int = 8  # frames sampled with decord for the video judge
    # Also save each video's denoised VAE latents beside its mp4 (<name>.latents.safetensors),
    # written in the render actor: what `vpo train video-dpo` reads (CogVideoX and Wan only).
    keep_latents: bool = False
    optimizations: tuple[str, ...] = ()  # T2V speed flags (pipeline/t2v.py OPTIMIZATIONS), e.g. [attn=cudnn, compile, overlap]
    warmup_steps: int = 0  # > 0: each T2V actor renders one throw-away clip of this many steps first (compile)

    def __post_init__(self) -> None:
        check_rules(self, *((getattr(self, k) >= 1, k, "must be >= 1") for k in (
            "num_frames", "height", "width", "num_inference_steps", "fps", "seeds_per_prompt", "judge_frames")),
                    (self.guidance_scale >= 0, "guidance_scale", "must be >= 0"))


# ---------------------------------------------------------------------------- jobs

@dataclass(frozen=True)
class GenerateConfig:
    """Build the SFT set (`kind=sft`) or the DPO set (`kind=dpo`) from raw queries.

    Defaults are the VPO recipe (docs/FIDELITY.md names the official source of each);
    the project's alternatives are one key away.
    """
    kind: str = "sft"  # sft | dpo
    queries: str = ""  # path (json/jsonl/parquet/csv) or hf://dataset_name[:split]
    query_column: str = "query"
    out: str = "runs/generate"
    preset: str = "tiny"
    weights: str = "pretrained"  # pretrained | random (the preset's real architectures, random weights)
    optimizer: Optional[str] = None  # model that samples candidates; None = preset's optimizer
    t2v: Optional[str] = None  # text-to-video pipeline (dir or registry name); None = preset's (vpo loop: latest tuned)
    limit: Optional[int] = None  # take the first N queries (after shuffling with seed)
    # K rewrites per query; None = the recipe's: sft 1 (one teacher prompt per query, then
    # critique/refine), dpo 4 (src/llama3_infer.py samples n=4 with the SFT model).
    num_samples: Optional[int] = None
    near_dup_threshold: float = 0.85  # Jaccard on word 3-gram MinHash; above = duplicate
    max_query_chars: int = 2000
    refine: bool = True
    refine_keep_multiline: bool = False  # official (src/process_data.py) drops refinements holding a newline
    # The local judge writes a reflection before its refined prompt, as the official refine
    # turn asks (src/gpt4o_infer.py); false = prefill the answer marker, no reflection.
    refine_reflection: bool = True
    # A generation that reached its token limit: error = the item fails with reason
    # "truncated" (official: nothing cut is used) | keep = used, marked `truncated: true`.
    truncation: str = "error"
    # SFT target per query: first = the first sample in sample order that passed the judge
    # or was refined (the recipe, with K=1 its one sample) | best-of-k = the most confident
    # passing sample of K, else the first refinement (vpo_ray's ablation).
    sft_select: str = "first"
    render: str = "all"  # dpo videos: all = every sample (official) | passing = judge-passing samples only
    pair_select: str = "first"  # video pair: first qualifying (i, j) in sample order (official) | largest-gap
    video_score: str = "binary"  # binary = weighted sum of yes answers (official) | soft = of P(yes)
    pair_margin: float = 0.5  # video pair needs score(i) - score(j) > margin (src/process_data.py)
    max_pairs_per_query: int = 1
    # kind=dpo: also write video_dpo.parquet, the video model's preference set (two seeds of one
    # prompt, pair_margin rule; vpo_ray/pipeline/video_dpo_set.py). Needs video.seeds_per_prompt >= 2.
    video_dpo_set: bool = False
    output_format: str = "parquet"  # parquet | jsonl
    sampling: SamplingConfig = SamplingConfig()
    # The official judge (GPT-4o, src/gpt4o_infer.py) ran at temperature 0.7 and no top-p or
    # token limit; the local judge samples its Yes/No verdict at this temperature too.
    judge_sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=1.0)
    prompts: PromptsConfig = PromptsConfig()
    # The rewriter on an endpoint instead of the local optimizer (the paper's SFT teacher was
    # GPT-4o: jobs/paper_teacher.yaml). Its key comes from VPO_TEACHER_API_KEY.
    teacher_endpoint: EndpointConfig = EndpointConfig(api_key_env="VPO_TEACHER_API_KEY")
    judge_endpoint: EndpointConfig = EndpointConfig()  # base_url set = HTTP judge instead of the preset's
    llm_engine: LLMEngineConfig = LLMEngineConfig()  # how the local rewrite/critique/refine models batch and decode
    video: VideoConfig = VideoConfig()
    checklist: str = "vpo_ray"  # video checklist: a shipped name or a YAML/JSON file (vpo_ray/data/checklist.py)
    rewrite_stage: StageConfig = StageConfig()
    judge_stage: StageConfig = StageConfig()
    t2v_stage: StageConfig = StageConfig(batch_size=1)
    video_judge_stage: StageConfig = StageConfig(batch_size=4)
    placement: PlacementConfig = PlacementConfig()  # pool sizes and GPU shares (auto fills the *_stage pools)
    random_outputs: RandomOutputsConfig = RandomOutputsConfig()  # with weights=random: lengths, pass rates
    ray: RayConfig = RayConfig()
    seed: int = 0

    @property
    def samples(self) -> int:
        """K for this kind (num_samples, or the recipe's default)."""
        if self.num_samples is not None:
            return self.num_samples
        return 1 if self.kind == "sft" else 4


@dataclass(frozen=True)
class TrainConfig:
    """SFT (`method=sft`) or DPO (`method=dpo`) with TRL + DeepSpeed on Ray Train."""
    method: str = "sft"  # sft | dpo
    data: str = ""  # parquet/jsonl file or a directory written by `vpo generate`
    out: str = "runs/train"  # local dir or URI; model/, metrics.jsonl, loss.png, ray_results/ go here
    preset: str = "tiny"
    weights: str = "pretrained"  # pretrained | random: start from the preset optimizer's architecture, random weights
    model: Optional[str] = None  # base model path/id; None = preset's optimizer
    ref_model: Optional[str] = None  # DPO reference; None = a frozen copy of `model`
    num_workers: int = 2
    cpus_per_worker: float = 1.0  # Ray resources each training worker reserves
    # How the workers' placement group is laid out (Ray Train ScalingConfig.placement_strategy):
    # PACK fills a node first (fastest collectives); SPREAD puts ranks on different nodes where it
    # can, so one lost node takes fewer of them. Both are soft: a restart fits on what is left.
    placement_strategy: str = "PACK"
    use_gpu: bool = False
    accelerator_type: Optional[str] = None  # GPU model every worker needs ("A100", "H100"); None = any
    deepspeed_stage: int = 2  # 0 = no DeepSpeed (plain DDP), 2 or 3 = ZeRO stage
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON to use instead of the shipped zero2/zero3.json
    offload: bool = False  # ZeRO-Offload of optimizer (and params at stage 3) to CPU
    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed precision; master weights stay fp32)
    learning_rate: Optional[float] = None  # None = the paper's: SFT 2e-6, DPO 5e-7
    epochs: Optional[float] = None  # None = the paper's: SFT 5, DPO 1
    max_steps: int = -1  # >0 overrides epochs
    # Global batch = per_device_batch_size x num_workers x gradient_accumulation_steps; the
    # official one is 2 x 8 GPUs x 1 = 16 (src/config/sft.yaml, dpo.yaml; jobs/*.yaml use it).
    per_device_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    lr_scheduler: Optional[str] = None  # None = SFT constant_with_warmup, DPO linear
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.1  # DPO temperature
    # DPO: weight of an SFT (NLL) term on the chosen prompt beside the preference loss
    # (LLaMA-Factory's pref_ftx; the official dpo.yaml leaves `pref_ftx: 0.1` commented out: 0).
    sft_weight: float = 0.0
    # Tokens of a whole row (prompt + completion); official cutoff_len 2048 (src/config/sft.yaml,
    # dpo.yaml). LLaMA-Factory cuts longer rows; vpo_ray refuses them as a data error naming the row.
    max_length: int = 2048
    # SFT loss on the response tokens only (LLaMA-Factory's default, the official recipe): rows
    # go to TRL as prompt/completion. False = loss on every token of the chat (ablation).
    completion_only_loss: bool = True
    lora: bool = False  # train a LoRA adapter instead of all weights; the export is merged
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated module names
    save_steps: int = 50  # checkpoint (to Ray storage) every N optimizer steps, and at the end; 0 = never
    keep_checkpoints: int = 2  # Ray Train keeps this many latest checkpoints
    save_at_end: bool = True  # also checkpoint after the last step (false: only every save_steps, never the last)
    logging_steps: int = 1
    # First optimizer steps left out of summary.json's throughput figures (allocator, kernels,
    # NCCL set-up); `vpo bench train-step` sets its own train.warmup_steps here.
    throughput_warmup_steps: int = 2
    max_failures: int = 2  # worker deaths tolerated; each restart resumes from the last checkpoint
    resume_from: Optional[str] = None  # checkpoint dir (Ray or HF layout, local or URI) to resume from
    run_name: Optional[str] = None  # Ray Train run under out/ray_results; None = method. Same out+name resumes
    storage_path: Optional[str] = None  # Ray Train storage (dir or URI); None = out/ray_results
    gradient_checkpointing: bool = False  # TRL turns it on by default; off is faster while memory allows
    attn_implementation: str = "sdpa"  # transformers attention kernel: sdpa | eager | flash_attention_2 | flex_attention
    packing: bool = False  # SFT: pack rows into max_length sequences, padding-free (no pad tokens computed)
    precompute_ref_log_probs: bool = False  # DPO: reference log-probs in one pass before training, not in each step
    overlap_comm: Optional[bool] = None  # DeepSpeed: overlap gradient reduction with backward; None = on with GPUs
    bucket_size: Optional[int] = None  # DeepSpeed reduce/prefetch bucket, elements; None = hidden^2 (HF's auto)
    export: bool = True  # write DIR/model at the end (benchmarks skip it: gathering 8B weights takes a minute)
    seed: int = 0
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        check_weights(self.weights)
        if self.method not in ("sft", "dpo"):
            raise ConfigError(f"method: expected sft or dpo, got {self.method!r}")
        if self.deepspeed_stage not in (0, 2, 3):
            raise ConfigError(f"deepspeed_stage: expected 0 (plain DDP), 2 or 3, got {self.deepspeed_stage}")
        if self.placement_strategy not in ("PACK", "SPREAD"):
            raise ConfigError(f"placement_strategy: expected PACK or SPREAD, got {self.placement_strategy!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision: expected fp32, bf16 or fp16, got {self.precision!r}")
        if self.offload and self.deepspeed_stage == 0:
            raise ConfigError("offload needs deepspeed_stage 2 or 3")
        for key in ("num_workers", "per_device_batch_size", "gradient_accumulation_steps", "max_length",
                    "logging_steps", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        check_rules(self, (self.save_steps >= 0, "save_steps", "must be >= 0 (0 = no checkpoints)"),
                    (self.throughput_warmup_steps >= 0, "throughput_warmup_steps", "must be >= 0"),
                    (self.sft_weight >= 0, "sft_weight", "must be >= 0 (0 = DPO alone, the official recipe)"))
        if self.lora and self.weights == "random":
            raise ConfigError("lora: the merged export needs the base weights; use weights=pretrained")
        if self.packing and self.method != "sft":
            raise ConfigError("packing: only SFT packs rows (DPO pairs keep their prompt/completion layout)")
        if self.precompute_ref_log_probs and self.method != "dpo":
            raise ConfigError("precompute_ref_log_probs: only DPO has a reference model")
        if self.bucket_size is not None and self.bucket_size < 1:
            raise ConfigError(f"bucket_size: must be >= 1 element, got {self.bucket_size}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures: expected -1 (unlimited) or >= 0, got {self.max_failures}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio: expected 0 <= warmup_ratio < 1, got {self.warmup_ratio}")


@dataclass(frozen=True)
class AutoscalingConfig:
    """Ray Serve autoscaling of the optimizer deployment (ray.serve.config.AutoscalingConfig)."""
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: Optional[int] = None  # None = min_replicas
    target_ongoing_requests: float = 4.0  # queued + running requests per replica the autoscaler aims at
    upscale_delay_s: float = 2.0  # load must stay high this long before a replica is added
    downscale_delay_s: float = 10.0  # and low this long before one is removed
    look_back_period_s: float = 15.0  # window the request metric is averaged over (Ray default 30); > push interval
    # How often replicas/handles push the metric. Ray 2.60 deprecates the field (it warns when
    # set) for env vars it does not read yet; None = Ray's 10 s, the only value without a warning.
    metrics_interval_s: Optional[float] = None
    upscaling_factor: Optional[float] = None  # gain on scale-up decisions; None = Ray's 1.0
    downscaling_factor: Optional[float] = None

    def __post_init__(self) -> None:
        lo, hi, start = self.min_replicas, self.max_replicas, self.initial_replicas
        check_rules(self, (0 <= lo <= hi, "min_replicas", f"need 0 <= min_replicas <= max_replicas ({hi})"),
                    (hi >= 1, "max_replicas", "must be >= 1"),
                    (start is None or lo <= start <= hi, "initial_replicas", f"must lie in [{lo}, {hi}] (or null)"),
                    (self.target_ongoing_requests > 0, "target_ongoing_requests", "must be > 0"),
                    (self.upscale_delay_s >= 0, "upscale_delay_s", "must be >= 0"),
                    (self.downscale_delay_s >= 0, "downscale_delay_s", "must be >= 0"),
                    (self.look_back_period_s > 0, "look_back_period_s", "must be > 0"),
                    *((getattr(self, k) is None or getattr(self, k) > 0, k, "must be > 0 (or null)")
                      for k in ("metrics_interval_s", "upscaling_factor", "downscaling_factor")))


@dataclass(frozen=True)
class ServeConfig:
    """`vpo serve`: the optimizer as an autoscaled Ray Serve application (vpo_ray/serve/app.py)."""
    model: Optional[str] = None  # exported optimizer dir; None = preset's optimizer
    preset: str = "tiny"
    weights: str = "pretrained"  # pretrained | random (the optimizer's real architecture, random weights)
    random_outputs: RandomOutputsConfig = RandomOutputsConfig()  # with weights=random: rewrite lengths
    served_model_name: Optional[str] = None  # id shown in /v1/models and responses; None = from model/preset
    model_version: Optional[str] = None  # None = fingerprint of the model files
    dtype: Optional[str] = None  # float32 | bfloat16 | float16; None = bf16 on GPU, fp32 on CPU
    app_name: str = "vpo"  # Serve application name (serve status / serve deploy)
    host: str = "127.0.0.1"  # never 0.0.0.0 unless asked
    port: int = 8000
    route_prefix: str = "/"
    num_gpus: float = 0.0  # per optimizer replica; >0 places replicas on GPUs (fractions share one)
    num_cpus: float = 1.0  # per optimizer replica
    accelerator_type: Optional[str] = None  # GPU model of optimizer replicas ("A10G", "L4"); None = any
    torch_threads: Optional[int] = None  # intra-op threads per replica; None = max(1, num_cpus)
    max_batch_size: int = 8  # sequences (sum of n over requests) in one generate call
    batch_wait_timeout_s: float = 0.02  # how long a partial batch waits for company
    max_ongoing_requests: int = 16  # requests one optimizer replica holds (>= max_batch_size to batch)
    max_queued_requests: int = 64  # waiting for a replica beyond that; more gets 503 + Retry-After
    retry_after_s: float = 1.0  # Retry-After sent with 503 when over capacity
    request_timeout_s: float = 120.0  # end-to-end limit for one request; past it 504
    # Admission control (serve/admission.py): a request expected to finish after its deadline gets
    # 503 + Retry-After at once instead of waiting in the queue past it.
    admission: bool = True
    deadline_s: Optional[float] = None  # a request's deadline unless it sends X-VPO-Deadline-S; None = request_timeout_s
    ingress_replicas: int = 1  # FastAPI front (auth, validation, metrics); it holds no model
    ingress_num_cpus: float = 0.1
    ingress_max_ongoing_requests: int = 512
    max_body_bytes: int = 65536  # request bodies above this get 413
    max_query_chars: int = 2000
    max_n: Optional[int] = None  # prompts per request; None = min(8, max_batch_size); must be <= max_batch_size
    max_new_tokens: int = 256  # per prompt; chat `max_tokens` may ask for less
    temperature: float = 0.7  # default when a request gives none; 0 = greedy
    max_temperature: float = 2.0
    top_p: float = 0.95
    prompts: PromptsConfig = PromptsConfig()  # the optimizer's template and input (query as typed), as in training
    render: bool = False  # also serve POST /v1/render: optimize, then render an mp4 as an async job
    t2v_model: Optional[str] = None  # registry name/preset or pipeline dir; None = the preset's t2v model
    render_out: str = "runs/serve"  # jobs/<id>.json and videos/<id>.mp4 (local path or URI, shared by replicas)
    render_replicas: int = 1
    render_num_gpus: float = 0.0  # per render replica
    render_num_cpus: float = 1.0
    render_max_jobs: int = 8  # queued + running render jobs per ingress replica; more get 503
    video: VideoConfig = VideoConfig()  # frames, size, steps of rendered videos
    auth_token_env: str = "VPO_SERVE_TOKEN"  # set this env var to require a bearer token; "" = never
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        check_weights(self.weights)
        if self.max_n is None and self.max_batch_size >= 1:
            object.__setattr__(self, "max_n", min(8, self.max_batch_size))
        if self.max_n < 1 or self.max_batch_size < 1:
            raise ConfigError("max_n and max_batch_size must be >= 1")
        if self.max_n > self.max_batch_size:
            raise ConfigError(f"max_n ({self.max_n}) exceeds max_batch_size ({self.max_batch_size}): "
                              "the n prompts of one request are generated in one batch")
        if self.max_ongoing_requests < 1 or self.max_queued_requests < -1:
            raise ConfigError("max_ongoing_requests must be >= 1 and max_queued_requests >= -1 (-1 = unbounded)")
        if self.deadline_s is not None and not 0 < self.deadline_s <= self.request_timeout_s:
            raise ConfigError(f"deadline_s ({self.deadline_s}) must lie in (0, request_timeout_s={self.request_timeout_s}]")
        if not 0.0 <= self.temperature <= self.max_temperature:
            raise ConfigError(f"temperature ({self.temperature}) must lie in [0, max_temperature={self.max_temperature}]")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")


@dataclass(frozen=True)
class VBenchConfig:
    """VBench dimension scorers (vpo_ray/eval/vbench_scorer.py), used when `vbench` is a video scorer."""
    dimensions: tuple[str, ...] = ("subject_consistency", "motion_smoothness", "dynamic_degree",
                                   "aesthetic_quality", "imaging_quality")  # custom-prompt capable ones
    cache_dir: Optional[str] = None  # local folder of VBench's weights (VBENCH_CACHE_DIR); None = VBench's ~/.cache/vbench
    mode: str = "custom_input"  # custom_input: each video judged against its query | vbench_standard: VBench's prompt suite
    device: Optional[str] = None  # None: cuda if available, else cpu
    num_gpus: float = 0.0  # the scoring task's GPU request on the cluster


@dataclass(frozen=True)
class EvalConfig:
    """`vpo eval`: compare prompt sources on the judge's text verdicts and on judged videos."""
    queries: str = ""  # "" = built-in small set; path, hf://name[:split], builtin:NAME, SUITE[:path-or-hf-id] (eval/suites.py)
    query_column: Optional[str] = None  # None = the suite's text column, "query" for plain files
    limit: Optional[int] = None  # take N queries (shuffled with seed, kept in file order)
    out: str = "runs/eval"
    preset: str = "tiny"
    weights: str = "pretrained"  # pretrained | random: the preset's models as real architectures, random weights
    # Prompt sources, one row each in the table: original (the query itself), few_shot (the
    # preset's optimizer LLM prompted with the few-shot examples), and trained optimizers as
    # name=path (a model dir or a `vpo train` out dir), e.g. sft=runs/sft dpo1=runs/dpo1.
    sources: tuple[str, ...] = ("original", "few_shot")
    videos: bool = True  # False: text-level columns only (no T2V, no video judge)
    # T2V models beside the preset's, as name=path (a `vpo train video-dpo` out dir, pipeline dir or
    # registry name): every source renders with each on the same seeds, rows "<source>+<name>".
    t2v_models: tuple[str, ...] = ()
    # A second video judge training never saw (registry name or dir; None = none): it answers the
    # same checklist beside the training judge, a guard against reward hacking (eval/video_models.py).
    holdout_judge: Optional[str] = None
    sampling: SamplingConfig = SamplingConfig(temperature=0.0)  # optimizer decoding: greedy, one prompt per query
    # The official judge (GPT-4o) ran at temperature 0.7; the local judge samples its
    # Yes/No verdict at this temperature too (0 = always the likelier verdict).
    judge_sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=1.0)
    judge_endpoint: EndpointConfig = EndpointConfig()  # base_url set = HTTP judge instead of the preset's
    prompts: PromptsConfig = PromptsConfig()  # templates and optimizer input, as the optimizers were trained
    question_reasoning: bool = True  # unsafe/imprecise/refusal: reason first (as the main judge) or answer at once
    truncation: str = "error"  # a rewrite or critique that reached its token limit: error | keep (marked), as in generate
    refusal: str = "regex+judge"  # refusal detector: regex | judge | regex+judge (either one flags it)
    video: VideoConfig = VideoConfig()  # seeds_per_prompt videos per prompt, same seeds for every source
    checklist: str = "vpo_ray"  # video checklist: shipped name or YAML/JSON file (VisionReward's for MonetBench)
    video_score: str = "binary"  # checklist score: binary = weighted sum of yes answers | soft = of P(yes)
    # Video scorers, each a column group of the table: checklist (the VLM judge answering the
    # checklist) and/or vbench (VBench dimension scorers; needs the optional `vbench` package).
    video_scorers: tuple[str, ...] = ("checklist",)
    vbench: VBenchConfig = VBenchConfig()
    bootstrap: int = 1000  # resamples (over queries) for every confidence interval; 0 = no intervals
    ci: float = 0.95  # confidence level of the percentile bootstrap intervals
    tie_tolerance: float = 1e-6  # video scores closer than this are a tie (half a win)
    report_max_queries: Optional[int] = 200  # queries shown in report/index.html (videos copied); None = all
    max_query_chars: int = 2000
    near_dup_threshold: float = 0.85  # as in generate: near-duplicate test queries count once
    rewrite_stage: StageConfig = StageConfig()  # one pool per LLM source (few_shot and each trained optimizer)
    judge_stage: StageConfig = StageConfig()
    t2v_stage: StageConfig = StageConfig(batch_size=1)
    video_judge_stage: StageConfig = StageConfig(batch_size=4)
    placement: PlacementConfig = PlacementConfig()  # pool sizes and GPU shares (auto fills the *_stage pools)
    random_outputs: RandomOutputsConfig = RandomOutputsConfig()  # with weights=random: lengths, pass rates
    seed: int = 0  # optimizer/judge sampling seeds, video seeds (seed*1000+i unless the query has -seed) and bootstrap
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        check_weights(self.weights)
        if not self.sources:
            raise ConfigError("sources: give at least one prompt source (original, few_shot, name=path)")
        if not self.video_scorers or set(self.video_scorers) - {"checklist", "vbench"}:
            raise ConfigError(f"video_scorers: expected one or both of checklist, vbench, got {list(self.video_scorers)}")
        if self.video_score not in ("binary", "soft"):
            raise ConfigError(f"video_score: expected binary or soft, got {self.video_score!r}")
        if self.holdout_judge and "checklist" not in self.video_scorers:
            raise ConfigError("holdout_judge: the second judge answers the checklist beside the first, so "
                              "video_scorers must include checklist")
        if self.truncation not in ("error", "keep"):
            raise ConfigError(f"truncation: expected error or keep, got {self.truncation!r}")
        if self.refusal not in ("regex", "judge", "regex+judge"):
            raise ConfigError(f"refusal: expected regex, judge or regex+judge, got {self.refusal!r}")
        if self.bootstrap < 0:
            raise ConfigError(f"bootstrap: must be >= 0, got {self.bootstrap}")
        if not 0.0 < self.ci < 1.0:
            raise ConfigError(f"ci: expected 0 < ci < 1, got {self.ci}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1, got {self.limit}")
        if self.report_max_queries is not None and self.report_max_queries < 0:
            raise ConfigError(f"report_max_queries: must be >= 0 or null, got {self.report_max_queries}")
        if self.video.seeds_per_prompt < 1:
            raise ConfigError(f"video.seeds_per_prompt: must be >= 1, got {self.video.seeds_per_prompt}")


# The `vpo bench` configs live in vpo_ray/bench/config.py; these names still import from here.
_BENCH_NAMES = ("BenchConfig", "BenchVideoConfig", "BenchLLMConfig", "BenchTrainConfig", "BenchPipelineConfig",
                "LLM_BENCH_PHASES", "LLM_BENCH_DEFAULT_PHASES")


def __getattr__(name: str):
    if name in _BENCH_NAMES:  # lazily: vpo_ray.bench.config imports this module
        from vpo_ray.bench import config as bench_config

        return getattr(bench_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
