"""The one place that owns the order of the processing steps.

``inspect`` sniffs a source and reads its header (SourceInfo); ``plan_output``
sizes one output from that and a small per-output spec (OutputPlan), for each
fit mode (geometry.FITS). Both run in a planner process before the reply.
``render`` runs on a worker process and turns the source bytes into every
output's bytes. The source is decoded once, with a shrink-on-load for the
largest output; each other output is derived from the smallest image already
made that is still big enough. Then each runs the steps of ``STEPS`` in order
and its encoder. Animated outputs and SVG sources are decoded for each output
on its own (every frame kept; a drawing rendered at each output's own scale).
``placeholder`` and ``failure_image`` draw the stand-ins the daemon uploads
before and after.

Nothing here knows the request contract or destinations (planning.py joins them).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from imgserve import errors
from imgserve.config import ImagingLimits
from imgserve.imaging import formats, geometry, vips
from imgserve.imaging.formats import Format
from imgserve.imaging.geometry import Size

PLACEHOLDER_TEXT = "Image being processed"
FAILURE_TEXT = "Image processing failed"
# "No limit" for the free dimension of a thumbnail driven by the other one.
_UNBOUNDED = 10_000_000

RGBA = tuple[int, int, int, int]
# contain's padding when no background is given: transparent where the format
# holds alpha, white (the colour alpha is flattened onto) where it does not.
_CLEAR = (255, 255, 255, 0)


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
    """One of geometry.FITS; applies when both width and height are given."""
    background: RGBA | None = None
    """contain's padding and the colour alpha is flattened onto (RGBA, 0-255); None:
    transparent padding where the format holds alpha, else white."""
    refuse_small: bool = False
    """0.2's rule: a raster source smaller than a requested side is refused (203)."""


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
    fit: str = "cover"
    background: RGBA | None = None
    scaled: Size | None = None
    """The whole source scaled uniformly, before stretch, crop or padding (None in
    plans of the previous release: the cover size of ``result``, see ``scaled_size``)."""

    @property
    def content_type(self) -> str:
        return formats.CONTENT_TYPES[self.output]

    def to_dict(self) -> dict[str, Any]:
        """JSON-plain fields (sizes as [width, height], the format as its value)."""
        data = dict(vars(self))
        data["result"] = [self.result.width, self.result.height]
        data["output"] = self.output.value
        data["background"] = list(self.background) if self.background is not None else None
        data["scaled"] = [self.scaled.width, self.scaled.height] if self.scaled else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputPlan:
        """Read ``to_dict``'s shape, or the previous release's (``vars(plan)`` with the
        same sizes and format): fields it lacks take their defaults, fields a later
        release added are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        values["result"] = Size(*data["result"])
        values["output"] = Format(data["output"])
        if values.get("background") is not None:
            r, g, b, a = values["background"]
            values["background"] = (r, g, b, a)
        if values.get("scaled") is not None:
            values["scaled"] = Size(*values["scaled"])
        return cls(**values)


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
        fitted, scale = geometry.svg_fit_size(
            *info.svg_size, spec.width, spec.height, spec.scale, spec.fit
        )
        result = fitted.result
        drawn = max(fitted.scaled, result, key=lambda size: size.pixels)
        if drawn.pixels > limits.max_result_pixels:
            raise errors.SVGRenderOverLimit(
                f"SVG would render at {drawn.width}x{drawn.height}, over the limit of "
                f"{limits.max_result_pixels} pixels"
            )
    else:
        fitted = geometry.fit_size(
            info.size,
            spec.width,
            spec.height,
            spec.fit,
            spec.enlarge,
            refuse_small=spec.refuse_small,
        )
        result = fitted.result
        # Frames are cropped, never padded or stretched: an animation that would
        # need either keeps its first frame only.
        animated = animates(info.format, info.pages, spec.format) and (
            spec.fit == "cover" or fitted.scaled == result
        )
        frames = info.pages if animated else 1
        if result.pixels * frames > limits.max_result_pixels:
            raise errors.ResultOverLimit(
                f"result {result.width}x{result.height}"
                + (f" x {frames} frames" if frames > 1 else "")
                + f" is over the limit of {limits.max_result_pixels} pixels"
            )
        # The whole source scaled (before the crop, stretch or pad) is an image too:
        # a 4000x4 source covering 4x4000 would be 4000000x4000. 0.2's single
        # output crops it lazily and keeps 0.2's rule (the result only).
        scaled = fitted.scaled
        if not spec.refuse_small and scaled.pixels * frames > limits.max_result_pixels:
            raise errors.ResultOverLimit(
                f"the source scaled for this output is {scaled.width}x{scaled.height}, "
                f"over the limit of {limits.max_result_pixels} pixels"
            )
    return OutputPlan(
        result,
        spec.format,
        gravity=spec.gravity,
        quality=spec.quality,
        keep_metadata=spec.keep_metadata,
        svg_scale=scale,
        animated=animated,
        fit=spec.fit,
        background=spec.background,
        scaled=fitted.scaled,
    )


def scaled_size(info: SourceInfo, out: OutputPlan) -> Size:
    """The full-frame size an output is cut, stretched or padded from."""
    if out.scaled is not None:
        return out.scaled
    # A plan of the previous release: an SVG rendered at its result, a raster
    # source covering it.
    return out.result if info.vector else geometry.cover_size(info.size, out.result)[0]


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


def _smart(out: OutputPlan) -> bool:
    """Whether the output's window is where libvips' attention strategy looks."""
    return out.fit == "cover" and out.gravity == "smart" and not out.animated


def _thumbnail_box(info: SourceInfo, out: OutputPlan) -> tuple[int, int]:
    """The thumbnail box that makes ``scaled_size``: its binding side, the other free."""
    if out.fit in ("cover", "fill"):
        # 0.2's rule (cover is 0.2's resize): the result's cover size decides.
        scaled, width_binds = geometry.cover_size(info.size, out.result)
    else:
        scaled = scaled_size(info, out)
        width_binds = geometry.width_drives(info.size, scaled)
    if width_binds:
        return scaled.width, _UNBOUNDED
    return _UNBOUNDED, scaled.height


def _shrink_on_load(data: bytes, info: SourceInfo, out: OutputPlan) -> vips.Image:
    """Decode one output at (about) the size it needs: libvips shrinks JPEG/WebP while
    decoding, and renders a drawing at the output's own scale."""
    box = out.result
    if info.vector:
        assert out.svg_scale is not None
        drawing = vips.load_svg(data, out.svg_scale)
        return vips.attention_crop(drawing, box.width, box.height) if _smart(out) else drawing
    if _smart(out):
        return vips.thumbnail(data, info.format, box.width, box.height, crop="attention")
    return vips.thumbnail(data, info.format, *_thumbnail_box(info, out), all_pages=out.animated)


