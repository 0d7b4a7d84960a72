"""Run reports: what a recovery-plan run did, as Markdown (for the Prefect artifact) and as one
self-contained HTML file with a timeline of every VM step.

Pure: the flow collects records while it runs and passes them here; nothing in this module talks to
Prefect or to a fabric. Achieved RPO and RTO, and the time spent waiting on people, are derived here
so that every report computes them the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from jinja2 import Environment, StrictUndefined, select_autoescape
from pydantic import Field

from .errors import ExecutionError, SiteRecoveryError
from .groups import GroupPoint
from .model import ScriptAction
from .model.common import Frozen

if TYPE_CHECKING:
    from .compile import Step

StepStatus = Literal["completed", "cached", "failed", "skipped"]

# The start of the service: the step after which a VM counts as up (for the achieved RTO).
UP_OPERATIONS = frozenset({"start_vm"})
POINT_OPERATIONS = frozenset({"failover", "test_failover"})


class StepRecord(Frozen):
    id: str
    label: str
    stage: str
    operation: str
    group: str | None = None
    vm: str | None = None
    host: str | None = None
    status: StepStatus
    started_at: datetime | None = None
    finished_at: datetime | None = None
    changed: bool | None = None
    message: str = ""
    point_id: str | None = None
    point_created_at: datetime | None = None
    error: str | None = None
    slot_wait_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return 0.0


class ApprovalRecord(Frozen):
    step_id: str
    action: str
    group: str | None = None
    approver_group: str | None = None
    requested_at: datetime
    answered_at: datetime | None = None
    decision: Literal["approved", "rejected", "timed_out", "failed"]
    approver: str = ""
    comment: str = ""
    ticket: str = ""

    @property
    def seconds(self) -> float:
        return ((self.answered_at or self.requested_at) - self.requested_at).total_seconds()


class ScriptRecord(Frozen):
    step_id: str
    action: str
    group: str | None = None
    vm: str | None = None
    host: str | None = Field(None, description="None: ran on the orchestrator")
    argv: tuple[str, ...] = ()
    status: Literal["completed", "cached", "failed", "skipped"]
    returncode: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None


class AuditRecord(Frozen):
    """One row of the audit trail: a state-changing fabric call or a decision on an approval."""

    at: datetime | None = None
    who: str = Field(description="OS user of the process that acted, or the approver")
    flow_run: str | None = Field(None, description="the Prefect flow run that acted (an earlier one: cached)")
    kind: Literal["fabric", "approval", "run"]
    action: str
    target: str = ""
    outcome: str


# Fabric operations that only read: not audited. Everything else a step does changes the estate.
READ_OPERATIONS = frozenset({"replication_health", "recovery_points", "vm_state"})


def run_records(steps: Iterable[Step], entries: Mapping[str, Mapping[str, Any]],
                flow_run: str | None) -> tuple[list[StepRecord], list[ScriptRecord]]:
    """The report's VM step and script records of one run, in plan order: the compiled `steps` (batches,
    then cleanup) joined with the intent's journal `entries` (step id -> its latest entry). A step no run
    of the intent finished is skipped; one an earlier run (not `flow_run`) completed is cached."""
    out: list[StepRecord] = []
    scripts: list[ScriptRecord] = []
    for s in steps:
        e = entries.get(s.id)
        earlier = e is not None and e["flow_run"] != flow_run
        if s.kind == "vm":
            if e is None:
                out.append(StepRecord(id=s.id, label=s.label, stage=s.stage, operation=s.operation, group=s.group,
                                      vm=s.vm, host=s.host, status="skipped"))
                continue
            rec = StepRecord.model_validate(e["record"])
            if earlier and rec.status == "completed":
                rec = rec.model_copy(update={"status": "cached"})
            out.append(rec)
        elif s.kind == "script":
            if e is None:
                assert isinstance(s.action, ScriptAction)
                scripts.append(ScriptRecord(step_id=s.id, action=s.action.name, group=s.group, vm=s.vm,
                                            host=s.action.host, status="skipped"))
                continue
            srec = ScriptRecord.model_validate(e["record"])
            if earlier and srec.status == "completed":
                srec = srec.model_copy(update={"status": "cached"})
            scripts.append(srec)
    return out, scripts


def audit_records(steps: Iterable[StepRecord], entries: Mapping[str, Mapping[str, Any]],
                  approvals: Iterable[ApprovalRecord], closed: Iterable[str], flow_run: str | None, who: str,
                  now: datetime) -> list[AuditRecord]:
    """Who did what when: one row per state-changing fabric call the intent made (cached ones with the
    run and user that made them, from the journal `entries`), per approval decision and per earlier run
    taken over (`closed`, at `now`); by time. `who`: the user of this run, for rows the journal does not name."""
    rows: list[AuditRecord] = [AuditRecord(at=now, who=who, flow_run=flow_run, kind="run", action="took over",
                                           target=c, outcome="marked Crashed") for c in closed]
    for s in steps:
        if s.operation in READ_OPERATIONS or s.status == "skipped":
            continue
        e = entries.get(s.id) or {}
        outcome: str = "cached (done by an earlier run)" if s.status == "cached" else s.status
        if s.status == "failed" and s.error:
            outcome = f"failed: {s.error}"
        elif s.changed is False:
            outcome += " (no change needed)"
        rows.append(AuditRecord(at=s.started_at, who=e.get("user") or who, flow_run=e.get("flow_run", flow_run),
                                kind="fabric", action=s.operation, target=f"{s.vm or ''} on {s.host or '?'}",
                                outcome=outcome))
    for a in approvals:
        approver = a.approver or ("(nobody answered)" if a.decision == "timed_out" else "(unnamed)")
        rows.append(AuditRecord(at=a.answered_at or a.requested_at, who=approver, flow_run=flow_run, kind="approval",
                                action=a.action, target=f"group {a.group or '(plan)'}; approver group "
                                f"{a.approver_group or 'any'}", outcome=a.decision + (f", ticket {a.ticket}"
                                                                                      if a.ticket else "")))
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(rows, key=lambda x: x.at or far)


class VMPosition(Frozen):
    """Where a VM was left when a run stopped, from the steps that completed."""

    vm: str
    state: str
    pending: bool = Field(False, description="a failover is under way (not committed): commit or cancel it")


class RunReport(Frozen):
    plan: str
    plan_version: str
    failover_type: str
    direction: str
    recovery_point: str
    failure_policy: str
    intent: str
    resumed: bool = False
    flow_run_id: str | None = None
    fabric: str = ""
    started_at: datetime
    finished_at: datetime
    # crashed: the run's process died; the next run of the plan wrote this report from its step journal.
    status: Literal["succeeded", "failed", "stopped", "cancelled", "crashed"]
    steps: tuple[StepRecord, ...] = ()
    approvals: tuple[ApprovalRecord, ...] = ()
    scripts: tuple[ScriptRecord, ...] = ()
    failures: tuple[str, ...] = ()
    operator: str = Field("", description="OS user who ran this flow run")
    audit: tuple[AuditRecord, ...] = ()
    superseded: tuple[str, ...] = Field((), description="earlier runs of the intent found dead and marked Crashed")
    positions: tuple[VMPosition, ...] = Field((), description="where each VM was left, when a failover stopped")
    choices: tuple[str, ...] = Field((), description="the ways on from a stopped failover")
    requested_by: str = Field("", description="who asked for the run: typed in the UI form (Prefect has no "
                                              "login) or the OS user of a command-line run")
    rpo_objective_seconds: float | None = None
    rto_objective_seconds: float | None = None
    group_points: tuple[GroupPoint, ...] = Field((), description="consistency groups: the one group point each "
                                                                 "group's members failed over to")

    # ---- derived figures ------------------------------------------------------------------
    @property
    def artifact_key(self) -> str:
        return artifact_key(self.plan, self.failover_type)

    def vm_rpo(self) -> dict[str, tuple[str, float]]:
        """vm -> (recovery point id, its age in seconds when the failover used it)."""
        out: dict[str, tuple[str, float]] = {}
        for s in self.steps:
            if s.vm and s.operation in POINT_OPERATIONS and s.point_id and s.point_created_at and s.started_at:
                out[s.vm] = (s.point_id, max(0.0, (s.started_at - s.point_created_at).total_seconds()))
        return out

    def final_sync_vms(self) -> frozenset[str]:
        """VMs of a planned failover that lost nothing: their source was shut down and its pending changes
        shipped (a finished prepare step), and the failover used that final point, not an older one (the
        same point id where the fabric names it; otherwise the run asked for the latest point)."""
        if self.failover_type != "planned":
            return frozenset()
        done = ("completed", "cached")
        prepared = {s.vm: s for s in self.steps if s.vm and s.operation == "prepare_planned_failover"
                    and s.status in done}
        out = set()
        for s in self.steps:
            if not (s.vm in prepared and s.operation == "failover" and s.status in done):
                continue
            final = prepared[s.vm].point_id
            if (s.point_id == final) if (final and s.point_id) else self.recovery_point == "latest":
                out.add(s.vm)
        return frozenset(out)

    @property
    def point_age_seconds(self) -> float | None:
        """Age of the oldest recovery point used, when the failover used it (whatever the failover type)."""
        ages = [age for _, age in self.vm_rpo().values()]
        return max(ages) if ages else None

    @property
    def achieved_rpo_seconds(self) -> float | None:
        """Data loss: 0 for the VMs a planned failover synced after shutdown, the point's age for the rest."""
        synced = self.final_sync_vms()
        ages = [age for vm, (_, age) in self.vm_rpo().items() if vm not in synced]
        if ages:
            return max(ages)
        return 0.0 if synced else None

    @property
    def data_loss(self) -> str:
        """The data-loss line of the report, in words."""
        rpo = self.achieved_rpo_seconds
        if rpo is None:
            return "unknown (no recovery point reported)"
        if rpo == 0.0 and self.final_sync_vms():
            return "none (final sync after shutdown)"
        return f"up to {_secs(rpo)} (age of the oldest recovery point used)"

    @property
    def achieved_rto_seconds(self) -> float | None:
        """From the start of the run to the moment the last VM was started (healthy)."""
        ups = [s.finished_at for s in self.steps if s.operation in UP_OPERATIONS and s.status in ("completed", "cached")
               and s.finished_at and s.stage == "group"]
        return (max(ups) - self.started_at).total_seconds() if ups else None

    @property
    def people_seconds(self) -> float:
        return sum(a.seconds for a in self.approvals)

    @property
    def fabric_seconds(self) -> float:
        """Wall time during which at least one VM step was running (union of the step intervals)."""
        spans = sorted((s.started_at, s.finished_at) for s in self.steps
                       if s.started_at and s.finished_at and s.status != "cached")
        total, end = 0.0, None
        for a, b in spans:
            if end is None or a > end:
                total += (b - a).total_seconds()
                end = b
            elif b > end:
                total += (b - end).total_seconds()
                end = b
        return total

    @property
    def seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def groups(self) -> list[dict[str, object]]:
        """Per group (and per plan-wide stage), in order of first appearance: start, end, VM count, status."""
        order: dict[str, dict[str, object]] = {}
        for s in self.steps:
            name = s.group if s.stage in ("group", "shutdown", "cleanup") and s.group else s.stage
            key = f"{s.stage}:{name}" if s.stage in ("shutdown", "cleanup") else name
            g = order.setdefault(key, {"name": name, "stage": s.stage, "start": None, "end": None,
                                       "vms": set(), "failed": 0, "skipped": 0})
            if s.vm:
                g["vms"].add(s.vm)  # type: ignore[attr-defined]
            if s.status == "failed":
                g["failed"] = int(g["failed"]) + 1  # type: ignore[call-overload]
            if s.status == "skipped":
                g["skipped"] = int(g["skipped"]) + 1  # type: ignore[call-overload]
            if s.started_at and (g["start"] is None or s.started_at < g["start"]):  # type: ignore[operator]
                g["start"] = s.started_at
            if s.finished_at and (g["end"] is None or s.finished_at > g["end"]):  # type: ignore[operator]
                g["end"] = s.finished_at
        for g in order.values():
            g["vms"] = len(g["vms"])  # type: ignore[arg-type]
        return list(order.values())

    def summary(self) -> dict[str, object]:
        """The flow's return value: small, JSON-friendly."""
        counts: dict[str, int] = {}
        for s in self.steps:
            counts[s.status] = counts.get(s.status, 0) + 1
        return {"plan": self.plan, "plan_version": self.plan_version, "failover_type": self.failover_type,
                "direction": self.direction, "status": self.status, "intent": self.intent, "resumed": self.resumed,
                "steps": counts, "failures": list(self.failures),
                "approvals": [a.model_dump(mode="json") for a in self.approvals],
                "group_points": {g.group: g.id for g in self.group_points},
                "achieved_rpo_seconds": self.achieved_rpo_seconds, "achieved_rto_seconds": self.achieved_rto_seconds,
                "data_loss": self.data_loss, "point_age_seconds": self.point_age_seconds,
                "people_seconds": round(self.people_seconds, 3), "fabric_seconds": round(self.fabric_seconds, 3),
                "seconds": round(self.seconds, 3)}


