"""`vpo serve` past its capacity: admission control (vpo_ray/serve/admission.py).

One Serve application (tiny optimizer, one replica, no batching, a queue far longer than
the burst, so that only admission control can refuse). After a few sequential requests
have shown the service time, a burst of concurrent requests whose deadline allows about
three service times arrives at once. What a user checks, not how fast:
- the requests that cannot be answered in time are refused (503, Retry-After, the code
  `deadline_exceeded`) and those answers come back before the accepted requests finish;
- every accepted request completes (200);
- the same burst through OptimizerClient, which honours Retry-After, loses nothing.
"""
from __future__ import annotations

import statistics
import threading
import time

import pytest
import requests

from relsupport import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

APP = "vpoload"
BURST = 24
HEADER = "X-VPO-Deadline-S"


@pytest.fixture(scope="module")
def server(ray_session, tiny_cache, pick_free_port):
    from ray import serve

    from vpo_ray.models import registry
    from vpo_ray.serve.app import config_from_args, start

    port = pick_free_port()
    cfg = config_from_args({
        "model": registry.model_path(registry.get_spec("tiny", "optimizer")), "port": port, "app_name": APP,
        "max_new_tokens": 12, "max_batch_size": 1, "max_n": 1, "max_ongoing_requests": 1,
        "max_queued_requests": 4 * BURST, "request_timeout_s": 120, "auth_token_env": "", "num_cpus": 0.5,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1},
    })
    start(cfg)
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: requests.get(url + "/healthz", timeout=5).ok, 120), "server did not come up"
    yield url
    serve.shutdown()


def optimize(url: str, i: int, deadline_s: float) -> tuple[int, float, dict, requests.Response]:
    """(status, when the answer came, body, response)."""
    r = requests.post(url + "/v1/optimize", json={"query": f"a fox in the snow, take {i}", "seed": i},
                      headers={HEADER: f"{deadline_s:.3f}"}, timeout=120)
    return r.status_code, time.monotonic(), r.json(), r


def service_time(url: str, n: int = 8) -> float:
    """Median latency of sequential requests (this also teaches the ingress the time per request)."""
    times = []
    for i in range(n):
        t0 = time.monotonic()
        status, _, _, _ = optimize(url, 1000 + i, 120)
        assert status == 200
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def burst(fn, n: int) -> list:
    results: list = [None] * n
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, fn(k))) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def test_a_burst_beyond_capacity_is_refused_at_once_and_the_accepted_complete(server, rel):
    e = rel("fault", "serve", f"overload: a burst of {BURST} requests on one unbatched replica, deadline 3x the "
                              "service time: the excess refused at once, the accepted all complete", tried=BURST)
    s = service_time(server)
    deadline = 3 * s
    t0 = time.monotonic()
    got = burst(lambda k: optimize(server, k, deadline), BURST)
    accepted = [g for g in got if g[0] == 200]
    refused = [g for g in got if g[0] == 503]
    e.metrics = {"service_s": round(s, 2), "deadline_s": round(deadline, 2), "accepted": len(accepted),
                 "refused": len(refused), "other": len(got) - len(accepted) - len(refused),
                 "last_refusal_s": round(max((g[1] - t0 for g in refused), default=0), 2),
                 "last_accepted_s": round(max((g[1] - t0 for g in accepted), default=0), 2)}
    e.rows_lost = len(got) - len(accepted) - len(refused)
    assert len(accepted) + len(refused) == BURST, [g[0] for g in got]  # no 504, no 500
    assert accepted and refused, e.metrics
    for status, _, body, response in refused:
        assert body["error"]["code"] == "deadline_exceeded", body
        assert int(response.headers["Retry-After"]) >= 1
    assert max(g[1] for g in refused) < max(g[1] for g in accepted), e.metrics  # refusals came back first
    assert all(body["prompts"] for _, _, body, _ in accepted)


def test_clients_that_honour_retry_after_lose_nothing(server, rel):
    from vpo_ray.serve.client import OptimizerClient

    e = rel("fault", "serve", "overload: the same burst through OptimizerClient (honours Retry-After)", tried=BURST)
    deadline = 3 * service_time(server, 4)
    attempts: list[int] = []

    def one(k: int) -> dict:
        client = OptimizerClient(server, max_retries=50, max_retry_after_s=10, deadline_s=deadline, timeout_s=120)
        send = client.session.request

        def counted(*args, **kwargs):
            attempts.append(k)
            return send(*args, **kwargs)

        client.session.request = counted
        return client.optimize(f"a heron fishing at dawn, take {k}", seed=k)

    got = burst(one, BURST)
    e.metrics = {"requests": BURST, "attempts": len(attempts), "answered": sum(1 for g in got if g and g["prompts"])}
    e.rows_lost = BURST - e.metrics["answered"]
    assert e.rows_lost == 0
    assert len(attempts) > BURST  # some were refused and retried: the burst did exceed capacity


def test_a_bad_deadline_header_is_refused_naming_it(server):
    for bad in ("soon", "0", "-3", "1e9", "nan"):
        r = requests.post(server + "/v1/optimize", json={"query": "a cat"}, headers={HEADER: bad}, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["field"] == HEADER, (bad, r.text)
