"""What an output looks like (imaging/preview.py): the hashes checked against
independent decoders, the colours against the pixels.

BlurHash is decoded with halcy's ``blurhash`` (pure Python) and ThumbHash with
``thumbhash-rs`` (evanw's reference Rust crate): neither shares code with the
encoders describe uses. A decoded preview's mean colour is compared with the
image's own mean, computed here from every pixel of the first frame (describe
only samples): BlurHash's mean in linear light (its DC term is a linear mean),
ThumbHash's in sRGB (it works on sRGB values), both alpha-weighted.
"""

from __future__ import annotations

import base64
from pathlib import Path

import blurhash as halcy_blurhash
import numpy as np
import pytest
import pyvips
import thumbhash as reference_thumbhash  # thumbhash-rs: evanw's Rust crate
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imgserve import errors
from imgserve.imaging import preview
from imgserve.imaging.preview import Preview, describe

from .conftest import BLUE, GREEN, RED, animation, corpus

Colour = tuple[int, int, int]

# Real images, as the pipeline has them before encoding (sRGB, shrunk to an output size).
CORPUS = {
    "autumn-jpeg": Path("/usr/share/wallpapers/Autumn/contents/images/640x480.jpg"),
    "fallenleaf-jpeg": Path("/usr/share/wallpapers/FallenLeaf/contents/images/1600x1200.jpg"),
    "altai-png": Path("/usr/share/wallpapers/Altai/contents/images/1080x1920.png"),
    "emerald-png-alpha": Path("/usr/share/desktop-base/emerald-theme/grub/grub-4x3.png"),
    "debian-logo-alpha": Path("/usr/share/desktop-base/debian-logos/logo-256.png"),
}
# Decoded previews are blurs of a few components: their mean is the image's within this.
BLURHASH_TOLERANCE = 10
THUMBHASH_TOLERANCE = 12


def _hex(colour: Colour) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def flat(width: int, height: int, colour: tuple[int, ...]) -> pyvips.Image:
    """A flat sRGB (or sRGB + alpha) image of one colour."""
    image = pyvips.Image.black(width, height, bands=len(colour)) + list(colour)
    return image.cast("uchar").copy(interpretation="srgb")


def gradient(width: int, height: int) -> pyvips.Image:
    """Red rising left to right, green top to bottom, blue constant; smooth, as in a
    photo's sky (at most 4 levels a pixel), on a side of any length."""
    xy = pyvips.Image.xyz(width, height)
    red = xy[0] * min(4, 255 / max(1, width - 1))
    green = xy[1] * min(4, 255 / max(1, height - 1))
    image = red.bandjoin([green, red * 0 + 60])
    return image.cast("uchar").copy(interpretation="srgb")


def split(width: int, height: int, major: Colour, minor: Colour, fraction: float) -> pyvips.Image:
    """``major`` over the left ``fraction`` of the width, ``minor`` over the rest."""
    cut = round(width * fraction)
    left = pyvips.Image.xyz(width, height)[0] < cut
    return left.ifthenelse(list(major), list(minor)).cast("uchar").copy(interpretation="srgb")


def rgba_of(image: pyvips.Image) -> np.ndarray:
    """Every pixel of the first frame as float RGBA 0-255 (alpha 255 where none)."""
    if image.get_typeof("page-height"):
        image = image.crop(0, 0, image.width, image.get("page-height"))
    peak = 65535.0 if image.format == "ushort" else 255.0
    array = image.numpy().astype(np.float64).reshape(image.height, image.width, image.bands)
    array *= 255.0 / peak
    colour = np.repeat(array[..., :1], 3, axis=2) if image.bands < 3 else array[..., :3]
    opaque = np.full((*colour.shape[:2], 1), 255.0)
    alpha = array[..., -1:] if image.hasalpha() else opaque
    return np.concatenate([colour, alpha], axis=2)


def srgb_to_linear(values: np.ndarray) -> np.ndarray:
    v = values / 255.0
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(values: np.ndarray) -> np.ndarray:
    v = np.clip(values, 0.0, 1.0)
    return 255.0 * np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


