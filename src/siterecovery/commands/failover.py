"""`siterecovery failover cancel|commit|resume PLAN`: the way on from a stopped planned or unplanned
failover, from the command line (the `recover/<plan>` deployment does the same from the UI).

Prefect and flows/ are imported inside the commands only: the core package never imports prefect.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cli import app, err, out

failover_app = typer.Typer(no_args_is_help=True, help="Resume, commit or cancel a stopped failover.")
app.add_typer(failover_app, name="failover")

Plan = Annotated[str, typer.Argument(help="plan name in --project, or a plan file")]
Confirm = Annotated[str, typer.Option(help="the plan name, to confirm: every action changes production")]
ProjectDir = Annotated[Path, typer.Option("--project", "-p", help="project directory")]
Fabric = Annotated[str | None, typer.Option(help="run every host on this fabric kind (default: the failover's)")]


def _recover(plan: str, action: str, confirm: str, project: Path, fabric: str | None) -> None:
    name = Path(plan).stem if plan.endswith((".yaml", ".yml")) else plan
    if confirm != name:
        err.print(f"[red]{action} of '{name}' changes production:[/] add --confirm {name} to go ahead", highlight=False)
        raise typer.Exit(2)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        from flows.recover import recover
        from flows.recovery_plan import PlanFailed
    except ImportError as exc:
        err.print(f"[red]cannot import the flows ({exc}):[/] run from a checkout of siterecovery, or put it on PYTHONPATH")
        raise typer.Exit(2) from None
    from ..errors import ConfigurationError

    try:
        from flows.forms import RecoverAdvanced

        from ..intent import os_user

        summary: dict[str, Any] = recover(  # type: ignore[call-overload]
            plan=plan, action=action, confirm=confirm, requested_by=f"{os_user()} (OS user of a command-line run)",
            advanced=RecoverAdvanced(project=str(project), fabric=fabric or "topology"))
        code = 0
    except ConfigurationError as exc:
        err.print(f"[red]{exc}[/]", highlight=False, markup=False)
        raise typer.Exit(2) from None
    except PlanFailed as exc:
        summary, code = exc.summary, 1
    out.print(f"{summary['plan']}: {action}: {summary['status']}", highlight=False)
    for f in summary.get("failures", []):
        out.print(f"  failed: {f}", highlight=False, markup=False)
    if "changed" in summary:
        out.print(f"  VMs changed: {', '.join(summary['changed']) or 'none'}", highlight=False, markup=False)
    out.print(f"report: {summary['report']}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)


@failover_app.command("cancel")
def cancel(plan: Plan, confirm: Confirm = "", project: ProjectDir = Path("plans"), fabric: Fabric = None) -> None:
    """Revert every VM of a stopped failover to before it (the next failover may choose another point)."""
    _recover(plan, "cancel-failover", confirm, project, fabric)


@failover_app.command("commit")
def commit(plan: Plan, confirm: Confirm = "", project: ProjectDir = Path("plans"), fabric: Fabric = None) -> None:
    """Commit the failover of every VM that failed over (no way back after it)."""
    _recover(plan, "commit", confirm, project, fabric)


@failover_app.command("resume")
def resume(plan: Plan, confirm: Confirm = "", project: ProjectDir = Path("plans"), fabric: Fabric = None) -> None:
    """Run the stopped failover on, with the parameters it was started with."""
    _recover(plan, "resume", confirm, project, fabric)
