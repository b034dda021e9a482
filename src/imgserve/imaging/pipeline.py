"""The one place that owns the order of the processing steps.

``inspect`` sniffs a source and reads its header (SourceInfo); ``plan_output``
sizes one output from that and a small per-output spec (OutputPlan). Both run
in a planner process before the reply. ``render`` runs on a worker process and
turns the source bytes into one output's bytes: a shrink-on-load, then the
steps of ``STEPS`` in order, then the encoder. ``placeholder`` and
``failure_image`` draw the stand-ins the daemon uploads before and after.

Nothing here knows the request contract or destinations (planning.py joins them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from imgserve import errors
from imgserve.config import ImagingLimits
from imgserve.imaging import formats, geometry, vips
from imgserve.imaging.formats import Format
from imgserve.imaging.geometry import Size

PLACEHOLDER_TEXT = "Image being processed"
FAILURE_TEXT = "Image processing failed"
# "No limit" for the free dimension of a thumbnail driven by the other one.
_UNBOUNDED = 10_000_000


@dataclass(frozen=True)
class SourceInfo:
    """What the source's header says, checked against the operation and the limits."""

    format: Format
    size: Size
    """Upright size of one frame."""
    pages: int
    svg_size: tuple[float, float] | None = None
    """An SVG's exact drawing size (the planning of each output needs it, rendering not)."""

    @property
    def vector(self) -> bool:
        return self.format in formats.VECTOR_SOURCES


@dataclass(frozen=True)
class OutputSpec:
    """What one output asks for, before the source is known."""

    format: Format
    width: int | None = None
    height: int | None = None
    scale: float | None = None
    enlarge: bool = False
    gravity: str = "centre"
    quality: int | None = None
    keep_metadata: bool = False
    fit: str = "cover"
    background: tuple[int, int, int, int] | None = None
    refuse_small: bool = False


@dataclass(frozen=True)
class OutputPlan:
    """One output as it will be rendered, known before any pixel is decoded."""

    result: Size
    """Size of one frame of the result."""
    output: Format
    gravity: str = "centre"
    quality: int | None = None
    keep_metadata: bool = False
    svg_scale: float | None = None
    animated: bool = False
    """Every frame is kept: an animated source written to an animated format."""

    @property
    def content_type(self) -> str:
        return formats.CONTENT_TYPES[self.output]


def animates(source_format: Format, pages: int, output: Format) -> bool:
    """Whether an output keeps every frame of the source."""
    return (
        pages > 1
        and source_format in formats.ANIMATED_FORMATS
        and output in formats.ANIMATED_FORMATS
    )


def inspect(operation: str, data: bytes, limits: ImagingLimits) -> SourceInfo:
    """Sniff the source, refuse what the operation or the limits do not allow.

    Runs at planning and again in ``render``: a worker may have downloaded
    the source again, and what it got is not trusted to be what was planned.
    """
    fmt = formats.sniff(data)
    if fmt is None:
        raise errors.SourceUnreadable("source is not an image in a supported format")
    if operation == "resize" and fmt not in formats.RASTER_SOURCES:
        raise errors.SourceTypeNotAllowed(f"resize cannot take a {fmt.value} source")
    if operation == "rasterize" and fmt not in formats.VECTOR_SOURCES:
        raise errors.SourceTypeNotAllowed(f"rasterize takes an SVG source, not {fmt.value}")
    if fmt is Format.SVG:
        problem = formats.svg_problem(data)
        if problem:
            raise errors.SVGInvalid(problem)

    if fmt is Format.SVG:
        # The drawing's exact size: as its root declares it in pixels (checked
        # well-formed by expat), else measured by librsvg. SVG limits apply to
        # the render.
        try:
            declared = formats.svg_declared_size(data)
        except formats.SVGMalformed as exc:
            raise errors.SVGInvalid(str(exc)) from exc
        width, height = declared or vips.svg_size(data)
        size = Size(max(1, round(width)), max(1, round(height)))
        return SourceInfo(fmt, size, 1, (width, height))
    header = vips.read_header(data, fmt)
    if header.width * header.height * header.pages > limits.max_pixels:
        raise errors.SourcePixelsOverLimit(
            f"source is {header.width}x{header.height}"
            + (f" x {header.pages} frames" if header.pages > 1 else "")
            + f", over the limit of {limits.max_pixels} pixels"
        )
    size = geometry.oriented(Size(header.width, header.height), header.orientation)
    return SourceInfo(fmt, size, header.pages)


def plan_output(info: SourceInfo, spec: OutputSpec, limits: ImagingLimits) -> OutputPlan:
    """Size one output of ``info``'s source; refuse a result over the limits."""
    scale: float | None = None
    animated = False
    if info.vector:
        assert info.svg_size is not None
        result, scale = geometry.rasterize_result(
            *info.svg_size, spec.width, spec.height, spec.scale
        )
        if result.pixels > limits.max_result_pixels:
            raise errors.SVGRenderOverLimit(
                f"SVG would render at {result.width}x{result.height}, over the limit of "
                f"{limits.max_result_pixels} pixels"
            )
    else:
        result = geometry.resize_result(info.size, spec.width, spec.height, spec.enlarge)
        animated = animates(info.format, info.pages, spec.format)
        frames = info.pages if animated else 1
        if result.pixels * frames > limits.max_result_pixels:
            raise errors.ResultOverLimit(
                f"result {result.width}x{result.height}"
                + (f" x {frames} frames" if frames > 1 else "")
                + f" is over the limit of {limits.max_result_pixels} pixels"
            )
    return OutputPlan(
        result,
        spec.format,
        gravity=spec.gravity,
        quality=spec.quality,
        keep_metadata=spec.keep_metadata,
        svg_scale=scale,
        animated=animated,
    )


