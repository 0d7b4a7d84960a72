"""The `recovery-plan` flow: one run of a recovery plan (test, planned or unplanned failover, forward
or failback) on its fabric drivers, and `execute_plan`, the engine the `dr-drill` flow shares.

Batches run in order; the VMs of a batch run concurrently as tasks under the per-host and per-site
limits, each waiting only for the VMs it boots after; scripts run as tasks, manual actions pause the
run. A test failover is always cleaned up, also after a failure. Every run ends with a report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from siterecovery.compile import Batch, CompiledPlan, RunOptions, Step, compile_plan
from siterecovery.errors import (
    ApprovalRejected,
    ApprovalTimedOut,
    ConfigurationError,
    NotFoundError,
    SiteRecoveryError,
)
from siterecovery.estate import open_estate
from siterecovery.fabric import PointChoice
from siterecovery.fabric.base import PointKind
from siterecovery.groups import GroupPoint, choose_group_point, group_points, member_choices
from siterecovery.intent import Intent, StepJournal, intent_key, os_user
from siterecovery.model import Direction, FailoverType, FailurePolicy, ManualAction, ScriptAction
from siterecovery.paths import child
from siterecovery.project import PlanSource, Project, load_project
from siterecovery.replica.engine import write_json_atomic
from siterecovery.report import (
    POINT_OPERATIONS,
    ApprovalRecord,
    RunReport,
    TrendPoint,
    VMFailure,
    audit_records,
    crashed_report,
    positions,
    render_html,
    render_markdown,
    report_filename,
    run_records,
    same_cause,
    stop_line,
    trend_point,
    trend_svg,
    trends_key,
    trends_markdown,
    vm_failure,
    way_back,
)
from siterecovery.request import RunRequest
from tasks.fabric import get_fabric, result_storage
from tasks.limits import Reservation, ensure_limits, limit_name
from tasks.runtime import task_outcome
from tasks.script import ScriptJob, run_script, script_cache_key
from tasks.vm import VMJob, job_cache_key, run_vm_steps

from .approval import describe, request_approval
from .session import IntentStart, RunSession

# VM tasks mostly wait on the fabric (or on their host's slot): more threads than cores. The limits,
# not this number, bound what runs against the estate.
MAX_WORKERS = 32

class _ExpectedErrors(logging.Filter):
    """Prefect logs the exception that ends a flow run with its traceback. An error this project raises
    on purpose (a refusal, a guard, a plan that stopped or failed with its report written) already says
    what happened and what to do: log it as one line. Tracebacks stay for everything else (bugs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, SiteRecoveryError):
            kind = "refused" if isinstance(exc, ConfigurationError) else "stopped"
            record.msg, record.args = "%s: %s", (kind, str(exc))
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("prefect.flow_runs").addFilter(_ExpectedErrors())


class PlanFailed(SiteRecoveryError):
    """The run did not complete: `summary` and `report` (HTML path) say what happened."""

    def __init__(self, message: str, summary: dict[str, Any], report: str) -> None:
        super().__init__(message, summary=summary, report=report)
        self.summary = summary
        self.report = report


def load_plan(plan: str, project: str | Path = "plans") -> tuple[Project, PlanSource]:
    """`plan` is a plan file, or a plan name in the project directory `project`."""
    p = Path(plan)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        proj = load_project(p.parent)
        found = [ps for ps in proj.plans.values() if ps.file.resolve() == p.resolve()]
        if len(found) != 1:
            raise ConfigurationError(f"{p} holds {len(found)} recovery plans; name one of them and pass --project")
        return proj, found[0]
    proj = load_project(project)
    if plan not in proj.plans:
        raise ConfigurationError(f"unknown plan '{plan}' in {proj.root} (known: {', '.join(sorted(proj.plans)) or 'none'})")
    return proj, proj.plans[plan]


