"""Turning results into the markdown tables and the PASS/FAIL verdict on each target."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from bench import stats
from bench.runner import NO_PLACEHOLDER, NOISY_PCT, Results
from bench.stats import Spread
from bench.workloads import BY_NAME

# Targets (README.md explains them).
LIMIT_RATIO_FILL = 0.90
LIMIT_RATIO_OTHER = 0.80
THUMBOR_RATIO = 1.0
THUMBOR_RATIO_HEAVY = 3.0
HEAVY = ("jpeg-smart-400", "png-200", "svg-800")
P99_AT_50_MS = 50.0
# Several outputs per source (issue #12): decoding once must beat making each alone.
RENDITIONS_LIMIT_RATIO = 1.6
RENDITIONS_THUMBOR_RATIO = 2.2


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    passed: bool | None
    """None: not measured."""

    @property
    def word(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


def _per_round(results: Results, workload: str, system: str) -> list[float | None]:
    rounds = int(results.options["rounds"])
    values: list[float | None] = [None] * rounds
    for phase in results.phases:
        if phase.workload == workload and phase.system == system:
            values[phase.round] = phase.per_s
    return values


def ratio(results: Results, workload: str, num: str, den: str) -> Spread | None:
    """``num``/``den`` throughput per round, summarised over rounds."""
    return Spread.of(
        stats.ratios(_per_round(results, workload, num), _per_round(results, workload, den))
    )


def rate(results: Results, workload: str, system: str) -> Spread | None:
    return Spread.of([v for v in _per_round(results, workload, system) if v is not None])


def _median_of(results: Results, workload: str, system: str, attr: str) -> float | None:
    values = [
        getattr(p, attr)
        for p in results.phases
        if p.workload == workload and p.system == system and getattr(p, attr) is not None
    ]
    s = Spread.of(values)
    return s.median if s else None


def _workloads(results: Results) -> list[str]:
    return [w["name"] for w in results.options["workloads"]]


def limit_target(name: str) -> float:
    """imgserve / limit must reach this on workload ``name``."""
    if BY_NAME[name].renditions:
        return RENDITIONS_LIMIT_RATIO
    return LIMIT_RATIO_FILL if name == "jpeg-fill-200x120" else LIMIT_RATIO_OTHER


def thumbor_target(name: str) -> float:
    """imgserve / thumbor must reach this on workload ``name``."""
    if BY_NAME[name].renditions:
        return RENDITIONS_THUMBOR_RATIO
    return THUMBOR_RATIO_HEAVY if name in HEAVY else THUMBOR_RATIO


def verdicts(results: Results) -> list[Verdict]:
    out: list[Verdict] = []
    have_imgserve = results.available.get("imgserve", False)
    have_thumbor = results.available.get("thumbor", False)
    for name in _workloads(results):
        want = limit_target(name)
        s = ratio(results, name, "imgserve", "limit") if have_imgserve else None
        out.append(
            Verdict(
                f"{name}: imgserve >= {want:.2f}x limit",
                stats.fmt_spread(s, 3),  # 0.798 must not read as 0.80
                None if s is None else s.median >= want,
            )
        )
    for name in _workloads(results):
        want = thumbor_target(name)
        s = ratio(results, name, "imgserve", "thumbor") if have_imgserve and have_thumbor else None
        out.append(
            Verdict(
                f"{name}: imgserve >= {want:g}x thumbor",
                stats.fmt_spread(s),
                None if s is None else s.median >= want,
            )
        )
    for name in _workloads(results):
        if not BY_NAME[name].jpeg:
            continue
        lat = next((x for x in results.latency if x.workload == name and x.load == 0.5), None)
        ok = None if lat is None or math.isnan(lat.p99_ms) else lat.p99_ms <= P99_AT_50_MS
        out.append(
            Verdict(
                f"{name}: p99 reply latency at 50% load <= {P99_AT_50_MS:g} ms",
                f"{lat.p99_ms:.1f} ms" if lat else "n/a",
                ok,
            )
        )
    mine = results.peak_rss_mb.get("imgserve")
    theirs = results.peak_rss_mb.get("thumbor")
    out.append(
        Verdict(
            "peak RSS of the process tree: imgserve <= thumbor",
            f"{stats.fmt(mine, 0)} MB vs {stats.fmt(theirs, 0)} MB",
            None if mine is None or theirs is None else mine <= theirs,
        )
    )
    return out


def markdown(results: Results) -> str:
    env = results.environment
    o = results.options
    lines: list[str] = []
    add = lines.append
    add(
        f"Run {env.get('date', '?')}: {o['rounds']} rounds x {o['seconds']:g} s per system "
        f"per workload (after {o['warmup_s']:g} s warm-up), {o['workers']} workers/processes, "
        f"{o['in_flight']} requests in flight."
    )
    add("")
    add(
        f"Machine: {env.get('nproc')} CPUs ({env.get('cpu_model')}), "
        f"{env.get('memory_gib')} GiB; libvips {env.get('libvips')}, pyvips {env.get('pyvips')}, "
        f"thumbor {env.get('thumbor_thumbor', 'n/a')} (Pillow {env.get('thumbor_Pillow', 'n/a')}, "
        f"OpenCV {env.get('thumbor_opencv', 'n/a')}, "
        f"CairoSVG {env.get('thumbor_cairosvg', 'n/a')}),"
        f" Python {env.get('python')}; imgserve {env.get('imgserve', 'n/a')} at "
        f"`{env.get('imgserve_git_head', env.get('git_head', '?'))}`; benchmark at "
        f"`{env.get('git_head', '?')}`."
    )
    if env.get("imgserve_env"):
        add("")
        add(f"imgserve ran with extra environment {env['imgserve_env']}.")
    for note in results.notes:
        add("")
        add(f"**Note:** {note}")
    add("")
    add("### Throughput (per-round ratios: median (min-max))")
    add("")
    add(
        "| workload | imgserve / limit | imgserve / thumbor | thumbor / limit "
        "| limit img/s | imgserve jobs/s | thumbor jobs/s |"
    )
    add("|---|---|---|---|---|---|---|")
    for name in _workloads(results):
        add(
            f"| {name} | {stats.fmt_spread(ratio(results, name, 'imgserve', 'limit'))} "
            f"| {stats.fmt_spread(ratio(results, name, 'imgserve', 'thumbor'))} "
            f"| {stats.fmt_spread(ratio(results, name, 'thumbor', 'limit'))} "
            f"| {_rate(results, name, 'limit')} | {_rate(results, name, 'imgserve')} "
            f"| {_rate(results, name, 'thumbor')} |"
        )
    add("")
    add(
        "Rates are medians over rounds. The limit is the faster of processes and threads. "
        "A several-output workload's rates count sources (see its own table for outputs/s)."
    )
    for name in _workloads(results):
        if BY_NAME[name].renditions:
            lines.extend(_renditions_table(results, name))
    if results.latency:
        add("")
        add(
            "### imgserve reply latency of POST / (POST /jobs for several-output workloads; "
            "open-loop Poisson arrivals)"
        )
        add("")
        add("| workload | load | rate/s | requests | p50 ms | p95 ms | p99 ms | max ms | failed |")
        add("|---|---|---|---|---|---|---|---|---|")
        for lat in results.latency:
            add(
                f"| {lat.workload} | {int(lat.load * 100)}% | {lat.rate_per_s:.1f} | {lat.sent} "
                f"| {lat.p50_ms:.1f} | {lat.p95_ms:.1f} | {lat.p99_ms:.1f} | {lat.max_ms:.1f} "
                f"| {lat.failed} |"
            )
    add("")
    add("### Cost per job (medians over rounds)")
    add("")
    add(
        "| workload | CPU ms/img limit | CPU ms/job imgserve | of which API process "
        "| CPU ms/job thumbor | client + source server CPU ms/job imgserve "
        "| out KB/img limit / thumbor |"
    )
    add("|---|---|---|---|---|---|---|")
    for name in _workloads(results):
        add(
            f"| {name} | {stats.fmt(_median_of(results, name, 'limit', 'cpu_ms_per_job'))} "
            f"| {stats.fmt(_median_of(results, name, 'imgserve', 'cpu_ms_per_job'))} "
            f"| {stats.fmt(_median_of(results, name, 'imgserve', 'root_cpu_ms_per_job'))} "
            f"| {stats.fmt(_median_of(results, name, 'thumbor', 'cpu_ms_per_job'))} "
            f"| {stats.fmt(_median_of(results, name, 'imgserve', 'client_cpu_ms_per_job'))} + "
            f"{stats.fmt(_median_of(results, name, 'imgserve', 'source_server_cpu_ms_per_job'))} "
            f"| {stats.fmt(_median_of(results, name, 'limit', 'out_kb_per_job'))} / "
            f"{stats.fmt(_median_of(results, name, 'thumbor', 'out_kb_per_job'))} |"
        )
    add("")
    rss = ", ".join(
        f"{name} {mb:.0f} MB ({results.tree_processes.get(name, '?')} processes)"
        for name, mb in results.peak_rss_mb.items()
    )
    add(f"Peak RSS of each process tree (sum over the tree, sampled every 50 ms): {rss or 'n/a'}.")
    for name, procs in results.per_process.items():
        add("")
        add(f"{name} processes (own peak RSS, CPU over the whole run):")
        add("")
        for proc in sorted(procs, key=lambda x: -float(x["cpu_s"])):
            add(f"- `{proc['process']}`: {proc['peak_rss_mb']:.0f} MB, {proc['cpu_s']:.1f} s CPU")
    failures = [p for p in results.phases if p.failed or p.unfinished]
    if failures or any(x.failed for x in results.latency):
        add("")
        add("### Failures")
        add("")
        for p in failures:
            add(
                f"- r{p.round} {p.workload} {p.system}: {p.failed} failed, {p.unfinished} "
                f"unfinished: {'; '.join(p.errors[:2])}"
            )
        for x in results.latency:
            if x.failed:
                add(
                    f"- latency {x.workload} {int(x.load * 100)}%: {x.failed} failed: "
                    f"{'; '.join(x.errors[:2])}"
                )
    noisy = [
        f"r{p.round} {p.workload} {p.system}{'/' + p.mode if p.mode else ''}: "
        f"{p.foreign_cpu_pct:.0f}%"
        for p in results.phases
        if p.foreign_cpu_pct is not None and p.foreign_cpu_pct > NOISY_PCT
    ] + [
        f"latency {x.workload} {int(x.load * 100)}%: {x.foreign_cpu_pct:.0f}%"
        for x in results.latency
        if x.foreign_cpu_pct is not None and x.foreign_cpu_pct > NOISY_PCT
    ]
    foreign = [p.foreign_cpu_pct for p in results.phases if p.foreign_cpu_pct is not None]
    if foreign:
        add("")
        add("### Other load on the machine")
        add("")
        add(
            "CPU used by processes outside the benchmark's own trees, in % of one core: "
            f"median {statistics.median(foreign):.0f}%, max {max(foreign):.0f}% over the "
            f"throughput phases. Phases above {NOISY_PCT:.0f}%: "
            + (", ".join(noisy) if noisy else "none")
            + "."
        )
    if results.checks:
        add("")
        add("### Output checks (one result per system and workload, first round)")
        add("")
        lines.extend(f"- {c}" for c in results.checks)
    add("")
    add("### Targets")
    add("")
    add("| target | measured | verdict |")
    add("|---|---|---|")
    for v in verdicts(results):
        add(f"| {v.target} | {v.measured} | {v.word} |")
    return "\n".join(lines) + "\n"


def _renditions_table(results: Results, name: str) -> list[str]:
    """Outputs/s, per-source latency and the ratios of one several-output workload."""
    outputs = len(BY_NAME[name].outputs)
    in_flight = results.options["in_flight"]
    lines = [
        "",
        f"### {name}: {outputs} outputs per source (per-round ratios: median (min-max))",
        "",
        "| system | outputs/s | sources/s | per-source latency p50 / p95 ms "
        "| CPU ms/output | ÷ limit | ÷ thumbor |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "limit": f"bare loop ({outputs} thumbnail_buffer calls per source)",
        "imgserve": "imgserve (one POST /jobs, placeholders)",
        NO_PLACEHOLDER: 'imgserve (one POST /jobs, "placeholder": false)',
        "thumbor": f"thumbor ({outputs} requests per source)",
    }
    for system, label in labels.items():
        s = rate(results, name, system)
        cpu = _median_of(results, name, system, "cpu_ms_per_job")
        p50 = _median_of(results, name, system, "latency_p50_ms")
        p95 = _median_of(results, name, system, "latency_p95_ms")
        lines.append(
            f"| {label} | {stats.fmt(s.median * outputs if s else None)} "
            f"| {stats.fmt(s.median if s else None)} | {stats.fmt(p50, 0)} / {stats.fmt(p95, 0)} "
            f"| {stats.fmt(cpu / outputs if cpu is not None else None)} "
            f"| {_vs(results, name, system, 'limit')} | {_vs(results, name, system, 'thumbor')} |"
        )
    lines += [
        "",
        f"Latency: from a source's first request to its last output in place, in the "
        f"closed loop ({in_flight} sources in flight; the limit: one loop's time per source). "
        f"Targets: imgserve outputs/s >= {RENDITIONS_LIMIT_RATIO:g}x the bare loop's and >= "
        f"{RENDITIONS_THUMBOR_RATIO:g}x thumbor's.",
    ]
    return lines


def _vs(results: Results, name: str, num: str, den: str) -> str:
    return "-" if num == den else stats.fmt_spread(ratio(results, name, num, den))


def _rate(results: Results, name: str, system: str) -> str:
    s = rate(results, name, system)
    return stats.fmt(s.median if s else None)


def summary(results: Results) -> dict[str, Any]:
    """Ratios and verdicts in JSON form (written beside the raw phases)."""
    out: dict[str, Any] = {"ratios": {}, "targets": []}
    for name in _workloads(results):
        entry = {}
        pairs = [("imgserve", "limit"), ("imgserve", "thumbor"), ("thumbor", "limit")]
        if BY_NAME[name].renditions:
            pairs += [(NO_PLACEHOLDER, "limit"), (NO_PLACEHOLDER, "thumbor")]
        for num, den in pairs:
            s = ratio(results, name, num, den)
            entry[f"{num}/{den}"] = s.as_dict() if s else None
        out["ratios"][name] = entry
    out["targets"] = [
        {"target": v.target, "measured": v.measured, "verdict": v.word} for v in verdicts(results)
    ]
    return out
