"""A job as imgserve runs it, whichever endpoint took it: one source, its outputs.

Pure: no I/O, no pyvips. 0.2's ``POST /`` (request.py) and ``POST /jobs``
(request_jobs.py) both validate into a JobSpec; planning.py plans one, the
queue stores it (``to_dict``, versioned) and the worker reads it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from imgserve.imaging import formats
from imgserve.imaging.formats import Format
from imgserve.imaging.operations import Operations

VERSION = 1
"""The stored shape of a JobSpec. Records without ``version`` hold 0.2's request
(request.Job.to_dict(), every job queued before jobs v2)."""

FITS = ("cover", "contain", "fill", "inside", "outside")
"""sharp's vocabulary for how an output fills a box of both sides (docs/api.md)."""

RGBA = tuple[int, int, int, int]


@dataclass(frozen=True)
class OutputRequest:
    """One output a job asks for: its destination and how to make it."""

    url: str
    """The destination template (0.2's tags unfilled; ``URL:filename`` for a form)."""
    width: int | None = None
    height: int | None = None
    scale: float | None = None
    """SVG sources only: multiply the drawing's own size (instead of width/height)."""
    fit: str = "cover"
    """One of FITS; applies when both sides are given."""
    gravity: str = "centre"
    enlarge: bool = False
    format: Format | None = None
    """None: the format the destination's extension names."""
    quality: int | None = None
    keep_metadata: bool = False
    background: RGBA | None = None
    """contain's padding and the colour alpha is flattened onto; None: transparent
    padding where the format holds alpha, else white."""
    form_field: str | None = None
    """The form field of an http(s) ``URL:filename`` form upload."""
    refuse_small: bool = False
    """0.2's rule: a raster source smaller than the box (not enlarging) is refused
    (203) instead of being kept at its own size."""
    ops: Operations = field(default_factory=Operations)
    """crop, rotate, flip, flop, blur, sharpen, grayscale, pad, watermark."""
    blurhash_components: tuple[int, int] = (4, 3)
    """The BlurHash's components across and down (1-9 each) in the output's preview."""

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["format"] = self.format.value if self.format is not None else None
        data["background"] = list(self.background) if self.background is not None else None
        data["ops"] = self.ops.to_dict() if self.ops.any else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputRequest:
        values = _known(cls, data)
        values["ops"] = Operations.from_dict(values.get("ops"))
        if values.get("blurhash_components") is not None:
            x, y = values["blurhash_components"]
            values["blurhash_components"] = (x, y)
        if values.get("format") is not None:
            values["format"] = Format(values["format"])
        if values.get("background") is not None:
            r, g, b, a = values["background"]
            values["background"] = (r, g, b, a)
        return cls(**values)


@dataclass(frozen=True)
class JobSpec:
    """What a job reads and where each of its outputs goes."""

    source_url: str | None
    """None when the caller sent the source bytes (the queue keeps the only copy)."""
    source_name: str
    """The source's file name, which gives ``{$basename}`` and ``{$extension}``."""
    outputs: tuple[OutputRequest, ...]
    operation: str | None = None
    """0.2's operationType ("resize" takes raster sources, "rasterize" SVG); None
    (``POST /jobs``): any source, rendered as what it is."""
    placeholder: bool = True
    """Upload each output's placeholder before the reply."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The caller's own small JSON object, returned with the job."""
    webhook: str | None = None
    """Where the job's completion event goes (None: the daemon's ``webhook_url``)."""
    priority: str = "interactive"
    """queue.base.PRIORITIES: a batch job never delays a waiting interactive one."""

    @property
    def basename(self) -> str:
        """The source file name without its extension."""
        stem, dot, _ext = self.source_name.rpartition(".")
        return stem if dot and stem else self.source_name

    @property
    def extension(self) -> str:
        return formats.extension_of(self.source_name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "source_url": self.source_url,
            "source_name": self.source_name,
            "outputs": [out.to_dict() for out in self.outputs],
            "operation": self.operation,
            "placeholder": self.placeholder,
            "metadata": self.metadata,
            "webhook": self.webhook,
            "priority": self.priority,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Read a stored spec, or 0.2's stored request; fields a later release
        added are ignored."""
        if "version" not in data:
            return from_v02(data)
        values = _known(cls, data)
        values["outputs"] = tuple(OutputRequest.from_dict(out) for out in data["outputs"])
        return cls(**values)


def source_name_of(url: str) -> str:
    """The file name a source URL gives (its path's last segment, raw)."""
    return urlsplit(url).path.rsplit("/", 1)[-1]


def from_v02(job: dict[str, Any]) -> JobSpec:
    """0.2's request (request.Job.to_dict()) as a job with one output."""
    rasterize = job["operation"] == "rasterize"
    out = OutputRequest(
        url=job["dst_template"],
        width=job.get("width"),
        height=job.get("height"),
        scale=job.get("scale"),
        # 0.2: resize covers the box and crops; rasterize fits the drawing inside it.
        fit="inside" if rasterize else "cover",
        gravity=job.get("gravity", "centre"),
        enlarge=job.get("enlarge", False),
        quality=job.get("quality"),
        keep_metadata=job.get("keep_metadata", False),
        form_field=job.get("form_field"),
        refuse_small=not rasterize,
    )
    src_url = job["src_url"]
    return JobSpec(
        source_url=src_url,
        source_name=source_name_of(src_url),
        outputs=(out,),
        operation=job["operation"],
    )


def _known(cls: type[Any], data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in data.items() if key in names}
