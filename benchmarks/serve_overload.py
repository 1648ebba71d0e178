"""Open-loop load on `vpo serve`: requests arrive at a fixed rate whatever the answers do.

Used by serve_load.py's overload mode (offered load = 1x, 2x, 4x the measured capacity) and
by soak.py (steady load). Each request carries an optional deadline (X-VPO-Deadline-S); a
refused one (503) is sent again after its Retry-After, as OptimizerClient does, until it
is answered or `give_up_s` has passed since it arrived (0 = never retried).
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

QUERIES = ("a cat playing piano", "a dog surfing a wave at sunset -ar 16:9", "an astronaut riding a horse on the moon",
           "city street at night in the rain -neg blurry", "a panda eating bamboo in a misty forest",
           "a red sailboat on a calm lake at dawn", "a chef cooking noodles, close-up", "a fox running through snow")


def percentile(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 2)


async def _attempt(session, url: str, i: int, headers: dict) -> tuple[int, Optional[str]]:
    import aiohttp

    try:
        async with session.post(url + "/v1/optimize", json={"query": QUERIES[i % len(QUERIES)], "seed": i},
                                headers=headers) as r:
            await r.read()
            return r.status, r.headers.get("Retry-After")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return -1, None


async def open_loop(url: str, rate: float, seconds: float, timeout_s: float, t0: float,
                    deadline_s: Optional[float] = None, give_up_s: float = 0.0,
                    token: Optional[str] = None) -> tuple[list[dict], list[dict]]:
    """(requests, attempts): one record per request (arrival t_s from t0, final status, latency_ms of
    its last attempt, total_ms, tries) and one per attempt (status, ms)."""
    import aiohttp

    headers = {"X-VPO-Deadline-S": f"{deadline_s:g}"} if deadline_s else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    requests_: list[dict] = []
    attempts: list[dict] = []

    async def one(session, i: int) -> None:
        arrived, tries = time.monotonic(), 0
        while True:
            tries += 1
            sent = time.monotonic()
            status, retry_after = await _attempt(session, url, i, headers)
            ms = (time.monotonic() - sent) * 1000
            attempts.append({"status": status, "ms": round(ms, 1)})
            waited = time.monotonic() - arrived
            if status == 200 or waited >= give_up_s:
                requests_.append({"t_s": round(arrived - t0, 2), "status": status, "latency_ms": round(ms, 1),
                                  "total_ms": round(waited * 1000, 1), "tries": tries})
                return
            pause = float(retry_after) if retry_after else min(0.25 * 2 ** tries, 10.0)
            await asyncio.sleep(min(pause, max(0.0, give_up_s - waited)))

    tasks, start = [], time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        i = 0
        while time.monotonic() - start < seconds:
            tasks.append(asyncio.create_task(one(session, i)))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return requests_, attempts


def overload_figures(rate: float, requests_: list[dict], attempts: list[dict]) -> dict:
    """Goodput, latency of accepted attempts, share refused and how fast, requests lost."""
    ok = [r for r in requests_ if r["status"] == 200]
    span_s = max((r["t_s"] + r["total_ms"] / 1000 for r in requests_), default=0) - \
        min((r["t_s"] for r in requests_), default=0)
    accepted = [a["ms"] for a in attempts if a["status"] == 200]
    refused = [a["ms"] for a in attempts if a["status"] == 503]
    statuses: dict[str, int] = {}
    for a in attempts:
        statuses[str(a["status"])] = statuses.get(str(a["status"]), 0) + 1
    return {"offered_rps": round(rate, 3), "requests": len(requests_), "attempts": len(attempts),
            "goodput_rps": round(len(ok) / span_s, 3) if span_s > 0 else 0.0,
            "accepted_p50_ms": percentile(accepted, 0.5), "accepted_p99_ms": percentile(accepted, 0.99),
            "refused_share": round(len(refused) / max(1, len(attempts)), 4),
            "refused_p50_ms": percentile(refused, 0.5), "refused_p99_ms": percentile(refused, 0.99),
            "mean_tries": round(sum(r["tries"] for r in requests_) / max(1, len(requests_)), 2),
            "lost": len(requests_) - len(ok), "statuses": statuses}
