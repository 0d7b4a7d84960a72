"""Progress of long copies on the command line: a rich progress bar per VM copy (bytes, percent,
throughput, ETA) on a terminal, plain periodic lines when stdout is a pipe or a file.

Commands that run a flow in this process (`protect`, `resync`) wrap it in `progress_display`: the
flow's tasks run as threads here and their Reporters publish to the listeners this module registers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .progress import ProgressEvent, Throttle, interval, listening


class PlainLines:
    """One line per copy per interval (and its first and last), for logs and pipes."""

    def __init__(self, console: Console, every: float | None = None) -> None:
        self.console = console
        self.every = interval() if every is None else every
        self.throttles: dict[tuple[str, str], Throttle] = {}
        self.lock = threading.Lock()

    def __call__(self, ev: ProgressEvent) -> None:
        with self.lock:
            t = self.throttles.setdefault((ev.vm, ev.operation), Throttle(self.every))
            if t.due(ev, time.monotonic()):
                self.console.print(ev.line(), markup=False, highlight=False, soft_wrap=True)


class Bars:
    """A live bar per copy; rich's Progress is thread-safe, so task threads update it directly."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=console)
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.lock = threading.Lock()

    def __call__(self, ev: ProgressEvent) -> None:
        with self.lock:
            key = (ev.vm, ev.operation)
            if key not in self.tasks:
                self.tasks[key] = self.progress.add_task(f"{ev.vm} {ev.operation}", total=ev.total or None)
            self.progress.update(self.tasks[key], completed=ev.done, total=ev.total or None)


@contextlib.contextmanager
def _logs_through(console: Console) -> Iterator[None]:
    """Log handlers that print through a rich Console (Prefect's) print through the live display's
    console while it runs, so their lines scroll above the bars instead of tearing them."""
    swapped = []
    for name in ("prefect", ""):
        for h in logging.getLogger(name).handlers:
            if isinstance(getattr(h, "console", None), Console):
                swapped.append((h, h.console))  # type: ignore[attr-defined]
                h.console = console  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for h, c in swapped:
            h.console = c  # type: ignore[attr-defined]


@contextlib.contextmanager
def progress_display(console: Console) -> Iterator[None]:
    """Show the progress of every copy that runs in this process while the block runs."""
    if console.is_terminal:
        bars = Bars(console)
        with bars.progress, _logs_through(console), listening(bars):
            yield
    else:
        with listening(PlainLines(console)):
            yield
