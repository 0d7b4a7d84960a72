"""`siterecovery run PLAN --type ...`: start the recovery-plan flow locally, against the configured
Prefect API, and print its progress (the flow's log) and summary.

Prefect and flows/ are imported inside the command only: the core package never imports prefect.
flows/ is installed with the package (pyproject maps the checkout's flows/ and tasks/), so any directory works.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cli import _resolve_plan, app, err, out
from ..compile import RunOptions
from ..errors import ConfigurationError, PlanError
from ..model import Direction, FailoverType, FailurePolicy
from ..request import ConfirmationRequired, RunRequest


@app.command()
def run(
    plan: Annotated[str, typer.Argument(help="plan name in --project, or a plan file")],
    failover_type: Annotated[FailoverType, typer.Option("--type", "-t", help="test, planned or unplanned")] = FailoverType.test,
    direction: Annotated[Direction, typer.Option(help="forward or failback")] = Direction.forward,
    point: Annotated[str, typer.Option(help="latest, latest_processed, latest_app_consistent or point_in_time")] = "latest",
    at: Annotated[datetime | None, typer.Option(help="with --point point_in_time: the newest point at or before this")] = None,
    fabric: Annotated[str | None, typer.Option(help="run every host on this fabric kind (memory: a dry run)")] = None,
    confirm: Annotated[str, typer.Option(help="planned/unplanned: the plan name, to confirm")] = "",
    project: Annotated[Path, typer.Option("--project", "-p", help="project directory")] = Path("plans"),
    reverse_replication: Annotated[bool | None, typer.Option(
        help="replicate back to the old source (default: on for a planned Hyper-V failover, off otherwise)")] = None,
    commit: Annotated[bool, typer.Option(help="commit the failover once every group is up")] = True,
    cleanup: Annotated[str, typer.Option(help="test: immediate, or after_approval")] = "immediate",
    failure_policy: Annotated[FailurePolicy | None, typer.Option(help="override the plan's: stop or continue")] = None,
    intent: Annotated[str | None, typer.Option(help="resume exactly this intent")] = None,
    accept_damaged_replica: Annotated[bool, typer.Option(
        help="unplanned failover: go on from a replica that fails its check (scrub or quick check), for when the "
             "source is gone and it is the only copy; the report says so")] = False,
    consistency_groups: Annotated[str, typer.Option(
        help="together: each consistency group to one group point; each: every member to its own point "
             "(not one moment: only when no group point exists)")] = "together",
) -> None:
    """Run a recovery plan through Prefect (test, planned or unplanned failover; forward or failback)."""
    if point not in ("latest", "latest_processed", "latest_app_consistent", "point_in_time"):
        err.print(f"[red]unknown --point {point}[/]")
        raise typer.Exit(2)
    if accept_damaged_replica and failover_type != FailoverType.unplanned:
        err.print("[red]--accept-damaged-replica is for an unplanned failover[/] (the source is gone): with the "
                  "source there, resynchronize the replica instead")
        raise typer.Exit(2)
    if consistency_groups not in ("together", "each"):
        err.print(f"[red]unknown --consistency-groups {consistency_groups}[/] (together or each)")
        raise typer.Exit(2)
    request = RunRequest(
        plan=plan, failover_type=failover_type, direction=direction, recovery_point=point, point_in_time=at,  # type: ignore[arg-type]
        options=RunOptions(reverse_replication=reverse_replication, commit=commit, cleanup=cleanup,  # type: ignore[arg-type]
                           consistency_groups=consistency_groups),  # type: ignore[arg-type]
        project=str(project), fabric=fabric, confirm=confirm, intent=intent, failure_policy=failure_policy,
        fabric_options={"accept_damaged_replica": True} if accept_damaged_replica else None)
    if not plan.endswith((".yaml", ".yml")):
        try:  # refused before Prefect even loads: a planned or unplanned failover changes production
            request.check(plan)
        except ConfigurationError as exc:
            err.print(f"[red]{exc}[/]", highlight=False)
            raise typer.Exit(2) from None
    try:  # a missing or invalid plan is one clear error, before Prefect starts
        _resolve_plan(plan, project)
    except PlanError as exc:
        for problem in exc.problems:
            err.print(str(problem), markup=False, highlight=False)
        raise typer.Exit(1) from None
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        from flows.recovery_plan import PlanFailed, recovery_plan
    except ImportError as exc:
        err.print(f"[red]cannot import the flows ({exc}):[/] install siterecovery with its orchestration extra")
        raise typer.Exit(2) from None
    try:
        # Prefect's Flow.__call__ overloads: mypy cannot match keyword calls through them (nor try every union).
        summary: dict[str, Any] = recovery_plan(**request.flow_parameters())  # type: ignore[call-overload,misc]
        code = 0
    except ConfirmationRequired as exc:
        err.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    except PlanFailed as exc:
        summary, code = exc.summary, 1
    out.print(f"{summary['plan']}: {summary['failover_type']} failover, {summary['direction']}: {summary['status']}",
              highlight=False)
    for f in summary.get("failures", []):
        out.print(f"  failed: {f}", highlight=False, markup=False)
    out.print(json.dumps({k: summary[k] for k in ("steps", "achieved_rpo_seconds", "achieved_rto_seconds",
                                                  "people_seconds", "intent")}, default=str), highlight=False)
    out.print(f"report: {summary['report']}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)
