"""Shared pieces of the reliability suite: the figures registry, actor kills, output readers.

Every test that counts towards the figures table takes the `rel` fixture (conftest.py),
which adds one `Entry` here; the test fills in what it tried and what it measured, and
conftest's report hook sets the outcome (a fault "survived" only if the test's invariants
held). conftest prints the table at the end of the session and writes it as JSON.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

HEAVY = os.environ.get("VPO_HEAVY") == "1"
REPO = Path(__file__).resolve().parents[2]


def reps(default: int, heavy: int) -> int:
    """Repetitions of a fault: `default` normally, `heavy` with VPO_HEAVY=1."""
    return heavy if HEAVY else default


# ---------------------------------------------------------------------------- figures

@dataclass
class Entry:
    kind: str  # fault | bad_input | security | figure
    area: str  # generation, driver, training, serve, storage, judge_endpoint | a bad-input surface
    case: str
    nodeid: str = ""
    tried: int = 1  # faults injected / inputs sent
    survived: Optional[int] = None  # set from the outcome: tried if the invariants held, else 0
    rows_lost: Optional[int] = None  # input ids missing from every output (must be 0)
    outcome: str = "not run"  # passed | failed | xfailed | xpassed | skipped
    reason: str = ""  # xfail/skip reason or the failure's first line
    metrics: dict = field(default_factory=dict)  # recovery_s, failed_requests, unsafe_pct, ...

    def to_json(self) -> dict:
        return asdict(self)


RESULTS: list[Entry] = []


# ---------------------------------------------------------------------------- Ray actors

def gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def alive_actors(class_part: str) -> list[tuple[str, int]]:
    """(actor_id, pid) of ALIVE actors of this session's cluster whose class name contains `class_part`.

    Read from the GCS of the cluster this process is connected to (never another Ray
    instance on the machine). The state API (ray.util.state) needs the dashboard, which
    the test session does not start, so the GCS actor table is read directly.
    """
    from ray._private import state

    out = []
    for info in state.actors().values():
        if info.get("State") == "ALIVE" and class_part in (info.get("ActorClassName") or "") and info.get("Pid"):
            out.append((info["ActorID"], int(info["Pid"])))
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def busy(pid: int, window_s: float = 0.3, min_share: float = 0.3) -> bool:
    """Whether the process uses at least `min_share` of a core over `window_s` (it is computing)."""
    c0 = cpu_seconds(pid)
    time.sleep(window_s)
    return cpu_seconds(pid) - c0 >= min_share * window_s


def kill9(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def wait_for(pred, timeout_s: float, every_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every_s)
    return bool(pred())


# ---------------------------------------------------------------------------- generate outputs

def read_set(out: str, kind: str) -> list[dict]:
    import pyarrow.parquet as pq

    p = Path(out) / f"{kind}.parquet"
    if p.exists():
        return pq.read_table(p).to_pylist()
    p = Path(out) / f"{kind}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def read_jsonl(path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 5)
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [rounded(x) for x in v]
    return v


def decoded(row: dict) -> dict:
    return {k: (json.loads(v) if k.endswith("_json") and isinstance(v, str) and v else v) for k, v in row.items()}


def content(out: str, kind: str) -> dict:
    """What must not change under faults: the set's rows and the error rows, by query id.

    Floats are compared to 5 decimals; the run's own directory is masked out of paths.
    """
    rows = sorted(json.dumps(rounded(decoded(r)), sort_keys=True, ensure_ascii=False).replace(str(out), "<OUT>")
                  for r in read_set(out, kind))
    errors = sorted((e["query_id"], e["stage"], e["reason"]) for e in read_jsonl(Path(out) / "errors.jsonl"))
    dups = sorted((d["query_id"], d["source_row"]) for d in read_jsonl(Path(out) / "duplicates.jsonl"))
    return {"rows": rows, "errors": errors, "duplicates": dups}


def accounting(out: str, kind: str, expected_input: int, allow_tmp: bool = False) -> dict:
    """Every input row in exactly one of output / errors / duplicates; no query twice in parts.

    Returns {"rows_lost": n, "problems": [...]} (an empty list means the invariant holds).
    """
    rows = read_set(out, kind)
    errors = read_jsonl(Path(out) / "errors.jsonl")
    dups = read_jsonl(Path(out) / "duplicates.jsonl")
    summary = json.loads((Path(out) / "summary.json").read_text())
    out_ids = [r["query_id"] for r in rows]
    err_ids = [e["query_id"] for e in errors]
    problems = []
    if len(set(out_ids)) != len(out_ids):
        problems.append(f"duplicate output rows: {len(out_ids) - len(set(out_ids))}")
    if set(out_ids) & set(err_ids):
        problems.append(f"ids both in output and errors: {sorted(set(out_ids) & set(err_ids))[:3]}")
    part_ids: list[str] = []
    for p in sorted((Path(out) / "parts").glob("*.jsonl")):
        if p.name.startswith("."):  # a write in progress (or cut by a crash): readers skip it
            continue
        part_ids += [r["query_id"] for r in read_jsonl(p)]
    if len(set(part_ids)) != len(part_ids):
        problems.append(f"a query finalised twice across part files ({len(part_ids) - len(set(part_ids))} extra)")
    accounted = len(set(out_ids)) + len(errors) + len(dups)
    lost = max(0, expected_input - accounted)
    if accounted != expected_input:
        problems.append(f"{accounted} rows accounted for, {expected_input} given")
    if not summary.get("accounted"):
        problems.append("summary.json says accounted=false")
    leftovers = [str(p) for p in Path(out).rglob(".tmp-*")]
    if leftovers and not allow_tmp:
        problems.append(f"temporary files left behind: {leftovers[:3]}")
    return {"rows_lost": lost, "problems": problems}


# ---------------------------------------------------------------------------- generate runs

SFT_QUERIES = [
    "a cat playing piano in a jazz bar -ar 16:9",
    "A cat playing piano in a jazz bar  -ar 16:9",  # exact duplicate
    "drone shot of waves crashing on black sand beach -camera pan left -motion 3",
    "prompt: a samurai walking through neon Tokyo rain -neg blur, text -seed 42",
    "",  # ingest error
    "an astronaut riding a horse on mars, cinematic",
    "timelapse of a flower blooming, macro lens --ar 9:16",
    "一只熊猫在竹林里吃竹子",
    "children building a sandcastle at sunset",
    "a red vintage car driving along a coastal road",
    "a hummingbird drinking nectar in slow motion",
    "an old lighthouse in a storm at night",
    "a chef flipping pancakes in a busy kitchen",
    "a fox walking through fresh snow in a pine forest",
]

DPO_QUERIES = [
    "a cat playing piano in a jazz bar -ar 16:9",
    "drone shot of waves crashing on black sand beach",
    "",  # ingest error
    "a red vintage car driving along a coastal road",
    "a hummingbird drinking nectar in slow motion",
    "A cat playing piano in a jazz bar",  # exact duplicate
    "an old lighthouse in a storm at night",
    "a chef flipping pancakes in a busy kitchen",
    "a fox walking through fresh snow in a pine forest",
    "children building a sandcastle at sunset",
]
DPO_EXTRA = ("video.seeds_per_prompt=2", "pair_margin=0.0")

FAST = ["sampling.max_new_tokens=12", "judge_sampling.max_new_tokens=8", "rewrite_stage.batch_size=2",
        "judge_stage.batch_size=2", "video.num_frames=9", "video.height=32", "video.width=32",
        "video.num_inference_steps=2", "video.judge_frames=2", "video_judge_stage.batch_size=2",
        "t2v_stage.batch_size=1"]


def gen_cfg(kind: str, queries: str, out: str, *extra: str):
    """As `vpo generate --preset tiny` builds it (the tiny preset's job defaults under the overrides)."""
    from vpo_ray.config import GenerateConfig, load_config_with_defaults
    from vpo_ray.models.registry import preset_job_defaults

    return load_config_with_defaults(GenerateConfig, None, [f"kind={kind}", f"queries={queries}", f"out={out}",
                                                            "preset=tiny", "num_samples=2", *FAST, *extra],
                                     preset_job_defaults("tiny"))


def gen_overrides(kind: str, queries: str, out: str, *extra: str) -> list[str]:
    """The same settings as gen_cfg, as `vpo generate` arguments."""
    return [kind, "--queries", queries, "--out", out, "--preset", "tiny", "num_samples=2", *FAST, *extra]


# ---------------------------------------------------------------------------- subprocess helpers

def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"VPO_PROGRESS": "0", "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"})
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env
