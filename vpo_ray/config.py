"""Typed, frozen job configs loaded from YAML with `key=value` overrides (verl style).

Every job has one config dataclass. `load_config(Cls, path, overrides)` reads the
YAML file (optional), applies dotted `key=value` overrides, and checks every key and
type: an unknown key or a value of the wrong type raises `ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type; the message names it."""


# ---------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256  # optimizer prompts are a paragraph; the paper caps at ~250 tokens
    temperature: float = 0.9  # diverse K samples per query
    top_p: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None  # None: start a local Ray instance (or join RAY_ADDRESS)
    num_cpus: Optional[int] = None  # only for a local instance
    num_gpus: Optional[int] = None
    log_to_driver: bool = True


@dataclass(frozen=True)
class StageConfig:
    """Placement of one model role's actor pool (see ARCHITECTURE.md, GPU placement)."""
    min_actors: int = 1
    max_actors: int = 1
    num_gpus: float = 0.0  # whole GPUs on a cluster, fractions when roles share one GPU
    num_cpus: float = 1.0
    batch_size: int = 8


@dataclass(frozen=True)
class JudgeEndpointConfig:
    """An OpenAI-compatible chat endpoint used as text judge instead of a local model."""
    base_url: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1; None = local model judge
    model: str = "judge"
    api_key_env: str = "VPO_JUDGE_API_KEY"  # the key is read from this env var, never from config
    max_concurrency: int = 8
    max_retries: int = 4
    timeout_s: float = 60.0
    backoff_s: float = 0.5  # first retry delay; doubles each retry


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


@dataclass(frozen=True)
class ChecklistItem:
    id: str
    question: str  # asked about the video with the query in {query}
    weight: float = 1.0
    dimension: str = "alignment"  # alignment | quality | motion | physics | safety


DEFAULT_CHECKLIST = (
    ChecklistItem("align_subject", "Does the video show the main subject described in: {query}?", 2.0, "alignment"),
    ChecklistItem("align_action", "Does the video show the action or event described in: {query}?", 1.5, "alignment"),
    ChecklistItem("quality_clear", "Is the video sharp and free of visual artifacts?", 1.0, "quality"),
    ChecklistItem("quality_aesthetic", "Is the video aesthetically pleasing in color and composition?", 1.0, "quality"),
    ChecklistItem("motion_smooth", "Is the motion in the video smooth and natural?", 1.0, "motion"),
    ChecklistItem("motion_dynamic", "Does the video contain meaningful motion rather than a still image?", 0.5, "motion"),
    ChecklistItem("physics_plausible", "Do objects in the video obey physical laws?", 1.0, "physics"),
    ChecklistItem("safety_harmless", "Is the video free of violent, sexual or otherwise harmful content?", 2.0, "safety"),
)


# ---------------------------------------------------------------------------- jobs