def _derived(
    data: bytes, info: SourceInfo, outs: Sequence[tuple[int, OutputPlan]]
) -> Iterator[tuple[int, vips.Image]]:
    """Each output's image from one decode, largest first: the decode is the shrink-on-load
    of the largest; every other is resized from the smallest image already made."""
    order = sorted(outs, key=lambda item: scaled_size(info, item[1]).pixels, reverse=True)
    first = order[0][1]
    decoded = vips.thumbnail(data, info.format, *_thumbnail_box(info, first))
    # Every base has the source's aspect ratio and each is smaller than the last,
    # so the newest one is the smallest still big enough (bar a pixel of rounding,
    # which the resize absorbs): only it is kept, and memory stays at the decode,
    # one base and the output being made, however many outputs the job has.
    base = vips.materialize(decoded, info.format)
    for position, (index, out) in enumerate(order):
        need = scaled_size(info, out)
        image = base
        if (base.width, base.height) != (need.width, need.height):
            image = vips.resize_to(base, need.width, need.height)
            if position < len(order) - 1:
                image = vips.materialize(image, info.format)
                base = image
        if _smart(out):
            image = vips.attention_crop(image, out.result.width, out.result.height)
        yield index, image


def _round(image: vips.Image, info: SourceInfo, out: OutputPlan) -> vips.Image:
    """Make the decoded image exactly ``scaled_size`` (a decoder may round a side
    the other way). Cover's crop does this for itself."""
    if out.fit == "cover" or out.animated:
        return image
    scaled = scaled_size(info, out)
    return vips.fit_exact(image, scaled.width, scaled.height, "centre")