def artifact_key(plan: str, failover_type: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    prefix = "drill" if failover_type == "test" else "failover"
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{prefix}-{plan}".lower())).strip("-")


def report_filename(report: RunReport) -> str:
    stamp = report.started_at.strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^a-z0-9-]", "-", report.plan.lower())
    return f"{safe}-{report.failover_type}-{stamp}.html"


def _secs(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def _md(text: object) -> str:
    # Table cells: a pipe or a newline would break the row.
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def render_markdown(report: RunReport) -> str:
    r = report
    out = [f"# {r.plan} v{r.plan_version}: {r.failover_type} failover, {r.direction} - **{r.status}**", "",
           f"- Started {_time(r.started_at)}, finished {_time(r.finished_at)} ({_secs(r.seconds)})"
           + paused_note(r.people_seconds),
           f"- Recovery point: {r.recovery_point}; data loss: {r.data_loss}; "
           f"age of the oldest point used: {_secs(r.point_age_seconds)}"
           + against(r.achieved_rpo_seconds, r.rpo_objective_seconds),
           f"- Achieved RTO (start to last VM started): {_secs(r.achieved_rto_seconds)}"
           + against(r.achieved_rto_seconds, r.rto_objective_seconds),
           f"- Waiting on people: {_secs(r.people_seconds)}; fabric busy: {_secs(r.fabric_seconds)}",
           f"- Intent `{r.intent}`{' (resumed: completed steps were not repeated)' if r.resumed else ''}; "
           f"failure policy: {r.failure_policy}; fabric: {r.fabric}", ""]
    if r.failures:
        out += ["## Failures", ""] + [f"- {_md(f)}" for f in r.failures] + [""]
    if r.group_points:
        out += ["## Consistency groups", "", "| group | group point | consistency | captured at | members |",
                "|---|---|---|---|---|"]
        out += [f"| {_md(g.group)} | {_md(g.id)} | {g.consistency} | {_time(g.created_at)} | "
                f"{_md(', '.join(sorted(g.members)))} |" for g in r.group_points] + [""]
    if r.positions or r.choices:
        out += ["## Where it stopped", "", "| VM | state |", "|---|---|"]
        out += [f"| {_md(p.vm)} | {_md(p.state)} |" for p in r.positions]
        out += ["", "### Choices", ""] + [f"- {_md(c)}" for c in r.choices] + [""]
    out += ["## Groups", "", "| group | stage | VMs | start | end | failed | skipped |", "|---|---|---|---|---|---|---|"]
    for g in r.groups():
        out.append(f"| {_md(g['name'])} | {g['stage']} | {g['vms']} | {_time(g['start'])} | {_time(g['end'])} "  # type: ignore[arg-type]
                   f"| {g['failed']} | {g['skipped']} |")
    rpo = r.vm_rpo()
    out += ["", "## VMs", "", "| step | host | status | start | seconds | recovery point (age) | message |",
            "|---|---|---|---|---|---|---|"]
    for s in r.steps:
        point = f"{rpo[s.vm][0]} ({_secs(rpo[s.vm][1])})" if s.vm in rpo and s.operation in POINT_OPERATIONS else ""
        out.append(f"| {_md(s.label)} | {_md(s.host or '')} | {s.status} | {_time(s.started_at)} | {s.seconds:.2f} "
                   f"| {_md(point)} | {_md(s.error or s.message)} |")
    if r.approvals:
        out += ["", "## Approvals", "", "| action | decision | approver | when | waited | comment | ticket |",
                "|---|---|---|---|---|---|---|"]
        for a in r.approvals:
            out.append(f"| {_md(a.action)} | {a.decision} | {_md(a.approver)} | {_time(a.answered_at)} "
                       f"| {_secs(a.seconds)} | {_md(a.comment)} | {_md(a.ticket)} |")
    if r.superseded:
        out += ["", "## Earlier runs taken over", ""] + [f"- {_md(x)} was marked Crashed" for x in r.superseded]
    if r.audit or r.requested_by:
        out += ["", "## Audit", "", f"Run by OS user `{_md(r.operator)}` as flow run `{r.flow_run_id}`.", ""]
        out += [requester_line(r.requested_by), ""] if r.requested_by else []
        out += ["| when | who | flow run | kind | action | target | outcome |", "|---|---|---|---|---|---|---|"]
        for x in r.audit:
            out.append(f"| {_time(x.at)} | {_md(x.who)} | {_md(x.flow_run or '')} | {x.kind} | {_md(x.action)} "
                       f"| {_md(x.target)} | {_md(x.outcome)} |")
    if r.scripts:
        out += ["", "## Scripts", "", "| script | where | status | exit | output |", "|---|---|---|---|---|"]
        for sc in r.scripts:
            text = (sc.error or sc.stdout.strip() or sc.stderr.strip())[-200:]
            out.append(f"| {_md(sc.action)}{' ' + _md(sc.vm) if sc.vm else ''} | {_md(sc.host or 'orchestrator')} "
                       f"| {sc.status} | {'' if sc.returncode is None else sc.returncode} | {_md(text)} |")
    return "\n".join(out) + "\n"


_ENV = Environment(autoescape=select_autoescape(default=True, default_for_string=True), undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True)
_ENV.filters["secs"] = _secs
_ENV.filters["time"] = _time


def timeline(report: RunReport) -> list[dict[str, object]]:
    """Rows for the HTML timeline: one per lane (group or stage), bars as percentages of the run."""
    t0, total = report.started_at, max(report.seconds, 1e-6)

    def pct(t: datetime) -> float:
        return round(min(100.0, max(0.0, (t - t0).total_seconds() / total * 100)), 3)

    lanes: dict[str, dict[str, object]] = {}
    for s in report.steps:
        if not (s.started_at and s.finished_at) or s.status == "cached":
            continue
        lane = s.group if s.stage == "group" and s.group else (f"{s.stage}: {s.group}" if s.group else s.stage)
        bars = lanes.setdefault(lane, {"name": lane, "bars": []})["bars"]
        left = pct(s.started_at)
        bars.append({"label": s.label, "left": left, "width": max(0.3, pct(s.finished_at) - left),  # type: ignore[attr-defined]
                     "status": s.status, "title": f"{s.label}: {s.seconds:.2f} s, {s.status}"
                     + (f" - {s.error}" if s.error else "")})
    if report.approvals:
        bars = lanes.setdefault("people", {"name": "waiting on people", "bars": []})["bars"]
        for a in report.approvals:
            left = pct(a.requested_at)
            bars.append({"label": f"approve {a.action}", "left": left,  # type: ignore[attr-defined]
                         "width": max(0.3, pct(a.answered_at or a.requested_at) - left), "status": "people",
                         "title": f"{a.action}: {a.decision} by {a.approver or '-'} after {_secs(a.seconds)}"})
    return list(lanes.values())


def render_html(report: RunReport) -> str:
    source = resources.files("siterecovery").joinpath("templates/report.html.j2").read_text(encoding="utf-8")
    return _ENV.from_string(source).render(r=report, lanes=timeline(report), rpo=report.vm_rpo(),
                                            groups=report.groups())


@dataclass(frozen=True)
class VMFailure:
    """One VM that failed in a batch, with its error's own attributes (not its rendered text): `reason` is
    what the operator reads for this VM alone; `cause` the error without this VM's context, the same for
    every VM it hit."""

    vm: str
    label: str
    reason: str
    cause: str
    operation: str | None = None
    host: str | None = None
    error_id: str | None = None
    kind: str = ""

    def key(self) -> tuple[str, str | None, str | None, str]:
        """What makes two failures the same way to fail: the kind of error, the operation, the error id and
        the message, with the VM's own name in it taken as any VM's."""
        cause = re.sub(rf"(?<![\w-]){re.escape(self.vm)}(?![\w-])", "{vm}", self.cause) if self.vm else self.cause
        return self.kind, self.operation, self.error_id, cause


def vm_failure(vm: str, label: str, exc: BaseException | None) -> VMFailure:
    """The failure of `vm`'s step `label` from the exception its task raised (None: no error was kept)."""
    if exc is None:
        return VMFailure(vm=vm, label=label, reason="failed", cause="failed")
    if isinstance(exc, ExecutionError):
        return VMFailure(vm=vm, label=label, reason=str(exc), cause=exc.render(context=False), operation=exc.operation, host=exc.host,
                         error_id=exc.error_id, kind=type(exc).__name__)
    text = str(exc) if isinstance(exc, SiteRecoveryError) else f"{type(exc).__name__}: {exc}"
    return VMFailure(vm=vm, label=label, reason=text, cause=text, kind=type(exc).__name__)


def same_cause(failed: list[VMFailure]) -> list[tuple[str, list[str]]]:
    """Failed VMs -> one failure line per distinct cause, with its VMs.

    One missing precondition (replication not enabled, a host down) fails every VM of a batch the same
    way: the operator reads one line naming the cause, the VMs and the host(s) they failed on, not the same
    error once per VM."""
    groups: dict[tuple[str, str | None, str | None, str], list[VMFailure]] = {}
    for f in failed:
        groups.setdefault(f.key(), []).append(f)
    out: list[tuple[str, list[str]]] = []
    for members in groups.values():
        vms = [m.vm for m in members]
        if len(members) == 1:
            out.append((f"{members[0].label}: {members[0].reason}", vms))
            continue
        hosts = list(dict.fromkeys(m.host for m in members if m.host))
        on = f" on host {hosts[0]}" if len(hosts) == 1 else f" on hosts {', '.join(hosts)}" if hosts else ""
        out.append((f"{len(members)} VMs failed the same way ({', '.join(m.label for m in members)}){on}: "
                    f"{members[0].cause}", vms))
    return out


def positions(steps: list[StepRecord] | tuple[StepRecord, ...]) -> list[VMPosition]:
    """Each VM's position after a (stopped) planned or unplanned failover, from its completed steps."""
    done: dict[str, set[str]] = {}
    order: list[str] = []
    for s in steps:
        if not s.vm:
            continue
        if s.vm not in done:
            done[s.vm] = set()
            order.append(s.vm)
        if s.status in ("completed", "cached"):
            done[s.vm].add(s.operation)
    out = []
    for vm in order:
        ops = done[vm]
        if "reverse_replication" in ops:
            out.append(VMPosition(vm=vm, state="failed over, committed, replicating back"))
        elif "commit_failover" in ops:
            out.append(VMPosition(vm=vm, state="failed over and committed (FailedOver)"))
        elif "failover" in ops:
            up = ", running on the target" if "start_vm" in ops else ", not started"
            out.append(VMPosition(vm=vm, state=f"failed over, not committed (FailedOverWaitingCompletion){up}",
                                  pending=True))
        elif "prepare_planned_failover" in ops:
            out.append(VMPosition(vm=vm, state="source shut down and prepared for failover; not failed over",
                                  pending=True))
        elif "stop_vm" in ops:
            out.append(VMPosition(vm=vm, state="source stopped; not failed over (still replicating)"))
        else:
            out.append(VMPosition(vm=vm, state="untouched (replicating as before)"))
    return out


def way_back(plan: str, where: list[VMPosition]) -> list[str]:
    """What an operator can do about a stopped failover, in the words of the deployments and the CLI."""
    pending = [p for p in where if p.pending]
    resume = (f"resume: run recover/{plan} with action=resume (or re-run the same failover): completed steps "
              "are not repeated")
    if not pending:
        if any("committed" in p.state for p in where):
            return [resume]
        return [f"nothing was failed over: fix the cause and run failover/{plan} again when ready"]
    out = [resume]
    if any("FailedOverWaitingCompletion" in p.state for p in pending):
        out.append(f"commit: run recover/{plan} with action=commit (keep the failed-over VMs: no way back after it)")
    out.append(f"cancel-failover: run recover/{plan} with action=cancel-failover, or `siterecovery failover cancel "
               f"{plan} --confirm {plan}` (every VM back to before the failover; the next run may choose another "
               "recovery point)")
    return out


def crashed_report(meta: Mapping[str, Any], entries: Iterable[Mapping[str, Any]], found_by: str | None,
                   now: datetime) -> RunReport:
    """The report of a run whose process died before it wrote its own: from what it recorded when it
    started (`meta`, its marker) and its step journal `entries`, found by the flow run `found_by` at `now`.
    It says the run crashed, lists the steps it finished, and where a failover left each VM (for a drill:
    the test failovers the next drill cleans up)."""
    plan = str(meta["plan"])
    entries = list(entries)
    steps = tuple(StepRecord.model_validate(e["record"]) for e in entries if e["kind"] == "step")
    scripts = tuple(ScriptRecord.model_validate(e["record"]) for e in entries if e["kind"] == "script")
    started = datetime.fromisoformat(meta["started"])
    ends = [s.finished_at for s in steps if s.finished_at]
    test = meta["failover_type"] == "test"
    where = [] if test else positions(list(steps))
    done = {(st.vm, st.operation) for st in steps if st.status == "completed"}
    left = sorted({vm for vm, op in done if vm and op == "test_failover" and (vm, "cleanup_test_failover") not in done})
    choices = ([f"the next drill of '{plan}' cleans up the test failover(s) it left: {', '.join(left) or 'none'}"]
               if test else way_back(plan, where) if where else [])
    return RunReport(
        plan=plan, plan_version=meta.get("plan_version", "?"), failover_type=meta["failover_type"],
        direction=meta.get("direction", "forward"), recovery_point=meta.get("recovery_point", "?"),
        failure_policy=meta.get("failure_policy", "?"), intent=meta["intent"], flow_run_id=meta.get("flow_run"),
        fabric=meta.get("fabric", ""), started_at=started, finished_at=max(ends) if ends else started,
        status="crashed", steps=steps, scripts=scripts, operator=meta.get("operator", ""),
        requested_by=meta.get("requested_by", ""),
        failures=(f"the run's process died (worker or node lost) after {len(steps) + len(scripts)} finished step(s); "
                  f"found by flow run {found_by} at {now.isoformat(timespec='seconds')}, which wrote this "
                  "report from the run's step journal",),
        positions=tuple(where), choices=tuple(choices),
        rpo_objective_seconds=meta.get("rpo_objective_seconds"), rto_objective_seconds=meta.get("rto_objective_seconds"))


def stop_line(where: list[VMPosition], choices: list[str]) -> str:
    """One line for the log: each VM's state and the choices."""
    states: dict[str, list[str]] = {}
    for p in where:
        states.setdefault(p.state, []).append(p.vm)
    vms = "; ".join(f"{', '.join(v)}: {st}" for st, v in states.items())
    return f"VMs now: {vms}. Choices: " + " | ".join(choices)


def requester_line(requested_by: str) -> str:
    """Who asked for the run, and how far that can be trusted."""
    return (f"Requested by **{_md(requested_by)}**. Open-source Prefect has no login: a name typed in the UI "
            "form is what the requester said, not an authenticated identity (put the UI behind an "
            "authenticating proxy: docs/UI.md).")


def met(achieved: float | None, objective: float | None) -> str | None:
    """"met" / "missed" against an objective; None when either is unknown."""
    if achieved is None or objective is None:
        return None
    return "met" if achieved <= objective else "missed"


def against(achieved: float | None, objective: float | None) -> str:
    """The report's words for an achieved figure against its objective (empty without an objective)."""
    if objective is None:
        return ""
    verdict = met(achieved, objective)
    return f" against objective {_secs(objective)}: **{verdict or 'not measured'}**"


class TrendPoint(Frozen):
    """One drill in a plan's trend: when, how it ended, achieved RTO and RPO."""

    at: datetime
    status: str
    flow_run: str | None = None
    rto_seconds: float | None = None
    rpo_seconds: float | None = None


def trend_point(report: RunReport) -> TrendPoint:
    return TrendPoint(at=report.started_at, status=report.status, flow_run=report.flow_run_id,
                      rto_seconds=report.achieved_rto_seconds, rpo_seconds=report.achieved_rpo_seconds)


def trend_svg(points: list[TrendPoint], rto_objective: float | None = None, width: int = 640,
              height: int = 220) -> str:
    """A line chart of achieved RTO (and RPO) per drill, oldest left, with the RTO objective as a line."""
    pad, n = 40, len(points)
    values = [v for p in points for v in (p.rto_seconds, p.rpo_seconds) if v is not None]
    top = max([*values, rto_objective or 0.0, 1.0]) * 1.1

    def xy(i: int, v: float) -> str:
        x = pad + (i * (width - 2 * pad) / max(1, n - 1))
        y = height - pad - v / top * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
           f'<text x="4" y="{pad - 8}">{_secs(top)}</text>', f'<text x="4" y="{height - pad}">0</text>']
    if rto_objective:
        y = height - pad - rto_objective / top * (height - 2 * pad)
        out.append(f'<line x1="{pad}" y1="{y:.1f}" x2="{width - pad}" y2="{y:.1f}" stroke="#c00" '
                   f'stroke-dasharray="4 3"/><text x="{width - pad - 90}" y="{y - 4:.1f}" fill="#c00">RTO objective</text>')
    for field, colour, label in (("rto_seconds", "#1f6feb", "RTO"), ("rpo_seconds", "#2da44e", "RPO")):
        pts = [(i, getattr(p, field)) for i, p in enumerate(points) if getattr(p, field) is not None]
        if pts:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                       f'points="{" ".join(xy(i, v) for i, v in pts)}"/>')
            out += [f'<circle cx="{xy(i, v).split(",")[0]}" cy="{xy(i, v).split(",")[1]}" r="3" fill="{colour}"/>'
                    for i, v in pts]
            out.append(f'<text x="{width - pad + 4}" y="{xy(*pts[-1]).split(",")[1]}" fill="{colour}">{label}</text>')
    out.append(f'<text x="{pad}" y="{height - 10}">{n} drill(s), oldest left</text></svg>')
    return "".join(out)


