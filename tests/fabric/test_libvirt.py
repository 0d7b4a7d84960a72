"""The linux fabric's libvirt backend (replica/virt.py, libvirt-python).

Lifecycle calls against libvirt's own test driver (a real libvirt driver without a daemon; given a
node file, every connection starts from that file's estate, where the domain "test" runs), and the tiny test
guest as a libvirt domain under two private libvirtds (virtrig.py, one per site): start, pause and
resume, point-in-time views through the QEMU monitor passthrough with every point a clean prefix of what
the guest acknowledged on both disks, a drill whose replica boots and checks its own records, and a stop
whose ACPI shutdown the guest ignores, so the deadline destroys it.
"""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from estate import fabric, local_host, placement
from guest import acks, kit, records, wait_for
from virtrig import guest_xml, libvirtd, need_daemon, need_libvirt

from siterecovery.errors import ExecutionError, NotFoundError
from siterecovery.fabric.base import Placement
from siterecovery.mapping import DiskPlacement
from siterecovery.model import Compute, ReplicationPolicy
from siterecovery.replica import virt
from siterecovery.testing.disks import make_disk

MiB = 1 << 20
BOOT = 420  # seconds: TCG on a loaded 2-core machine boots the Debian kernel in ~20-60 s
# test:///default would share one estate among this process's connections for as long as any of them
# lives (an exception kept by a test keeps one): a node file gives every connection a fresh estate.
NODE = """<node><domain type='test'><name>test</name><memory>131072</memory><vcpu>1</vcpu><os><type>hvm</type></os>
<devices><disk type='file' device='disk'><source file='/guest/diskimage1'/><target dev='vda' bus='virtio'/></disk>
<interface type='network'><source network='default'/></interface></devices></domain></node>"""


@pytest.fixture
def TEST(tmp_path: Path) -> str:  # noqa: N802 - a constant to the tests
    need_libvirt()
    (tmp_path / "node.xml").write_text(NODE)
    return f"test://{tmp_path / 'node.xml'}"


# ---- libvirt's test driver: no daemon, no QEMU ------------------------------------------------------

def test_lifecycle_calls_against_libvirts_test_driver(TEST: str) -> None:  # noqa: N803
    assert virt.status(TEST, "no-such-domain") == {"running": False, "status": "absent", "active": False}
    st = virt.status(TEST, "test")
    assert st["status"] == "running" and st["active"]
    assert virt.start(TEST, "test") == {"started": False, "status": "running"}  # already running: a no-op
    assert virt.control(TEST, "test", "pause")["status"] == "paused"
    assert virt.control(TEST, "test", "cont")["status"] == "running"  # (a fresh estate: already running, a no-op)
    # The test driver honours the ACPI shutdown at once: no destroy needed.
    assert virt.stop(TEST, "test", 5) == {"stopped": True, "how": "shutdown"}
    assert virt.stop(TEST, "test", 0) == {"stopped": True, "how": "destroy"}  # no grace (a fresh estate): destroyed
    assert virt.stop(TEST, "no-such-domain", 5)["stopped"] is False
    with pytest.raises(virt.LibvirtError, match="no domain no-such-domain") as e:
        virt.start(TEST, "no-such-domain")
    assert e.value.code == "NoDomain"
    # A test copy: transient, a new name, on the given disks (as many as the domain has, or refused).
    with pytest.raises(virt.LibvirtError, match="has 1 disks, the VM 2"):
        virt.start(TEST, "test-test", copy_of="test", disks=["/x.img", "/y.img"], network="isolated")
    assert virt.start(TEST, "test-test", copy_of="test", disks=["/x.img"], network="isolated")["started"]
    with pytest.raises(virt.LibvirtError, match="no domain nope"):
        virt.start(TEST, "nope-test", copy_of="nope")


def test_every_libvirt_call_has_a_deadline() -> None:
    """A libvirt call that never returns (a wedged libvirtd) fails with LibvirtTimeout instead of hanging
    the agent; libvirt's own errors keep their message."""
    gate = threading.Event()
    with pytest.raises(virt.LibvirtError, match="did not answer wedge within 0 s") as e:
        virt._call("wedge", gate.wait, timeout=0.2)
    assert e.value.code == "LibvirtTimeout"
    gate.set()
    assert virt._call("fine", lambda: 7) == 7


