"""A transport whose library is not installed fails clearly, once, naming what to install."""

from __future__ import annotations

import pytest

from imgserve import errors, transports
from imgserve.config import TransportSettings


def test_missing_library_is_dependency_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unimportable transport module gives 609, not retryable, with an install hint."""
    monkeypatch.setitem(transports._REGISTRY, "s3", "imgserve_no_such_pkg.s3:S3Transport")
    registry = transports.Transports(TransportSettings())
    with pytest.raises(errors.DependencyMissing) as info:
        registry.for_url("s3://bucket/key.jpg")
    assert info.value.code == 609 and not info.value.retryable
    assert "imgserve_no_such_pkg" in info.value.detail and "pip install" in info.value.detail
