"""Mapping rules, checked against the source documents' own worked examples (New York / Chicago)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from siterecovery.mapping import (
    failback_network,
    location_classification,
    place_disks,
    place_nic,
    replica_candidates,
    resolve_failback,
    target_network,
    target_subnet,
)
from siterecovery.model import Direction, Disk, Protection
from siterecovery.placement import isolated_network, plan_placements
from siterecovery.project import load_project

PLANS = Path(__file__).resolve().parent.parent / "plans"


def nyc_protection() -> Protection:
    # VMNetwork1-NewYork <-> VMNetwork1-Chicago mapped; VMNetwork2-* not mapped.
    return Protection.model_validate({"network_mappings": [{"source": "VMNetwork1-NewYork", "target": "VMNetwork1-Chicago"}]})


def test_documents_network_mapping_example() -> None:
    prot = nyc_protection()
    # A VM on VMNetwork1-NewYork gets a replica on VMNetwork1-Chicago ...
    assert target_network("VMNetwork1-NewYork", prot) == "VMNetwork1-Chicago"
    # ... while VMNetwork2-NewYork (and VMNetwork2-Chicago) are not mapped: no network.
    assert target_network("VMNetwork2-NewYork", prot) is None
    assert target_network("VMNetwork2-Chicago", prot, Direction.failback) is None
    # Failback follows the same mapping the other way.
    assert target_network("VMNetwork1-Chicago", prot, Direction.failback) == "VMNetwork1-NewYork"


def test_subnet_same_name_else_first() -> None:
    assert target_subnet("app", ["web", "app"]) == "app"
    assert target_subnet("db", ["web", "app"]) == "web"
    assert target_subnet("db", []) is None


def test_worked_topology_nic_placement() -> None:
    project = load_project(PLANS)
    t, pr = project.topology, project.protection
    web = t.vm("web-01").nics[0]
    placed = place_nic(web, t, pr, taken=set())
    # web subnet exists in Chicago's VMNetwork1: same-name match, address from its pool.
    assert (placed.target_network, placed.target_subnet) == ("VMNetwork1-Chicago", "web")
    assert placed.ip is not None and placed.ip.address == ipaddress.IPv4Address("10.30.1.100")
    assert placed.ip.prefix_length == 24 and str(placed.ip.gateway) == "10.30.1.1"
    sql = place_nic(t.vm("sql-01").nics[0], t, pr, taken=set())
    # db subnet has no namesake in VMNetwork2-Chicago: first subnet; the VM's own failover IP wins.
    assert (sql.target_network, sql.target_subnet) == ("VMNetwork2-Chicago", "data")
    assert str(sql.ip.address) == "10.40.1.11"  # type: ignore[union-attr]


def test_pool_addresses_are_not_reused() -> None:
    project = load_project(PLANS)
    placements = plan_placements(project, project.plan("three-tier"))
    addrs = [n.ip.address for p in placements.values() for n in p.nics if n.ip]
    assert len(addrs) == len(set(addrs)) == 7  # seven VMs, one NIC each


def test_failback_restores_original_network() -> None:
    project = load_project(PLANS)
    fb = plan_placements(project, project.plan("three-tier"), Direction.failback)
    nic = fb["web-01"].nics[0]
    assert (nic.source_network, nic.target_network, nic.target_subnet) == ("VMNetwork1-Chicago", "VMNetwork1-NewYork", "web")
    # and the roles of the hosts are swapped
    fwd = plan_placements(project, project.plan("three-tier"))
    assert (fb["web-01"].source, fb["web-01"].target) == (fwd["web-01"].target, fwd["web-01"].source)


def test_documents_failback_table_every_row() -> None:
    """Seed 000's failback table: VM-1 on VMNetwork1-NewYork, its replica VM-2 on VMNetwork1-Chicago."""
    prot = nyc_protection()
    ny1, ny2, chi1, chi2 = "VMNetwork1-NewYork", "VMNetwork2-NewYork", "VMNetwork1-Chicago", "VMNetwork2-Chicago"
    # No change in VM-2's network after failover: VM-1 remains connected to the source network.
    assert failback_network(ny1, chi1, prot) == ny1
    # VM-2 disconnected after failover: VM-1 is disconnected.
    assert failback_network(ny1, None, prot) is None
    # VM-2 connected to VMNetwork2-Chicago, which is not mapped: VM-1 is disconnected ...
    assert failback_network(ny1, chi2, prot) is None
    # ... and when it is mapped, VM-1 joins the network it is mapped to.
    mapped2 = Protection.model_validate({"network_mappings": [{"source": ny1, "target": chi1},
                                                              {"source": ny2, "target": chi2}]})
    assert failback_network(ny1, chi2, mapped2) == ny2
    # The mapping of VMNetwork1-Chicago changed: VM-1 joins the network now mapped to it, whether the
    # mapping is written from Chicago's side or from another New York network.
    from_chi = Protection.model_validate({"network_mappings": [{"source": chi1, "target": ny2}]})
    assert failback_network(ny1, chi1, from_chi) == ny2
    moved = Protection.model_validate({"network_mappings": [{"source": ny2, "target": chi1}]})
    assert failback_network(ny1, chi1, moved) == ny2
    assert failback_network(ny1, chi1, Protection()) is None  # no mapping left at all