def weighted_mean(rgba: np.ndarray) -> np.ndarray:
    """Alpha-weighted mean of the colour channels."""
    flat_rgba = rgba.reshape(-1, 4)
    weights = flat_rgba[:, 3]
    return (flat_rgba[:, :3] * weights[:, None]).sum(axis=0) / weights.sum()


def image_linear_mean_srgb(rgba: np.ndarray) -> np.ndarray:
    """The image's alpha-weighted mean in linear light, back in sRGB units."""
    linear = np.concatenate([srgb_to_linear(rgba[..., :3]), rgba[..., 3:]], axis=2)
    return linear_to_srgb(weighted_mean(linear))


def blurhash_mean_srgb(result: Preview) -> np.ndarray:
    """Mean of the BlurHash decoded by halcy's blurhash, in linear light, in sRGB units."""
    decoded = np.array(halcy_blurhash.decode(result.blurhash, 32, 32, linear=True))
    return linear_to_srgb(decoded.reshape(-1, 3).mean(axis=0))


def thumbhash_decoded(result: Preview) -> np.ndarray:
    """The ThumbHash decoded by thumbhash-rs, as float RGBA (height, width, 4)."""
    hashed = base64.b64decode(result.thumbhash)
    width, height, pixels = reference_thumbhash.thumb_hash_to_rgba(hashed)
    return np.frombuffer(pixels, dtype=np.uint8).astype(np.float64).reshape(height, width, 4)


def assert_close(found: np.ndarray, expected: np.ndarray, tolerance: float, what: str) -> None:
    difference = np.abs(np.asarray(found, dtype=np.float64) - expected).max()
    assert difference <= tolerance, f"{what}: {np.round(found)} vs {np.round(expected)}"


def assert_hashes_match(image: pyvips.Image, result: Preview) -> None:
    """Both decoded previews have the image's mean colour, within the tolerances."""
    rgba = rgba_of(image)
    assert_close(
        blurhash_mean_srgb(result), image_linear_mean_srgb(rgba), BLURHASH_TOLERANCE, "BlurHash"
    )
    assert_close(
        weighted_mean(thumbhash_decoded(result)),
        weighted_mean(rgba),
        THUMBHASH_TOLERANCE,
        "ThumbHash",
    )


