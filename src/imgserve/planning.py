"""A job's plan: the request, its destinations and the imaging pipeline, joined.

``plan`` runs in a planner process (planner._plan) before the reply: it reads
the source once (pipeline.inspect), sizes each output (pipeline.plan_output)
and fills in each destination's tags, which need the result's size. The plan
is stored with the job (``JobPlan.to_dict``, versioned) and read back by the
worker, whose ``render`` makes every output's bytes from one decode.

Plans are made from a spec.JobSpec, whichever endpoint took the job; 0.2's
``POST /`` makes one with one output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgserve import errors
from imgserve.config import ImagingLimits
from imgserve.destination import destination_extension, destination_target, substitute
from imgserve.imaging import formats, pipeline
from imgserve.imaging.formats import Format
from imgserve.imaging.geometry import Size, cover_size
from imgserve.imaging.pipeline import OutputPlan, OutputSpec, SourceInfo
from imgserve.spec import JobSpec, OutputRequest
from imgserve.transports.base import Target

VERSION = 2
"""The stored plan's shape. 1: the flat single-output dict of the first 0.3
release (no ``version`` key); 2: a source and a list of outputs."""


@dataclass(frozen=True)
class Rendition:
    """One output of a job and where it goes."""

    plan: OutputPlan
    dst_url: str
    """The destination, tags filled in."""


@dataclass(frozen=True)
class JobPlan:
    """What a job reads and produces, known before any pixel is decoded."""

    operation: str
    source_info: SourceInfo
    outputs: tuple[Rendition, ...]

    # 0.2's view of a job (its reply, log line and GET /jobs/<id>): the first output.
    @property
    def first(self) -> Rendition:
        return self.outputs[0]

    @property
    def source(self) -> Size:
        return self.source_info.size

    @property
    def source_format(self) -> Format:
        return self.source_info.format

    @property
    def pages(self) -> int:
        return self.source_info.pages

    @property
    def result(self) -> Size:
        return self.first.plan.result

    @property
    def output(self) -> Format:
        return self.first.plan.output

    @property
    def animated(self) -> bool:
        return self.first.plan.animated

    @property
    def content_type(self) -> str:
        return self.first.plan.content_type

    @property
    def dst_url(self) -> str:
        return self.first.dst_url

    def to_dict(self) -> dict[str, Any]:
        info = self.source_info
        return {
            "version": VERSION,
            "operation": self.operation,
            "source": {
                "format": info.format.value,
                "size": [info.size.width, info.size.height],
                "pages": info.pages,
                "svg_size": list(info.svg_size) if info.svg_size is not None else None,
                "orientation": info.orientation,
                "has_alpha": info.has_alpha,
            },
            "outputs": [{**r.plan.to_dict(), "dst_url": r.dst_url} for r in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobPlan:
        """Read a stored plan of any version; fields this version does not know
        (a later release's) are ignored."""
        if data.get("version", 1) == 1:
            return _from_version_1(data)
        source = data["source"]
        svg_size = source.get("svg_size")
        info = SourceInfo(
            format=Format(source["format"]),
            size=Size(*source["size"]),
            pages=source["pages"],
            svg_size=(svg_size[0], svg_size[1]) if svg_size is not None else None,
            orientation=source.get("orientation", 1),
            has_alpha=source.get("has_alpha", False),
        )
        outputs = tuple(
            Rendition(OutputPlan.from_dict(out), out["dst_url"]) for out in data["outputs"]
        )
        return cls(data["operation"], info, outputs)


def _from_version_1(data: dict[str, Any]) -> JobPlan:
    """The first 0.3 release's flat ``Plan.to_dict()`` (jobs still in a queue at upgrade)."""
    info = SourceInfo(Format(data["source_format"]), Size(*data["source"]), data["pages"])
    output = Format(data["output"])
    rasterize = data["operation"] == "rasterize"
    result = Size(*data["result"])
    out = OutputPlan(
        result=result,
        output=output,
        gravity=data.get("gravity", "centre"),
        quality=data.get("quality"),
        keep_metadata=data.get("keep_metadata", False),
        svg_scale=data.get("svg_scale"),
        animated=not rasterize and pipeline.animates(info.format, info.pages, output),
        # As plan() makes them today: 0.2's resize covers the box, rasterize fits inside.
        fit="inside" if rasterize else "cover",
        scaled=result if rasterize else cover_size(info.size, result)[0],
    )
    return JobPlan(data["operation"], info, (Rendition(out, data["dst_url"]),))


def plan(spec: JobSpec, data: bytes, limits: ImagingLimits) -> JobPlan:
    """Check the source against the job and the limits; size every output and fill
    in its destination.

    A ``POST /jobs`` job's errors name the output they are about
    (``outputs[2]: ...``); 0.2's single output keeps 0.2's details.
    """
    info = pipeline.inspect(spec.operation or "any", data, limits)
    # {$ext} names the source's extension; an SVG cannot be written, so a
    # destination that keeps "the source's format" gets PNG.
    tag_extension = (
        formats.CANONICAL_EXTENSION[Format.PNG]
        if info.vector
        else spec.extension or formats.CANONICAL_EXTENSION[info.format]
    )
    named = spec.operation is None
    renditions = []
    for index, out in enumerate(spec.outputs):
        path = f"outputs[{index}]"
        try:
            renditions.append(_plan_output(info, out, tag_extension, spec.basename, limits, path))
        except errors.ImgserveError as exc:
            if not named or exc.detail.startswith(path):
                raise
            raise type(exc)(f"{path}: {exc.detail}") from exc
    if len(renditions) > 1:
        _check_job_pixels(renditions, info, limits)
    operation = spec.operation or ("rasterize" if info.vector else "resize")
    return JobPlan(operation, info, tuple(renditions))


def _check_job_pixels(renditions: list[Rendition], info: SourceInfo, limits: ImagingLimits) -> None:
    """Refuse a job whose outputs together are more than one worker task should make."""
    total = sum(
        max(r.plan.result.pixels, pipeline.decode_size(info, r.plan).pixels) for r in renditions
    )
    if total > limits.max_job_pixels:
        raise errors.ResultOverLimit(
            f"outputs: {len(renditions)} outputs of {total} pixels together, over the "
            f"limit of {limits.max_job_pixels} for one job"
        )


def _plan_output(
    info: SourceInfo,
    out: OutputRequest,
    tag_extension: str,
    basename: str,
    limits: ImagingLimits,
    path: str,
) -> Rendition:
    output = out.format or formats.output_format(destination_extension(out.url, tag_extension))
    if output is None:
        extension = destination_extension(out.url, tag_extension)
        raise errors.DstExtensionUnsupported(
            f"destination extension {extension or '(none)'!r} is not one of "
            f"{', '.join(sorted(formats.OUTPUT_EXTENSIONS))}"
        )
    if out.scale is not None and not info.vector:
        raise errors.JobFieldInvalid(
            f"{path}.scale: applies to SVG sources; this source is {info.format.value}"
        )
    _check_operations(info, out, path)
    spec = OutputSpec(
        format=output,
        width=out.width,
        height=out.height,
        scale=out.scale,
        fit=out.fit,
        enlarge=out.enlarge,
        refuse_small=out.refuse_small,
        gravity=out.gravity,
        background=out.background,
        quality=out.quality,
        keep_metadata=out.keep_metadata,
        ops=out.ops,
        blurhash_components=out.blurhash_components,
    )
    planned = pipeline.plan_output(info, spec, limits)
    mark = out.ops.watermark
    if mark is not None and 2 * mark.margin >= min(planned.result.width, planned.result.height):
        raise errors.JobFieldInvalid(
            f"{path}.watermark.margin: {mark.margin} px on each side leaves no room in the "
            f"{planned.result.width}x{planned.result.height} result"
        )
    dst_url = substitute(
        out.url,
        width=planned.result.width,
        height=planned.result.height,
        basename=basename,
        extension=tag_extension,
    )
    return Rendition(planned, dst_url)


def _check_operations(info: SourceInfo, out: OutputRequest, path: str) -> None:
    """What an output's operations ask that only the source can refuse (703)."""
    crop = out.ops.crop
    if crop is not None:
        if info.vector:
            raise errors.JobFieldInvalid(
                f"{path}.crop: applies to raster sources (for an SVG, crop its viewBox)"
            )
        if crop.outside(info.size):
            raise errors.JobFieldInvalid(
                f"{path}.crop: {crop.width}x{crop.height} at ({crop.left}, {crop.top}) is "
                f"outside the {info.size.width}x{info.size.height} source (sizes after its "
                "EXIF orientation)"
            )
    if info.vector and not out.ops.right_angle:
        raise errors.JobFieldInvalid(
            f"{path}.rotate: an SVG source turns by 90, 180 or 270 degrees only"
        )


def targets(spec: JobSpec, job_plan: JobPlan) -> list[Target]:
    """Where each output of the plan uploads to, in the plan's order."""
    return [
        destination_target(rendition.dst_url, out.form_field)
        for out, rendition in zip(spec.outputs, job_plan.outputs, strict=True)
    ]


def render(
    job_plan: JobPlan, data: bytes, limits: ImagingLimits, *, planned: bool = False
) -> list[bytes]:
    """Every output's bytes (``render_outputs`` without what they look like)."""
    return [out.data for out in render_outputs(job_plan, data, limits, planned=planned)]


def render_outputs(
    job_plan: JobPlan, data: bytes, limits: ImagingLimits, *, planned: bool = False
) -> list[pipeline.Rendered]:
    """Every output of the plan, in order, from one decode of the source bytes (see
    pipeline.render_outputs)."""
    outs = [rendition.plan for rendition in job_plan.outputs]
    return pipeline.render_outputs(data, job_plan.source_info, outs, limits, planned=planned)
