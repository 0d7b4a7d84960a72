"""The bandwidth cap's token bucket (engine.HostBucket): one file per host shared by every sender, so
concurrent transfers together stay at the cap. Three senders with their own bucket objects on one file
(as three agent processes would be); the sink timestamps every write."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from siterecovery.replica.engine import HostBucket, ReplicaError, Throttled


class Sink:
    def __init__(self, log: list[tuple[float, int]], lock: threading.Lock) -> None:
        self.log, self.lock = log, lock

    def write(self, b: bytes) -> int:
        with self.lock:
            self.log.append((time.monotonic(), len(b)))
        return len(b)

    def flush(self) -> None:
        pass


def test_concurrent_senders_share_one_rate(tmp_path: Path) -> None:
    rate, each, piece = 2_000_000.0, 1 << 20, 64 * 1024
    log: list[tuple[float, int]] = []
    lock = threading.Lock()

    bucket = str(tmp_path / "host" / "bandwidth.bucket")
    burst = HostBucket(bucket, rate).burst * rate  # what the idle bucket lends at the start

    def sender() -> None:
        out = Throttled(Sink(log, lock), HostBucket(bucket, rate))  # type: ignore[arg-type]
        for _ in range(each // piece):
            out.write(b"x" * piece)

    threads = [threading.Thread(target=sender) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(n for _, n in log)
    assert total == 3 * each
    # At most the cap, all three together (each sender alone at the cap would give three times it). Not
    # counted: the idle bucket's burst, and the quantum (100 kB here) each sender reserves ahead and
    # writes at its reservation's start.
    span = max(t for t, _ in log) - t0
    assert (total - burst - 3 * 100_000) / span <= rate * 1.05, span


def test_a_rate_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ReplicaError, match="positive"):
        HostBucket(str(tmp_path / "b"), 0)


def test_a_stale_bucket_from_before_a_reboot_does_not_stall(tmp_path: Path) -> None:
    path = tmp_path / "bandwidth.bucket"
    path.write_text(repr(time.monotonic() + 10 * 86400))  # the monotonic clock restarted since
    assert HostBucket(str(path), 1_000_000).reserve(1000) == 0.0
