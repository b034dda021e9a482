"""Under pytest-xdist (scripts/test.sh runs the suite with it) a worker sends every
test report to the controller, so what a test captures must survive the trip."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent


def test_a_logged_lone_surrogate_does_not_end_an_xdist_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test that logs a surrogate-escaped byte passes under -n, its log line escaped,
    instead of an INTERNALERROR that stops every worker."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport  # noqa: F401")
    pytester.makepyfile(
        """
        import logging

        def test_logs_a_hostile_name():
            name = b"up\\xf3.jpg".decode("utf-8", "surrogateescape")
            logging.getLogger("imgserve").warning("bad name %s", name)

        def test_after_it():
            assert False, "shown"
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "xdist", "-n", "1", "-rA", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([r"*bad name up\udcf3.jpg*"])
    assert "INTERNALERROR" not in result.stdout.str()
