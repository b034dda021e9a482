"""Result sizes and crop windows: pure arithmetic, table-driven."""

from __future__ import annotations

import pytest

from imgserve import errors
from imgserve.imaging import geometry
from imgserve.imaging.geometry import Size

# (case id, source, width, height, enlarge, expected result)
RESIZE: list[tuple[str, Size, int | None, int | None, bool, Size]] = [
    ("both, landscape into square", Size(400, 200), 100, 100, False, Size(100, 100)),
    ("both, portrait into landscape", Size(300, 600), 200, 50, False, Size(200, 50)),
    ("both, exact source size", Size(640, 480), 640, 480, False, Size(640, 480)),
    ("width only", Size(400, 200), 100, None, False, Size(100, 50)),
    ("height only", Size(400, 200), None, 50, False, Size(100, 50)),
    ("width only, rounds half up", Size(3, 1), 2, None, False, Size(2, 1)),
    ("width only, 1000x3 to 10 keeps 1 px", Size(1000, 3), 10, None, False, Size(10, 1)),
    ("height only, 3x1000 to 10 keeps 1 px", Size(3, 1000), None, 10, False, Size(1, 10)),
    ("width only, odd ratio", Size(1920, 1080), 333, None, False, Size(333, 187)),
    ("height only, odd ratio", Size(1920, 1080), None, 333, False, Size(592, 333)),
    ("enlarge both", Size(10, 10), 100, 50, True, Size(100, 50)),
    ("enlarge width only", Size(10, 20), 100, None, True, Size(100, 200)),
    ("enlarge height only", Size(10, 20), None, 100, True, Size(50, 100)),
]


@pytest.mark.parametrize(
    ("src", "width", "height", "enlarge", "expected"),
    [pytest.param(s, w, h, e, x, id=name) for name, s, w, h, e, x in RESIZE],
)
def test_resize_result(
    src: Size, width: int | None, height: int | None, enlarge: bool, expected: Size
) -> None:
    """resize fills both dimensions exactly, or keeps the aspect ratio with one."""
    assert geometry.resize_result(src, width, height, enlarge) == expected


@pytest.mark.parametrize(
    ("src", "width", "height"),
    [
        pytest.param(Size(50, 50), 100, 10, id="too narrow"),
        pytest.param(Size(50, 50), 10, 100, id="too short"),
        pytest.param(Size(50, 50), 51, None, id="width only"),
        pytest.param(Size(50, 50), None, 51, id="height only"),
        pytest.param(Size(50, 50), 60, 60, id="both"),
    ],
)
def test_resize_smaller_source_refused_without_enlarge(
    src: Size, width: int | None, height: int | None
) -> None:
    """A source smaller than the box in either dimension is 203 unless enlarging."""
    with pytest.raises(errors.EnlargeNotAllowed) as info:
        geometry.resize_result(src, width, height, enlarge=False)
    assert info.value.code == 203
    assert geometry.resize_result(src, width, height, enlarge=True).width >= 1


def test_resize_needs_a_dimension() -> None:
    """resize with neither width nor height is 106."""
    with pytest.raises(errors.WidthInvalid):
        geometry.resize_result(Size(10, 10), None, None, enlarge=False)


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (1, Size(300, 200)),
        (2, Size(300, 200)),
        (3, Size(300, 200)),
        (4, Size(300, 200)),
        (5, Size(200, 300)),
        (6, Size(200, 300)),
        (7, Size(200, 300)),
        (8, Size(200, 300)),
        (0, Size(300, 200)),
        (9, Size(300, 200)),
    ],
)
def test_oriented_swaps_for_quarter_turns(orientation: int, expected: Size) -> None:
    """EXIF orientations 5-8 swap width and height; 1-4 (and junk) keep them."""
    assert geometry.oriented(Size(300, 200), orientation) == expected


@pytest.mark.parametrize(
    ("orientation", "width", "expected"),
    [(1, 60, Size(60, 40)), (3, 60, Size(60, 40)), (6, 60, Size(60, 90)), (8, 60, Size(60, 90))],
)
def test_resize_result_uses_the_upright_size(orientation: int, width: int, expected: Size) -> None:
    """A width-only resize of an EXIF-rotated photo follows its upright aspect ratio."""
    upright = geometry.oriented(Size(300, 200), orientation)
    assert geometry.resize_result(upright, width, None, enlarge=False) == expected


