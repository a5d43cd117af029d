"""Errors a limit store raises."""

from __future__ import annotations


class LimiterUnavailable(Exception):
    """The shared limit store could not answer (down, unreachable, timed out, or it
    answered with an error). Nothing was decided: the caller picks fail-open or
    fail-closed, and a StoreBreaker keeps it from waiting on a dead store."""
