"""`vpo train video-dpo`: Diffusion-DPO of the text-to-video model on its own judged videos.

    video_dpo.parquet (from `vpo generate dpo video_dpo_set=true`: two seeds of one prompt,
    the checklist rule's preferred one first, latents beside each mp4)
      -> check every row on the driver (fields, files, latent shapes)
      -> TorchTrainer(N workers: video_dpo_worker.train_worker, DeepSpeed, LoRA or full)
      -> DIR/model/ (diffusers pipeline: loads with from_pretrained, renders), DIR/lora/ (LoRA runs),
         DIR/metrics.jsonl, DIR/loss.png, DIR/summary.json, DIR/ray_results/<run>/checkpoint_*/

As `vpo train sft|dpo`: a dead worker costs one restart from the last checkpoint (up to
`max_failures`), and re-running the same command with the same out and run name resumes.
Settings and their sources: vpo_ray/train/video_dpo_config.py.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

from vpo_ray import storage
from vpo_ray.config import ConfigError, load_config, replace, to_dict
from vpo_ray.train.data import DataError
from vpo_ray.train.video_dpo_config import VideoDPOConfig

log = logging.getLogger("vpo.train")

SET_NAME = "video_dpo"
REQUIRED = ("query_id", "prompt", "chosen_latents", "rejected_latents")


# ---------------------------------------------------------------------------- data

def _resolve(uri: str, set_dir: str) -> str:
    """A latents/video URI as stored (relative to the set's folder, or absolute / a URL) -> usable URI."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    return storage.join(set_dir, uri)


def read_pairs(path: str, same_shape: bool = False) -> tuple[list[str], list[dict]]:
    """(files, rows) of the video preference set, every row checked; DataError names file, row and field.

    Rows come back with absolute latents/video URIs. `same_shape`: every pair's latents must
    have one shape (a micro-batch of several pairs is stacked).
    """
    from vpo_ray.pipeline.t2v import latents_header
    from vpo_ray.train.data import find_data_files, iter_raw_rows

    files = find_data_files(path, SET_NAME)
    rows, shapes = [], {}
    for uri in files:
        set_dir = os.path.dirname(uri) if storage.is_local(uri) else uri.rsplit("/", 1)[0]
        for i, row in iter_raw_rows(uri):
            where = f"{uri} row {i}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object, got {type(row).__name__}")
            missing = [c for c in REQUIRED if not isinstance(row.get(c), str) or not row[c].strip()]
            if missing:
                raise DataError(f"{where}: field '{missing[0]}' is missing or empty (a video-dpo row needs "
                                f"{', '.join(REQUIRED)})")
            row = dict(row)
            for side in ("chosen", "rejected"):
                row[f"{side}_latents"] = _resolve(row[f"{side}_latents"], set_dir)
                if row.get(f"{side}_video"):
                    row[f"{side}_video"] = _resolve(row[f"{side}_video"], set_dir)
                try:
                    shapes[side] = latents_header(row[f"{side}_latents"])[0]
                except ValueError as e:
                    raise DataError(f"{where}: field '{side}_latents': {e}") from None
            if row["chosen_latents"] == row["rejected_latents"]:
                raise DataError(f"{where}: fields 'chosen_latents' and 'rejected_latents' name the same file")
            if shapes["chosen"] != shapes["rejected"]:
                raise DataError(f"{where}: latents of different shapes, chosen {shapes['chosen']} vs rejected "
                                f"{shapes['rejected']} (a pair shares one prompt and one clip size)")
            if same_shape and rows and shapes["chosen"] != rows[0]["_shape"]:
                raise DataError(f"{where}: latents shape {shapes['chosen']} differs from row 0's {rows[0]['_shape']}; "
                                "per_device_batch_size > 1 stacks pairs, so the set must have one clip size")
            rows.append(dict(row, _shape=shapes["chosen"]))
    if not rows:
        raise DataError(f"data: {path} holds no video pairs")
    return files, rows


# ---------------------------------------------------------------------------- models

def resolve_model(cfg: VideoDPOConfig) -> str:
    """The base pipeline: cfg.model (arch:<name>, a pipeline dir, a `vpo train video-dpo` run folder,
    a registry name; run folders resolve as every job's do, vpo_ray/runs.py) or the preset's T2V model."""
    from vpo_ray.models.random_weights import RANDOM_PREFIX
    from vpo_ray.models.registry import get_spec, model_path
    from vpo_ray.pipeline.t2v import ARCH_PREFIX

    if cfg.weights == "random":  # the whole pipeline at real size, random weights (models/random_weights.py)
        return RANDOM_PREFIX + get_spec(cfg.model or cfg.preset, "t2v").name
    if cfg.model and cfg.model.startswith(ARCH_PREFIX):
        return cfg.model
    path = model_path(cfg.model or get_spec(cfg.preset, "t2v"))
    return os.path.abspath(path) if os.path.isdir(path) else path


