"""The report's records are built by pure functions from a run's outcomes (the compiled steps, the
intent's journal entries, the approvals): no Prefect, no fabric, no clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from siterecovery.compile import compile_plan
from siterecovery.model import FailoverType
from siterecovery.project import load_project
from siterecovery.report import ApprovalRecord, StepRecord, audit_records, run_records

PLANS = Path(__file__).resolve().parent.parent / "plans"
T0 = datetime(2026, 11, 30, 2, tzinfo=UTC)


def entry(flow_run: str, record: dict, user: str = "ops") -> dict:  # type: ignore[type-arg]
    return {"flow_run": flow_run, "user": user, "record": record}


def test_run_records_join_the_compiled_steps_with_the_journal() -> None:
    project = load_project(PLANS)
    c = compile_plan(project, project.plan("three-tier"), FailoverType.test)
    vm_steps = [s for s in c.steps() if s.kind == "vm"]
    script = next(s for s in c.steps() if s.kind == "script")
    first, second = vm_steps[0], vm_steps[1]

    def rec(s, status: str, at: datetime) -> dict:  # type: ignore[no-untyped-def,type-arg]
        return StepRecord(id=s.id, label=s.label, stage=s.stage, operation=s.operation, vm=s.vm, host=s.host,
                          status=status, started_at=at, finished_at=at).model_dump(mode="json")

    entries = {first.id: entry("run-1", rec(first, "completed", T0)),  # an earlier run of the intent did it
               second.id: entry("run-2", rec(second, "completed", T0 + timedelta(seconds=5)))}
    steps, scripts = run_records(c.steps(), entries, "run-2")
    assert [s.id for s in steps] == [s.id for s in vm_steps]  # plan order, cleanup included
    by_id = {s.id: s for s in steps}
    assert by_id[first.id].status == "cached" and by_id[second.id].status == "completed"
    assert all(s.status == "skipped" for s in steps[2:]) and by_id[vm_steps[-1].id].stage == "cleanup"
    assert [r.step_id for r in scripts] == [s.id for s in c.steps() if s.kind == "script"]
    assert scripts[0].step_id == script.id and scripts[0].status == "skipped"

    ok = ApprovalRecord(step_id="x", action="go", requested_at=T0, answered_at=T0 + timedelta(seconds=9),
                        decision="approved", approver="ann", ticket="CHG-1")
    nobody = ApprovalRecord(step_id="y", action="again", requested_at=T0 + timedelta(seconds=20), decision="timed_out")
    rows = audit_records(steps, entries, [ok, nobody], ["old-run (Paused)"], "run-2", "me", T0 - timedelta(seconds=1))
    assert [(r.kind, r.action, r.who, r.flow_run) for r in rows] == [
        ("run", "took over", "me", "run-2"),
        ("fabric", first.operation, "ops", "run-1"),  # cached: the run and user that did it
        ("fabric", second.operation, "ops", "run-2"),
        ("approval", "go", "ann", "run-2"),
        ("approval", "again", "(nobody answered)", "run-2"),
    ]
    assert rows[1].outcome == "cached (done by an earlier run)" and rows[3].outcome == "approved, ticket CHG-1"
    assert rows[1].target == f"{first.vm} on {first.host}"
