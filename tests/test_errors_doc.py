"""docs/errors.md lists exactly the codes and statuses errors.py defines."""

from __future__ import annotations

import re
from pathlib import Path

from imgserve import errors

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
ROW = re.compile(r"^\|\s*(\d{3})\s*\|\s*`(\w+)`\s*\|\s*(\d{3})\s*\|(.*)\|\s*(yes|no)\s*\|\s*$")


def _rows() -> list[tuple[int, str, int, str, bool]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            code, name, status, meaning, retry = match.groups()
            rows.append((int(code), name, int(status), meaning.strip(), retry == "yes"))
    return rows


def test_doc_table_matches_errors_exactly() -> None:
    """Every code appears once, with the class name, status and retryable flag of the code."""
    documented = [(code, name, status, retry) for code, name, status, _m, retry in _rows()]
    defined = [(c.code, c.__name__, c.status, c.retryable) for c in errors.all_errors()]
    assert documented == defined


def test_every_documented_code_has_a_meaning() -> None:
    """No row of the table leaves the meaning empty."""
    rows = _rows()
    assert rows
    assert all(len(meaning) > 10 for _c, _n, _s, meaning, _r in rows)


def test_codes_are_unique_and_stable() -> None:
    """No two error classes share a code, and 0.2's codes keep their names."""
    codes = [cls.code for cls in errors.all_errors()]
    assert len(codes) == len(set(codes))
    legacy = {
        101: "KeysInvalid",
        102: "UnknownOperation",
        103: "ArgsNotObject",
        104: "EmptySrcURL",
        105: "EmptyDstURL",
        106: "WidthInvalid",
        107: "HeightInvalid",
        108: "SourceTypeNotAllowed",
        109: "SrcSchemeUnsupported",
        110: "DstSchemeUnsupported",
        111: "FormFieldMissing",
        112: "FormFieldNotString",
        113: "DstExtensionUnsupported",
        201: "SourceUnreachable",
        202: "SourceUnreadable",
        203: "EnlargeNotAllowed",
        204: "SVGInvalid",
        205: "PlaceholderUploadFailed",
    }
    for code, name in legacy.items():
        assert errors.by_code(code).__name__ == name


def test_doc_shows_the_reply_shapes() -> None:
    """The 0.2 reply shapes are documented."""
    text = DOC.read_text(encoding="utf-8")
    assert '{"msg": "request parse error"}' in text
    assert '"msg": "request invalid", "code":' in text
