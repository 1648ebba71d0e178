"""`vpo train sft|dpo`: the driver side of training on Ray Train.

    check the data (driver, no workers) -> TorchTrainer(N workers: TRL + DeepSpeed)
      -> DIR/model/ (safetensors + tokenizer + chat template), DIR/metrics.jsonl,
         DIR/loss.png, DIR/summary.json, DIR/ray_results/<run>/checkpoint_*/

A dead worker costs one restart (up to `max_failures`): the new worker group resumes
from the last reported checkpoint. Re-running the same command with the same out and
run name resumes too (Ray Train restores the run from its storage).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Optional

from vpo_ray import faults, storage
from vpo_ray.config import ConfigError, TrainConfig, load_config, replace, to_dict

log = logging.getLogger("vpo.train")


class TrainError(RuntimeError):
    """Training failed on the workers after all allowed restarts."""


def resolve_model(cfg: TrainConfig) -> str:
    """The base model: cfg.model (a path, hub id or registry name), else the preset's optimizer.

    weights=random keeps a registry name as is: the workers build its shipped architecture,
    so nothing is downloaded.
    """
    from vpo_ray.models.registry import MODELS, get_spec, model_path

    name = cfg.model or get_spec(cfg.preset, "optimizer").name
    if cfg.weights == "random" and name in MODELS and not os.path.isdir(name):
        return name  # tiny names too: their random architecture is the small stand-in (configs/tiny-llm)
    return model_path(name)


def _abs(uri: str) -> str:
    return os.path.abspath(storage.local_path(uri)) if storage.is_local(uri) else uri


def worker_env(cfg: TrainConfig) -> dict:
    """Env vars the training workers need that the job's runtime env does not already set."""
    import ray

    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA
    for key in ("HF_HUB_OFFLINE", "HF_HOME", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    env.update(faults.env_vars())  # VPO_FAULTS drills reach the workers
    job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    # Only what differs: a worker with the job's own runtime env can come from Ray's idle pool.
    return {k: v for k, v in env.items() if job_env.get(k) != v}


def build_trainer(cfg: TrainConfig, model_path: str, ref_model_path: Optional[str] = None, job_id: str = ""):
    """The TorchTrainer for `cfg` (cfg.out and cfg.data already absolute)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vpo_ray.train.worker import deepspeed_config, train_worker

    storage_path = _abs(cfg.storage_path) if cfg.storage_path else storage.join(cfg.out, "ray_results")
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "model_path": model_path, "ref_model_path": ref_model_path,
                           "deepspeed": deepspeed_config(cfg), "job_id": job_id,
                           "measure_ceiling": cfg.use_gpu and cfg.weights == "random"},  # benchmark runs
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     accelerator_type=cfg.accelerator_type,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=cfg.run_name or cfg.method,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": extra_env} if (extra_env := worker_env(cfg)) else None,
        ),
    )


def train(cfg: TrainConfig) -> dict:
    """Validate the data, train on Ray, export; returns (and writes) DIR/summary.json."""
    from vpo_ray.ray_utils import init_ray
    from vpo_ray.train.build import load_tokenizer
    from vpo_ray.train.data import validate_training_set
    from vpo_ray.train.metrics import plot_losses, read_steps, summarise
    from vpo_ray.train.worker import deepspeed_config

    t0 = time.perf_counter()
    cfg = replace(cfg, out=_abs(cfg.out), **{k: _abs(getattr(cfg, k)) for k in ("data", "resume_from")
                                             if getattr(cfg, k)})
    model_path = resolve_model(cfg)
    ref_model_path = None
    if cfg.ref_model:
        from vpo_ray.models.registry import model_path as registry_path

        ref_model_path = registry_path(cfg.ref_model)
    tokenizer = load_tokenizer(cfg, model_path)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model: the tokenizer of {model_path} has no chat template; the sets are chat-formatted")
    report = validate_training_set(cfg.data, cfg.method, tokenizer, cfg.max_length)
    deepspeed_config(cfg)  # a missing or broken DeepSpeed JSON fails here, before Ray
    log.info("data ok: %d rows in %s, longest %d tokens", report.rows, ", ".join(report.files), report.max_tokens)

    storage.makedirs(cfg.out)
    storage.write_json(storage.join(cfg.out, "config.json"), {**to_dict(cfg), "model": model_path})
    init_ray(cfg.ray)
    t_fit, fit_started_at = time.perf_counter(), time.time()
    job_id = storage.unique_name("train")  # train_state.json names the call that wrote it
    # fit() installs a SIGINT handler (Ctrl-C aborts the run) and never removes it; put
    # ours back so Ctrl-C still stops whatever runs next (`vpo loop`'s next stage).
    sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        result = build_trainer(cfg, model_path, ref_model_path, job_id).fit()
    except Exception as e:  # Ray Train raises the workers' error once max_failures is used up
        raise TrainError(f"{cfg.method} training failed: {e}") from e
    finally:
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)
    fit_s = time.perf_counter() - t_fit
    state_uri = storage.join(cfg.out, "train_state.json")
    state = storage.read_json(state_uri) if storage.exists(state_uri) else {}
    if getattr(result, "error", None) or state.get("job_id") != job_id:
        raise TrainError(f"{cfg.method} training ended without an export: {getattr(result, 'error', None) or 'aborted'}")
    for skipped in state.get("skipped_checkpoints", []):
        log.warning("skipped damaged checkpoint %s (%s); resumed from %s", skipped["checkpoint"], skipped["why"],
                    os.path.basename(str(state.get("resumed_from")).rstrip("/")))
    if state.get("resumed_from"):
        log.info("resumed from %s", state["resumed_from"])

    rows = read_steps(storage.join(cfg.out, "metrics.jsonl"))
    plot_losses(rows, storage.join(cfg.out, "loss.png"), title=f"{cfg.method.upper()} ({os.path.basename(cfg.out)})")
    summary = {
        "method": cfg.method,
        "model": storage.join(cfg.out, "model") if cfg.export else None,
        "base_model": model_path,
        "weights": cfg.weights,
        "rows": report.rows,
        "global_step": state["global_step"],
        "num_workers": cfg.num_workers,
        "deepspeed_stage": cfg.deepspeed_stage,
        "metrics": summarise(rows),
        "final": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "train_runtime": state.get("summary", {}).get("train_runtime"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "resumed_from": state.get("resumed_from"),  # the last attempt's starting checkpoint, if any
        "skipped_checkpoints": state.get("skipped_checkpoints", []),
        "fit_seconds": round(fit_s, 2),  # Ray Train start to finish, restarts included
        "rank0_seconds": state.get("rank0_seconds", {}),  # the last attempt's phases on rank 0
        "ray_start_seconds": round(state.get("rank0_seconds", {}).get("started_at", fit_started_at) - fit_started_at, 2),
        "ray_stop_seconds": round(fit_started_at + fit_s - state.get("finished_at", fit_started_at + fit_s), 2),
        "wall_seconds": round(time.perf_counter() - t0, 2),
        **run_figures(cfg, rows, state),
    }
    storage.write_json(storage.join(cfg.out, "summary.json"), summary)
    return summary


def run_figures(cfg: TrainConfig, rows: list[dict], state: dict) -> dict:
    """Throughput, checkpoint seconds and the resume comparison for summary.json."""
    from vpo_ray.train.callbacks import ATTEMPTS, REPLACED, SAVES
    from vpo_ray.train.throughput import resume_check, throughput

    def this_call(name: str) -> list[dict]:  # an earlier call with the same out left its own rows
        return [r for r in storage.read_jsonl(storage.join(cfg.out, name)) if r.get("attempt_started_at") in started]

    attempts = [a for a in storage.read_jsonl(storage.join(cfg.out, ATTEMPTS)) if a.get("job_id") == state.get("job_id")]
    started = {a["started_at"] for a in attempts}
    ref_in_step = cfg.method == "dpo" and not cfg.precompute_ref_log_probs
    fresh = [a["train_begin_s"] for a in attempts if not a.get("resumed_from")]
    resumed = [a["train_begin_s"] for a in attempts if a.get("resumed_from")]
    return {"throughput": throughput(rows, state, cfg.method, ref_in_step, cfg.throughput_warmup_steps),
            "checkpoint_saves": this_call(SAVES),
            # train() start to the first step: DeepSpeed set-up, plus reading the checkpoint when resumed
            "attempts": attempts,
            "checkpoint_read_s": round(resumed[-1] - fresh[0], 2) if fresh and resumed else None,
            "resume_check": resume_check(rows, this_call(REPLACED))}


def add_arguments(p) -> None:
    p.add_argument("method", choices=["sft", "dpo", "video-dpo"],
                   help="SFT on the SFT set, DPO on the DPO set, or video-dpo: Diffusion-DPO of the T2V model "
                        "on the video preference set (vpo_ray/train/video_dpo.py)")
    p.add_argument("--data", help="training set: parquet/jsonl file or a `vpo generate` output directory")
    p.add_argument("--out", help="output directory (model/, metrics.jsonl, loss.png, ray_results/)")
    p.add_argument("--preset", help="model preset whose optimizer is the base model (default tiny)")
    p.add_argument("--model", help="base model dir/id instead of the preset's optimizer (e.g. the SFT export)")
    p.add_argument("--config", help="YAML config (TrainConfig)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. deepspeed_stage=3 max_steps=20")


def run(args) -> int:
    if args.method == "video-dpo":  # the video model's training: its own config and workers
        from vpo_ray.train import video_dpo

        return video_dpo.run(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(TrainConfig, args.config, args.overrides, method=args.method, data=args.data,
                      out=args.out, preset=args.preset, model=args.model)
    summary = train(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0
