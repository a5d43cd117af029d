"""Retry policy pieces: which methods, how long to wait, how many retries."""

from __future__ import annotations

import random
import statistics

import pytest

from tollway.upstream.retry import (
    IDEMPOTENT_METHODS,
    RetryBudget,
    backoff_delay,
    may_retry_method,
)

T0 = 5000.0


@pytest.mark.parametrize(
    ("method", "has_key", "non_idempotent", "expected"),
    [
        ("GET", False, False, True),
        ("HEAD", False, False, True),
        ("OPTIONS", False, False, True),
        ("TRACE", False, False, True),
        ("PUT", False, False, True),
        ("DELETE", False, False, True),
        ("POST", False, False, False),
        ("PATCH", False, False, False),
        ("CONNECT", False, False, False),
        ("POST", True, False, True),  # Idempotency-Key: the upstream deduplicates
        ("PATCH", True, False, True),
        ("POST", False, True, True),  # the service allows it
        ("get", False, False, False),  # methods are case-sensitive (RFC 9110 §9.1)
    ],
)
def test_may_retry_method(method: str, has_key: bool, non_idempotent: bool, expected: bool) -> None:
    assert may_retry_method(method, has_key, non_idempotent) is expected


def test_idempotent_methods_are_rfc_9110s() -> None:
    assert frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}) == IDEMPOTENT_METHODS


@pytest.mark.parametrize("retry", [1, 2, 3, 4, 5, 8])
def test_backoff_full_jitter_bounds_and_spread(retry: int) -> None:
    base, cap = 0.025, 0.25
    bound = min(cap, base * 2 ** (retry - 1))
    rng = random.Random(1234 + retry)
    draws = [backoff_delay(retry, base, cap, rng) for _ in range(5000)]
    assert all(0.0 <= d <= bound for d in draws)
    # Spread over the whole range, not clustered at one end.
    assert statistics.fmean(draws) == pytest.approx(bound / 2, rel=0.05)
    assert min(draws) < bound * 0.05
    assert max(draws) > bound * 0.95


def test_backoff_is_capped_even_for_absurd_retry_numbers() -> None:
    rng = random.Random(7)
    assert all(0.0 <= backoff_delay(10_000, 0.025, 0.25, rng) <= 0.25 for _ in range(100))


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    a = [backoff_delay(3, 0.1, 1.0, random.Random(42)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_backoff_rejects_retry_zero() -> None:
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(0, 0.1, 1.0, random.Random(1))


def test_budget_ratio_allows_exactly_its_share() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0)
    for _ in range(100):
        budget.record_request(T0)
    granted = sum(budget.try_spend(T0 + 1) for _ in range(20))
    assert granted == 20
    assert budget.exhausted == 0
    assert not budget.try_spend(T0 + 1)
    assert not budget.try_spend(T0 + 2)
    assert budget.exhausted == 2
    assert budget.describe(T0 + 2) == {
        "requests": 100,
        "retries": 20,
        "allowed_retries": 20,
        "exhausted": 2,
        "window_seconds": 10.0,
    }


def test_budget_float_share_is_not_lost_to_rounding() -> None:
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 retries.
    budget = RetryBudget(ratio=0.29, min_per_second=0.0, window=10.0)
    for _ in range(100):
        budget.record_request(T0)
    assert sum(budget.try_spend(T0) for _ in range(40)) == 29


def test_budget_min_per_second_allows_retries_without_traffic() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.5, window=10.0)  # 5 per window
    assert sum(budget.try_spend(T0) for _ in range(10)) == 5
    assert budget.exhausted == 5


def test_budget_without_traffic_or_minimum_refuses() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0)
    assert not budget.try_spend(T0)
    assert budget.exhausted == 1


def test_budget_window_slides() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0)
    for _ in range(10):
        budget.record_request(T0)
    assert sum(budget.try_spend(T0) for _ in range(5)) == 5
    assert not budget.try_spend(T0 + 5)
    # Eleven seconds on, the old requests and retries no longer count.
    later = T0 + 11
    assert budget.describe(later)["requests"] == 0
    assert not budget.try_spend(later)  # no traffic, no minimum: nothing to spend
    for _ in range(4):
        budget.record_request(later)
    assert sum(budget.try_spend(later) for _ in range(5)) == 2


def test_budget_retries_spent_long_ago_free_up() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, window=10.0)  # 2 per window
    assert budget.try_spend(T0)
    assert budget.try_spend(T0 + 1)
    assert not budget.try_spend(T0 + 5)
    assert budget.try_spend(T0 + 10.5)  # the first retry aged out
    assert not budget.try_spend(T0 + 10.5)


def test_budget_reconfigure() -> None:
    budget = RetryBudget(ratio=0.1, min_per_second=0.0, window=10.0)
    for _ in range(100):
        budget.record_request(T0)
    assert sum(budget.try_spend(T0) for _ in range(30)) == 10
    budget.reconfigure(ratio=0.3, min_per_second=0.0, window=10.0)  # counts kept
    assert sum(budget.try_spend(T0) for _ in range(30)) == 20
    budget.reconfigure(ratio=0.3, min_per_second=0.0, window=5.0)  # new window: empty
    assert budget.describe(T0)["requests"] == 0
    assert budget.exhausted == 30  # never reset
    with pytest.raises(ValueError):
        budget.reconfigure(ratio=-1, min_per_second=0.0, window=5.0)


def test_budget_of_a_zero_window_never_retries() -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=10.0, window=0.0)
    budget.record_request(T0)
    assert not budget.try_spend(T0)
