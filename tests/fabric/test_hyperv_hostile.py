"""Hostile VM names through every driver operation: the simulator must see exactly the intended
literal every time, and VMs whose names a wildcard would match must never be touched."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hvhelpers import placement

from siterecovery.fabric.base import PointChoice
from siterecovery.mapping import NICPlacement
from siterecovery.model import FailoverIP
from siterecovery.testing.hyperv_sim import Nic, SimVM, Snapshot

HOSTILE = [
    "it's",
    "\u2018curly\u2019 \u201alow\u201b ''",
    "$(Stop-Computer -Force)",
    "back`tick`n `$x",
    "semi;colon; Remove-VM -Name *",
    "line\nbreak\r\nCRLF",
    "*",
    "we?b[0-9]",
    "\u00fcn\u00efc\u00f8d\u00e9 \u540d\u524d \U0001f600",
    "'; Stop-Computer; '",
    "\u2014Force -Confirm:$false",
    '"double" $env:PATH @{a=1}',
    " spaced ",
]


def _named(value: object) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [x.name for x in items if isinstance(x, SimVM | Nic | Snapshot)]


@pytest.mark.parametrize("name", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_name_through_every_operation(sim, driver, hosts, name: str) -> None:
    decoys = [sim.add_vm("hv-a", d) for d in ("decoy", "web1", "it", "x")]
    sim.add_vm("hv-a", name)
    p = placement(hosts, name)
    back = placement(hosts, name, src="hv-b", dst="hv-a")
    ip = FailoverIP(address=IPv4Address("10.9.0.5"), prefix_length=16)
    pn = p.model_copy(update={"nics": (NICPlacement(nic="eth0", source_network="a", target_network="DR-LAN",
                                                    target_subnet=None, ip=ip),)})
    d = driver
    # protection
    d.enable_replication(p)
    d.start_initial_replication(p)
    sim.replicate("hv-a", name, cycles=3, app_consistent=True)
    assert d.replication_health(p).state.value == "Replicating"
    assert len(d.recovery_points(p)) == 4
    d.replicate(p)
    d.suspend(p)
    d.resume(p)
    sim.require_resync("hv-a", name)
    d.resynchronize(p)
    # test failover
    d.test_failover(p, PointChoice(kind="latest_processed"), network="TEST-ISO")
    d.start_vm(p, test=True)
    d.cleanup_test_failover(p)
    d.test_failover(p)
    d.cleanup_test_failover(p)
    # network, planned failover
    d.apply_network(pn)
    d.prepare_planned_failover(p)
    d.cancel_failover(p)
    d.prepare_planned_failover(p)
    d.failover(p)
    d.reverse_replication(p)
    d.start_vm(p)
    # unplanned failover back to hv-a, with a chosen point, then reverse
    sim.replicate("hv-b", name, cycles=2)
    sim.set_down("hv-b", crash=True)
    pts = d.recovery_points(back)
    d.failover(back, PointChoice(kind="point_in_time", at=pts[-1].created_at))
    d.cancel_failover(back)
    d.failover(back, PointChoice(kind="latest_app_consistent") if any(x.consistency == "app" for x in pts)
               else PointChoice(kind="latest_processed"))
    d.start_vm(back)
    d.commit_failover(back)
    sim.set_down("hv-b", False)
    d.reverse_replication(back)
    # extended replication A -> B -> C, then remove it, stop, disable
    sim.replicate("hv-a", name, cycles=1)
    d.enable_extended_replication(p, hosts["hv-c"], 300)
    d.remove_extended_replication(p)
    d.stop_vm(p)
    d.disable_replication(p, delete_replica=True)

    # The simulator saw exactly the intended literal, everywhere.
    # (reading the test VM's own state looks for its test VM in turn: "<name> - Test - Test")
    wanted = {name, f"{name} - Test", f"{name} - Test - Test", "eth0"}
    seen_where = [dict(e.args)["Value"] for e in sim.log() if e.cmdlet == "Where-Object"]
    assert seen_where and set(seen_where) <= wanted | {x.id for h in sim.hosts.values() for v in h.vms
                                                       for x in v.points} | set(_point_ids(sim)), seen_where
    assert name in seen_where
    for e in sim.log():
        for _, v in e.args:
            for n in _named(v):
                assert n in wanted or n.startswith(name + " - "), (e.cmdlet, n)
    assert all(not e.cmdlet.startswith("Simulator") for e in sim.log())
    for dv in decoys:
        assert dv.rel is None and dv.power == "Running" and dv in sim.host("hv-a").vms




def _point_ids(sim) -> list[str]:
    # Where-Object Id -eq <id> values: recovery point ids the driver read back (some since pruned).
    return [dict(e.args)["Value"] for e in sim.log() if e.cmdlet == "Where-Object" and
            dict(e.args)["Property"] == "Id"]
