"""Run reports (pure: Markdown, HTML timeline, derived RPO/RTO/people time) and run intents."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from siterecovery.errors import ConfigurationError, ConnectionFailed, InvalidStateError, NotFoundError
from siterecovery.intent import IntentJournal, StepJournal, intent_key
from siterecovery.report import (
    ApprovalRecord,
    RunReport,
    StepRecord,
    artifact_key,
    render_html,
    render_markdown,
)

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def sample() -> RunReport:
    steps = (
        StepRecord(id="1", label="failover db-1", stage="group", operation="failover", group="db", vm="db-1",
                   host="dst-1", status="completed", started_at=at(1), finished_at=at(3), point_id="db-1@3",
                   point_created_at=at(1) - timedelta(minutes=4)),
        StepRecord(id="2", label="start db-1", stage="group", operation="start_vm", group="db", vm="db-1",
                   host="dst-1", status="completed", started_at=at(3), finished_at=at(5)),
        StepRecord(id="3", label="start web-1 <script>", stage="group", operation="start_vm", group="web",
                   vm="web-1", host="dst-2", status="failed", started_at=at(70), finished_at=at(71), error="boom|x"),
    )
    appr = ApprovalRecord(step_id="a", action="go-web", group="web", requested_at=at(6), answered_at=at(66),
                          decision="approved", approver="alice", comment="ok", ticket="CHG-1")
    return RunReport(plan="app", plan_version="4", failover_type="planned", direction="forward",
                     recovery_point="latest", failure_policy="stop", intent="i-1", started_at=T0, finished_at=at(80),
                     status="failed", steps=steps, approvals=(appr,), failures=("start web-1: boom",))


def test_derived_figures() -> None:
    r = sample()
    assert r.achieved_rpo_seconds == 240.0
    assert r.achieved_rto_seconds == 5.0  # the failed start does not count as up
    assert r.people_seconds == 60.0
    assert r.fabric_seconds == 5.0  # 1-5 s and 70-71 s: the approval wait is not fabric time
    assert [g["name"] for g in r.groups()] == ["db", "web"]


def test_markdown_and_html_escape_and_show_everything() -> None:
    r = sample()
    md = render_markdown(r)
    assert "alice" in md and "CHG-1" in md and "boom\\|x" in md and "4.0 min" in md
    html = render_html(r)
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert html.count('class="bar ') == 4  # three VM steps and one approval
    assert "waiting on people" in html and "v4" in html
    assert artifact_key("Web_Only 2", "test") == "drill-web-only-2" and artifact_key("app", "planned") == "failover-app"


def test_intent_reused_until_completed(tmp_path: Path) -> None:
    j = IntentJournal(tmp_path)
    key = intent_key(plan="app", type="planned")
    first = j.begin(key, "app-planned")
    again = j.begin(key, "app-planned")
    assert again.id == first.id and again.resumed and not first.resumed
    assert j.begin(intent_key(plan="app", type="unplanned"), "x").id != first.id
    j.complete(first)
    nxt = j.begin(key, "app-planned")
    assert nxt.id != first.id and not nxt.resumed
    fresh1, fresh2 = j.begin(key, "t", fresh=True), j.begin(key, "t", fresh=True)
    assert fresh1.id != fresh2.id
    explicit = j.begin(key, "p", explicit="change-42")
    j.complete(explicit)
    with pytest.raises(ConfigurationError, match="already completed"):
        j.begin(key, "p", explicit="change-42")


def test_step_journal_keeps_the_latest_entry(tmp_path: Path) -> None:
    sj = StepJournal(tmp_path, "i-1")
    sj.add("step", "s1", "run-1", {"status": "failed"})
    assert sj.completed("s1") is None
    sj.add("step", "s1", "run-2", {"status": "completed"})
    entry = sj.completed("s1")
    assert entry is not None and entry["flow_run"] == "run-2"


def test_same_cause_groups_by_the_errors_attributes_and_names_the_host() -> None:
    from siterecovery.report import same_cause, vm_failure

    def down(vm: str, host: str, op: str = "failover") -> BaseException:
        return ConnectionFailed("host is unreachable", vm=vm, host=host, operation=op, error_id="Unreachable")

    # Two VMs, one reason, one host: one line that names the host.
    one = same_cause([vm_failure("web-1", "failover web-1", down("web-1", "dst-1")),
                      vm_failure("web-2", "failover web-2", down("web-2", "dst-1"))])
    assert one == [("2 VMs failed the same way (failover web-1, failover web-2) on host dst-1: host is unreachable "
                    "(error id: Unreachable)", ["web-1", "web-2"])]
    # The same reason on different hosts: the line names each host.
    two = same_cause([vm_failure("web-1", "failover web-1", down("web-1", "dst-1")),
                      vm_failure("web-2", "failover web-2", down("web-2", "dst-2"))])
    assert len(two) == 1 and " on hosts dst-1, dst-2: host is unreachable" in two[0][0], two
    # A message that itself holds brackets, or names the VM, is grouped and shown as the error says it.
    odd = [vm_failure(vm, f"start {vm}", InvalidStateError(f"VM {vm}: disk [scsi0] is missing", vm=vm, host="dst-1",
                                                           operation="start_vm", error_id="InvalidState"))
           for vm in ("db-1", "db-2")]
    lines = same_cause(odd)
    assert [vms for _, vms in lines] == [["db-1", "db-2"]]
    assert lines[0][0].endswith("on host dst-1: VM db-1: disk [scsi0] is missing (error id: InvalidState)"), lines
    # Another operation or another error id is another cause.
    mixed = same_cause([vm_failure("a", "failover a", down("a", "dst-1")),
                        vm_failure("b", "start b", down("b", "dst-1", op="start_vm"))])
    assert [vms for _, vms in mixed] == [["a"], ["b"]]
    assert all("dst-1" in line for line, _ in mixed)


def test_one_cause_one_line_and_the_way_back_from_a_stop() -> None:
    from siterecovery.report import paused_note, positions, same_cause, stop_line, vm_failure, way_back

    failed = [vm_failure(vm, f"test failover {vm}", NotFoundError("replication is not enabled for this VM", vm=vm,
                                                                  host=f"h{i}", operation="test_failover"))
              for i, vm in enumerate(("a", "b", "c"))] + [vm_failure("d", "test failover d", RuntimeError("boom"))]
    lines = same_cause(failed)
    assert [vms for _, vms in lines] == [["a", "b", "c"], ["d"]]
    assert lines[0][0] == ("3 VMs failed the same way (test failover a, test failover b, test failover c) on hosts "
                           "h0, h1, h2: replication is not enabled for this VM")
    assert lines[1][0] == "test failover d: RuntimeError: boom"
    t = datetime(2026, 1, 1, tzinfo=UTC)
    steps = [StepRecord(id=f"{vm}/{op}", label=f"{op} {vm}", stage="group", operation=op, vm=vm, status=st,
                        started_at=t, finished_at=t)
             for vm, op, st in (("db", "prepare_planned_failover", "completed"), ("db", "failover", "completed"),
                                ("web", "prepare_planned_failover", "completed"), ("web", "failover", "skipped"),
                                ("app", "failover", "failed"))]
    where = positions(steps)
    assert [(p.vm, p.pending) for p in where] == [("db", True), ("web", True), ("app", False)]
    choices = way_back("shop", where)
    assert [c.split(":")[0] for c in choices] == ["resume", "commit", "cancel-failover"]
    assert "siterecovery failover cancel shop --confirm shop" in choices[2]
    line = stop_line(where, choices)
    assert "db: failed over, not committed" in line and "app: untouched" in line
    assert way_back("shop", [p for p in where if p.vm == "app"])[0].startswith("nothing was failed over")
    assert paused_note(0.1) == "" and "leaves out the 75.0 s it was paused" in paused_note(75)


def planned(failover_point: str | None, recovery_point: str = "latest", prepare_point: str | None = "db-1@9") -> RunReport:
    steps = (
        StepRecord(id="p", label="prepare db-1", stage="shutdown", operation="prepare_planned_failover", group="db",
                   vm="db-1", host="src-1", status="completed", started_at=at(0), finished_at=at(1),
                   point_id=prepare_point, point_created_at=at(1) if prepare_point else None),
        StepRecord(id="f", label="failover db-1", stage="group", operation="failover", group="db", vm="db-1",
                   host="dst-1", status="completed", started_at=at(91), finished_at=at(93), point_id=failover_point,
                   point_created_at=at(1) if failover_point == prepare_point else at(-300)),
    )
    return RunReport(plan="app", plan_version="4", failover_type="planned", direction="forward",
                     recovery_point=recovery_point, failure_policy="stop", intent="i-2", started_at=T0,
                     finished_at=at(100), status="succeeded", steps=steps)


def test_planned_failover_after_final_sync_lost_nothing_and_keeps_the_point_age() -> None:
    r = planned("db-1@9")
    # The final point is 90 s old when the failover uses it, but it holds everything written before shutdown.
    assert r.final_sync_vms() == {"db-1"}
    assert r.achieved_rpo_seconds == 0.0 and r.point_age_seconds == 90.0
    assert r.data_loss == "none (final sync after shutdown)"
    s = r.summary()
    assert s["data_loss"] == "none (final sync after shutdown)" and s["point_age_seconds"] == 90.0
    assert s["achieved_rpo_seconds"] == 0.0
    md = render_markdown(r)
    assert "data loss: none (final sync after shutdown)" in md and "age of the oldest point used: 90.0 s" in md
    html = render_html(r)
    assert "none (final sync after shutdown)" in html and "90.0 s" in html


def test_planned_failover_to_an_older_point_reports_its_age_as_data_loss() -> None:
    # Not the point the prepare shipped: what was written after it is lost.
    r = planned("db-1@3")
    assert r.final_sync_vms() == frozenset() and r.achieved_rpo_seconds == 391.0
    assert r.data_loss.startswith("up to 6.5 min")
    # A fabric that names no point (Hyper-V Replica's latest): the prepare and 'latest' are the proof.
    assert planned(None, prepare_point=None).data_loss == "none (final sync after shutdown)"
    assert planned(None, "latest_processed", prepare_point=None).data_loss.startswith("unknown")
    # Unplanned: the age of the point is the data loss, as before.
    assert sample().model_copy(update={"failover_type": "unplanned"}).data_loss.startswith("up to 4.0 min")
