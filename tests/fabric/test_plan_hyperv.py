"""The recovery-plan flow on the Hyper-V simulator over real SSH, with faults: a cmdlet failing in the
middle of a group (re-run finishes, no Start-VMFailover twice, from the simulator's cmdlet log), host
keys refused through a flow run (changed pin, unknown key), and a scan of everything the runs produced
for the private key the hosts' credential holds (env variable)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("prefect")

from siterecovery.testing.hyperv_sim import READ_ONLY, HyperVSimulator, generate_key  # noqa: E402
from tests.scan_secrets import needles, scan_objects, scan_paths, scan_prefect  # noqa: E402

VMS = ("web-01", "web-02", "web-03")


def write_project(root: Path, sim: HyperVSimulator, host_key: str | None = None, known_hosts: str | None = None,
                  vms: tuple[str, ...] = VMS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    hosts = []
    for n, site in (("hv-a", "a"), ("hv-b", "b")):
        h: dict[str, Any] = {"name": n, "site": site, "fabric": "hyperv", "address": "127.0.0.1", "port": sim.port,
                             "user": n, "credential": {"env": "SR_HV_KEY"}, "default_storage": "D:\\Replica",
                             "replica_server": {"port": 80, "authentication": "kerberos"}}
        if known_hosts:
            h["known_hosts"] = known_hosts
        else:
            h["host_key"] = host_key or sim.host_key_line
        hosts.append(h)
    topo = {"kind": "Topology", "sites": [{"name": "a"}, {"name": "b"}], "hosts": hosts,
            "clouds": [{"name": "CloudA", "site": "a", "host_groups": [{"name": "ga", "hosts": ["hv-a"]}]},
                       {"name": "CloudB", "site": "b", "host_groups": [{"name": "gb", "hosts": ["hv-b"]}]}],
            "vms": [{"name": v, "host": "hv-a", "cloud": "CloudA"} for v in vms]}
    (root / "topology.yaml").write_text(yaml.safe_dump(topo, sort_keys=False))
    (root / "protection.yaml").write_text(yaml.safe_dump({
        "kind": "Protection", "policies": [{"name": "p300", "copy_frequency_seconds": 300}],
        "pairings": [{"name": "ab", "protected_cloud": "CloudA", "protecting_cloud": "CloudB", "policy": "p300"}]}))
    (root / "shop.yaml").write_text(yaml.safe_dump({
        "kind": "RecoveryPlan", "name": "shop", "source": "CloudA", "target": "CloudB",
        "groups": [{"name": "web", "vms": list(vms)}]}))
    return root


def protect(sim: HyperVSimulator, root: Path, key_text: str) -> None:
    from siterecovery.fabric import FabricContext
    from siterecovery.fabric.hyperv import HyperVFabric
    from siterecovery.model import Direction
    from siterecovery.placement import plan_placements
    from siterecovery.project import load_project

    proj = load_project(root)
    drv = HyperVFabric(FabricContext(secrets=lambda cred: key_text))
    try:
        for vm, p in plan_placements(proj, proj.plan("shop"), Direction.forward).items():
            sim.add_vm("hv-a", vm)
            drv.enable_replication(p)
            drv.start_initial_replication(p)
            sim.replicate("hv-a", vm, cycles=2, app_consistent=True)
    finally:
        drv.close()
    sim.clear_log()


def failovers(sim: HyperVSimulator) -> dict[str, int]:
    out = {vm: 0 for vm in VMS}
    for a in sim.actions("hv-b"):
        if a.startswith("Start-VMFailover") and "-Prepare" not in a:
            out[a.split()[2]] += 1
    return out


def test_hyperv_plan_fault_rerun_host_keys_and_no_key_material(
        sim: HyperVSimulator, client_key: tuple[object, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, prefect_harness: None) -> None:
    from flows.recovery_plan import PlanFailed, recovery_plan
    from siterecovery.model import FailoverType
    from tasks.fabric import close_all

    caplog.set_level(logging.DEBUG)
    key_text = client_key[1].read_text()
    monkeypatch.setenv("SR_HV_KEY", key_text)  # the credential: the key itself, in the environment
    state = tmp_path / "state"
    monkeypatch.setenv("SITERECOVERY_STATE", str(state))
    root = write_project(tmp_path / "project", sim)
    protect(sim, root, key_text)
    args: dict[str, Any] = {"plan": "shop", "project": str(root), "failover_type": FailoverType.planned,
                            "confirm": "shop", "host_limit": 1}
    produced: list[Any] = []

    # A fault in the middle of the group: the second Start-VM on the recovery host fails (fatal).
    sim.inject("hv-b", "Start-VM", "OperationFailed", message="the VM could not initialize", times=1)
    sim.delays["Start-VM"] = 0.1
    try:
        with pytest.raises(PlanFailed) as exc:
            recovery_plan(**args)
        first = exc.value.summary
        produced += [exc.value, first]
        assert first["status"] == "failed"
        assert any("could not initialize" in f for f in first["failures"]), first["failures"]
        assert "could not initialize" in Path(first["report"]).read_text()
        assert sum(failovers(sim).values()) == 3  # all failed over; one did not start
        again = recovery_plan(**args)
        produced.append(again)
        assert again["status"] == "succeeded" and again["resumed"] and again["intent"] == first["intent"]
        # Hyper-V names no point for a planned failover: the prepare (Start-VMFailover -Prepare) and the
        # latest point are what make it lossless, and the report says so.
        assert again["data_loss"] == "none (final sync after shutdown)" and again["achieved_rpo_seconds"] == 0.0
        assert failovers(sim) == {vm: 1 for vm in VMS}, sim.actions("hv-b")
        for vm in VMS:
            b = sim.vm("hv-b", vm)
            # A planned failover reverses by default: the VM runs at hv-b, replicating back to hv-a.
            assert (b.mode, b.state, b.power) == ("Primary", "Replicating", "Running"), vm
        audit = json.loads(Path(again["report"]).with_suffix(".json").read_text())["audit"]
        assert len([a for a in audit if a["action"] == "failover"]) == 3

        # SSH trust through a flow run: a changed pinned key and an unknown key are refused, reported clearly.
        other, _ = generate_key()
        (tmp_path / "empty_known_hosts").write_text("")
        for name, kw, says in (("changed", {"host_key": f"ssh-ed25519 {other.get_base64()}"}, "CHANGED"),
                               ("unknown", {"known_hosts": str(tmp_path / "empty_known_hosts")}, "unknown")):
            bad = write_project(tmp_path / name, sim, **kw)
            monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / f"state-{name}"))  # another project's estate
            before = len(sim.log())
            with pytest.raises(PlanFailed) as refused:
                recovery_plan(plan="shop", project=str(bad), failover_type=FailoverType.test)
            produced += [refused.value, refused.value.summary]
            fails = refused.value.summary["failures"]
            assert any(says in f and "host key" in f.lower() for f in fails), fails
            assert says in Path(refused.value.summary["report"]).read_text()
            assert len(sim.log()) == before  # not one command reached the host
    finally:
        close_all()

    wanted = needles(keys=[key_text])
    hits, files = scan_paths([tmp_path], wanted, skip=[client_key[1]])
    hits += scan_objects("exceptions and summaries", produced, wanted)
    hits += scan_objects("captured log records", [r.getMessage() for r in caplog.records], wanted)
    more, counts = scan_prefect(wanted)
    hits += more
    assert files > 5 and counts["logs"] > 0 and counts["artifacts"] > 0
    assert hits == [], hits


def _seq(sim: HyperVSimulator) -> list[tuple[str, str]]:
    return [(e.host, e.render()) for e in sim.log() if e.ok and e.cmdlet not in READ_ONLY]


def test_seed_003_sequences_at_plan_level(
        sim: HyperVSimulator, client_key: tuple[object, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        prefect_harness: None) -> None:
    """The three failovers of seed 003, line by line from the simulator's cmdlet log, through the
    recovery-plan flow over real SSH, with the hosts' OpenSSH default shell set to PowerShell (the other
    test runs cmd.exe, Windows' default)."""
    from flows.recovery_plan import recovery_plan
    from siterecovery.model import Direction, FailoverType
    from tasks.fabric import close_all

    key_text = client_key[1].read_text()
    monkeypatch.setenv("SR_HV_KEY", key_text)
    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / "state"))
    for h in ("hv-a", "hv-b"):
        sim.host(h).shell = "powershell"
    root = write_project(tmp_path / "project", sim, vms=("web-01",))
    protect(sim, root, key_text)
    try:
        # 1. Drill (replica host): Start-VMFailover -AsTest, Start-VM on "<vm> - Test", Stop-VMFailover.
        assert recovery_plan(plan="shop", project=str(root), failover_type=FailoverType.test)["status"] == "succeeded"
        assert _seq(sim) == [
            ("hv-b", "Start-VMFailover -VM web-01 -AsTest -Confirm:$false"),
            ("hv-b", "Start-VM -VM web-01 - Test"),
            ("hv-b", "Stop-VMFailover -VM web-01")]
        sim.clear_log()
        # 2. Planned, reversed by default: Stop-VM and Start-VMFailover -Prepare on the primary, then
        #    Start-VMFailover, Set-VMReplication -Reverse, Start-VM on the replica.
        res = recovery_plan(plan="shop", project=str(root), failover_type=FailoverType.planned, confirm="shop")
        assert res["status"] == "succeeded", res
        assert _seq(sim) == [
            ("hv-a", "Stop-VM -VM web-01 -Force"),
            ("hv-a", "Start-VMFailover -VM web-01 -Prepare -Confirm:$false"),
            ("hv-b", "Start-VMFailover -VM web-01 -Confirm:$false"),
            ("hv-b", "Set-VMReplication -VM web-01 -Reverse -ReplicaServerName hv-a"),
            ("hv-b", "Start-VM -VM web-01")]
        a, b = sim.vm("hv-a", "web-01"), sim.vm("hv-b", "web-01")
        assert (b.mode, b.state, b.power, a.mode, a.state) == ("Primary", "Replicating", "Running", "Replica",
                                                               "Replicating")
        # 3. Unplanned, back to hv-a with hv-b lost: Start-VMFailover, Start-VM, Complete-VMFailover.
        sim.replicate("hv-b", "web-01", cycles=2)
        sim.set_down("hv-b", crash=True)
        sim.clear_log()
        res = recovery_plan(plan="shop", project=str(root), failover_type=FailoverType.unplanned,
                            direction=Direction.failback, confirm="shop")
        assert res["status"] == "succeeded", res
        assert _seq(sim) == [
            ("hv-a", "Start-VMFailover -VM web-01 -Confirm:$false"),
            ("hv-a", "Start-VM -VM web-01"),
            ("hv-a", "Complete-VMFailover -VM web-01 -Confirm:$false")]
        assert (a.state, a.power) == ("FailedOver", "Running")
    finally:
        close_all()


