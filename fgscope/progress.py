"""Progress of a job's phases: a rich bar on a terminal, nothing anywhere else.

Library functions that run long take a `ProgressFn` callback, `progress(phase, done, total)`,
and never draw anything themselves; a command wraps its work in `Phases(console)` and hands
`phases.update` down:

    with Phases(console) as phases:
        phases.update("load model", 0)            # a phase without a count: a spinner
        result = inspect(..., progress=phases.update)   # "forward" 16/400 images, 35/s, ETA
        with phases.step("figures", total=3) as advance:
            ...; advance()

Each phase is one line (description, bar, done/total, images per second, time left); a new
phase completes the one before it. The display is transient (nothing stays on the screen once
the job ends) and disabled when the console is not a terminal, so piped output and
`CliRunner` output stay clean. `update` may also be called with no display at all
(`Phases(None)`), which makes it a cheap no-op.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["ProgressFn", "Phases", "report"]

ProgressFn = Callable[[str, int, "int | None"], None]
"""`progress(phase, done, total)`: `done` items of `total` (None: unknown) in `phase`."""


def report(progress: ProgressFn | None, phase: str, done: int, total: int | None = None) -> None:
    """Call `progress(phase, done, total)` when a callback was given (library helper)."""
    if progress is not None:
        progress(phase, done, total)


class _Rate(ProgressColumn):
    """`35.2 images/s` once a phase with a count has speed; blank otherwise."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        if task.total is None or task.speed is None:
            return Text("")
        return Text(f"{task.speed:.1f} {task.fields.get('unit', self.unit)}/s", style="progress.data.speed")


class Phases:
    """The phases of one job on `console` (see the module docstring).

    Args:
        console: where to draw; None, or a console that is not a terminal, draws nothing.
        unit: what a phase counts, for the rate column (`images`).
        prefix: put before every phase name (`report: `).
        relay: also pass every update on to this callback (a job run inside another one,
            whose own console is a log file, shows its phases on the outer job's display).
    """

    def __init__(self, console: Console | None, *, unit: str = "images", prefix: str = "",
                 relay: ProgressFn | None = None) -> None:
        self.enabled = console is not None and console.is_terminal
        self.prefix = prefix
        self.relay = relay
        self.started = time.perf_counter()
        self._current: tuple[str, Any] | None = None
        self._bar: Progress | None = None
        if self.enabled:
            self._bar = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), _Rate(unit), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=console, transient=True,
            )

    def __enter__(self) -> Phases:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, phase: str, done: int, total: int | None = None) -> None:
        """Show `done` of `total` in `phase` (a `ProgressFn`); a new phase ends the last one."""
        if self.relay is not None:
            self.relay(phase, done, total)
        if self._bar is None:
            return
        name = self.prefix + phase
        if self._current is None or self._current[0] != name:
            if self._current is not None:
                self._bar.update(self._current[1], visible=False)  # done: off the screen
            self._current = (name, self._bar.add_task(name, total=total))
        self._bar.update(self._current[1], completed=done, total=total)

    @contextlib.contextmanager
    def step(self, phase: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """A phase run by the caller: yields `advance(n=1)`."""
        done = 0
        self.update(phase, 0, total)

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            self.update(phase, done, total)

        yield advance
