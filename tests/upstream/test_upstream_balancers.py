"""Balancers: who gets the next request, in what shares, and what a retry may pick."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from tollway.upstream.balancers import KINDS, Balancer, make_balancer


@dataclass
class Host:
    """A target as the cluster sees it: `active` moves while requests are in flight."""

    key: str
    weight: int = 100
    active: int = 0


def hosts(*weights: int) -> list[Host]:
    return [Host(f"10.0.0.{i + 1}:8080", w) for i, w in enumerate(weights)]


def shares(balancer: Balancer[Host], picks: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(picks):
        h = balancer.pick()
        assert h is not None
        counts[h.key] += 1
    return counts


def assert_weighted(counts: Counter[str], targets: list[Host], tolerance: float) -> None:
    total_picks = sum(counts.values())
    total_weight = sum(h.weight for h in targets)
    for h in targets:
        share = counts[h.key] / total_picks
        assert abs(share - h.weight / total_weight) <= tolerance, (h.key, share)


def ch_map(balancer: Balancer[Host], keys: list[bytes]) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    for k in keys:
        h = balancer.pick(k)
        assert h is not None
        out[k] = h.key
    return out


KEYS = [f"consumer-{i}".encode() for i in range(10_000)]


# --- distributions -----------------------------------------------------------------


def test_round_robin_is_exactly_even_and_ignores_weights() -> None:
    targets = hosts(100, 300, 50, 1000)
    counts = shares(make_balancer("round_robin", targets, random.Random(1)), 10_000)
    assert counts == {h.key: 2_500 for h in targets}


def test_round_robin_takes_every_host_once_per_turn() -> None:
    targets = hosts(100, 100, 100)
    b = make_balancer("round_robin", targets, random.Random(7))
    for _ in range(5):
        turn = [b.pick() for _ in range(3)]
        assert {h.key for h in turn if h is not None} == {h.key for h in targets}


def test_smooth_weighted_round_robin_sequence() -> None:
    a, b, c = Host("a:1", 5), Host("b:1", 1), Host("c:1", 1)
    balancer = make_balancer("weighted_round_robin", [a, b, c], random.Random(1))
    picked = [balancer.pick() for _ in range(14)]
    assert [h.key[0] for h in picked if h is not None] == list("aabacaa" * 2)


@pytest.mark.parametrize("kind", ["weighted_round_robin", "random", "power_of_two"])
def test_weighted_kinds_follow_weights_within_2_percent(kind: str) -> None:
    targets = hosts(100, 200, 300, 400)  # all idle: active == 0
    counts = shares(make_balancer(kind, targets, random.Random(42)), 10_000)
    assert_weighted(counts, targets, 0.02)


def nginx_smooth(targets: list[Host], picks: int) -> list[str]:
    """nginx's smooth weighted round robin, written out plainly, as the reference."""
    current = [0] * len(targets)
    total = sum(h.weight for h in targets)
    out = []
    for _ in range(picks):
        for i, h in enumerate(targets):
            current[i] += h.weight
        best = max(range(len(targets)), key=lambda i: (current[i], -i))
        current[best] -= total
        out.append(targets[best].key)
    return out


@pytest.mark.parametrize(
    "weights",
    [
        (100, 200, 300, 400),
        (100, 100, 50),
        (7, 3, 1, 9),
        # Coprime weights: a period of 131059 picks, too long to precompute.
        (65535, 65521, 3),
    ],
)
def test_weighted_round_robin_is_nginx_smooth_order(weights: tuple[int, ...]) -> None:
    targets = hosts(*weights)
    balancer = make_balancer("weighted_round_robin", targets, random.Random(1))
    picked = [balancer.pick() for _ in range(3_000)]
    assert [h.key for h in picked if h is not None] == nginx_smooth(targets, 3_000)


def test_consistent_hash_spreads_distinct_keys_roughly_by_weight() -> None:
    # A ring of 160 points per weight 100 is uneven by about 1/sqrt(160) ~ 8 % of each
    # share (one standard deviation), so the bound is 5 points of share, not 2.
    targets = hosts(100, 200, 300, 400)
    balancer = make_balancer("consistent_hash", targets, random.Random(1))
    counts = Counter(ch_map(balancer, KEYS).values())
    assert_weighted(counts, targets, 0.05)


