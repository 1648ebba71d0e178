"""A real two-node Ray cluster on this machine, jobs sent with `ray job submit`, as on a cluster.

Two `ray start --block` processes (a head and a worker carrying the custom resource
`worker_node`), each on its own ports and temp dir, with token auth on (RAY_AUTH_MODE=token,
a token made for this test), so they never meet a test session's local Ray. Jobs go through
the Jobs API with `jobs/runtime_env.yaml`'s excludes; which node ran what is read afterwards
from Ray's state API (tasks and actors of the job, with their node ids).

Teardown ends exactly the processes these two `ray start` commands started (by pid, found
as their descendants), never `ray stop`: that kills every Ray process on the machine,
including the test session's own instance.
"""
from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]

PROBE = '''
import json, os, time, ray
ray.init()  # joins the cluster from RAY_ADDRESS, as every vpo job does via init_ray

@ray.remote(num_cpus=1)
def where(i):
    time.sleep(0.5)
    return ray.get_runtime_context().get_node_id()

anywhere = [where.remote(i) for i in range(4)]
pinned = [where.options(resources={"worker_node": 1}).remote(i) for i in range(2)]
print("PROBE " + json.dumps({"anywhere": ray.get(anywhere), "pinned": ray.get(pinned),
                             "driver": ray.get_runtime_context().get_node_id()}))
'''


def _json(text: str):
    """The JSON document in a `ray list ... --format json` output (warnings may precede it)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith(("[", "{"))), None)
    if start is None and "No resource in the cluster" in text:  # what the CLI prints for no rows
        return []
    if start is None:
        raise AssertionError(f"no JSON in: {text[-1500:]}")
    return json.loads("\n".join(lines[start:]))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _free_range(width: int = 60) -> int:
    """Start of `width` consecutive free ports (Ray worker ports)."""
    for start in range(23000, 60000, width):
        ok = True
        for p in range(start, start + width):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return start
    raise RuntimeError("no free port range for Ray workers")


class TwoNodes:
    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),  # this test's cluster only
            "RAY_USAGE_STATS_ENABLED": "0",
            "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "VPO_PROGRESS": "0",
            "VPO_CACHE": os.environ.get("VPO_CACHE") or str(root / "vpo_cache"),
        })
        (gcs, dash, client, h_agent, h_grpc, h_rte, h_metrics, h_nm, h_om,
         w_agent, w_grpc, w_rte, w_metrics, w_nm, w_om) = _free_ports(15)
        self.gcs = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        head_workers = _free_range(120)
        worker_workers = head_workers + 60
        common = ["--block", "--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--disable-usage-stats",
                  "--object-store-memory", str(300 * 1024 * 1024)]
        # 4 logical CPUs a node (on 2 cores): the loop's four actor pools plus Ray Data's tasks fit
        self.head_cmd = [RAY, "start", "--head", *common, "--port", str(gcs), "--num-cpus", "4",
                         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                         "--ray-client-server-port", str(client), "--temp-dir", str(root / "head"),
                         "--dashboard-agent-listen-port", str(h_agent), "--dashboard-agent-grpc-port", str(h_grpc),
                         "--runtime-env-agent-port", str(h_rte), "--metrics-export-port", str(h_metrics),
                         "--node-manager-port", str(h_nm), "--object-manager-port", str(h_om),
                         "--min-worker-port", str(head_workers), "--max-worker-port", str(head_workers + 59)]
        self.worker_cmd = [RAY, "start", *common, "--address", self.gcs, "--num-cpus", "4",
                           "--resources", json.dumps({"worker_node": 4}), "--temp-dir", str(root / "worker"),
                           "--dashboard-agent-listen-port", str(w_agent), "--dashboard-agent-grpc-port", str(w_grpc),
                           "--runtime-env-agent-port", str(w_rte), "--metrics-export-port", str(w_metrics),
                           "--node-manager-port", str(w_nm), "--object-manager-port", str(w_om),
                           "--min-worker-port", str(worker_workers), "--max-worker-port", str(worker_workers + 59)]

    # -- processes

    def _start(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           cwd=self.root, start_new_session=True))

    def start(self) -> None:
        self._start(self.head_cmd, "head")
        self._wait_nodes(1, 180)
        self._start(self.worker_cmd, "worker")
        self._wait_nodes(2, 180)

    def stop(self) -> None:
        import psutil

        owned = []
        for p in self.procs:
            try:
                parent = psutil.Process(p.pid)
                owned += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in reversed(self.procs):  # worker first; `ray start --block` stops its node on SIGTERM
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(owned, timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)

    # -- ray CLI against this cluster only

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([RAY, *args], capture_output=True, text=True, env=self.env, cwd=self.root,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n"
                                 f"{self.logs()}")
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))

    def nodes(self) -> list[dict]:
        out = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json", check=False)
        if out.returncode != 0:
            return []
        return [n for n in _json(out.stdout or "[]") if n.get("state") == "ALIVE"]

    def _wait_nodes(self, n: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"`ray start` exited with {p.returncode}:\n{self.logs()}")
            if len(self.nodes()) >= n:
                return
            time.sleep(2)
        raise AssertionError(f"{n} Ray node(s) not alive after {timeout}s:\n{self.logs()}")

    def runtime_env(self, **env_vars: str) -> Path:
        """jobs/runtime_env.yaml with its env vars pointed inside the test's temp dir."""
        env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
        env["working_dir"] = str(REPO)
        env["env_vars"] = {**env.get("env_vars", {}), "HF_HOME": str(self.root / "hf"),
                           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                           "VPO_CACHE": self.env["VPO_CACHE"], **env_vars}
        path = self.root / f"runtime_env-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(env))
        return path

    def submit(self, entrypoint: list[str], timeout: float) -> tuple[str, str, str]:
        """Submit, wait; returns (submission id, final status, logs)."""
        sid = f"vpo-test-{uuid.uuid4().hex[:8]}"
        self.ray("job", "submit", "--address", self.dashboard, "--submission-id", sid, "--no-wait",
                 "--runtime-env", str(self.runtime_env()), "--", *entrypoint, timeout=300)
        deadline = time.time() + timeout
        status = "PENDING"
        while time.time() < deadline:
            status = self.job(sid).get("status", status)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(5)
        logs = self.ray("job", "logs", "--address", self.dashboard, sid, check=False).stdout
        return sid, status, logs

    def job(self, submission_id: str) -> dict:
        jobs = _json(self.ray("list", "jobs", "--address", self.dashboard, "--format", "json").stdout)
        (job,) = [j for j in jobs if j.get("submission_id") == submission_id]
        return job

    def job_nodes(self, submission_id: str) -> set[str]:
        """Node ids of every task and actor the job ran (state API)."""
        job_id = self.job(submission_id)["job_id"]
        used = set()
        for kind in ("tasks", "actors"):
            out = self.ray("list", kind, "--address", self.dashboard, "--format", "json", "--detail",
                           "--limit", "10000", "--filter", f"job_id={job_id}", timeout=180).stdout
            used |= {r["node_id"] for r in _json(out or "[]") if r.get("node_id")}
        return used


