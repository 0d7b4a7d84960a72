"""Progress of long copies (initial replication, delta cycles, resynchronization), without Prefect.

A fabric calls progress(done, total) with disk bytes processed; a `Reporter` turns those calls into
`ProgressEvent`s with throughput, publishes every one to this process's listeners (the CLI's progress
bar, whose flow tasks run as threads of the same process) and hands a throttled few to a sink (the
flows' log lines and progress artifacts). `DiskTotals` sums one VM's disks into one count.
Events carry a VM name, an operation and numbers only: nothing secret travels in them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # as siterecovery.fabric.base.Progress

# At most one sink call per this many seconds per copy (plus the first and the last).
DEFAULT_INTERVAL = 5.0
INTERVAL_ENV = "SITERECOVERY_PROGRESS_INTERVAL"


def interval() -> float:
    """Seconds between two progress lines of one copy: $SITERECOVERY_PROGRESS_INTERVAL, else 5."""
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %s", INTERVAL_ENV, raw, DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL


@dataclass(frozen=True)
class ProgressEvent:
    """Where one VM's copy stands. `total` is 0 when unknown; `final` once done reached total."""

    vm: str
    operation: str
    done: int
    total: int
    elapsed: float

    @property
    def final(self) -> bool:
        return self.total > 0 and self.done >= self.total

    @property
    def percent(self) -> float | None:
        return min(100.0, self.done * 100.0 / self.total) if self.total > 0 else None

    @property
    def rate(self) -> float:
        """Average bytes per second since the operation started."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        """`web-01 initial replication: 48.0 MiB of 64.0 MiB (75.0%), 120.3 MB/s`"""
        pct = self.percent
        amount = (f"{human_bytes(self.done)} of {human_bytes(self.total)} ({pct:.1f}%)" if pct is not None
                  else f"{human_bytes(self.done)} (total unknown)")
        return f"{self.vm} {self.operation}: {amount}, {format_rate(self.rate)}"


def human_bytes(n: float) -> str:
    """Binary units, as disk sizes are given: 512 B, 1.5 KiB, 64.0 MiB, 2.00 GiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit, digits in (("KiB", 1), ("MiB", 1), ("GiB", 2), ("TiB", 2)):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.{digits}f} {unit}"
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float) -> str:
    """Decimal MB/s, as docs/BENCHMARKS.md reports throughput."""
    return f"{bytes_per_second / 1e6:.1f} MB/s"


# ---- listeners in this process ------------------------------------------------------------------

Listener = Callable[[ProgressEvent], None]
_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call `listener` with every event any Reporter in this process publishes while the block runs."""
    with _listeners_lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(listener)


def publish(event: ProgressEvent) -> None:
    with _listeners_lock:
        current = list(_listeners)
    for listener in current:
        try:
            listener(event)
        except Exception:  # noqa: BLE001 - a broken display must never break a copy
            log.exception("progress listener failed")


# ---- one copy's reporter ------------------------------------------------------------------------

class Throttle:
    """Which events of one copy to pass on: the first, then one per `every` seconds, and the final one
    (once). Not thread-safe by itself: callers hold their own lock."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.passed: ProgressEvent | None = None
        self.passed_at: float | None = None

    def due(self, ev: ProgressEvent, now: float) -> bool:
        news = self.passed is None or (ev.done, ev.total) != (self.passed.done, self.passed.total)
        ok = news and (self.passed_at is None or now - self.passed_at >= self.every or ev.final)
        if ok:
            self.passed, self.passed_at = ev, now
        return ok

    def held_back(self, ev: ProgressEvent | None) -> bool:
        """Whether `ev` says something the last event passed on did not."""
        p = self.passed
        return ev is not None and (p is None or (ev.done, ev.total) != (p.done, p.total))


class Reporter:
    """The `Progress` callback of one VM's operation: publishes every call, sinks a throttled few.

    The sink gets the first event, then at most one per `every` seconds (default: interval()), and the
    final one (done reached total); `finish()` sinks the last event if throttling held it back. `done`
    never goes backwards: a caller that reports less than before is reported at the previous value.
    """

    def __init__(self, vm: str, operation: str, sink: Listener | None = None, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.vm, self.operation, self.sink, self.clock = vm, operation, sink, clock
        self.throttle = Throttle(interval() if every is None else every)
        self.started = clock()
        self.last: ProgressEvent | None = None
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            now = self.clock()
            prev = self.last
            done = max(done, prev.done) if prev else max(done, 0)
            ev = ProgressEvent(vm=self.vm, operation=self.operation, done=done, total=max(total, 0),
                               elapsed=now - self.started)
            self.last = ev
            due = self.throttle.due(ev, now)
        publish(ev)
        if due and self.sink:
            self._sink(ev)

    def finish(self) -> ProgressEvent | None:
        """Sink the last event if it was held back; the last event (None when nothing was reported)."""
        with self._lock:
            ev = self.last
            pending = self.throttle.held_back(ev)
            if pending:
                self.throttle.passed, self.throttle.passed_at = ev, self.clock()
        if pending and ev is not None and self.sink:
            self._sink(ev)
        return ev

    def _sink(self, ev: ProgressEvent) -> None:
        try:
            assert self.sink is not None
            self.sink(ev)
        except Exception:  # noqa: BLE001 - reporting must never fail the copy it reports on
            log.exception("progress sink failed for %s", self.vm)


# ---- several disks as one count -----------------------------------------------------------------

class DiskTotals:
    """One VM's disks, shipped one after another, reported as one progress: done and total summed.

    `sizes` are the disks' sizes as known before the copy (0 when unknown); a disk's own report of its
    total replaces its entry, so a disk that grew since is counted at its new size.
    """

    def __init__(self, progress: Progress, sizes: list[int]) -> None:
        self.progress = progress
        self.sizes = [max(0, s) for s in sizes]
        self.done = 0

    def disk(self, i: int) -> Progress:
        def report(done: int, total: int) -> None:
            if total > 0:
                self.sizes[i] = total
            part = min(done, self.sizes[i]) if self.sizes[i] else done
            self._report(sum(self.sizes[:i]) + part)
        return report

    def finished(self, i: int, size: int | None = None) -> None:
        """Disk `i` is across (at `size` bytes when given)."""
        if size is not None and size >= 0:
            self.sizes[i] = size
        self._report(sum(self.sizes[:i + 1]))

    def _report(self, done: int) -> None:
        total = sum(self.sizes)
        self.done = max(self.done, min(done, total) if total else done)
        self.progress(self.done, total)
