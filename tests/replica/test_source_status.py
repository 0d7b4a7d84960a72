"""Pending bytes and change tracking as the source sees them (engine.source_status): 0 without reading
an unchanged disk, the exact changed blocks after a write, unknown past the scan limit or without the
replica's manifest, and never a false 0 for a racily clean record."""

from __future__ import annotations

import os
import time
from pathlib import Path

from helpers import MiB, Pair, make_disk, scribble

from siterecovery.replica.engine import BLOCK, source_status


def pair(tmp_path: Path, age_seconds: float = 3600) -> tuple[Pair, bytes]:
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 * MiB)
    # A disk last written an hour ago: its cycle's record cannot be racily clean.
    t = time.time_ns() - int(age_seconds * 1e9)
    os.utime(disk, ns=(t, t))
    p = Pair(tmp_path, disk)
    p.cycle("full")
    return p, bytes.fromhex(p.rep.status()["gen"])


def test_unchanged_disk_is_zero_without_a_scan(tmp_path: Path) -> None:
    p, gen = pair(tmp_path)
    assert source_status(str(p.disk), p.state, gen, scan_limit=0) == {
        "tracked": True, "pending_bytes": 0, "how": "unchanged", "size": 8 * MiB}


def test_changed_blocks_are_counted_exactly(tmp_path: Path) -> None:
    p, gen = pair(tmp_path)
    changed = scribble(p.disk, 7)
    with open(p.disk, "ab") as f:  # the disk grows by half a block: that part is pending too
        f.write(os.urandom(BLOCK // 2))
    out = source_status(str(p.disk), p.state, gen, scan_limit=1 << 30)
    assert out["how"] == "scanned" and out["pending_bytes"] == len(changed) * BLOCK + BLOCK // 2
    # past the scan limit nobody knows: unknown, not 0
    assert source_status(str(p.disk), p.state, gen, scan_limit=MiB)["pending_bytes"] is None
    # after the next cycle (acknowledged or still pending at the source) nothing is pending
    p.cycle()
    gen2 = bytes.fromhex(p.rep.status()["gen"])
    assert source_status(str(p.disk), p.state, gen2, scan_limit=1 << 30)["pending_bytes"] == 0


def test_racily_clean_record_is_checked_by_a_scan(tmp_path: Path) -> None:
    p, gen = pair(tmp_path, age_seconds=0)  # written just before the cycle read it
    out = source_status(str(p.disk), p.state, gen, scan_limit=1 << 30)
    assert out["how"] == "scanned" and out["pending_bytes"] == 0
    assert source_status(str(p.disk), p.state, gen, scan_limit=0)["pending_bytes"] is None


def test_lost_or_stale_manifest_is_untracked(tmp_path: Path) -> None:
    p, gen = pair(tmp_path)
    assert source_status(str(p.disk), p.state, os.urandom(16), scan_limit=1 << 30)["tracked"] is False
    for name in ("manifest", "manifest.pending"):
        if os.path.exists(os.path.join(p.state, name)):
            os.unlink(os.path.join(p.state, name))
    assert source_status(str(p.disk), p.state, gen, scan_limit=1 << 30) == {
        "tracked": False, "pending_bytes": None, "how": "untracked"}
