"""A stand-in for flows/drill.py:dr_drill while the flows branch is being written: same name and
parameters, test failover on the memory fabric, one approval per manual step, cleanup, a report
artifact keyed drill-<plan>. Used only with SITERECOVERY_UI_STANDIN=1; the tests drive the real flow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from prefect import flow, pause_flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.input import RunInput

from siterecovery.compile import compile_plan
from siterecovery.fabric import FabricContext
from siterecovery.fabric.memory import MemoryFabric
from siterecovery.model import FailoverType
from siterecovery.placement import plan_placements
from siterecovery.project import load_project


class Approval(RunInput):
    approved: bool = False
    approver: str = ""
    comment: str = ""
    ticket: str = ""


@flow(name="dr-drill")
def dr_drill(plan: str, project: str = "plans", fabric: str | None = None,
             cleanup: Literal["immediate", "after_approval"] = "immediate") -> str:
    proj = load_project(project)
    rp = proj.plan(plan)
    state = Path(os.environ.get("SITERECOVERY_STATE", ".siterecovery"))
    fab = MemoryFabric(FabricContext(state_dir=state, options={"state_file": str(state / "memory-fabric.json")}))
    placements = list(plan_placements(proj, rp).values())
    lines = [f"# Drill {plan}"]
    for p in placements:
        fab.test_failover(p)
    try:
        for step in compile_plan(proj, rp, FailoverType.test).steps():
            if step.kind == "manual":
                a = pause_flow_run(wait_for_input=Approval.with_initial_data(
                    description=f"### {plan}: {step.label}"), timeout=600, poll_interval=1)
                lines.append(f"approved={a.approved} by {a.approver}: {a.comment} ({a.ticket})")
    finally:
        for p in placements:
            fab.cleanup_test_failover(p)
    create_markdown_artifact(key=f"drill-{plan}", markdown="\n\n".join(lines))
    return "ok"