@pytest.mark.parametrize(
    ("src", "box", "scaled", "width_binds"),
    [
        (Size(400, 200), Size(100, 100), Size(200, 100), False),
        (Size(200, 400), Size(100, 100), Size(100, 200), True),
        (Size(400, 200), Size(200, 100), Size(200, 100), True),
        (Size(1920, 1080), Size(300, 300), Size(533, 300), False),
        (Size(1080, 1920), Size(300, 300), Size(300, 533), True),
        (Size(3, 1000), Size(10, 10), Size(10, 3333), True),
        (Size(10, 10), Size(100, 50), Size(100, 100), True),
    ],
)
def test_cover_size(src: Size, box: Size, scaled: Size, width_binds: bool) -> None:
    """The scaled source covers the box; the binding side equals it."""
    assert geometry.cover_size(src, box) == (scaled, width_binds)
    assert scaled.width >= box.width
    assert scaled.height >= box.height


# Cropping a 100x100 window out of 300x200 (spare 200 across, 100 down).
GRAVITY_OFFSETS = [
    ("centre", (100, 50)),
    ("center", (100, 50)),
    ("north", (100, 0)),
    ("south", (100, 100)),
    ("east", (200, 50)),
    ("west", (0, 50)),
    ("northeast", (200, 0)),
    ("northwest", (0, 0)),
    ("southeast", (200, 100)),
    ("southwest", (0, 100)),
]


@pytest.mark.parametrize(("gravity", "offsets"), GRAVITY_OFFSETS)
def test_crop_offsets_for_every_gravity(gravity: str, offsets: tuple[int, int]) -> None:
    """Each compass gravity keeps its side or corner of the scaled image."""
    assert geometry.crop_offsets(Size(300, 200), Size(100, 100), gravity) == offsets


def test_crop_offsets_cover_every_compass_gravity() -> None:
    """The table above names every compass gravity geometry accepts."""
    assert {g for g, _ in GRAVITY_OFFSETS} == set(geometry.COMPASS)
    assert set(geometry.COMPASS) | {"smart"} == geometry.GRAVITIES


@pytest.mark.parametrize("gravity", sorted(geometry.COMPASS))
def test_crop_offsets_without_spare_room_are_zero(gravity: str) -> None:
    """A window as large as the image (or larger) starts at the origin."""
    assert geometry.crop_offsets(Size(100, 100), Size(100, 100), gravity) == (0, 0)
    assert geometry.crop_offsets(Size(90, 80), Size(100, 100), gravity) == (0, 0)


def test_crop_offsets_odd_spare_rounds_down() -> None:
    """An odd spare pixel goes to the far side for centre."""
    assert geometry.crop_offsets(Size(101, 51), Size(100, 50), "centre") == (0, 0)
    assert geometry.crop_offsets(Size(103, 53), Size(100, 50), "centre") == (1, 1)


@pytest.mark.parametrize(
    ("centre", "expected"),
    [
        ((150, 100), (100, 50)),
        ((0, 0), (0, 0)),
        ((299, 199), (200, 100)),
        ((60, 150), (10, 100)),
    ],
)
def test_window_around_stays_inside(centre: tuple[int, int], expected: tuple[int, int]) -> None:
    """A smart-crop window centres on the point but never leaves the image."""
    assert geometry.window_around(Size(300, 200), Size(100, 100), *centre) == expected


# (case id, intrinsic size, width, height, scale, expected result)
RASTERIZE: list[tuple[str, tuple[float, float], int | None, int | None, float | None, Size]] = [
    ("width", (128, 64), 256, None, None, Size(256, 128)),
    ("height", (128, 64), None, 32, None, Size(64, 32)),
    ("both, width binds", (128, 64), 100, 100, None, Size(100, 50)),
    ("both, height binds", (64, 128), 100, 100, None, Size(50, 100)),
    ("both, same aspect", (1920, 1080), 1280, 720, None, Size(1280, 720)),
    ("scale down", (1920, 1080), None, None, 0.25, Size(480, 270)),
    ("scale up", (16, 16), None, None, 2.5, Size(40, 40)),
    ("fractional intrinsic size", (793.7, 1122.5), 200, None, None, Size(200, 283)),
    ("fractional, height", (98.42, 477.086), None, 383, None, Size(79, 383)),
    ("tiny drawing keeps 1 px", (1000, 1), 10, None, None, Size(10, 1)),
]


