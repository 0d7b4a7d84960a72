"""A way back from every stop: a planned or unplanned failover that stopped (an approval that timed out, a
failed VM) says where each VM is and what the choices are, and `recover` resumes, commits or cancels it.
The recovery-plan and recover flows on the memory fabric under the Prefect test harness (a real server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flows.forms import RecoverAdvanced
from flows.recover import recover
from flows.recovery_plan import PlanFailed, recovery_plan
from siterecovery.compile import RunOptions
from siterecovery.model import FailoverType
from siterecovery.request import ConfirmationRequired
from tasks.limits import RunRefused

pytestmark = pytest.mark.usefixtures("prefect_harness")

# The web group waits for a person, who does not answer in time: the db group has failed over by then.
GATED = {"name": "gated", "version": "3", "groups": [
    {"name": "db", "vms": ["db-1"]},
    {"name": "web", "vms": ["web-1", "web-2"], "before": [{
        "type": "manual", "name": "go-web", "instructions": "Check the db tier.", "timeout_seconds": 2}]}]}


def way_on(e: Any, plan: str, action: str, confirm: str | None = None) -> dict[str, Any]:
    """recover/<plan> as the UI form sends it."""
    return recover(plan=plan, action=action, confirm=plan if confirm is None else confirm,  # type: ignore[no-any-return]
                   requested_by="oncall@example.test", advanced=RecoverAdvanced(project=str(e.root)))


def report_json(summary: dict[str, Any]) -> dict[str, Any]:
    return json.loads(Path(summary["report"]).with_suffix(".json").read_text())


def test_a_timed_out_approval_says_where_each_vm_is_then_cancel_reverts_it(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate([GATED], seed="gated")
    with pytest.raises(PlanFailed) as exc:
        recovery_plan(plan="gated", project=str(e.root), failover_type=FailoverType.planned, confirm="gated")
    first = exc.value.summary
    assert first["status"] == "stopped"
    # The run's last words: each VM's state and the choices.
    msg = str(exc.value)
    assert "VMs now: " in msg and "db-1: failed over, not committed (FailedOverWaitingCompletion), running on the target" in msg
    assert "web-1, web-2: source shut down and prepared for failover" in msg
    for choice in ("resume: run recover/gated", "commit: run recover/gated", "cancel-failover: run recover/gated",
                   "siterecovery failover cancel gated"):
        assert choice in msg, msg
    rep = report_json(first)
    assert {p["vm"]: p["pending"] for p in rep["positions"]} == {"db-1": True, "web-1": True, "web-2": True}
    assert e.vm("db-1")["state"] == "FailedOverWaitingCompletion"
    assert e.vm("web-1")["state"] == "PreparedForFailover"

    # A drill now would fail on the stuck VMs; the way back is cancel-failover (confirm required).
    with pytest.raises(ConfirmationRequired):
        way_on(e, "gated", "cancel-failover", confirm="")
    done = way_on(e, "gated", "cancel-failover")
    assert done["status"] == "succeeded" and sorted(done["changed"]) == ["db-1", "web-1", "web-2"]
    assert report_json(done)["requested_by"] == "oncall@example.test"
    for vm in ("db-1", "web-1", "web-2"):
        st = e.vm(vm)
        assert st["state"] == "Replicating", st
        assert any(h.startswith("src-") for h in st["running"]), st  # the service runs where it ran
        assert not any(h.startswith("dst-") for h in st["running"]), st
    # Idempotent: again, nothing to do; the stopped failover's intent is closed, so resume has nothing.
    again = way_on(e, "gated", "cancel-failover")
    assert again["changed"] == []
    with pytest.raises(RunRefused, match="no stopped failover to resume"):
        way_on(e, "gated", "resume")
    # The next failover starts afresh (a new intent, not a replay) and may choose another point.
    with pytest.raises(PlanFailed) as exc2:
        recovery_plan(plan="gated", project=str(e.root), failover_type=FailoverType.unplanned, confirm="gated",
                      recovery_point="latest_app_consistent")
    assert exc2.value.summary["intent"] != first["intent"] and not exc2.value.summary["resumed"]


def test_a_failed_failover_resumes_through_recover(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    e.fabric.inject("failover", vm="web-2")
    with pytest.raises(PlanFailed) as exc:
        recovery_plan(plan="app", project=str(e.root), failover_type=FailoverType.unplanned, confirm="app",
                      options=RunOptions(commit=False))
    assert "resume: run recover/app" in str(exc.value)
    resumed = way_on(e, "app", "resume")
    assert resumed["status"] == "succeeded" and resumed["resumed"]
    assert resumed["intent"] == exc.value.summary["intent"]
    # Without commit (--no-commit): every VM failed over and waits; commit keeps them.
    assert e.vm("web-2")["state"] == "FailedOverWaitingCompletion"
    committed = way_on(e, "app", "commit")
    assert committed["status"] == "succeeded" and len(committed["changed"]) == 5
    assert all(e.vm(v)["state"] == "FailedOver" for v in ("db-1", "db-2", "web-1", "web-2", "web-3"))
    # A committed failover cannot be cancelled: each VM says so, and the report offers the retry.
    with pytest.raises(PlanFailed) as exc3:
        way_on(e, "app", "cancel-failover")
    assert "does not allow cancel_failover" in str(exc3.value)

