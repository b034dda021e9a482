"""scripts/contact_sheet.py draws docs/images/operations.jpg with imgserve's pipeline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyvips

from tests.imaging.conftest import corpus

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "contact_sheet.py"


def test_the_contact_sheet_renders_every_tile(tmp_path: Path) -> None:
    """Every tile of the sheet renders (an operation the script names but the pipeline
    refuses would raise), four across."""
    spec = importlib.util.spec_from_file_location("contact_sheet", SCRIPT)
    assert spec is not None and spec.loader is not None
    sheet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sheet)
    corpus(sheet.SOURCE)  # fails (never skips) when the corpus package is missing
    out = sheet.main(sheet.SOURCE, tmp_path / "sheet.jpg")
    image = pyvips.Image.new_from_file(str(out))
    rows = -(-len(sheet.TILES) // 4)
    assert image.width == 4 * sheet.TILE + 3 * 8
    assert image.height > rows * sheet.TILE
