"""The VM task: one task per VM per stage of a plan (`failover web-01`, `commit web-01`), running that
VM's steps of the stage in order (failover -> configure network -> start) through its fabric driver.

One task per VM and stage rather than per step keeps a 1,000-VM plan inside its time budget (a Prefect
task costs 8-20 ms here); every step is still timed, journaled and skipped on a re-run on its own. Retries
only for TransientFabricError; anything else fails the VM at once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from siterecovery.compile import Step
from siterecovery.errors import SiteRecoveryError
from siterecovery.fabric import Fabric, OpResult, Placement, PointChoice
from siterecovery.intent import StepJournal
from siterecovery.mapping import resolve_failback
from siterecovery.model.common import Direction, Frozen
from siterecovery.report import StepRecord

from .fabric import get_fabric
from .limits import limit_name, slots
from .runtime import RETRIES, RETRY_DELAY_SECONDS, only_transient


class VMJob(Frozen):
    """Everything a VM task needs; small and picklable (the driver is looked up in the worker)."""

    id: str
    label: str
    vm: str
    placement: Placement
    steps: tuple[Step, ...]
    fabric: str
    fabric_options: dict[str, Any] = {}
    state_dir: str
    plan: str
    intent: str
    resumed: bool = False
    point: PointChoice = PointChoice()
    test_network: str | None = None
    slots_key: str | None = None

    @property
    def cache_key(self) -> str:
        return f"{self.plan}:{self.intent}:{self.id}"


def job_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return str(parameters["job"].cache_key)


def failback_placement(fabric: Fabric, p: Placement) -> Placement:
    """Failing back, the original VM's networks follow what its replica's networks are now (the source
    documents' failback table, mapping.resolve_failback): read from fabrics that record them."""
    read = getattr(fabric, "vm_networks", None)
    if p.direction != Direction.failback or read is None or not any(n.failback_choices for n in p.nics):
        return p
    return p.model_copy(update={"nics": resolve_failback(p.nics, read(p, "source"))})


def call(fabric: Fabric, job: VMJob, step: Step) -> OpResult:
    """One compiled step as one driver call."""
    p, op = job.placement, step.operation
    if op == "apply_network" or (op == "start_vm" and (step.side or "target") == "target" and not step.test):
        p = failback_placement(fabric, p)
    if op == "test_failover":
        return fabric.test_failover(p, job.point, job.test_network or p.test_network)
    if op == "failover":
        return fabric.failover(p, job.point)
    if op == "start_vm":
        return fabric.start_vm(p, side=step.side or "target", test=step.test)
    if op == "stop_vm":
        return fabric.stop_vm(p, side=step.side or "source")
    if op in ("prepare_planned_failover", "apply_network", "commit_failover", "cancel_failover",
              "reverse_replication", "cleanup_test_failover"):
        return getattr(fabric, op)(p)  # type: ignore[no-any-return]
    raise ValueError(f"no fabric operation for step {step.id} ({op})")


def _now() -> datetime:
    return datetime.now(UTC)


@task(name="vm", task_run_name="{label}", retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=only_transient)
def run_vm_steps(label: str, job: VMJob, flow_run: str | None = None) -> list[dict[str, Any]]:
    """Run the job's steps in order; returns their StepRecords (as dicts) and journals each one."""
    journal = StepJournal(Path(job.state_dir), job.intent)
    ctx = TaskRunContext.get()
    retry = ctx is not None and ctx.task_run.run_count > 1
    # Only a resumed intent or a retry can find steps already done; a fresh run skips the read.
    done = {k: v for k, v in journal.entries().items() if v["record"].get("status") == "completed"} \
        if (job.resumed or retry) else {}
    fabric = get_fabric(job.fabric, Path(job.state_dir), job.fabric_options)
    local = slots(job.slots_key) if job.slots_key else None
    records: list[dict[str, Any]] = []
    names = [limit_name("host", job.steps[0].host or ""), limit_name("site", job.steps[0].site or "")]
    hold = local.hold(*names) if local is not None else None
    waited = hold.__enter__() if hold is not None else 0.0
    try:
        for step in job.steps:
            if step.id in done:
                records.append(done[step.id]["record"])
                continue
            t0 = _now()
            try:
                res = call(fabric, job, step)
            except Exception as exc:
                rec = _record(step, "failed", t0, _now(), error=_reason(exc), waited=waited)
                journal.add("step", step.id, flow_run, rec)
                raise
            rec = _record(step, "completed", res.started_at or t0, res.finished_at or _now(), res=res, waited=waited)
            journal.add("step", step.id, flow_run, rec)
            records.append(rec)
            waited = 0.0
    finally:
        if hold is not None:
            hold.__exit__(None, None, None)
    return records


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SiteRecoveryError) else f"{type(exc).__name__}: {exc}"


def _record(step: Step, status: str, start: datetime, end: datetime, res: OpResult | None = None,
            error: str | None = None, waited: float = 0.0) -> dict[str, Any]:
    return StepRecord(
        id=step.id, label=step.label, stage=step.stage, operation=step.operation, group=step.group, vm=step.vm,
        host=(res.host if res and res.host else step.host), status=status,  # type: ignore[arg-type]
        started_at=start, finished_at=end, changed=res.changed if res else None, message=res.message if res else "",
        point_id=res.point.id if res and res.point else None,
        point_created_at=res.point.created_at if res and res.point else None, error=error,
        slot_wait_seconds=round(waited, 4),
    ).model_dump(mode="json")


@task(name="vm-operation", task_run_name="{label}", retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=only_transient)
def vm_operation(label: str, operation: str, placement: Placement, fabric: str, state_dir: str,
                 fabric_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One idempotent fabric operation on one VM outside a compiled plan (recover/<plan>: commit or cancel
    a failover); returns its StepRecord (as a dict). A VM with nothing to do answers changed=False."""
    if operation not in ("commit_failover", "cancel_failover"):
        raise ValueError(f"vm_operation does not run {operation}")
    driver = get_fabric(fabric, Path(state_dir), fabric_options)
    t0 = _now()
    res: OpResult = getattr(driver, operation)(placement)
    message = f"{res.message} ({res.state.value})"
    if operation == "cancel_failover":
        # Back to before the failover means the service runs where it ran: start the source VM (a planned
        # failover shut it down). Best effort: after a site loss the source host may still be gone.
        try:
            up = driver.start_vm(placement, side="source")
            message += f"; source VM on {placement.source.name}: {up.message}"
        except SiteRecoveryError as exc:
            message += f"; source VM not started ({exc}): start it once its host is back"
    return StepRecord(id=f"recover/{operation}/{placement.vm}", label=label, stage="recover", operation=operation,
                      vm=placement.vm, host=res.host or placement.target.name, status="completed",
                      started_at=res.started_at or t0, finished_at=_now(), changed=res.changed,
                      message=message).model_dump(mode="json")