def test_a_test_copy_is_the_definition_on_the_test_disks_and_network() -> None:
    xml = ("<domain type='qemu'><name>web</name><uuid>0f1e</uuid><devices>"
           "<disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='/dev/vg/web'/>"
           "<backingStore type='file'><source file='/base.qcow2'/></backingStore><target dev='vda'/></disk>"
           "<disk type='file' device='cdrom'><source file='/iso'/><target dev='hdc'/></disk>"
           "<interface type='network'><source network='prod'/></interface>"
           "<interface type='bridge'><source bridge='br0'/></interface></devices></domain>")
    t = ET.fromstring(virt.test_copy_xml(xml, "web-test", ["/t/vda.img"], "isolated"))
    assert t.findtext("name") == "web-test" and t.find("uuid") is None
    disk = t.find("devices/disk[@device='disk']")
    assert disk is not None and disk.get("type") == "file"
    assert disk.find("source").attrib == {"file": "/t/vda.img"}  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "raw"  # type: ignore[union-attr]  (test copies are raw)
    assert disk.find("backingStore") is None
    assert t.find("devices/disk[@device='cdrom']/source").get("file") == "/iso"  # type: ignore[union-attr]
    nets = [(i.get("type"), i.find("source").attrib) for i in t.iter("interface")]  # type: ignore[union-attr]
    assert nets == [("network", {"network": "isolated"}), ("bridge", {"bridge": "isolated"})]
    # No test network named: the NICs are unplugged, never left on production.
    t = ET.fromstring(virt.test_copy_xml(xml, "web-test", ["/t/vda.img"], ""))
    assert all(i.find("source") is None for i in t.iter("interface"))


def test_the_fabric_drives_libvirt_domains_and_never_reads_one_live(tmp_path: Path, TEST: str) -> None:  # noqa: N803
    """Through the fabric: start and stop at the recovery site (the test driver's running domain), a
    missing domain is NotFound, and neither a running domain that is not QEMU (it cannot be viewed) nor
    a missing one is protected by reading its disks live over time: both fail at the source."""
    disk = tmp_path / "disk.img"
    make_disk(disk, 4 * MiB)
    a, b = local_host("a", "ny", tmp_path / "ra"), local_host("b", "chi", tmp_path / "rb")
    f = fabric(tmp_path / "state", libvirt_uri=TEST, stop_grace=0.3)
    p = placement(a, b, disk, compute=Compute(backend="libvirt", domain="test"), test_network="default")
    try:
        f.enable_replication(p)
        r = f.start_vm(p, "target")
        assert not r.changed and r.message == "already running"
        assert f.stop_vm(p, "target").changed
        assert f.vm_control(p, "status")["status"] == "running"
        with pytest.raises(ExecutionError) as e:
            f.start_initial_replication(p)
        assert e.value.host == "a" and e.value.error_id == "LibvirtFailed", e.value
        bad = placement(a, b, disk, compute=Compute(backend="libvirt", domain="no-such-domain"))
        bad = bad.model_copy(update={"vm": "other"})
        f.enable_replication(bad)
        with pytest.raises(NotFoundError, match="libvirt has no domain no-such-domain"):
            f.start_vm(bad, "target")
        # A domain missing at the source is a misnamed VM, not one that is off: its disks are not read.
        with pytest.raises(NotFoundError, match="libvirt at a has no domain no-such-domain") as e:
            f.start_initial_replication(bad)
        assert e.value.host == "a"
    finally:
        f.close()


# ---- the test guest under a real libvirtd --------------------------------------------------------

def check_point(reps: list[Path], acked_before: int) -> int:
    na, nb = records(reps[0], "vda"), records(reps[1], "vdb")
    assert nb <= na <= nb + 1, f"the disks come from different moments: vda {na}, vdb {nb}"
    assert na >= acked_before, f"the point lost acknowledged writes: {na} records, {acked_before} acknowledged"
    return na


