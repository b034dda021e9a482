"""Root fixtures: the loopback test servers (tests/servers.py) for every test, and one
planner process pool shared by the in-process API tests; and reports that a
pytest-xdist worker can send."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from imgserve.planner import Planner

pytest_plugins = ["tests.servers", "tests.redis_server"]


@pytest.fixture(scope="session")
def shared_planner() -> Iterator[Planner]:
    """Planner processes for tests that run api.make_app in-process."""
    planner = Planner(processes=1, timeout_s=10.0, memory_limit_mb=1024)
    yield planner
    planner.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Captured output and logs with lone surrogates (a hostile file name, decoded with
    surrogateescape and logged) shown backslash-escaped: an xdist worker sends its
    reports as UTF-8 (execnet), and one it cannot encode ends the whole run."""
    report = yield
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
        for title, text in report.sections
    ]
    return report
