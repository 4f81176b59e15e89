"""Retry policy: what is retried, how long we wait, Retry-After (RFC 9110 §10.2.3)."""

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from fhir_bridge.retry import RetryPolicy, parse_retry_after


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
def test_transient_statuses_are_retried(status: int) -> None:
    assert RetryPolicy().should_retry_status(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 412, 422, 500, 501])
def test_other_errors_are_not_retried(status: int) -> None:
    assert not RetryPolicy().should_retry_status(status)


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    policy = RetryPolicy(backoff_initial=0.5, backoff_max=4.0, rng=random.Random(7))
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [policy.backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter really spreads


def test_retry_after_seconds_and_http_date_are_honoured_up_to_the_cap() -> None:
    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    policy = RetryPolicy(retry_after_cap=30)
    assert policy.delay(1, "2", now=now) == 2
    assert policy.delay(1, format_datetime(now + timedelta(seconds=12), usegmt=True), now=now) == pytest.approx(12)
    assert policy.delay(1, "3600", now=now) == 30
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now=now) == 0


@pytest.mark.parametrize("value", [None, "", "soon", "-1"])
def test_unreadable_retry_after_falls_back_to_backoff(value: str | None) -> None:
    assert parse_retry_after(value) is None
    assert 0 <= RetryPolicy(backoff_initial=0.1).delay(1, value) <= 0.1


def test_retries_are_counted() -> None:
    policy = RetryPolicy(max_retries=2)
    assert policy.can_retry(1) and policy.can_retry(2) and not policy.can_retry(3)