def test_consistent_hash_same_key_same_host_across_rebuilds() -> None:
    targets = hosts(100, 100, 100)
    first = make_balancer("consistent_hash", targets, random.Random(1))
    # Another rng and another order: the ring depends only on keys and weights.
    again = make_balancer("consistent_hash", targets[::-1], random.Random(2))
    assert ch_map(first, KEYS[:500]) == ch_map(again, KEYS[:500])


def test_consistent_hash_without_key_falls_back_to_round_robin() -> None:
    targets = hosts(100, 300, 50)
    counts = shares(make_balancer("consistent_hash", targets, random.Random(3)), 9_000)
    assert counts == {h.key: 3_000 for h in targets}


# --- least connections --------------------------------------------------------------


def test_least_connections_prefers_the_idle_target() -> None:
    slow, idle = hosts(100, 100)
    slow.active = 5  # slow requests still in flight
    balancer = make_balancer("least_connections", [slow, idle], random.Random(1))
    assert all(balancer.pick() is idle for _ in range(100))
    idle.active = 6
    assert balancer.pick() is slow


def test_least_connections_spreads_evenly_among_equally_idle_hosts() -> None:
    targets = hosts(100, 100, 100, 100)
    # Requests that finish at once: every pick sees all hosts idle.
    counts = shares(make_balancer("least_connections", targets, random.Random(5)), 10_000)
    assert counts == {h.key: 2_500 for h in targets}


def test_least_connections_takes_turns_among_the_idle_while_one_is_busy() -> None:
    busy, b, c = hosts(100, 100, 100)
    busy.active = 3
    counts = shares(make_balancer("least_connections", [busy, b, c], random.Random(1)), 1_000)
    assert counts == {b.key: 500, c.key: 500}


def test_least_connections_respects_weights_under_load() -> None:
    targets = hosts(300, 100)
    balancer = make_balancer("least_connections", targets, random.Random(1))
    # Requests that stay in flight: each pick adds one to its host's load.
    for _ in range(400):
        h = balancer.pick()
        assert h is not None
        h.active += 1
    assert [h.active for h in targets] == [300, 100]


# --- consistent hash: what a change of hosts moves ------------------------------------


def test_removing_a_host_moves_only_its_keys() -> None:
    targets = hosts(100, 100, 100, 100, 100)
    before = ch_map(make_balancer("consistent_hash", targets, random.Random(1)), KEYS)
    gone = targets[2]
    after = ch_map(
        make_balancer("consistent_hash", [h for h in targets if h is not gone], random.Random(1)),
        KEYS,
    )
    moved = [k for k in KEYS if before[k] != after[k]]
    assert {before[k] for k in moved} == {gone.key}  # exactly zero other keys moved
    assert len(moved) == sum(1 for k in KEYS if before[k] == gone.key)
    # Its keys spread over all the others, not onto one neighbour.
    spread = Counter(after[k] for k in moved)
    assert set(spread) == {h.key for h in targets if h is not gone}
    assert min(spread.values()) >= len(moved) / 4 / 3


def test_adding_a_host_moves_only_keys_to_it() -> None:
    targets = hosts(100, 100, 100, 100, 100)
    four = ch_map(make_balancer("consistent_hash", targets[:4], random.Random(1)), KEYS)
    five = ch_map(make_balancer("consistent_hash", targets, random.Random(1)), KEYS)
    moved = [k for k in KEYS if four[k] != five[k]]
    assert moved
    assert {five[k] for k in moved} == {targets[4].key}
    # And back: the same five hosts give the same map as any other ring of them.
    again = ch_map(make_balancer("consistent_hash", targets, random.Random(9)), KEYS)
    assert again == five


# --- exclude, weight 0, empty, unknown ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_exclude_never_returns_an_excluded_host(kind: str) -> None:
    targets = hosts(100, 200, 300)
    balancer = make_balancer(kind, targets, random.Random(11))
    tried = {targets[2].key, targets[0].key}
    for i in range(300):
        h = balancer.pick(f"k{i}".encode() if kind == "consistent_hash" else None, tried)
        assert h is targets[1]


@pytest.mark.parametrize("kind", KINDS)
def test_exclude_of_one_host_still_uses_the_others(kind: str) -> None:
    targets = hosts(100, 100, 100)
    balancer = make_balancer(kind, targets, random.Random(12))
    tried = {targets[0].key}
    seen = set()
    for i in range(300):
        h = balancer.pick(f"k{i}".encode() if kind == "consistent_hash" else None, tried)
        assert h is not None
        seen.add(h.key)
    assert seen == {targets[1].key, targets[2].key}


