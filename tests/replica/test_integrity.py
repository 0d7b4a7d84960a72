"""Silent corruption of a replica (issue 13, item 2): the quick check includes ctime, and the scrub
re-hashes the replica (and its undo logs) against the manifests, whatever the timestamps say."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import MiB, Pair, make_disk, scribble

from siterecovery.replica import engine
from siterecovery.replica.engine import BLOCK, CHUNK, ManifestMismatch, file_digest
from siterecovery.testing.disks import rot


@contextlib.contextmanager
def _nolock() -> Iterator[None]:
    yield


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    disk = tmp_path / "src.img"
    make_disk(disk, 16 * MiB, fill=0.5)
    p = Pair(tmp_path, disk)
    p.cycle("full")
    return p


def trust_current_stat(pair: Pair) -> None:
    """Bit rot changes no timestamp, and no user-space test can write without moving ctime: record the
    file's current stat as committed, so the quick check sees nothing and only the scrub can."""
    st = json.loads(Path(pair.rep.state_file).read_text())
    st["stat"] = pair.rep._stat()
    Path(pair.rep.state_file).write_text(json.dumps(st))


def data_block(pair: Pair) -> int:
    """A block that holds data (not a hole) on the replica."""
    fd = os.open(pair.rep.path, os.O_RDONLY)
    try:
        return os.lseek(fd, 3 * CHUNK, os.SEEK_DATA) // BLOCK
    finally:
        os.close(fd)


def test_bytes_changed_with_mtime_set_back_fail_the_quick_check(pair: Pair) -> None:
    assert pair.rep.status()["disk_matches"]
    rot(Path(pair.rep.path), 5 * BLOCK + 100)
    st = pair.rep.status()
    assert not st["disk_matches"]
    assert any(d.startswith("ctime") for d in st["differs"]) and not any(d.startswith("mtime") for d in st["differs"])
    # the next delta is refused, naming what differs: the cycle turns into a resynchronization
    scribble(pair.disk, 3)
    data, _ = pair.stream("delta")
    with pytest.raises(ManifestMismatch, match="ctime"):
        pair.rep.receive(io.BytesIO(data), pair.point())


def test_a_stat_recorded_before_ctime_was_checked_still_works(pair: Pair) -> None:
    st = json.loads(Path(pair.rep.state_file).read_text())
    st["stat"] = st["stat"][:3]  # size, mtime, inode: the record older releases wrote
    Path(pair.rep.state_file).write_text(json.dumps(st))
    assert pair.rep.status()["disk_matches"]
    pair.cycle()  # a commit writes the four-field record
    assert len(json.loads(Path(pair.rep.state_file).read_text())["stat"]) == 4


def test_scrub_finds_rot_the_quick_check_cannot_see_and_a_resync_repairs_it(pair: Pair) -> None:
    clean = pair.rep.scrub(_nolock)
    assert clean["next"] is None and clean["corrupt_blocks"] == [] and clean["bytes_read"] > 0
    bad = data_block(pair)
    rot(Path(pair.rep.path), bad * BLOCK + 7)
    trust_current_stat(pair)
    assert pair.rep.status()["disk_matches"]  # timestamps say nothing: only the scrub can tell
    found = pair.rep.scrub(_nolock)
    assert found["corrupt_blocks"] == [bad]
    st = pair.rep.status()
    assert not st["disk_matches"] and st["corrupt"]["blocks"] == [bad]
    assert any("scrub found 1 corrupt block" in d for d in st["differs"])
    with pytest.raises(ManifestMismatch, match="scrub found corrupt blocks"):
        data, _ = pair.stream("delta")
        pair.rep.receive(io.BytesIO(data), pair.point())
    # the repair: the replica's own manifest, then only the blocks that differ from the source
    manifest = io.BytesIO()
    pair.rep.rehash(manifest)
    base = Path(pair.state) / "base.manifest"
    base.write_bytes(manifest.getvalue())
    sent, _ = pair.cycle("base", base_manifest=str(base))
    assert sent["blocks"] == 1
    assert file_digest(pair.rep.path) == file_digest(str(pair.disk))
    st = pair.rep.status()
    assert st["disk_matches"] and st["corrupt"] is None
    assert pair.rep.scrub(_nolock)["corrupt_blocks"] == []


def test_scrub_in_slices_at_a_capped_rate(pair: Pair) -> None:
    bad = (os.path.getsize(pair.rep.path) // BLOCK) - 1
    rot(Path(pair.rep.path), bad * BLOCK)
    trust_current_stat(pair)
    rate = 20_000_000
    start, slices, read, found = 0, 0, 0, []
    t0 = time.monotonic()
    nxt: int | None = 0
    while nxt is not None:
        out = pair.rep.scrub(_nolock, start=start, max_seconds=0, rate=rate)
        slices += 1
        read += out["bytes_read"]
        found += out["corrupt_blocks"]
        nxt = out["next"]
        if nxt is not None:
            assert nxt > start and nxt % (CHUNK // BLOCK) == 0
            start = nxt
    elapsed = time.monotonic() - t0
    assert slices == os.path.getsize(pair.rep.path) // CHUNK  # one 4 MiB chunk per slice here
    assert found == [bad]
    assert read / elapsed <= rate * 1.05, (read, elapsed)  # never faster than the cap


def test_scrub_with_points_finds_a_corrupt_undo_log(pair: Pair) -> None:
    for seed in range(3):
        scribble(pair.disk, 4, seed=10 + seed)
        pair.cycle()
    undo = Path(pair.rep.undo_path(3))
    assert undo.stat().st_size > BLOCK // 2  # old content of the blocks point 3 overwrote
    size = undo.stat().st_size
    with open(undo, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    assert pair.rep.scrub(_nolock)["corrupt_undo"] == []  # the disk alone is fine
    out = pair.rep.scrub(_nolock, points=True)
    assert out["corrupt_undo"] == [3] and out["corrupt_blocks"] == []
    assert not pair.rep.status()["disk_matches"]
    # the repair keeps the points that do not need the corrupt log (3 and 4) and drops 1 and 2
    pair.rep.rehash()
    st = pair.rep.status()
    assert st["disk_matches"] and [p["seq"] for p in st["points"]] == [3, 4]


def test_an_apply_racing_the_scrub_is_not_reported_as_rot(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read pass holds no lock: a cycle applied meanwhile makes blocks differ from the manifest the
    pass started with. They are read again under the lock, against the manifest of then."""
    scribble(pair.disk, 10)
    data, _ = pair.stream("delta")
    real = engine.scan
    fired: list[Any] = []

    def racing(fd: int, size: int, start: int = 0) -> Iterator[Any]:
        for item in real(fd, size, start):
            if not fired:
                fired.append(pair.rep.receive(io.BytesIO(data), pair.point()))
            yield item

    locked: list[bool] = []

    @contextlib.contextmanager
    def lock() -> Iterator[None]:
        locked.append(True)
        yield

    monkeypatch.setattr(engine, "scan", racing)
    out = pair.rep.scrub(lock)
    assert fired and locked  # the apply happened mid-pass and the suspects were re-read under the lock
    assert out["corrupt_blocks"] == []
    monkeypatch.setattr(engine, "scan", real)
    assert pair.rep.status()["disk_matches"]
