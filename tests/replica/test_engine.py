"""The block engine on local paths: full and delta cycles, sparseness, compression, points and undo
logs, retention, resize, resynchronization, refused corrupt transfers and lost change tracking."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import MiB, Pair, make_disk, scribble

from siterecovery.replica import engine
from siterecovery.replica.engine import (
    BLOCK,
    REC,
    CorruptTransfer,
    ManifestMismatch,
    NoReplica,
    Replica,
    file_digest,
)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    disk = tmp_path / "src.img"
    make_disk(disk, 32 * MiB + 1234, fill=0.25)
    return Pair(tmp_path, disk)


def test_initial_copy_is_sparse_and_exact(pair: Pair) -> None:
    sent, got = pair.cycle("full")
    assert file_digest(pair.rep.path) == file_digest(str(pair.disk))
    # zero blocks neither travel nor take space on the replica
    nonzero = sent["blocks"]
    assert nonzero < (32 * MiB) // BLOCK * 0.4
    assert os.stat(pair.rep.path).st_blocks * 512 <= (nonzero + 2) * BLOCK
    st = pair.rep.status()
    assert st["initialized"] and st["disk_matches"] and [p["seq"] for p in st["points"]] == [1]


def test_delta_ships_only_changed_blocks(pair: Pair) -> None:
    pair.cycle("full")
    changed = scribble(pair.disk, 20)
    sent, got = pair.cycle()
    assert sent["blocks"] == len(changed) == got["blocks"]
    assert sent["bytes"] <= len(changed) * (BLOCK + REC.size) + 200
    assert file_digest(pair.rep.path) == file_digest(str(pair.disk))
    # nothing changed: nothing travels, still a point
    sent, got = pair.cycle()
    assert sent["blocks"] == 0 and got["point"]["seq"] == 3


def test_zeroed_blocks_become_holes(pair: Pair) -> None:
    pair.cycle("full")
    before = os.stat(pair.rep.path).st_blocks
    with open(pair.disk, "r+b") as f:  # wipe the whole disk's data
        size = os.path.getsize(pair.disk)
        f.truncate(0)
        f.truncate(size)
    sent, _ = pair.cycle()
    assert sent["zero_blocks"] > 0 and sent["blocks"] == 0
    assert file_digest(pair.rep.path) == file_digest(str(pair.disk))
    assert os.stat(pair.rep.path).st_blocks < before / 4


def test_compression_and_raw_fallback(tmp_path: Path) -> None:
    text = tmp_path / "text.img"
    make_disk(text, 8 * MiB, fill=1.0, compressible=True)
    sent, _ = Pair(tmp_path / "a", text).cycle("full")
    assert sent["bytes"] < 8 * MiB / 10
    rnd = tmp_path / "rnd.img"
    make_disk(rnd, 8 * MiB, fill=1.0)
    sent, _ = Pair(tmp_path / "b", rnd).cycle("full")
    assert 8 * MiB <= sent["bytes"] <= 8 * MiB * 1.01  # incompressible blocks travel raw
    sent, _ = Pair(tmp_path / "c", text).cycle("full", compress=False)
    assert sent["bytes"] >= 8 * MiB


def test_points_rebuild_through_undo_logs(pair: Pair, tmp_path: Path) -> None:
    pair.cycle("full")
    digests = {1: file_digest(str(pair.disk))}
    for s in range(2, 6):
        scribble(pair.disk, 15, seed=s)
        if s == 3:
            os.truncate(pair.disk, os.path.getsize(pair.disk) + 5 * BLOCK + 3)  # grow
        if s == 5:
            os.truncate(pair.disk, os.path.getsize(pair.disk) - 9 * BLOCK - 11)  # shrink
        pair.cycle()
        digests[s] = file_digest(str(pair.disk))
    assert file_digest(pair.rep.path) == digests[5]
    for s in range(1, 6):
        out = pair.rep.rebuild(s, str(tmp_path / f"p{s}.img"))
        assert file_digest(str(tmp_path / f"p{s}.img")) == digests[s], s
        assert out["undo_applied"] == 5 - s
    assert file_digest(pair.rep.path) == digests[5]  # rebuilding never touches the replica
    # revert the replica itself (failover to an older point): newer points go
    pair.rep.revert(2)
    assert file_digest(pair.rep.path) == digests[2]
    st = pair.rep.status()
    assert [p["seq"] for p in st["points"]] == [1, 2] and st["disk_matches"]
    # the source is ahead of the reverted replica: change tracking no longer matches
    with pytest.raises(ManifestMismatch):
        pair.stream()


def test_retention_prunes_points_and_undo_logs(pair: Pair) -> None:
    old = (datetime.now(UTC) - timedelta(hours=5)).isoformat()
    data, sent = pair.stream("full")
    pair.rep.receive(io.BytesIO(data), pair.point(created_at=old), 24)
    engine.SourceState(pair.state).commit(bytes.fromhex(sent["gen"]))
    for s in range(3):
        scribble(pair.disk, 5, seed=10 + s)
        data, sent = pair.stream()
        pair.rep.receive(io.BytesIO(data), pair.point(created_at=old if s < 2 else None), 24)
        engine.SourceState(pair.state).commit(bytes.fromhex(sent["gen"]))
    assert len(pair.rep.status()["points"]) == 4
    assert len(os.listdir(pair.rep.undo_dir)) == 3
    dropped = pair.rep.prune(2)  # 2 hours: only the newest (fresh) point is young enough
    assert dropped == [1, 2, 3]
    assert [p["seq"] for p in pair.rep.status()["points"]] == [4]
    assert os.listdir(pair.rep.undo_dir) == []
    # retention 0 keeps exactly the newest point after every cycle
    scribble(pair.disk, 5, seed=20)
    pair.cycle(retention_hours=0)
    assert [p["seq"] for p in pair.rep.status()["points"]] == [5]


def test_corrupt_or_torn_transfer_is_never_applied(pair: Pair) -> None:
    pair.cycle("full")
    before = file_digest(pair.rep.path)
    scribble(pair.disk, 10)
    data, _ = pair.stream()
    # flip one byte inside the first record's payload
    hl = int.from_bytes(data[8:12], "little")
    pos = 12 + hl + REC.size + 100
    bad = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
    with pytest.raises(CorruptTransfer, match="checksum|decompress"):
        pair.rep.receive(io.BytesIO(bad), pair.point(), 24)
    assert file_digest(pair.rep.path) == before
    for cut in (len(data) - 5, len(data) // 2, 20):
        with pytest.raises(CorruptTransfer):
            pair.rep.receive(io.BytesIO(data[:cut]), pair.point(), 24)
        assert file_digest(pair.rep.path) == before
    assert pair.rep.status()["disk_matches"]
    assert not [n for n in os.listdir(pair.rep.meta) if n.startswith("staging")]
    # the intact stream still applies afterwards
    pair.rep.receive(io.BytesIO(data), pair.point(), 24)
    assert file_digest(pair.rep.path) == file_digest(str(pair.disk))


def test_resync_ships_only_differing_blocks(pair: Pair, tmp_path: Path) -> None:
    pair.cycle("full")
    # the replica is written outside replication: its manifest no longer matches its disk
    fd = os.open(pair.rep.path, os.O_RDWR)
    os.pwrite(fd, b"x" * 100, 7 * BLOCK)
    os.pwrite(fd, b"y" * 100, 300 * BLOCK)
    os.close(fd)
    assert not pair.rep.status()["disk_matches"]
    scribble(pair.disk, 4)  # and the source changed too
    info = pair.rep.rehash()
    assert not info["points_kept"]
    manifest = tmp_path / "base.manifest"
    manifest.write_bytes(Path(pair.rep.manifest).read_bytes())
    data, sent = pair.stream("base", base_manifest=str(manifest))
    assert sent["blocks"] <= 6  # 4 changed at the source + 2 scribbled on the replica
    pair.rep.receive(io.BytesIO(data), pair.point(), 24)
    assert file_digest(pair.rep.path) == file_digest(str(pair.disk))
    assert pair.rep.status()["disk_matches"]


def _forge(data: bytes, **updates: object) -> bytes:
    hdr_len = int.from_bytes(data[8:12], "little")
    hdr = json.loads(data[12:12 + hdr_len])
    hdr.update(updates)
    hj = json.dumps(hdr).encode()
    return data[:8] + len(hj).to_bytes(4, "little") + hj + data[12 + hdr_len:]


def test_lost_change_tracking_is_detected(pair: Pair) -> None:
    with pytest.raises(NoReplica):
        pair.rep.receive(io.BytesIO(_forge(pair.stream("full")[0], mode="delta")), pair.point(), 24)
    pair.cycle("full")
    os.unlink(os.path.join(pair.state, "manifest"))
    with pytest.raises(ManifestMismatch):
        pair.stream()
    # a delta computed against another generation is refused by the replica
    other = Replica(pair.rep.path, pair.rep.meta)
    forged = _forge(pair.stream("full")[0], mode="delta", base_gen="00" * 16)
    with pytest.raises(ManifestMismatch):
        other.receive(io.BytesIO(forged), pair.point(), 24)


def test_unreadable_manifest_means_no_tracking(pair: Pair) -> None:
    pair.cycle("full")
    with open(pair.rep.manifest, "r+b") as f:
        f.truncate(100)  # torn
    assert not pair.rep.status()["initialized"]


def test_block_changing_between_hash_and_ship_stays_consistent(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live disk written after a chunk was hashed but before its blocks were copied: the replica
    must get a block whose digest matches what it received, and the source manifest must record that
    digest (else a later cycle could skip a block the replica does not have)."""
    pair.cycle("full")
    changed = sorted(scribble(pair.disk, 3))
    real_scan = engine.scan
    late = changed[0]

    def racing_scan(fd: int, size: int):  # type: ignore[no-untyped-def]
        for first, data, digs in real_scan(fd, size):
            if data is not None and first <= late < first + len(digs):
                w = os.open(pair.disk, os.O_RDWR)
                os.pwrite(w, b"late write" * 100, late * BLOCK)  # the mapped view sees it at once
                os.close(w)
            yield first, data, digs

    monkeypatch.setattr(engine, "scan", racing_scan)
    sent, _ = pair.cycle()
    monkeypatch.setattr(engine, "scan", real_scan)
    assert sent["blocks"] == 3
    assert file_digest(pair.rep.path) == file_digest(str(pair.disk))
    sent, _ = pair.cycle()
    assert sent["blocks"] == 0  # the manifest holds what was shipped
