"""What a real Windows host does that the driver must survive: the OpenSSH default shell (cmd.exe with its
8,191-character limit, or PowerShell), the console's code pages (non-ASCII names), a locked guest that
makes Stop-VM prompt, long cmdlets that outlive their deadline, PowerShell's `@($null).Count`, every
documented power state, and one certificate per host."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hvhelpers import VM, make_host, placement

from siterecovery.errors import FabricError, TransientFabricError
from siterecovery.fabric import FabricContext
from siterecovery.fabric.hyperv import COMMAND, PROLOGUE, HyperVFabric, find, script, stdin_payload
from siterecovery.model import Host, ReplicationPolicy
from siterecovery.model.topology import ReplicaServer
from siterecovery.testing.hyperv_sim import HyperVSimulator

NAMES = ("Überwachung-straße-日本語", "ВМ-база-данных")


def _protect(sim: HyperVSimulator, d: HyperVFabric, hosts: dict[str, Host], vm: str) -> object:
    sim.add_vm("hv-a", vm)
    p = placement(hosts, vm)
    d.enable_replication(p)
    d.start_initial_replication(p)
    sim.replicate("hv-a", vm, cycles=2)
    return p


@pytest.mark.parametrize("shell", ["cmd", "powershell"])
def test_both_default_shells_and_non_ascii_names(sim: HyperVSimulator, driver: HyperVFabric,
                                                 hosts: dict[str, Host], shell: str) -> None:
    for h in sim.hosts.values():
        h.shell = shell
    assert len(COMMAND) < 100 and not any(c in COMMAND for c in "&<>^%$`\"'")
    for name in NAMES:
        p = _protect(sim, driver, hosts, name)
        st = driver.vm_state(hosts["hv-b"], name)
        assert (st.name, st.state) == (name, "Replicating")  # the name came back intact (UTF-8 output)
        assert driver.failover(p).state.value == "FailedOverWaitingCompletion"  # type: ignore[arg-type]
        assert sim.vm("hv-b", name).state == "FailedOverWaitingCompletion"
    # The scripts are long; the command line is not: cmd.exe would refuse a script on the command line.
    assert max(len(t) for _, t in sim.scripts) > 2000
    long_line = "powershell.exe -NoProfile -NonInteractive -EncodedCommand " + "A" * 12000
    out, status = sim.execute("hv-a", long_line, "")
    assert status == 1 and (shell == "powershell" or b"too long" in out)


def test_script_must_arrive_whole_on_stdin(sim: HyperVSimulator) -> None:
    sim.add_vm("hv-a", VM)
    text = script([*find("vm", VM), "'#end'"])
    out, status = sim.execute("hv-a", COMMAND, stdin_payload(text).decode("ascii"))
    assert status == 0 and out.strip().endswith(b"#end")
    # Without the final empty line PowerShell keeps waiting for input; a raw UTF-8 script on stdin is
    # read with the console's code page (a non-ASCII name no longer matches).
    assert sim.execute("hv-a", COMMAND, stdin_payload(text).decode("ascii")[:-1]) == (b"", 0)
    assert sim.execute("hv-a", COMMAND, text + "\n")[1] == 1
    assert "[Console]::OutputEncoding = [System.Text.Encoding]::UTF8" in PROLOGUE


def test_null_count_is_one_in_powershell(sim: HyperVSimulator, driver: HyperVFabric, hosts: dict[str, Host]) -> None:
    """`@($x).Count` is 1 when `$x` is $null: the simulator keeps that PowerShell rule, so a driver that
    counted that way would be caught; `@(pipeline)` counts 0 and the driver answers NotFound."""
    a = hosts["hv-a"]
    with pytest.raises(FabricError) as ei:
        driver.run(a, ["$x = Get-VM | Where-Object Name -ceq 'nope'", "$y = @($x)",
                       "if ($y.Count -eq 1) { throw 'CountIsOne' }"], "t")
    assert ei.value.error_id == "CountIsOne"
    with pytest.raises(FabricError) as ei:
        driver.vm_state(a, "nope")
    assert ei.value.error_id == "ObjectNotFound" and "no VM named 'nope' on hv-a" in str(ei.value)


def test_locked_guest_stops_with_force(sim: HyperVSimulator, driver: HyperVFabric, hosts: dict[str, Host]) -> None:
    p = _protect(sim, driver, hosts, VM)
    sim.vm("hv-a", VM).locked = True  # Stop-VM without -Force would prompt, and fail non-interactively
    assert driver.prepare_planned_failover(p).state.value == "PreparedForFailover"  # type: ignore[arg-type]
    assert [e.render() for e in sim.log("hv-a") if e.cmdlet == "Stop-VM"] == ["Stop-VM -VM web-01 -Force"]


def test_long_cmdlet_deadline_is_not_retried(sim: HyperVSimulator, hosts: dict[str, Host]) -> None:
    d = HyperVFabric(FabricContext(options={"timeout": 20, "deadlines": {"stop": 1}}))
    try:
        p = _protect(sim, d, hosts, VM)
        sim.delays["Stop-VM"] = 3.0
        sim.clear_log()
        with pytest.raises(FabricError) as ei:
            d.stop_vm(p)  # type: ignore[arg-type]
        assert ei.value.error_id == "OperationTimeout" and not isinstance(ei.value, TransientFabricError)
        assert "may still be running" in str(ei.value)
        deadline = time.monotonic() + 10
        while sim.vm("hv-a", VM).power != "Off" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sim.vm("hv-a", VM).power == "Off"  # the job went on after the deadline, as on Windows
        r = d.stop_vm(p)  # type: ignore[arg-type]
        assert r.changed is False  # the re-run reads the state first and sends nothing
        assert len([e for e in sim.log() if e.cmdlet == "Stop-VM"]) == 1
    finally:
        d.close()


@pytest.mark.parametrize("state", ["RunningCritical", "OffCritical", "SavedCritical", "Hibernated", "FastSaved"])
def test_every_documented_power_state(sim: HyperVSimulator, driver: HyperVFabric, hosts: dict[str, Host],
                                      state: str) -> None:
    p = _protect(sim, driver, hosts, VM)
    sim.vm("hv-a", VM).power = state
    st = driver.vm_state(hosts["hv-a"], VM)
    assert st.power_state == state and st.power == state.removesuffix("Critical")
    assert driver.replication_health(p).state.value == "Replicating"  # type: ignore[arg-type]


def test_certificate_per_host(sim: HyperVSimulator, driver: HyperVFabric, client_key: tuple[object, Path]) -> None:
    hosts = {n: make_host(sim, n, client_key[1], replica_server=ReplicaServer(
        port=443, authentication="certificate", certificate_thumbprint=f"THUMB-{n.upper()}",
        storage_location="D:\\R")) for n in ("hv-a", "hv-b")}
    sim.host("hv-b").server.update(AllowedAuthenticationType="Certificate", CertificateThumbprint="THUMB-HV-B")
    sim.add_vm("hv-a", VM)
    from siterecovery.fabric.base import Placement
    pol = ReplicationPolicy(name="c", authentication="certificate", certificate_thumbprint="POLICY-WIDE")
    driver.enable_replication(Placement(vm=VM, pairing="p", source=hosts["hv-a"], target=hosts["hv-b"], policy=pol))
    # The primary presents its own certificate, not one thumbprint for every host.
    assert any("-CertificateThumbprint THUMB-HV-A" in e.render() for e in sim.log("hv-a")
               if e.cmdlet == "Enable-VMReplication")


def test_excluded_disk_and_delete_replica_removes_vhds(sim: HyperVSimulator, driver: HyperVFabric,
                                                       hosts: dict[str, Host]) -> None:
    from siterecovery.mapping import DiskPlacement
    os_disk, page = "C:\\VMs\\web-01\\os.vhdx", "C:\\VMs\\web-01\\pagefile.vhdx"
    sim.add_vm("hv-a", VM, disks=(os_disk, page))
    p = placement(hosts).model_copy(update={"disks": (
        DiskPlacement(disk="os", source_path=os_disk, target_location=None, classification=None),
        DiskPlacement(disk="page", source_path=page, target_location=None, classification=None,
                      replicate=False))})
    driver.enable_replication(p)
    assert any(e.render().endswith(f"-ExcludedVhdPath {page}") for e in sim.log("hv-a")
               if e.cmdlet == "Enable-VMReplication")
    replica = sim.vm("hv-b", VM)
    assert [d.rsplit("\\", 1)[-1] for d in replica.disks] == ["os.vhdx"]  # the page file is not replicated
    driver.start_initial_replication(p)
    before = set(sim.host("hv-b").files)
    assert set(replica.disks) <= before
    driver.disable_replication(p, delete_replica=True)
    # Remove-VM keeps the VHDs; "delete the replica" removes them too.
    assert not set(replica.disks) & sim.host("hv-b").files
    assert os_disk in sim.host("hv-a").files and sim.vm("hv-a", VM).rel is None
    assert sim.refused == []


def test_broker_accepts_each_nodes_pinned_key(sim: HyperVSimulator, client_key: tuple[object, Path]) -> None:
    """The CAP moves between nodes, each with its own host key: every pinned node key is accepted, any
    other key is still refused."""
    from siterecovery.errors import HostKeyError
    from siterecovery.testing.hyperv_sim import generate_key
    sim.add_host("node-1", replica_server=False)
    sim.add_broker("hvr-broker", ["node-1"])
    sim.add_vm("node-1", VM)
    node1, _ = generate_key()  # the node that does not own the CAP now
    other = f"ssh-ed25519 {node1.get_base64()}"
    base = make_host(sim, "hvr-broker", client_key[1], broker=True, host_key=other)
    d = HyperVFabric(FabricContext(options={"timeout": 20}))
    try:
        with pytest.raises(HostKeyError):
            d.vm_state(base, VM)
        pinned = base.model_copy(update={"node_host_keys": (sim.host_key_line,)})
        assert d.vm_state(pinned, VM).name == VM
        stranger, _ = generate_key()
        bad = base.model_copy(update={"node_host_keys": (f"ssh-ed25519 {stranger.get_base64()}",)})
        with pytest.raises(HostKeyError) as ei:
            d.vm_state(bad, VM)
        assert "none of its 2 pinned node keys" in str(ei.value)
    finally:
        d.close()
