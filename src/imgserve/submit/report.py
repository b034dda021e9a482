"""What ``imgserve submit`` shows: a rich progress bar (done, failed, skipped, rate,
ETA) on a terminal; on anything else (a pipe, a file, CI) one plain line per job
that ended and a progress line every few seconds. Then a summary table.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from imgserve.client import Job
from imgserve.submit.plan import Item, Tally

PLAIN_PROGRESS_EVERY_S = 5.0


class _Rate(ProgressColumn):
    """Jobs a second, over rich's recent window."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- jobs/s" if speed is None else f"{speed:.1f} jobs/s", style="cyan")


class _Console(Console):
    """A console whose reader may go (``imgserve submit ... | head``): from then on
    it is quiet and says so in ``gone``, instead of rich's SystemExit in whichever
    task was printing. The run then stops as on a first Ctrl-C."""

    gone = False

    def on_broken_pipe(self) -> None:
        self.quiet = True
        self.gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)  # as rich does: later writes go nowhere
        os.dup2(devnull, sys.stdout.fileno())


class Reporter:
    """Progress and outcome of a run, on ``out`` (a terminal gets the bar)."""

    def __init__(self, out: IO[str], *, total: int, plain: bool | None = None) -> None:
        self.console = _Console(file=out, highlight=False)
        self.plain = not self.console.is_terminal if plain is None else plain
        if self.plain:  # no colours, no cursor moves; lines are not cut at 80 columns
            self.console = _Console(
                file=out, highlight=False, no_color=True, soft_wrap=True, width=160
            )
        self.total = total
        self._started = time.monotonic()
        self._last_line = self._started
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> Reporter:
        if not self.plain:
            self._progress = Progress(
                TextColumn("[bold]imgserve submit"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("[green]{task.fields[done]} done"),
                TextColumn("[red]{task.fields[failed]} failed"),
                TextColumn("[yellow]{task.fields[skipped]} skipped"),
                _Rate(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total, done=0, failed=0, skipped=0)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    @property
    def gone(self) -> bool:
        """Whether the output was closed under us (a pipe whose reader left)."""
        return self.console.gone

    def note(self, message: str) -> None:
        self.console.print(message, markup=False)

    def ended(self, item: Item, job: Job, outcome: str, tally: Tally) -> None:
        """A job ended ``done``, ``cancelled``, or was ``skipped`` (done before)."""
        if self.plain:
            where = " ".join(o.url for o in job.outputs)
            self._line(f"{outcome:<9} {item.label}  job {job.id}  {where}", tally)
        self._advance(tally)

    def failed(self, item: Item, code: int, detail: str, job: Job | None, tally: Tally) -> None:
        if self.plain:
            which = f"  job {job.id}" if job is not None else ""
            self._line(f"{'failed':<9} {item.label}{which}  code {code}: {detail}", tally)
        else:
            # Text, not markup: a path or a detail may hold "[old]" or "[/raw]".
            line = Text.assemble(("failed", "red"), f" {item.label}: code {code}: {detail}")
            self.console.print(line)
        self._advance(tally)

    def _line(self, text: str, tally: Tally) -> None:
        self.console.print(f"[{tally.finished}/{self.total}] {text}", markup=False)
        now = time.monotonic()
        if now - self._last_line >= PLAIN_PROGRESS_EVERY_S:
            self._last_line = now
            self.console.print(self._progress_line(tally, now), markup=False)

    def _progress_line(self, tally: Tally, now: float) -> str:
        elapsed_s = max(now - self._started, 1e-6)
        rate = tally.finished / elapsed_s
        left = self.total - tally.finished
        eta = f"{left / rate:.0f} s" if rate > 0 else "--"
        return (
            f"progress: {tally.finished}/{self.total}, {tally.done} done, {tally.failed} failed, "
            f"{tally.skipped} skipped, {rate:.1f} jobs/s, ETA {eta}"
        )

    def _advance(self, tally: Tally) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task,
                completed=tally.finished,
                done=tally.done,
                failed=tally.failed,
                skipped=tally.skipped,
            )

    def summary(self, tally: Tally, *, interrupted: bool) -> None:
        """The table of outcomes, and of failures by code."""
        elapsed_s = time.monotonic() - self._started
        # Titles above the tables, not in them: a table's title wraps at its width.
        self.note(f"imgserve submit: {tally.total} jobs in {elapsed_s:.1f} s")
        table = Table()
        table.add_column("outcome")
        table.add_column("jobs", justify="right")
        rows = [
            ("done", tally.done),
            ("skipped (done before)", tally.skipped),
            ("failed", tally.failed),
            ("cancelled", tally.cancelled),
            ("not submitted", tally.total - tally.finished),
        ]
        for outcome, count in rows:
            if count or outcome in ("done", "failed"):
                table.add_row(outcome, str(count))
        self.console.print(table)
        if tally.failures:
            self.note("failures by code (docs/errors.md):")
            failures = Table()
            failures.add_column("code", justify="right")
            failures.add_column("jobs", justify="right")
            failures.add_column("first detail")
            failures.add_column("first source")
            for code, count, detail, label in tally.by_code():
                failures.add_row(str(code), str(count), Text(detail), Text(label))  # no markup
            self.console.print(failures)
        if interrupted:
            self.note("interrupted: run the same command with --resume to go on")
