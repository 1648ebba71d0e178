"""A real two-node Ray cluster on this machine (head + worker), for jobs sent with `ray job submit`.

Two `ray start --block` processes (a head and a worker carrying the custom resource
`worker_node`), each on its own ports and temp dir, with token auth on (RAY_AUTH_MODE=token,
a token made for this cluster), so they never meet a test session's local Ray. Jobs go
through the Jobs API with `jobs/runtime_env.yaml`'s excludes; which node ran what is read
afterwards from Ray's state API (tasks and actors of the job, with their node ids).

`kill_worker_node()` is the node-loss drill: SIGKILL of the worker node's raylet, found by
its `--node_id` among the processes this cluster's worker `ray start` started (never by
name), then `restart_worker()` brings a fresh worker node back for the tests that follow.

Teardown ends exactly the processes these `ray start` commands started (by pid, found as
their descendants), never `ray stop`: that kills every Ray process on the machine,
including the test session's own instance. One cluster serves the whole session
(`two_nodes` fixture in tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def parse_json(text: str):
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
            # Spread work over both nodes from the first task on (Ray's default packs a node to 50%
            # first), so jobs use the worker node and losing it costs them something.
            "RAY_scheduler_spread_threshold": "0.0",
            "RAY_agent_register_timeout_ms": "300000",  # agents start slowly on a loaded 2-core machine
            "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "VPO_PROGRESS": "0",
            "VPO_CACHE": os.environ.get("VPO_CACHE") or str(root / "vpo_cache"),
        })
        self.head_workers = _free_range(120)
        self.common = ["--block", "--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--disable-usage-stats",
                       "--object-store-memory", str(300 * 1024 * 1024)]
        self.gcs = self.dashboard = ""
        self.started = 0  # `ray start` commands run so far (names their logs)
        self.lost: set[int] = set()  # pids of `ray start` processes whose node was killed on purpose

    def head_cmd(self) -> list[str]:
        """The head's `ray start`, on fresh ports (sets self.gcs and self.dashboard)."""
        gcs, dash, client, *ports = _free_ports(9)
        self.gcs = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        # 4 logical CPUs a node (on 2 cores): the loop's four actor pools plus Ray Data's tasks fit
        return [RAY, "start", "--head", *self.common, "--port", str(gcs), "--num-cpus", "4",
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                "--ray-client-server-port", str(client), "--temp-dir", str(self.root / "head"),
                *self._node_ports(ports),
                "--min-worker-port", str(self.head_workers), "--max-worker-port", str(self.head_workers + 59)]

    @staticmethod
    def _node_ports(ports: list[int]) -> list[str]:
        agent, grpc, rte, metrics, nm, om = ports
        return ["--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(grpc),
                "--runtime-env-agent-port", str(rte), "--metrics-export-port", str(metrics),
                "--node-manager-port", str(nm), "--object-manager-port", str(om)]

    def worker_cmd(self) -> list[str]:
        """A worker node's `ray start` (fresh ports each time: a restarted node never waits on the dead one's)."""
        workers = self.head_workers + 60
        return [RAY, "start", *self.common, "--address", self.gcs, "--num-cpus", "4",
                "--resources", json.dumps({"worker_node": 4}), "--temp-dir", str(self.root / "worker"),
                *self._node_ports(_free_ports(6)),
                "--min-worker-port", str(workers), "--max-worker-port", str(workers + 59)]

    # -- processes

    def _start(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           cwd=self.root, start_new_session=True))

    def start(self) -> None:
        self._start_node(self.head_cmd, "head", 1)
        self.restart_worker()

    def restart_worker(self) -> None:
        """Start a worker node (again, after kill_worker_node) and wait until both nodes are alive."""
        self._start_node(self.worker_cmd, "worker", 2)

    def _start_node(self, make_cmd, name: str, nodes: int, attempts: int = 3) -> None:
        """Start a node and wait for `nodes` alive nodes. A start that gives up (a port taken between
        picking and binding it; Ray's fixed 30 s raylet registration wait on an overloaded 2-core
        machine) is cleaned up (its process group) and tried again on fresh ports."""
        for attempt in range(attempts):
            self.started += 1
            self._start(make_cmd(), f"{name}-{self.started}")
            try:
                self._wait_nodes(nodes, 180)
                return
            except AssertionError:
                failed = self.procs[-1]
                if attempt == attempts - 1 or failed.poll() is None:
                    raise
                self.lost.add(failed.pid)
                try:  # what that `ray start` had started (its session: start_new_session=True)
                    os.killpg(failed.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def kill_worker_node(self, node_id: str, timeout: float = 120) -> dict:
        """SIGKILL the raylet of worker node `node_id` (this cluster's), as when a machine is lost.

        Its `ray start --block` then ends the node's other processes; the GCS marks the node dead
        after its health checks fail. Returns {"raylet_pid", "dead_after_s"}.
        """
        import psutil

        raylet = None
        for proc in self.procs[1:]:
            try:
                kids = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for p in kids:
                try:
                    if f"--node_id={node_id}" in p.cmdline() and "raylet" in os.path.basename(p.cmdline()[0]):
                        raylet = p
                        self.lost.add(proc.pid)  # its `ray start --block` exits with the node: expected
                except psutil.Error:
                    continue
        assert raylet is not None, f"no raylet with --node_id={node_id} among this cluster's worker processes"
        t0 = time.monotonic()
        raylet.send_signal(signal.SIGKILL)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if node_id not in {n["node_id"] for n in self.nodes()}:
                return {"raylet_pid": raylet.pid, "dead_after_s": round(time.monotonic() - t0, 1)}
            time.sleep(1)
        raise AssertionError(f"node {node_id} still ALIVE {timeout}s after its raylet was killed:\n{self.logs()}")

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
        return [n for n in parse_json(out.stdout or "[]") if n.get("state") == "ALIVE"]

    def _wait_nodes(self, n: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None and p.pid not in self.lost:
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
        return self.wait(self.submit_nowait(entrypoint), timeout)

    def submit_nowait(self, entrypoint: list[str], **env_vars: str) -> str:
        sid = f"vpo-test-{uuid.uuid4().hex[:8]}"
        self.ray("job", "submit", "--address", self.dashboard, "--submission-id", sid, "--no-wait",
                 "--runtime-env", str(self.runtime_env(**env_vars)), "--", *entrypoint, timeout=300)
        return sid

    def wait(self, sid: str, timeout: float) -> tuple[str, str, str]:
        """Wait for a submitted job to end; returns (submission id, final status, logs)."""
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
        jobs = parse_json(self.ray("list", "jobs", "--address", self.dashboard, "--format", "json").stdout)
        (job,) = [j for j in jobs if j.get("submission_id") == submission_id]
        return job

    def job_nodes(self, submission_id: str) -> set[str]:
        """Node ids of every task and actor the job ran (state API)."""
        job_id = self.job(submission_id)["job_id"]
        used = set()
        for kind in ("tasks", "actors"):
            out = self.ray("list", kind, "--address", self.dashboard, "--format", "json", "--detail",
                           "--limit", "10000", "--filter", f"job_id={job_id}", timeout=180).stdout
            used |= {r["node_id"] for r in parse_json(out or "[]") if r.get("node_id")}
        return used




def head_and_worker(cluster: TwoNodes) -> tuple[str, str]:
    """(head node id, worker node id) of the cluster as it is now."""
    nodes = cluster.nodes()
    head = [n["node_id"] for n in nodes if n.get("is_head_node")]
    worker = [n["node_id"] for n in nodes if not n.get("is_head_node")]
    assert len(head) == 1 and len(worker) == 1, nodes
    return head[0], worker[0]