@pytest.mark.parametrize(
    ("intrinsic", "width", "height", "scale", "expected"),
    [pytest.param(i, w, h, s, x, id=name) for name, i, w, h, s, x in RASTERIZE],
)
def test_rasterize_result(
    intrinsic: tuple[float, float],
    width: int | None,
    height: int | None,
    scale: float | None,
    expected: Size,
) -> None:
    """rasterize keeps the aspect ratio, fits inside a box, or multiplies by scale."""
    result, factor = geometry.rasterize_result(*intrinsic, width, height, scale)
    assert result == expected
    assert factor > 0
    if width is not None and height is not None:
        assert result.width <= width and result.height <= height
        assert result.width == width or result.height == height


def test_rasterize_requested_side_is_exact() -> None:
    """The requested side is exact for many awkward intrinsic sizes."""
    for intrinsic in range(7, 400, 13):
        for target in (1, 99, 333, 1001):
            by_width, _ = geometry.rasterize_result(intrinsic + 0.3, 77.7, target, None, None)
            by_height, _ = geometry.rasterize_result(55.5, intrinsic + 0.6, None, target, None)
            assert by_width.width == target
            assert by_height.height == target


def test_rasterize_needs_a_size() -> None:
    """rasterize with no width, height or scale is 106."""
    with pytest.raises(errors.WidthInvalid):
        geometry.rasterize_result(10, 10, None, None, None)


@pytest.mark.parametrize(
    ("value", "expected"), [(0.5, 1), (1.49, 1), (1.5, 2), (2.5, 3), (0.49, 0)]
)
def test_round_half_up(value: float, expected: int) -> None:
    """Halves round up (Python's round() would round 2.5 to 2)."""
    assert geometry.round_half_up(value) == expected


