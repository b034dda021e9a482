"""What ``imgserve submit`` will send, decided before anything is sent (pure but for
reading the preset, the jobs file and the directory listing).

- Sources: a command-line argument with ``://`` is a URL (the daemon reads it); any
  other is a local file (uploaded) or a directory, walked recursively for image
  files (hidden ones skipped): a directory's files in sorted order, then each of
  its subdirectories in sorted order.
- The job: outputs from ``--output`` flags (each URL once per ``--size``), or a
  preset TOML that is a ``POST /jobs`` job without its source (docs/client.md);
  ``--jobs FILE`` gives whole jobs, one JSON object a line, sent as they are.
- ``--resume`` keys: a job's Idempotency-Key is derived from its source (the URL,
  or the file's name and a hash of its bytes) and the job itself, so the same
  command run again gets the first run's jobs back instead of new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgserve.client._protocol import is_url

IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "jpe", "png", "webp", "gif", "tif", "tiff", "heic", "heif", "avif", "svg"}
)
"""What a walked directory contributes: the source formats imgserve reads."""
KEY_PREFIX = "imgserve-submit-1-"
_SIZE = re.compile(r"(?P<w>\d+)?(?:x(?P<h>\d+)?)?")


class PlanError(ValueError):
    """The command cannot be turned into jobs (exit 2): the message says why."""


@dataclass(frozen=True)
class Item:
    """One job to submit. ``source`` is a URL or a local path; ``job`` is the job
    object without ``source``; ``name`` is an upload's file name (its
    ``{$basename}``). ``label`` names the item in lines and the summary."""

    label: str
    source: str | Path
    job: Mapping[str, Any]
    name: str | None = None
    error: str | None = None
    """Why the item failed before anything was sent (a directory that cannot be
    listed): the run counts it failed and sends nothing for it."""

    @property
    def is_upload(self) -> bool:
        return isinstance(self.source, Path)


def parse_size(text: str) -> dict[str, int]:
    """``640``, ``640x``, ``x480`` or ``640x480`` as an output's width/height."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or not (match["w"] or match["h"]):
        raise PlanError(f"--size {text!r}: give WIDTH, WIDTHx, xHEIGHT or WIDTHxHEIGHT")
    size: dict[str, int] = {}
    for key, group in (("width", "w"), ("height", "h")):
        if match[group]:
            value = int(match[group])
            if value < 1:
                raise PlanError(f"--size {text!r}: sizes are positive")
            size[key] = value
    return size


