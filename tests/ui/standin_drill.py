"""A stand-in for flows/drill.py:dr_drill while the flows branch is being written: same name and
parameters, one manual approval, a report artifact keyed drill-<plan>. Lets the browser test be built
against the real UI; the test switches to the real flow as soon as it exists."""

from __future__ import annotations

from typing import Literal

from prefect import flow, pause_flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.input import RunInput


class Approval(RunInput):
    approved: bool = False
    approver: str = ""
    comment: str = ""
    ticket: str = ""


@flow(name="dr-drill")
def dr_drill(plan: str, project: str = "plans", fabric: str | None = None,
             cleanup: Literal["immediate", "after_approval"] = "immediate") -> str:
    a = pause_flow_run(wait_for_input=Approval.with_initial_data(
        description=f"### Plan {plan}: approve the drill\nCheck the test VMs."), timeout=600, poll_interval=1)
    create_markdown_artifact(key=f"drill-{plan}", markdown=f"# Drill {plan}\napproved={a.approved} by "
                             f"{a.approver}: {a.comment} ({a.ticket})")
    return "ok"
