"""The linux fabric end to end: over a real sshd (both hosts remote: the orchestrator only relays) and
on local paths; the process compute backend (libvirt: test_libvirt.py); idempotency and state checks as in memory.py."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from estate import fabric, local_host, placement, reverse
from sshd import SSHServer

from siterecovery.errors import InvalidStateError, NotFoundError
from siterecovery.fabric import Fabric, driver_for
from siterecovery.fabric.base import Health, PointChoice, ReplicationState
from siterecovery.model import ReplicationPolicy
from siterecovery.model.protection import ExistingReplicaInitial, OfflineInitial
from siterecovery.replica.engine import BLOCK, file_digest
from siterecovery.replica.process import alive
from siterecovery.testing.disks import make_disk, scribble

S = ReplicationState
MiB = 1024 * 1024


def wait_for(pred, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.sshd
def test_lifecycle_over_ssh(sshd_server: SSHServer, tmp_path: Path) -> None:
    disk = tmp_path / "a-disks" / "web-01.img"
    disk.parent.mkdir()
    make_disk(disk, 16 * MiB)
    events = tmp_path / "events.log"
    a = sshd_server.host("ny-h1", "ny", root=str(tmp_path / "root-a"))
    b = sshd_server.host("chi-h1", "chi", root=str(tmp_path / "root-b"))
    f = fabric(tmp_path / "state")
    assert isinstance(f, Fabric)
    p = placement(a, b, disk, events)
    try:
        assert f.enable_replication(p).changed
        assert not f.enable_replication(p).changed
        r = f.start_initial_replication(p)
        assert r.changed and r.state == S.Replicating and r.point is not None
        assert not f.start_initial_replication(p).changed
        replica = tmp_path / "root-b" / "web-01" / "replica" / "os.img"
        assert file_digest(str(replica)) == file_digest(str(disk))
        assert "freeze" in events.read_text() and "thaw" in events.read_text()

        digests = [file_digest(str(disk))]
        scribble(disk)
        r = f.replicate(p)
        assert 0 < r.bytes_sent < 10 * (BLOCK + 100)
        digests.append(file_digest(str(disk)))
        scribble(disk)
        r = f.replicate(p, consistency="app")
        assert r.point is not None and r.point.consistency == "app"
        assert "quiesce" in events.read_text()
        digests.append(file_digest(str(disk)))
        assert file_digest(str(replica)) == digests[-1]

        pts = f.recovery_points(p)
        assert len(pts) == 3
        h = f.replication_health(p)
        assert h.health == Health.Normal and h.successful_cycles == 3 and h.state == S.Replicating
        assert h.current_rpo_seconds is not None and h.current_rpo_seconds < 60 and not h.resync_required

        # test failover of the middle point: a disposable copy, started on the isolated network
        t = f.test_failover(p, PointChoice(kind="point_in_time", at=pts[1].created_at))
        assert t.changed and t.point is not None and t.point.id == pts[1].id
        test_img = tmp_path / "root-b" / "web-01" / "test" / "os.img"
        assert file_digest(str(test_img)) == digests[1]
        test_pid = tmp_path / "root-b" / "web-01" / "run" / "test.pid"
        assert alive(str(test_pid))
        log = tmp_path / "root-b" / "web-01" / "run" / "test.log"
        assert wait_for(lambda: "isolated" in log.read_text() and str(test_img) in log.read_text())
        assert not f.test_failover(p).changed
        assert f.replication_health(p).test_failover_active
        # production keeps replicating during the drill
        scribble(disk)
        assert f.replicate(p).changed
        digests.append(file_digest(str(disk)))
        with pytest.raises(InvalidStateError, match="test failover"):
            f.failover(p)
        pid = alive(str(test_pid))
        assert f.cleanup_test_failover(p).changed
        assert not test_img.exists() and pid is not None and wait_for(lambda: not _pid_alive(pid))
        assert not f.cleanup_test_failover(p).changed

        # planned failover: the source VM stops, a final cycle ships its last writes
        assert f.start_vm(p, side="source").changed
        src_pid = tmp_path / "root-a" / "web-01" / "run" / "vm.pid"
        assert alive(str(src_pid))
        assert not f.start_vm(p, side="source").changed
        scribble(disk)
        r = f.prepare_planned_failover(p)
        assert r.state == S.PreparedForFailover and not alive(str(src_pid))
        assert file_digest(str(replica)) == file_digest(str(disk))
        assert not f.prepare_planned_failover(p).changed
        r = f.failover(p)
        assert r.state == S.FailedOverWaitingCompletion
        assert f.start_vm(p, side="target").changed
        assert alive(str(tmp_path / "root-b" / "web-01" / "run" / "vm.pid"))
        assert f.commit_failover(p).state == S.FailedOver
        assert not f.commit_failover(p).changed

        # reverse: the old source becomes the replica, by block compare (no full copy)
        r = f.reverse_replication(p)
        assert r.changed and r.state == S.Replicating
        assert r.bytes_sent < 2 * MiB  # the disk is 16 MiB, a third of it data
        assert not f.reverse_replication(p).changed
        pb = reverse(p)
        with pytest.raises(InvalidStateError, match="replication runs"):
            f.replicate(p)
        scribble(replica)  # the failed-over VM writes
        assert f.replicate(pb).changed
        assert file_digest(str(disk)) == file_digest(str(replica))

        # failback: planned failover back to ny, then protect again ny -> chi
        assert f.prepare_planned_failover(pb).state == S.PreparedForFailover
        assert f.failover(pb).changed
        assert f.commit_failover(pb).changed
        assert f.reverse_replication(pb).changed
        h = f.replication_health(p)
        assert h.primary_host == "ny-h1" and h.state == S.Replicating
        scribble(disk)
        assert f.replicate(p).changed
        assert file_digest(str(replica)) == file_digest(str(disk))
        assert f.disable_replication(p, delete_replica=True).changed
        assert not replica.exists()
        assert not f.disable_replication(p).changed
    finally:
        for host_root in ("root-a", "root-b"):
            for name in ("vm.pid", "test.pid"):
                pidfile = tmp_path / host_root / "web-01" / "run" / name
                if pidfile.exists() and alive(str(pidfile)):
                    os.kill(int(pidfile.read_text()), 9)
        f.close()


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, only not reaped
    except FileNotFoundError:
        return False


@pytest.mark.sshd
@pytest.mark.parametrize("src_remote,dst_remote", [(False, True), (True, False)])
def test_one_side_remote(sshd_server: SSHServer, tmp_path: Path, src_remote: bool, dst_remote: bool) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 * MiB)
    a = sshd_server.host("a", "ny", root=str(tmp_path / "ra")) if src_remote else local_host("a", "ny", tmp_path / "ra")
    b = sshd_server.host("b", "chi", root=str(tmp_path / "rb")) if dst_remote else local_host("b", "chi", tmp_path / "rb")
    f = fabric(tmp_path / "state")
    p = placement(a, b, disk)
    seen: list[tuple[int, int]] = []
    try:
        f.enable_replication(p)
        f.start_initial_replication(p, progress=lambda d, t: seen.append((d, t)))
        assert seen and seen[-1][0] == seen[-1][1] == 8 * MiB
        scribble(disk)
        f.replicate(p)
        replica = tmp_path / "rb" / "web-01" / "replica" / "os.img"
        assert file_digest(str(replica)) == file_digest(str(disk))
        # change tracking lost at the source: the cycle resynchronizes by itself
        shutil.rmtree(tmp_path / "ra" / "web-01" / "source")
        scribble(disk)
        r = f.replicate(p)
        assert "resynchronized" in r.message and r.bytes_sent < MiB
        assert file_digest(str(replica)) == file_digest(str(disk))
    finally:
        f.close()


def test_unplanned_failover_to_older_point_then_cancel(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 * MiB)
    a, b = local_host("a", "ny", tmp_path / "ra"), local_host("b", "chi", tmp_path / "rb")
    f = driver_for("linux", fabric(tmp_path / "state").context)
    p = placement(a, b, disk)
    with pytest.raises(NotFoundError):
        f.replicate(p)
    f.enable_replication(p)
    with pytest.raises(InvalidStateError, match="does not allow"):
        f.replicate(p)
    f.start_initial_replication(p)
    digests = [file_digest(str(disk))]
    for _ in range(3):
        scribble(disk)
        f.replicate(p)
        digests.append(file_digest(str(disk)))
    pts = f.recovery_points(p)
    assert len(pts) == 4
    r = f.failover(p, PointChoice(kind="point_in_time", at=pts[1].created_at))
    assert r.point is not None and r.point.id == pts[1].id
    replica = tmp_path / "rb" / "web-01" / "replica" / "os.img"
    assert file_digest(str(replica)) == digests[1]
    assert [x.id for x in f.recovery_points(p)] == [pts[0].id, pts[1].id]
    assert not f.failover(p).changed
    f.start_vm(p, "target")  # no compute: disks only, still recorded
    assert f.cancel_failover(p).changed
    assert not f.cancel_failover(p).changed
    # the reverted replica is behind the source: the next cycle resynchronizes by block compare
    r = f.replicate(p)
    assert "resynchronized" in r.message and r.bytes_sent < 2 * MiB
    assert file_digest(str(replica)) == file_digest(str(disk))
    # tampering with the replica is noticed by health, and resynchronize repairs it
    fd = os.open(replica, os.O_RDWR)
    os.pwrite(fd, b"tamper", 4096)
    os.close(fd)
    h = f.replication_health(p)
    assert h.resync_required and h.health == Health.Critical
    r = f.resynchronize(p)
    assert r.changed and r.bytes_sent < 3 * BLOCK
    assert not f.resynchronize(p).changed
    assert file_digest(str(replica)) == file_digest(str(disk))
    assert f.suspend(p).changed and not f.suspend(p).changed
    with pytest.raises(InvalidStateError):
        f.replicate(p)
    assert f.resume(p).changed and not f.resume(p).changed
    f.close()


def test_offline_and_existing_replica_initial(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 * MiB)
    a, b = local_host("a", "ny", tmp_path / "ra"), local_host("b", "chi", tmp_path / "rb")
    f = fabric(tmp_path / "state")
    pol = ReplicationPolicy(name="off", initial_replication=OfflineInitial(
        method="offline", export_path=str(tmp_path / "export"), import_path=str(tmp_path / "import")))
    p = placement(a, b, disk, policy=pol)
    f.enable_replication(p)
    r = f.start_initial_replication(p)
    assert r.state == S.InitialReplicationInProgress and "import" in r.message
    assert not f.start_initial_replication(p).changed  # still waiting for the media
    shutil.copytree(tmp_path / "export", tmp_path / "import")
    scribble(disk)  # the VM kept running while the media travelled
    r = f.start_initial_replication(p)
    assert r.state == S.Replicating
    f.replicate(p)
    replica = tmp_path / "rb" / "web-01" / "replica" / "os.img"
    assert file_digest(str(replica)) == file_digest(str(disk))

    # from an existing replica: only differing blocks travel
    disk2 = tmp_path / "disk2.img"
    make_disk(disk2, 8 * MiB)
    p2 = placement(a, b, disk2, policy=ReplicationPolicy(name="e", initial_replication=ExistingReplicaInitial(method="existing_replica")))
    p2 = p2.model_copy(update={"vm": "db-01"})
    seeded = tmp_path / "rb" / "db-01" / "replica" / "os.img"
    seeded.parent.mkdir(parents=True)
    shutil.copy(disk2, seeded)
    scribble(disk2, 3)
    f.enable_replication(p2)
    r = f.start_initial_replication(p2)
    assert r.state == S.Replicating and r.bytes_sent < 4 * (BLOCK + 100)
    assert file_digest(str(seeded)) == file_digest(str(disk2))
    f.close()


def test_freeze_runs_only_while_the_vm_runs_and_its_failure_names_the_source(tmp_path: Path) -> None:
    """A freeze hook is for a running VM: once siterecovery stopped the VM (its pid file is gone) the hook
    is skipped, so protecting or finally replicating a VM that is off works; while it runs, a failing hook
    fails the cycle and the error names the source host, where the hook ran (not the replica's)."""
    import sys

    from siterecovery.errors import ExecutionError
    from siterecovery.model import Compute

    disk = tmp_path / "disk.img"
    make_disk(disk, 4 * MiB)
    a, b = local_host("ny-h1", "ny", tmp_path / "ra"), local_host("chi-h1", "chi", tmp_path / "rb")
    failing = (sys.executable, "-c", "import sys; sys.exit('cannot freeze: no such VM')")
    compute = Compute(backend="process", command=(sys.executable, "-c", "import time; time.sleep(600)"),
                      freeze=failing, thaw=(sys.executable, "-c", "pass"))
    f = fabric(tmp_path / "state")
    p = placement(a, b, disk, compute=compute)
    try:
        f.enable_replication(p)
        assert f.start_vm(p, side="source").changed
        with pytest.raises(ExecutionError) as ei:
            f.start_initial_replication(p)
        assert ei.value.host == "ny-h1" and "cannot freeze" in ei.value.message
        assert f.stop_vm(p, side="source").changed
        assert f.start_initial_replication(p).state == S.Replicating  # off: nothing to freeze
        f.replicate(p)
    finally:
        f.stop_vm(p, side="source")
        f.close()


def test_qemu_vm_starts_pauses_continues_and_stops(tmp_path: Path) -> None:
    """The qemu backend through the fabric (no guest kernel: the firmware runs): start, status, pause,
    continue, stop (ACPI power-off unanswered by the firmware within the grace, then kill), idempotently."""
    from siterecovery.model import Compute

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not installed (scripts/setup-system.sh installs qemu-system-x86)")
    disk = tmp_path / "disk.img"
    make_disk(disk, 4 * MiB)
    a, b = local_host("ny-h1", "ny", tmp_path / "ra"), local_host("chi-h1", "chi", tmp_path / "rb")
    f = fabric(tmp_path / "state", stop_grace=1)
    p = placement(a, b, disk, compute=Compute(backend="qemu", accel="tcg"))
    try:
        f.enable_replication(p)
        assert f.start_vm(p, side="source").changed
        assert not f.start_vm(p, side="source").changed
        assert f.vm_control(p, "status")["status"] == "running"
        assert f.vm_control(p, "pause")["status"] == "paused"
        assert f.vm_control(p, "cont")["status"] == "running"
        assert f.stop_vm(p, side="source").changed
        assert f.vm_control(p, "status") == {"running": False, "status": "off", "pid": None}
        assert not f.stop_vm(p, side="source").changed
    finally:
        try:
            f.stop_vm(p, side="source")
        finally:  # whatever failed (even the QMP client's import), no QEMU outlives the test
            pidfile = Path(f._run_dir(p.source, p.vm)) / "vm.pid"
            if pidfile.exists() and alive(str(pidfile)):
                os.kill(int(pidfile.read_text()), 9)
            f.close()