def trends_markdown(plan: str, points: list[TrendPoint], rpo_objective: float | None = None,
                    rto_objective: float | None = None, chart: str = "") -> str:
    """The drill-trends artifact: the chart (an image reference) and one row per drill, newest first, with
    the change in RTO against the drill before (a slower drill reads as a regression)."""
    out = [f"# Drill trends: {plan}", "",
           f"RTO objective: {_secs(rto_objective)}; RPO objective: {_secs(rpo_objective)}.", ""]
    if chart:
        out += [chart, ""]
    out += ["| drill started | status | RTO | vs previous | RTO objective | RPO | RPO objective | flow run |",
            "|---|---|---|---|---|---|---|---|"]
    rows = []
    for i, p in enumerate(points):
        prev = points[i - 1].rto_seconds if i > 0 else None
        delta = ""
        if prev is not None and p.rto_seconds is not None:
            d = p.rto_seconds - prev
            delta = f"{'+' if d >= 0 else '-'}{_secs(abs(d))}" + (" (slower)" if d > 0.1 * prev else "")
        rows.append(f"| {_time(p.at)} | {p.status} | {_secs(p.rto_seconds)} | {delta} "
                    f"| {met(p.rto_seconds, rto_objective) or ''} | {_secs(p.rpo_seconds)} "
                    f"| {met(p.rpo_seconds, rpo_objective) or ''} | {_md(p.flow_run or '')} |")
    return "\n".join(out + rows[::-1]) + "\n"


def trends_key(plan: str) -> str:
    return artifact_key(plan, "test").replace("drill-", "drill-trends-", 1)


def paused_note(people_seconds: float) -> str:
    """Why Prefect's run duration is shorter than the report's: it leaves out the time a run is Paused."""
    if people_seconds < 0.5:
        return ""
    return (f"; Prefect's duration of the flow run leaves out the {_secs(people_seconds)} it was paused waiting "
            "for approvals")
