"""file:// confinement: roots, traversal, symlinks, special files, atomic writes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imgserve.config import TransportSettings
from imgserve.errors import (
    FileSchemeDisabled,
    NotARegularFile,
    PathOutsideRoots,
    URLInvalid,
)
from imgserve.transports import Target, Transports


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The only file root; ``outside`` next to it is not a root."""
    path = tmp_path / "root"
    path.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(b"secret")
    return path


@pytest.fixture
async def files(root: Path, settings: TransportSettings) -> AsyncIterator[Transports]:
    """Transports with ``root`` as the only file root."""
    registry = Transports(dataclasses.replace(settings, file_roots=(root,)))
    yield registry
    await registry.aclose()


async def test_file_scheme_is_off_without_roots(settings: TransportSettings, root: Path) -> None:
    """With no file roots every file:// URL is FileSchemeDisabled."""
    (root / "a.bin").write_bytes(b"a")
    registry = Transports(dataclasses.replace(settings, file_roots=()))
    with pytest.raises(FileSchemeDisabled):
        await registry.download(f"file://{root}/a.bin")
    with pytest.raises(FileSchemeDisabled):
        await registry.upload(Target(f"file://{root}/b.bin"), b"b", "image/png")


async def test_localhost_host_is_accepted(files: Transports, root: Path) -> None:
    """file://localhost/path is the same as file:///path."""
    (root / "a.bin").write_bytes(b"a")
    assert await files.download(f"file://localhost{root}/a.bin") == b"a"


@pytest.mark.parametrize("host", ["example.com", "127.0.0.1", "user@localhost"])
async def test_other_hosts_are_url_invalid(files: Transports, root: Path, host: str) -> None:
    """A file:// URL naming another host is URLInvalid."""
    (root / "a.bin").write_bytes(b"a")
    with pytest.raises(URLInvalid):
        await files.download(f"file://{host}{root}/a.bin")


@pytest.mark.parametrize(
    "suffix",
    [
        "/../outside/secret.txt",
        "/%2e%2e/outside/secret.txt",
        "/%2E%2E/outside/secret.txt",
        "/sub/..%2f..%2foutside/secret.txt",
        "/./../outside/secret.txt",
    ],
)
async def test_traversal_is_refused(files: Transports, root: Path, suffix: str) -> None:
    """'..' segments, plain or percent-encoded, are PathOutsideRoots."""
    (root / "sub").mkdir(exist_ok=True)
    with pytest.raises(PathOutsideRoots):
        await files.download(f"file://{root}{suffix}")
    with pytest.raises(PathOutsideRoots):
        await files.upload(Target(f"file://{root}{suffix}"), b"x", "image/png")
    assert (root.parent / "outside" / "secret.txt").read_bytes() == b"secret"


async def test_absolute_path_outside_roots_is_refused(files: Transports, root: Path) -> None:
    """A path that is simply elsewhere is PathOutsideRoots."""
    with pytest.raises(PathOutsideRoots):
        await files.download(f"file://{root.parent}/outside/secret.txt")


async def test_symlink_escape_is_refused(files: Transports, root: Path) -> None:
    """A symlink inside the root that leads out is refused for reads and writes."""
    (root / "link").symlink_to(root.parent / "outside")
    (root / "file-link").symlink_to(root.parent / "outside" / "secret.txt")
    with pytest.raises(PathOutsideRoots):
        await files.download(f"file://{root}/link/secret.txt")
    with pytest.raises(PathOutsideRoots):
        await files.download(f"file://{root}/file-link")
    with pytest.raises(PathOutsideRoots):
        await files.upload(Target(f"file://{root}/link/new/x.png"), b"x", "image/png")
    assert not (root.parent / "outside" / "new").exists()


async def test_symlink_inside_the_root_is_followed(files: Transports, root: Path) -> None:
    """A symlink that stays inside the root is fine."""
    (root / "real.bin").write_bytes(b"real")
    (root / "alias.bin").symlink_to(root / "real.bin")
    assert await files.download(f"file://{root}/alias.bin") == b"real"


async def test_fifo_is_not_a_regular_file(files: Transports, root: Path) -> None:
    """A FIFO is NotARegularFile at once, without blocking on open."""
    os.mkfifo(root / "fifo")
    with pytest.raises(NotARegularFile):
        await asyncio.wait_for(files.download(f"file://{root}/fifo"), timeout=2.0)
    with pytest.raises(NotARegularFile):
        await asyncio.wait_for(
            files.upload(Target(f"file://{root}/fifo"), b"x", "image/png"), timeout=2.0
        )


async def test_directory_is_not_a_regular_file(files: Transports, root: Path) -> None:
    """Reading a directory is NotARegularFile."""
    (root / "dir").mkdir()
    with pytest.raises(NotARegularFile):
        await files.download(f"file://{root}/dir")


async def test_device_is_not_a_regular_file(settings: TransportSettings) -> None:
    """Devices (and /dev, /proc in general) are refused even inside a root."""
    registry = Transports(dataclasses.replace(settings, file_roots=(Path("/dev"),)))
    with pytest.raises(NotARegularFile):
        await registry.download("file:///dev/null")


async def test_upload_creates_directories_and_leaves_no_temp_files(
    files: Transports, root: Path
) -> None:
    """Missing directories are created; only the final file remains."""
    await files.upload(Target(f"file://{root}/a/b/c/out.png"), b"png", "image/png")
    assert (root / "a" / "b" / "c" / "out.png").read_bytes() == b"png"
    assert os.listdir(root / "a" / "b" / "c") == ["out.png"]
    assert (root / "a" / "b" / "c" / "out.png").stat().st_mode & 0o777 == 0o644


async def test_upload_replaces_a_symlink_instead_of_writing_through(
    files: Transports, root: Path
) -> None:
    """A symlink at the target name is replaced; the file it pointed to is untouched."""
    (root / "out.png").symlink_to(root.parent / "outside" / "secret.txt")
    await files.upload(Target(f"file://{root}/out.png"), b"new", "image/png")
    assert not (root / "out.png").is_symlink()
    assert (root / "out.png").read_bytes() == b"new"
    assert (root.parent / "outside" / "secret.txt").read_bytes() == b"secret"


async def test_percent_encoded_names_are_decoded(files: Transports, root: Path) -> None:
    """%20 in a file:// URL is a space in the file name."""
    (root / "a b.bin").write_bytes(b"spaced")
    assert await files.download(f"file://{root}/a%20b.bin") == b"spaced"


@pytest.mark.parametrize("durable", [True, False])
async def test_only_durable_writes_are_forced_to_disk(
    files: Transports, root: Path, durable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result is fsync'd before the upload returns; a placeholder (durable=False) is not."""
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await files.upload(Target(f"file://{root}/out.png", durable=durable), b"png", "image/png")
    assert (root / "out.png").read_bytes() == b"png"
    assert bool(synced) is durable
