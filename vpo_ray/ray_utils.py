"""Starting or joining Ray, the same way for every job (local default, cluster via address)."""
from __future__ import annotations

import logging
import os

from vpo_ray.config import RayConfig

log = logging.getLogger(__name__)

QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
             # Ray Train's print patch logs every print of the training thread, even into a
             # redirected stdout: `datasets` hashes TRL's map functions with dill, which
             # disassembles them into a captured stdout, and thousands of bytecode lines a
             # run reached the log.
             "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Ray loggers quieted in every worker of a local instance (see quiet_ray_loggers).
QUIET_LOGGERS = {
    # Started without the dashboard, the state API is not there, and Ray Train's placement
    # group cleaner warns once a second for the whole training ("Failed to query Ray Train
    # Controller actor state"); it still removes the group when training ends normally.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}
# Settings of the driver that workers need too (offline mode, tiny-model cache, CPU DeepSpeed).
PASS_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "VPO_CACHE", "DS_ACCELERATOR",
            "VPO_TRUST_REMOTE_CODE", "VPO_UMASK")


def init_ray(cfg: RayConfig = RayConfig()):
    """Join `cfg.address` or $RAY_ADDRESS if set, otherwise start a local instance.

    Idempotent: inside a Ray job or a test session that already called ray.init, this
    reuses that instance. The package itself travels to workers via the runtime env's
    working_dir when submitted with `ray job submit`; locally it is installed.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(log_to_driver=cfg.log_to_driver, ignore_reinit_error=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Workers inherit these; per-actor "Loading weights" bars would drown the job's progress.
        env = {k: os.environ.get(k, v) for k, v in QUIET_ENV.items()}
        for k in PASS_ENV:
            if k in os.environ:
                env[k] = os.environ[k]
        ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False,
                 runtime_env={"env_vars": env, "worker_process_setup_hook": "vpo_ray.ray_utils.quiet_ray_loggers"},
                 **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("VPO_PROGRESS", "1") != "0"
    return ray


def quiet_ray_loggers() -> None:
    """Worker setup hook of a local instance: QUIET_LOGGERS at their levels; RAY_ADDRESS set to this instance.

    Ray's state API, which Ray Train's placement-group cleaner polls, finds "the" local
    instance by looking for running ones; with several on one machine (parallel test runs,
    a shared host) it raises ConnectionError, which ends the cleaner's thread with a traceback.
    """
    import ray

    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
