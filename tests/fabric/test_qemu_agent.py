"""App-consistent points through the QEMU guest agent: a real guest under QEMU (TCG) running Debian's
qemu-ga, appending fsync'ed lines to a file on ext4 (srmode=fs, tests/fabric/guest.py).

The oracle is the filesystem itself: ext4 clears its `needs_recovery` flag only when it is frozen (or
unmounted), so a point captured while the guest was frozen has a clean filesystem with nothing to replay,
while any point of the live guest needs its journal replayed. The point must also hold every line the
guest acknowledged before the cycle. Without an agent that answers, the cycle still takes its point,
labelled crash-consistent with the reason, and never app-consistent. The quiesce step's other paths
(a failing quiesce command, a VM read live) are checked with process VMs, without QEMU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from estate import APPEND, SLEEPER, fabric, local_host, placement
from guest import acks, features, fs_state, kit, make_fs, wait_for

from siterecovery.fabric.base import Placement, PointChoice
from siterecovery.mapping import DiskPlacement
from siterecovery.model import Compute, ReplicationPolicy
from siterecovery.replica import qemu, qga

MiB = 1 << 20
BOOT = 420  # seconds: TCG on a loaded 2-core machine boots the Debian kernel in ~20-60 s


def fs_vm(tmp_path: Path, agent_in_guest: bool = True, timeout: float = 5) -> Placement:
    k = kit()
    if "qga" not in features(k):
        pytest.skip("the test guest has no qemu-ga (scripts/setup-system.sh installs qemu-guest-agent)")
    a = local_host("ny-h1", "ny", tmp_path / "ra")
    b = local_host("chi-h1", "chi", tmp_path / "rb")
    disk = tmp_path / "vda.img"
    make_fs(disk, 48 * MiB)
    compute = Compute(backend="qemu", kernel=str(k / "vmlinuz"), initrd=str(k / "initramfs.gz"), accel="tcg",
                      append="console=ttyS0 quiet srmode=fs" + (" srqga=1" if agent_in_guest else ""),
                      guest_agent=True, guest_agent_timeout_seconds=timeout)
    return Placement(
        vm="guest", pairing="ny-chi", source=a, target=b,
        policy=ReplicationPolicy(name="p", copy_frequency_seconds=30, recovery_history_hours=4,
                                 app_consistent_frequency_hours=1),
        disks=(DiskPlacement(disk="vda", source_path=str(disk), target_location=None, classification=None),),
        compute=compute, memory_mb=192)


def agent_answers(sock: str) -> bool:
    try:
        qga.call(sock, "guest-ping", timeout=3)
        return True
    except qga.GuestAgentError:
        return False


def spy_on_capture(f: Any, sock: str) -> list[str]:
    """The guest's freeze state as each capture starts (asked of the agent directly, not through the fabric)."""
    seen: list[str] = []
    capture = f._capture

    def spy(vm: Any, p: Placement, point: dict[str, Any]) -> Any:
        try:
            seen.append(qga.call(sock, "guest-fsfreeze-status", timeout=10))
        except qga.GuestAgentError as exc:
            seen.append(f"no answer: {exc.code}")
        return capture(vm, p, point)

    f._capture = spy
    return seen


