"""Root fixtures: the loopback test servers (tests/servers.py) for every test, and one
planner process pool shared by the in-process API tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from imgserve.planner import Planner

pytest_plugins = ["tests.servers", "tests.redis_server"]


@pytest.fixture(scope="session")
def shared_planner() -> Iterator[Planner]:
    """Planner processes for tests that run api.make_app in-process."""
    planner = Planner(processes=1, timeout_s=10.0, memory_limit_mb=1024)
    yield planner
    planner.close()
