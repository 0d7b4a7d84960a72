"""Point-in-time views of a running QEMU (no guest needed: writes go through the device with HMP
qemu-io, exactly where a guest's writes go): a view shows the disks as they were when it was taken,
whatever is written afterwards, through the engine's own read path; a delta with the rotated dirty
bitmap reads only the blocks written between two views and lands the replica on the second view.

This is the guard for QEMU 7.2's snapshot-access bug (reads spanning more than one 64 KiB cluster return
data written after the view): the engine must see the old bytes, and must never ask for more than 64 KiB
in one request. (Here, raw files without O_DIRECT and writes from qemu-io, a 4 MiB read of the view did
not return the new data; qemu.md's reproduction did. So the request-size assertion is what fails if the
reader is widened, and the old-data assertions catch a wrong view whatever the reason.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import Pair

from siterecovery.replica import nbd, qemu
from siterecovery.replica.engine import BLOCK, file_digest

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
                                reason="QEMU is not installed (scripts/setup-system.sh installs qemu-system-x86)")
MiB = 1 << 20
# (offset, length, byte) written after the view: one block, one block at 1 MiB, and 128 KiB straddling
# three blocks; the same on both disks.
WRITES = [(0, 64 * 1024, 0x55), (MiB, 64 * 1024, 0x66), (3 * MiB + 32 * 1024, 128 * 1024, 0x77)]


def hmp(run: str, line: str) -> None:
    out = qemu.qmp(qemu.paths(run, "vm")["qmp"], "human-monitor-command", {"command-line": line})
    assert out == "", out  # qemu-io reports its errors as text


def write_after(run: str, dev: int) -> None:
    for off, ln, b in WRITES:
        hmp(run, f'qemu-io -d /machine/peripheral/vd{dev}/virtio-backend "write -P {b:#x} {off} {ln}"')


@pytest.fixture
def vm(tmp_path: Path) -> Any:
    raw = tmp_path / "d0.img"
    raw.write_bytes(b"\x11" * (8 * MiB))
    base = tmp_path / "d1.raw"
    base.write_bytes(b"\x22" * (8 * MiB))
    q = tmp_path / "d1.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base), str(q)], check=True)
    run = str(tmp_path / "run")
    # No kernel: the firmware idles, the machine runs (so capture's stop/cont window is real).
    qemu.start(run, "vm", {"accel": "tcg", "memory_mb": 64,
                           "disks": [{"path": str(raw), "format": "raw"}, {"path": str(q), "format": "qcow2"}]})
    try:
        yield run, raw, q
    finally:
        qemu.stop(run, "vm", 0)


def test_view_shows_the_point_not_later_writes_and_delta_reads_only_dirty_blocks(
        vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, raw, q = vm
    asked: list[tuple[int, int]] = []
    real = nbd.NBDClient._request

    def spy(self: nbd.NBDClient, cmd: int, offset: int, length: int) -> int:
        if cmd == 0:  # NBD_CMD_READ
            asked.append((offset, length))
        return real(self, cmd, offset, length)

    monkeypatch.setattr(nbd.NBDClient, "_request", spy)
    disks = [{"node": "d0", "format": "raw", "prev": None}, {"node": "d1", "format": "qcow2", "prev": None}]
    v1 = qemu.capture(run, "vm", disks, "t1")
    assert v1["was_running"] and v1["window_seconds"] < 5
    pairs = [Pair(tmp_path / f"p{i}", raw if i == 0 else q) for i in range(2)]
    write_after(run, 0)
    write_after(run, 1)
    for i, (pair, old) in enumerate(zip(pairs, (0x11, 0x22), strict=True)):
        sent, _ = pair.cycle("full", nbd={"socket": v1["socket"], "export": v1["disks"][i]["export"]})
        assert sent["view"] == "qemu-fleece" and sent["size"] == 8 * MiB
        got = Path(pair.rep.path).read_bytes()
        assert got == bytes([old]) * (8 * MiB), f"disk {i}: the view leaked data written after it"
    assert asked and all(ln <= nbd.READ_MAX and off % nbd.READ_MAX == 0 for off, ln in asked), max(asked)
    qemu.release(run, "vm", v1, ok=True)
    # The writes did reach the live raw disk (the view did not just miss them).
    assert raw.read_bytes()[:1] == b"\x55"

    # Second view: the bitmap started at view 1 holds exactly the blocks written since.
    disks = [{**d, "prev": v1["disks"][i]["new_bitmap"]} for i, d in enumerate(disks)]
    v2 = qemu.capture(run, "vm", disks, "t2")
    assert all(d["bitmap"] == "sr-t1" for d in v2["disks"])
    asked.clear()
    dirty_blocks = {b for off, ln, _ in WRITES for b in range(off // BLOCK, (off + ln - 1) // BLOCK + 1)}
    for i, pair in enumerate(pairs):
        sent, got = pair.cycle("delta", nbd={"socket": v2["socket"], "export": v2["disks"][i]["export"],
                                             "bitmap": f"qemu:dirty-bitmap:{v2['disks'][i]['bitmap']}"})
        assert sent["cbt"] and sent["blocks"] == len(dirty_blocks)
    # Only the dirty blocks were read, once per disk.
    assert sorted(off // BLOCK for off, _ in asked) == sorted(list(dirty_blocks) * 2)
    qemu.release(run, "vm", v2, ok=True)
    assert file_digest(pairs[0].rep.path) == file_digest(str(raw))
    # The replica of the qcow2 disk holds the guest's bytes (raw), as qemu-img reads them.
    conv = tmp_path / "d1-now.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(q), str(conv)], check=True)
    assert file_digest(pairs[1].rep.path) == file_digest(str(conv))
    # Teardown left nothing behind but the bitmap recording since view 2.
    nodes = qemu.qmp(qemu.paths(run, "vm")["qmp"], "query-named-block-nodes", {"flat": True})
    names = {n["node-name"] for n in nodes}
    assert not [n for n in names if n.startswith("sr-")], names
    assert {b["name"] for n in nodes if n["node-name"] == "d0" for b in n.get("dirty-bitmaps", [])} == {"sr-t2"}
    assert not list((Path(run) / "views").iterdir())


def test_partly_written_blocks_of_a_sparse_disk_are_read(tmp_path: Path) -> None:
    """Zero extents (base:allocation) spare reading only blocks that are zero whole: a block with 4 KiB
    of data among holes is read (the guest test once lost record 1 to a zero extent rounded outward)."""
    disk = tmp_path / "sparse.img"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(4096)
        f.write(b"A" * 4096)
        f.seek(2 * MiB - 512)
        f.write(b"B" * 1024)  # straddles two blocks
    run = str(tmp_path / "run")
    qemu.start(run, "vm", {"accel": "tcg", "memory_mb": 64, "disks": [{"path": str(disk), "format": "raw"}]})
    try:
        v = qemu.capture(run, "vm", [{"node": "d0", "format": "raw", "prev": None}], "t1")
        pair = Pair(tmp_path / "p", disk)
        sent, _ = pair.cycle("full", nbd={"socket": v["socket"], "export": v["disks"][0]["export"]})
        qemu.release(run, "vm", v, ok=True)
    finally:
        qemu.stop(run, "vm", 0)
    assert sent["blocks"] == 3
    assert file_digest(pair.rep.path) == file_digest(str(disk))


def test_a_view_left_behind_is_removed_by_the_next_capture(vm: Any, tmp_path: Path) -> None:
    """A view whose release never ran (the agent killed mid-cycle, its SSH link gone) leaves the device
    reading through our copy-before-write filter. The next capture removes it and works: without that,
    every later cycle failed ("no device on node d0") until QEMU restarted, and the old scratch grew with
    every guest write."""
    run, raw, q = vm
    disks = [{"node": "d0", "format": "raw", "prev": None}, {"node": "d1", "format": "qcow2", "prev": None}]
    v1 = qemu.capture(run, "vm", disks, "4-aa")  # never released
    write_after(run, 0)
    v2 = qemu.capture(run, "vm", [{**d, "prev": v1["disks"][i]["new_bitmap"]} for i, d in enumerate(disks)], "5-bb")
    pair = Pair(tmp_path / "p0", raw)
    pair.cycle("full", nbd={"socket": v2["socket"], "export": v2["disks"][0]["export"]})
    assert Path(pair.rep.path).read_bytes()[:1] == b"\x55"  # the new view: the writes after view 1 are in
    qemu.release(run, "vm", v2, ok=True)
    nodes = qemu.qmp(qemu.paths(run, "vm")["qmp"], "query-named-block-nodes", {"flat": True})
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("sr-")]
    assert not list((Path(run) / "views").iterdir())  # the old scratch files went too


def test_a_views_names_never_leave_its_scratch_directory() -> None:
    """A view's tag and disk key become node names and its scratch file's name: QEMU's node-name charset
    only, so no '/' (or anything else) can take the file outside the scratch directory."""
    assert qemu._names({"node": "d0"}, "7-ab12cd", "/run/views")["scratch"] == "/run/views/7-ab12cd-d0.scratch"
    for tag, key in (("../../etc/x", "d0"), ("7", "d0/../../x"), ("", "d0"), ("7", "d 0")):
        with pytest.raises(qemu.QemuError, match="letters, digits"):
            qemu._names({"node": "d0", "key": key}, tag, "/run/views")