@dataclass
class _Run:
    """What one run keeps while it executes."""

    compiled: CompiledPlan
    project: Project
    source: PlanSource
    state: Path
    intent: Intent
    journal: StepJournal
    flow_run: str | None
    fabric: str | None
    fabric_options: dict[str, Any]
    policy: FailurePolicy
    limits: dict[str, int]
    log: logging.Logger | logging.LoggerAdapter  # type: ignore[type-arg]
    slots: Reservation
    failed_vms: set[str] = field(default_factory=set)
    # VMs whose failover never started because their replication is not enabled: nothing to clean up.
    unprotected: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    # Failed VMs, for the report's one line per cause across batches.
    vm_failures: list[VMFailure] = field(default_factory=list)
    vm_lines: set[str] = field(default_factory=set)
    not_run: list[str] = field(default_factory=list)  # step labels skipped because a VM they boot after failed
    approvals: list[ApprovalRecord] = field(default_factory=list)
    stopped: str | None = None
    dry_run: bool = False
    # The group point each consistency group of the plan fails over to (_pin_group_points).
    group_points: list[GroupPoint] = field(default_factory=list)

    def point_for(self, vm: str) -> PointChoice:
        """A group member's exact part of its group point; the run's choice for every other VM."""
        return next((member_choices(gp)[vm] for gp in self.group_points if vm in gp.members), self.compiled.point)

    def kind(self, host: str | None) -> str:
        if self.fabric:
            return self.fabric
        return self.project.topology.host(host).fabric.value if host else "memory"

    def fail(self, what: str, vm: str | None = None) -> None:
        self.failures.append(what)
        if vm:
            self.failed_vms.add(vm)
        self.log.error("%s", what)

    def fail_vms(self, failed: list[VMFailure]) -> None:
        """VMs of one batch failed: one error line per cause (not one per VM)."""
        for what, vms in same_cause(failed):
            self.fail(what, vms[0])
            self.failed_vms.update(vms)
            self.vm_lines.add(what)
        self.vm_failures += failed

    def reported_failures(self) -> list[str]:
        """What the report lists: a cause shared by VMs of several batches is still one line, and the VMs
        not run because of a failure ride on the first cause's line."""
        lines = [what for what, _ in same_cause(self.vm_failures)]
        if self.not_run:
            skipped = f"not run (they boot after a VM that failed): {', '.join(self.not_run)}"
            lines = [f"{lines[0]}; {skipped}", *lines[1:]] if lines else [skipped]
        return lines + [f for f in self.failures if f not in self.vm_lines]


def _settle(futures: Iterable[PrefectFuture[Any]]) -> None:
    for f in futures:
        f.wait()


def _outcome(fut: PrefectFuture[Any]) -> tuple[str, BaseException | None]:
    """completed / failed / skipped (an upstream it waited for did not complete)."""
    status, _, exc = task_outcome(fut)
    return status, exc


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "failed"
    return str(exc) if isinstance(exc, SiteRecoveryError) else f"{type(exc).__name__}: {exc}"


def _needs(batches: Iterable[Batch]) -> dict[str, int]:
    """Slots wanted per host and site limit: the most VMs any one of `batches` runs there."""
    out: dict[str, int] = {}
    for batch in batches:
        per: dict[str, set[str]] = {}
        for s in batch.steps:
            if s.kind == "vm":
                for name in (limit_name("host", s.host or ""), limit_name("site", s.site or "")):
                    per.setdefault(name, set()).add(s.vm or "")
        for name, vms in per.items():
            out[name] = max(out.get(name, 0), len(vms))
    return out


def _stretch(compiled: CompiledPlan, i: int) -> dict[str, int]:
    """Slots for the VM batches from batch i up to the next action batch (or the end, then the cleanup
    too, which runs right after): what one reservation should cover."""
    run_of: list[Batch] = []
    for b in compiled.batches[i:]:
        if not any(s.kind == "vm" for s in b.steps):
            return _needs(run_of)
        run_of.append(b)
    return _needs([*run_of, *compiled.cleanup])