def hex_to_rgb(text: str) -> np.ndarray:
    return np.array([int(text[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


@pytest.fixture(scope="module", params=sorted(CORPUS))
def corpus_image(request: pytest.FixtureRequest) -> pyvips.Image:
    """A corpus file rendered 640 wide, in memory, as the pipeline has it before saving."""
    data = corpus(CORPUS[request.param])
    return pyvips.Image.thumbnail_buffer(data, 640).copy_memory()


# --- the hashes against independent decoders ---------------------------------------


def test_corpus_hashes_decode_to_the_image_mean(corpus_image: pyvips.Image) -> None:
    """Real photos and drawings (with and without alpha): both hashes decode, with
    independent decoders, to previews of the image's mean colour."""
    result = describe(corpus_image)
    assert halcy_blurhash.components(result.blurhash) == (4, 3)
    assert_hashes_match(corpus_image, result)


def test_corpus_average_colour_is_the_mean_of_every_visible_pixel(
    corpus_image: pyvips.Image,
) -> None:
    """The average colour of a sample is the alpha-weighted mean of all the pixels."""
    result = describe(corpus_image)
    assert_close(
        hex_to_rgb(result.average_color), weighted_mean(rgba_of(corpus_image)), 8, "average"
    )


@pytest.mark.parametrize(
    ("width", "height"), [(300, 200), (1, 1), (4000, 2), (2, 4000), (2600, 1600)]
)
def test_gradient_hashes_decode_to_the_image_mean(width: int, height: int) -> None:
    """Gradients of any shape, from one pixel to very wide and past the whole-fetch
    size, give hashes that decode to the image's mean colour."""
    image = gradient(width, height).copy_memory()
    result = describe(image)
    assert_hashes_match(image, result)
    assert_close(hex_to_rgb(result.average_color), weighted_mean(rgba_of(image)), 8, "average")


def test_thumbhash_keeps_the_aspect_ratio() -> None:
    """ThumbHash records the frame's shape: a landscape output decodes landscape."""
    result = describe(gradient(640, 360).copy_memory())
    decoded = thumbhash_decoded(result)
    assert decoded.shape[1] > decoded.shape[0]
    ratio = reference_thumbhash.thumb_hash_to_approximate_aspect_ratio(
        base64.b64decode(result.thumbhash)
    )
    assert ratio == pytest.approx(640 / 360, rel=0.2)


def test_thumbhash_is_standard_base64() -> None:
    """The ThumbHash is standard base64 with padding (not the URL-safe alphabet)."""
    text = describe(gradient(300, 200).copy_memory()).thumbhash
    assert base64.b64encode(base64.b64decode(text, validate=True)).decode() == text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.integers(1, 9), y=st.integers(1, 9))
def test_blurhash_has_the_components_asked_for(x: int, y: int) -> None:
    """Any component count 1..9 on each axis is the one the hash holds, and decodes
    to the image's mean."""
    image = gradient(200, 150).copy_memory()
    result = describe(image, (x, y))
    assert halcy_blurhash.components(result.blurhash) == (x, y)
    assert_close(
        blurhash_mean_srgb(result),
        image_linear_mean_srgb(rgba_of(image)),
        BLURHASH_TOLERANCE,
        "BlurHash",
    )


# --- colours ------------------------------------------------------------------------


rgb_colours = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))


@settings(max_examples=60, deadline=None)
@given(colour=rgb_colours, width=st.integers(1, 400), height=st.integers(1, 400))
def test_flat_image_gives_exactly_its_colour(colour: Colour, width: int, height: int) -> None:
    """A flat image of any size: dominant and average are exactly its colour, and the
    decoded ThumbHash is that colour too (within its quantisation)."""
    result = describe(flat(width, height, colour).copy_memory())
    assert result.dominant_color == _hex(colour)
    assert result.average_color == _hex(colour)
    assert_close(
        weighted_mean(thumbhash_decoded(result)),
        np.array(colour),
        THUMBHASH_TOLERANCE,
        "ThumbHash",
    )


@settings(max_examples=40, deadline=None)
@given(colour=rgb_colours, alpha=st.integers(1, 255), width=st.integers(1, 300))
def test_flat_translucent_image_gives_exactly_its_colour(
    colour: Colour, alpha: int, width: int
) -> None:
    """A flat image with the same alpha everywhere still gives exactly its colour."""
    result = describe(flat(width, 50, (*colour, alpha)).copy_memory())
    assert result.dominant_color == _hex(colour)
    assert result.average_color == _hex(colour)


def test_transparent_pixels_do_not_count() -> None:
    """A red square on a fully transparent green canvas is red, dominant and average,
    and so is what both hashes decode to where the preview is opaque."""
    canvas = flat(200, 200, (0, 255, 0, 0))
    image = canvas.insert(flat(80, 80, (255, 0, 0, 255)), 60, 60).copy_memory()
    result = describe(image)
    assert result.dominant_color == "#ff0000"
    assert result.average_color == "#ff0000"
    assert_hashes_match(image, result)


def test_fully_transparent_image_takes_the_plain_mean() -> None:
    """Nothing visible: the colours are the plain mean of the (invisible) pixels."""
    result = describe(flat(20, 20, (10, 20, 30, 0)).copy_memory())
    assert (result.dominant_color, result.average_color) == ("#0a141e", "#0a141e")


@pytest.mark.parametrize("fraction", [0.7, 0.6, 0.9])
def test_two_colour_image_gives_the_larger_part_as_dominant(fraction: float) -> None:
    """70/30 (and 60/40, 90/10): the larger part's colour is dominant; the average
    lies between the two."""
    image = split(640, 400, RED, BLUE, fraction).copy_memory()
    result = describe(image)
    assert result.dominant_color == _hex(RED)
    average = hex_to_rgb(result.average_color)
    assert_close(average, np.array(RED) * fraction + np.array(BLUE) * (1 - fraction), 8, "avg")


@settings(max_examples=50, deadline=None)
@given(
    major=rgb_colours,
    minor=rgb_colours,
    fraction=st.floats(0.6, 0.95),
    width=st.integers(10, 3000),
    height=st.integers(1, 300),
)
def test_the_larger_of_two_colours_is_dominant(
    major: Colour, minor: Colour, fraction: float, width: int, height: int
) -> None:
    """Any two colours that quantise apart, any split from 60/40, any size: the
    larger part's colour, exactly."""
    assume(any(a >> 4 != b >> 4 for a, b in zip(major, minor, strict=True)))
    result = describe(split(width, height, major, minor, fraction).copy_memory())
    assert result.dominant_color == _hex(major)


def test_grey_images_give_grey_colours() -> None:
    """One-band (b-w) images, and grey with alpha, give grey colours and hashes."""
    grey = (pyvips.Image.black(120, 80) + 77).cast("uchar").copy(interpretation="b-w")
    result = describe(grey.copy_memory())
    assert (result.dominant_color, result.average_color) == ("#4d4d4d", "#4d4d4d")
    assert_hashes_match(grey, result)
    grey_alpha = grey.bandjoin(200).copy(interpretation="b-w").copy_memory()
    assert describe(grey_alpha).average_color == "#4d4d4d"


def test_sixteen_bit_images_are_scaled() -> None:
    """16-bit pixels are scaled to 8-bit colours."""
    image = pyvips.Image.black(64, 64).cast("ushort").new_from_image([65535, 32896, 0])
    result = describe(image.copy(interpretation="rgb16").copy_memory())
    assert result.average_color == "#ff8000"


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_animation_describes_its_first_frame(fmt: str) -> None:
    """An animated GIF or WebP, decoded with every frame (a strip ``page-height``
    tall), is described by its first frame only."""
    strip = animation(60, 40, [GREEN, RED, BLUE])
    data = strip.gifsave_buffer() if fmt == "gif" else strip.webpsave_buffer(lossless=True)
    image = pyvips.Image.new_from_buffer(data, "", n=-1).copy_memory()
    assert image.height == 3 * image.get("page-height")
    result = describe(image)
    assert (result.dominant_color, result.average_color) == (_hex(GREEN), _hex(GREEN))
    assert_hashes_match(image, result)


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "components",
    [(0, 3), (4, 0), (10, 3), (4, 10), (-1, 1), (True, 3), (4.0, 3), (4,), (4, 3, 1), ("4", 3)],
)
def test_components_out_of_bounds_are_refused(components: tuple[int, int]) -> None:
    """Components outside 1..9 each, or not two integers, raise a ValueError."""
    with pytest.raises(ValueError, match="components"):
        describe(gradient(20, 20).copy_memory(), components)


