"""The simulator's documented-syntax binder: the checked-in table matches Microsoft's syntax sections
(shared/reference/hyperv-cmdlet-syntax.md, when it is there), the binder resolves calls like PowerShell,
and every script the driver can emit, over every operation and option, binds with nothing refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from hvhelpers import make_host, placement

from siterecovery.fabric.base import PointChoice
from siterecovery.fabric.hyperv import HyperVFabric
from siterecovery.model import Host
from siterecovery.model.protection import ExistingReplicaInitial, NetworkInitial, OfflineInitial
from siterecovery.model.topology import ReplicaServer
from siterecovery.testing.hyperv_sim import HyperVSimulator
from siterecovery.testing.hyperv_syntax import BindError, bind, load_table, parse_syntax, render_table

ROOT = Path(__file__).resolve().parents[2]


def _reference() -> Path | None:
    for base in (ROOT.parent / "shared", ROOT.parent.parent / "shared", Path("/work/shared")):
        f = base / "reference" / "hyperv-cmdlet-syntax.md"
        if f.is_file():
            return f
    return None


def test_checked_in_table_matches_the_reference() -> None:
    ref = _reference()
    if ref is None:
        pytest.skip("shared/reference/hyperv-cmdlet-syntax.md is not beside this checkout")
    assert render_table(parse_syntax(ref.read_text(encoding="utf-8"))) == \
        (ROOT / "src/siterecovery/testing/hyperv_syntax.json").read_text(encoding="utf-8"), \
        "regenerate: python -m siterecovery.testing.hyperv_syntax <the md file>"


def test_binder_resolves_like_powershell() -> None:
    t = load_table()
    assert bind(t, "Start-VMFailover", [("VM", 1), ("AsTest", True), ("Confirm", False)], [], False).set_name == \
        "VMObject_Test"
    assert bind(t, "Start-VMFailover", [("VMRecoverySnapshot", 1)], [], False).set_name == "VMSnapshot"
    assert bind(t, "Enable-VMReplication", [("VM", 1), ("AsReplica", True)], [], False).set_name == \
        "VMObject_AsReplica"
    cases = [
        # item 9 of issue 16: -ReplicationRelationshipType exists only beside -VMName
        ("Remove-VMReplication", [("VM", 1), ("ReplicationRelationshipType", "Extended")], "AmbiguousParameterSet"),
        ("Start-VMFailover", [("VM", 1), ("Prepare", True), ("AsTest", True)], "AmbiguousParameterSet"),
        ("Start-VMFailover", [("VM", 1), ("VMRecoverySnapshot", 2)], "AmbiguousParameterSet"),
        ("Enable-VMReplication", [("VM", 1), ("ReplicaServerName", "b")], "MissingMandatoryParameter"),
        ("Stop-VM", [("VM", 1), ("Bogus", True)], "NamedParameterNotFound"),
        ("Enable-VMReplication", [("VM", 1), ("AsReplica", True), ("ReplicaServerName", "b")], "AmbiguousParameterSet"),
    ]
    for cmdlet, named, want in cases:
        with pytest.raises(BindError) as ei:
            bind(t, cmdlet, named, [], False)
        assert ei.value.error_id == want, (cmdlet, named)
    with pytest.raises(BindError) as ei:
        bind(t, "Get-VMReplicationServer", [], ["a", "b", "c"], False)
    assert ei.value.error_id == "PositionalParameterNotFound"
    with pytest.raises(BindError) as ei:
        bind(t, "Start-VM", [], [], True, lambda ty: False)
    assert ei.value.error_id == "InputObjectNotBound"


def test_every_driver_script_binds(sim: HyperVSimulator, driver: HyperVFabric, hosts: dict[str, Host],
                                   client_key: tuple[object, Path]) -> None:
    """Every operation with every option the driver has, on the simulator: PowerShell refuses nothing."""
    d = driver
    sim.add_host("hv-new", replica_server=False)
    sim.add_host("hv-cert", replica_server=False)
    new = make_host(sim, "hv-new", client_key[1])
    cert = make_host(sim, "hv-cert", client_key[1], replica_server=ReplicaServer(
        port=443, authentication="certificate", certificate_thumbprint="AB12", storage_location="D:\\R"))
    d.configure_replica_server(new, allowed_primaries=[hosts["hv-a"]])
    d.configure_replica_server(new)  # any server
    d.configure_replica_server(cert, allowed_primaries=[hosts["hv-a"]])
    runs = {
        "net": {"app_consistent_frequency_hours": 1},
        "sched": {"initial_replication": NetworkInitial(start_at=sim.now().replace(microsecond=0).__add__(
            __import__("datetime").timedelta(hours=1)))},
        "off": {"initial_replication": OfflineInitial(method="offline", export_path="E:\\x", import_path="E:\\x")},
        "exist": {"initial_replication": ExistingReplicaInitial(method="existing_replica")},
    }
    ps = {}
    for vm, pol in runs.items():
        v = sim.add_vm("hv-a", vm, nics=(("eth0", "LAN"), ("eth1", "LAN")))
        if vm == "exist":
            sim.add_vm("hv-b", vm, running=False, vm_id=v.id)
        p = placement(hosts, vm, **pol)
        d.enable_replication(p)
        d.start_initial_replication(p)
        ps[vm] = p
    p = ps["net"]
    d.enable_replication(placement(hosts, "net", copy_frequency_seconds=30))  # changed policy: Set-VMReplication
    sim.replicate("hv-a", "net", cycles=3, app_consistent=True)
    d.replicate(p)
    d.replication_health(p)
    d.recovery_points(p)
    d.suspend(p)
    d.resume(p)
    sim.require_resync("hv-a", "net")
    d.resynchronize(p)
    pts = d.recovery_points(p)
    d.test_failover(p, PointChoice(kind="point_in_time", at=pts[0].created_at), network="TEST-ISO")
    d.start_vm(p, test=True)
    d.cleanup_test_failover(p)
    d.test_failover(p)
    d.cleanup_test_failover(p)
    d.prepare_planned_failover(p)
    d.cancel_failover(p)
    d.prepare_planned_failover(p)
    d.failover(p)
    d.reverse_replication(p)
    d.apply_network(p.model_copy(update={"nics": ()}))
    d.start_vm(p)
    d.stop_vm(p, side="target")
    q = ps["exist"]
    sim.replicate("hv-a", "exist", cycles=2)
    d.failover(q, PointChoice(kind="latest_processed"))
    d.cancel_failover(q)
    d.failover(q)
    d.start_vm(q)
    d.commit_failover(q)
    d.reverse_replication(q)  # unplanned: -AsReplica, -Reverse, -UseBackup
    e = ps["off"]
    sim.replicate("hv-a", "off", cycles=1)
    d.enable_extended_replication(e, hosts["hv-c"], 300)
    d.remove_extended_replication(e)
    d.disable_replication(e, delete_replica=True)
    d.disable_replication(ps["sched"])
    assert sim.refused == []
    assert len({ln for _, ln in sim.scripts}) > 40  # the tour really ran many scripts
