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
from dataclasses import dataclass, field
from typing import Any

from imgserve import errors
from imgserve.config import ImagingLimits
from imgserve.imaging import formats, geometry, operations, preview, vips
from imgserve.imaging.formats import Format
from imgserve.imaging.geometry import Size
from imgserve.imaging.operations import Operations

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
    orientation: int = 1
    """The EXIF orientation (1-8) the source declares; ``size`` is already upright."""
    has_alpha: bool = False

    @property
    def vector(self) -> bool:
        return self.format in formats.VECTOR_SOURCES

    def view(self) -> dict[str, Any]:
        """``sourceInfo`` in the job view and the completion event."""
        return {
            "width": self.size.width,
            "height": self.size.height,
            "format": self.format.value,
            "orientation": self.orientation,
            "hasAlpha": self.has_alpha,
            "animated": self.pages > 1 and self.format in formats.ANIMATED_FORMATS,
            "pages": self.pages,
        }


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
    ops: Operations = field(default_factory=Operations)
    blurhash_components: tuple[int, int] = (4, 3)


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
    """The whole source (or its region: crop, rotate) scaled uniformly, before
    stretch, crop or padding (None in plans of the previous release: the cover
    size of ``result``, see ``scaled_size``)."""
    ops: Operations = field(default_factory=Operations)
    frame: Size | None = None
    """With a crop or a rotation: the whole upright source at the scale that makes
    its region ``scaled``, the size it is decoded at (see ``decode_size``)."""
    blurhash_components: tuple[int, int] = (4, 3)

    @property
    def content_type(self) -> str:
        return formats.CONTENT_TYPES[self.output]

    @property
    def box(self) -> Size:
        """The size the fit makes: ``result`` without the ``pad`` borders."""
        pad = self.ops.pad
        if pad is None:
            return self.result
        return Size(
            self.result.width - pad.left - pad.right, self.result.height - pad.top - pad.bottom
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-plain fields (sizes as [width, height], the format as its value)."""
        data = dict(vars(self))
        data["result"] = [self.result.width, self.result.height]
        data["output"] = self.output.value
        data["background"] = list(self.background) if self.background is not None else None
        data["scaled"] = [self.scaled.width, self.scaled.height] if self.scaled else None
        data["ops"] = self.ops.to_dict() if self.ops.any else None
        data["frame"] = [self.frame.width, self.frame.height] if self.frame else None
        data["blurhash_components"] = list(self.blurhash_components)
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
        if values.get("frame") is not None:
            values["frame"] = Size(*values["frame"])
        values["ops"] = Operations.from_dict(values.get("ops"))
        if values.get("blurhash_components") is not None:
            x, y = values["blurhash_components"]
            values["blurhash_components"] = (x, y)
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
        return SourceInfo(fmt, size, 1, (width, height), has_alpha=True)
    header = vips.read_header(data, fmt)
    if header.width * header.height * header.pages > limits.max_pixels:
        raise errors.SourcePixelsOverLimit(
            f"source is {header.width}x{header.height}"
            + (f" x {header.pages} frames" if header.pages > 1 else "")
            + f", over the limit of {limits.max_pixels} pixels"
        )
    size = geometry.oriented(Size(header.width, header.height), header.orientation)
    return SourceInfo(
        fmt, size, header.pages, orientation=header.orientation, has_alpha=header.has_alpha
    )


def plan_output(info: SourceInfo, spec: OutputSpec, limits: ImagingLimits) -> OutputPlan:
    """Size one output of ``info``'s source; refuse a result over the limits.

    The fit sizes the output from the source's region (the crop, turned by the
    rotation); ``pad`` adds to the result; an animation keeps its frames only
    when nothing but a cover crop touches them."""
    ops = spec.ops
    scale: float | None = None
    animated = False
    frame: Size | None = None
    if info.vector:
        assert info.svg_size is not None
        svg_width, svg_height = info.svg_size
        if ops.rotate in (90, 270):
            svg_width, svg_height = svg_height, svg_width
        fitted, scale = geometry.svg_fit_size(
            svg_width, svg_height, spec.width, spec.height, spec.scale, spec.fit
        )
        result = ops.padded(fitted.result)
        drawn = max(fitted.scaled, result, key=lambda size: size.pixels)
        if drawn.pixels > limits.max_result_pixels:
            raise errors.SVGRenderOverLimit(
                f"SVG would render at {drawn.width}x{drawn.height}, over the limit of "
                f"{limits.max_result_pixels} pixels"
            )
    else:
        fitted = geometry.fit_size(
            ops.region(info.size),
            spec.width,
            spec.height,
            spec.fit,
            spec.enlarge,
            refuse_small=spec.refuse_small,
        )
        result = ops.padded(fitted.result)
        # Frames are cropped, never padded, stretched or otherwise changed: an
        # animation that would need more keeps its first frame only.
        animated = (
            animates(info.format, info.pages, spec.format)
            and (spec.fit == "cover" or fitted.scaled == fitted.result)
            and not ops.any
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
        if ops.geometric:
            frame = operations.frame_size(info.size, ops, scaled)
            scaled = max(scaled, frame, key=lambda size: size.pixels)
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
        ops=ops,
        frame=frame,
        blurhash_components=spec.blurhash_components,
    )


def scaled_size(info: SourceInfo, out: OutputPlan) -> Size:
    """The full-frame size an output is cut, stretched or padded from."""
    if out.scaled is not None:
        return out.scaled
    # A plan of the previous release: an SVG rendered at its result, a raster
    # source covering it.
    return out.result if info.vector else geometry.cover_size(info.size, out.result)[0]


def decode_size(info: SourceInfo, out: OutputPlan) -> Size:
    """The upright whole-source size an output is decoded at (before any crop)."""
    return out.frame or scaled_size(info, out)


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


def _smart_at_decode(out: OutputPlan) -> bool:
    """Smart, and cut while decoding: a cropped or turned output is cut after that."""
    return _smart(out) and not out.ops.geometric


def _thumbnail_box(info: SourceInfo, out: OutputPlan) -> tuple[int, int]:
    """The thumbnail box that makes ``decode_size``: its binding side, the other free."""
    if out.frame is not None:
        scaled, width_binds = out.frame, geometry.width_drives(info.size, out.frame)
    elif out.fit in ("cover", "fill"):
        # 0.2's rule (cover is 0.2's resize): the result's cover size decides.
        scaled, width_binds = geometry.cover_size(info.size, out.box)
    else:
        scaled = scaled_size(info, out)
        width_binds = geometry.width_drives(info.size, scaled)
    if width_binds:
        return scaled.width, _UNBOUNDED
    return _UNBOUNDED, scaled.height


def _shrink_on_load(data: bytes, info: SourceInfo, out: OutputPlan) -> vips.Image:
    """Decode one output at (about) the size it needs: libvips shrinks JPEG/WebP while
    decoding, and renders a drawing at the output's own scale."""
    box = out.box
    if info.vector:
        assert out.svg_scale is not None
        drawing = vips.load_svg(data, out.svg_scale)
        if _smart_at_decode(out):
            return vips.attention_crop(drawing, box.width, box.height)
        return drawing
    if _smart_at_decode(out):
        return vips.thumbnail(data, info.format, box.width, box.height, crop="attention")
    return vips.thumbnail(data, info.format, *_thumbnail_box(info, out), all_pages=out.animated)


