"""#16 through the real daemon: outputs with operations (a watermark from --watermark),
and what each result looks like (BlurHash, ThumbHash, colours, the source's info) in
the job view and in the signed completion event, checked with independent decoders."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import blurhash as halcy_blurhash
import numpy as np
import pytest
import pyvips
import thumbhash as reference_thumbhash  # thumbhash-rs: evanw's Rust crate

from tests.e2e.conftest import Daemon, decode, post_jobs, serve
from tests.e2e.test_webhooks import SECRET, hook_flags
from tests.imaging.test_preview import linear_to_srgb, srgb_to_linear
from tests.servers import HTTPTestServer
from tests.webhook_receiver import (
    Receiver,
    receiver_fixture,  # noqa: F401 - a fixture
)

pytestmark = pytest.mark.slow


def _pixels(image: pyvips.Image) -> np.ndarray:
    rgb = image.colourspace("srgb")[:3].cast("uchar")
    data = np.frombuffer(rgb.write_to_memory(), dtype=np.uint8)
    return data.reshape(rgb.height, rgb.width, 3).astype(np.float64)


def _photo() -> bytes:
    """A 600x400 JPEG: a warm gradient with a dark block, so colours differ by place."""
    xy = pyvips.Image.xyz(600, 400)
    red = xy[0] * 255 / 600
    green = xy[1] * 200 / 400
    image = red.bandjoin([green, (red * 0 + 60)]).cast("uchar").copy(interpretation="srgb")
    image = image.draw_rect([20, 20, 120], 400, 50, 150, 250, fill=True)
    return bytes(image.jpegsave_buffer(Q=92))


@pytest.fixture
def logo(tmp_path: Path) -> Path:
    path = tmp_path / "logo.png"
    white = (pyvips.Image.black(40, 20, bands=3) + 255).cast("uchar")
    white.bandjoin(255).cast("uchar").copy(interpretation="srgb").pngsave(str(path))
    return path


def test_operations_and_previews_through_the_daemon(
    start_daemon: Any,
    http_server: HTTPTestServer,
    receiver: Receiver,
    logo: Path,
    tmp_path: Path,
) -> None:
    """A job of three outputs with operations and a watermark: each uploaded image has
    its planned size; the view gives each output's BlurHash and ThumbHash (decoded by
    independent libraries to the image's own mean colour), its average and dominant
    colours, and the source's info; the completion event carries the same."""
    daemon: Daemon = start_daemon("--watermark", f"logo={logo}", *hook_flags(receiver, tmp_path))
    src = serve(http_server, "ops/photo.jpg", _photo())
    out = daemon.out_dir / "ops"
    job = {
        "source": src,
        "outputs": [
            {"url": f"file://{out}/a.png", "width": 300},
            {"url": f"file://{out}/b.jpg", "width": 100, "rotate": 90,
             "crop": {"left": 300, "top": 50, "width": 250, "height": 250},
             "blurhash_components": [3, 5]},
            {"url": f"file://{out}/c.webp", "width": 200, "pad": {"top": 10, "bottom": 10},
             "background": "#00ff00", "grayscale": True,
             "watermark": {"name": "logo", "gravity": "northwest", "opacity": 0.5}},
        ],
    }  # fmt: skip
    reply = post_jobs(daemon, job)
    assert reply.status == 202, reply.body
    view = daemon.wait(reply.body["jobId"])
    assert view["state"] == "done", view
    assert view["sourceInfo"] == {"width": 600, "height": 400, "format": "jpeg",
                                  "orientation": 1, "hasAlpha": False, "animated": False,
                                  "pages": 1}  # fmt: skip
    sizes = [(300, 200), (100, 100), (200, 153)]
    for output, name, size in zip(view["outputs"], ("a.png", "b.jpg", "c.webp"), sizes,
                                  strict=True):  # fmt: skip
        image = decode((out / name).read_bytes())
        assert (image.width, image.height) == size == (output["width"], output["height"])
        pixels = _pixels(image)
        mean = pixels.reshape(-1, 3).mean(axis=0)
        linear_mean = linear_to_srgb(srgb_to_linear(pixels).reshape(-1, 3).mean(axis=0))
        blur = np.array(halcy_blurhash.decode(output["blurhash"], 32, 32, linear=True))
        assert np.abs(linear_to_srgb(blur.reshape(-1, 3).mean(axis=0)) - linear_mean).max() < 14
        width, height, rgba = reference_thumbhash.thumb_hash_to_rgba(
            base64.b64decode(output["thumbhash"])
        )
        thumb = np.frombuffer(rgba, dtype=np.uint8).reshape(height, width, 4)[..., :3]
        assert np.abs(thumb.reshape(-1, 3).mean(axis=0) - mean).max() < 16
        average = np.array([int(output["averageColor"][i : i + 2], 16) for i in (1, 3, 5)])
        assert np.abs(average - mean).max() < 8
        assert output["dominantColor"].startswith("#") and len(output["dominantColor"]) == 7
    # the 3x5 BlurHash: its first character encodes the component counts
    size_flag = halcy_blurhash.components(view["outputs"][1]["blurhash"])
    assert size_flag == (3, 5)
    # the crop's left part (gradient) turned clockwise to the top, the dark block below
    turned = decode((out / "b.jpg").read_bytes())
    assert turned(50, 10)[0] > 110 and turned(50, 85)[0] < 60  # the block is (20, 20, 120)
    # pad in green, grey inside, the watermark lighter at the top left
    padded = decode((out / "c.webp").read_bytes())
    assert padded(100, 3)[1] > 200 and padded(100, 3)[0] < 60
    inside = padded(150, 100)[:3]
    assert max(inside) - min(inside) <= 4
    assert padded(5, 15)[0] > padded(5, 60)[0] + 20
    # the completion event: the same previews and the source's info
    receiver.wait_for(1)
    (payload,) = receiver.verified(SECRET)
    data = payload["data"]
    assert data["sourceInfo"] == view["sourceInfo"]
    for sent, shown in zip(data["outputs"], view["outputs"], strict=True):
        for key in ("blurhash", "thumbhash", "averageColor", "dominantColor"):
            assert sent[key] == shown[key]
