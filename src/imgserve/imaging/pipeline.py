"""The one place that owns the order of the processing steps.

``plan`` runs in the API process before the reply: it sniffs the source,
reads its header, applies the limits and computes the result's size, format
and final destination URL. ``render`` runs on a worker process and turns the
source bytes into the result bytes following that plan. ``placeholder`` and
``failure_image`` draw the stand-ins the daemon uploads before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgserve import errors
from imgserve.config import ImagingLimits
from imgserve.destination import destination_extension, substitute
from imgserve.imaging import formats, geometry, vips
from imgserve.imaging.formats import Format
from imgserve.imaging.geometry import Size
from imgserve.request import Job

PLACEHOLDER_TEXT = "Image being processed"
FAILURE_TEXT = "Image processing failed"
# "No limit" for the free dimension of a thumbnail driven by the other one.
_UNBOUNDED = 10_000_000


@dataclass(frozen=True)
class Plan:
    """What a job will produce, known before any pixel is decoded."""

    operation: str
    source_format: Format
    source: Size
    """Upright size of one frame."""
    pages: int
    result: Size
    """Size of one frame of the result."""
    output: Format
    dst_url: str
    gravity: str = "centre"
    quality: int | None = None
    keep_metadata: bool = False
    svg_scale: float | None = None

    @property
    def animated(self) -> bool:
        """Whether every frame is kept: an animated source written to an animated format."""
        return (
            self.operation == "resize"
            and self.pages > 1
            and self.source_format in formats.ANIMATED_FORMATS
            and self.output in formats.ANIMATED_FORMATS
        )

    @property
    def content_type(self) -> str:
        return formats.CONTENT_TYPES[self.output]

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))  # then the non-JSON values, below
        data["source_format"] = self.source_format.value
        data["output"] = self.output.value
        data["source"] = [self.source.width, self.source.height]
        data["result"] = [self.result.width, self.result.height]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        values = dict(data)
        values["source_format"] = Format(values["source_format"])
        values["output"] = Format(values["output"])
        values["source"] = Size(*values["source"])
        values["result"] = Size(*values["result"])
        return cls(**values)


def _check_source(
    operation: str, data: bytes, limits: ImagingLimits
) -> tuple[Format, vips.Header, tuple[float, float] | None]:
    """Sniff the source, refuse what the operation or the limits do not allow.

    Runs in ``plan`` and again in ``render``: a worker may have downloaded
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
        header = vips.Header(max(1, round(width)), max(1, round(height)), 1, 1)
        return fmt, header, (width, height)
    header = vips.read_header(data, fmt)
    if header.width * header.height * header.pages > limits.max_pixels:
        raise errors.SourcePixelsOverLimit(
            f"source is {header.width}x{header.height}"
            + (f" x {header.pages} frames" if header.pages > 1 else "")
            + f", over the limit of {limits.max_pixels} pixels"
        )
    return fmt, header, None


def plan(job: Job, data: bytes, limits: ImagingLimits) -> Plan:
    """Check the source against the job and the limits; compute the result."""
    fmt, header, svg_size = _check_source(job.operation, data, limits)
    source = geometry.oriented(Size(header.width, header.height), header.orientation)

    # {$ext} names the source's extension; an SVG cannot be written, so a
    # rasterize destination that keeps "the source's format" gets PNG.
    tag_extension = (
        formats.CANONICAL_EXTENSION[Format.PNG]
        if job.operation == "rasterize"
        else job.src_extension or formats.CANONICAL_EXTENSION[fmt]
    )
    extension = destination_extension(job.dst_template, tag_extension)
    output = formats.output_format(extension)
    if output is None:
        raise errors.DstExtensionUnsupported(
            f"destination extension {extension or '(none)'!r} is not one of "
            f"{', '.join(sorted(formats.OUTPUT_EXTENSIONS))}"
        )

    scale: float | None = None
    if job.operation == "rasterize":
        assert svg_size is not None
        src_width, src_height = svg_size
        result, scale = geometry.rasterize_result(
            src_width, src_height, job.width, job.height, job.scale
        )
        if result.pixels > limits.max_result_pixels:
            raise errors.SVGRenderOverLimit(
                f"SVG would render at {result.width}x{result.height}, over the limit of "
                f"{limits.max_result_pixels} pixels"
            )
    else:
        result = geometry.resize_result(source, job.width, job.height, job.enlarge)
    dst_url = substitute(
        job.dst_template,
        width=result.width,
        height=result.height,
        basename=job.src_basename,
        extension=tag_extension,
    )
    planned = Plan(
        operation=job.operation,
        source_format=fmt,
        source=source,
        pages=header.pages,
        result=result,
        output=output,
        dst_url=dst_url,
        gravity=job.gravity,
        quality=job.quality,
        keep_metadata=job.keep_metadata,
        svg_scale=scale,
    )
    frames = header.pages if planned.animated else 1
    if job.operation == "resize" and result.pixels * frames > limits.max_result_pixels:
        raise errors.ResultOverLimit(
            f"result {result.width}x{result.height}"
            + (f" x {frames} frames" if frames > 1 else "")
            + f" is over the limit of {limits.max_result_pixels} pixels"
        )
    return planned


