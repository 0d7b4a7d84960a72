"""Reverse replication after a planned failover, without a block compare of two identical disks.

After a planned failover both sites hold the failover point: the old replica is that point (its manifest)
and the old primary is what the final cycle read, unchanged since (its stat, recorded by that cycle, proves
it). Reverse replication then seeds the new source with the point's manifest and adopts the old primary as
the replica of the point: the first reversed cycle ships only what the failed-over VM wrote, and neither
disk is read at the other's site. Where the proof fails (the old primary was written after the final sync,
even with its mtime put back; the two sites' manifests differ), that disk is compared block by block, and
the replica still ends equal to the source: the proof can only save work, never hide a difference.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from estate import fabric, local_host, placement, reverse

from siterecovery.fabric.base import Placement, ReplicationState
from siterecovery.fabric.linux import LinuxFabric
from siterecovery.replica import engine
from siterecovery.replica.engine import BLOCK, file_digest
from siterecovery.testing.disks import make_disk, rewrite_blocks, scribble

S = ReplicationState
MiB = 1024 * 1024


class Reads:
    """What the agents did: every send's mode and every rehash (a rehash reads a whole replica disk)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sends: list[tuple[str, str]] = []
        self.rehashed: list[str] = []
        send, rehash = engine.send, engine.Replica.rehash

        def spy_send(disk: str, state_dir: str, out: Any, **kw: Any) -> dict[str, Any]:
            self.sends.append((os.path.basename(disk), kw.get("mode", "delta")))
            return send(disk, state_dir, out, **kw)

        def spy_rehash(r: engine.Replica, *a: Any, **kw: Any) -> dict[str, Any]:
            self.rehashed.append(r.path)
            return rehash(r, *a, **kw)

        monkeypatch.setattr(engine, "send", spy_send)
        monkeypatch.setattr(engine.Replica, "rehash", spy_rehash)

    def clear(self) -> None:
        self.sends.clear()
        self.rehashed.clear()


def failed_over(tmp_path: Path, size: int = 32 * MiB) -> tuple[LinuxFabric, Placement, Path, Path]:
    """A VM replicated ny -> chi, its last writes just before a planned failover, failed over and committed."""
    disk = tmp_path / "a-disks" / "web-01.img"
    disk.parent.mkdir()
    make_disk(disk, size, seed=7)
    a = local_host("ny-h1", "ny", tmp_path / "root-a")
    b = local_host("chi-h1", "chi", tmp_path / "root-b")
    f = fabric(tmp_path / "state")
    p = placement(a, b, disk)
    assert f.enable_replication(p).changed
    assert f.start_initial_replication(p).state == S.Replicating
    scribble(disk)
    assert f.replicate(p).changed
    scribble(disk)  # written just before the failover: the final cycle must still be able to prove it
    assert f.prepare_planned_failover(p).state == S.PreparedForFailover
    assert f.failover(p).state == S.FailedOverWaitingCompletion
    assert f.commit_failover(p).state == S.FailedOver
    replica = tmp_path / "root-b" / "web-01" / "replica" / "os.img"
    assert file_digest(str(replica)) == file_digest(str(disk))
    return f, p, disk, replica


