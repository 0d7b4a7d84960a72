"""`siterecovery status`, `siterecovery protect` and `siterecovery resync`: the operator's view of
replication health, the way to protect a pairing's VMs and to resynchronize them on demand.

status reads health straight from the fabric (no Prefect needed: it must work while the orchestrator
is down). protect and resync move data, so they run the enable-protection and resynchronize flows in
this process (prefect is imported inside those commands only): a resync then takes its source host's
transfer slot like any scheduled cycle, clears the pairing's failed-cycle count and leaves a flow run
with its artifacts. Both show each VM's copy as it runs (progress_view).

`siterecovery replication suspend|resume PAIRING [VM...]` run the suspend-replication and
resume-replication flows the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..cli import app, err, out
from ..errors import ExecutionError, SiteRecoveryError
from ..estate import open_estate
from ..placement import pairing_placements
from ..progress_view import progress_display
from ..project import load_project
from ..protection import HealthRow, kind_of, open_fabric, read_pairing_state

HEALTH_STYLE = {"Normal": "green", "Warning": "yellow", "Critical": "bold red", "Unknown": "bold red"}

ProjectOpt = Annotated[Path, typer.Option("--project", "-p", help="project directory")]
FabricOpt = Annotated[str | None, typer.Option("--fabric", help="override the hosts' fabric kind, e.g. memory")]


def health_rows(project_dir: Path, pairing: str | None, fabric: str | None) -> list[HealthRow]:
    """Every VM's health for one pairing or all of them; a VM that cannot be read is a row too."""
    project = load_project(project_dir)
    pairings = [project.protection.pairing(pairing)] if pairing else list(project.protection.pairings)
    state = open_estate(project.root, create=False)  # reading health never makes an estate
    drivers: dict[str, Any] = {}
    rows = []
    try:
        for pair in pairings:
            for p in pairing_placements(project, pair).values():
                kind = kind_of(p, fabric)
                if kind not in drivers:
                    drivers[kind] = open_fabric(kind, state)
                try:
                    rows.append(HealthRow.of(drivers[kind].replication_health(p), p))
                except ExecutionError as exc:
                    rows.append(HealthRow.unreadable(p, exc))
    finally:
        for d in drivers.values():
            d.close()
    return rows


def _rpo(row: HealthRow) -> str:
    if row.current_rpo_seconds is None:
        return "-"
    text = f"{row.current_rpo_seconds:.0f}s"
    return f"[bold red]{text}[/]" if row.current_rpo_seconds > row.rpo_threshold_seconds else text


