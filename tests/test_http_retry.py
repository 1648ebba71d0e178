"""The one retry policy of the HTTP clients: what is retried, how long it waits, when it stops."""
import pytest

from vpo_ray.http_retry import RetryPolicy, Retryable, call_with_retries, retry_after_s, retryable_status


class Flaky:
    """Fails with the given exceptions, then returns "ok"."""

    def __init__(self, *failures):
        self.failures = list(failures)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def run(fn, policy, retried=None):
    waits = []
    out = call_with_retries(fn, policy, on_retry=(retried.append if retried is not None else None),
                            sleep=waits.append)
    return out, waits


def test_retryable_failures_are_retried_with_growing_capped_waits():
    fn = Flaky(*[Retryable("HTTP 503")] * 4)
    retried = []
    out, waits = run(fn, RetryPolicy(max_retries=4, backoff_s=1.0, max_wait_s=3.0), retried)
    assert out == "ok" and fn.calls == 5 and len(retried) == 4
    # backoff 1, 2, 4, 8 plus up to one backoff of jitter, each capped at 3 s
    assert 1.0 <= waits[0] <= 2.0 and 2.0 <= waits[1] <= 3.0 and waits[2:] == [3.0, 3.0]


def test_server_retry_after_wins_and_is_capped():
    fn = Flaky(Retryable("HTTP 429", retry_after=0.25), Retryable("HTTP 429", retry_after=120.0))
    _, waits = run(fn, RetryPolicy(max_retries=3, backoff_s=5.0, max_wait_s=10.0))
    assert waits == [0.25, 10.0]


def test_gives_up_after_max_retries_with_the_last_failure():
    fn = Flaky(*[Retryable(f"HTTP 50{i}") for i in range(5)])
    with pytest.raises(Retryable, match="HTTP 502"):
        run(fn, RetryPolicy(max_retries=2, backoff_s=0.0))
    assert fn.calls == 3


def test_other_exceptions_are_not_retried():
    fn = Flaky(ValueError("HTTP 400"))
    with pytest.raises(ValueError, match="HTTP 400"):
        run(fn, RetryPolicy(max_retries=5))
    assert fn.calls == 1


@pytest.mark.parametrize("status, retry", [(408, True), (429, True), (500, True), (502, True), (503, True),
                                           (504, True), (400, False), (401, False), (404, False), (422, False)])
def test_which_statuses_are_retried(status, retry):
    assert retryable_status(status) is retry


def test_retry_after_header():
    assert retry_after_s({"Retry-After": "2"}) == 2.0
    assert retry_after_s({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None  # date form: backoff instead
    assert retry_after_s({}) is None and retry_after_s({"Retry-After": "-3"}) == 0.0