@pytest.fixture(scope="module")
def two_nodes():
    root = Path(tempfile.mkdtemp(prefix="vpo2n-", dir="/tmp"))  # short: Ray's socket paths have a limit
    cluster = TwoNodes(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _head_and_worker(cluster: TwoNodes) -> tuple[str, str]:
    nodes = cluster.nodes()
    head = [n["node_id"] for n in nodes if n.get("is_head_node")]
    worker = [n["node_id"] for n in nodes if not n.get("is_head_node")]
    assert len(head) == 1 and len(worker) == 1, nodes
    return head[0], worker[0]


def test_job_submitted_with_token_runs_on_both_nodes(two_nodes, tmp_path):
    head, worker = _head_and_worker(two_nodes)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    sid, status, logs = two_nodes.submit([sys.executable, str(probe)], timeout=600)
    assert status == "SUCCEEDED", logs[-3000:]
    result = json.loads(next(line for line in logs.splitlines() if line.startswith("PROBE "))[6:])
    assert set(result["pinned"]) == {worker}  # the custom resource exists only on the worker
    assert result["driver"] == head  # `ray job submit` runs the entry point on the head
    assert {head, worker} <= two_nodes.job_nodes(sid)


def test_unauthenticated_client_is_refused(two_nodes):
    env = {**two_nodes.env, "RAY_AUTH_TOKEN": "wrong-" + secrets.token_hex(8)}
    proc = subprocess.run([RAY, "job", "list", "--address", two_nodes.dashboard], capture_output=True,
                          text=True, env=env, timeout=120)
    text = (proc.stdout + proc.stderr).lower()
    assert proc.returncode != 0
    assert "401" in text or "unauthorized" in text or "token authentication" in text, text[-1500:]
    # and the right token still works (the refusal is about the token, not a dead cluster)
    two_nodes.ray("job", "list", "--address", two_nodes.dashboard)


# jobs/full_loop.yaml asks for GPUs and 8 workers: these turn it into the tiny CPU run
TINY_LOOP = [
    "train.use_gpu=false", "train.num_workers=2", "train.precision=fp32", "train.deepspeed_stage=2",
    "train.gradient_checkpointing=false", "train.per_device_batch_size=2", "train.gradient_accumulation_steps=1",
    "train.max_length=384", "train.save_steps=2", "sft.max_steps=2", "dpo.max_steps=2",
    "gen.num_samples=2", "gen.sampling.max_new_tokens=12", "gen.judge_sampling.max_new_tokens=8",
    "gen.video.num_frames=9", "gen.video.height=32", "gen.video.width=32", "gen.video.num_inference_steps=2",
    "gen.video.judge_frames=2",
    *[f"gen.{stage}.{key}" for stage in ("rewrite_stage", "judge_stage", "t2v_stage", "video_judge_stage")
      for key in ("num_gpus=0", "num_cpus=1", "min_actors=1", "max_actors=1", "batch_size=2",
                  "accelerator_type=null")],
    "train.accelerator_type=null",
]


def test_tiny_full_loop_runs_across_both_nodes(two_nodes):
    try:
        importlib.import_module("vpo_ray.train.loop")
    except ImportError as e:
        pytest.skip(f"vpo_ray.train.loop does not import yet ({e}); this test needs `vpo loop`")
    head, worker = _head_and_worker(two_nodes)
    out = two_nodes.root / "loop"
    extra = os.environ.get("VPO_TWO_NODE_OVERRIDES", "").split()
    sid, status, logs = two_nodes.submit(
        [sys.executable, "-m", "jobs.full_loop", "--config", "jobs/full_loop.yaml", "--preset", "tiny",
         "--queries", str(REPO / "tests" / "data" / "queries.jsonl"), "--out", str(out), "--rounds", "1",
         *TINY_LOOP, *extra], timeout=2400)
    assert status == "SUCCEEDED", logs[-5000:]
    summary = json.loads((out / "loop_summary.json").read_text())
    assert [h["kind"] for h in summary["history"]] == ["sft", "dpo"]
    used = two_nodes.job_nodes(sid)
    assert {head, worker} <= used, f"work ran on {used}; head {head}, worker {worker}"


# ---------------------------------------------------------------------------- the job chain

def _tiny_stages(*stages: str) -> list[str]:
    return [f"{stage}.{key}" for stage in stages for key in
            ("num_gpus=0", "num_cpus=1", "min_actors=1", "max_actors=1", "batch_size=2", "accelerator_type=null")]


# jobs/*.yaml are the GPU cluster's settings: these only shrink them to the tiny CPU run. No path
# is overridden: every job reads what the one before wrote, by the paths in the YAMLs themselves.
TINY_TRAIN = ["preset=tiny", "use_gpu=false", "accelerator_type=null", "num_workers=1", "precision=fp32",
              "deepspeed_stage=0", "gradient_checkpointing=false", "per_device_batch_size=2",
              "gradient_accumulation_steps=1", "max_length=384", "save_steps=1", "max_steps=1"]
CHAIN = [
    ("build_sft", ["preset=tiny", "limit=3", "num_samples=2", "sampling.max_new_tokens=12",
                   "judge_sampling.max_new_tokens=8", *_tiny_stages("rewrite_stage", "judge_stage")]),
    ("train_sft", TINY_TRAIN),
    ("build_dpo", ["preset=tiny", "limit=3", "num_samples=2", "sampling.max_new_tokens=12",
                   "judge_sampling.max_new_tokens=8",
                   *_tiny_stages("rewrite_stage", "judge_stage", "t2v_stage", "video_judge_stage")]),
    ("train_dpo", TINY_TRAIN),
    ("evaluate", ["preset=tiny", "limit=2", "videos=false", "bootstrap=0", "sampling.max_new_tokens=12",
                  "judge_sampling.max_new_tokens=8", *_tiny_stages("rewrite_stage", "judge_stage")]),
]
MOUNT = "/mnt/vpo"  # the shared volume every job YAML and manifest names (cluster/pvc.yaml)


def _on_this_machine(text: str, root: Path) -> str:
    """A job file with the shared volume moved under the test's folder (nothing else changes)."""
    assert MOUNT in text
    return text.replace(MOUNT, str(root))


def test_job_chain_reads_each_previous_output(two_nodes):
    """build_sft -> train_sft -> build_dpo -> train_dpo -> evaluate through `ray job submit`, with
    jobs/*.yaml as shipped (their pools placed by vpo_ray/pipeline/placement.py, mode manual); then
    the optimizer jobs/serve.yaml and the RayService name is the one train_dpo exported. A job naming
    a path its predecessor does not write fails here."""
    root = two_nodes.root / "vol"
    (root / "data").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "data" / "queries_objects.json", root / "data" / "vpo_sft_queries.json")
    shutil.copy(REPO / "tests" / "data" / "queries_strings.json", root / "data" / "vpo_dpo_queries.json")
    (root / "jobs").mkdir()
    for name in [n for n, _ in CHAIN] + ["serve"]:
        (root / "jobs" / f"{name}.yaml").write_text(_on_this_machine((REPO / "jobs" / f"{name}.yaml").read_text(), root))
    for name, tiny in CHAIN:
        sid, status, logs = two_nodes.submit(
            [sys.executable, "-m", f"jobs.{name}", "--config", str(root / "jobs" / f"{name}.yaml"), *tiny],
            timeout=1500)
        assert status == "SUCCEEDED", f"jobs.{name}: {logs[-4000:]}"
    runs = root / "runs"
    for job, pools in (("build_sft", {"rewrite", "judge"}), ("build_dpo", {"rewrite", "judge", "t2v", "video_judge"})):
        placed = json.loads((runs / job / "summary.json").read_text())["placement"]  # vpo_ray/pipeline/placement.py
        assert (placed["layout"], set(placed["pools"])) == ("manual", pools), placed  # the YAML's mode, every pool
        assert all((p["num_gpus"], p["min_actors"]) == (0.0, 1) for p in placed["pools"].values()), placed
    train_dpo = json.loads((runs / "train_dpo" / "summary.json").read_text())
    assert (train_dpo["base_model"], train_dpo["model"]) == (str(runs / "train_sft" / "model"),
                                                             str(runs / "train_dpo" / "model"))
    sources = json.loads((runs / "eval" / "metrics.json").read_text())["sources"]
    assert (sources["sft"]["model"], sources["dpo"]["model"]) == (str(runs / "train_sft" / "model"),
                                                                 str(runs / "train_dpo" / "model"))
    _check_readable(runs)
    from datasets import load_dataset

    assert len(load_dataset(str(runs / "build_dpo"), split="train")) == \
        json.loads((runs / "build_dpo" / "summary.json").read_text())["output_rows"]
    _serve_the_trained_optimizer(root, runs / "train_dpo" / "model")