def app_cycles(tmp_path: Path, cycles: int) -> None:
    p = fs_vm(tmp_path)
    f = fabric(tmp_path / "state", stop_grace=0)
    run = Path(f._run_dir(p.source, p.vm))
    serial, sock = run / "vm.serial", str(run / "vm.qga")
    rep = Path(f._replica_image(p, "vda", None))
    try:
        f.enable_replication(p)
        assert f.start_vm(p, side="source").changed
        wait_for("the guest's first records", lambda: acks(serial) >= 3, BOOT)
        wait_for("the guest agent", lambda: agent_answers(sock), BOOT)
        f.start_initial_replication(p)
        seen = spy_on_capture(f, sock)
        for i in range(cycles):
            before = acks(serial)
            r = f.replicate(p, consistency="app")
            assert r.details["consistency"] == "app" and r.point is not None and r.point.consistency == "app", r.message
            assert "app-consistent point (guest agent froze 1 filesystem(s), frozen " in r.message, r.message
            assert seen[-1] == "frozen", seen  # frozen while the view was taken...
            assert qga.call(sock, "guest-fsfreeze-status") == "thawed"  # ...and thawed once it was
            st = fs_state(rep)
            assert not st["needs_recovery"] and st["clean"], st  # a frozen filesystem: nothing to replay
            assert st["records"] >= before, f"the point lost acknowledged lines: {st['records']} < {before}"
            if i == 0:
                # The same oracle on a crash-consistent point of the same guest: its journal needs replay.
                r = f.replicate(p, consistency="crash")
                assert r.details["consistency"] == "crash" and seen[-1] == "thawed"
                assert fs_state(rep)["needs_recovery"]
        wait_for("the guest to write on after the freezes", lambda: acks(serial) > before + 2, 120)
        chosen = PointChoice(kind="latest_app_consistent").choose(f.recovery_points(p))
        assert chosen is not None and chosen.consistency == "app"

        # A group cycle pauses its QEMU members after the quiesce step: they must run on (cont) before
        # their agent is asked to thaw, since a paused guest cannot answer. The guest with a process VM
        # held by its freeze hook: both parts app-consistent, the guest frozen in the point, thawed after.
        side_disk = tmp_path / "side.img"
        side_disk.write_bytes(b"s" * (1 << 16))
        side = placement(p.source, p.target, side_disk, tmp_path / "events").model_copy(update={"vm": "side"})
        f.enable_replication(side)
        f.start_initial_replication(side)
        del f._capture  # no spy: the group captures while the guest is paused, when its agent cannot answer
        before = acks(serial)
        out = f.replicate_group([p, side], "pair", "app")
        assert [r.details["consistency"] for r in out] == ["app", "app"], [r.message for r in out]
        assert qga.call(sock, "guest-fsfreeze-status") == "thawed"
        st = fs_state(rep)  # frozen in the point: nothing to replay
        assert not st["needs_recovery"] and st["clean"] and st["records"] >= before, st
        wait_for("the guest to write on after the group cycle", lambda: acks(serial) > before + 2, 120)

        # The agent killed in the guest: the port is there, nothing answers. The cycle still takes its
        # point, crash-consistent, and says why; the guest was never frozen and writes on.
        try:
            qga.call(sock, "guest-exec", {"path": "/bin/sh", "arg": ["-c", "kill -9 $(cat /run/qemu-ga.pid)"]},
                     timeout=10)
        except qga.GuestAgentError:
            pass  # the agent may die before it answers
        wait_for("the guest agent to be gone", lambda: not agent_answers(sock), 60)
        before = acks(serial)
        r = f.replicate(p, consistency="app")
        assert r.details["consistency"] == "crash" and r.point is not None and r.point.consistency == "crash"
        assert "crash-consistent point, not app-consistent: the guest agent did not freeze" in r.message, r.message
        assert "no answer in time" in r.message and "thaw failed" not in r.message, r.message
        assert fs_state(rep)["needs_recovery"]  # really not frozen: the label tells the truth
        wait_for("the guest to write on", lambda: acks(serial) > before + 2, 120)
    finally:
        qemu.stop(str(run), "vm", 0)
        f.close()


@pytest.mark.timeout(900)
def test_app_points_freeze_the_guest_filesystem_and_a_dead_agent_gives_crash_points(tmp_path: Path) -> None:
    app_cycles(tmp_path, cycles=1)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_app_points_freeze_the_guest_filesystem_many_cycles(tmp_path: Path) -> None:
    app_cycles(tmp_path, cycles=12)


@pytest.mark.timeout(900)
def test_a_guest_without_an_agent_gives_crash_points_that_say_why(tmp_path: Path) -> None:
    """The VM declares the agent's port, but the guest never starts qemu-ga: no answer within the
    deadline, a crash-consistent point, and the guest is not left waiting on anything."""
    p = fs_vm(tmp_path, agent_in_guest=False, timeout=2)
    f = fabric(tmp_path / "state", stop_grace=0)
    run = Path(f._run_dir(p.source, p.vm))
    serial = run / "vm.serial"
    try:
        f.enable_replication(p)
        assert f.start_vm(p, side="source").changed
        wait_for("the guest's first records", lambda: acks(serial) >= 3, BOOT)
        f.start_initial_replication(p)
        t0 = time.monotonic()
        r = f.replicate(p, consistency="app")
        assert r.point is not None and r.point.consistency == "crash" and r.details["consistency"] == "crash"
        assert "not app-consistent: the guest agent did not freeze the guest's filesystems" in r.message, r.message
        assert "thaw failed" not in r.message  # the freeze never reached a guest: nothing to thaw, no false alarm
        assert time.monotonic() - t0 < 120  # the agent's deadline bounded the wait, not a hang
        assert not [x for x in f.recovery_points(p) if x.consistency == "app"]
    finally:
        qemu.stop(str(run), "vm", 0)
        f.close()


def test_the_agent_port_is_on_the_qemu_command_line(tmp_path: Path) -> None:
    p = qemu.paths(str(tmp_path / "a,b"), "vm")
    argv = qemu.command_line({"accel": "tcg", "guest_agent": True, "disks": []}, p)
    assert f"socket,id=qga0,path={tmp_path}/a,,b/vm.qga,server=on,wait=off" in argv
    assert "virtserialport,bus=qga-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0" in argv
    assert not any("qga" in a for a in qemu.command_line({"accel": "tcg", "disks": []}, p))


# ---- the quiesce step without QEMU (process VMs) --------------------------------------------------------

