"""The protection flows on the memory fabric under a Prefect test server: idempotent enable, per-host
transfer limits, one event per VM per RPO breach (checked at the server's events API too), resync
windows with an injected clock, and disable honouring the policy's delete_replica_on_disable."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alerts import observe_alerts, server_events

pytest.importorskip("prefect")

from siterecovery.fabric import FabricContext  # noqa: E402
from siterecovery.fabric.memory import MemoryFabric  # noqa: E402
from siterecovery.placement import pairing_placements  # noqa: E402
from siterecovery.project import load_project  # noqa: E402
from siterecovery.protection import EVENT_BREACHED, EVENT_RECOVERED, open_fabric  # noqa: E402
from siterecovery.testing.projects import copy_project  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLANS = str(ROOT / "plans")
VMS = ["sql-01", "sql-02", "app-01", "app-02", "web-01", "web-02", "lb-01", "jump-01"]


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> Path:
    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / "state"))
    # One project has one estate: each test's estate belongs to its own copy of the worked example.
    monkeypatch.setattr(sys.modules[__name__], "PLANS", str(copy_project(ROOT / "plans", tmp_path / "checkout")))
    return tmp_path / "state"


def fabric(state: Path) -> MemoryFabric:
    f = open_fabric("memory", state)
    assert isinstance(f, MemoryFabric)
    return f


def placements(project: str | None = None) -> dict[str, Any]:
    proj = load_project(Path(project or PLANS))
    return pairing_placements(proj, proj.protection.pairing("gold"))


def project_copy(tmp_path: Path, edits: dict[str, list[tuple[str, str]]]) -> str:
    """The test's project with text edits per file, for policy and host variants: edited in place, as an
    operator edits the project whose estate this is (another copy would be another project)."""
    dst = Path(PLANS)
    for name, pairs in edits.items():
        text = (dst / name).read_text()
        for old, new in pairs:
            assert old in text, old
            text = text.replace(old, new, 1)
        (dst / name).write_text(text)
    return str(dst)


def age(f: MemoryFabric, vm: str, seconds: float) -> None:
    """Pretend the VM last replicated `seconds` ago (as if cycles had stopped)."""
    with f._state() as st:
        st["vms"][vm]["last_replication"] = (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


def protect(**kw: Any) -> Any:
    from flows.protection import enable_protection

    return enable_protection(pairing="gold", project=kw.pop("project", PLANS), fabric="memory", **kw)


# ---- enable-protection --------------------------------------------------------------------------

def test_enable_protection_then_again_changes_nothing(state: Path) -> None:
    first = protect()
    assert [r.vm for r in first] == VMS
    assert {r.outcome for r in first} == {"protected"} and all(r.ready for r in first)
    assert all(s.changed for r in first for s in r.steps)
    assert [s.step for s in first[0].steps] == ["enable_replication", "start_initial_replication", "apply_network"]
    f = fabric(state)
    estate = {vm: f.vm_state(vm) for vm in VMS}
    assert all(v["state"] == "Replicating" and v["network_applied"] for v in estate.values())

    second = protect()
    assert {r.outcome for r in second} == {"already protected"}
    assert not any(s.changed for r in second for s in r.steps)
    assert {vm: f.vm_state(vm) for vm in VMS} == estate


def test_interrupted_enable_can_be_rerun(state: Path) -> None:
    f = fabric(state)
    f.inject("start_initial_replication", "web-01", times=1)
    st = protect(return_state=True)
    assert st.is_failed()
    assert "web-01" in str(st.result(raise_on_failure=False))
    assert f.vm_state("web-01")["state"] == "ReadyForInitialReplication"
    assert f.vm_state("sql-01")["state"] == "Replicating"

    again = {r.vm: r for r in protect()}
    assert again["web-01"].outcome == "protected"
    assert [s.changed for s in again["web-01"].steps] == [False, True, True]  # enabled before, copied now
    assert {r.outcome for vm, r in again.items() if vm != "web-01"} == {"already protected"}


def test_scheduled_initial_replication_waits_for_replicate(state: Path, tmp_path: Path) -> None:
    later = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    project = project_copy(tmp_path, {"protection.yaml": [
        ("initial_replication: {method: network}", f"initial_replication: {{method: network, start_at: '{later}'}}")]})
    reports = protect(project=project, vms=["web-01"])
    assert reports[0].outcome == "pending initial replication" and "scheduled for" in reports[0].note
    assert fabric(state).vm_state("web-01")["state"] == "ReadyForInitialReplication"

    from flows.protection import replicate

    cycle = replicate(pairing="gold", project=project, vms=["web-01"], fabric="memory")
    assert cycle[0].action == "skipped"  # not due yet


# ---- replicate ----------------------------------------------------------------------------------

def test_replicate_respects_max_active_transfers_per_host(state: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.protection as fp

    project = project_copy(tmp_path, {"topology.yaml": [
        ("  - name: hv-ny-01\n    site: new-york\n", "  - name: hv-ny-01\n    site: new-york\n    max_active_transfers: 1\n"),
        ("  - name: hv-ny-02\n    site: new-york\n", "  - name: hv-ny-02\n    site: new-york\n    max_active_transfers: 2\n"),
    ]})
    protect(project=project)

    def slow_fabric(kind: str, st: Any = None) -> MemoryFabric:
        return MemoryFabric(FabricContext(state_dir=state, options={
            "state_file": str(state / "memory-fabric.json"), "latency": {"replicate": 0.4}}))

    monkeypatch.setattr(fp, "get_fabric", slow_fabric)
    before = {vm: fabric(state).vm_state(vm)["cycles_ok"] for vm in VMS}
    reports = {r.vm: r for r in fp.replicate(pairing="gold", project=project, fabric="memory")}
    assert {r.action for r in reports.values()} == {"cycle"}
    assert all(fabric(state).vm_state(vm)["cycles_ok"] == before[vm] + 1 for vm in VMS)

    pl = placements(project)

    def max_overlap(host: str) -> int:
        spans = [(r.started_at, r.finished_at) for vm, r in reports.items() if pl[vm].source.name == host]
        return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)

    assert max_overlap("hv-ny-01") == 1
    assert max_overlap("hv-ny-02") <= 2
    # The limits exist on the server with the hosts' values.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("replication-host-hv-ny-01").limit == 1
        assert client.read_global_concurrency_limit_by_name("replication-host-hv-ny-02").limit == 2


def test_replicate_skips_vms_needing_resync_and_counts_failed_cycles(state: Path) -> None:
    from flows.protection import replicate, resynchronize

    few = ["sql-01", "app-01", "web-01"]
    protect(vms=few)
    f = fabric(state)
    pl = placements()
    f.mark_resync_required(pl["sql-01"])
    for _ in range(3):
        f.inject("replicate", "app-01", times=1)
        st = replicate(pairing="gold", project=PLANS, vms=few, fabric="memory", return_state=True)
        assert st.is_failed()
    reports = {r.vm: r for r in replicate(pairing="gold", project=PLANS, vms=["sql-01", "web-01"], fabric="memory")}
    assert reports["sql-01"].action == "skipped" and "resync required" in reports["sql-01"].note
    assert reports["web-01"].action == "cycle"

    res = resynchronize(pairing="gold", project=PLANS, vms=few, fabric="memory", on_demand=True)
    assert res.status == "resynchronized"
    # named VMs are resynchronized on demand even when not marked
    assert res.candidates == {"sql-01": res.candidates["sql-01"], "app-01": "3 consecutive failed cycles",
                              "web-01": "requested"}
    assert "resync required" in res.candidates["sql-01"]
    assert not f.vm_state("sql-01")["resync_required"]
    # a resync resets the failed-cycle count: nothing left to do
    assert resynchronize(pairing="gold", project=PLANS, fabric="memory").status == "nothing to do"


# ---- replication-health and its events ----------------------------------------------------------

def test_rpo_breach_emits_exactly_one_event_per_vm_per_breach(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.protection as fp

    sent = observe_alerts(monkeypatch)

    def health() -> dict[str, Any]:
        return {r.vm: r for r in fp.replication_health(pairing="gold", project=PLANS, fabric="memory")}

    protect()
    f = fabric(state)
    pl = placements()
    assert health()["sql-01"].health == "Normal" and sent == []

    age(f, "sql-01", 3600)                    # RPO 1 h > 900 s threshold
    f.mark_resync_required(pl["web-01"])      # health Critical
    for _ in range(3):
        rows = health()
    assert rows["sql-01"].current_rpo_seconds and rows["sql-01"].current_rpo_seconds > 900
    assert rows["web-01"].health == "Critical"
    assert sorted((e, vm, r) for e, vm, r, _ in sent) == [
        (EVENT_BREACHED, "sql-01", ("rpo",)), (EVENT_BREACHED, "web-01", ("critical",))]

    # Repair: a cycle for sql-01, a resync for web-01; each breach closes with one event.
    fp.replicate(pairing="gold", project=PLANS, vms=["sql-01"], fabric="memory")
    fp.resynchronize(pairing="gold", project=PLANS, vms=["web-01"], fabric="memory", on_demand=True)
    health()
    health()
    assert sorted((e, vm) for e, vm, _, _ in sent[2:]) == [(EVENT_RECOVERED, "sql-01"), (EVENT_RECOVERED, "web-01")]

    age(f, "sql-01", 7200)                    # a second breach of the same VM alerts again
    health()
    health()
    assert [(e, vm) for e, vm, _, _ in sent[4:]] == [(EVENT_BREACHED, "sql-01")]

    # The same events reached the Prefect server (the events API), with our resource ids and payload.
    got = server_events({s[3] for s in sent}, timeout=30)
    assert sorted((ev["event"], ev["resource"]["prefect.resource.id"]) for ev in got) == sorted(
        [(EVENT_BREACHED, "siterecovery.vm.sql-01")] * 2 + [(EVENT_BREACHED, "siterecovery.vm.web-01")]
        + [(EVENT_RECOVERED, "siterecovery.vm.sql-01"), (EVENT_RECOVERED, "siterecovery.vm.web-01")])
    first = next(ev for ev in got if ev["event"] == EVENT_BREACHED and ev["resource"]["prefect.resource.id"].endswith("web-01"))
    assert first["resource"]["siterecovery.pairing"] == "gold"
    assert first["payload"]["reasons"] == ["critical"] and first["payload"]["rpo_threshold_seconds"] == 900
    assert {r["prefect.resource.role"] for r in first["related"]} >= {"pairing", "primary-host", "replica-host"}


def test_health_artifact_is_a_table(state: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    import flows.protection as fp

    protect(vms=["sql-01"])
    fp.replication_health(pairing="gold", project=PLANS, vms=["sql-01"], fabric="memory")
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["replication-health-gold"])))
    assert arts and arts[-1].type == "table"
    assert "sql-01" in str(arts[-1].data)


# ---- resynchronize and its window ---------------------------------------------------------------

class FakeClock:
    """Local time in Chicago, advanced only by sleep()."""

    def __init__(self, start: datetime, f: MemoryFabric, vm: str) -> None:
        self.t, self.f, self.vm = start, f, vm
        self.slept: list[float] = []
        self.marked_while_waiting: list[bool] = []

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.marked_while_waiting.append(bool(self.f.vm_state(self.vm)["resync_required"]))
        self.slept.append(seconds)
        self.t += timedelta(seconds=seconds)


CHI = timezone(timedelta(hours=-6))


@pytest.fixture
def marked(state: Path) -> MemoryFabric:
    protect(vms=["sql-01", "web-01"])
    f = fabric(state)
    f.mark_resync_required(placements()["sql-01"])
    return f


def run_resync(monkeypatch: pytest.MonkeyPatch, clock: FakeClock, **kw: Any) -> Any:
    import siterecovery.protection as core
    from flows.protection import resynchronize

    monkeypatch.setattr(core, "CLOCK", clock)
    return resynchronize(pairing="gold", project=PLANS, vms=["sql-01", "web-01"], fabric="memory", **kw)


def test_resync_outside_window_waits_for_it(marked: MemoryFabric, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(datetime(2026, 3, 2, 14, 0, tzinfo=CHI), marked, "sql-01")  # window is 22:00-05:00
    res = run_resync(monkeypatch, clock)
    assert res.status == "resynchronized" and res.window == ("22:00", "05:00")
    assert clock.t == datetime(2026, 3, 2, 22, 0, tzinfo=CHI)
    assert res.waited_seconds == 8 * 3600
    assert clock.slept and all(clock.marked_while_waiting)  # nothing was resynchronized while waiting
    assert [s.vm for s in res.steps] == ["sql-01"]  # web-01 was not marked
    assert not marked.vm_state("sql-01")["resync_required"]


def test_resync_inside_window_runs_at_once(marked: MemoryFabric, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(datetime(2026, 3, 2, 23, 30, tzinfo=CHI), marked, "sql-01")
    res = run_resync(monkeypatch, clock)
    assert res.status == "resynchronized" and res.waited_seconds == 0 and clock.slept == []
    assert not marked.vm_state("sql-01")["resync_required"]


def test_resync_outside_window_can_defer_or_run_on_demand(marked: MemoryFabric,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(datetime(2026, 3, 2, 14, 0, tzinfo=CHI), marked, "sql-01")
    res = run_resync(monkeypatch, clock, outside_window="defer")
    assert res.status == "deferred" and res.next_window == datetime(2026, 3, 2, 22, 0, tzinfo=CHI)
    assert marked.vm_state("sql-01")["resync_required"] and clock.slept == []
    res = run_resync(monkeypatch, clock, on_demand=True)
    assert res.status == "resynchronized" and clock.slept == []
    assert not marked.vm_state("sql-01")["resync_required"]


# ---- disable-protection -------------------------------------------------------------------------

def test_disable_keeps_replica_unless_policy_deletes(state: Path, tmp_path: Path) -> None:
    from flows.protection import disable_protection

    protect(vms=["sql-01", "web-01"])
    kept = disable_protection(pairing="gold", project=PLANS, vms=["sql-01"], fabric="memory")
    assert [(r.vm, r.changed, r.delete_replica) for r in kept] == [("sql-01", True, False)]
    assert "deleted" not in kept[0].message
    f = fabric(state)
    assert any(c[1] == "disable_replication" and c[2] == "sql-01" for c in f.all_calls())
    again = disable_protection(pairing="gold", project=PLANS, vms=["sql-01"], fabric="memory")
    assert [(r.changed, r.delete_replica) for r in again] == [(False, False)]

    project = project_copy(tmp_path, {"protection.yaml": [
        ("    rpo_threshold_seconds: 900\n", "    rpo_threshold_seconds: 900\n    delete_replica_on_disable: true\n")]})
    deleted = disable_protection(pairing="gold", project=project, vms=["web-01"], fabric="memory")
    assert [(r.vm, r.changed, r.delete_replica) for r in deleted] == [("web-01", True, True)]
    assert "replica deleted" in deleted[0].message
    from flows.protection import replication_health

    rows = {r.vm: r for r in replication_health(pairing="gold", project=PLANS, vms=["sql-01", "web-01"],
                                                fabric="memory")}
    assert rows["sql-01"].state == rows["web-01"].state == "Disabled"


def test_disable_closes_an_open_breach(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.protection as fp

    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(fp, "emit_alert", lambda a: sent.append((a.event, a.vm)))
    protect(vms=["lb-01"])
    age(fabric(state), "lb-01", 5000)
    fp.replication_health(pairing="gold", project=PLANS, vms=["lb-01"], fabric="memory")
    fp.disable_protection(pairing="gold", project=PLANS, vms=["lb-01"], fabric="memory")
    assert sent == [(EVENT_BREACHED, "lb-01"), (EVENT_RECOVERED, "lb-01")]


# ---- suspend-replication and resume-replication ------------------------------------------------

def test_suspend_stops_cycles_until_resume_from_the_cli(state: Path) -> None:
    from typer.testing import CliRunner

    from flows.protection import replicate
    from siterecovery.cli import _load_commands, app

    _load_commands()
    few = ["sql-01", "web-01"]
    protect(vms=few)
    f = fabric(state)
    runner = CliRunner()
    args = ["--project", PLANS, "--fabric", "memory"]
    res = runner.invoke(app, ["replication", "suspend", "gold", "sql-01", *args])
    assert res.exit_code == 0, res.output
    assert "sql-01" in res.output and "replication suspended" in res.output and "web-01" not in res.output
    assert f.vm_state("sql-01")["state"] == "Suspended" and f.vm_state("web-01")["state"] == "Replicating"
    # Again: idempotent, reports no change.
    res = runner.invoke(app, ["replication", "suspend", "gold", "sql-01", *args])
    assert res.exit_code == 0 and "already suspended" in res.output

    before = len(f.vm_state("sql-01")["points"])
    reports = {r.vm: r for r in replicate(pairing="gold", project=PLANS, vms=few, fabric="memory")}
    assert reports["sql-01"].action == "skipped" and "Suspended" in reports["sql-01"].note
    assert reports["web-01"].action == "cycle"
    assert len(f.vm_state("sql-01")["points"]) == before
    assert [c for c in f.all_calls() if c[1] == "replicate" and c[2] == "sql-01"] == []

    res = runner.invoke(app, ["replication", "resume", "gold", *args])  # every VM of the pairing
    assert res.exit_code == 1 and "resume-replication failed" in res.output  # the unprotected VMs
    assert f.vm_state("sql-01")["state"] == "Replicating"
    res = runner.invoke(app, ["replication", "resume", "gold", *few, *args])
    assert res.exit_code == 0 and "already replicating" in res.output
    reports = {r.vm: r for r in replicate(pairing="gold", project=PLANS, vms=few, fabric="memory")}
    assert reports["sql-01"].action == "cycle" and len(f.vm_state("sql-01")["points"]) == before + 1
