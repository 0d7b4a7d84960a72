"""Wrong states, parameter limits, unknown cmdlets and host keys: the documented error identifier comes
back through the driver's exception, with vm, host, operation and a hint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hvhelpers import VM, make_host, placement
from test_hyperv_ops import protect

from siterecovery.errors import FabricError, HostKeyError, InvalidStateError, NotFoundError
from siterecovery.fabric.base import PointChoice
from siterecovery.fabric.hyperv import SWITCH, Var, cmd, find
from siterecovery.model.protection import NetworkInitial
from siterecovery.testing.hyperv_sim import generate_key

HV = "Microsoft.HyperV.PowerShell.Commands."


def raises(fn, *args, **kw) -> FabricError:
    with pytest.raises(FabricError) as ei:
        fn(*args, **kw)
    err = ei.value
    assert err.vm is not None and err.host and err.operation and err.hint
    return err


def test_wrong_states_answer_documented_ids(sim, driver, hosts) -> None:
    sim.add_vm("hv-a", VM)
    p = placement(hosts)
    back = placement(hosts, src="hv-b", dst="hv-a")
    driver.enable_replication(p)  # primary ReadyForInitialReplication, replica WaitingForInitialReplication
    cases = [
        (driver.suspend, (p,), "InvalidState,SuspendVMReplication", InvalidStateError),
        (driver.resume, (p,), "InvalidState,ResumeVMReplication", InvalidStateError),
        (driver.resynchronize, (p,), "InvalidState,ResumeVMReplication", InvalidStateError),
        (driver.test_failover, (p,), "InvalidState,StartVMFailover", InvalidStateError),
        (driver.prepare_planned_failover, (p,), "InvalidState,StartVMFailover", InvalidStateError),
        (driver.failover, (p,), "InvalidState,StartVMFailover", InvalidStateError),
        (driver.commit_failover, (p,), "InvalidState,CompleteVMFailover", InvalidStateError),
        (driver.reverse_replication, (p,), "InvalidState,SetVMReplication", InvalidStateError),
        (driver.start_vm, (p,), "InvalidState,StartVM", InvalidStateError),  # a replica never starts (guess)
        (driver.start_initial_replication, (back,), "OperationFailed,StartVMInitialReplication", FabricError),
        (driver.commit_failover, (back,), "OperationFailed,CompleteVMFailover", FabricError),
        (driver.continue_extended_replication, (back,), "ActionOnlyApplicableOnReplica,ResumeVMReplication",
         FabricError),
    ]
    for fn, args, fqid, cls in cases:
        err = raises(fn, *args)
        short, cmdlet = fqid.split(",")
        assert err.error_id == f"{short},{HV}{cmdlet}", fn.__name__
        assert isinstance(err, cls), fn.__name__
    # nothing changed on the way: in particular the refused prepare did not shut the VM down
    assert sim.vm("hv-a", VM).power == "Running" and sim.vm("hv-a", VM).state == "ReadyForInitialReplication"


def test_wrong_states_when_replicating(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    err = raises(driver.enable_replication, placement(hosts, dst="hv-c"))
    assert err.error_id == f"VMReplication_AlreadyEnabled,{HV}EnableVMReplication"
    err = raises(driver.test_failover, placement(hosts, src="hv-b", dst="hv-a"))  # -AsTest on the primary
    assert err.error_id == f"VMFailover_OnlyValidParameterOnPrimary,{HV}StartVMFailover"
    driver.suspend(p)
    err = raises(driver.start_initial_replication, p)
    assert err.error_id == f"InvalidState,{HV}StartVMInitialReplication"
    driver.resume(p)
    driver.test_failover(p)
    err = raises(driver.failover, p)  # guess: no failover while a test failover runs
    assert isinstance(err, InvalidStateError)
    sim.clear_log()
    err = raises(driver.failover, p, PointChoice(kind="point_in_time", at=datetime(2000, 1, 1, tzinfo=UTC)))
    assert isinstance(err, NotFoundError) and err.error_id == "NoRecoveryPoint"
    assert not [e for e in sim.log() if e.cmdlet == "Start-VMFailover"]


def test_unknown_vm_is_not_found(sim, driver, hosts) -> None:
    sim.add_vm("hv-a", "Web-01")  # differs only by case: exact resolution must not take it
    err = raises(driver.enable_replication, placement(hosts))
    assert isinstance(err, NotFoundError) and err.error_id == "ObjectNotFound"
    sim.add_vm("hv-a", VM)
    sim.add_vm("hv-a", VM)
    err = raises(driver.enable_replication, placement(hosts))
    assert err.error_id == "AmbiguousName"


def test_parameter_limits(sim, driver, hosts) -> None:
    sim.add_vm("hv-a", VM)
    a = hosts["hv-a"]
    err = raises(driver.enable_replication, placement(hosts, copy_frequency_seconds=60))
    assert err.error_id == f"InvalidArgument_ReplicationFrequencyNotValid,{HV}EnableVMReplication"

    def enable(**params) -> FabricError:
        with pytest.raises(FabricError) as ei:
            driver.run(a, [*find("vm", VM), cmd("Enable-VMReplication", VM=Var("vm"), **params)], "t", VM)
        return ei.value

    base = {"ReplicaServerName": "hv-b", "ReplicaServerPort": 80, "AuthenticationType": "Kerberos"}
    assert enable(**base, RecoveryHistory=25).error_id.startswith("ParameterArgumentValidationError,")
    assert enable(**base, VSSSnapshotFrequencyHour=13, RecoveryHistory=4).error_id.startswith(
        "ParameterArgumentValidationError,")
    assert enable(**base, VSSSnapshotFrequencyHour=2).error_id.startswith(
        "VMReplication_AppConsistentWithoutRecoveryHistory,")
    assert enable(**{**base, "ReplicaServerPort": 70000}).error_id.startswith("ParameterArgumentValidationError,")
    assert enable(**{**base, "ReplicaServerName": "10.0.0.2"}).error_id.startswith("InvalidParameter_InvalidUri,")
    assert enable(**{**base, "AuthenticationType": "Certificate"}).error_id.startswith("ParameterNotProvided,")
    assert enable(**base, CertificateThumbprint="AB12").error_id.startswith("ParameterNotRequired,")
    # start times: not in the past, at most 7 days ahead
    for when, fqid in ((datetime.now(UTC) - timedelta(hours=1), "StartTimeOccursInPast"),
                       (datetime.now(UTC) + timedelta(days=8), "StartTimeOccursTooMuchInFuture")):
        sim.host("hv-a").vms.clear()
        sim.host("hv-b").vms.clear()
        sim.add_vm("hv-a", VM)
        p = placement(hosts, initial_replication=NetworkInitial(start_at=when))
        driver.enable_replication(p)
        assert raises(driver.start_initial_replication, p).error_id == f"{fqid},{HV}StartVMInitialReplication"


def test_extended_frequency_limits(sim, driver, hosts) -> None:
    p = protect(sim, driver, hosts)
    err = raises(driver.enable_extended_replication, p, hosts["hv-c"], 30)
    assert err.error_id == f"VMReplication_InvalidExtendedReplicationFrequency,{HV}EnableVMReplication"
    p900 = protect(sim, driver, hosts, vm="db-01", copy_frequency_seconds=900)
    err = raises(driver.enable_extended_replication, p900, hosts["hv-c"], 300)  # below the primary's 900
    assert err.error_id == f"VMReplication_InvalidExtendedReplicationFrequency,{HV}EnableVMReplication"


def test_unknown_cmdlets_and_parameters_are_refused(sim, driver, hosts) -> None:
    sim.add_vm("hv-a", VM)
    a = hosts["hv-a"]
    with pytest.raises(FabricError) as ei:
        driver.run(a, ["Get-VMFrobnicator"], "t", VM)
    assert ei.value.error_id == "CommandNotFoundException"
    with pytest.raises(FabricError) as ei:
        driver.run(a, [*find("vm", VM), cmd("Start-VMFailover", VM=Var("vm"), Prepare=SWITCH, Bogus=SWITCH)], "t")
    assert ei.value.error_id == f"NamedParameterNotFound,{HV}StartVMFailover"
    with pytest.raises(FabricError) as ei:  # Start-VMFailover prompts without -Confirm:$false (guess: id)
        driver.run(a, [*find("vm", VM), cmd("Complete-VMFailover", VM=Var("vm"))], "t")
    assert ei.value.error_id == f"NonInteractivePrompt,{HV}CompleteVMFailover"


def test_raw_cmdlet_rules(sim, driver, hosts) -> None:
    """Reference rows the driver never triggers by itself, sent as raw lines of the grammar."""
    protect(sim, driver, hosts)
    sim.add_checkpoint("hv-b", VM)
    a, b = hosts["hv-a"], hosts["hv-b"]

    def run(host, *lines: str) -> str:
        with pytest.raises(FabricError) as ei:
            driver.run(host, [*find("vm", VM), *lines], "t", VM)
        return ei.value.error_id or ""

    assert run(b, "$snap = Get-VMSnapshot -VM $vm -SnapshotType Standard | Select-Object -Last 1",
               "Start-VMFailover -VMRecoverySnapshot $snap -Confirm:$false") == \
        f"VMFailover_InvalidSnapshot,{HV}StartVMFailover"
    assert run(b, "$snap = Get-VMSnapshot -VM $vm -SnapshotType Replica | Select-Object -Last 1",
               "Start-VMFailover -VM $vm -VMRecoverySnapshot $snap -Confirm:$false") == \
        f"AmbiguousParameterSet,{HV}StartVMFailover"
    assert run(a, "Start-VMFailover -VM $vm -Confirm:$false") == f"ParameterNotProvided,{HV}StartVMFailover"
    assert run(a, "Start-VMFailover -VM $vm -Prepare -Confirm:$false") == f"InvalidState,{HV}StartVMFailover"
    assert run(b, "Stop-VMFailover -VM $vm") == f"InvalidState,{HV}StopVMFailover"
    assert run(b, "Stop-VMReplication -VM $vm") == f"InvalidState,{HV}StopVMReplication"
    assert run(b, "Import-VMInitialReplication -VM $vm -Path 'X:\\x'") == f"InvalidState,{HV}ImportVMInitialReplication"
    assert run(a, "Set-VMReplication -VM $vm -Reverse") == f"OperationFailed,{HV}SetVMReplication"
    assert run(a, "Set-VMReplication -VM $vm -ReplicationFrequencySec 45") == \
        f"InvalidArgument_ReplicationFrequencyNotValid,{HV}SetVMReplication"
    assert run(b, "Resume-VMReplication -VM $vm -Continue") == f"InvalidState,{HV}ResumeVMReplication"
    assert run(a, "Get-VMNetworkAdapter -VM $vm | Connect-VMNetworkAdapter -SwitchName 'nope'") == \
        f"InvalidParameter,{HV}ConnectVMNetworkAdapter"
    assert run(b, "Get-VMNetworkAdapter -VM $vm | Set-VMNetworkAdapterFailoverConfiguration -IPv4Address '10.0.0.1'") \
        == f"InvalidParameter,{HV}SetVMNetworkAdapterFailoverConfiguration"
    assert run(a, "Start-VM -Name 'no-such-vm'") == f"InvalidParameter,{HV}StartVM"
    assert run(a, "Start-VM -VM $nothing") == "SimulatorParseError"
    driver.run(a, [*find("vm", VM), "Remove-VMReplication -VM $vm"], "t")
    assert run(a, "Remove-VMReplication -VM $vm") == f"InvalidState,{HV}RemoveVMReplication"
    assert run(b, "Enable-VMReplication -VM $vm -AsReplica -AllowedPrimaryServer 'x'") == \
        f"VMReplication_AlreadyEnabled,{HV}EnableVMReplication"


def test_grammar_is_strict(sim, driver, hosts) -> None:
    sim.add_vm("hv-a", VM)
    a = hosts["hv-a"]
    for line in ("Start-VM -VM $(Get-VM)", "Start-VM; Stop-VM", "Get-VM | % { $_ }", 'Start-VM -Name "x"',
                 "Start-VM -Name `x"):
        with pytest.raises(FabricError) as ei:
            driver.run(a, [line], "t")
        assert ei.value.error_id == "SimulatorParseError", line
    assert sim.vm("hv-a", VM).power == "Running"


def test_host_keys(sim, driver, hosts, client_key, tmp_path) -> None:
    sim.add_vm("hv-a", VM)
    good = hosts["hv-a"]
    assert driver.vm_state(good, VM).name == VM  # pinned key accepted
    unknown = good.model_copy(update={"host_key": None, "known_hosts": str(tmp_path / "empty")})
    (tmp_path / "empty").write_text("")
    with pytest.raises(HostKeyError) as ei:
        driver.vm_state(unknown, VM)
    assert "unknown" in str(ei.value) and "pin" in (ei.value.hint or "")
    other, _ = generate_key()
    changed = good.model_copy(update={"host_key": f"ssh-ed25519 {other.get_base64()}"})
    with pytest.raises(HostKeyError) as ei:
        driver.vm_state(changed, VM)
    assert "CHANGED" in str(ei.value) and sim.host_key.fingerprint in str(ei.value)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sim.port} {sim.host_key_line}\n")
    via_file = good.model_copy(update={"host_key": None, "known_hosts": str(kh)})
    assert driver.vm_state(via_file, VM).name == VM
    kh.write_text(f"[127.0.0.1]:{sim.port} ssh-ed25519 {other.get_base64()}\n")
    fresh = type(driver)(driver.context)
    try:
        with pytest.raises(HostKeyError):
            fresh.vm_state(via_file.model_copy(update={"name": "hv-a2"}), VM)
    finally:
        fresh.close()


def test_credentials_from_env_and_secret_resolver(sim, hosts, client_key, monkeypatch) -> None:
    from siterecovery.fabric import FabricContext
    from siterecovery.fabric.hyperv import HyperVFabric
    from siterecovery.model import Credential
    sim.add_vm("hv-a", VM)
    text = client_key[1].read_text()
    monkeypatch.setenv("HV_KEY", text)
    h = make_host(sim, "hv-a", client_key[1], credential=Credential(env="HV_KEY"))
    d = HyperVFabric(FabricContext(secrets=lambda cred: text))
    try:
        assert d.vm_state(h, VM).name == VM
        h2 = make_host(sim, "hv-a", client_key[1], credential=Credential(secret_block="hv-key"))
        assert d.vm_state(h2, VM).name == VM
        bad, _ = generate_key()
        other = make_host(sim, "hv-a", client_key[1])
        other_key = client_key[1].parent / "bad"
        other_key.write_text(_)
        other = other.model_copy(update={"credential": Credential(key_file=str(other_key))})
        with pytest.raises(FabricError) as ei:
            d.vm_state(other, VM)
        assert ei.value.error_id == "AuthenticationFailed" and _ not in str(ei.value)
    finally:
        d.close()
