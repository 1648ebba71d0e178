"""A dummy stage for checking how a Ray Data actor pool spreads rows (tests/test_actor_pool.py).

`StaggeredWorker`: the i-th actor to start (counted in a shared file) takes i x
`stagger_s` to "load", as GPU actors that build and compile models finish apart; each
row then takes `row_s` of work (a sleep, or busy matmuls on the actor's GPU with
`gpu=True`), one row at a time even when the actor takes two calls at once (as the T2V
stage's denoising lock does). It returns which actor took each row, so a test can assert
who got rows.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np


class StaggeredWorker:
    def __init__(self, counter: str, stagger_s: float = 1.0, row_s: float = 0.3, gpu: bool = False):
        from filelock import FileLock

        with FileLock(counter + ".lock"):
            started = int(open(counter).read()) if os.path.exists(counter) else 0
            with open(counter, "w") as f:
                f.write(str(started + 1))
        time.sleep(stagger_s * started)
        self.row_s = row_s
        self.gpu = gpu
        self.pid = os.getpid()
        self._lock = threading.Lock()  # one row at a time on the device, as T2VRenderer's denoise lock

    def _work(self) -> None:
        if not self.gpu:
            time.sleep(self.row_s)
            return
        import torch

        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        end = time.monotonic() + self.row_s
        while time.monotonic() < end:
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()

    def __call__(self, batch: dict) -> dict:
        with self._lock:
            self._work()
        return {"id": batch["id"], "actor": np.full(len(batch["id"]), self.pid)}