def _pin_group_points(run: _Run) -> str | None:
    """Before any failover: the group point each consistency group of the plan fails over to (the run's
    recovery-point choice applied to the group's complete points), journalled so that a re-run of the
    intent takes the members still to go to the same one. Test and unplanned failovers, forward; a
    planned failover ships every member's final changes after its shutdown, so each member's latest
    point is already one moment of the whole group. Returns why the run cannot go on, or None."""
    c = run.compiled
    if c.failover_type not in (FailoverType.test, FailoverType.unplanned) or c.direction != Direction.forward:
        return None
    in_plan = {vm for g in run.source.plan.groups for vm in g.vm_names}
    groups = [g for g in run.project.protection.consistency_groups if in_plan & set(g.vms)]
    if not groups:
        return None
    if c.options.consistency_groups == "each":
        run.log.warning("consistency groups %s: each member fails over to its own %s point, as asked "
                        "(consistency_groups: each): they are NOT one moment of the application",
                        ", ".join(g.name for g in groups), c.point.describe())
        return None
    placements = c.placements
    for g in groups:
        key = f"group-point/{g.name}"
        done = run.journal.completed(key)
        if done:
            gp = GroupPoint.model_validate(done["record"]["group_point"])
            run.log.info("consistency group %s: group point %s, chosen by an earlier run of this intent", g.name, gp.id)
        else:
            points = {}
            for vm in g.vms:
                p = placements[vm]
                points[vm] = get_fabric(run.kind(p.source.name), run.state, run.fabric_options).recovery_points(p)
            chosen = choose_group_point(g, c.point, points)
            if chosen is None:
                have = len(group_points(g, points))
                return (f"consistency group {g.name}: no group point matches {c.point.describe()} ({have} complete "
                        f"group point(s); a point every member holds is needed): nothing was failed over. Run the "
                        f"replicate flow for a group point, or re-run with the option consistency_groups: each to "
                        f"take each member to its own point (not one moment)")
            gp = chosen
            run.journal.add("group_point", key, run.flow_run, {"status": "completed",
                                                               "group_point": gp.model_dump(mode="json")})
            run.log.info("consistency group %s: every member fails over to group point %s (%s-consistent, %s)",
                         g.name, gp.id, gp.consistency, gp.created_at.isoformat())
        run.group_points.append(gp)
    return None


def _run_vm_batch(run: _Run, batch: Batch, cleanup: bool = False,
                  ahead: dict[str, int] | None = None) -> None:
    placements = run.compiled.placements
    jobs: dict[str, list[Step]] = {}
    for s in batch.steps:
        jobs.setdefault(s.vm or "", []).append(s)
    owner = {s.id: s.vm for s in batch.steps}
    wanted: dict[str, int] = {}
    todo: dict[str, list[Step]] = {}
    for vm, steps in jobs.items():
        # A VM that failed earlier is not taken further (continue policy); cleanup always runs, except
        # where the failover never began (replication not enabled: the same error again, per VM).
        if (vm in run.failed_vms and not cleanup) or (cleanup and vm in run.unprotected):
            continue
        todo[vm] = steps
        for name in (limit_name("host", steps[0].host or ""), limit_name("site", steps[0].site or "")):
            wanted[name] = wanted.get(name, 0) + 1
    if not todo:
        return
    vm_task = run_vm_steps.with_options(cache_key_fn=job_cache_key, persist_result=True,
                                        result_storage=result_storage(run.state))
    futures: dict[str, PrefectFuture[Any]] = {}
    t0 = time.monotonic()
    held = run.slots.covers(wanted)
    local = run.slots.cover(wanted, ahead)
    key = local.key
    if held:
        run.log.info("%s: %d VMs; slots held from an earlier batch", batch.name, len(todo))
    else:
        run.log.info("%s: %d VMs; slots %s granted after %.2f s", batch.name, len(todo),
                     ", ".join(f"{n}={k}" for n, k in sorted(local.sizes.items())), local.waited)
    for vm, steps in todo.items():
        deps = {owner[a] for s in steps for a in s.after if owner.get(a) not in (None, vm)}
        if any(d not in futures for d in deps):
            continue  # boots after a VM that is not going ahead: skipped, and reported so
        job = VMJob(id=steps[0].id, label=steps[0].label, vm=vm, placement=placements[vm], steps=tuple(steps),
                    fabric=run.kind(steps[0].host), fabric_options=run.fabric_options, state_dir=str(run.state),
                    plan=run.compiled.plan, intent=run.intent.id, resumed=run.intent.resumed,
                    point=run.point_for(vm), test_network=run.compiled.options.test_network,
                    slots_key=key)
        futures[vm] = vm_task.submit(steps[0].label, job, run.flow_run,
                                     wait_for=[futures[d] for d in deps if d in futures])  # type: ignore[call-overload]
    _settle(futures.values())
    run.log.info("%s: done in %.2f s", batch.name, time.monotonic() - t0)
    best_effort = all(s.best_effort for s in batch.steps)
    failed: list[VMFailure] = []
    for vm, fut in futures.items():
        status, exc = _outcome(fut)
        if status == "failed":
            if isinstance(exc, NotFoundError) and getattr(exc, "operation", None) in POINT_OPERATIONS:
                run.unprotected.add(vm)
            if cleanup and isinstance(exc, NotFoundError):
                # Cleaning up what does not exist is done: not a second error for the one cause.
                run.log.info("%s: nothing to clean up (%s)", todo[vm][0].label, _reason(exc))
            elif best_effort:
                run.log.warning("%s failed (best effort, going on): %s", todo[vm][0].label, _reason(exc))
            else:
                failed.append(vm_failure(vm, todo[vm][0].label, exc))
        elif status == "skipped" and not best_effort:
            # A consequence of the failure that is reported: the report lists the VM as skipped.
            run.failed_vms.add(vm)
            run.not_run.append(todo[vm][0].label)
            run.log.warning("%s: not run (a VM it boots after failed)", todo[vm][0].label)
    run.fail_vms(failed)
    for vm in todo.keys() - futures.keys():
        run.failed_vms.add(vm)
        run.not_run.append(todo[vm][0].label)
        run.log.warning("%s: not run (a VM it boots after did not go ahead)", todo[vm][0].label)