def test_reverse_after_a_planned_failover_ships_only_what_the_vm_wrote(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    f, p, disk, replica = failed_over(tmp_path)
    reads = Reads(monkeypatch)
    written = rewrite_blocks(replica, [3, 100, 101, 400], random.Random(1))  # the VM at chi writes
    assert written == 4 * BLOCK
    r = f.reverse_replication(p)
    assert r.state == S.Replicating, r.message
    assert "no block compare" in r.message and r.details["compared"] == "none", r.message
    assert reads.rehashed == [] and reads.sends == [("os.img", "delta")], (reads.rehashed, reads.sends)
    assert 4 * BLOCK <= r.bytes_sent < 5 * BLOCK  # the four blocks (random data: no compression)
    assert file_digest(str(disk)) == file_digest(str(replica))

    # The adopted replica is a replica like any other: the next cycles, a failback, protection again.
    pb = reverse(p)
    reads.clear()
    scribble(replica)
    assert f.replicate(pb).changed
    assert reads.sends == [("os.img", "delta")] and reads.rehashed == []
    assert file_digest(str(disk)) == file_digest(str(replica))
    assert f.prepare_planned_failover(pb).state == S.PreparedForFailover
    assert f.failover(pb).changed and f.commit_failover(pb).changed
    rewrite_blocks(disk, [7], random.Random(2))
    back = f.reverse_replication(pb)
    assert "no block compare" in back.message and back.bytes_sent < 2 * BLOCK, back.message
    assert file_digest(str(disk)) == file_digest(str(replica))
    scribble(disk)
    assert f.replicate(p).changed
    assert file_digest(str(disk)) == file_digest(str(replica))
    assert len(f.recovery_points(p)) >= 2  # the adopted point, then the new one


def _write(disk: Path) -> None:
    rewrite_blocks(disk, [9], random.Random(3))


def _write_and_reset_mtime(disk: Path) -> None:
    st = os.stat(disk)
    rewrite_blocks(disk, [9], random.Random(3))
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back: ctime still moves


@pytest.mark.parametrize("stray", [_write, _write_and_reset_mtime], ids=["write", "write-mtime-reset"])
def test_an_old_primary_written_after_the_final_sync_is_compared_block_by_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stray: Callable[[Path], None]) -> None:
    f, p, disk, replica = failed_over(tmp_path)
    stray(disk)  # someone booted the old primary, or a script touched its disk: it no longer holds the point
    assert file_digest(str(disk)) != file_digest(str(replica))
    reads = Reads(monkeypatch)
    r = f.reverse_replication(p)
    assert r.state == S.Replicating
    # The stray block is repaired from the new source: the replica is the source, nothing hidden.
    assert file_digest(str(disk)) == file_digest(str(replica))
    assert r.details["compared"] == "os", r.message
    assert "block compare (the disk changed after the last cycle read it" in r.message, r.message
    assert reads.rehashed and reads.sends == [("os.img", "base")]


def test_manifests_that_differ_are_never_adopted(tmp_path: Path) -> None:
    f, p, disk, replica = failed_over(tmp_path)
    # The old replica's manifest says something else than the old primary's (a bug or a damaged file):
    # whichever is right, the two sides do not provably hold the same point.
    meta = tmp_path / "root-b" / "web-01" / "meta" / "os" / "manifest"
    raw = bytearray(meta.read_bytes())
    raw[engine.MHDR.size + 5 * engine.DIG] ^= 0xFF
    meta.write_bytes(bytes(raw))
    r = f.reverse_replication(p)
    assert r.state == S.Replicating
    assert file_digest(str(disk)) == file_digest(str(replica))
    assert "block compare (the failover point's manifests differ at the two sites)" in r.message, r.message


def test_a_racily_clean_record_proves_nothing(tmp_path: Path) -> None:
    """A stat taken within the racy window of the disk's last write cannot prove a later write absent
    (it may land in the same timestamp tick): adopt refuses it."""
    disk = tmp_path / "d.img"
    make_disk(disk, 4 * MiB, seed=1)
    state = tmp_path / "state"
    out = tmp_path / "stream"
    soon = time.time_ns() + 1_000_000_000
    os.utime(disk, ns=(soon, soon))  # written "now" whatever the machine's speed: racily clean for sure
    with open(out, "wb") as o:
        sent = engine.send(str(disk), str(state), o, mode="full")  # no settle
    pending = engine.read_manifest_header(str(state / "manifest.pending"))
    assert pending is not None
    digest = engine.manifest_digest(str(state / "manifest.pending"))
    point = {"id": "web@1", "created_at": "2026-01-01T00:00:00+00:00", "seq": 1, "gen": sent["gen"]}
    rep = engine.Replica(str(disk), str(tmp_path / "meta"))
    got = engine.adopt(rep, str(state), bytes.fromhex(sent["gen"]), digest, point)
    assert got == {"adopted": False, "reason": "the disk was written less than 2 s before the last cycle read it "
                                               "(racily clean)"}
    assert not (tmp_path / "meta").exists()
    # With the disk left alone long enough, the same cycle with settle proves it.
    os.utime(disk)
    with open(out, "wb") as o:
        sent = engine.send(str(disk), str(state), o, mode="full", settle=engine.RACY_NS / 1e9 + 0.1)
    digest = engine.manifest_digest(str(state / "manifest.pending"))
    got = engine.adopt(rep, str(state), bytes.fromhex(sent["gen"]), digest, {**point, "gen": sent["gen"]})
    assert got == {"adopted": True, "reason": ""}
    st = rep.status()
    assert st["disk_matches"] and st["gen"] == sent["gen"] and [x["seq"] for x in st["points"]] == [1]
