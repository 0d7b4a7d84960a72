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


def test_a_crashed_runs_report_says_what_it_finished_and_what_is_left() -> None:
    """A run whose process died: its report (written by the next run of the plan) is `crashed`, lists the
    steps it finished, and says what it left: a drill's test failovers, a failover's VM positions."""
    from siterecovery.report import crashed_report

    def step(vm: str, op: str, at: datetime) -> dict:  # type: ignore[type-arg]
        return {"kind": "step", "record": StepRecord(id=f"{op}-{vm}", label=f"{op} {vm}", stage="failover",
                                                     operation=op, vm=vm, host="h1", status="completed",
                                                     started_at=at, finished_at=at).model_dump(mode="json")}

    meta = {"plan": "shop", "plan_version": "1", "failover_type": "test", "direction": "forward",
            "recovery_point": "latest", "intent": "shop-test-1", "flow_run": "dead-run",
            "started": T0.isoformat(), "operator": "ops", "requested_by": "ann"}
    drill = crashed_report(meta, [step("db", "test_failover", T0 + timedelta(seconds=3)),
                                  step("web", "test_failover", T0 + timedelta(seconds=4)),
                                  step("web", "cleanup_test_failover", T0 + timedelta(seconds=6))],
                           found_by="next-run", now=T0 + timedelta(minutes=5))
    assert drill.status == "crashed" and drill.flow_run_id == "dead-run" and len(drill.steps) == 3
    assert drill.finished_at == T0 + timedelta(seconds=6)  # its last finished step, not when it was found
    assert drill.choices == ("the next drill of 'shop' cleans up the test failover(s) it left: db",)
    assert "found by flow run next-run" in drill.failures[0] and "3 finished step(s)" in drill.failures[0]

    failover = crashed_report({**meta, "failover_type": "unplanned"}, [step("db", "failover", T0)],
                              found_by="next-run", now=T0)
    assert [(p.vm, p.pending) for p in failover.positions] == [("db", True)]
    assert failover.choices and any("cancel-failover" in c for c in failover.choices), failover.choices
    nothing = crashed_report(meta, [], found_by="next-run", now=T0)
    assert nothing.finished_at == T0 and nothing.steps == () and "0 finished step(s)" in nothing.failures[0]
