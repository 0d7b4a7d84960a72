"""CLI: `siterecovery deployments render` (deployments/prefect.yaml from plans/ and the settings file)
and `siterecovery ui up|down|status` (a local Prefect server, work pool, deployments and worker, all
kept in the project's state directory). Used by `make ui` / `make ui-stop`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated

import typer

from ..cli import app, err, out
from ..errors import PlanError
from ..estate import open_estate, state_dir

deployments_app = typer.Typer(no_args_is_help=True, help="Prefect deployments generated from the plans.")
ui_app = typer.Typer(no_args_is_help=True, help="A local Prefect UI: server, work pool, deployments, worker.")
app.add_typer(deployments_app, name="deployments")
app.add_typer(ui_app, name="ui")

DEFAULT_OUT = Path("deployments/prefect.yaml")


def rendered_text(project_dir: Path, settings_file: Path, out_file: Path) -> str:
    from ..deployments import dump, load_settings, render
    from ..project import load_project

    settings = load_settings(settings_file)
    # Name the inputs as the command line did, so the header carries no machine paths.
    beside = settings_file.resolve().parent == out_file.resolve().parent
    label = f"{settings_file.name} beside this file" if beside else str(settings_file)
    return dump(render(load_project(project_dir), settings), str(project_dir).rstrip("/"), label)


@deployments_app.command("render")
def render_cmd(
    project_dir: Annotated[Path, typer.Option("--project", "-p", help="project directory")] = Path("plans"),
    out_file: Annotated[Path, typer.Option("--out", "-o", help="prefect.yaml to write")] = DEFAULT_OUT,
    settings_file: Annotated[Path | None, typer.Option(
        "--settings", help="schedules and work pool (default: settings.yaml beside --out)")] = None,
    check: Annotated[bool, typer.Option("--check", help="write nothing; exit 1 if --out differs")] = False,
) -> None:
    """Generate the Prefect deployments (drills, failovers, protection jobs) from the plans."""
    settings_file = settings_file or out_file.parent / "settings.yaml"
    try:
        text = rendered_text(project_dir, settings_file, out_file)
    except PlanError as exc:
        for p in exc.problems:
            err.print(str(p), markup=False, highlight=False)
        raise typer.Exit(1) from None
    current = out_file.read_text() if out_file.exists() else ""
    if check:
        if current != text:
            diff = difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                        str(out_file), "rendered")
            out.print("".join(diff), markup=False, highlight=False, end="")
            err.print(f"[red]{out_file} is out of date[/]: run `siterecovery deployments render`")
            raise typer.Exit(1)
        out.print(f"[green]ok[/] {out_file} is up to date")
        return
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text)
    out.print(f"wrote {out_file}")


StateOpt = Annotated[Path | None, typer.Option(help="state directory (default: $SITERECOVERY_STATE, else the "
                                                   "project's estate, .siterecovery beside it)")]
ProjectOpt = Annotated[Path, typer.Option("--project", "-p", help="project directory whose estate the UI serves")]


@ui_app.command("up")
def ui_up(
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 4200,
    state: StateOpt = None,
    project_dir: ProjectOpt = Path("plans"),
    prefect_file: Annotated[Path, typer.Option(help="deployments to apply")] = DEFAULT_OUT,
    pool: Annotated[str, typer.Option(help="process work pool")] = "siterecovery",
) -> None:
    """Start the server, create the work pool, deploy, start a worker; print the UI's address."""
    from .. import ui

    if not prefect_file.exists():
        err.print(f"[red]{prefect_file} not found[/]: run from the repository root, or `siterecovery deployments render`")
        raise typer.Exit(2)
    url = ui.up(open_estate(project_dir, state), Path.cwd(), prefect_file, pool=pool, port=port, say=out.print)
    out.print(f"\nPrefect UI: [bold]{url}[/]   (stop with `make ui-stop` or `siterecovery ui down`)")


@ui_app.command("down")
def ui_down(
    state: StateOpt = None,
    project_dir: ProjectOpt = Path("plans"),
) -> None:
    """Stop the worker and the server that `ui up` started, and nothing else."""
    from .. import ui

    ui.down(state_dir(project_dir, state), say=out.print)


@ui_app.command("status")
def ui_status(
    state: StateOpt = None,
    project_dir: ProjectOpt = Path("plans"),
) -> None:
    """Which of the server and the worker are running."""
    from .. import ui

    running = ui.status(state_dir(project_dir, state))
    for name, pid in running.items():
        out.print(f"{name}: {'running, pid ' + str(pid) if pid else 'not running'}")
    if not all(running.values()):
        raise typer.Exit(1)
