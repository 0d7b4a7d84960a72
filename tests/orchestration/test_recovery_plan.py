"""The recovery-plan flow on the memory fabric, under the Prefect test harness: every failover type and
direction, boot order, cleanup after failures, resuming a half-failed plan, limits, scripts, the guard."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flows.recovery_plan import PlanFailed, recovery_plan
from siterecovery.compile import RunOptions
from siterecovery.model import Direction, FailoverType
from siterecovery.request import ConfirmationRequired

pytestmark = pytest.mark.usefixtures("prefect_harness")


def report_of(summary: dict[str, Any]) -> dict[str, Any]:
    return json.loads(Path(summary["report"]).with_suffix(".json").read_text())


def failed(exc: pytest.ExceptionInfo[PlanFailed]) -> dict[str, Any]:
    return exc.value.summary  # type: ignore[attr-defined,no-any-return]


def test_test_failover_starts_in_order_then_cleans_up(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    summary = recovery_plan(plan="app", project=str(e.root))
    assert summary["status"] == "succeeded" and summary["steps"] == {"completed": 15}
    for vm in ("db-1", "db-2", "web-1", "web-2", "web-3"):
        st = e.vm(vm)
        assert not st["test_active"] and st["state"] == "Replicating"
    # boot order: db-2 starts after db-1 is up; the web group only after the whole db group
    start = {c[2]: c[0] for c in e.calls("start_vm")}
    assert start["db-2"] > start["db-1"]
    assert min(c[0] for c in e.calls("test_failover") if c[2].startswith("web")) > start["db-2"]
    assert len(e.calls("cleanup_test_failover")) == 5
    rep = report_of(summary)
    assert rep["plan_version"] == "7" and rep["failover_type"] == "test"
    html = Path(summary["report"]).read_text()
    assert "Timeline" in html and "test failover db-2" in html and Path(summary["report"]).name.startswith("app-test-")


def test_planned_forward_reverse_then_failback(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    fwd = recovery_plan(plan="app", project=str(e.root), failover_type=FailoverType.planned, confirm="app",
                        options=RunOptions(reverse_replication=True))
    assert fwd["status"] == "succeeded"
    # Every source shipped its last changes after shutdown: nothing lost, whatever the final point's age.
    assert fwd["data_loss"] == "none (final sync after shutdown)" and fwd["achieved_rpo_seconds"] == 0.0
    assert fwd["point_age_seconds"] is not None and fwd["point_age_seconds"] >= 0
    assert "<td>Data loss</td><td>none (final sync after shutdown)</td>" in Path(fwd["report"]).read_text()
    st = e.vm("web-1")
    assert st["state"] == "Replicating" and st["primary"].startswith("dst-") and st["replica"].startswith("src-")
    # planned: every source shut down (web group first: reverse group order) before any failover
    prep = e.calls("prepare_planned_failover")
    assert len(prep) == 5 and max(c[0] for c in prep) < min(c[0] for c in e.calls("failover"))
    assert max(c[0] for c in prep if c[2].startswith("web")) < min(c[0] for c in prep if c[2].startswith("db"))
    back = recovery_plan(plan="app", project=str(e.root), failover_type=FailoverType.planned, confirm="app",
                         direction=Direction.failback, options=RunOptions(reverse_replication=True))
    assert back["status"] == "succeeded" and back["direction"] == "failback"
    st = e.vm("web-1")
    assert st["state"] == "Replicating" and st["primary"].startswith("src-") and st["replica"].startswith("dst-")


def test_unplanned_uses_the_chosen_point_and_reports_its_age(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    summary = recovery_plan(plan="app", project=str(e.root), failover_type=FailoverType.unplanned, confirm="app",
                            recovery_point="latest_app_consistent")
    assert summary["status"] == "succeeded"
    rep = report_of(summary)
    used = {s["vm"]: s["point_id"] for s in rep["steps"] if s["operation"] == "failover"}
    # seeded: three points 5 min apart, the oldest app-consistent -> each VM's own @1, about 10 min old
    assert used == {vm: f"{vm}@1" for vm in ("db-1", "db-2", "web-1", "web-2", "web-3")}
    assert 590 < summary["achieved_rpo_seconds"] < 700
    assert e.vm("db-1")["state"] == "FailedOver"
    # unplanned shuts the sources down first (best effort)
    assert len(e.calls("stop_vm")) == 5


def test_point_in_time_picks_the_newest_point_before_it(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    at = datetime.now(UTC) - timedelta(minutes=3)
    summary = recovery_plan(plan="app", project=str(e.root), failover_type=FailoverType.unplanned, confirm="app",
                            recovery_point="point_in_time", point_in_time=at,
                            options=RunOptions(commit=False, shut_down_source=False))
    rep = report_of(summary)
    assert {s["point_id"] for s in rep["steps"] if s["operation"] == "failover"} == {
        f"{vm}@2" for vm in ("db-1", "db-2", "web-1", "web-2", "web-3")}
    assert e.vm("db-1")["state"] == "FailedOverWaitingCompletion"  # not committed: can still be cancelled


def test_confirm_guard_refuses_before_anything_runs(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    for confirm in ("", "web-only", "APP"):
        with pytest.raises(ConfirmationRequired, match="confirm='app'"):
            recovery_plan(plan="app", project=str(e.root), failover_type=FailoverType.planned, confirm=confirm)
    assert e.calls() == []


def test_failure_in_group_two_then_rerun_resumes(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    e.fabric.inject("failover", "web-2", times=1)
    args = {"plan": "app", "project": str(e.root), "failover_type": FailoverType.planned, "confirm": "app"}
    with pytest.raises(PlanFailed) as exc:
        recovery_plan(**args)
    first = failed(exc)
    assert first["status"] == "failed" and any("failover web-2" in f for f in first["failures"])
    assert e.calls("commit_failover") == []  # stop policy: nothing after the failed batch
    rerun = recovery_plan(**args)
    assert rerun["status"] == "succeeded" and rerun["resumed"] and rerun["intent"] == first["intent"]
    assert rerun["steps"]["cached"] > 0
    # nothing that succeeded ran twice; the step that failed ran again, and what never ran, ran
    for vm in ("db-1", "db-2", "web-1", "web-3"):
        for op in ("prepare_planned_failover", "failover", "apply_network", "start_vm", "commit_failover"):
            assert len(e.calls(op, vm)) == 1, (op, vm)
    assert len(e.calls("failover", "web-2")) == 2 and len(e.calls("start_vm", "web-2")) == 1
    # the intent is closed now: the same parameters next time are a new, real run (not cached)
    before = len(e.calls())
    again = recovery_plan(**args)
    assert again["intent"] != first["intent"] and not again["resumed"] and "cached" not in again["steps"]
    assert len(e.calls()) - before == 25


def test_transient_errors_are_retried_fatal_ones_not(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    e.fabric.inject("test_failover", "web-1", times=1, transient=True)
    summary = recovery_plan(plan="app", project=str(e.root))
    assert summary["status"] == "succeeded"
    assert len(e.calls("test_failover", "web-1")) == 2


def test_test_failover_is_cleaned_up_after_a_failure(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    e.fabric.inject("start_vm", "web-3", times=1)
    with pytest.raises(PlanFailed) as exc:
        recovery_plan(plan="app", project=str(e.root))
    assert failed(exc)["status"] == "failed"
    for vm in ("db-1", "db-2", "web-1", "web-2", "web-3"):
        assert not e.vm(vm)["test_active"], vm
    assert len(e.calls("start_vm", "web-3")) == 1  # fatal: not retried
    # a drill never resumes: the next one starts afresh and runs everything again
    summary = recovery_plan(plan="app", project=str(e.root))
    assert summary["status"] == "succeeded" and not summary["resumed"]
    assert len(e.calls("test_failover", "db-1")) == 2


def test_continue_policy_goes_on_and_reports(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    e.fabric.inject("failover", "db-1", times=1)
    with pytest.raises(PlanFailed) as exc:
        recovery_plan(plan="app", project=str(e.root), failover_type=FailoverType.planned, confirm="app",
                      failure_policy="continue")
    s = failed(exc)
    assert s["status"] == "failed"
    assert any("db-2" in f and "not run" in f for f in s["failures"])  # boots after db-1: not started
    assert e.vm("web-1")["state"] == "FailedOver"  # the web group went ahead and was committed
    assert e.calls("commit_failover", "db-1") == [] and e.calls("commit_failover", "db-2") == []


def test_host_limit_is_honoured(estate) -> None:  # type: ignore[no-untyped-def]
    plan = {"name": "app", "groups": [{"name": "all", "vms": [f"vm-{i}" for i in range(8)]}]}
    e = estate([plan])
    summary = recovery_plan(plan="app", project=str(e.root), host_limit=2,
                            fabric_options={"latency": {"test_failover": 0.3, "start_vm": 0.1}})
    rep = report_of(summary)
    spans: dict[str, list[tuple[str, str]]] = {}
    for s in rep["steps"]:
        if s["stage"] == "group":
            spans.setdefault(s["host"], []).append((s["started_at"], s["finished_at"]))

    def peak(intervals: list[tuple[str, str]]) -> int:
        events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda x: (x[0], x[1]))
        cur = best = 0
        for _, d in events:
            cur += d
            best = max(best, cur)
        return best

    assert set(spans) == {"dst-1", "dst-2"}
    assert all(peak(v) == 2 for v in spans.values()), {h: peak(v) for h, v in spans.items()}
    assert peak([x for v in spans.values() for x in v]) >= 3  # the two hosts did run side by side


HOSTILE = "it's \"q\" $(touch PWNED) `id`; rm -rf x && echo $HOME\nsecond line | tee"


def test_scripts_get_exactly_rendered_arguments(estate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "argv"
    script = tmp_path / "project" / "dump.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    # Each argument NUL-terminated, so newlines and spaces inside one are visible as such. One printf, so
    # one append: the two VMs' scripts run at once and a loop of writes could interleave.
    script.write_text('#!/bin/sh\nprintf "%s\\0" "$@" >> "$ARGV_OUT"\n'
                      'printf "vm=%s type=%s\\n" "${SITERECOVERY_VM:-}" "$SITERECOVERY_FAILOVER_TYPE"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    plan = {"name": "app", "description": HOSTILE, "groups": [{
        "name": "g'1; $(x)", "vms": ["vm-a", "vm-b"],
        "after": [{"type": "script", "name": "dump", "path": "dump.sh", "per_vm": True, "env": {"ARGV_OUT": str(out)},
                   "args": ["{{ vm.name }}", "{{ plan.description }}", "--group={{ group.name }}",
                            "{{ failover_type }}/{{ direction }}", "literal $(rm) ; ' \""]}]}]}
    e = estate([plan])
    summary = recovery_plan(plan="app", project=str(e.root))
    assert summary["status"] == "succeeded"
    argvs = out.read_bytes().decode().split("\0")[:-1]
    got = sorted(tuple(argvs[i:i + 5]) for i in range(0, len(argvs), 5))
    assert got == [(vm, HOSTILE, "--group=g'1; $(x)", "test/forward", "literal $(rm) ; ' \"") for vm in ("vm-a", "vm-b")]
    assert not (e.root / "PWNED").exists() and not Path("PWNED").exists()
    scripts = report_of(summary)["scripts"]
    assert {s["stdout"].strip() for s in scripts} == {"vm=vm-a type=test", "vm=vm-b type=test"}


def test_failing_script_stops_the_plan(estate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "project" / "fail.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    script.chmod(0o755)
    plan = {"name": "app", "groups": [
        {"name": "one", "vms": ["vm-a"], "after": [{"type": "script", "name": "check", "path": "fail.sh"}]},
        {"name": "two", "vms": ["vm-b"]}]}
    e = estate([plan])
    with pytest.raises(PlanFailed) as exc:
        recovery_plan(plan="app", project=str(e.root))
    s = failed(exc)
    assert any("exited with 3" in f for f in s["failures"])
    assert e.calls("test_failover", "vm-b") == []  # stopped before group two
    assert not e.vm("vm-a")["test_active"]  # and cleaned up
    rep = report_of(s)
    assert rep["scripts"][0]["returncode"] == 3 and "broken" in rep["scripts"][0]["stderr"]


def test_dr_drill_and_the_worked_example_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.drill import dr_drill
    from flows.forms import DrillAdvanced
    from siterecovery.testing.projects import copy_project, seed_memory

    plans = copy_project(Path(__file__).resolve().parents[2] / "plans", tmp_path / "checkout")
    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path))
    seed_memory(plans, "three-tier", tmp_path / "memory-fabric.json")
    summary = dr_drill(plan="three-tier", requested_by="ops-test",
                       advanced=DrillAdvanced(project=str(plans), fabric="memory"))
    assert summary["status"] == "succeeded" and summary["plan_version"] == "3"
    rep = report_of(summary)
    assert rep["requested_by"] == "ops-test"
    # the plan's check scripts ran on the orchestrator, in dry-run mode
    assert {s["action"] for s in rep["scripts"]} == {"check-sql", "warm-caches", "check-web"}
    assert all(s["status"] == "completed" for s in rep["scripts"])
    assert "dry run: would check sql-01:1433" in next(s["stdout"] for s in rep["scripts"] if s["vm"] == "sql-01")


def test_failback_network_follows_the_replicas_network_and_the_mapping_now(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed 000's failback table through the flow (every row is in tests/test_mapping.py): web-01's replica
    moved to VMNetwork2-Chicago after the failover, so failing back puts web-01 on the network mapped to
    it (VMNetwork2-NewYork); jump-01's replica was unplugged, so jump-01 comes back disconnected; web-02,
    untouched, returns to its own network."""
    import shutil

    from siterecovery.fabric.memory import MemoryFabric
    from siterecovery.placement import plan_placements
    from siterecovery.project import load_project
    from siterecovery.testing.projects import seed_memory

    root = tmp_path / "plans"
    shutil.copytree(Path(__file__).resolve().parents[2] / "plans", root)
    shutil.copytree(Path(__file__).resolve().parents[2] / "scripts", tmp_path / "scripts")
    state = tmp_path / "state"
    monkeypatch.setenv("SITERECOVERY_STATE", str(state))
    fab = seed_memory(root, "web-only", state / "memory-fabric.json")
    assert isinstance(fab, MemoryFabric)
    args: dict[str, Any] = {"plan": "web-only", "project": str(root), "fabric": "memory",
                            "failover_type": FailoverType.planned, "confirm": "web-only",
                            "options": RunOptions(reverse_replication=True)}
    assert recovery_plan(**args)["status"] == "succeeded"
    project = load_project(root)
    # Replicating back now: the VMs run at Chicago, the failback placement's source.
    fb = plan_placements(project, project.plan("web-only"), Direction.failback)
    assert fab.vm_networks(fb["web-01"], "source") == {"eth0": "VMNetwork1-Chicago"}
    fab.connect_network(fb["web-01"], "source", "eth0", "VMNetwork2-Chicago")
    fab.connect_network(fb["jump-01"], "source", "eth0", None)

    back = recovery_plan(**args, direction=Direction.failback)
    assert back["status"] == "succeeded"
    fwd = plan_placements(project, project.plan("web-only"))
    got = {vm: fab.vm_networks(fwd[vm], "source") for vm in ("web-01", "web-02", "jump-01")}
    assert got == {"web-01": {"eth0": "VMNetwork2-NewYork"}, "web-02": {"eth0": "VMNetwork1-NewYork"},
                   "jump-01": {"eth0": None}}
    msgs = {s["vm"]: s["message"] for s in report_of(back)["steps"] if s["operation"] == "apply_network"}
    assert msgs["web-01"] == "network: eth0->VMNetwork2-NewYork" and msgs["jump-01"] == "network: eth0->disconnected"