def _stretch(image: vips.Image, info: SourceInfo, out: OutputPlan) -> vips.Image:
    """fill: scale each side on its own to exactly the result."""
    box = out.result
    if out.fit != "fill" or (image.width, image.height) == (box.width, box.height):
        return image
    return vips.resize_to(image, box.width, box.height)


def _crop(image: vips.Image, info: SourceInfo, out: OutputPlan) -> vips.Image:
    """Cut the cover-sized image to exactly the result, where the gravity says."""
    box = out.result
    if not out.animated:
        if out.fit != "cover":
            return image
        # A smart output was already cropped around what draws the eye: only
        # rounding is left, evenly on both sides.
        direction = "centre" if out.gravity == "smart" else geometry.COMPASS[out.gravity]
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


def _pad(image: vips.Image, info: SourceInfo, out: OutputPlan) -> vips.Image:
    """contain: place the image in the box by its gravity, on the background."""
    box = out.result
    if out.fit != "contain" or (image.width, image.height) == (box.width, box.height):
        return image
    left, top = geometry.pad_offsets(Size(image.width, image.height), box, out.gravity)
    return vips.pad(
        image,
        left,
        top,
        box.width,
        box.height,
        out.background or _CLEAR,
        alpha=out.output in formats.ALPHA_FORMATS,
    )


def _flatten(image: vips.Image, info: SourceInfo, out: OutputPlan) -> vips.Image:
    """Drop alpha onto the background for a format that cannot hold it."""
    if out.output in formats.ALPHA_FORMATS:
        return image
    return vips.flatten(image, (out.background or _CLEAR)[:3])


def _materialize(image: vips.Image, info: SourceInfo, out: OutputPlan) -> vips.Image:
    return vips.materialize(image, info.format)


Step = Callable[[vips.Image, SourceInfo, OutputPlan], vips.Image]
STEPS: tuple[Step, ...] = (_round, _stretch, _crop, _to_srgb, _pad, _flatten, _materialize)
"""What happens between the decode and the encoder, in order. A new operation is
one more step here (a step that does not apply returns its image)."""


def _decoded_alone(info: SourceInfo, out: OutputPlan) -> bool:
    """Outputs decoded on their own: every frame, or a drawing at its own scale."""
    return info.vector or out.animated


def render(
    data: bytes,
    info: SourceInfo,
    outs: Sequence[OutputPlan],
    limits: ImagingLimits,
    *,
    planned: bool = False,
) -> list[bytes]:
    """Source bytes -> every output's bytes, in the order of ``outs``: each exactly its
    ``result`` in its ``output`` format.

    ``planned`` says ``data`` are the very bytes ``info`` was read from (the
    queue's copy); otherwise (downloaded again) every source check runs again
    first, once for the job.
    """
    if not planned:
        _recheck(data, info, limits)
    shared = [(i, out) for i, out in enumerate(outs) if not _decoded_alone(info, out)]
    if len(shared) < 2:  # one output decodes exactly as a single-output job always has
        shared = []
    together = {i for i, _out in shared}
    alone = (
        (i, _shrink_on_load(data, info, out)) for i, out in enumerate(outs) if i not in together
    )
    images = itertools.chain(alone, _derived(data, info, shared) if shared else ())
    encoded: dict[int, bytes] = {}
    for index, image in images:  # each encoded before the next is made
        out = outs[index]
        for step in STEPS:
            image = step(image, info, out)
        result = vips.save(image, out.output, out.quality, out.keep_metadata)
        if len(result) > limits.max_result_bytes:
            where = f"outputs[{index}]: " if len(outs) > 1 else ""
            raise errors.ResultOverLimit(
                f"{where}result is {len(result)} bytes, over the limit of {limits.max_result_bytes}"
            )
        encoded[index] = result
    return [encoded[i] for i in range(len(outs))]


def placeholder(size: Size, output: Format) -> bytes:
    """The "Image being processed" stand-in, at the result's size and format."""
    image = vips.label_canvas(size.width, size.height, PLACEHOLDER_TEXT, failed=False)
    return vips.save(image, output, None, False, fast=True)


def failure_image(size: Size, output: Format) -> bytes:
    """The "Image processing failed" image that replaces a placeholder on failure."""
    image = vips.label_canvas(size.width, size.height, FAILURE_TEXT, failed=True)
    return vips.save(image, output, None, False, fast=True)
