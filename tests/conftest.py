"""Shared fixtures: one Ray instance per test session (Ray start costs seconds)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VPO_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    from suite_plan import SuitePlan  # tests/ is on sys.path: this file's folder

    if not config.pluginmanager.has_plugin("vpo-suite-plan"):
        config.pluginmanager.register(SuitePlan(config), "vpo-suite-plan")


@pytest.fixture(scope="session")
def ray_session(tiny_cache):
    """A local Ray instance shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
                                           "TOKENIZERS_PARALLELISM": "false", "VPO_CACHE": str(tiny_cache)},
                              # as vpo_ray.ray_utils.init_ray: quiet Ray Train, workers know this instance
                              "worker_process_setup_hook": "vpo_ray.ray_utils.quiet_ray_loggers"})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    try:
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cache():
    """Where the tiny preset is built (content-addressed, so reuse across sessions is safe)."""
    d = os.environ.get("VPO_CACHE") or os.path.expanduser("~/.cache/vpo_ray")
    os.environ["VPO_CACHE"] = d
    return Path(d)


def actor_pids(name_part: str) -> list[int]:
    """PIDs of this session's Ray actor processes whose title contains `name_part`.

    Walks the children of this session's raylet (not the state API, which needs the
    dashboard and is ambiguous when other Ray instances run on the same machine).
    """
    import psutil
    import ray

    node = ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    out = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            if name_part in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


@pytest.fixture
def find_actor_pids(ray_session):
    return actor_pids


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pick_free_port():
    # A fixture, not an import: tests/reliability has its own conftest, which shadows
    # `import conftest` there. Session scope so module-scoped server fixtures can use it.
    return free_port


@pytest.fixture(scope="session")
def two_nodes(tiny_cache):
    """A two-node Ray cluster (tests/twonode_cluster.py), one for the whole session: a second Ray
    beside the session's own, never a third. It shares the session's tiny-model cache, so its
    jobs run the very models that in-process reference runs use."""
    import shutil
    import tempfile

    from twonode_cluster import TwoNodes

    root = Path(tempfile.mkdtemp(prefix="vpo2n-", dir="/tmp"))  # short: Ray's socket paths have a limit
    cluster = TwoNodes(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
