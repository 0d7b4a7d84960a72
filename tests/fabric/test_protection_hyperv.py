"""The protection flows against the Hyper-V simulator over real SSH: enable-protection configures the
replica server and authorization, enables and copies, and a second run changes nothing; health reads
Measure-VMReplication through the driver and a resync-required VM raises one breach event."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prefect")

from siterecovery.testing.hyperv_sim import HyperVSimulator  # noqa: E402


def write_project(root: Path, sim: HyperVSimulator, key: Path) -> str:
    hosts = "\n".join(f"""  - name: {n}
    site: {site}
    fabric: hyperv
    address: 127.0.0.1
    port: {sim.port}
    user: {n}
    host_key: '{sim.host_key_line}'
    credential: {{key_file: '{key}'}}
    default_storage: 'D:\\Replica'
    replica_server: {{port: 80, authentication: kerberos}}""" for n, site in (("hv-a", "a"), ("hv-b", "b"), ("hv-c", "c")))
    (root / "topology.yaml").write_text(f"""kind: Topology
sites: [{{name: a}}, {{name: b}}, {{name: c}}]
hosts:
{hosts}
clouds:
  - {{name: CloudA, site: a, host_groups: [{{name: ga, hosts: [hv-a]}}]}}
  - {{name: CloudB, site: b, host_groups: [{{name: gb, hosts: [hv-b]}}]}}
vms:
  - {{name: web-01, host: hv-a, cloud: CloudA}}
  - {{name: web-02, host: hv-a, cloud: CloudA}}
""")
    (root / "protection.yaml").write_text("""kind: Protection
policies:
  - {name: p300, copy_frequency_seconds: 300, recovery_history_hours: 4, rpo_threshold_seconds: 900}
pairings:
  - {name: ab, protected_cloud: CloudA, protecting_cloud: CloudB, policy: p300, extended: {host: hv-c}}
""")
    return str(root)


def test_protection_flows_on_hyperv_simulator(sim: HyperVSimulator, client_key: tuple[object, Path],
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              prefect_harness: None) -> None:
    import flows.protection as fp

    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / "state"))
    (tmp_path / "project").mkdir()
    project = write_project(tmp_path / "project", sim, client_key[1])
    for vm in ("web-01", "web-02"):
        sim.add_vm("hv-a", vm)

    first = fp.enable_protection(pairing="ab", project=project)
    assert {r.outcome for r in first} == {"protected"}, [(r.vm, r.outcome, r.note) for r in first]
    assert sim.vm("hv-a", "web-01").state == "Replicating"
    assert sim.vm("hv-b", "web-01").mode == "Replica"
    # The pairing's extended replication: each replica on hv-b replicates on to hv-c (A -> B -> C).
    for vm in ("web-01", "web-02"):
        ext = sim.vm("hv-b", vm).ext
        assert ext is not None and ext.replica == "hv-c" and ext.frequency == 300
        assert sim.vm("hv-c", vm).mode == "ExtendedReplica"
    done = sim.actions()
    assert any(a.startswith("Set-VMReplicationServer") for a in done), done
    # The primary is a replica server too, authorizing its replica host: reverse replication needs it.
    assert [e["AllowedPrimaryServer"] for e in sim.host("hv-a").entries] == ["hv-b"]
    assert [e["AllowedPrimaryServer"] for e in sim.host("hv-b").entries] == ["hv-a"]
    assert sum(a.startswith("Enable-VMReplication") for a in done) >= 2

    sim.clear_log()
    second = fp.enable_protection(pairing="ab", project=project)
    assert {r.outcome for r in second} == {"already protected"}
    mutating = [a for a in sim.actions() if a.split()[0] in ("Enable-VMReplication", "Start-VMInitialReplication",
                                                            "Set-VMNetworkAdapterFailoverConfiguration")]
    assert mutating == []

    # Hyper-V replicates by itself: the replicate flow leaves it alone.
    assert {r.action for r in fp.replicate(pairing="ab", project=project)} == {"skipped"}

    sent: list[Any] = []
    monkeypatch.setattr(fp, "emit_alert", lambda a: sent.append((a.event, a.vm, a.reasons)))
    sim.require_resync("hv-a", "web-01")
    for _ in range(2):
        rows = {r.vm: r for r in fp.replication_health(pairing="ab", project=project)}
    assert rows["web-01"].health == "Critical" and rows["web-01"].state == "WaitingForStartResynchronize"
    assert sent == [("siterecovery.replication.breached", "web-01", ("critical",))]

    res = fp.resynchronize(pairing="ab", project=project, on_demand=True)
    assert res.status == "resynchronized" and [s.vm for s in res.steps] == ["web-01"]

    off = fp.disable_protection(pairing="ab", project=project, vms=["web-02"])
    assert [(r.vm, r.changed, r.delete_replica) for r in off] == [("web-02", True, False)]