@pytest.mark.parametrize("kind", KINDS)
def test_everything_excluded_gives_none(kind: str) -> None:
    targets = hosts(100, 200, 0)
    balancer = make_balancer(kind, targets, random.Random(13))
    tried = {targets[0].key, targets[1].key}
    assert balancer.pick(b"key", tried) is None
    assert balancer.pick(None, tried) is None
    # The caller may then try again without the exclusion.
    assert balancer.pick(b"key") in targets[:2]


def test_consistent_hash_exclude_walks_to_the_next_host_clockwise() -> None:
    targets = hosts(100, 100, 100, 100, 100)
    full = make_balancer("consistent_hash", targets, random.Random(1))
    home = ch_map(full, KEYS[:2_000])
    for k in KEYS[:2_000]:
        # Excluding a key's host sends it where it would go if that host were gone,
        # so a retry lands where the key will live should the host be ejected.
        without = make_balancer(
            "consistent_hash", [h for h in targets if h.key != home[k]], random.Random(1)
        )
        assert full.pick(k, {home[k]}) is without.pick(k)


def test_consistent_hash_exclude_of_most_of_a_large_ring() -> None:
    # Past the short walk: one light host left among heavy excluded ones.
    targets = [*hosts(5000, 5000, 5000), Host("light:1", 1)]
    balancer = make_balancer("consistent_hash", targets, random.Random(1))
    tried = {h.key for h in targets[:3]}
    assert all(balancer.pick(k, tried) is targets[3] for k in KEYS[:200])


@pytest.mark.parametrize("kind", KINDS)
def test_weight_zero_is_never_picked(kind: str) -> None:
    draining = Host("draining:1", 0)
    targets = [*hosts(100, 100), draining]
    balancer = make_balancer(kind, targets, random.Random(14))
    assert balancer.hosts == tuple(targets)  # kept, but not picked
    for i in range(500):
        h = balancer.pick(f"k{i}".encode() if i % 2 else None)
        assert h is not None
        assert h is not draining


@pytest.mark.parametrize("kind", KINDS)
def test_no_pickable_host_gives_none(kind: str) -> None:
    assert make_balancer(kind, []).pick() is None
    assert make_balancer(kind, []).hosts == ()
    only_draining = make_balancer(kind, [Host("d:1", 0)])
    assert only_draining.pick(b"key") is None


@pytest.mark.parametrize("kind", KINDS)
def test_single_host_is_always_picked(kind: str) -> None:
    (only,) = hosts(7)
    balancer = make_balancer(kind, [only], random.Random(15))
    assert all(balancer.pick(f"k{i}".encode()) is only for i in range(50))


def test_unknown_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="least_conn"):
        make_balancer("least_conn", hosts(100))


# --- load-aware random choice and determinism ----------------------------------------


def test_power_of_two_avoids_the_loaded_candidate() -> None:
    busy, a, b = hosts(100, 100, 100)
    busy.active = 50
    counts = shares(make_balancer("power_of_two", [busy, a, b], random.Random(16)), 3_000)
    # The two candidates are distinct, so busy always meets a lighter one.
    assert counts[busy.key] == 0
    assert abs(counts[a.key] - counts[b.key]) < 300


def test_power_of_two_weighs_load_against_weight() -> None:
    heavy, light = hosts(400, 100)
    heavy.active, light.active = 3, 1  # 3/400 < 1/100: heavy is less loaded
    balancer = make_balancer("power_of_two", [heavy, light], random.Random(17))
    assert all(balancer.pick() is heavy for _ in range(100))
    heavy.active = 5  # 5/400 > 1/100
    assert all(balancer.pick() is light for _ in range(100))


@pytest.mark.parametrize("kind", ["random", "power_of_two", "round_robin", "least_connections"])
def test_same_seed_same_picks(kind: str) -> None:
    def run(seed: int) -> list[str]:
        balancer = make_balancer(kind, hosts(100, 200, 300, 400), random.Random(seed))
        return [h.key for h in (balancer.pick() for _ in range(100)) if h is not None]

    assert run(3) == run(3)