def render(plan: Plan, data: bytes, limits: ImagingLimits, *, planned: bool = False) -> bytes:
    """Source bytes -> result bytes, exactly ``plan.result`` in ``plan.output``.

    ``planned`` says ``data`` are the very bytes ``plan`` checked (the queue's
    copy); otherwise (downloaded again) every source check runs again first.
    """
    if not planned:
        fmt, header, _svg_size = _check_source(plan.operation, data, limits)
        if fmt is not plan.source_format:
            raise errors.SourceChanged(
                f"source is now {fmt.value}, not the {plan.source_format.value} that was planned"
            )
        # Cover sizes, crop windows and the SVG scale were computed from the planned
        # source: another size would render with stale geometry.
        now = (
            Size(header.width, header.height)
            if fmt is Format.SVG
            else geometry.oriented(Size(header.width, header.height), header.orientation)
        )
        if now != plan.source or header.pages != plan.pages:
            raise errors.SourceChanged(
                f"source is now {now.width}x{now.height}"
                + (f" x {header.pages} frames" if header.pages > 1 else "")
                + f", not the {plan.source.width}x{plan.source.height}"
                + (f" x {plan.pages} frames" if plan.pages > 1 else "")
                + " that was planned"
            )
    box = plan.result
    if plan.operation == "rasterize":
        assert plan.svg_scale is not None
        image = vips.fit_exact(vips.load_svg(data, plan.svg_scale), box.width, box.height, "centre")
    elif plan.gravity == "smart" and not plan.animated:
        image = vips.thumbnail(data, plan.source_format, box.width, box.height, crop="attention")
        image = vips.fit_exact(image, box.width, box.height, "centre")
    else:
        cover, width_binds = geometry.cover_size(plan.source, box)
        image = vips.thumbnail(
            data,
            plan.source_format,
            cover.width if width_binds else _UNBOUNDED,
            _UNBOUNDED if width_binds else cover.height,
            all_pages=plan.animated,
        )
        if plan.animated:
            frame = Size(image.width, image.get("page-height"))
            if plan.gravity == "smart":
                # One window for every frame, where the first frame draws the eye.
                centre_x, centre_y = vips.attention_centre(
                    vips.first_frame(image), box.width, box.height
                )
                left, top = geometry.window_around(frame, box, centre_x, centre_y)
            else:
                left, top = geometry.crop_offsets(frame, box, plan.gravity)
            image = vips.crop_frames(
                image, left, top, min(box.width, frame.width), min(box.height, frame.height)
            )
        else:
            image = vips.fit_exact(image, box.width, box.height, geometry.COMPASS[plan.gravity])
    image = vips.to_srgb(image)
    if plan.output not in formats.ALPHA_FORMATS:
        image = vips.flatten(image)
    image = vips.materialize(image, plan.source_format)
    out = vips.save(image, plan.output, plan.quality, plan.keep_metadata)
    if len(out) > limits.max_result_bytes:
        raise errors.ResultOverLimit(
            f"result is {len(out)} bytes, over the limit of {limits.max_result_bytes}"
        )
    return out


def placeholder(size: Size, output: Format) -> bytes:
    """The "Image being processed" stand-in, at the result's size and format."""
    image = vips.label_canvas(size.width, size.height, PLACEHOLDER_TEXT, failed=False)
    return vips.save(image, output, None, False, fast=True)


def failure_image(size: Size, output: Format) -> bytes:
    """The "Image processing failed" image that replaces a placeholder on failure."""
    image = vips.label_canvas(size.width, size.height, FAILURE_TEXT, failed=True)
    return vips.save(image, output, None, False, fast=True)
