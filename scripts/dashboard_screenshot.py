"""Make docs/images/dashboard.png: a real daemon with some minutes of jobs behind it
(photos from Debian's wallpaper packages, two API keys, a few failing sources and
webhooks that nobody answers), photographed by headless Chromium (Debian's).

    .venv/bin/python scripts/dashboard_screenshot.py [--minutes 20] [--out PATH]

It takes as long as ``--minutes`` (the chart's history is sampled every 10 s), on
loopback only, and stops its daemon at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import expect, sync_playwright

IMGSERVE = [sys.executable, "-m", "imgserve"]
PHOTOS = "/usr/share/wallpapers/*/contents/images/1280x800.jpg"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def post(port: int, key: str, job: dict[str, Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/jobs", json.dumps(job), {"Authorization": f"Bearer {key}"})
        conn.getresponse().read()
    finally:
        conn.close()


def job(source: Path, out: Path, **more: Any) -> dict[str, Any]:
    return {
        "source": source.as_uri(),
        "outputs": [
            {"url": f"{out.as_uri()}/{{$basename}}-{{$width}}.webp", "width": 1024},
            {"url": f"{out.as_uri()}/{{$basename}}-{{$width}}.jpg", "width": 480},
            {"url": f"{out.as_uri()}/{{$basename}}-sq.png", "width": 160, "height": 160},
        ],
        **more,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("docs/images/dashboard.png"))
    args = parser.parse_args()
    photos = sorted(Path("/").glob(PHOTOS.lstrip("/")))[:8]
    chromium = shutil.which("chromium")
    if not photos or chromium is None:
        print("needs Debian's plasma-workspace-wallpapers and chromium", file=sys.stderr)
        return 1
    rng = random.Random(17)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources, out = root / "src", root / "out"
        sources.mkdir()
        out.mkdir()
        names = ["Beach", "Harbour", "Forest", "Dunes", "Glacier", "Meadow", "Canyon", "Lake"]
        for name, photo in zip(names, photos, strict=False):
            shutil.copy(photo, sources / f"{name}.jpg")
        whole = (sources / "Beach.jpg").read_bytes()
        (sources / "Upload-7731.jpg").write_bytes(whole[: len(whole) // 3])  # truncated
        keys_file = root / "keys.toml"

        def add_key(name: str, *flags: str) -> str:
            done = subprocess.run(
                [*IMGSERVE, "keys", "add", name, "--keys", str(keys_file), *flags],
                capture_output=True,
                text=True,
                check=True,
            )
            return done.stdout.strip()

        cms, backfill, ops = add_key("cms"), add_key("backfill"), add_key("ops", "--admin")
        secrets = root / "webhook-secrets"
        secrets.write_text("whsec_" + "ZGFzaGJvYXJkIHNjcmVlbnNob3Qgc2VjcmV0IQ==" + "\n")
        secrets.chmod(0o600)
        port = free_port()
        base = [
            "--state-dir", str(root / "state"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "2", "--file-root", str(root), "--allow-net", "127.0.0.0/8",
            "--keys", str(keys_file), "--webhook-secrets-file", str(secrets),
            "--set", "webhook_schedule_s=0,1,2",
        ]  # fmt: skip
        subprocess.run([*IMGSERVE, "start", *base], check=True)
        try:
            dead_hook = f"http://127.0.0.1:{free_port()}/imgserve"  # nobody listens
            started = time.monotonic()
            end = started + args.minutes * 60
            while time.monotonic() < end:
                part = (time.monotonic() - started) / (end - started)
                # A busy spell in the middle, a backfill near the end.
                # (Two workers finish about 2.5 of these jobs a second.)
                wave = rng.randint(10, 16) if 0.35 < part < 0.45 else rng.randint(0, 2)
                for _ in range(wave):
                    source = sources / f"{rng.choice(names[: len(photos)])}.jpg"
                    post(port, cms, job(source, out, metadata={"upload": rng.randint(1, 9999)}))
                if rng.random() < 0.06:
                    post(port, cms, job(sources / "Upload-7731.jpg", out, webhook=dead_hook))
                if 0.72 < part < 0.8 or part > 0.97:
                    for _ in range(rng.randint(6, 12)):
                        source = sources / f"{rng.choice(names[: len(photos)])}.jpg"
                        post(port, backfill, job(source, out, priority="batch"))
                time.sleep(3.0)
            post(port, cms, job(sources / "Upload-7731.jpg", out, webhook=dead_hook))
            time.sleep(6.0)  # the last failure's webhook attempts (0, 1, 2 s apart)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, headless=True)
                page = browser.new_page(viewport={"width": 1400, "height": 1300})
                page.goto(f"http://127.0.0.1:{port}/ui")
                page.fill("#keyinput", ops)
                page.click("#keyform button")
                expect(page.locator("#live")).to_have_attribute("data-live", "yes")
                page.locator('tr.job[data-state="failed"]').first.click()
                expect(page.locator("tr.detail table.attempts")).to_be_visible()
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            subprocess.run([*IMGSERVE, "stop", "--state-dir", str(root / "state")], check=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
