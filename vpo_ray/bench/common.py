"""What every benchmark shares: device and version facts, a matmul ceiling, timing, the record file."""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from typing import Any, Callable, Optional

from vpo_ray import storage


def resolve_device(device: Optional[str]) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def device_facts(device: str) -> dict:
    import torch

    from vpo_ray.bench.flops import peak_tflops

    facts: dict[str, Any] = {"device": device, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        facts.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                     multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                     peak_bf16_tflops=peak_tflops(props.name))
    else:
        facts.update(name=f"CPU ({platform.processor() or platform.machine()})", peak_bf16_tflops=None)
    return facts


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for mod in ("torch", "diffusers", "transformers", "ray", "deepspeed", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 — absent is a fact too
            out[mod] = None
    return out


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    import torch

    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def matmul_ceiling_tflops(device: str, n: int = 8192, iters: int = 10) -> Optional[float]:
    """Measured bf16 matmul rate (random data, median of `iters` after warm-up); None off GPU."""
    import torch

    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    free_memory(device)
    return round(2 * n**3 / sorted(times)[len(times) // 2] / 1e12, 1)


def steady_rate(done_at: list[float]) -> Optional[float]:
    """Items per second in steady state: 1 / the median gap between consecutive completions.

    The first item's start-up is excluded, and so are edge effects of a pipelined stage (its
    last item decodes with nothing left to overlap, so the last gap is short): a median of
    three or more gaps ignores one such gap.
    """
    t = sorted(done_at)
    gaps = sorted(b - a for a, b in zip(t, t[1:]))
    if not gaps or gaps[len(gaps) // 2] <= 0:
        return None
    mid = len(gaps) // 2
    median = gaps[mid] if len(gaps) % 2 else (gaps[mid - 1] + gaps[mid]) / 2
    return 1.0 / median


def span_rate(done_at: list[float]) -> Optional[float]:
    """(n-1) / (last - first completion): the whole run's rate after the first item."""
    t = sorted(done_at)
    return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else None


def psnr(a, b) -> Optional[float]:
    """PSNR in dB of two uint8 arrays of one shape (inf when identical)."""
    import numpy as np

    if a is None or b is None or a.shape != b.shape:
        return None
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)


def guarded(record: dict, key: str, fn: Callable[[], Any]) -> Any:
    """Run one benchmark phase; a failure is recorded under `key` and the other phases go on."""
    try:
        record[key] = fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        record[key] = {"error": f"{type(e).__name__}: {e}"}
    return record[key]


def strict_json(value: Any) -> Any:
    """The record as strict JSON values: inf/nan floats (e.g. PSNR of identical frames) become "inf"/"nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_record(out_dir: str, stem: str, record: dict) -> str:
    uri = storage.join(out_dir, f"{stem}.json")
    storage.write_json(uri, strict_json(record))
    return uri


def print_record(record: dict) -> None:
    print(json.dumps(strict_json(record), default=str, allow_nan=False), flush=True)


class Timer:
    """Wall-clock seconds around a block, with a device sync at both ends."""

    def __init__(self, device: str):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
