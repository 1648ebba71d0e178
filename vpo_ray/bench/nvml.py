"""GPU busy fraction sampled in the background: NVML (nvidia-ml-py) or, failing that, nvidia-smi.

`utilization.gpu` is the share of the last sample period in which any kernel ran on the
GPU; averaged over a steady-state window it is the GPU busy fraction the benchmarks report.
It says nothing about how full the SMs were (MFU says that).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from typing import Optional


def _gpu_index() -> int:
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


class GpuSampler:
    """Samples (time, utilization %, memory used MiB) every `interval_s` until stopped.

    `source` says where samples come from: "nvml", "nvidia-smi" or "none" (no GPU tool;
    every window then reports busy_fraction None).
    """

    def __init__(self, interval_s: float = 0.1, index: Optional[int] = None):
        self.interval_s = interval_s
        self.index = _gpu_index() if index is None else index
        self.samples: list[tuple[float, float, float]] = []
        self.source = "none"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._proc: Optional[subprocess.Popen] = None

    def start(self) -> "GpuSampler":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.source = "nvml"
            self._thread = threading.Thread(target=self._poll_nvml, args=(pynvml, handle), daemon=True)
        except Exception:  # noqa: BLE001 — no nvidia-ml-py or no driver: try the CLI
            smi = shutil.which("nvidia-smi")
            if smi is None:
                return self
            ms = max(100, int(self.interval_s * 1000))
            self._proc = subprocess.Popen(
                [smi, f"--id={self.index}", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 f"-lms={ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.source = "nvidia-smi"
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        self._thread.start()
        return self

    def _poll_nvml(self, pynvml, handle) -> None:
        while not self._stop.is_set():
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                self.samples.append((time.time(), float(util), float(mem)))
            except Exception:  # noqa: BLE001 — a failed read is a missing sample
                pass
            self._stop.wait(self.interval_s)

    def _read_smi(self) -> None:
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((time.time(), float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue
            if self._stop.is_set():
                break

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "GpuSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def window(self, t0: float, t1: float) -> dict:
        """Busy fraction and peak memory over wall-clock window [t0, t1] (time.time() seconds)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return {"busy_fraction": None, "samples": 0, "mem_used_max_gib": None}
        return {"busy_fraction": sum(s[1] for s in inside) / (100.0 * len(inside)), "samples": len(inside),
                "mem_used_max_gib": max(s[2] for s in inside) / 1024}

    def trace(self, t_ref: float) -> list[tuple[float, float]]:
        """(seconds since t_ref, utilization %) for plotting."""
        return [(s[0] - t_ref, s[1]) for s in self.samples]
