"""DR semantics on the linux fabric over a real sshd, under a real Prefect server (issue 18): a planned
failover reports no data loss (its final sync after shutdown), suspend/resume stops and restarts the
cycles, and the policy's bandwidth cap holds the source host's concurrent transfers to one shared rate.
The estate (two linux hosts on the suite's sshd, raw disk images) is test_protection_linux's."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sshd import SSHServer
from test_protection_linux import PAIRING, Estate

pytest.importorskip("prefect")

from siterecovery.testing.disks import rewrite_blocks  # noqa: E402

pytestmark = [pytest.mark.sshd, pytest.mark.prefect_server]

MiB = 1024 * 1024


@pytest.fixture
def make_estate(sshd_server: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                prefect_harness: None) -> Any:
    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / "state"))

    def make(vms: dict[str, list[str]]) -> Estate:
        return Estate(tmp_path, sshd_server, vms)
    return make


def fabric_and_placements(e: Estate, direction: Any = None) -> tuple[Any, dict[str, Any]]:
    from siterecovery.estate import state_dir
    from siterecovery.model import Direction
    from siterecovery.placement import pairing_placements
    from siterecovery.project import load_project
    from siterecovery.protection import open_fabric

    proj = load_project(e.project)
    return open_fabric("linux", state_dir(e.project)), pairing_placements(proj, proj.protection.pairing(PAIRING),
                                                                   direction or Direction.forward)


# ---- item 7: a planned failover loses nothing ----------------------------------------------------

def test_planned_failover_reports_no_data_loss_and_the_point_age(make_estate: Any) -> None:
    from flows.recovery_plan import recovery_plan
    from siterecovery.model import FailoverType

    e = make_estate({"web-01": ["os"]})
    (e.project / "app.yaml").write_text(json.dumps({"kind": "RecoveryPlan", "name": "app", "source": "NY",
                                                     "target": "CHI", "groups": [{"name": "web", "vms": ["web-01"]}]}))
    assert {r.outcome for r in e.run("enable-protection")} == {"protected"}
    # Written after the last cycle: only the planned failover's final sync can carry it.
    rewrite_blocks(e.disks[("web-01", "os")], [3, 9])
    assert not e.in_sync("web-01")
    drv, placements = fabric_and_placements(e)
    try:
        out = recovery_plan(plan="app", project=str(e.project), failover_type=FailoverType.planned, confirm="app")
        assert out["status"] == "succeeded", out
        assert e.in_sync("web-01")  # the replica the VM now runs from holds the last write
        assert out["data_loss"] == "none (final sync after shutdown)" and out["achieved_rpo_seconds"] == 0.0
        assert out["point_age_seconds"] is not None
        html = Path(out["report"]).read_text()
        assert "<td>Data loss</td><td>none (final sync after shutdown)</td>" in html
    finally:
        drv.stop_vm(placements["web-01"], side="target")
        drv.close()


# ---- item 5: suspend and resume -------------------------------------------------------------------

def test_suspend_stops_cycles_and_resume_ships_what_was_written_meanwhile(make_estate: Any) -> None:
    e = make_estate({"web-01": ["os"], "db-01": ["os"]})
    e.run("enable-protection")
    steps = e.run("suspend-replication", vms=["web-01"])
    assert [(s.vm, s.changed, s.state) for s in steps] == [("web-01", True, "Suspended")]
    assert e.vm_record("web-01")["state"] == "Suspended" and e.vm_record("db-01")["state"] == "Replicating"

    rewrite_blocks(e.disks[("web-01", "os")], [2, 5])
    files = {k: v for k, v in e.replica_files().items() if "/web-01/" in k}
    cycles = {r.vm: r for r in e.run("replicate")}
    assert cycles["web-01"].action == "skipped" and "Suspended" in cycles["web-01"].note
    assert cycles["db-01"].action == "cycle"
    assert {k: v for k, v in e.replica_files().items() if "/web-01/" in k} == files  # nothing touched
    assert not e.in_sync("web-01")
    health = {r.vm: r for r in e.run("replication-health")}
    assert (health["web-01"].state, health["web-01"].health) == ("Suspended", "Warning")
    assert health["web-01"].pending_bytes == 2 * 64 * 1024  # still tracked while suspended

    steps = e.run("resume-replication")
    assert {(s.vm, s.changed) for s in steps} == {("web-01", True), ("db-01", False)}
    cycles = {r.vm: r for r in e.run("replicate")}
    assert cycles["web-01"].action == "cycle" and e.in_sync("web-01")


# ---- item 6: the bandwidth cap -------------------------------------------------------------------

def test_bandwidth_cap_is_shared_by_the_hosts_concurrent_transfers(make_estate: Any) -> None:
    from typer.testing import CliRunner

    from siterecovery.cli import _load_commands, app

    e = make_estate({"web-01": ["os"], "db-01": ["os"]})
    e.run("enable-protection")
    cap_mbps = 1.0  # 125 kB/s for the whole source host
    e.write_protection(bandwidth_mbps=cap_mbps)
    for vm in ("web-01", "db-01"):
        rewrite_blocks(e.disks[(vm, "os")], range(0, 12))  # 768 KiB of random data each
    cycles = {r.vm: r for r in e.run("replicate")}
    assert {r.action for r in cycles.values()} == {"cycle"} and e.in_sync("web-01") and e.in_sync("db-01")
    a, b = cycles["web-01"], cycles["db-01"]
    assert a.started_at and a.finished_at and b.started_at and b.finished_at
    assert a.started_at < b.finished_at and b.started_at < a.finished_at, "the two transfers did not overlap"
    total = a.bytes_sent + b.bytes_sent
    span = (max(a.finished_at, b.finished_at) - min(a.started_at, b.started_at)) / timedelta(seconds=1)
    cap = cap_mbps * 1_000_000 / 8
    # The two transfers together cannot beat the host's cap (less the 50 ms the bucket lends and the
    # quantum each sender reserves ahead); each one capped on its own would take half this time.
    assert total >= 1.5 * MiB and span >= 0.95 * total / cap, (total, span, total / span)
    assert os.path.exists(e.root["ny"] / "bandwidth.bucket")
    # The replicate flow's bandwidth_mbps overrides the policy: a wide cap, a fast cycle.
    rewrite_blocks(e.disks[("web-01", "os")], range(0, 12))
    fast = e.run("replicate", vms=["web-01"], bandwidth_mbps=1000.0)[0]
    assert fast.action == "cycle" and fast.finished_at and fast.started_at
    assert (fast.finished_at - fast.started_at) / timedelta(seconds=1) < span

    _load_commands()
    res = CliRunner().invoke(app, ["status", PAIRING, "--project", str(e.project), "--json"])
    assert res.exit_code == 0, res.output
    assert {r["vm"]: r["bandwidth_mbps"] for r in json.loads(res.stdout)} == {"web-01": 1.0, "db-01": 1.0}
    res = CliRunner().invoke(app, ["status", PAIRING, "--project", str(e.project)])
    assert "1 Mbit/s" in res.stdout


# ---- item 2: failback networks --------------------------------------------------------------------

ARGV_VM = [sys.executable, "-c", "import sys, time; print('vm up on', repr(sys.argv[1]), flush=True); time.sleep(600)",
           "{{ network }}"]


def test_failback_network_follows_the_replicas_network_now(make_estate: Any) -> None:
    """web-01's replica is moved to an unmapped network after the failover: failing back, web-01 comes
    back disconnected (seed 000's failback table), and its process gets no network."""
    from flows.recovery_plan import recovery_plan
    from siterecovery.compile import RunOptions
    from siterecovery.model import Direction, FailoverType

    e = make_estate({"web-01": ["os"]})
    topo = json.loads((e.project / "topology.yaml").read_text())
    topo["vm_networks"] = [{"name": f"{n}-{site}", "site": site, "subnets": [{"name": "s", "cidr": cidr}]}
                           for n, site, cidr in (("prod", "ny", "10.1.0.0/24"), ("prod", "chi", "10.2.0.0/24"),
                                                 ("lab", "chi", "10.3.0.0/24"))]
    topo["vms"][0]["nics"] = [{"name": "eth0", "network": "prod-ny", "subnet": "s", "address": "10.1.0.5"}]
    topo["vms"][0]["compute"] = {"backend": "process", "command": ARGV_VM, "consistency": "none"}  # never writes
    (e.project / "topology.yaml").write_text(json.dumps(topo, indent=1))
    prot = json.loads((e.project / "protection.yaml").read_text())
    prot["network_mappings"] = [{"source": "prod-ny", "target": "prod-chi"}]
    (e.project / "protection.yaml").write_text(json.dumps(prot, indent=1))
    (e.project / "app.yaml").write_text(json.dumps({"kind": "RecoveryPlan", "name": "app", "source": "NY",
                                                     "target": "CHI", "groups": [{"name": "web", "vms": ["web-01"]}]}))
    e.run("enable-protection")
    args: dict[str, Any] = {"plan": "app", "project": str(e.project), "failover_type": FailoverType.planned,
                            "confirm": "app", "options": RunOptions(reverse_replication=True)}
    drv, fwd = fabric_and_placements(e)
    _, back = fabric_and_placements(e, Direction.failback)
    vm_log = {s: e.root[s] / "web-01" / "run" / "vm.log" for s in ("ny", "chi")}
    try:
        assert recovery_plan(**args)["status"] == "succeeded"
        assert "vm up on 'prod-chi'" in vm_log["chi"].read_text()
        assert drv.vm_networks(back["web-01"], "source") == {"eth0": "prod-chi"}
        drv.connect_network(back["web-01"], "source", "eth0", "lab-chi")  # the operator moved the replica
        out = recovery_plan(**args, direction=Direction.failback)
        assert out["status"] == "succeeded", out
        assert "vm up on ''" in vm_log["ny"].read_text()  # started unplugged, not on prod-ny
        assert drv.vm_networks(fwd["web-01"], "source") == {"eth0": None}
    finally:
        for p, side in ((fwd["web-01"], "source"), (back["web-01"], "source")):
            with contextlib.suppress(Exception):
                drv.stop_vm(p, side=side)
        drv.close()


# ---- item 3: storage classification by location ---------------------------------------------------

def test_a_disk_takes_its_locations_classification(make_estate: Any) -> None:
    """The disks' directory is classified 'fast' (no disk names a classification): the replica lands on
    the location of the classification 'fast' maps to, not in the replica host's default storage."""
    e = make_estate({"web-01": ["os"]})
    target = e.tmp / "fast-chi"
    topo = json.loads((e.project / "topology.yaml").read_text())
    topo["storage_classifications"] = [{"name": "fast", "site": "ny", "locations": [str(e.tmp / "disks")]},
                                       {"name": "fast-chi", "site": "chi", "locations": [str(target)]}]
    assert all("classification" not in d for v in topo["vms"] for d in v["disks"])
    (e.project / "topology.yaml").write_text(json.dumps(topo, indent=1))
    prot = json.loads((e.project / "protection.yaml").read_text())
    prot["storage_mappings"] = [{"source": "fast", "target": "fast-chi"}]
    (e.project / "protection.yaml").write_text(json.dumps(prot, indent=1))
    assert {r.outcome for r in e.run("enable-protection")} == {"protected"}
    replica = target / "web-01" / "os.img"
    assert replica.exists() and not e.replica("web-01", "os").exists()
    from siterecovery.replica.engine import file_digest

    assert file_digest(str(replica)) == file_digest(str(e.disks[("web-01", "os")]))
