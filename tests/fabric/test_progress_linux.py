"""Progress of the linux fabric's long copies on real file-backed disks: the initial copy and a
resynchronization report one count over the VM's disks (done never going back, the total the disks'
sizes from the first call, done == total at the end) on local paths and over a real sshd, with one
side remote or both (the orchestrator relays and reads the sender's progress lines)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from estate import fabric, local_host
from sshd import SSHServer

from siterecovery.fabric.base import Placement
from siterecovery.mapping import DiskPlacement
from siterecovery.model import Host, ReplicationPolicy
from siterecovery.replica.engine import file_digest
from siterecovery.testing.disks import make_disk

MiB = 1024 * 1024
# os is larger than the agent's 64 MiB between two progress lines, so a relayed copy reports mid-disk too.
SIZES = {"os": 72 * MiB, "data": 12 * MiB}
TOTAL = sum(SIZES.values())


def two_disk_placement(a: Host, b: Host, disks: Path) -> Placement:
    return Placement(
        vm="web-01", pairing="ny-chi", source=a, target=b,
        policy=ReplicationPolicy(name="p", copy_frequency_seconds=30, recovery_history_hours=4),
        disks=tuple(DiskPlacement(disk=n, source_path=str(disks / f"{n}.img"), target_location=None, classification=None)
                    for n in SIZES))


def check(calls: list[tuple[int, int]]) -> None:
    assert calls, "no progress reported"
    assert all(t == TOTAL for _, t in calls), calls  # the whole VM's total from the first call on
    done = [d for d, _ in calls]
    assert done == sorted(done), calls
    assert done[-1] == TOTAL, calls
    assert any(0 < d < SIZES["os"] for d in done), calls  # progress inside the first disk, not only at its end


def run(tmp_path: Path, a: Host, b: Host) -> None:
    disks = tmp_path / "disks"
    disks.mkdir()
    for name, size in SIZES.items():
        make_disk(disks / f"{name}.img", size, every=2)
    f = fabric(tmp_path / "state")
    p = two_disk_placement(a, b, disks)
    try:
        f.enable_replication(p)
        calls: list[tuple[int, int]] = []
        r = f.start_initial_replication(p, progress=lambda d, t: calls.append((d, t)))
        assert r.changed
        check(calls)
        replica = tmp_path / "rb" / "web-01" / "replica"
        assert all(file_digest(str(replica / f"{n}.img")) == file_digest(str(disks / f"{n}.img")) for n in SIZES)

        # the replica changed behind replication's back: a resync compares both disks and ships the difference
        with open(replica / "os.img", "r+b") as fh:
            fh.seek(40 * MiB)
            fh.write(os.urandom(8192))
        calls.clear()
        r = f.resynchronize(p, progress=lambda d, t: calls.append((d, t)))
        assert r.changed and r.bytes_sent < MiB
        check(calls)
        assert file_digest(str(replica / "os.img")) == file_digest(str(disks / "os.img"))
    finally:
        f.close()


def test_local_copy_and_resync_report_progress(tmp_path: Path) -> None:
    run(tmp_path, local_host("a", "ny", tmp_path / "ra"), local_host("b", "chi", tmp_path / "rb"))


@pytest.mark.sshd
@pytest.mark.parametrize("src_remote,dst_remote", [(True, False), (False, True), (True, True)],
                         ids=["remote-to-local", "local-to-remote", "relayed"])
def test_copy_and_resync_over_ssh_report_progress(sshd_server: SSHServer, tmp_path: Path, src_remote: bool,
                                                  dst_remote: bool) -> None:
    a = sshd_server.host("a", "ny", root=str(tmp_path / "ra")) if src_remote else local_host("a", "ny", tmp_path / "ra")
    b = sshd_server.host("b", "chi", root=str(tmp_path / "rb")) if dst_remote else local_host("b", "chi", tmp_path / "rb")
    run(tmp_path, a, b)
