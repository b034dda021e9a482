"""The ``backend`` fixture: one real server per transport, behind one shape.

The contract suite (test_contract.py) runs against every backend; what a
backend cannot do (a slow server for file://, say) is ``None``, and the tests
that need it are parametrised over the backends that can (test_contract.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgserve.config import NetPolicy, TransportSettings
from imgserve.transports import Target, Transports
from tests.servers import (
    FTP_READER,
    FTPTestServer,
    HTTPTestServer,
    S3TestServer,
)

LOOPBACK = NetPolicy(allow_nets=(ipaddress.ip_network("127.0.0.0/8"),))


@dataclass
class Backend:
    """How to arrange and inspect one transport's server from a test."""

    name: str
    settings: TransportSettings
    put_source: Callable[[str, bytes], str]
    """Store bytes under a name on the server; returns the URL to download."""
    target: Callable[[str], Target]
    """The upload target for a name."""
    read_back: Callable[[str], bytes]
    """What the server holds under a name."""
    missing_url: str
    slow_url: str | None = None
    """A URL the server sends far slower than the tests' deadline."""
    flaky: Callable[[str, int], Target] | None = None
    """A target whose next n uploads fail transiently."""
    refused: Callable[[str], tuple[Target, Callable[[], int]]] | None = None
    """A target the server refuses permanently, and a counter of attempts (-1: unknown)."""

    def transports(self, **changes: object) -> Transports:
        return Transports(dataclasses.replace(self.settings, **changes))  # type: ignore[arg-type]


def unique(prefix: str = "obj") -> str:
    """A name no other test uses on the shared servers."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def base_settings(
    tmp_path: Path, ca_file: Path, s3_endpoint: str | None = None
) -> TransportSettings:
    return TransportSettings(
        policy=LOOPBACK,
        file_roots=(tmp_path,),
        ca_file=ca_file,
        s3_endpoint=s3_endpoint,
        s3_region="us-east-1",
        download_timeout_s=5.0,
        upload_timeout_s=5.0,
        max_download_bytes=1024 * 1024,
        upload_attempts=3,
        retry_base_s=0.01,
        retry_max_s=0.05,
    )


def _http_backend(server: HTTPTestServer, settings: TransportSettings) -> Backend:
    state = server.state

    def put_source(name: str, data: bytes) -> str:
        state.files[name] = data
        return server.url(f"/files/{name}")

    def flaky(name: str, failures: int) -> Target:
        state.fail_remaining[name] = failures
        return Target(server.url(f"/flaky/{name}"))

    def refused(name: str) -> tuple[Target, Callable[[], int]]:
        return Target(server.url(f"/forbidden/{name}")), lambda: state.attempts[name]

    return Backend(
        name=server.scheme,
        settings=settings,
        put_source=put_source,
        target=lambda name: Target(server.url(f"/files/{name}")),
        read_back=lambda name: state.files[name],
        missing_url=server.url("/files/missing-" + unique()),
        slow_url=server.url("/slow"),
        flaky=flaky,
        refused=refused,
    )


def _ftp_backend(
    server: FTPTestServer, scheme: str, settings: TransportSettings, slow: FTPTestServer | None
) -> Backend:
    def put_source(name: str, data: bytes) -> str:
        (server.home / name).write_bytes(data)
        return server.url(name, scheme=scheme)

    def flaky(name: str, failures: int) -> Target:
        server.state.stor_failures = failures
        return Target(server.url(f"sub/{name}", scheme=scheme))

    def refused(name: str) -> tuple[Target, Callable[[], int]]:
        def logins() -> int:
            return server.state.commands.count(("USER", FTP_READER))

        return Target(server.url(name, scheme=scheme, user=FTP_READER)), logins

    slow_url = None
    if slow is not None:
        (slow.home / "big.bin").write_bytes(b"s" * 256 * 1024)
        slow_url = slow.url("big.bin", scheme=scheme)

    def read_back(name: str) -> bytes:
        for candidate in (server.home / name, server.home / "sub" / name):
            if candidate.exists():
                return candidate.read_bytes()
        raise FileNotFoundError(name)

    return Backend(
        name=scheme,
        settings=settings,
        put_source=put_source,
        target=lambda name: Target(server.url(name, scheme=scheme)),
        read_back=read_back,
        missing_url=server.url("missing-" + unique(), scheme=scheme),
        slow_url=slow_url,
        flaky=flaky,
        refused=refused,
    )


def _file_backend(root: Path, settings: TransportSettings) -> Backend:
    def put_source(name: str, data: bytes) -> str:
        (root / name).write_bytes(data)
        return f"file://{root / name}"

    def refused(name: str) -> tuple[Target, Callable[[], int]]:
        # Running as root defeats permission bits; a directory in the way is
        # a permanent refusal that works for every user.
        (root / name).mkdir()
        return Target(f"file://{root / name}"), lambda: -1

    return Backend(
        name="file",
        settings=settings,
        put_source=put_source,
        target=lambda name: Target(f"file://{root / 'out' / name}"),
        read_back=lambda name: (root / "out" / name).read_bytes(),
        missing_url=f"file://{root}/missing",
        refused=refused,
    )


def _s3_backend(server: S3TestServer, settings: TransportSettings) -> Backend:
    client = server.client()

    def put_source(name: str, data: bytes) -> str:
        client.put_object(Bucket=server.bucket, Key=f"src/{name}", Body=data)
        return f"s3://{server.bucket}/src/{name}"

    def read_back(name: str) -> bytes:
        body: bytes = client.get_object(Bucket=server.bucket, Key=f"out/{name}")["Body"].read()
        return body

    def refused(name: str) -> tuple[Target, Callable[[], int]]:
        return Target(f"s3://no-such-bucket-{unique()}/{name}"), lambda: -1

    return Backend(
        name="s3",
        settings=settings,
        put_source=put_source,
        target=lambda name: Target(f"s3://{server.bucket}/out/{name}"),
        read_back=read_back,
        missing_url=f"s3://{server.bucket}/missing/{unique()}",
        refused=refused,
    )


@pytest.fixture(params=["http", "https", "ftp", "ftps", "file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, ca_file: Path) -> Backend:
    """Each transport in turn, against its real loopback server."""
    name: str = request.param
    settings = base_settings(tmp_path, ca_file)
    if name in ("http", "https"):
        server = request.getfixturevalue(f"{name}_server")
        return _http_backend(server, settings)
    if name == "ftp":
        slow = request.getfixturevalue("ftp_slow_server")
        return _ftp_backend(request.getfixturevalue("ftp_server"), "ftp", settings, slow)
    if name == "ftps":
        return _ftp_backend(request.getfixturevalue("ftps_server"), "ftps", settings, None)
    if name == "file":
        return _file_backend(tmp_path, settings)
    s3: S3TestServer = request.getfixturevalue("s3_server")
    request.getfixturevalue("s3_env")
    return _s3_backend(s3, dataclasses.replace(settings, s3_endpoint=s3.endpoint))


@pytest.fixture
def settings(tmp_path: Path, ca_file: Path) -> TransportSettings:
    """Loopback-allowed settings with short deadlines and fast retries."""
    return base_settings(tmp_path, ca_file)


@pytest.fixture
async def transports(settings: TransportSettings) -> AsyncIterator[Transports]:
    """A Transports registry over ``settings``, closed after the test."""
    registry = Transports(settings)
    yield registry
    await registry.aclose()
