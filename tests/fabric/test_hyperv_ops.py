"""Every Hyper-V driver operation against the simulator over SSH: effects, idempotence, and the three
failover sequences of the reference asserted line by line from the simulator's log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address

import pytest
from hvhelpers import VM, placement

from siterecovery.fabric import Fabric
from siterecovery.fabric.base import PointChoice, ReplicationState
from siterecovery.fabric.hyperv import HyperVFabric
from siterecovery.mapping import NICPlacement
from siterecovery.model import FailoverIP
from siterecovery.model.protection import NetworkInitial, OfflineInitial
from siterecovery.testing.hyperv_sim import HyperVSimulator

S = ReplicationState


def actions(sim: HyperVSimulator) -> list[tuple[str, str]]:
    return [(e.host, e.render()) for e in sim.log() if e.ok and e.render().split()[0] in _MUTATING]


_MUTATING = {"Stop-VM", "Start-VM", "Start-VMFailover", "Stop-VMFailover", "Complete-VMFailover", "Set-VMReplication",
             "Enable-VMReplication", "Start-VMInitialReplication", "Import-VMInitialReplication",
             "Suspend-VMReplication", "Resume-VMReplication", "Remove-VMReplication", "Remove-VM",
             "Set-VMNetworkAdapter", "Connect-VMNetworkAdapter", "Disconnect-VMNetworkAdapter",
             "Set-VMNetworkAdapterFailoverConfiguration", "Set-VMReplicationServer",
             "New-VMReplicationAuthorizationEntry"}


def protect(sim: HyperVSimulator, driver: HyperVFabric, hosts, vm: str = VM, cycles: int = 3, **policy):
    if not any(v.name == vm for v in sim.host("hv-a").vms):
        sim.add_vm("hv-a", vm)
    p = placement(hosts, vm, **policy)
    driver.enable_replication(p)
    driver.start_initial_replication(p)
    sim.replicate("hv-a", vm, cycles=cycles, app_consistent=True)
    sim.clear_log()
    return p


def test_driver_satisfies_protocol(driver: HyperVFabric) -> None:
    assert isinstance(driver, Fabric)


def test_configure_replica_server(sim, driver, hosts) -> None:
    h = sim.add_host("hv-new", replica_server=False)
    sim.add_host("hv-x")
    from hvhelpers import make_host
    new = make_host(sim, "hv-new", hosts["hv-a"].credential.key_file)  # type: ignore[union-attr]
    r = driver.configure_replica_server(new, allowed_primaries=[hosts["hv-a"]])
    assert r.changed
    assert h.server["ReplicationEnabled"] and not h.server["ReplicationAllowedFromAnyServer"]
    # Seed 003: the listener's firewall rule is built in but off; configuring the server enables it.
    assert h.firewall == {"Hyper-V Replica HTTP Listener (TCP-In)"}
    assert [e["AllowedPrimaryServer"] for e in h.entries] == ["hv-a"]
    assert driver.configure_replica_server(new, allowed_primaries=[hosts["hv-a"]]).changed is False
    # hv-a is authorized, hv-b is not: the replica server refuses it with the documented id.
    sim.add_vm("hv-b", "other")
    from siterecovery.errors import FabricError
    p = placement({**hosts, "hv-new": new}, "other", src="hv-b", dst="hv-new")
    with pytest.raises(FabricError) as ei:
        driver.enable_replication(p)
    assert ei.value.error_id == "VMReplication_AuthorizationEntryNotFound,Microsoft.HyperV.PowerShell.Commands.EnableVMReplication"
    sim.add_vm("hv-a", "third")
    p = placement({**hosts, "hv-new": new}, "third", src="hv-a", dst="hv-new")
    assert driver.enable_replication(p).state == S.ReadyForInitialReplication


def test_enable_and_initial_replication_network(sim, driver, hosts) -> None:
    sim.add_vm("hv-a", VM)
    p = placement(hosts, app_consistent_frequency_hours=1)
    r = driver.enable_replication(p)
    assert (r.changed, r.state) == (True, S.ReadyForInitialReplication)
    assert sim.vm("hv-b", VM).mode == "Replica" and sim.vm("hv-b", VM).state == "WaitingForInitialReplication"
    assert driver.enable_replication(p).changed is False
    r = driver.start_initial_replication(p)
    assert (r.changed, r.state) == (True, S.Replicating)
    assert driver.start_initial_replication(p).changed is False
    assert actions(sim) == [
        ("hv-a", "Enable-VMReplication -VM web-01 -ReplicaServerName hv-b -ReplicaServerPort 80 -AuthenticationType "
                 "Kerberos -ReplicationFrequencySec 300 -RecoveryHistory 4 -VSSSnapshotFrequencyHour 1 "
                 "-CompressionEnabled $true"),
        ("hv-a", "Start-VMInitialReplication -VM web-01")]


def test_initial_replication_scheduled(sim, driver, hosts) -> None:
    sim.add_vm("hv-a", VM)
    at = datetime.now(UTC) + timedelta(hours=2)
    p = placement(hosts, initial_replication=NetworkInitial(start_at=at))
    driver.enable_replication(p)
    r = driver.start_initial_replication(p)
    assert (r.changed, r.state) == (True, S.InitialReplicationInProgress)
    assert driver.start_initial_replication(p).changed is False
    sim.advance(3 * 3600)
    assert driver.replication_health(p).state == S.Replicating
    entry = [e for e in sim.log("hv-a") if e.cmdlet == "Start-VMInitialReplication"][0]
    assert dict(entry.args)["InitialReplicationStartTime"] == at.replace(microsecond=0)


def test_initial_replication_offline(sim, driver, hosts) -> None:
    sim.add_vm("hv-a", VM)
    p = placement(hosts, initial_replication=OfflineInitial(method="offline", export_path="E:\\export",
                                                             import_path="E:\\export"))
    driver.enable_replication(p)
    r = driver.start_initial_replication(p)
    assert (r.changed, r.state) == (True, S.Replicating)
    # Each VM imports its own export folder (the export path and the VM's name), not the bare import path.
    assert actions(sim)[-2:] == [("hv-a", "Start-VMInitialReplication -VM web-01 -DestinationPath E:\\export"),
                                 ("hv-b", "Import-VMInitialReplication -VM web-01 -Path E:\\export\\web-01")]
    assert driver.start_initial_replication(p).changed is False


def test_existing_replica(sim, driver, hosts) -> None:
    from siterecovery.model.protection import ExistingReplicaInitial
    vm = sim.add_vm("hv-a", VM)
    sim.add_vm("hv-b", VM, running=False, vm_id=vm.id)  # restored from a backup: same VM id
    p = placement(hosts, initial_replication=ExistingReplicaInitial(method="existing_replica"))
    driver.enable_replication(p)
    driver.start_initial_replication(p)
    # Seed 003, "do not copy the initial replication": the restored replica is the starting point (-UseBackup).
    assert [a for a in actions(sim)][:3] == [
        ("hv-b", "Enable-VMReplication -VM web-01 -AsReplica -AllowedPrimaryServer hv-a"),
        ("hv-a", "Enable-VMReplication -VM web-01 -ReplicaServerName hv-b -ReplicaServerPort 80 -AuthenticationType "
                 "Kerberos -ReplicationFrequencySec 300 -RecoveryHistory 4 -CompressionEnabled $true"),
        ("hv-a", "Start-VMInitialReplication -VM web-01 -UseBackup")]
    assert len(sim.host("hv-b").vms) == 1 and sim.vm("hv-b", VM).state == "Replicating"


def test_health_points_and_resync(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    h = driver.replication_health(p)
    assert (h.state, h.health.value, h.mode.value, h.replica_host) == (S.Replicating, "Normal", "Primary", "hv-b")
    assert h.successful_cycles == 4 and h.current_rpo_seconds is not None and h.current_rpo_seconds < 60
    pts = driver.recovery_points(p)
    assert len(pts) == 4 and pts[-1].consistency == "app"
    assert all(sim.vm("hv-b", VM).points[i].id == pts[i].id for i in range(4))
    assert sim.vm("hv-b", VM).points[0].name.startswith("web-01 - Standard Replica - (")
    assert driver.replicate(p).changed is False
    assert driver.resynchronize(p).changed is False
    sim.require_resync("hv-a", VM)
    h = driver.replication_health(p)
    assert h.resync_required and h.health.value == "Critical" and "Resynchronization is required" in h.details
    sim.hold_resync = True
    r = driver.resynchronize(p)
    assert (r.changed, r.state) == (True, S.Resynchronizing)
    assert driver.resynchronize(p).changed is False
    sim.finish_resync("hv-a", VM)
    assert driver.replication_health(p).state == S.Replicating
    assert ("hv-a", "Resume-VMReplication -VM web-01 -Resynchronize") in actions(sim)


def test_suspend_resume_disable(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    assert driver.suspend(p).state == S.Suspended
    assert driver.suspend(p).changed is False
    assert driver.resume(p).state == S.Replicating
    assert driver.resume(p).changed is False
    r = driver.disable_replication(p, delete_replica=True)
    assert r.changed and sim.vm("hv-a", VM).rel is None and not sim.host("hv-b").vms
    assert driver.disable_replication(p).changed is False
    assert actions(sim) == [("hv-a", "Suspend-VMReplication -VM web-01"), ("hv-a", "Resume-VMReplication -VM web-01"),
                            ("hv-a", "Remove-VMReplication -VM web-01"), ("hv-b", "Remove-VMReplication -VM web-01"),
                            ("hv-b", "Remove-VM -VM web-01 -Force")]


def test_test_failover_sequence(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    chosen = driver.recovery_points(p)[1]
    r = driver.test_failover(p, PointChoice(kind="point_in_time", at=chosen.created_at), network="TEST-ISO")
    assert r.changed and r.point == chosen and r.details["test_vm"] == "web-01 - Test"
    assert driver.test_failover(p).changed is False
    assert driver.start_vm(p, test=True).changed and driver.start_vm(p, test=True).changed is False
    assert sim.vm("hv-b", "web-01 - Test").nics[0].switch == "TEST-ISO"
    assert driver.replication_health(p).test_failover_active
    assert driver.cleanup_test_failover(p).changed
    assert driver.cleanup_test_failover(p).changed is False
    assert sim.vm("hv-b", VM).state == "Replicating" and len(sim.host("hv-b").vms) == 1
    snap = next(s for s in sim.vm("hv-b", VM).points if s.id == chosen.id).name
    assert actions(sim) == [
        ("hv-b", "Set-VMNetworkAdapter -TestReplicaSwitchName TEST-ISO -VMNetworkAdapter eth0"),  # piped in
        ("hv-b", f"Start-VMFailover -VMRecoverySnapshot {snap} -AsTest -Confirm:$false"),
        ("hv-b", "Start-VM -VM web-01 - Test"),
        ("hv-b", "Stop-VMFailover -VM web-01")]


def test_planned_failover_sequence(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    assert driver.prepare_planned_failover(p).state == S.PreparedForFailover
    assert driver.prepare_planned_failover(p).changed is False
    assert driver.failover(p).state == S.FailedOverWaitingCompletion
    assert driver.failover(p).changed is False
    r = driver.reverse_replication(p)
    assert (r.changed, r.state) == (True, S.Replicating)
    assert driver.reverse_replication(p).changed is False
    assert driver.start_vm(p).changed and driver.start_vm(p).changed is False
    # The reference's order, line by line: primary Stop-VM, Start-VMFailover -Prepare; replica
    # Start-VMFailover, Set-VMReplication -Reverse, Start-VM.
    assert actions(sim) == [
        ("hv-a", "Stop-VM -VM web-01 -Force"),
        ("hv-a", "Start-VMFailover -VM web-01 -Prepare -Confirm:$false"),
        ("hv-b", "Start-VMFailover -VM web-01 -Confirm:$false"),
        ("hv-b", "Set-VMReplication -VM web-01 -Reverse -ReplicaServerName hv-a"),
        ("hv-b", "Start-VM -VM web-01")]
    a, b = sim.vm("hv-a", VM), sim.vm("hv-b", VM)
    assert (b.mode, b.state, b.power) == ("Primary", "Replicating", "Running")
    assert (a.mode, a.state, a.power) == ("Replica", "Replicating", "Off")


def test_planned_failover_cancel(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    driver.prepare_planned_failover(p)
    assert driver.cancel_failover(p).changed
    assert driver.cancel_failover(p).changed is False
    assert sim.vm("hv-a", VM).state == "Replicating"
    assert actions(sim)[-1] == ("hv-a", "Stop-VMFailover -VM web-01")


def test_unplanned_failover_sequence_and_reverse(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    sim.set_down("hv-a", crash=True)
    pts = driver.recovery_points(p)
    r = driver.failover(p, PointChoice(kind="latest_app_consistent"))
    assert r.point == pts[-1] and r.state == S.FailedOverWaitingCompletion
    assert driver.start_vm(p).changed
    # a different point: cancel (Stop-VMFailover), then fail over again
    assert driver.cancel_failover(p).changed and sim.vm("hv-b", VM).state == "Replicating"
    r = driver.failover(p, PointChoice(kind="point_in_time", at=pts[1].created_at))
    assert r.point == pts[1]
    driver.start_vm(p)
    assert driver.commit_failover(p).state == S.FailedOver
    assert driver.commit_failover(p).changed is False
    assert [x.id for x in sim.vm("hv-b", VM).points] == [pts[1].id]
    names = {s.id: s.name for s in sim.vm("hv-b", VM).points}
    sim.set_down("hv-a", False)
    r = driver.reverse_replication(p)
    assert (r.changed, r.state) == (True, S.Replicating)
    assert driver.reverse_replication(p).changed is False
    got = actions(sim)
    assert got[-3:] == [
        ("hv-a", "Set-VMReplication -VM web-01 -AsReplica -AllowedPrimaryServer hv-b"),
        ("hv-b", "Set-VMReplication -VM web-01 -Reverse -ReplicaServerName hv-a"),
        ("hv-b", "Start-VMInitialReplication -VM web-01 -UseBackup")]
    assert got[-4] == ("hv-b", "Complete-VMFailover -VM web-01 -Confirm:$false")
    assert got[-5] == ("hv-b", "Start-VM -VM web-01")
    assert got[-6] == ("hv-b", f"Start-VMFailover -VMRecoverySnapshot {names[pts[1].id]} -Confirm:$false")
    assert sim.vm("hv-a", VM).mode == "Replica" and sim.vm("hv-a", VM).state == "Replicating"


def test_apply_network(sim, driver, hosts) -> None:
    p0 = protect(sim, driver, hosts)
    ip = FailoverIP(address=IPv4Address("10.2.0.15"), prefix_length=24, gateway=IPv4Address("10.2.0.1"),
                    dns=(IPv4Address("10.2.0.53"), IPv4Address("10.2.0.54")))
    p = p0.model_copy(update={"nics": (NICPlacement(nic="eth0", source_network="prod", target_network="dr",
                                                    target_subnet="s", ip=ip, switch="DR-LAN"),)})
    r = driver.apply_network(p)
    assert r.changed
    assert driver.apply_network(p).changed is False
    nic = sim.vm("hv-b", VM).nics[0]
    assert (nic.switch, nic.ip, nic.mask, nic.gateway, nic.dns1, nic.dns2) == (
        "DR-LAN", "10.2.0.15", "255.255.255.0", "10.2.0.1", "10.2.0.53", "10.2.0.54")
    assert actions(sim) == [
        ("hv-b", "Connect-VMNetworkAdapter -VMNetworkAdapter eth0 -SwitchName DR-LAN"),
        ("hv-b", "Set-VMNetworkAdapterFailoverConfiguration -VMNetworkAdapter eth0 -IPv4Address 10.2.0.15 "
                 "-IPv4SubnetMask 255.255.255.0 -IPv4DefaultGateway 10.2.0.1 -IPv4PreferredDNSServer 10.2.0.53 "
                 "-IPv4AlternateDNSServer 10.2.0.54")]


def test_extended_replication_continue(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    r = driver.enable_extended_replication(p, hosts["hv-c"], 300)
    assert r.changed and sim.vm("hv-c", VM).mode == "ExtendedReplica"
    assert sim.vm("hv-c", VM).state == "Replicating" and sim.vm("hv-b", VM).ext.state == "Replicating"
    assert driver.enable_extended_replication(p, hosts["hv-c"], 300).changed is False
    # A -> B failover without reversing, then B continues toward C.
    sim.set_down("hv-a", crash=True)
    driver.failover(p)
    driver.commit_failover(p)
    assert driver.continue_extended_replication(p).changed
    assert driver.continue_extended_replication(p).changed is False
    b, c = sim.vm("hv-b", VM), sim.vm("hv-c", VM)
    assert (b.mode, b.rel.replica, c.mode, c.rel.primary) == ("Primary", "hv-c", "Replica", "hv-b")
    assert actions(sim)[-1] == ("hv-b", "Resume-VMReplication -VM web-01 -Continue")


def test_extended_replication_reverse_orphans_c(sim, driver, hosts) -> None:
    from siterecovery.errors import FabricError
    p = protect(sim, driver, hosts)
    driver.enable_extended_replication(p, hosts["hv-c"], 900)
    driver.prepare_planned_failover(p)
    driver.failover(p)
    with pytest.raises(FabricError) as ei:  # guess: an extended relationship blocks the reverse
        driver.reverse_replication(p)
    assert ei.value.error_id == "OperationFailed,Microsoft.HyperV.PowerShell.Commands.SetVMReplication"
    assert driver.remove_extended_replication(p).changed
    assert driver.remove_extended_replication(p).changed is False
    assert driver.reverse_replication(p).state == S.Replicating
    assert sim.vm("hv-c", VM).mode == "ExtendedReplica"  # orphaned, as the reference says


def test_extended_replica_failover(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    driver.enable_extended_replication(p, hosts["hv-c"], 300)
    pc = placement(hosts, src="hv-b", dst="hv-c")
    assert driver.failover(pc).state == S.FailedOverWaitingCompletion
    assert driver.start_vm(pc).changed


def test_broker_places_replica_on_a_node(sim, driver, hosts, client_key) -> None:
    from hvhelpers import make_host
    sim.add_host("node-1", replica_server=False)
    sim.add_host("node-2", replica_server=False)
    sim.host("node-1").vms.append(sim.add_vm("hv-c", "filler"))
    sim.add_broker("hvr-broker", ["node-1", "node-2"])
    broker = make_host(sim, "hvr-broker", client_key[1], broker=True)
    p = placement({**hosts, "hvr-broker": broker}, dst="hvr-broker")
    sim.add_vm("hv-a", VM)
    driver.enable_replication(p)
    driver.start_initial_replication(p)
    assert [v.name for v in sim.host("node-2").vms] == [VM]
    assert driver.recovery_points(p)
    assert driver.failover(p).state == S.FailedOverWaitingCompletion


def test_latency_knob_and_failure_injection(sim, driver, hosts) -> None:
    from siterecovery.errors import FabricError
    p = protect(sim, driver, hosts)
    sim.inject("hv-a", "Suspend-VMReplication", "VMReplication_ReplicaServerUnreachable", "boom")
    with pytest.raises(FabricError) as ei:
        driver.suspend(p)
    assert ei.value.error_id.startswith("VMReplication_ReplicaServerUnreachable,")
    assert ei.value.vm == VM and ei.value.host == "hv-a" and ei.value.operation == "suspend"
    assert driver.suspend(p).changed  # injected once only
    sim.delays["Resume-VMReplication"] = 0.3
    import time
    t = time.monotonic()
    driver.resume(p)
    assert time.monotonic() - t >= 0.3


def test_down_host_is_transient(sim, driver, hosts) -> None:
    from siterecovery.errors import ConnectionFailed
    p = protect(sim, driver, hosts)
    sim.set_down("hv-a")
    with pytest.raises(ConnectionFailed) as ei:
        driver.replication_health(p)
    assert ei.value.host == "hv-a" and ei.value.operation == "replication_health"
    sim.set_down("hv-a", False)
    assert driver.replication_health(p).state == S.Replicating


@pytest.mark.parametrize("style", [("name", "msdate"), ("number", "iso"), ("number", "msdate")])
def test_answer_shapes(sim, driver, hosts, style) -> None:
    # ConvertTo-Json's shapes (one object bare, several as an array, none as no line) are PowerShell's own
    # in the simulator now; enums and dates still vary between Windows PowerShell 5.1 and PowerShell 7.
    p = protect(sim, driver, hosts)
    sim.enum_style, sim.date_style = style
    h = driver.replication_health(p)
    assert h.state == S.Replicating and h.last_replication_time is not None
    assert len(driver.recovery_points(p)) == 4


def test_onboarding_again_applies_changed_policy(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    assert driver.enable_replication(p).changed is False
    r = driver.enable_replication(placement(hosts, copy_frequency_seconds=30, recovery_history_hours=8))
    assert r.changed and "ReplicationFrequencySec" in r.message
    assert actions(sim)[-1] == ("hv-a", "Set-VMReplication -VM web-01 -ReplicationFrequencySec 30 -RecoveryHistory 8")
    assert (sim.vm("hv-a", VM).rel.frequency, sim.vm("hv-a", VM).rel.history) == (30, 8)