# (case id, source, width, height, fit, enlarge, scaled, result)
WH = tuple[int, int]
# Sizes as (width, height) to keep the table one case a line.
FIT: list[tuple[str, WH, int | None, int | None, str, bool, WH, WH]] = [
    ("cover crops to the box", (400, 200), 100, 100, "cover", False, (200, 100), (100, 100)),
    ("contain pads to the box", (400, 200), 100, 100, "contain", False, (100, 50), (100, 100)),
    ("fill stretches to the box", (400, 200), 100, 100, "fill", False, (200, 100), (100, 100)),
    ("inside fits within", (400, 200), 100, 100, "inside", False, (100, 50), (100, 50)),
    ("outside covers uncropped", (400, 200), 100, 100, "outside", False, (200, 100), (200, 100)),
    ("tall cover", (200, 400), 100, 100, "cover", False, (100, 200), (100, 100)),
    ("tall contain", (200, 400), 100, 100, "contain", False, (50, 100), (100, 100)),
    ("small, cover keeps the source", (50, 40), 100, 100, "cover", False, (50, 40), (50, 40)),
    ("small, contain still pads", (50, 40), 100, 100, "contain", False, (50, 40), (100, 100)),
    ("small, fill capped per side", (50, 40), 100, 30, "fill", False, (50, 40), (50, 30)),
    ("small, inside", (50, 40), 100, 100, "inside", False, (50, 40), (50, 40)),
    ("small, outside", (50, 40), 100, 100, "outside", False, (50, 40), (50, 40)),
    ("enlarged cover", (50, 40), 100, 100, "cover", True, (125, 100), (100, 100)),
    ("enlarged contain", (50, 40), 100, 100, "contain", True, (100, 80), (100, 100)),
    ("enlarged fill", (50, 40), 100, 100, "fill", True, (125, 100), (100, 100)),
    ("enlarged inside", (50, 40), 100, 100, "inside", True, (100, 80), (100, 80)),
    ("enlarged outside", (50, 40), 100, 100, "outside", True, (125, 100), (125, 100)),
    ("taller, cover, covered part", (400, 200), 300, 300, "cover", False, (400, 200), (300, 200)),
    ("taller, contain", (400, 200), 300, 300, "contain", False, (300, 150), (300, 300)),
    ("taller, fill", (400, 200), 300, 300, "fill", False, (400, 200), (300, 200)),
    ("taller, outside", (400, 200), 300, 300, "outside", False, (400, 200), (400, 200)),
    ("width only ignores the fit", (400, 200), 100, None, "contain", False, (100, 50), (100, 50)),
    ("height only ignores the fit", (400, 200), None, 50, "fill", False, (100, 50), (100, 50)),
    ("width only, small kept", (400, 200), 800, None, "cover", False, (400, 200), (400, 200)),
    ("width only, enlarged", (400, 200), 800, None, "cover", True, (800, 400), (800, 400)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("src", "width", "height", "fit", "enlarge", "scaled", "result"),
    [
        pytest.param(Size(*s), w, h, f, e, Size(*x), Size(*r), id=name)
        for name, s, w, h, f, e, x, r in FIT
    ],
)
def test_fit_size(
    src: Size,
    width: int | None,
    height: int | None,
    fit: str,
    enlarge: bool,
    scaled: Size,
    result: Size,
) -> None:
    """Each fit mode scales (capped at 1 unless enlarging) and sizes the result as sharp does."""
    assert geometry.fit_size(src, width, height, fit, enlarge) == geometry.Fitted(scaled, result)


@pytest.mark.parametrize(("name", "src", "width", "height", "enlarge", "_x"), RESIZE)
def test_fit_size_refusing_small_sources_is_resize_result(
    name: str, src: Size, width: int | None, height: int | None, enlarge: bool, _x: Size
) -> None:
    """cover with refuse_small (0.2's POST /) gives resize_result's size for every case."""
    fitted = geometry.fit_size(src, width, height, "cover", enlarge, refuse_small=True)
    assert fitted.result == geometry.resize_result(src, width, height, enlarge), name


def test_fit_size_refuse_small_is_203() -> None:
    """refuse_small refuses a smaller source (203) where the default keeps its size."""
    with pytest.raises(errors.EnlargeNotAllowed):
        geometry.fit_size(Size(50, 40), 100, 100, "cover", False, refuse_small=True)
    assert geometry.fit_size(Size(50, 40), 100, 100, "cover", False).result == Size(50, 40)
    fitted = geometry.fit_size(Size(50, 40), 100, 100, "cover", True, refuse_small=True)
    assert fitted.result == Size(100, 100)


# (fit, scaled (the drawing rendered), result) for an 80x40 drawing in a 100x100 box
SVG_FIT = [
    ("cover", Size(200, 100), Size(100, 100), 2.5),
    ("contain", Size(100, 50), Size(100, 100), 1.25),
    ("fill", Size(200, 100), Size(100, 100), 2.5),
    ("inside", Size(100, 50), Size(100, 50), 1.25),
    ("outside", Size(200, 100), Size(200, 100), 2.5),
]


@pytest.mark.parametrize(("fit", "scaled", "result", "factor"), SVG_FIT)
def test_svg_fit_size(fit: str, scaled: Size, result: Size, factor: float) -> None:
    """A drawing renders at the fit's factor (larger for cover/outside/fill), then is cut
    or padded to the box; enlarging never applies."""
    fitted, got = geometry.svg_fit_size(80, 40, 100, 100, None, fit)
    assert fitted == geometry.Fitted(scaled, result)
    assert got == pytest.approx(factor)


def test_svg_fit_size_keeps_rasterize_for_inside_and_scale() -> None:
    """inside, one side and scale are 0.2's rasterize_result exactly."""
    for args in ((100, 100, None), (100, None, None), (None, None, 2.5)):
        result, factor = geometry.rasterize_result(80, 40, *args)
        assert geometry.svg_fit_size(80, 40, *args, "inside") == (
            geometry.Fitted(result, result),
            factor,
        )
    assert geometry.svg_fit_size(80, 40, 100, None, None, "cover")[0].result == Size(100, 50)


@pytest.mark.parametrize(
    ("scaled", "box", "gravity", "offsets"),
    [
        (Size(100, 50), Size(100, 100), "centre", (0, 25)),
        (Size(100, 50), Size(100, 100), "north", (0, 0)),
        (Size(100, 50), Size(100, 100), "south", (0, 50)),
        (Size(50, 100), Size(100, 100), "east", (50, 0)),
        (Size(50, 100), Size(100, 100), "smart", (25, 0)),
    ],
)
def test_pad_offsets(scaled: Size, box: Size, gravity: str, offsets: tuple[int, int]) -> None:
    """contain places the image in its box by gravity (smart: centred)."""
    assert geometry.pad_offsets(scaled, box, gravity) == offsets