@pytest.mark.timeout(1200)  # two boots under TCG
def test_a_libvirt_domain_protected_drilled_and_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_daemon()
    k = kit()
    import libvirt

    from siterecovery.fabric.base import ReplicationState as S
    from siterecovery.replica import engine

    sends: list[tuple[str, bool]] = []
    real_send = engine.send

    def spy(disk: str, state_dir: str, out: Any, **kw: Any) -> dict[str, Any]:
        sends.append((kw.get("mode", "delta"), bool((kw.get("nbd") or {}).get("bitmap"))))
        return real_send(disk, state_dir, out, **kw)

    monkeypatch.setattr(engine, "send", spy)

    a = local_host("ny-h1", "ny", tmp_path / "ra")
    b = local_host("chi-h1", "chi", tmp_path / "rb")
    disks = [tmp_path / "vda.img", tmp_path / "vdb.img"]
    for d in disks:
        with open(d, "wb") as fh:
            fh.truncate(16 * MiB)
    p = Placement(
        vm="guest", pairing="ny-chi", source=a, target=b,
        policy=ReplicationPolicy(name="p", copy_frequency_seconds=30, recovery_history_hours=4),
        disks=tuple(DiskPlacement(disk=n, source_path=str(d), target_location=None, classification=None)
                    for n, d in zip(("vda", "vdb"), disks, strict=True)),
        compute=Compute(backend="libvirt", domain="guest"), memory_mb=192)
    serial, check_serial = tmp_path / "ny.serial", tmp_path / "chi.serial"
    with libvirtd(tmp_path / "lv-ny") as uri_a, libvirtd(tmp_path / "lv-chi") as uri_b:
        f = fabric(tmp_path / "state", stop_grace=1.5, libvirt_uri={"ny-h1": uri_a, "chi-h1": uri_b})
        reps = [Path(f._replica_image(p, d, None)) for d in ("vda", "vdb")]
        # Each site defines the domain on its own disks; at the recovery site the guest checks its records.
        libvirt.open(uri_a).defineXML(guest_xml("guest", k, [(d, "raw") for d in disks], serial, "write"))
        libvirt.open(uri_b).defineXML(guest_xml("guest", k, [(r, "raw") for r in reps], check_serial, "check"))
        try:
            f.enable_replication(p)
            assert f.start_vm(p, side="source").changed
            assert not f.start_vm(p, side="source").changed
            wait_for("the guest's first records", lambda: acks(serial) >= 3, BOOT)

            # pause and resume (libvirt suspend / resume): a paused guest acknowledges nothing
            assert f.vm_control(p, "pause")["status"] == "paused"
            n = acks(serial)
            time.sleep(1.5)
            assert acks(serial) == n
            assert f.vm_control(p, "cont")["status"] == "running"
            wait_for("the guest to write on", lambda: acks(serial) > n, 120)

            # The domain's format is checked against the topology's before any view is taken.
            bad = p.model_copy(update={"vm": "guest-fmt", "compute": Compute(backend="libvirt", domain="guest",
                                                                             formats={"vda": "qcow2"})})
            f.enable_replication(bad)
            with pytest.raises(ExecutionError, match="opened .*vda.img as raw, the topology says qcow2") as e:
                f.start_initial_replication(bad)
            assert e.value.error_id == "FormatMismatch" and e.value.host == "ny-h1"

            # Protected cycles: each point is a view of both disks at one instant, read while the guest runs.
            before = acks(serial)
            f.start_initial_replication(p)
            check_point(reps, before)
            pauses = []
            for _ in range(3):
                time.sleep(0.5)
                before = acks(serial)
                r = f.replicate(p)
                assert r.details["consistency"] == "crash"
                check_point(reps, before)
                with f._vm(p) as box:
                    rec = box[0]
                    assert rec is not None
                    assert rec.view_seconds is not None  # a view was taken (the guest's pause for it)
                    pauses.append(rec.view_seconds)
                    assert all(c.get("since") for c in rec.cbt.values()), rec.cbt  # deltas read the bitmap
            print(f"\nthe guest's pause per view through libvirt's monitor passthrough: {pauses} s")
            assert f.vm_control(p, "status")["status"] == "running"
            with f._vm(p) as box:
                assert box[0] is not None
                srcs = f._source_status(box[0], p, f._disk_status(box[0], p))
            assert [s["how"] for s in srcs] == ["dirty bitmap"] * 2, srcs

            # The drill: a transient copy of the recovery site's domain boots the test copy of the point.
            assert f.test_failover(p).changed
            wait_for("the test copy's check", lambda: b"CHECK done" in (check_serial.read_bytes()
                                                                        if check_serial.exists() else b""), BOOT)
            out = check_serial.read_bytes()
            assert b"CHECK vda ok" in out and b"CHECK vdb ok" in out, out[-400:]
            assert f.cleanup_test_failover(p).changed
            assert virt.status(uri_b, "guest-test")["status"] == "absent"  # transient: nothing left behind

            # Stop: the guest has no ACPI handler, so the shutdown deadline passes and the domain is destroyed.
            assert f.stop_vm(p, side="source").changed
            assert virt.status(uri_a, "guest")["status"] == "shut off"
            log = (tmp_path / "lv-ny" / "log" / "qemu" / "guest.log").read_text()
            assert "reason=destroyed" in log.splitlines()[-1], log[-300:]
            assert not f.stop_vm(p, side="source").changed
            # Off: the next cycle reads the still disks and holds every record the guest acknowledged.
            final = acks(serial)
            f.replicate(p)
            assert check_point(reps, final) >= final

            # Planned failover: the recovery site's domain starts paused on the replica, gets a dirty bitmap
            # on each disk before its first instruction, then runs; reverse replication then reads only
            # the blocks it wrote since (a delta through that bitmap), no block compare, no full read.
            assert f.prepare_planned_failover(p).state == S.PreparedForFailover
            assert f.failover(p).state == S.FailedOverWaitingCompletion
            assert f.start_vm(p, side="target").changed
            with f._vm(p) as box:
                assert box[0] is not None
                started = dict(box[0].cbt)
            assert sorted(started) == ["vda", "vdb"] and all(c["bitmap"].startswith("sr-start-")
                                                             for c in started.values()), started
            assert virt.status(uri_b, "guest")["status"] == "running"
            assert f.commit_failover(p).state == S.FailedOver
            sends.clear()
            rev = f.reverse_replication(p)
            assert sends == [("delta", True), ("delta", True)], (sends, rev.message)
        finally:
            f.close()
