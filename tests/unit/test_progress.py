"""The progress core without Prefect or I/O: formatting, the throttle (a fake clock), the reporter's
sink and listeners, and several disks summed into one count."""

from __future__ import annotations

import pytest

from siterecovery import progress as pr
from siterecovery.progress import DiskTotals, ProgressEvent, Reporter, Throttle, human_bytes, listening

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_formatting() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 64 * MiB, 2 * 1024 * MiB, 3 * 1024**4)] == [
        "0 B", "1023 B", "1.5 KiB", "64.0 MiB", "2.00 GiB", "3.00 TiB"]
    ev = ProgressEvent(vm="web-01", operation="initial replication", done=48 * MiB, total=64 * MiB, elapsed=0.5)
    assert ev.line() == "web-01 initial replication: 48.0 MiB of 64.0 MiB (75.0%), 100.7 MB/s"
    assert not ev.final and ev.percent == 75.0
    unknown = ProgressEvent(vm="db", operation="replicate", done=3 * MiB, total=0, elapsed=0)
    assert unknown.percent is None and not unknown.final
    assert unknown.line() == "db replicate: 3.0 MiB (total unknown), 0.0 MB/s"
    assert ProgressEvent(vm="v", operation="o", done=10, total=10, elapsed=1).final


def test_reporter_sinks_first_every_interval_and_last() -> None:
    clock, sunk, seen = Clock(), [], []
    rep = Reporter("web-01", "replicate", sunk.append, every=5, clock=clock)
    with listening(seen.append):
        for step in range(1, 11):  # ten calls a second apart, 10 MiB each, of 100 MiB
            clock.t += 1
            rep(step * 10 * MiB, 100 * MiB)
        rep(100 * MiB, 100 * MiB)  # a repeated end is not sunk twice
    assert len(seen) == 11  # listeners get every call
    assert [e.done // (10 * MiB) for e in sunk] == [1, 6, 10]  # first, 5 s later, final
    assert sunk[-1].final and sunk[-1].elapsed == 10 and sunk[-1].rate == 100 * MiB / 10
    assert rep.finish() == seen[-1] and len(sunk) == 3  # nothing held back


def test_reporter_finish_flushes_what_was_held_back_and_never_goes_backwards() -> None:
    clock, sunk = Clock(), []
    rep = Reporter("web-01", "resynchronize", sunk.append, every=60, clock=clock)
    rep(10, 100)
    rep(40, 100)
    rep(30, 100)  # a late report from another source: held at 40
    assert [e.done for e in sunk] == [10]
    last = rep.finish()
    assert last is not None and last.done == 40 and [e.done for e in sunk] == [10, 40]
    assert rep.finish() == last and len(sunk) == 2
    assert Reporter("x", "y", sunk.append).finish() is None


def test_a_failing_sink_or_listener_does_not_break_the_copy(caplog: pytest.LogCaptureFixture) -> None:
    def boom(ev: ProgressEvent) -> None:
        raise RuntimeError("display gone")

    rep = Reporter("web-01", "replicate", boom, every=0)
    with listening(boom):
        rep(1, 2)
        rep(2, 2)
    assert "progress sink failed" in caplog.text and "progress listener failed" in caplog.text


def test_throttle_zero_interval_passes_each_change_once() -> None:
    t = Throttle(0)
    evs = [ProgressEvent("v", "o", d, 10, elapsed=i) for i, d in enumerate((1, 1, 5, 10, 10))]
    assert [t.due(e, float(i)) for i, e in enumerate(evs)] == [True, False, True, True, False]


def test_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pr.INTERVAL_ENV, "0.5")
    assert pr.interval() == 0.5
    monkeypatch.setenv(pr.INTERVAL_ENV, "soon")
    assert pr.interval() == pr.DEFAULT_INTERVAL
    monkeypatch.delenv(pr.INTERVAL_ENV)
    assert pr.interval() == pr.DEFAULT_INTERVAL


def test_disk_totals_sum_disks_into_one_monotonic_count() -> None:
    calls: list[tuple[int, int]] = []
    t = DiskTotals(lambda d, n: calls.append((d, n)), [30, 0])  # the second disk's size is not known yet
    first = t.disk(0)
    first(10, 30)
    first(30, 30)
    t.finished(0, 30)
    second = t.disk(1)
    second(5, 20)  # its own total arrives with its first report
    second(3, 20)  # never backwards
    t.finished(1, 20)
    assert calls == [(10, 30), (30, 30), (30, 30), (35, 50), (35, 50), (50, 50)]


def test_disk_totals_relayed_byte_counts_without_total_stay_within_the_known_size() -> None:
    calls: list[tuple[int, int]] = []
    t = DiskTotals(lambda d, n: calls.append((d, n)), [100, 50])
    t.disk(0)(500, 0)  # a count with no total is capped at the disk's known size
    t.finished(0)
    t.disk(1)(10, 0)
    t.finished(1)
    assert calls == [(100, 150), (100, 150), (110, 150), (150, 150)]


def test_relay_reads_the_senders_progress_lines_and_keeps_the_rest() -> None:
    from siterecovery.replica.orchestrator.transfer import SenderProgress as _SenderProgress

    calls: list[tuple[int, int]] = []
    s = _SenderProgress(lambda d, n: calls.append((d, n)))
    s.feed(b"P 671088")  # a line cut by the channel
    s.feed(b"64 88080384\nwarning: something\nP x y\n")
    s.feed(b"P 75497472 88080384\nR {\"gen\": \"ab\"")
    assert calls == [(67108864, 88080384), (75497472, 88080384)]
    assert s.kept() == b"warning: something\nP x y\nR {\"gen\": \"ab\""


def test_plain_lines_for_pipes_are_throttled_per_copy() -> None:
    import io

    from rich.console import Console

    from siterecovery.progress_view import PlainLines, progress_display

    buf = io.StringIO()
    console = Console(file=buf, width=200)
    assert not console.is_terminal
    lines = PlainLines(console, every=3600)
    for vm in ("web-01", "db-01"):
        for done in (10, 20, 30, 40):
            lines(ProgressEvent(vm, "replicate", done, 40, elapsed=1))
    assert buf.getvalue().splitlines() == [
        "web-01 replicate: 10 B of 40 B (25.0%), 0.0 MB/s", "web-01 replicate: 40 B of 40 B (100.0%), 0.0 MB/s",
        "db-01 replicate: 10 B of 40 B (25.0%), 0.0 MB/s", "db-01 replicate: 40 B of 40 B (100.0%), 0.0 MB/s"]
    buf.truncate(0)
    buf.seek(0)
    with progress_display(console):
        Reporter("app-01", "initial replication", every=0, clock=lambda: 0.0)(5, 10)
    Reporter("app-01", "initial replication", every=0, clock=lambda: 0.0)(10, 10)  # after the block: nobody listens
    assert buf.getvalue() == "app-01 initial replication: 5 B of 10 B (50.0%), 0.0 MB/s\n"