def test_a_failing_quiesce_command_gives_a_crash_point_that_says_why(tmp_path: Path) -> None:
    a = local_host("ny-h1", "ny", tmp_path / "ra")
    b = local_host("chi-h1", "chi", tmp_path / "rb")
    disk = tmp_path / "os.img"
    disk.write_bytes(b"x" * (1 << 16))
    events = tmp_path / "events"
    p = placement(a, b, disk, events)
    p = p.model_copy(update={"quiesce": (sys.executable, "-c", "import sys; sys.exit('database busy')")})
    f = fabric(tmp_path / "state")
    try:
        f.enable_replication(p)
        f.start_initial_replication(p)
        r = f.replicate(p, consistency="app")
        assert r.point is not None and r.point.consistency == "crash"
        assert "not app-consistent: its quiesce command failed" in r.message and "database busy" in r.message
        # With the command working again the point is app-consistent (the freeze command holds the disks).
        p = p.model_copy(update={"quiesce": (sys.executable, "-c", APPEND, str(events), "quiesce")})
        r = f.replicate(p, consistency="app")
        assert r.point is not None and r.point.consistency == "app", r.message
        assert "quiesce" in events.read_text()
    finally:
        f.close()


def test_a_vm_read_live_never_gets_an_app_label(tmp_path: Path) -> None:
    a = local_host("ny-h1", "ny", tmp_path / "ra")
    b = local_host("chi-h1", "chi", tmp_path / "rb")
    disk = tmp_path / "os.img"
    disk.write_bytes(b"x" * (1 << 16))
    events = tmp_path / "events"
    p = placement(a, b, disk, events, compute=Compute(backend="process", command=tuple(SLEEPER), consistency="none"))
    f = fabric(tmp_path / "state")
    try:
        f.enable_replication(p)
        f.start_initial_replication(p)
        r = f.replicate(p, consistency="app")
        assert r.point is not None and r.point.consistency == "crash"
        assert "not app-consistent: its disks are read live over time" in r.message
    finally:
        f.close()


def test_a_group_point_is_app_consistent_only_if_every_member_was_quiesced(tmp_path: Path) -> None:
    a = local_host("ny-h1", "ny", tmp_path / "ra")
    b = local_host("chi-h1", "chi", tmp_path / "rb")
    events = tmp_path / "events"
    ps = []
    for name in ("db", "app"):
        disk = tmp_path / f"{name}.img"
        disk.write_bytes(name.encode() * (1 << 14))
        ps.append(placement(a, b, disk, events).model_copy(update={"vm": name}))
    f = fabric(tmp_path / "state")
    try:
        for p in ps:
            f.enable_replication(p)
            f.start_initial_replication(p)
        out = f.replicate_group(ps, "orders", "app")
        assert [r.point.consistency for r in out if r.point] == ["app", "app"]
        # One member's quiesce fails: the group point is still taken, every part crash-consistent.
        ps[0] = ps[0].model_copy(update={"quiesce": (sys.executable, "-c", "import sys; sys.exit('busy')")})
        out = f.replicate_group(ps, "orders", "app")
        assert [r.point.consistency for r in out if r.point] == ["crash", "crash"]
        assert [r.details["consistency"] for r in out] == ["crash", "crash"]
        assert any("its quiesce command failed" in r.message for r in out), [r.message for r in out]
    finally:
        f.close()


def test_an_agent_that_froze_no_filesystem_gives_a_crash_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """guest-fsfreeze-freeze answers 0 when the guest has no filesystem it can freeze (data on raw devices,
    or only filesystems without freeze support): nothing was quiesced, so the point is not app-consistent.
    The agent's answers are scripted here; the label's rule is the fabric's."""
    from siterecovery.fabric.linux import _VM

    a = local_host("ny-h1", "ny", tmp_path / "ra")
    b = local_host("chi-h1", "chi", tmp_path / "rb")
    p = placement(a, b, tmp_path / "os.img", compute=Compute(backend="qemu", kernel="/k", guest_agent=True))
    f = fabric(tmp_path / "state")
    calls: list[str] = []
    answers = {"guest-fsfreeze-freeze": 0, "guest-fsfreeze-thaw": 0}
    monkeypatch.setattr(f, "_capture_kind", lambda vm, p: "view")
    monkeypatch.setattr(f, "_agent", lambda p, execute, timeout: calls.append(execute) or answers[execute])
    vm = _VM(primary="ny-h1", replica="chi-h1")
    try:
        with f._quiesce(vm, p, "app") as q:
            pass
        assert q.consistency == "crash" and "froze no filesystem" in q.notes[-1], q.notes
        assert calls == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]  # thawed all the same
        answers["guest-fsfreeze-freeze"] = 2
        with f._quiesce(vm, p, "app") as q:
            pass
        assert q.consistency == "app" and "froze 2 filesystem(s)" in q.notes[-1], q.notes
    finally:
        f.close()
