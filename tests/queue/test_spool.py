"""The embedded queue's source spool: exact copies, files reused, bounded leftovers."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from imgserve import errors
from imgserve.queue import open_queue, spool
from imgserve.queue.base import JobRecord
from imgserve.queue.spool import Spool


def test_write_stores_the_exact_bytes(tmp_path: Path) -> None:
    """A written source reads back byte for byte under the job's name, with no temp file left."""
    store = Spool(tmp_path / "spool")
    data = os.urandom(300_000)
    store.write("a", data)
    assert store.path("a").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["a.src"]


def test_a_finished_jobs_file_is_written_over_by_the_next(tmp_path: Path) -> None:
    """The next job reuses the file (same inode) and reads exactly its own, shorter, bytes."""
    store = Spool(tmp_path / "spool")
    store.write("a", b"A" * 100_000)
    inode = store.path("a").stat().st_ino
    store.release("a")
    assert not store.path("a").exists()
    store.write("b", b"B" * 1000)
    assert store.path("b").stat().st_ino == inode
    assert store.path("b").read_bytes() == b"B" * 1000
    store.write("c", b"C" * 10)  # nothing free: a new file
    assert store.path("c").stat().st_ino != inode


def test_only_a_few_small_files_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past KEEP_FREE files, or above KEEP_MAX_BYTES, a finished job's file is deleted."""
    monkeypatch.setattr(spool, "KEEP_FREE", 2)
    monkeypatch.setattr(spool, "KEEP_MAX_BYTES", 50)
    store = Spool(tmp_path / "spool")
    for name in "abcd":
        store.write(name, b"x" * 10)
    store.write("big", b"x" * 51)
    for name in ["big", "a", "b", "c", "d"]:
        store.release(name)
    left = sorted(p.name for p in (tmp_path / "spool").iterdir())
    assert len(left) == 2 and all(name.startswith("free-") for name in left)


def test_tidy_keeps_unfinished_jobs_and_frees_the_rest(tmp_path: Path) -> None:
    """On open, files of unfinished jobs stay; leftovers (an interrupted write, a
    finished job's file) become free files that the next write reuses."""
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "live.src").write_bytes(b"live")
    (directory / "ended.src").write_bytes(b"ended")
    (directory / "cut.tmp").write_bytes(b"half")
    store = Spool(directory)
    store.tidy({"live"})
    names = sorted(p.name for p in directory.iterdir())
    assert names[-1] == "live.src" and len(names) == 3
    assert all(name.startswith("free-") for name in names[:-1])
    store.write("new", b"fresh")
    store.write("newer", b"fresher")
    assert sorted(p.name for p in directory.iterdir()) == ["live.src", "new.src", "newer.src"]
    assert store.path("newer").read_bytes() == b"fresher"


def _record() -> JobRecord:
    return JobRecord(
        id=uuid.uuid4().hex,
        job={"operation": "resize", "src_url": "http://h/x.jpg"},
        plan={"result": [10, 10]},
        dst_url="file:///tmp/x.jpg",
    )


async def test_a_spool_that_cannot_be_written_refuses_the_job(tmp_path: Path) -> None:
    """When the source cannot be stored, put raises QueueUnavailable (503, code 608)
    and stores nothing, rather than accept a job it could not run after a crash."""
    (tmp_path / "spool").write_text("not a directory")
    queue = open_queue(None, tmp_path)
    try:
        with pytest.raises(errors.QueueUnavailable) as caught:
            await queue.put(_record(), b"source", max_active=10)
        assert caught.value.code == 608 and "source spool" in caught.value.detail
        assert (await queue.counts())["queued"] == 0
    finally:
        await queue.close()


async def test_the_queue_reuses_the_files_of_finished_jobs(tmp_path: Path) -> None:
    """Through the SQLite queue: a done job's source file carries the next job's source,
    and a reopened queue treats a finished job's leftover file as free."""
    queue = open_queue(None, tmp_path)
    first, second = _record(), _record()
    await queue.put(first, b"first source", max_active=10)
    inode = (tmp_path / "spool" / f"{first.id}.src").stat().st_ino
    claimed = await queue.claim()  # type: ignore[attr-defined]
    assert claimed.id == first.id
    await queue.complete(first.id)
    assert await queue.source(first.id) is None
    await queue.put(second, b"second", max_active=10)
    assert await queue.source(second.id) == b"second"
    assert (tmp_path / "spool" / f"{second.id}.src").stat().st_ino == inode
    await queue.close()

    (tmp_path / "spool" / f"{first.id}.src").write_bytes(b"left behind by a crash")
    reopened = open_queue(None, tmp_path)
    try:
        assert await reopened.recover() == 0  # what the daemon does first
        assert await reopened.source(second.id) == b"second"
        assert await reopened.source(first.id) is None
    finally:
        await reopened.close()
