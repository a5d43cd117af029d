"""Metric families built lazily, once per prometheus_client value class.

An exporter's counters must be created after `metrics.setup_multiprocess` picked the
value class (in-process or mmap files), and again if it switched since: this holds
the families with the class they were built for and rebuilds them when it changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

from prometheus_client import REGISTRY, values
from prometheus_client.metrics import MetricWrapperBase


class Families(Protocol):
    @property
    def all(self) -> Iterable[MetricWrapperBase]: ...


F = TypeVar("F", bound=Families)


class PerValueClass(Generic[F]):
    def __init__(self, factory: Callable[[], F]) -> None:
        self._factory = factory
        self._built: tuple[object, F] | None = None

    def get(self) -> F:
        value_class = values.ValueClass
        built = self._built
        if built is None or built[0] is not value_class:
            if built is not None:
                for metric in built[1].all:
                    REGISTRY.unregister(metric)
            built = self._built = (value_class, self._factory())
        return built[1]