def test_hyperv_failback_network_follows_the_replicas_switch(
        sim: HyperVSimulator, client_key: tuple[object, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        prefect_harness: None) -> None:
    """Seed 000's failback table on Hyper-V: after a planned failover, the replica's NIC is moved to the
    data network's switch at site b; failing back puts the original VM on the network mapped to that one
    (a-data's switch), not back on its own (a-prod). The driver reads the replica's switch
    (Get-VMNetworkAdapter) and names it as a network of site b."""
    from flows.recovery_plan import recovery_plan
    from siterecovery.compile import RunOptions
    from siterecovery.model import Direction, FailoverType
    from tasks.fabric import close_all

    key_text = client_key[1].read_text()
    monkeypatch.setenv("SR_HV_KEY", key_text)
    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / "state"))
    root = write_project(tmp_path / "project", sim, vms=("web-01",))
    topo = yaml.safe_load((root / "topology.yaml").read_text())
    topo["vm_networks"] = [
        {"name": f"{site}-{kind}", "site": site, "switch": f"vSwitch-{site.upper()}{kind}",
         "subnets": [{"name": "s", "cidr": f"10.{i}.0.0/24"}]}
        for i, (site, kind) in enumerate((("a", "prod"), ("a", "data"), ("b", "prod"), ("b", "data")))]
    topo["vms"][0]["nics"] = [{"name": "eth0", "network": "a-prod", "subnet": "s"}]
    (root / "topology.yaml").write_text(yaml.safe_dump(topo, sort_keys=False))
    prot = yaml.safe_load((root / "protection.yaml").read_text())
    prot["network_mappings"] = [{"source": "a-prod", "target": "b-prod"}, {"source": "a-data", "target": "b-data"}]
    (root / "protection.yaml").write_text(yaml.safe_dump(prot, sort_keys=False))
    sim_nics = (("eth0", "vSwitch-Aprod"),)
    sim.host("hv-a").switches |= {"vSwitch-Aprod", "vSwitch-Adata"}
    sim.host("hv-b").switches |= {"vSwitch-Bprod", "vSwitch-Bdata"}
    from siterecovery.fabric import FabricContext
    from siterecovery.fabric.hyperv import HyperVFabric
    from siterecovery.placement import plan_placements
    from siterecovery.project import load_project

    proj = load_project(root)
    drv = HyperVFabric(FabricContext(secrets=lambda cred: key_text))
    try:
        for vm, p in plan_placements(proj, proj.plan("shop"), Direction.forward).items():
            sim.add_vm("hv-a", vm, nics=sim_nics)
            drv.enable_replication(p)
            drv.start_initial_replication(p)
            sim.replicate("hv-a", vm, cycles=2)
    finally:
        drv.close()
    try:
        res = recovery_plan(plan="shop", project=str(root), failover_type=FailoverType.planned, confirm="shop")
        assert res["status"] == "succeeded", res
        assert sim.vm("hv-b", "web-01").nics[0].switch == "vSwitch-Bprod"  # the mapping, forward
        sim.vm("hv-b", "web-01").nics[0].switch = "vSwitch-Bdata"  # an operator moved it (Connect-VMNetworkAdapter)
        back = recovery_plan(plan="shop", project=str(root), failover_type=FailoverType.planned, confirm="shop",
                             direction=Direction.failback, options=RunOptions(reverse_replication=True))
        assert back["status"] == "succeeded", back
        assert sim.vm("hv-a", "web-01").nics[0].switch == "vSwitch-Adata"
    finally:
        close_all()
