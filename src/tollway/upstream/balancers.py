"""Load balancers: which of a service's available targets takes the next request.

A balancer is built over one set of available targets and thrown away when that set
changes, so everything that depends only on the set (rotations, cumulative weights,
the hash ring) is computed once in the constructor and pick() stays cheap: it runs
once per request. The only thing that changes under a balancer is each target's
`active` count, which least_connections and power_of_two read live.

Every pick() takes `exclude`, the keys of the targets this request already tried:
it then returns another target, or None when every pickable target is excluded.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Container, Sequence
from typing import Generic, Protocol, TypeVar, get_args

from tollway.config.upstream_schema import Balancer as BalancerKind


class Pickable(Protocol):
    @property
    def key(self) -> str: ...  # "host:port", unique within a service

    @property
    def weight(self) -> int: ...  # 0..65535; 0 = never picked (draining)

    @property
    def active(self) -> int: ...  # requests in flight to this target right now


H = TypeVar("H", bound=Pickable)

# The kinds the config accepts, from the config's own literal so the two never drift.
KINDS: tuple[str, ...] = get_args(BalancerKind)


class Balancer(Generic[H]):
    """Picks one of `hosts`; hosts of weight 0 are kept here but never picked."""

    __slots__ = ("_up", "hosts")

    def __init__(self, hosts: Sequence[H]) -> None:
        self.hosts: tuple[H, ...] = tuple(hosts)
        self._up: tuple[H, ...] = tuple(h for h in self.hosts if h.weight > 0)

    def pick(
        self, hash_key: bytes | None = None, exclude: Container[str] | None = None
    ) -> H | None:
        raise NotImplementedError


class NoHosts(Balancer[H]):
    """What every kind becomes when no host can be picked (none, or all weight 0)."""

    __slots__ = ()

    def pick(
        self, hash_key: bytes | None = None, exclude: Container[str] | None = None
    ) -> H | None:
        return None


def _next_allowed(up: Sequence[H], start: int, exclude: Container[str]) -> H | None:
    """The first host from `start` on (wrapping) whose key is not excluded."""
    n = len(up)
    for k in range(n):
        h = up[(start + k) % n]
        if h.key not in exclude:
            return h
    return None


class RoundRobin(Balancer[H]):
    """Every pickable host in turn, weights ignored."""

    __slots__ = ("_i", "_n")

    def __init__(self, hosts: Sequence[H], rng: random.Random | None = None) -> None:
        super().__init__(hosts)
        self._n = len(self._up)
        if not self._n:
            raise ValueError("no host of weight above 0: use make_balancer")
        # A random start, so that balancers rebuilt at the same moment (every
        # ejection rebuilds one) do not all send their first request to host 0.
        self._i = (rng or random.Random()).randrange(self._n)

    def pick(
        self, hash_key: bytes | None = None, exclude: Container[str] | None = None
    ) -> H | None:
        i = self._i
        h = self._up[i]
        i += 1
        self._i = 0 if i == self._n else i
        if exclude is None or h.key not in exclude:
            return h
        return _next_allowed(self._up, i, exclude)


class _Smooth(Generic[H]):
    """nginx's smooth weighted round robin, run live: O(hosts) per pick.

    Used when the precomputed period would be too long, and for picks with an
    exclusion, where (as nginx does with its `tried` bitmap) the excluded hosts sit
    this turn out and the total is that of the others.
    """

    __slots__ = ("_current", "_up", "_weights")

    def __init__(self, up: Sequence[H], weights: Sequence[int]) -> None:
        self._up = tuple(up)
        self._weights = tuple(weights)
        self._current = [0] * len(self._up)

    def pick(self, exclude: Container[str] | None) -> H | None:
        current = self._current
        best = -1
        total = 0
        for i, (h, w) in enumerate(zip(self._up, self._weights, strict=True)):
            if exclude is not None and h.key in exclude:
                continue
            current[i] += w
            total += w
            # Strictly greater: on a tie the first host wins, as in nginx.
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self._up[best]


# Longest precomputed smooth-WRR period, and most work (period * hosts) to build it:
# rebuilding must stay cheap too, since every ejection or recovery rebuilds.
_MAX_PERIOD = 4096
_MAX_BUILD_STEPS = 1 << 16


class WeightedRoundRobin(Balancer[H]):
    """nginx's smooth weighted round robin: weights 5,1,1 give a,a,b,a,c,a,a.

    The sequence is periodic (period = sum of the weights over their gcd), so it is
    computed once and pick() walks it like a plain round robin. A period too long
    to precompute falls back to the live O(hosts) algorithm.
    """

    __slots__ = ("_i", "_live", "_n", "_retry", "_seq")

    def __init__(self, hosts: Sequence[H], rng: random.Random | None = None) -> None:
        super().__init__(hosts)
        if not self._up:
            raise ValueError("no host of weight above 0: use make_balancer")
        g = math.gcd(*(h.weight for h in self._up))
        weights = [h.weight // g for h in self._up]
        period = sum(weights)
        # Picks that exclude a host run their own smooth state over the others,
        # leaving the main sequence undisturbed.
        self._retry: _Smooth[H] = _Smooth(self._up, weights)
        self._live: _Smooth[H] | None = None
        self._seq: tuple[H, ...] = ()
        if period <= _MAX_PERIOD and period * len(weights) <= _MAX_BUILD_STEPS:
            smooth: _Smooth[H] = _Smooth(self._up, weights)
            seq = [smooth.pick(None) for _ in range(period)]
            self._seq = tuple(h for h in seq if h is not None)
        else:
            self._live = _Smooth(self._up, weights)
        self._n = len(self._seq)
        # Start at the head of the period, as nginx does: the documented order.
        self._i = 0

    def pick(
        self, hash_key: bytes | None = None, exclude: Container[str] | None = None
    ) -> H | None:
        if self._live is not None:
            if exclude is None:
                return self._live.pick(None)
            return self._retry.pick(exclude)
        i = self._i
        h = self._seq[i]
        i += 1
        self._i = 0 if i == self._n else i
        if exclude is None or h.key not in exclude:
            return h
        return self._retry.pick(exclude)


class LeastConnections(Balancer[H]):
    """The host with the lowest (active + 1) / weight (HAProxy's leastconn).

    Ties go to the host picked least recently, so equally idle hosts take turns
    instead of the first one taking everything. O(hosts) per pick: `active` moves.
    """

    __slots__ = ("_last", "_seq", "_weights")

    def __init__(self, hosts: Sequence[H], rng: random.Random | None = None) -> None:
        super().__init__(hosts)
        n = len(self._up)
        if not n:
            raise ValueError("no host of weight above 0: use make_balancer")
        self._weights = tuple(h.weight for h in self._up)
        # The pick number at which each host was last chosen; the start is rotated
        # at random for the same reason as RoundRobin's.
        start = (rng or random.Random()).randrange(n)
        self._last = [(i - start) % n - n for i in range(n)]
        self._seq = 0

    def pick(
        self, hash_key: bytes | None = None, exclude: Container[str] | None = None
    ) -> H | None:
        up = self._up
        weights = self._weights
        last = self._last
        best = -1
        best_score = math.inf
        for i in range(len(up)):
            h = up[i]
            if exclude is not None and h.key in exclude:
                continue
            # Division, not cross-multiplication: it is correctly rounded, so equal
            # ratios (2/200, 1/100) compare equal and fall to the rotation.
            score = (h.active + 1) / weights[i]
            if score < best_score or (score == best_score and last[i] < last[best]):
                best = i
                best_score = score
        if best < 0:
            return None
        last[best] = self._seq
        self._seq += 1
        return up[best]


def _cumulative(weights: Sequence[int]) -> list[int]:
    out: list[int] = []
    total = 0
    for w in weights:
        total += w
        out.append(total)
    return out


def _draw(cum: Sequence[int], r: float) -> int:
    """The index whose weight span holds r * total (r in [0, 1))."""
    # hi = last index: r * total may round up to total itself.
    return bisect_right(cum, r * cum[-1], 0, len(cum) - 1)


class _Weighted(Generic[H]):
    """Hosts with their weights and cumulative weights, for weighted draws."""

    __slots__ = ("cum", "up", "weights")

    def __init__(self, up: Sequence[H]) -> None:
        self.up = tuple(up)
        self.weights = tuple(h.weight for h in self.up)
        self.cum = _cumulative(self.weights)

    def without(self, exclude: Container[str]) -> _Weighted[H] | None:
        kept = [h for h in self.up if h.key not in exclude]
        return _Weighted(kept) if kept else None


class RandomBalancer(Balancer[H]):
    """A weighted random host."""

    __slots__ = ("_all", "_random")

    def __init__(self, hosts: Sequence[H], rng: random.Random | None = None) -> None:
        super().__init__(hosts)
        if not self._up:
            raise ValueError("no host of weight above 0: use make_balancer")
        self._all: _Weighted[H] = _Weighted(self._up)
        self._random: Callable[[], float] = (rng or random.Random()).random

    def pick(
        self, hash_key: bytes | None = None, exclude: Container[str] | None = None
    ) -> H | None:
        ws = self._all
        h = ws.up[_draw(ws.cum, self._random())]
        if exclude is None or h.key not in exclude:
            return h
        # A retry: draw again among the others only (rare, so O(hosts) is fine).
        rest = ws.without(exclude)
        return None if rest is None else rest.up[_draw(rest.cum, self._random())]


class PowerOfTwo(RandomBalancer[H]):
    """Two distinct weighted-random candidates; the less loaded one wins.

    Load is active / weight, not (active + 1) / weight: the candidates were already
    drawn in proportion to weight, and counting the weight a second time would send
    all idle traffic to the heavier candidate (two hosts of weight 2 and 1 would
    split 100/0 instead of 67/33). With active / weight, idle hosts tie and the
    first candidate wins, so idle traffic follows the weights exactly.
    """

    __slots__ = ()  # the weighted draw is RandomBalancer's

    def pick(
        self, hash_key: bytes | None = None, exclude: Container[str] | None = None
    ) -> H | None:
        if exclude is None:
            return self._two(self._all)
        rest = self._all.without(exclude)
        return None if rest is None else self._two(rest)

    def _two(self, ws: _Weighted[H]) -> H:
        up, weights, cum = ws.up, ws.weights, ws.cum
        if len(up) == 1:
            return up[0]
        i = _draw(cum, self._random())
        # The second draw leaves the first candidate's span out, so it is weighted
        # among the others and never the same host.
        wi = weights[i]
        y = self._random() * (cum[-1] - wi)
        if y >= cum[i] - wi:
            y += wi
        j = bisect_right(cum, y, 0, len(cum) - 1)
        a, b = up[i], up[j]
        # b.active / b.weight < a.active / a.weight, exactly, in integers.
        return b if b.active * weights[i] < a.active * weights[j] else a


# Ring points per unit of weight: 160 for the default weight of 100, as ketama's
# 160 points per server of equal weight.
_POINTS_PER_100 = 160
_RING = 1 << 64


def _hash_key(data: bytes) -> int:
    # blake2b, not hash(): the ring must agree across processes and restarts.
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _host_points(key: str, weight: int) -> list[int]:
    count = max(1, (weight * _POINTS_PER_100 + 50) // 100)
    points: list[int] = []
    # One 64-byte digest gives 8 points, as ketama takes 4 from one md5.
    for n in range((count + 7) // 8):
        digest = hashlib.blake2b(f"{key}-{n}".encode(), digest_size=64).digest()
        points.extend(struct.unpack(">8Q", digest))
    return points[:count]


class ConsistentHash(Balancer[H]):
    """A ketama-like hash ring: the same hash_key goes to the same host.

    Each host's points depend only on its own key and weight, so removing a host
    moves only the keys that were on it (they go to the next points clockwise) and
    adding one moves only the keys that land on it. That is why a ring and not
    Maglev: Maglev spreads load more evenly but rebuilding its table also moves a
    few keys between hosts that stayed. A hand-written ring rather than uhashring or
    hashring: those hash with md5, count points relative to the total weight (so a
    removal moves keys between the remaining hosts) and cannot skip excluded hosts.

    A request without a hash_key (the header or cookie was absent) goes round robin.
    """

    __slots__ = ("_owners", "_per_host", "_points", "_rr")

    def __init__(self, hosts: Sequence[H], rng: random.Random | None = None) -> None:
        super().__init__(hosts)
        if not self._up:
            raise ValueError("no host of weight above 0: use make_balancer")
        self._rr: RoundRobin[H] = RoundRobin(self._up, rng)
        # Hosts in key order, so that a (2^-64 unlikely) point shared by two hosts
        # resolves the same way whatever order the hosts came in.
        by_key = sorted(self._up, key=lambda h: h.key)
        # One int per point, (point << 32 | host rank): sorting plain ints is faster
        # than tuples, and a host of weight 65535 has 104,856 points.
        ring = sorted(
            (p << 32) | rank
            for rank, h in enumerate(by_key)
            for p in _host_points(h.key, h.weight)
        )
        self._points = [v >> 32 for v in ring]
        self._owners = tuple(by_key[v & 0xFFFFFFFF] for v in ring)
        # Each host's own sorted points, for the rare pick that excludes most of
        # the ring; built on first need, as most balancers never need them.
        self._per_host: list[tuple[H, list[int]]] | None = None

    def pick(
        self, hash_key: bytes | None = None, exclude: Container[str] | None = None
    ) -> H | None:
        if hash_key is None:
            return self._rr.pick(None, exclude)
        x = _hash_key(hash_key)
        i = bisect_left(self._points, x)
        owners = self._owners
        n = len(owners)
        if i == n:
            i = 0
        h = owners[i]
        if exclude is None or h.key not in exclude:
            return h
        # Clockwise to the next point of a host not excluded. A short walk finds it
        # almost always; past that (most of the ring excluded) ask each remaining
        # host for its first point clockwise instead, which gives the same answer.
        for k in range(1, min(n, 64)):
            h = owners[(i + k) % n]
            if h.key not in exclude:
                return h
        return self._first_clockwise(x, exclude)

    def _first_clockwise(self, x: int, exclude: Container[str]) -> H | None:
        if self._per_host is None:
            self._per_host = [(h, sorted(_host_points(h.key, h.weight))) for h in self._up]
        best: tuple[int, str] | None = None
        found: H | None = None
        for h, pts in self._per_host:
            if h.key in exclude:
                continue
            j = bisect_left(pts, x)
            # Past the last point: the host's first point, one turn further on.
            at = (pts[j] if j < len(pts) else pts[0] + _RING, h.key)
            if best is None or at < best:
                best, found = at, h
        return found


def make_balancer(kind: str, hosts: Sequence[H], rng: random.Random | None = None) -> Balancer[H]:
    """A balancer of `kind` (the Balancer literal of the upstream config) over `hosts`."""
    if kind not in KINDS:
        raise ValueError(f"unknown balancer {kind!r}: one of {', '.join(KINDS)}")
    if not any(h.weight > 0 for h in hosts):
        return NoHosts(hosts)
    if kind == "round_robin":
        return RoundRobin(hosts, rng)
    if kind == "weighted_round_robin":
        return WeightedRoundRobin(hosts, rng)
    if kind == "least_connections":
        return LeastConnections(hosts, rng)
    if kind == "random":
        return RandomBalancer(hosts, rng)
    if kind == "power_of_two":
        return PowerOfTwo(hosts, rng)
    return ConsistentHash(hosts, rng)
