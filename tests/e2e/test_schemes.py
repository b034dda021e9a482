"""0.2's example request through the real daemon over every scheme, source and destination."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon, decode, jpeg, resize, serve
from tests.servers import FTP_PASSWORD

pytestmark = pytest.mark.slow


@dataclass
class Scheme:
    src: str
    dst: str
    read: Callable[[str], bytes]
    """Reads back an uploaded object by its path under the destination."""
    flags: list[str]


def _scheme(name: str, request: pytest.FixtureRequest, out_dir: Path, source: bytes) -> Scheme:
    if name in ("http", "https"):
        server = request.getfixturevalue(f"{name}_server")
        ca_file = request.getfixturevalue("ca_file")
        return Scheme(
            src=serve(server, f"{name}/photos/Ex.jpg", source),
            dst=server.url(f"/files/{name}/thumbs/{{$width}}-{{$basename}}.{{$ext}}"),
            read=lambda path: bytes(server.state.files[f"{name}/thumbs/{path}"]),
            flags=["--ca-file", str(ca_file)],
        )
    if name in ("ftp", "ftps"):
        server = request.getfixturevalue(f"{name}_server")
        ca_file = request.getfixturevalue("ca_file")
        (server.home / "photos").mkdir(exist_ok=True)
        (server.home / "photos/Ex.jpg").write_bytes(source)
        return Scheme(
            src=server.url("photos/Ex.jpg", scheme=name),
            dst=server.url("thumbs/{$width}-{$basename}.{$ext}", scheme=name),
            read=lambda path: (server.home / "thumbs" / path).read_bytes(),
            flags=["--ca-file", str(ca_file)],
        )
    if name == "file":
        (out_dir / "photos").mkdir(parents=True, exist_ok=True)
        (out_dir / "photos/Ex.jpg").write_bytes(source)
        return Scheme(
            src=f"file://{out_dir}/photos/Ex.jpg",
            dst=f"file://{out_dir}/thumbs/{{$width}}-{{$basename}}.{{$ext}}",
            read=lambda path: (out_dir / "thumbs" / path).read_bytes(),
            flags=[],
        )
    s3 = request.getfixturevalue("s3_server")
    request.getfixturevalue("s3_env")
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="photos/Ex.jpg", Body=source)

    def read(path: str) -> bytes:
        return bytes(client.get_object(Bucket=s3.bucket, Key=f"thumbs/{path}")["Body"].read())

    return Scheme(
        src=f"s3://{s3.bucket}/photos/Ex.jpg",
        dst=f"s3://{s3.bucket}/thumbs/{{$width}}-{{$basename}}.{{$ext}}",
        read=read,
        flags=["--s3-endpoint", s3.endpoint, "--s3-region", "us-east-1"],
    )


@pytest.mark.parametrize("name", ["http", "https", "ftp", "ftps", "file", "s3"])
def test_02_example_over_scheme(
    name: str, start_daemon: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Source and destination over one scheme: reply, placeholder first, then the result."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    scheme = _scheme(name, request, out_dir, jpeg(800, 600, b"IMGSERVE-FAULT-DELAY=1"))
    daemon: Daemon = start_daemon(*scheme.flags)
    assert daemon.out_dir == out_dir

    reply = daemon.post(resize(scheme.src, scheme.dst, width=200, height=120))
    assert reply.status == 200, reply.body
    assert reply.body["dstURL"].endswith("thumbs/200-Ex.jpg")
    assert FTP_PASSWORD not in reply.body["dstURL"]

    placeholder = decode(scheme.read("200-Ex.jpg"))
    assert (placeholder.width, placeholder.height) == (200, 120)
    assert all(abs(v - 238) <= 3 for v in placeholder(1, 1)[:3])

    status = daemon.wait(reply.body["jobId"])
    assert status["state"] == "done", status
    result = decode(scheme.read("200-Ex.jpg"))
    assert (result.width, result.height) == (200, 120)
    assert result.get("vips-loader").startswith("jpegload")
    assert result(5, 5)[0] > 180  # the red quadrant, not the grey placeholder
