"""file://: read and write local files inside the configured roots.

Off until ``settings.file_roots`` is set (FileSchemeDisabled, 402). URL forms:
``file:///abs/path`` and ``file://localhost/abs/path``; any other host is a
malformed URL (URLInvalid, 124). The path is percent-decoded once; a ``..``
segment (encoded or not) is refused outright (PathOutsideRoots, 403), then the
path is resolved with realpath and must lie inside a root, so a symlink that
leads out is refused too. Only regular files are read or replaced: FIFOs,
devices, directories and anything under /proc, /sys or /dev are
NotARegularFile (404); files are opened with O_NONBLOCK and checked with
fstat on the open descriptor, so a FIFO cannot hang a worker.

Uploads write a temporary file in the target's directory and rename it over
the target (``os.replace``), so readers see the old or the new file, never a
partial one. Missing directories below the root are created.

Blocking file work runs on the transport's own thread pool (threads.py,
``file_threads`` threads); OSErrors become outcomes by errno (outcomes.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from imgserve.config import TransportSettings
from imgserve.errors import FileSchemeDisabled, NotARegularFile, PathOutsideRoots, URLInvalid
from imgserve.transports import outcomes
from imgserve.transports.base import Charge, Chunks, HopCheck, Target, Transport
from imgserve.transports.threads import BlockingExecutor
from imgserve.urls import redact_url

_PSEUDO_FS = ("/proc", "/sys", "/dev")
_CHUNK_BYTES = 1024 * 1024


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class FileTransport(Transport):
    """Local files under ``settings.file_roots``."""

    schemes = ("file",)

    def __init__(self, settings: TransportSettings) -> None:
        super().__init__(settings)
        self._roots = tuple(os.path.realpath(root) for root in settings.file_roots)
        self._threads = BlockingExecutor("file", settings.file_threads)

    async def aclose(self) -> None:
        self._threads.close()

    # --- paths --------------------------------------------------------------------

    def _lexical_path(self, url: str) -> str:
        """The absolute, decoded path a file:// URL names, before resolving links."""
        if not self._roots:
            raise FileSchemeDisabled("set --file-root (IMGSERVE_FILE_ROOT) to enable file://")
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise URLInvalid(f"malformed URL {redact_url(url)}") from exc
        if parts.scheme.lower() != "file":
            raise URLInvalid(f"not a file:// URL: {redact_url(url)}")
        if parts.netloc.lower() not in ("", "localhost"):
            raise URLInvalid(f"file:// URL with a host other than localhost: {redact_url(url)}")
        if parts.query or parts.fragment:
            raise URLInvalid(f"file:// URL with a query or fragment: {redact_url(url)}")
        path = unquote(parts.path, errors="strict")
        if "\x00" in path or not path.startswith("/"):
            raise URLInvalid(f"file:// URL without an absolute path: {redact_url(url)}")
        if ".." in path.split("/"):
            raise PathOutsideRoots(f"'..' in {redact_url(url)}")
        return path

    def _check_inside(self, real: str, url: str) -> None:
        if not any(_inside(real, root) for root in self._roots):
            raise PathOutsideRoots(f"{redact_url(url)} resolves outside the file roots")
        if any(_inside(real, pseudo) for pseudo in _PSEUDO_FS):
            raise NotARegularFile(f"{redact_url(url)} is on a pseudo file system")

    # --- download -----------------------------------------------------------------

    async def download(
        self, url: str, charge: Charge | None = None, hop_check: HopCheck | None = None
    ) -> bytes:
        path = self._lexical_path(url)
        timeout_s = self.settings.download_timeout_s
        with outcomes.translated(outcomes.DOWNLOAD, url):
            try:
                return await self._threads.run(
                    timeout_s, lambda _deadline: self._read(path, url, charge)
                )
            except TimeoutError as exc:
                raise outcomes.Timeout(f"not read within {timeout_s}s") from exc

    def _read(self, path: str, url: str, charge: Charge | None = None) -> bytes:
        real = os.path.realpath(path)
        self._check_inside(real, url)
        limit = self.settings.max_download_bytes
        try:
            # O_NOFOLLOW: realpath removed every link, so a link here means the
            # path was swapped after the check.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                raise NotARegularFile(f"{redact_url(url)} is not a regular file") from exc
            raise  # translated by errno (outcomes.py)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotARegularFile(f"{redact_url(url)} is not a regular file")
            if info.st_size > limit:
                raise outcomes.TooLarge(f"{info.st_size} bytes > {limit}")
            chunks = Chunks(limit, charge)  # the limit again: the file may grow meanwhile
            while chunk := os.read(fd, _CHUNK_BYTES):
                chunks.add(chunk)
            return chunks.join()
        finally:
            os.close(fd)

    # --- upload -------------------------------------------------------------------

    async def upload_once(self, target: Target, data: bytes, content_type: str) -> None:
        path = self._lexical_path(target.url)
        timeout_s = self.settings.upload_timeout_s
        with outcomes.translated(outcomes.UPLOAD, target.url):
            try:
                await self._threads.run(
                    timeout_s,
                    lambda _deadline: self._write(path, target.url, data, target.durable),
                )
            except TimeoutError as exc:
                raise outcomes.Timeout(f"not written within {timeout_s}s") from exc

    def _write(self, path: str, url: str, data: bytes, durable: bool = True) -> None:
        directory, name = os.path.split(path)
        if not name:
            raise URLInvalid(f"file:// target names a directory: {redact_url(url)}")
        # Check the deepest existing ancestor, create the rest below it, check
        # again: new directories cannot be links, old ones were resolved.
        existing = directory
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        self._check_inside(os.path.realpath(existing), url)
        os.makedirs(directory, exist_ok=True)
        real_dir = os.path.realpath(directory)
        self._check_inside(real_dir, url)
        final = os.path.join(real_dir, name)
        try:
            info = os.lstat(final)
        except FileNotFoundError:
            pass
        else:
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                raise NotARegularFile(f"{redact_url(url)} exists and is not a regular file")
        tmp_name = ""
        try:
            fd, tmp_name = tempfile.mkstemp(dir=real_dir, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            os.chmod(tmp_name, 0o644)
            # A link at the final name is replaced itself, never followed.
            os.replace(tmp_name, final)
            tmp_name = ""
        finally:
            if tmp_name:
                with contextlib.suppress(OSError):
                    Path(tmp_name).unlink()