def outputs_from_flags(
    urls: Sequence[str], sizes: Sequence[Mapping[str, int]], common: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One output per ``--output`` URL and size, each with the ``common`` options
    (``fit``, ``format``, ``quality``...). With several sizes, each URL must hold a
    size tag, or the sizes would overwrite each other."""
    if not sizes:
        raise PlanError("--output needs a size: --width, --height or --size WxH")
    if len(sizes) > 1:
        for url in urls:
            if "{$width}" not in url and "{$height}" not in url:
                raise PlanError(
                    f"--output {url!r}: with several sizes, the URL needs {{$width}} or "
                    "{$height}, or every size would be written to the same place"
                )
    return [{"url": url, **size, **common} for url in urls for size in sizes]


def load_preset(path: Path) -> dict[str, Any]:
    """A preset: a TOML file holding a ``POST /jobs`` job without ``source``
    (``[[outputs]]`` tables, and ``placeholder``, ``priority``, ``metadata``,
    ``webhook``), checked only for its shape here; the daemon checks the rest."""
    try:
        with path.open("rb") as fh:
            preset = tomllib.load(fh)
    except OSError as exc:
        raise PlanError(f"--preset {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"--preset {path}: {exc}") from exc
    if "source" in preset:
        raise PlanError(f"--preset {path}: has a source; sources come from the command line")
    outputs = preset.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        raise PlanError(f"--preset {path}: needs [[outputs]] tables (at least one)")
    return preset


def load_jobs(lines: Iterable[str], where: str) -> list[Item]:
    """A jobs file: one ``POST /jobs`` JSON job a line (blank lines and lines
    starting with ``#`` skipped), each naming its ``source`` URL."""
    items = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            job = json.loads(text)
        except ValueError as exc:
            raise PlanError(f"{where}:{number}: not JSON: {exc}") from exc
        if not isinstance(job, dict) or not isinstance(job.get("source"), str):
            raise PlanError(f"{where}:{number}: a job object with a source URL, please")
        source = job.pop("source")
        if not is_url(source):
            raise PlanError(
                f"{where}:{number}: source {source[:80]!r} is not a URL: a jobs file's "
                "sources are URLs (give local files as SOURCEs)"
            )
        items.append(Item(label=source, source=source, job=job))
    return items


def walk(arguments: Sequence[str]) -> Iterator[tuple[str, Path | str | OSError]]:
    """Each source the arguments name: (label, URL or path). A directory gives its
    image files, recursively (its files, then its subdirectories, each sorted),
    hidden files and directories skipped, and the error of each subdirectory that
    cannot be listed; a file named on the command line is sent whatever its
    extension."""
    for argument in arguments:
        if is_url(argument):
            yield argument, argument
            continue
        path = Path(argument)
        if path.is_dir():
            unlisted: list[OSError] = []
            for root, dirs, files in os.walk(path, onerror=unlisted.append):
                while unlisted:
                    error = unlisted.pop(0)
                    yield str(error.filename), error
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    suffix = name.rpartition(".")[2].lower() if "." in name else ""
                    if not name.startswith(".") and suffix in IMAGE_EXTENSIONS:
                        found = Path(root) / name
                        yield str(found), found
            for error in unlisted:  # (the last directory walked)
                yield str(error.filename), error
        elif path.is_file():
            yield argument, path
        else:
            raise PlanError(f"{argument}: no such file or directory (a URL needs its scheme)")


def items_for(
    arguments: Sequence[str], job: Mapping[str, Any], *, name_from_path: bool = False
) -> list[Item]:
    """An item per source, each with ``job``. Two uploads with the same file name
    would have the same ``{$basename}``, so their outputs the same URLs: refused,
    unless ``name_from_path`` names each upload by its path below the directory
    walked (``2019/a.jpg`` is sent as ``2019-a.jpg``)."""
    items = []
    for argument in arguments:
        base = Path(argument) if not is_url(argument) and Path(argument).is_dir() else None
        for label, source in walk([argument]):
            if isinstance(source, OSError):
                error = f"cannot list {label}: {source.strerror}"
                items.append(Item(label=label, source=Path(label), job=job, error=error))
                continue
            name = None
            if isinstance(source, Path):
                name = source.name
                if name_from_path and base is not None:
                    name = "-".join(source.relative_to(base).parts)
            items.append(Item(label=label, source=source, job=job, name=name))
    _refuse_same_names(items)
    return items


def _refuse_same_names(items: Sequence[Item]) -> None:
    counts = Counter(item.name for item in items if item.name is not None)
    twice = sorted(name for name, count in counts.items() if count > 1)
    if twice:
        shown = ", ".join(twice[:5]) + (f" and {len(twice) - 5} more" if len(twice) > 5 else "")
        raise PlanError(
            f"{len(twice)} file names are used more than once ({shown}): their outputs would "
            "overwrite each other; pass --name-from-path, or submit each directory apart"
        )


def resume_key(item: Item, data: bytes | None) -> str:
    """The Idempotency-Key of ``item`` under ``--resume``: the same source (URL, or
    file name and content) and job give the same key, on any machine."""
    digest = hashlib.sha256(KEY_PREFIX.encode())
    if data is None:
        digest.update(b"\0url\0" + str(item.source).encode())
    else:
        digest.update(b"\0file\0" + (item.name or "").encode() + b"\0")
        digest.update(hashlib.sha256(data).digest())
    digest.update(b"\0" + json.dumps(item.job, sort_keys=True, separators=(",", ":")).encode())
    return KEY_PREFIX + digest.hexdigest()[:48]


def retry_key(key: str, failed_job_id: str) -> str:
    """The key of a resumed job's next try after its earlier try failed: derived
    from that try, so the run after this one finds this try again."""
    return f"{key}.{failed_job_id[:12]}"


@dataclass
class Tally:
    """How the jobs of a run ended, for the progress line and the summary."""

    total: int
    done: int = 0
    skipped: int = 0
    """Ended ``done`` in an earlier run (``--resume``): nothing new was submitted."""
    failed: int = 0
    cancelled: int = 0
    failures: list[tuple[str, int, str]] = field(default_factory=list)
    """(label, code, detail) of each failure, in the order they came."""

    @property
    def finished(self) -> int:
        return self.done + self.skipped + self.failed + self.cancelled

    def by_code(self) -> list[tuple[int, int, str, str]]:
        """(code, count, first detail, first label) per failure code, most common first."""
        counts: Counter[int] = Counter(code for _, code, _ in self.failures)
        first: dict[int, tuple[str, str]] = {}
        for label, code, detail in self.failures:
            first.setdefault(code, (detail, label))
        return [(code, n, *first[code]) for code, n in counts.most_common()]
