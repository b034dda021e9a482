"""The benchmark's smoke mode runs end to end against a real imgserve daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke_measures_every_workload_with_all_jobs_done(tmp_path: Path) -> None:
    """`python -m bench --smoke` yields ratios > 0 per workload and no failed or lost job."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out-dir", str(tmp_path / "out"),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["available"]["imgserve"], data["notes"]
    names = [w["name"] for w in data["options"]["workloads"]]
    assert names
    for name in names:
        ratio = data["summary"]["ratios"][name]["imgserve/limit"]
        assert ratio is not None and ratio["median"] > 0, (name, done.stderr[-2000:])
    phases = [p for p in data["phases"] if p["system"] == "imgserve"]
    assert {p["workload"] for p in phases} == set(names)
    for phase in phases:
        assert phase["failed"] == 0 and phase["unfinished"] == 0, phase
        assert phase["completed"] > 0, phase
    for lat in data["latency"]:
        assert lat["failed"] == 0 and lat["finished"] == lat["sent"], lat
    assert all(check.startswith("ok") for check in data["checks"]), data["checks"]
