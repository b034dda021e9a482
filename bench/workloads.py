"""The benchmark's workloads and how each request of one is spelled for every system.

Pure: no I/O, no pyvips. Request ``i`` of a workload has the same source image
and the same size for the bare pyvips limit, imgserve and thumbor, so the three
do identical work. The width grows by 1 px per request (cycling through
``WIDTH_SPREAD`` values) and the source rotates through several images, so no
cache keyed on source or size can help; the source URL also carries the
request number, so no URL-keyed cache can either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

SourceKind = Literal["jpeg", "png", "svg"]

# Encoder settings shared by all three systems (stated in README.md).
JPEG_QUALITY = 80
WEBP_QUALITY = 80
PNG_COMPRESSION = 6
PROGRESSIVE_JPEG = False
# Widths vary over this many consecutive pixel values (a prime, so the size cycle
# and the source-image cycle do not line up).
WIDTH_SPREAD = 29
# "No limit" for the free dimension of a width-only thumbnail (libvips' max coord).
UNBOUNDED = 10_000_000


@dataclass(frozen=True)
class Workload:
    """One operation on one kind of source."""

    name: str
    source_kind: SourceKind
    width: int
    height: int | None
    """None: width only, keep the aspect ratio."""
    gravity: Literal["centre", "smart"] | None
    """Set when both sides are given: cover the box, then crop."""
    out_ext: Literal["jpg", "webp", "png"]
    operation: Literal["resize", "rasterize"] = "resize"
    jpeg: bool = False
    """Counts as a JPEG workload for the latency target."""


WORKLOADS: tuple[Workload, ...] = (
    Workload("jpeg-fill-200x120", "jpeg", 200, 120, "centre", "jpg", jpeg=True),
    Workload("jpeg-fit-1200", "jpeg", 1200, None, None, "jpg", jpeg=True),
    Workload("jpeg-smart-400", "jpeg", 400, 400, "smart", "jpg", jpeg=True),
    Workload("jpeg-webp-512", "jpeg", 512, None, None, "webp", jpeg=True),
    Workload("png-200", "png", 200, None, None, "png"),
    Workload("svg-800", "svg", 800, None, None, "png", operation="rasterize"),
)
BY_NAME: dict[str, Workload] = {w.name: w for w in WORKLOADS}


@dataclass(frozen=True)
class Request:
    """Request ``index`` of a workload: which source, which size."""

    index: int
    source: str
    """File name of the source (as served by the source server)."""
    width: int
    height: int | None


def request(workload: Workload, sources: Sequence[str], index: int) -> Request:
    """The ``index``-th request of ``workload`` over ``sources`` (deterministic)."""
    if not sources:
        raise ValueError(f"no sources for {workload.name}")
    return Request(
        index=index,
        source=sources[index % len(sources)],
        width=workload.width + index % WIDTH_SPREAD,
        height=workload.height,
    )


def source_path(req: Request, tag: str) -> str:
    """The URL path the source server maps back to ``req.source``.

    ``tag`` names the phase (system and round); with the request number it
    makes every source URL of a run unique.
    """
    return f"/src/{tag}-{req.index}/{req.source}"


def imgserve_body(
    workload: Workload, req: Request, src_base_url: str, out_dir: str, tag: str
) -> dict[str, Any]:
    """The JSON body of imgserve's ``POST /`` for ``req``."""
    args: dict[str, Any] = {"width": req.width}
    if req.height is not None:
        args["height"] = req.height
    if workload.gravity is not None:
        args["gravity"] = workload.gravity
    if workload.out_ext in ("jpg", "webp"):
        args["quality"] = JPEG_QUALITY if workload.out_ext == "jpg" else WEBP_QUALITY
    return {
        "operationType": workload.operation,
        "srcURL": src_base_url.rstrip("/") + source_path(req, tag),
        "dstURL": (
            f"file://{out_dir.rstrip('/')}/{workload.name}-{tag}-{req.index}"
            "-{$width}x{$height}." + workload.out_ext
        ),
        "args": args,
    }


def thumbor_path(workload: Workload, req: Request, src_host: str, tag: str) -> str:
    """The unsafe thumbor URL path for ``req`` (``src_host`` is ``host:port``)."""
    size = f"{req.width}x{req.height if req.height is not None else 0}"
    parts = ["/unsafe", size]
    if workload.gravity == "smart":
        parts.append("smart")
    filters = []
    if workload.out_ext == "jpg":
        filters.append(f"quality({JPEG_QUALITY})")
    elif workload.out_ext == "webp":
        filters += [f"quality({WEBP_QUALITY})", "format(webp)"]
    else:
        filters.append("format(png)")
    parts.append("filters:" + ":".join(filters))
    return "/".join(parts) + "/" + src_host + source_path(req, tag)


def expected_size(
    workload: Workload, req: Request, source_size: tuple[int, int]
) -> tuple[int, int]:
    """The result's width x height for a source of ``source_size`` (for sanity checks)."""
    if req.height is not None:
        return req.width, req.height
    src_w, src_h = source_size
    return req.width, max(1, round(src_h * req.width / src_w))


def select(names: str | None) -> tuple[Workload, ...]:
    """Workloads named in a comma-separated list (all when None or empty)."""
    if not names:
        return WORKLOADS
    picked = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if name not in BY_NAME:
            raise ValueError(f"unknown workload {name!r}; known: {', '.join(BY_NAME)}")
        picked.append(BY_NAME[name])
    return tuple(picked)
