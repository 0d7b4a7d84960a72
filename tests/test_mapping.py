"""Mapping rules, checked against the source documents' own worked examples (New York / Chicago)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from siterecovery.mapping import place_disks, place_nic, replica_candidates, target_network, target_subnet
from siterecovery.model import Direction, Protection
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
