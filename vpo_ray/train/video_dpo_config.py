"""`vpo train video-dpo` settings: Diffusion-DPO on the text-to-video transformer.

Every method setting names its source. The two papers' official code:
  * Diffusion-DPO (Wallace et al. 2023), github.com/SalesforceAIResearch/DiffusionDPO, train.py
    and README: beta_dpo 5000, timesteps uniform over [0, num_train_timesteps), one noise and
    one timestep shared by the two samples of a pair, constant_with_warmup schedule.
  * VideoDPO (Liu et al., CVPR 2025), github.com/CIntellifusion/VideoDPO, configs/vc2_dpo/config.yaml:
    beta_dpo 5000, base_learning_rate 6e-6 (full fine-tune), batch_size 1, accumulate_grad_batches 2.
  * LoRA on CogVideoX: diffusers examples/cogvideo/train_cogvideox_lora.py and its README
    (target modules to_k/to_q/to_v/to_out.0, rank 64, alpha 64, learning rate 1e-4, AdamW
    weight decay 1e-4, max_grad_norm 1.0, v-prediction target from scheduler.get_velocity).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vpo_ray.config import ConfigError, RayConfig, check_rules, check_weights

# Learning rates when `learning_rate` is None (see the module docstring for the sources).
DEFAULT_LR = {"lora": 1e-4, "full": 6e-6}
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")


@dataclass(frozen=True)
class VideoDPOConfig:
    """Diffusion-DPO of a text-to-video transformer on same-prompt video pairs, on Ray Train."""
    data: str = ""  # video_dpo.parquet/.jsonl, or a `vpo generate dpo video_dpo_set=true` output folder
    out: str = "runs/video_dpo"  # model/ (diffusers pipeline), lora/, metrics.jsonl, loss.png, ray_results/
    preset: str = "tiny"  # whose t2v model is the base when `model` is None
    model: Optional[str] = None  # base pipeline: dir, registry name, or arch:<name> (random weights, benchmarks)
    weights: str = "pretrained"  # pretrained | random: the base's real architecture with random weights (smoke runs)
    export: bool = True  # write DIR/model (+ lora/); a random-weight base has none to merge into: set false
    # -- the method
    beta: float = 5000.0  # beta_dpo of the Diffusion-DPO loss (DiffusionDPO train.py default; VideoDPO config)
    timestep_sampling: str = "uniform"  # uniform over [0, T) as Diffusion-DPO; logit_normal | mode: diffusers'
    logit_mean: float = 0.0  # logit_normal only (diffusers.training_utils.compute_density_for_timestep_sampling)
    logit_std: float = 1.0  # logit_normal only
    mode_scale: float = 1.29  # mode only (the SD3 value in diffusers' examples)
    # -- parameters trained
    lora: bool = True  # LoRA adapter on the transformer (peft); False = every transformer weight
    lora_r: int = 64  # diffusers examples/cogvideo README: --rank 64
    lora_alpha: int = 64  # same README: --lora_alpha 64
    lora_targets: str = "to_k,to_q,to_v,to_out.0"  # train_cogvideox_lora.py target_modules
    # -- optimisation
    learning_rate: Optional[float] = None  # None = DEFAULT_LR: LoRA 1e-4 (diffusers), full 6e-6 (VideoDPO)
    lr_scheduler: str = "constant_with_warmup"  # Diffusion-DPO README (any diffusers.optimization name)
    warmup_steps: int = 0  # Diffusion-DPO used 500 of 2000 steps; small sets need fewer
    adam_beta1: float = 0.9  # torch/diffusers default
    adam_beta2: float = 0.999  # torch default (diffusers' CogVideoX LoRA example: 0.95)
    weight_decay: float = 1e-4  # train_cogvideox_lora.py --adam_weight_decay
    max_grad_norm: float = 1.0  # train_cogvideox_lora.py --max_grad_norm
    per_device_batch_size: int = 1  # pairs per rank per micro-step (VideoDPO batch_size 1)
    gradient_accumulation_steps: int = 2  # VideoDPO accumulate_grad_batches 2
    epochs: float = 1.0  # passes over the pairs (ignored when max_steps > 0)
    max_steps: int = -1  # > 0: this many optimizer steps
    # -- distribution and memory
    num_workers: int = 2  # Ray Train workers (one GPU each with use_gpu)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    deepspeed_stage: int = 2  # 0 = DeepSpeed data parallel without ZeRO, 2 or 3 = ZeRO stage
    precision: str = "fp32"  # fp32 | bf16 (DeepSpeed bf16: bf16 weights, fp32 master copy in the optimizer)
    gradient_checkpointing: bool = True  # recompute block activations in backward (video tokens: ~17k a clip)
    # -- checkpoints, logs
    save_steps: int = 50  # checkpoint to Ray storage every N optimizer steps, and at the end
    keep_checkpoints: int = 2  # Ray Train keeps this many latest checkpoints
    logging_steps: int = 1
    max_failures: int = 2  # worker deaths tolerated; each restart resumes from the last checkpoint
    resume_from: Optional[str] = None  # a checkpoint dir (Ray layout) to resume from
    run_name: Optional[str] = None  # Ray Train run under out/ray_results; None = video-dpo. Same out+name resumes
    storage_path: Optional[str] = None  # Ray Train storage (dir or URI); None = out/ray_results
    seed: int = 0  # data order, noise and timesteps (per step and rank: a resumed run draws the same)
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        check_weights(self.weights)
        check_rules(
            self,
            (self.beta > 0, "beta", "must be > 0"),
            (self.timestep_sampling in TIMESTEP_SAMPLING, "timestep_sampling",
             f"expected one of {', '.join(TIMESTEP_SAMPLING)}"),
            (self.deepspeed_stage in (0, 2, 3), "deepspeed_stage", "expected 0, 2 or 3"),
            (self.precision in ("fp32", "bf16"), "precision", "expected fp32 or bf16"),
            (self.learning_rate is None or self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.epochs > 0 or self.max_steps > 0, "epochs", "must be > 0 unless max_steps > 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (self.max_failures >= -1, "max_failures", "expected -1 (unlimited) or >= 0"),
        )
        for key in ("num_workers", "per_device_batch_size", "gradient_accumulation_steps", "save_steps",
                    "logging_steps", "keep_checkpoints", "lora_r", "lora_alpha"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR["lora" if self.lora else "full"]


@dataclass(frozen=True)
class BenchVideoDPOConfig:
    """`vpo bench video-dpo-step`: the Diffusion-DPO training step of a T2V transformer (vpo_ray/bench/video_dpo_step.py)."""
    preset: str = "tiny"  # tiny (the tiny CogVideoX, CPU check) | a registry T2V name: real architecture, random weights
    out: str = "runs/bench"
    modes: tuple[str, ...] = ("lora", "full")  # LoRA adapter (VideoDPOConfig defaults) | every transformer weight
    workers: tuple[int, ...] = (1, 4)  # Ray Train workers (one GPU each) per measured run; capped at the GPUs present
    steps: int = 5  # timed optimizer steps per run
    warmup: int = 1  # steps before timing (DeepSpeed buckets, kernels, allocator), excluded
    pairs_per_gpu: int = 1  # pairs in one rank's micro-batch (each pair: two videos through policy and reference)
    num_frames: Optional[int] = None  # None = the model's registry defaults (CogVideoX-2B: 49 x 480 x 720)
    height: Optional[int] = None
    width: Optional[int] = None
    zero_stage: int = 2  # DeepSpeed ZeRO stage of the full fine-tune (LoRA keeps its few weights on every rank)
    gradient_checkpointing: bool = True  # as `vpo train video-dpo` (17.6k tokens a 49-frame clip)
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        if not self.modes or any(m not in ("lora", "full") for m in self.modes):
            raise ConfigError(f"modes: expected lora and/or full, got {self.modes!r}")
        if not self.workers or any(w < 1 for w in self.workers) or self.steps < 1 or self.warmup < 0:
            raise ConfigError("workers must be >= 1 each, steps >= 1 and warmup >= 0")
        if self.zero_stage not in (0, 2, 3) or self.pairs_per_gpu < 1:
            raise ConfigError("zero_stage must be 0, 2 or 3 and pairs_per_gpu >= 1")