def _derived(
    data: bytes, info: SourceInfo, outs: Sequence[tuple[int, OutputPlan]]
) -> Iterator[tuple[int, vips.Image]]:
    """Each output's image from one decode, largest first: the decode is the shrink-on-load
    of the largest; every other is resized from the smallest image already made."""
    order = sorted(outs, key=lambda item: decode_size(info, item[1]).pixels, reverse=True)
    first = order[0][1]
    decoded = vips.thumbnail(data, info.format, *_thumbnail_box(info, first))
    # Every base has the source's aspect ratio and each is smaller than the last,
    # so the newest one is the smallest still big enough (bar a pixel of rounding,
    # which the resize absorbs): only it is kept, and memory stays at the decode,
    # one base and the output being made, however many outputs the job has.
    base = vips.materialize(decoded, info.format)
    for position, (index, out) in enumerate(order):
        need = decode_size(info, out)
        image = base
        if (base.width, base.height) != (need.width, need.height):
            image = vips.resize_to(base, need.width, need.height)
            if position < len(order) - 1:
                image = vips.materialize(image, info.format)
                base = image
        if _smart_at_decode(out):
            image = vips.attention_crop(image, out.box.width, out.box.height)
        yield index, image


def _geometry(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    """crop, rotate, flip, flop: cut and turn the decoded source (``decode_size``, or
    a drawing at its scale), then make it exactly ``scaled``."""
    ops = out.ops
    if not ops.geometric:
        return image
    if not info.vector:
        # A shrink-on-load decode is read top to bottom once: a flip, a turn or a
        # smart crop reads it out of order. Its size is the planned frame.
        image = vips.materialize(image, info.format)
    if ops.crop is not None:
        image = vips.crop_scaled(image, info.size, ops.crop)
    if ops.rotate:
        image = vips.rotate(
            image, ops.rotate, out.background or _CLEAR, alpha=out.output in formats.ALPHA_FORMATS
        )
    if ops.flip or ops.flop:
        image = vips.flip(image, vertical=ops.flip, horizontal=ops.flop)
    scaled = scaled_size(info, out)
    if (image.width, image.height) != (scaled.width, scaled.height):
        image = vips.resize_to(image, scaled.width, scaled.height)
    if _smart(out):
        image = vips.attention_crop(image, out.box.width, out.box.height)
    return image


def _round(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    """Make the decoded image exactly ``scaled_size`` (a decoder may round a side
    the other way). Cover's crop does this for itself."""
    if out.fit == "cover" or out.animated:
        return image
    scaled = scaled_size(info, out)
    return vips.fit_exact(image, scaled.width, scaled.height, "centre")


def _stretch(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    """fill: scale each side on its own to exactly the result."""
    box = out.box
    if out.fit != "fill" or (image.width, image.height) == (box.width, box.height):
        return image
    return vips.resize_to(image, box.width, box.height)


def _crop(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    """Cut the cover-sized image to exactly the result, where the gravity says."""
    box = out.box
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


def _to_srgb(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    return vips.to_srgb(image)


def _pad(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    """contain: place the image in the box by its gravity, on the background."""
    box = out.box
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


def _effects(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    """blur, sharpen, grayscale, in that order, on the fitted image."""
    ops = out.ops
    if ops.blur is not None:
        image = vips.blur(image, ops.blur)
    if ops.sharpen is not None:
        image = vips.sharpen(image, ops.sharpen)
    if ops.grayscale:
        image = vips.grayscale(image)
    return image


def _border(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    """pad: borders of the background around the fitted image."""
    pad = out.ops.pad
    if pad is None or pad == operations.Pad():
        return image
    return vips.pad(
        image,
        pad.left,
        pad.top,
        out.result.width,
        out.result.height,
        out.background or _CLEAR,
        alpha=out.output in formats.ALPHA_FORMATS,
    )


def _watermark(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    """The named overlay, placed by its gravity and margin, at its opacity."""
    mark = out.ops.watermark
    if mark is None:
        return image
    path = marks.get(mark.name)
    if path is None:  # a worker node configured without it: the job cannot be made
        raise errors.JobFieldInvalid(
            f"watermark {mark.name!r} is not configured on this worker (--watermark)"
        )
    return vips.watermark(image, vips.load_watermark(path), mark)


def _flatten(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    """Drop alpha onto the background for a format that cannot hold it."""
    if out.output in formats.ALPHA_FORMATS:
        return image
    return vips.flatten(image, (out.background or _CLEAR)[:3])


def _materialize(image: vips.Image, info: SourceInfo, out: OutputPlan, marks: Marks) -> vips.Image:
    return vips.materialize(image, info.format)


Marks = dict[str, str]
"""The server's watermarks: name -> file (ImagingLimits.watermark_files)."""
Step = Callable[[vips.Image, SourceInfo, OutputPlan, Marks], vips.Image]
STEPS: tuple[Step, ...] = (
    _geometry,
    _round,
    _stretch,
    _crop,
    _to_srgb,
    _pad,
    _effects,
    _border,
    _watermark,
    _flatten,
    _materialize,
)
"""What happens between the decode and the encoder, in order (docs/imaging.md lists
the operations in this order). A new operation is one more step here (a step that
does not apply returns its image)."""


def _decoded_alone(info: SourceInfo, out: OutputPlan) -> bool:
    """Outputs decoded on their own: every frame, or a drawing at its own scale."""
    return info.vector or out.animated


@dataclass(frozen=True)
class Rendered:
    """One output as rendered: its bytes, and what it looks like (``preview``: the
    JSON the job view and the completion event show for it)."""

    data: bytes
    preview: dict[str, Any] = field(default_factory=dict)


def render(
    data: bytes,
    info: SourceInfo,
    outs: Sequence[OutputPlan],
    limits: ImagingLimits,
    *,
    planned: bool = False,
) -> list[bytes]:
    """Every output's bytes (``render_outputs`` without what they look like)."""
    return [out.data for out in render_outputs(data, info, outs, limits, planned=planned)]


def render_outputs(
    data: bytes,
    info: SourceInfo,
    outs: Sequence[OutputPlan],
    limits: ImagingLimits,
    *,
    planned: bool = False,
) -> list[Rendered]:
    """Source bytes -> every output, in the order of ``outs``: each exactly its
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
    marks = {name: str(path) for name, path in limits.watermark_files().items()}
    encoded: dict[int, Rendered] = {}
    for index, image in images:  # each encoded before the next is made
        out = outs[index]
        for step in STEPS:
            image = step(image, info, out, marks)
        # What it looks like, from the image about to be encoded (no second decode).
        looks = preview.describe(image, out.blurhash_components).to_dict()
        result = vips.save(image, out.output, out.quality, out.keep_metadata)
        if len(result) > limits.max_result_bytes:
            where = f"outputs[{index}]: " if len(outs) > 1 else ""
            raise errors.ResultOverLimit(
                f"{where}result is {len(result)} bytes, over the limit of {limits.max_result_bytes}"
            )
        encoded[index] = Rendered(result, looks)
    return [encoded[i] for i in range(len(outs))]


def placeholder(size: Size, output: Format) -> bytes:
    """The "Image being processed" stand-in, at the result's size and format."""
    image = vips.label_canvas(size.width, size.height, PLACEHOLDER_TEXT, failed=False)
    return vips.save(image, output, None, False, fast=True)


def failure_image(size: Size, output: Format) -> bytes:
    """The "Image processing failed" image that replaces a placeholder on failure."""
    image = vips.label_canvas(size.width, size.height, FAILURE_TEXT, failed=True)
    return vips.save(image, output, None, False, fast=True)