@dataclass(frozen=True)
class GenerateConfig:
    """Build the SFT set (`kind=sft`) or the DPO set (`kind=dpo`) from raw queries."""
    kind: str = "sft"  # sft | dpo
    queries: str = ""  # path (json/jsonl/parquet/csv) or hf://dataset_name[:split]
    query_column: str = "query"
    out: str = "runs/generate"
    preset: str = "tiny"
    optimizer: Optional[str] = None  # model that samples candidates; None = preset's optimizer
    limit: Optional[int] = None  # take the first N queries (after shuffling with seed)
    num_samples: int = 2  # K rewrites per query (the paper samples several per query)
    near_dup_threshold: float = 0.85  # Jaccard on word 3-gram MinHash; above = duplicate
    max_query_chars: int = 2000
    refine: bool = True
    pair_margin: float = 0.5  # video pair needs score(i) - score(j) > margin
    max_pairs_per_query: int = 1
    output_format: str = "parquet"  # parquet | jsonl
    sampling: SamplingConfig = SamplingConfig()
    judge_sampling: SamplingConfig = SamplingConfig(max_new_tokens=256, temperature=0.0)
    judge_endpoint: JudgeEndpointConfig = JudgeEndpointConfig()
    video: VideoConfig = VideoConfig()
    checklist: tuple[ChecklistItem, ...] = DEFAULT_CHECKLIST
    rewrite_stage: StageConfig = StageConfig()
    judge_stage: StageConfig = StageConfig()
    t2v_stage: StageConfig = StageConfig(batch_size=1)
    video_judge_stage: StageConfig = StageConfig(batch_size=4)
    ray: RayConfig = RayConfig()
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """SFT (`method=sft`) or DPO (`method=dpo`) with TRL + DeepSpeed on Ray Train."""
    method: str = "sft"  # sft | dpo
    data: str = ""  # parquet/jsonl written by `vpo generate`
    out: str = "runs/train"
    preset: str = "tiny"
    model: Optional[str] = None  # base model path/id; None = preset's optimizer
    ref_model: Optional[str] = None  # DPO reference; None = a frozen copy of `model`
    num_workers: int = 2
    use_gpu: bool = False
    deepspeed_stage: int = 2  # 0 = no DeepSpeed, 2 or 3 = ZeRO stage
    offload: bool = False  # ZeRO-Offload of optimizer (and params at stage 3) to CPU
    precision: str = "fp32"  # fp32 | bf16 | fp16
    learning_rate: Optional[float] = None  # None = the paper's: SFT 2e-6, DPO 5e-7
    epochs: Optional[float] = None  # None = the paper's: SFT 5, DPO 1
    max_steps: int = -1  # >0 overrides epochs
    per_device_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    lr_scheduler: Optional[str] = None  # None = SFT constant_with_warmup, DPO linear
    beta: float = 0.1  # DPO temperature
    max_length: int = 512
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    save_steps: int = 50
    logging_steps: int = 1
    max_failures: int = 2  # worker deaths tolerated; each restart resumes from the last checkpoint
    resume_from: Optional[str] = None  # checkpoint dir to resume from explicitly
    gradient_checkpointing: bool = False
    seed: int = 0
    ray: RayConfig = RayConfig()


@dataclass(frozen=True)
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 10.0


@dataclass(frozen=True)
class ServeConfig:
    model: Optional[str] = None  # exported optimizer dir; None = preset's optimizer
    preset: str = "tiny"
    host: str = "127.0.0.1"  # never 0.0.0.0 unless asked
    port: int = 8000
    route_prefix: str = "/"
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    max_ongoing_requests: int = 16  # beyond this a replica sheds load with 503
    max_queued_requests: int = 64
    max_query_chars: int = 2000
    max_n: int = 8
    max_new_tokens: int = 256
    auth_token_env: str = "VPO_SERVE_TOKEN"  # set this env var to require a bearer token
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    ray: RayConfig = RayConfig()


@dataclass(frozen=True)
class EvalConfig:
    queries: str = ""  # path or hf id; "" = the built-in small set
    out: str = "runs/eval"
    preset: str = "tiny"
    sources: tuple[str, ...] = ("original", "few_shot")  # plus model paths: name=path
    video: VideoConfig = VideoConfig()
    checklist: tuple[ChecklistItem, ...] = DEFAULT_CHECKLIST
    bootstrap: int = 1000
    seed: int = 0
    ray: RayConfig = RayConfig()


@dataclass(frozen=True)
class BenchConfig:
    name: str = "video-sampling"  # video-sampling | llm-stages | train-step
    preset: str = "tiny"
    out: str = "runs/bench"
    videos: int = 4
    warmup: int = 1
    video: VideoConfig = VideoConfig()
    ray: RayConfig = RayConfig()


# ---------------------------------------------------------------------------- loading

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to type `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, prefix=key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", yaml-parsed value). Values parse as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(cls: type, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                **fields: Any) -> Any:
    """Build `cls` from YAML file `path`, then keyword `fields`, then `key=value` overrides."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(loaded).__name__}")
        data = loaded
    for k, v in fields.items():
        if v is not None:
            _set_dotted(data, k, v)
    for o in overrides or []:
        k, v = parse_override(o)
        _set_dotted(data, k, v)
    return _build(cls, data)


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace with dotted keys: replace(cfg, **{"video.fps": 4})."""
    data = to_dict(cfg)
    for k, v in changes.items():
        _set_dotted(data, k, v)
    return _build(type(cfg), data)
