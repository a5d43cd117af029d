"""Suite-wide rules.

In CI (CI=true) a test marked needs_postgres or needs_redis must fail when the
service is missing, never skip: a green CI must mean those tests ran.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

# The `database` fixture (SQLite and PostgreSQL) is available to every test.
pytest_plugins = ["support.db"]

SERVICE_MARKERS = ("needs_postgres", "needs_redis")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("CI") == "true"
        and report.skipped
        and any(item.get_closest_marker(m) for m in SERVICE_MARKERS)
    ):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: skipped in CI, but its service must be there"


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """For tests that bound times in fractions of a second: late in a full run the test
    process holds everything earlier tests left, and one full collection of it took
    over a second, failing them. A serving gateway freezes its startup heap the same
    way (gateway/app.py). Use with `pytestmark = pytest.mark.usefixtures("frozen_heap")`."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