def test_check_components_accepts_the_bounds() -> None:
    """1 and 9 are within BlurHash's bounds."""
    assert preview.check_components((1, 9)) == (1, 9)
    assert preview.check_components((9, 1)) == (9, 1)


def test_float_pixels_are_refused() -> None:
    """An image of float pixels is not an output image: a ValueError says so."""
    image = (pyvips.Image.black(10, 10, bands=3) + 0.5).copy(interpretation="srgb")
    with pytest.raises(ValueError, match="float"):
        describe(image.copy_memory())


def test_libvips_failure_is_an_imgserve_error() -> None:
    """A libvips error while sampling becomes InternalError (601), not pyvips.Error."""
    truncated = corpus(CORPUS["autumn-jpeg"])[:20_000]
    broken = pyvips.Image.new_from_buffer(truncated, "", fail_on="truncated")
    with pytest.raises(errors.InternalError):
        describe(broken)


# --- the JSON shape -----------------------------------------------------------------


def test_to_dict_gives_the_camel_case_keys() -> None:
    """to_dict's keys are the JSON names of the job view and completion event."""
    result = describe(flat(10, 10, (1, 2, 3)).copy_memory())
    assert result.to_dict() == {
        "blurhash": result.blurhash,
        "thumbhash": result.thumbhash,
        "dominantColor": "#010203",
        "averageColor": "#010203",
    }
