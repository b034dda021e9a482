"""The benchmark's workloads and how each request of one is spelled for every system.

Pure: no I/O, no pyvips. Request ``i`` of a workload has the same source image
and the same size for the bare pyvips limit, imgserve and thumbor, so the three
do identical work. The width grows by 1 px per request (cycling through
``WIDTH_SPREAD`` values) and the source rotates through several images, so no
cache keyed on source or size can help; the source URL also carries the
request number, so no URL-keyed cache can either.

Most workloads make one output per request. ``renditions`` makes five of each
source (four widths and a square avatar): imgserve takes them as one
``POST /jobs``, the limit makes them with five ``thumbnail_buffer`` calls and
thumbor with five requests; every output's width grows with the request number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
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
class Output:
    """One image a request makes from its source."""

    width: int
    height: int | None
    """None: width only, keep the aspect ratio."""
    gravity: Literal["centre", "smart"] | None
    """Set when both sides are given: cover the box, then crop."""
    out_ext: Literal["jpg", "webp", "png"]


@dataclass(frozen=True)
class Workload:
    """One operation on one kind of source: one output per request, or several."""

    name: str
    source_kind: SourceKind
    outputs: tuple[Output, ...]
    operation: Literal["resize", "rasterize"] = "resize"
    jpeg: bool = False
    """Counts as a JPEG workload for the latency target."""

    @property
    def renditions(self) -> bool:
        """Several outputs of each source: imgserve takes a request as one
        ``POST /jobs``, the limit and thumbor make the outputs one by one."""
        return len(self.outputs) > 1


def _single(
    name: str,
    kind: SourceKind,
    width: int,
    height: int | None,
    gravity: Literal["centre", "smart"] | None,
    out_ext: Literal["jpg", "webp", "png"],
    **extra: Any,
) -> Workload:
    return Workload(name, kind, (Output(width, height, gravity, out_ext),), **extra)


RENDITIONS = Workload(
    "renditions",
    "jpeg",
    (
        Output(2048, None, None, "jpg"),
        Output(1280, None, None, "jpg"),
        Output(640, None, None, "jpg"),
        Output(320, None, None, "jpg"),
        Output(200, 200, "centre", "jpg"),
    ),
)
"""What a web application makes of one uploaded photo (issue #12)."""

WORKLOADS: tuple[Workload, ...] = (
    _single("jpeg-fill-200x120", "jpeg", 200, 120, "centre", "jpg", jpeg=True),
    _single("jpeg-fit-1200", "jpeg", 1200, None, None, "jpg", jpeg=True),
    _single("jpeg-smart-400", "jpeg", 400, 400, "smart", "jpg", jpeg=True),
    _single("jpeg-webp-512", "jpeg", 512, None, None, "webp", jpeg=True),
    _single("png-200", "png", 200, None, None, "png"),
    _single("svg-800", "svg", 800, None, None, "png", operation="rasterize"),
    RENDITIONS,
)
BY_NAME: dict[str, Workload] = {w.name: w for w in WORKLOADS}


@dataclass(frozen=True)
class Request:
    """Request ``index`` of a workload: which source, which outputs at which sizes."""

    index: int
    source: str
    """File name of the source (as served by the source server)."""
    outputs: tuple[Output, ...]
    """The workload's outputs with this request's widths."""


def request(workload: Workload, sources: Sequence[str], index: int) -> Request:
    """The ``index``-th request of ``workload`` over ``sources`` (deterministic)."""
    if not sources:
        raise ValueError(f"no sources for {workload.name}")
    grow = index % WIDTH_SPREAD
    return Request(
        index=index,
        source=sources[index % len(sources)],
        outputs=tuple(replace(out, width=out.width + grow) for out in workload.outputs),
    )


def source_path(req: Request, tag: str) -> str:
    """The URL path the source server maps back to ``req.source``.

    ``tag`` names the phase (system and round); with the request number it
    makes every source URL of a run unique.
    """
    return f"/src/{tag}-{req.index}/{req.source}"


def _quality(out: Output) -> dict[str, int]:
    if out.out_ext == "jpg":
        return {"quality": JPEG_QUALITY}
    if out.out_ext == "webp":
        return {"quality": WEBP_QUALITY}
    return {}


def imgserve_body(
    workload: Workload, req: Request, src_base_url: str, out_dir: str, tag: str
) -> dict[str, Any]:
    """The JSON body of imgserve's ``POST /`` (0.2's contract) for ``req``."""
    if workload.renditions:
        raise ValueError(f"{workload.name} has several outputs: it goes to POST /jobs")
    (out,) = req.outputs
    args: dict[str, Any] = {"width": out.width}
    if out.height is not None:
        args["height"] = out.height
    if out.gravity is not None:
        args["gravity"] = out.gravity
    args.update(_quality(out))
    return {
        "operationType": workload.operation,
        "srcURL": src_base_url.rstrip("/") + source_path(req, tag),
        "dstURL": (
            f"file://{out_dir.rstrip('/')}/{workload.name}-{tag}-{req.index}"
            "-{$width}x{$height}." + out.out_ext
        ),
        "args": args,
    }


def output_name(workload: Workload, req: Request, k: int, tag: str) -> str:
    """The file name output ``k`` of ``req`` gets in ``POST /jobs`` (unique per run)."""
    out = req.outputs[k]
    return f"{workload.name}-{tag}-{req.index}-{k}-w{out.width}.{out.out_ext}"


def jobs_body(
    workload: Workload,
    req: Request,
    src_base_url: str,
    out_dir: str,
    tag: str,
    placeholder: bool,
) -> dict[str, Any]:
    """The JSON body of imgserve's ``POST /jobs`` for ``req``: one source, every output.

    Names are spelled out (no ``{$tags}``) so the client knows them before the
    reply. A box gets ``fit: cover``; its gravity is imgserve's default, centre.
    """
    outputs = []
    for k, out in enumerate(req.outputs):
        entry: dict[str, Any] = {
            "url": f"file://{out_dir.rstrip('/')}/{output_name(workload, req, k, tag)}",
            "width": out.width,
        }
        if out.height is not None:
            entry["height"] = out.height
            entry["fit"] = "cover"
            if out.gravity not in (None, "centre"):
                entry["gravity"] = out.gravity
        entry.update(_quality(out))
        outputs.append(entry)
    return {
        "source": src_base_url.rstrip("/") + source_path(req, tag),
        "outputs": outputs,
        "placeholder": placeholder,
    }


def thumbor_paths(workload: Workload, req: Request, src_host: str, tag: str) -> list[str]:
    """The unsafe thumbor URL paths for ``req``, one per output (``src_host`` is
    ``host:port``). Both sides given and no ``smart``: thumbor's fill-crop, centred."""
    return [_thumbor_path(out, req, src_host, tag) for out in req.outputs]


def _thumbor_path(out: Output, req: Request, src_host: str, tag: str) -> str:
    size = f"{out.width}x{out.height if out.height is not None else 0}"
    parts = ["/unsafe", size]
    if out.gravity == "smart":
        parts.append("smart")
    filters = []
    if out.out_ext == "jpg":
        filters.append(f"quality({JPEG_QUALITY})")
    elif out.out_ext == "webp":
        filters += [f"quality({WEBP_QUALITY})", "format(webp)"]
    else:
        filters.append("format(png)")
    parts.append("filters:" + ":".join(filters))
    return "/".join(parts) + "/" + src_host + source_path(req, tag)


def expected_size(out: Output, source_size: tuple[int, int]) -> tuple[int, int]:
    """The result's width x height for a source of ``source_size`` (for sanity checks)."""
    if out.height is not None:
        return out.width, out.height
    src_w, src_h = source_size
    return out.width, max(1, round(src_h * out.width / src_w))


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