def _check_readable(runs: Path) -> None:
    """Other users and pods on the shared volume can read every artifact (0644 / 0755)."""
    private = [str(p) for p in runs.rglob("*") if p.stat().st_mode & 0o044 != 0o044 and "ray_results" not in p.parts]
    assert not private, f"not group/world-readable: {private[:5]}"


def _serve_the_trained_optimizer(root: Path, export: Path) -> None:
    from vpo_ray.config import load_config, replace
    from vpo_ray.models import registry
    from vpo_ray.serve.app import config_from_args
    from vpo_ray.serve.engine import GenRequest, OptimizerEngine

    (svc,) = [d for d in yaml.safe_load_all(_on_this_machine((REPO / "cluster" / "rayservice.yaml").read_text(), root))]
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    for cfg in (config_from_args(app["args"]), config_from_args({"config": str(root / "jobs" / "serve.yaml")})):
        assert registry.model_path(cfg.model) == str(export)
    cpu = replace(load_config(type(cfg), None, None, **{"model": cfg.model, "preset": "tiny"}), max_new_tokens=8)
    out = OptimizerEngine(cpu).generate([GenRequest("a cat surfing at sunset", seed=1, max_new_tokens=8)])[0]
    assert out.completion_tokens[0] > 0 and out.finish_reasons[0] in ("stop", "length")
