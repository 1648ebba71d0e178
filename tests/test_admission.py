"""Admission control of the serve ingress (vpo_ray/serve/admission.py) on a hand-driven clock."""
from __future__ import annotations

from vpo_ray.serve.admission import AdmissionControl


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def serve_one_at_a_time(ac: AdmissionControl, clock: Clock, n: int, service_s: float) -> None:
    for _ in range(n):
        assert ac.decide(deadline_s=1e9).admit
        clock.t += service_s
        ac.finished()


def test_everything_is_admitted_until_the_service_time_is_known():
    ac = AdmissionControl(min_completions=4, clock=Clock())
    assert all(ac.decide(deadline_s=0.001).admit for _ in range(50))


def test_a_request_that_cannot_finish_in_time_is_refused_with_the_wait_it_needs():
    clock = Clock()
    ac = AdmissionControl(min_completions=4, clock=clock)
    serve_one_at_a_time(ac, clock, 6, service_s=1.0)
    decisions = [ac.decide(deadline_s=3.5) for _ in range(5)]
    assert [d.admit for d in decisions] == [True, True, True, False, False]  # 1, 2, 3 s fit; 4 s does not
    assert decisions[3].expected_s == 4.0 and decisions[3].retry_after_s == 1
    assert ac.snapshot()["in_flight"] == 3  # refused requests never entered the queue


def test_batched_completions_count_as_short_gaps():
    """8 requests answered together every 2 s: 0.25 s per request, so 12 queued still fit 4 s."""
    clock = Clock()
    ac = AdmissionControl(window=32, min_completions=4, clock=clock)
    for _ in range(20):
        for _ in range(8):
            ac.decide(deadline_s=1e9)
        clock.t += 2.0
        for _ in range(8):
            ac.finished()
    assert ac.snapshot()["per_request_s"] == 0.25
    admitted = [ac.decide(deadline_s=4.0).admit for _ in range(30)]
    assert admitted == [True] * 16 + [False] * 14  # (k + 1) x 0.25 s <= 4 s for k < 16


def test_idle_time_and_failures_do_not_make_the_server_look_slow():
    clock = Clock()
    ac = AdmissionControl(min_completions=1, clock=clock)
    serve_one_at_a_time(ac, clock, 3, service_s=0.5)
    clock.t += 600  # nobody asked for ten minutes
    serve_one_at_a_time(ac, clock, 1, service_s=0.5)
    ac.decide(deadline_s=1e9)
    clock.t += 30
    ac.finished(completed=False)  # timed out / replica died: not a service time
    assert ac.snapshot()["per_request_s"] == 0.5