def build_trainer(cfg: VideoDPOConfig, model_path: str, rows: list[dict], job_id: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vpo_ray.train.runner import _abs, worker_env
    from vpo_ray.train.video_dpo_worker import train_worker

    storage_path = _abs(cfg.storage_path) if cfg.storage_path else storage.join(cfg.out, "ray_results")
    env = worker_env(cfg)
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "model_path": model_path, "job_id": job_id,
                           "rows": [{k: v for k, v in r.items() if k != "_shape"} for r in rows]},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run_name or "video-dpo", storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": env} if env else None))


# ---------------------------------------------------------------------------- the job

def _fit(trainer):
    """trainer.fit(), keeping this process's Ctrl-C handler (fit installs its own and never removes it)."""
    from vpo_ray.train.runner import TrainError

    main = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except Exception as e:  # Ray Train raises the workers' error once max_failures is used up
        raise TrainError(f"video-dpo training failed: {e}") from e
    finally:
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)


def train_video_dpo(cfg: VideoDPOConfig) -> dict:
    """Check the set, train on Ray, export; returns (and writes) DIR/summary.json."""
    from vpo_ray.ray_utils import init_ray
    from vpo_ray.train.metrics import plot_losses, read_steps, summarise
    from vpo_ray.train.runner import TrainError, _abs

    t0 = time.perf_counter()
    cfg = replace(cfg, out=_abs(cfg.out), **{k: _abs(getattr(cfg, k)) for k in ("data", "resume_from")
                                             if getattr(cfg, k)})
    files, rows = read_pairs(cfg.data, same_shape=cfg.per_device_batch_size > 1)
    model_path = resolve_model(cfg)
    if cfg.export and model_path.startswith(("arch:", "random:")):
        raise ConfigError(f"export: the base {model_path} has random weights, no checkpoint to merge the trained "
                          "weights into; set export=false (metrics and checkpoints are still written)")
    log.info("data ok: %d video pairs in %s; base model %s", len(rows), ", ".join(files), model_path)
    storage.makedirs(cfg.out)
    storage.write_json(storage.join(cfg.out, "config.json"), {**to_dict(cfg), "model": model_path,
                                                               "learning_rate_used": cfg.lr})
    init_ray(cfg.ray)
    job_id = storage.unique_name("video-dpo")
    t_fit = time.perf_counter()
    result = _fit(build_trainer(cfg, model_path, rows, job_id))
    fit_s = time.perf_counter() - t_fit
    state_uri = storage.join(cfg.out, "train_state.json")
    state = storage.read_json(state_uri) if storage.exists(state_uri) else {}
    if getattr(result, "error", None) or state.get("job_id") != job_id:
        raise TrainError(f"video-dpo training ended without an export: {getattr(result, 'error', None) or 'aborted'}")
    steps = read_steps(storage.join(cfg.out, "metrics.jsonl"))
    plot_losses(steps, storage.join(cfg.out, "loss.png"), title=f"video Diffusion-DPO ({os.path.basename(cfg.out)})")
    summary = {
        "method": "video-dpo", "model": storage.join(cfg.out, "model") if cfg.export else None,
        "lora": storage.join(cfg.out, "lora") if cfg.lora and cfg.export else None, "base_model": model_path,
        "pairs": len(rows), "global_step": state["global_step"], "num_workers": cfg.num_workers,
        "deepspeed_stage": cfg.deepspeed_stage, "beta": cfg.beta, "learning_rate": cfg.lr,
        "metrics": summarise(steps), "resumed_from": state.get("resumed_from"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "fit_seconds": round(fit_s, 2), "rank0_setup_seconds": state.get("setup_seconds"),
        "rank0_train_seconds": state.get("train_seconds"), "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    storage.write_json(storage.join(cfg.out, "summary.json"), summary)
    return summary


def load(args) -> VideoDPOConfig:
    """VideoDPOConfig from `vpo train video-dpo` arguments (flags, --config YAML, key=value overrides)."""
    return load_config(VideoDPOConfig, args.config, args.overrides, data=args.data, out=args.out,
                       preset=args.preset, model=args.model)


def run(args) -> int:
    """`vpo train video-dpo`, dispatched from vpo_ray.train.runner."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    summary = train_video_dpo(load(args))  # DataError/TrainError: cli.main prints them and picks the exit code
    print(json.dumps(summary, indent=2, default=str))
    return 0