@app.command()
def status(
    pairing: Annotated[str | None, typer.Argument(help="pairing name (default: all pairings)")] = None,
    project_dir: ProjectOpt = Path("plans"),
    fabric: FabricOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Replication health of every protected VM, like Measure-VMReplication."""
    try:
        rows = health_rows(project_dir, pairing, fabric)
    except KeyError as exc:
        err.print(f"[red]{exc.args[0]}[/]")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps([r.model_dump(mode="json") | {"breach": list(r.breach_reasons())} for r in rows], indent=1))
        return
    open_breaches = {(pr, vm) for pr in {r.pairing for r in rows}
                     for vm in read_pairing_state(open_estate(project_dir, create=False), pr).breaches}
    table = Table(title="Replication health" + (f" of {pairing}" if pairing else ""))
    for col in ("Pairing", "VMName", "State", "Health", "Primary", "Replica", "LReplTime", "PReplSize(M)",
                "RPO", "Threshold", "Cap", "Cycles ok/missed", "Alert", "Details"):
        table.add_column(col, no_wrap=col in ("LReplTime", "State", "Health"))
    for r in rows:
        style = HEALTH_STYLE.get(r.health, "")
        lrepl = r.last_replication_time.astimezone().strftime("%m-%d %H:%M:%S") if r.last_replication_time else "-"
        table.add_row(r.pairing, r.vm, r.state, f"[{style}]{r.health}[/]" if style else r.health, r.primary or "",
                      r.replica or "", lrepl, "unknown" if r.pending_bytes is None else f"{r.pending_bytes / 2**20:.1f}", _rpo(r), f"{r.rpo_threshold_seconds}s",
                      f"{r.bandwidth_mbps:g} Mbit/s" if r.bandwidth_mbps else "-", f"{r.successful_cycles}/{r.missed_cycles}",
                      "open" if (r.pairing, r.vm) in open_breaches else "", r.details)
    out.print(table)
    bad = sum(1 for r in rows if r.health in ("Warning", "Critical", "Unknown"))
    if bad:
        out.print(f"[yellow]{bad} VM(s) need attention[/]: `siterecovery resync {pairing or 'PAIRING'}` "
                  "resynchronizes those marked for it")


def _import_flows() -> Any:
    """The protection flows (installed with the package; imported here so the core never loads prefect)."""
    try:
        import flows.protection as module
    except ModuleNotFoundError as exc:
        raise SiteRecoveryError(f"cannot import the protection flows ({exc}): install siterecovery with its "
                                "orchestration extra (pip install 'siterecovery[orchestration]')") from None
    return module


@app.command()
def protect(
    pairing: Annotated[str, typer.Argument(help="pairing name")],
    vms: Annotated[list[str] | None, typer.Argument(help="VMs (default: every VM of the protected cloud)")] = None,
    project_dir: ProjectOpt = Path("plans"),
    fabric: FabricOpt = None,
) -> None:
    """Enable protection: replication, initial copy, network mapping and a readiness check, per VM."""
    flows = _import_flows()
    with progress_display(out):
        state = flows.enable_protection(pairing=pairing, project=str(project_dir), vms=vms or None, fabric=fabric,
                                        return_state=True)
    value = state.result(raise_on_failure=False)
    if isinstance(value, BaseException):
        err.print(f"[red]enable-protection failed:[/] {escape(str(value))}", highlight=False)  # [vm=...] is no markup
        raise typer.Exit(1)
    table = Table(title=f"Protection of {pairing}")
    for col in ("VM", "Outcome", "Ready", "Note"):
        table.add_column(col)
    colour = {"protected": "green", "already protected": "dim", "failed": "red", "not ready": "yellow"}
    for r in value:
        c = colour.get(r.outcome, "yellow")
        table.add_row(r.vm, f"[{c}]{r.outcome}[/]", "yes" if r.ready else "no", r.note)
    out.print(table)


@app.command()
def resync(
    pairing: Annotated[str, typer.Argument(help="pairing name")],
    vms: Annotated[list[str] | None, typer.Argument(help="VMs to resynchronize even if not marked "
                                                        "(default: those marked for it)")] = None,
    project_dir: ProjectOpt = Path("plans"),
    fabric: FabricOpt = None,
) -> None:
    """Resynchronize now, ignoring the resync window: compare block checksums and ship what differs."""
    flows = _import_flows()
    with progress_display(out):
        state = flows.resynchronize(pairing=pairing, project=str(project_dir), vms=vms or None, fabric=fabric,
                                    on_demand=True, return_state=True)
    value = state.result(raise_on_failure=False)
    if isinstance(value, BaseException):
        err.print(f"[red]resynchronize failed:[/] {escape(str(value))}", highlight=False)  # [vm=...] is no markup
        raise typer.Exit(1)
    if value.status == "nothing to do":
        out.print(f"nothing to resynchronize in {pairing}: no VM is marked for it (name VMs to resynchronize "
                  "them anyway)", highlight=False)
        return
    table = Table(title=f"Resynchronization of {pairing}")
    for col in ("VM", "Reason", "Changed", "Sent", "Result"):
        table.add_column(col)
    steps = {s.vm: s for s in value.steps}
    for vm, reason in value.candidates.items():
        s = steps.get(vm)
        table.add_row(vm, reason, "yes" if s and s.changed else "no",
                      f"{s.bytes_sent / 2**20:.1f} MiB" if s else "-", s.message if s else "")
    out.print(table)


@app.command()
def scrub(
    pairing: Annotated[str, typer.Argument(help="pairing name")],
    vms: Annotated[list[str] | None, typer.Argument(help="VMs (default: every VM of the pairing)")] = None,
    project_dir: ProjectOpt = Path("plans"),
    fabric: FabricOpt = None,
    rate_mb: Annotated[float, typer.Option("--rate-mb", help="MB/s read per replica host (0: unlimited)")] = 50.0,
    points: Annotated[bool, typer.Option("--points", help="also verify the recovery points' undo logs")] = False,
    repair: Annotated[bool, typer.Option("--repair/--no-repair", help="resynchronize a corrupt replica at once")] = True,
) -> None:
    """Re-hash the replicas against their manifests; report (Critical, an event) and repair corruption."""
    flows = _import_flows()
    state = flows.scrub(pairing=pairing, project=str(project_dir), vms=vms or None, fabric=fabric,
                        rate_mb_per_second=rate_mb, points=points, repair=repair, return_state=True)
    value = state.result(raise_on_failure=False)
    if isinstance(value, BaseException):
        err.print(f"[red]scrub failed:[/] {escape(str(value))}", highlight=False)
        raise typer.Exit(1)
    table = Table(title=f"Scrub of {pairing}")
    for col in ("VM", "Replica host", "Outcome", "Read", "MB/s", "Corrupt blocks", "Note"):
        table.add_column(col)
    colour = {"intact": "green", "repaired": "yellow", "corrupt": "bold red", "skipped": "dim"}
    for r in value:
        table.add_row(r.vm, r.replica_host, f"[{colour.get(r.outcome, 'red')}]{r.outcome}[/]",
                      f"{r.bytes_read / 2**20:.1f} MiB", f"{r.mb_per_second:.1f}",
                      str(r.corrupt_blocks + r.corrupt_undo_logs), escape(r.note))
    out.print(table)
    if any(r.outcome == "corrupt" for r in value):
        raise typer.Exit(1)


vm_app = typer.Typer(no_args_is_help=True, help="Start and stop protected VMs where they run now.")
app.add_typer(vm_app, name="vm")


def _power(action: str, pairing: str, vms: list[str] | None, project_dir: Path, fabric: str | None) -> None:
    flows = _import_flows()
    state = flows.vm_power(pairing=pairing, action=action, project=str(project_dir), vms=vms or None, fabric=fabric,
                           return_state=True)
    value = state.result(raise_on_failure=False)
    if isinstance(value, BaseException):
        err.print(f"[red]vm {action} failed:[/] {escape(str(value))}", highlight=False)
        raise typer.Exit(1)
    for step in value:
        out.print(f"{step.vm}: {step.message}" + ("" if step.changed else " (nothing to do)"), highlight=False)


@vm_app.command("start")
def vm_start(
    pairing: Annotated[str, typer.Argument(help="pairing name")],
    vms: Annotated[list[str] | None, typer.Argument(help="VMs (default: every VM of the pairing)")] = None,
    project_dir: ProjectOpt = Path("plans"),
    fabric: FabricOpt = None,
) -> None:
    """Start protected VMs at their current site."""
    _power("start", pairing, vms, project_dir, fabric)


@vm_app.command("stop")
def vm_stop(
    pairing: Annotated[str, typer.Argument(help="pairing name")],
    vms: Annotated[list[str] | None, typer.Argument(help="VMs (default: every VM of the pairing)")] = None,
    project_dir: ProjectOpt = Path("plans"),
    fabric: FabricOpt = None,
) -> None:
    """Stop protected VMs at their current site (qemu: ACPI power-off, then kill after the deadline)."""
    _power("stop", pairing, vms, project_dir, fabric)


replication_app = typer.Typer(no_args_is_help=True, help="Suspend or resume replication of a pairing's VMs.")
app.add_typer(replication_app, name="replication")


def _toggle(flow_name: str, title: str, pairing: str, vms: list[str] | None, project_dir: Path,
            fabric: str | None) -> None:
    flows = _import_flows()
    state = flows.FLOWS[flow_name](pairing=pairing, project=str(project_dir), vms=vms or None, fabric=fabric,
                                   return_state=True)
    value = state.result(raise_on_failure=False)
    if isinstance(value, BaseException):
        err.print(f"[red]{flow_name} failed:[/] {escape(str(value))}", highlight=False)  # [vm=...] is no markup
        raise typer.Exit(1)
    table = Table(title=f"{title} of {pairing}")
    for col in ("VM", "State", "Changed", "Message"):
        table.add_column(col)
    for s in value:
        table.add_row(s.vm, s.state, "yes" if s.changed else "no", s.message)
    out.print(table)


@replication_app.command("suspend")
def replication_suspend(
    pairing: Annotated[str, typer.Argument(help="pairing name")],
    vms: Annotated[list[str] | None, typer.Argument(help="VMs (default: every VM of the pairing)")] = None,
    project_dir: ProjectOpt = Path("plans"),
    fabric: FabricOpt = None,
) -> None:
    """Suspend replication (Suspend-VMReplication): no cycle ships changes until `replication resume`;
    the replica keeps its recovery points and can still fail over."""
    _toggle("suspend-replication", "Suspended replication", pairing, vms, project_dir, fabric)


@replication_app.command("resume")
def replication_resume(
    pairing: Annotated[str, typer.Argument(help="pairing name")],
    vms: Annotated[list[str] | None, typer.Argument(help="VMs (default: every VM of the pairing)")] = None,
    project_dir: ProjectOpt = Path("plans"),
    fabric: FabricOpt = None,
) -> None:
    """Resume suspended replication (Resume-VMReplication): the next cycle ships what was written meanwhile."""
    _toggle("resume-replication", "Resumed replication", pairing, vms, project_dir, fabric)
