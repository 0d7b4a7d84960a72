"""The command line: thin over the core. validate and show work offline; run, status and demo go
through Prefect (imported only by the commands that need it, so `validate` stays fast).

Exit codes: 0 success, 1 problems found (or the operation failed), 2 usage errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import PlanError, SiteRecoveryError
from .model import Direction, FailoverType

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Recovery plans as code.")
out = Console(width=160) if not sys.stdout.isatty() else Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"siterecovery {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = False,
) -> None:
    """Recovery plans as code: validate, show and run recovery plans."""


@app.command()
def validate(paths: Annotated[list[Path], typer.Argument(help="project directories or files")]) -> None:
    """Check topology, protection and plans; list every problem with file, line and field."""
    from .project import load_project, project_dirs

    missing = [p for p in paths if not p.exists()]
    if missing:
        err.print(f"[red]no such file or directory:[/] {', '.join(map(str, missing))}")
        raise typer.Exit(2)
    failed = 0
    dirs = project_dirs(paths)
    if not dirs:
        err.print("[red]no YAML files found[/] in " + ", ".join(map(str, paths)))
        raise typer.Exit(1)
    for d in dirs:
        try:
            project = load_project(d)
        except PlanError as exc:
            failed += len(exc.problems)
            for p in exc.problems:
                out.print(str(p), markup=False, highlight=False)
            continue
        out.print(f"[green]ok[/] {d}: {len(project.topology.vms)} VMs, {len(project.protection.pairings)} pairings, "
                  f"{len(project.plans)} plans")
    if failed:
        err.print(f"[red]{failed} problem{'s' if failed != 1 else ''}[/]")
        raise typer.Exit(1)


def _resolve_plan(plan: str, project_dir: Path | None):  # type: ignore[no-untyped-def]
    """PLAN is a plan file, or a plan name looked up in --project (default: ./plans)."""
    from .project import load_project

    p = Path(plan)
    if p.suffix in (".yaml", ".yml") and not p.is_file():
        raise typer.BadParameter(f"{p}: no such plan file")
    if p.suffix in (".yaml", ".yml"):
        project = load_project(p.parent)
        for ps in project.plans.values():
            if ps.file.resolve() == p.resolve():
                return project, ps.plan
        raise typer.BadParameter(f"{p} holds no RecoveryPlan")
    project = load_project(project_dir or Path("plans"))
    try:
        return project, project.plan(plan)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from None


@app.command()
def show(
    plan: Annotated[str, typer.Argument(help="plan file, or plan name in --project")],
    failover_type: Annotated[FailoverType, typer.Option("--type", "-t", help="test, planned or unplanned")] = FailoverType.test,
    direction: Annotated[Direction, typer.Option(help="forward or failback")] = Direction.forward,
    project_dir: Annotated[Path | None, typer.Option("--project", "-p", help="project directory (default: plans)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print the ordered steps a plan will run, without running anything."""
    from .compile import compile_plan

    try:
        project, rp = _resolve_plan(plan, project_dir)
        compiled = compile_plan(project, rp, failover_type, direction)
    except PlanError as exc:
        for p in exc.problems:
            err.print(str(p), markup=False, highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        print(compiled.model_dump_json(indent=2))
        return
    table = Table(title=f"{rp.name} v{rp.version}: {failover_type.value} failover, {direction.value}")
    for col in ("#", "stage", "batch", "step", "host", "waits for"):
        table.add_column(col)
    labels = {s.id: s.label for s in compiled.steps()}
    n = 0
    for batch in (*compiled.batches, *compiled.cleanup):
        for s in batch.steps:
            n += 1
            table.add_row(str(n), s.stage, batch.name, s.label, s.host or "orchestrator",
                          ", ".join(labels[x] for x in s.after))
    out.print(table)
    if compiled.cleanup:
        out.print("[dim]cleanup steps run after the drill, and also when anything fails[/]")


def _load_commands() -> None:
    import importlib
    import pkgutil

    from . import commands

    for mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        importlib.import_module(f"{commands.__name__}.{mod}")


def main() -> None:
    # Prefect's ephemeral server (used when no PREFECT_API_URL is set) gives up after 20 s; a first start
    # on a fresh machine (migrations, no bytecode cache) takes longer and failed the first `run` that way.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    _load_commands()
    try:
        app()
    except SiteRecoveryError as exc:
        err.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