def _approve(run: _Run, step: Step) -> None:
    assert isinstance(step.action, ManualAction)
    if run.intent.resumed:
        done = run.journal.completed(step.id)
        if done:  # approved in an earlier run of this intent: not asked twice
            run.approvals.append(ApprovalRecord.model_validate(done["record"]["approval"]))
            run.log.info("%s: approved earlier in this intent, not asked again", step.label)
            return
    c = run.compiled
    text = describe(step, step.action, c.plan, c.plan_version, c.failover_type.value, c.direction.value)
    run.log.info("waiting for approval: %s (group %s)", step.action.name, step.action.approver_group or "any")
    try:
        rec = request_approval(step, text)
    except (ApprovalRejected, ApprovalTimedOut) as exc:
        run.approvals.append(exc.record)
        raise
    run.approvals.append(rec)
    run.journal.add("approval", step.id, run.flow_run, {"status": "approved", "approval": rec.model_dump(mode="json")})
    run.log.info("approved by %s: %s", rec.approver or "(unnamed)", rec.comment)


def _run_action_batch(run: _Run, batch: Batch) -> None:
    script_task = run_script.with_options(cache_key_fn=script_cache_key, persist_result=True,
                                          result_storage=result_storage(run.state))
    futures: dict[str, PrefectFuture[Any]] = {}
    for step in batch.steps:
        deps = [futures[a] for a in step.after if a in futures]
        if step.kind == "manual":
            _settle(deps)
            _approve(run, step)
            continue
        assert isinstance(step.action, ScriptAction)
        if step.vm and step.vm in run.failed_vms:
            continue
        action = step.action
        host = run.project.topology.host(action.host) if action.host else None
        if host is not None and run.fabric and run.fabric != host.fabric.value:
            # A dry run on another fabric does not reach out to the plan's real hosts.
            run.log.info("%s: dry run on the %s fabric, not run on %s", step.label, run.fabric, host.name)
            continue
        job = ScriptJob(id=step.id, label=step.label, action=action, plan_dir=str(run.source.file.parent),
                        context=run.compiled.script_contexts[step.id], host=host, dry_run=run.dry_run, state_dir=str(run.state), plan=run.compiled.plan,
                        intent=run.intent.id)
        futures[step.id] = script_task.submit(step.label, job, run.flow_run, wait_for=deps)  # type: ignore[call-overload]
    _settle(futures.values())
    for sid, fut in futures.items():
        status, exc = _outcome(fut)
        label = next(s.label for s in batch.steps if s.id == sid)
        if status != "completed":
            vm = next(s.vm for s in batch.steps if s.id == sid)
            run.fail(f"{label}: {_reason(exc) if status == 'failed' else 'not run (an earlier action failed)'}", vm)


