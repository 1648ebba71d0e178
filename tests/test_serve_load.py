"""benchmarks/serve_load.py: requests/s against concurrency, batching and replica count (tiny, CPU).

Runs the script as a user would (its own local Ray instance) on short levels; checks that
every request succeeded, that each replica count was deployed and measured, and that the
replica-scaling summary and the PNG are written. Speed is not asserted (2 CPU cores).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.py"


def test_serve_load_replica_counts(tiny_cache, tmp_path):
    out = tmp_path / "serve"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--preset", "tiny", "--concurrency", "2",
           "--batch-sizes", "4", "--replicas", "1,2", "--duration-s", "2", "--max-requests", "16",
           "--warmup", "2", "--max-new-tokens", "8", "--ray-cpus", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "serve_load.json").read_text())
    assert sorted(run["replicas"] for run in rec["runs"]) == [1, 2]
    for run in rec["runs"]:
        assert run["requests"] > 0 and set(run["statuses"]) == {"200"}, run  # nothing failed
        assert run["rps"] > 0
    (summary,) = rec["replica_scaling"]
    assert summary["max_batch_size"] == 4 and set(summary["rps"]) == {"1", "2"}
    assert summary["efficiency_vs_linear"]["1"] == 1.0 and summary["efficiency_vs_linear"]["2"] > 0
    assert (out / "serve_load.png").stat().st_size > 1000