def _recheck(data: bytes, info: SourceInfo, limits: ImagingLimits) -> None:
    """Refuse a re-downloaded source that is not the one planned (207)."""
    now = inspect("rasterize" if info.vector else "resize", data, limits)
    if now.format is not info.format:
        raise errors.SourceChanged(
            f"source is now {now.format.value}, not the {info.format.value} that was planned"
        )
    # Cover sizes, crop windows and the SVG scale were computed from the planned
    # source: another size would render with stale geometry.
    if now.size != info.size or now.pages != info.pages:
        raise errors.SourceChanged(
            f"source is now {now.size.width}x{now.size.height}"
            + (f" x {now.pages} frames" if now.pages > 1 else "")
            + f", not the {info.size.width}x{info.size.height}"
            + (f" x {info.pages} frames" if info.pages > 1 else "")
            + " that was planned"
        )


# --- the render's steps -------------------------------------------------------------


def _shrink_on_load(data: bytes, info: SourceInfo, out: OutputPlan) -> vips.Image:
    """Decode at (about) the size needed: libvips shrinks JPEG/WebP while decoding."""
    box = out.result
    if info.vector:
        assert out.svg_scale is not None
        return vips.load_svg(data, out.svg_scale)
    if out.gravity == "smart" and not out.animated:
        return vips.thumbnail(data, info.format, box.width, box.height, crop="attention")
    cover, width_binds = geometry.cover_size(info.size, box)
    return vips.thumbnail(
        data,
        info.format,
        cover.width if width_binds else _UNBOUNDED,
        _UNBOUNDED if width_binds else cover.height,
        all_pages=out.animated,
    )


def _crop(image: vips.Image, info: SourceInfo, out: OutputPlan) -> vips.Image:
    """Cut the cover-sized image to exactly the result, where the gravity says."""
    box = out.result
    if not out.animated:
        # An SVG is drawn at the box's scale and a smart thumbnail already cropped
        # around what draws the eye: only rounding is left, evenly on both sides.
        centred = info.vector or out.gravity == "smart"
        direction = "centre" if centred else geometry.COMPASS[out.gravity]
        return vips.fit_exact(image, box.width, box.height, direction)
    frame = Size(image.width, image.get("page-height"))
    if out.gravity == "smart":
        # One window for every frame, where the first frame draws the eye.
        centre_x, centre_y = vips.attention_centre(vips.first_frame(image), box.width, box.height)
        left, top = geometry.window_around(frame, box, centre_x, centre_y)
    else:
        left, top = geometry.crop_offsets(frame, box, out.gravity)
    return vips.crop_frames(
        image, left, top, min(box.width, frame.width), min(box.height, frame.height)
    )


def _to_srgb(image: vips.Image, info: SourceInfo, out: OutputPlan) -> vips.Image:
    return vips.to_srgb(image)


def _flatten(image: vips.Image, info: SourceInfo, out: OutputPlan) -> vips.Image:
    """Drop alpha onto the background for a format that cannot hold it."""
    return image if out.output in formats.ALPHA_FORMATS else vips.flatten(image)


def _materialize(image: vips.Image, info: SourceInfo, out: OutputPlan) -> vips.Image:
    return vips.materialize(image, info.format)


Step = Callable[[vips.Image, SourceInfo, OutputPlan], vips.Image]
STEPS: tuple[Step, ...] = (_crop, _to_srgb, _flatten, _materialize)
"""What happens between the shrink-on-load and the encoder, in order. A new
operation is one more step here (a step that does not apply returns its image)."""


def render(
    data: bytes,
    info: SourceInfo,
    out: OutputPlan,
    limits: ImagingLimits,
    *,
    planned: bool = False,
) -> bytes:
    """Source bytes -> one output's bytes, exactly ``out.result`` in ``out.output``.

    ``planned`` says ``data`` are the very bytes ``info`` was read from (the
    queue's copy); otherwise (downloaded again) every source check runs again first.
    """
    if not planned:
        _recheck(data, info, limits)
    image = _shrink_on_load(data, info, out)
    for step in STEPS:
        image = step(image, info, out)
    encoded = vips.save(image, out.output, out.quality, out.keep_metadata)
    if len(encoded) > limits.max_result_bytes:
        raise errors.ResultOverLimit(
            f"result is {len(encoded)} bytes, over the limit of {limits.max_result_bytes}"
        )
    return encoded


def placeholder(size: Size, output: Format) -> bytes:
    """The "Image being processed" stand-in, at the result's size and format."""
    image = vips.label_canvas(size.width, size.height, PLACEHOLDER_TEXT, failed=False)
    return vips.save(image, output, None, False, fast=True)


def failure_image(size: Size, output: Format) -> bytes:
    """The "Image processing failed" image that replaces a placeholder on failure."""
    image = vips.label_canvas(size.width, size.height, FAILURE_TEXT, failed=True)
    return vips.save(image, output, None, False, fast=True)