def _write_report(report: RunReport, state: Path, for_run: str | None = None) -> Path:
    """The report's HTML and JSON files, and its artifact: on the current flow run, or on `for_run` (the
    report of a dead run, written by the run that found it)."""
    out = child(state, "reports", report_filename(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(report), encoding="utf-8")
    out.with_suffix(".json").write_text(report.model_dump_json(indent=1), encoding="utf-8")
    description = f"{report.plan} {report.failover_type} failover: {report.status}"
    if for_run is None:
        create_markdown_artifact(key=report.artifact_key, markdown=render_markdown(report), description=description)
    else:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate

        with get_client(sync_client=True) as client:
            client.create_artifact(ArtifactCreate(key=report.artifact_key, type="markdown", data=render_markdown(report),
                                                  description=description, flow_run_id=for_run))  # type: ignore[arg-type]
    return out


# ---- a report for every run, also one whose process died ----------------------------------------------
# A run leaves runs/<intent>/unreported-<flow run>.json while it holds its plan and removes it once its
# report is written. A killed process (worker and flow process lost) writes no report: the next run of the
# plan, which holds the plan and so knows that run is dead, writes it from the marker and the step journal.


def _unreported(state: Path, intent: str, flow_run: str | None) -> Path:
    path = child(state, "runs", intent, f"unreported-{flow_run or os.getpid()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _report_dead_runs(state: Path, plan: str, mine: Path, flow_run: str | None,
                      log: logging.Logger | logging.LoggerAdapter) -> list[Path]:  # type: ignore[type-arg]
    """Write the report of each earlier run of `plan` that died before writing its own (called while
    holding the plan, so no other run of it is alive); the reports' paths."""
    out = []
    for marker in sorted((state / "runs").glob("*/unreported-*.json")):
        if marker == mine:
            continue
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("plan") != plan:
            continue
        dead = meta.get("flow_run")
        entries = [e for e in StepJournal(state, meta["intent"]).entries().values() if e.get("flow_run") == dead]
        report = crashed_report(meta, entries, found_by=flow_run, now=datetime.now(UTC))
        path = _write_report(report, state, for_run=dead)
        marker.unlink(missing_ok=True)
        log.warning("earlier run %s of plan %s died without a report; its report (crashed): %s", dead, plan, path)
        out.append(path)
    return out


TREND_DRILLS = 30  # drills a plan's trend keeps


def _update_trends(report: RunReport, state: Path, rpo: float | None, rto: float | None) -> None:
    """Add this drill to the plan's trend (<state>/trends/<plan>.json) and publish the drill-trends-<plan>
    artifact: a chart of achieved RTO and RPO per drill against the objectives, and the table."""
    import base64

    store = state / "trends" / f"{report.plan}.json"
    store.parent.mkdir(parents=True, exist_ok=True)
    points = [TrendPoint.model_validate(x) for x in json.loads(store.read_text())] if store.exists() else []
    points = [*points, trend_point(report)][-TREND_DRILLS:]
    store.write_text(json.dumps([p.model_dump(mode="json") for p in points], indent=1))
    svg = trend_svg(points, rto)
    (state / "reports").mkdir(parents=True, exist_ok=True)
    (state / "reports" / f"{report.plan}-drill-trends.svg").write_text(svg, encoding="utf-8")
    chart = ("![achieved RTO and RPO per drill](data:image/svg+xml;base64,"
             + base64.b64encode(svg.encode()).decode() + ")")
    create_markdown_artifact(key=trends_key(report.plan), markdown=trends_markdown(report.plan, points, rpo, rto, chart),
                             description=f"{report.plan}: achieved RTO and RPO of the last {len(points)} drill(s)")


def execute_plan(request: RunRequest) -> dict[str, Any]:
    """Run a plan inside the current flow run; the summary (a report is written either way).
    `request.requested_by`: who asked (a UI form's required field); empty: the OS user (a CLI run).
    Raises PlanFailed (with the summary) when the run did not complete."""
    log = get_run_logger()
    started = datetime.now(UTC)
    proj, source = load_plan(request.plan, request.project)
    rp = source.plan
    request.check(rp.name)
    failover_type, direction, options, fabric = request.failover_type, request.direction, request.options, request.fabric
    point = request.point
    compiled = compile_plan(proj, rp, failover_type, direction, point, options)
    state = open_estate(proj.root)
    steps = compiled.steps()
    key = intent_key(plan=rp.name, version=rp.version, type=failover_type.value, direction=direction.value,
                     point=point.model_dump(mode="json"), options=options.model_dump(mode="json"), fabric=fabric)
    # A test failover always cleans up after itself: nothing to resume, each drill starts afresh.
    start = IntentStart(key=key, prefix=f"{rp.name}-{failover_type.value}", explicit=request.intent,
                        fresh=failover_type == FailoverType.test and not request.intent, params=request.params(rp.name))
    with RunSession(state, rp.name, {s.vm for s in steps if s.vm}, f"{failover_type.value} failover", log,
                    start) as session:
        assert session.intent is not None and session.journal is not None
        the_intent, flow_run, closed = session.intent, session.flow_run, session.closed
        names: dict[str, int | None] = {}
        for s in steps:
            if s.kind == "vm":
                names[limit_name("host", s.host or "")] = request.host_limit
                names[limit_name("site", s.site or "")] = request.site_limit
        # Until this run's report is written: the next run of the plan writes it if this process dies.
        marker = _unreported(state, the_intent.id, flow_run)
        _report_dead_runs(state, rp.name, marker, flow_run, log)
        write_json_atomic(str(marker), {
            "plan": rp.name, "plan_version": rp.version, "failover_type": failover_type.value,
            "direction": direction.value, "recovery_point": request.recovery_point, "intent": the_intent.id,
            "flow_run": flow_run, "fabric": fabric or "", "started": started.isoformat(), "operator": os_user(),
            "failure_policy": (request.failure_policy or rp.failure_policy).value,
            "requested_by": request.requested_by or f"{os_user()} (OS user of a command-line run)",
            "rpo_objective_seconds": rp.objectives.rpo_seconds, "rto_objective_seconds": rp.objectives.rto_seconds})
        run = _Run(compiled=compiled, project=proj, source=source, state=state, intent=the_intent,
                   journal=session.journal, flow_run=flow_run, fabric=fabric,
                   fabric_options=dict(request.fabric_options or {}), policy=request.failure_policy or rp.failure_policy,
                   limits=(limits := ensure_limits(names)), log=log,
                   slots=Reservation(f"{flow_run}:slots", limits, state / "leases"))
        run.dry_run = {run.kind(s.host) for s in steps if s.kind == "vm"} == {"memory"}
        log.info("%s v%s: %s failover, %s, %d steps in %d batches; intent %s%s", rp.name, rp.version,
                 failover_type.value, direction.value, len(steps), len(compiled.batches), the_intent.id,
                 " (resuming)" if the_intent.resumed else "")
        unexpected: BaseException | None = None
        interrupted: BaseException | None = None
        try:
            refused = _pin_group_points(run)
            if refused:
                run.fail(refused)
                run.stopped = refused
            for i, batch in enumerate(compiled.batches if not refused else ()):
                log.info("batch %d/%d: %s", i + 1, len(compiled.batches), batch.name)
                try:
                    if any(s.kind == "vm" for s in batch.steps):
                        _run_vm_batch(run, batch, ahead=_stretch(compiled, i))
                    else:
                        # Scripts and people can take long: other runs may use the hosts meanwhile.
                        run.slots.release()
                        _run_action_batch(run, batch)
                except (ApprovalRejected, ApprovalTimedOut) as exc:
                    run.fail(str(exc))
                    run.stopped = str(exc)
                    break
                if run.failures and run.policy == FailurePolicy.stop:
                    run.stopped = f"stopped after '{batch.name}' (failure policy: stop)"
                    log.error("%s", run.stopped)
                    break
        except Exception as exc:  # a bug or an unreachable API: still clean up and report
            run.fail(f"run aborted: {type(exc).__name__}: {exc}")
            log.error("where it was raised (for a bug report):", exc_info=exc)
            unexpected = exc
        except BaseException as exc:  # cancelled (the worker's SIGTERM) or interrupted: clean up, report, go
            run.fail(f"run cancelled ({type(exc).__name__}) during the plan; cleaned up and reported before stopping")
            interrupted = exc
        finally:
            try:
                for j, batch in enumerate(compiled.cleanup):
                    log.info("cleanup: %s", batch.name)
                    try:
                        _run_vm_batch(run, batch, cleanup=True, ahead=_needs(compiled.cleanup[j:]))
                    except Exception as exc:  # noqa: BLE001 - keep cleaning the other groups
                        run.fail(f"cleanup of {batch.name} failed: {type(exc).__name__}: {exc}")
            finally:
                run.slots.release()

        entries = session.journal.entries()
        step_recs, script_recs = run_records(compiled.steps(), entries, flow_run)
        approvals = list(run.approvals)
        status: Literal["succeeded", "failed", "stopped", "cancelled"] = "succeeded"
        if interrupted is not None:
            status = "cancelled"
        elif run.failures:
            # A person said no (or nobody answered): the plan stopped as designed, it did not fail.
            rejected = any(a.decision in ("rejected", "timed_out") for a in run.approvals)
            status = "stopped" if rejected and unexpected is None else "failed"
        where = positions(step_recs) if status != "succeeded" and failover_type != FailoverType.test else []
        choices = way_back(rp.name, where) if where else []
        report = RunReport(plan=rp.name, plan_version=rp.version, failover_type=failover_type.value,
                           direction=direction.value, recovery_point=request.recovery_point + (
                               f" at {request.point_in_time.isoformat()}" if request.point_in_time else ""),
                           failure_policy=run.policy.value, intent=the_intent.id, resumed=the_intent.resumed,
                           flow_run_id=flow_run, fabric=fabric or ", ".join(sorted({run.kind(s.host) for s in steps
                                                                                   if s.kind == "vm"})),
                           started_at=started, finished_at=datetime.now(UTC), status=status, steps=tuple(step_recs),
                           approvals=tuple(approvals), group_points=tuple(run.group_points), scripts=tuple(script_recs), failures=tuple(run.reported_failures()),
                           operator=os_user(), audit=tuple(audit_records(step_recs, entries, run.approvals, closed, flow_run,
                                                                  os_user(), datetime.now(UTC))), superseded=tuple(closed),
                           positions=tuple(where), choices=tuple(choices),
                           requested_by=request.requested_by or f"{os_user()} (OS user of a command-line run)",
                           rpo_objective_seconds=rp.objectives.rpo_seconds,
                           rto_objective_seconds=rp.objectives.rto_seconds)
        path = _write_report(report, state)
        marker.unlink(missing_ok=True)
        if failover_type == FailoverType.test:
            _update_trends(report, state, rp.objectives.rpo_seconds, rp.objectives.rto_seconds)
        if status == "succeeded" or failover_type == FailoverType.test:
            session.complete(status)
        summary = report.summary() | {"report": str(path)}
        log.info("%s: %s in %.1f s; report %s", rp.name, status, report.seconds, path)
        if interrupted is not None:
            log.warning("%s: cancelled; report %s%s", rp.name, path, (". " + stop_line(where, choices)) if where else "")
            raise interrupted
        if status != "succeeded":
            msg = f"{rp.name}: {status}: " + "; ".join(report.failures[:5])
            if where:
                # The run's last line: where every VM is and the ways on (also in the report).
                msg += ". " + stop_line(where, choices)
            raise PlanFailed(msg, summary=summary, report=str(path))
        return summary


@flow(name="recovery-plan", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))  # type: ignore[arg-type]
def recovery_plan(
    plan: str,
    failover_type: FailoverType = FailoverType.test,
    direction: Direction = Direction.forward,
    recovery_point: PointKind = "latest",
    point_in_time: datetime | None = None,
    options: RunOptions = RunOptions(),  # noqa: B008 - frozen model, safe as a default
    project: str = "plans",
    fabric: str | None = None,
    confirm: str = "",
    intent: str | None = None,
    failure_policy: FailurePolicy | None = None,
    fabric_options: dict[str, Any] | None = None,
    host_limit: int | None = None,
    site_limit: int | None = None,
    requested_by: str = "",
) -> dict[str, Any]:
    """Run a recovery plan: a test failover (drill), a planned or an unplanned failover, forward or back.

    Args:
        plan: a plan name in `project`, or a path to a plan file.
        failover_type: test (a drill, always cleaned up), planned (no data loss) or unplanned.
        direction: forward, or failback once replication was reversed.
        recovery_point: latest, latest_processed, latest_app_consistent or point_in_time.
        point_in_time: with point_in_time, the newest point at or before this time is used.
        options: shut down the source, commit, reverse replication, cleanup and test network choices.
        project: the project directory holding the topology, protection and plans.
        fabric: run every host on this fabric kind instead (memory for a dry run).
        confirm: type the plan's name to allow a planned or unplanned failover; drills need none.
        intent: resume exactly this intent (default: the open intent of the same parameters, else a new one).
        failure_policy: override the plan's (stop or continue).
        fabric_options: driver options (memory fabric: latency, state_file).
        host_limit: set the Prefect concurrency limit of each host touched (default: keep the server's; 4 when missing).
        site_limit: set the Prefect concurrency limit of each site touched (default: keep the server's; 16 when missing).
        requested_by: who asks for this run; empty: the OS user running it.
    """
    return execute_plan(RunRequest(
        plan=plan, failover_type=failover_type, direction=direction, recovery_point=recovery_point,
        point_in_time=point_in_time, options=options, project=project, fabric=fabric, confirm=confirm, intent=intent,
        failure_policy=failure_policy, fabric_options=fabric_options, host_limit=host_limit, site_limit=site_limit,
        requested_by=requested_by))