def test_failback_placement_follows_the_replicas_network_now() -> None:
    project = load_project(PLANS)
    fb = plan_placements(project, project.plan("three-tier"), Direction.failback)["web-01"]
    (nic,) = fb.nics
    # Unknown (a fabric that does not record networks): the no-change row, as before.
    assert resolve_failback(fb.nics, None) == fb.nics
    (same,) = resolve_failback(fb.nics, {"eth0": "VMNetwork1-Chicago"})
    assert (same.target_network, same.target_subnet, same.ip) == ("VMNetwork1-NewYork", "web", nic.ip)
    (gone,) = resolve_failback(fb.nics, {"eth0": None})
    assert gone.target_network is None and gone.ip is None
    # plans/ maps VMNetwork2-Chicago back to VMNetwork2-NewYork: its first subnet (no 'web' there).
    (moved,) = resolve_failback(fb.nics, {"eth0": "VMNetwork2-Chicago"})
    assert (moved.source_network, moved.target_network, moved.target_subnet, moved.switch) == (
        "VMNetwork2-Chicago", "VMNetwork2-NewYork", "db", "vSwitch-Data")
    (odd,) = resolve_failback(fb.nics, {"eth0": "not-in-the-topology"})
    assert odd.target_network is None


def test_documents_storage_mapping_example() -> None:
    project = load_project(PLANS)
    t, pr = project.topology, project.protection
    # GOLD -> GOLD_TARGET (reachable from hv-chi-01 only): sql VMs land there, on TargetVolume1.
    assert replica_candidates(t.vm("sql-01"), t, pr, "GoldCloud2") == ["hv-chi-01"]
    disks = place_disks(t.vm("sql-01"), t, pr, "hv-chi-01")
    assert [d.target_location for d in disks] == ["C:\\ClusterStorage\\TargetVolume1"] * 2
    assert {d.classification for d in disks} == {"GOLD_TARGET"}
    # SILVER -> SILVER_TARGET, reachable from every Chicago host.
    assert replica_candidates(t.vm("app-01"), t, pr, "GoldCloud2") == ["hv-chi-01", "hv-chi-02"]
    assert place_disks(t.vm("app-01"), t, pr, "hv-chi-02")[0].target_location == "C:\\ClusterStorage\\TargetVolume2"
    # No classification (no storage mapping): the replica host's default storage location.
    assert place_disks(t.vm("web-02"), t, pr, "hv-chi-02")[0].target_location == "E:\\Replica"
    # A mapped classification the chosen host cannot reach also falls back to the default location.
    assert place_disks(t.vm("sql-01"), t, pr, "hv-chi-02")[0].target_location == "E:\\Replica"


def test_documents_storage_by_location_vm1_to_vm5() -> None:
    """Seed 000's VM1-VM5 table: a disk takes the classification of the location it is on, without the
    topology repeating it per disk; a disk on an unclassified location goes to the default location."""
    project = load_project(PLANS)
    t, pr = project.topology, project.protection
    rows = {"VM1": "C:\\ClusterStorage\\SourceVolume1\\vm1.vhdx", "VM2": "\\\\FileServer\\SourceShare1\\vm2.vhdx",
            "VM3": "c:\\clusterstorage\\sourcevolume2\\vm3.vhdx", "VM4": "\\\\FileServer\\SourceShare2\\vm4.vhdx",
            "VM5": "C:\\ClusterStorage\\SourceVolume3\\vm5.vhdx"}
    want = {"VM1": ("GOLD", "C:\\ClusterStorage\\TargetVolume1"), "VM2": ("GOLD", "C:\\ClusterStorage\\TargetVolume1"),
            "VM3": ("SILVER", "C:\\ClusterStorage\\TargetVolume2"), "VM4": ("SILVER", "C:\\ClusterStorage\\TargetVolume2"),
            "VM5": (None, "D:\\Hyper-V\\Replica")}  # hv-chi-01's default location
    for name, path in rows.items():
        vm = t.vm("web-02").model_copy(update={"disks": (Disk(name="os", path=path),)})
        assert location_classification(path, t) == want[name][0], name
        assert place_disks(vm, t, pr, "hv-chi-01")[0].target_location == want[name][1], name
    # A location's prefix is not a location: SourceVolume10 is not SourceVolume1.
    assert location_classification("C:\\ClusterStorage\\SourceVolume10\\x.vhdx", t) is None
    # An explicit classification on an unclassified location still maps (nothing to contradict).
    vm = t.vm("web-02").model_copy(update={"disks": (Disk(name="os", path="D:\\x.vhdx", classification="SILVER"),)})
    assert place_disks(vm, t, pr, "hv-chi-02")[0].classification == "SILVER_TARGET"


def test_replicas_spread_over_candidate_hosts() -> None:
    project = load_project(PLANS)
    placements = plan_placements(project, project.plan("three-tier"))
    hosts = [p.target.name for p in placements.values()]
    assert {"hv-chi-01", "hv-chi-02"} == set(hosts)
    assert placements["sql-02"].target.name == "hv-chi-01"  # pinned by storage reach
    # the same VM gets the same host whichever plan asks
    assert plan_placements(project, project.plan("web-only"))["web-02"].target == placements["web-02"].target


def test_isolated_test_network() -> None:
    project = load_project(PLANS)
    assert isolated_network(project, "chicago") == "vSwitch-Test"
    assert isolated_network(project, "new-york") is None
