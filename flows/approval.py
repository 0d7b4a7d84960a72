"""Manual actions: the approval form a paused run shows, and the pause itself.

`Approval` is what the Prefect UI renders as a form on the paused run (or what another process passes
to resume_flow_run). `approved` defaults to False so that resuming with no input is a rejection.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from siterecovery.compile import Step
from siterecovery.errors import ApprovalRejected, ApprovalTimedOut
from siterecovery.model import ManualAction
from siterecovery.report import ApprovalRecord

# How often the paused run asks the server whether it was resumed (Prefect's default is 10 s).
POLL_SECONDS = 1


class Approval(RunInput):
    approved: bool = Field(False, description="approve to go on; leave unticked to reject and stop the plan")
    approver: str = Field("", description="who decides (name or account)")
    comment: str = Field("", description="what was checked, or why it is rejected")
    ticket: str = Field("", description="change or incident ticket reference")


def pause_key(step_id: str) -> str:
    """Stable per step, so a pause is recognisable in the UI and the API across runs."""
    return "approve-" + re.sub(r"[^a-z0-9-]+", "-", step_id.lower()).strip("-")


def describe(step: Step, action: ManualAction, plan: str, plan_version: str, failover_type: str,
             direction: str) -> str:
    group = step.group or "(whole plan)"
    return "\n".join([
        f"## Approval needed: {action.name}",
        "",
        f"- **Plan:** {plan} v{plan_version}",
        f"- **Failover:** {failover_type}, {direction}",
        f"- **Group:** {group}",
        f"- **Approver group:** {action.approver_group or 'any operator'}",
        f"- **Times out after:** {action.timeout_seconds} s (then the plan stops)",
        "",
        "### Instructions",
        "",
        action.instructions.strip(),
        "",
        "Tick **approved** to go on; leave it unticked to reject and stop the plan. Name yourself and the ticket.",
    ])


def request_approval(step: Step, description: str) -> ApprovalRecord:
    """Pause the flow run until someone answers. Returns the record of an approval; raises
    ApprovalRejected / ApprovalTimedOut (with the record in `.record`) otherwise."""
    assert isinstance(step.action, ManualAction)
    action = step.action
    asked = datetime.now(UTC)
    base = {"step_id": step.id, "action": action.name, "group": step.group, "approver_group": action.approver_group,
            "requested_at": asked}
    try:
        answer = pause_flow_run(wait_for_input=Approval.with_initial_data(description=description, approved=False),
                                timeout=action.timeout_seconds, poll_interval=POLL_SECONDS, key=pause_key(step.id))
    except FlowPauseTimeout:
        rec = ApprovalRecord(**base, answered_at=datetime.now(UTC), decision="timed_out")
        raise ApprovalTimedOut(f"nobody answered '{action.name}' within {action.timeout_seconds} s",
                               operation="manual", hint="re-run the plan when an approver is available",
                               record=rec) from None
    rec = ApprovalRecord(**base, answered_at=datetime.now(UTC),
                         decision="approved" if answer.approved else "rejected",
                         approver=answer.approver, comment=answer.comment, ticket=answer.ticket)
    if not answer.approved:
        raise ApprovalRejected(f"'{action.name}' was rejected by {answer.approver or 'an unnamed approver'}"
                               + (f": {answer.comment}" if answer.comment else ""), operation="manual",
                               hint="resolve the reason given, then re-run the plan", record=rec)
    return rec


def input_form_ready(client: Any, flow_run: Any) -> bool:
    """True once a paused run has saved its approval form. Prefect sets the run PAUSED first and saves
    the form just after: a resume in that window stores no answer, and the run then fails loading it
    (ObjectNotFound: seen in tests whose approver polls every 0.5 s). Anything that approves by program
    (the demo, tests, scripts) resumes a run only once this is True; a person in the UI is never that fast."""
    from prefect.input.run_input import keyset_from_paused_state

    state = flow_run.state
    if state is None or not state.is_paused():
        return False
    try:
        client.read_flow_run_input(flow_run.id, keyset_from_paused_state(state)["schema"])
    except ObjectNotFound:
        return False
    return True

