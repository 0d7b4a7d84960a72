"""The `recover` flow: the way on from a planned or unplanned failover that stopped (an approval
rejected or timed out, a failure, a run that died).

- resume: run the stopped failover again with the parameters it was started with (its open intent):
  completed steps are not repeated;
- commit: commit the failover of every VM that failed over (FailedOverWaitingCompletion -> FailedOver);
- cancel-failover: revert every VM of the plan to before the failover (the replica's failed-over VM is
  discarded, replication goes on as before); the next failover starts afresh and may choose another
  recovery point.

Commit and cancel act on every VM of the plan through the fabric's idempotent operations (a VM with
nothing to do answers "no change"), close the stopped failover's intent and write a report. Each needs
`confirm` naming the plan, like a failover.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from siterecovery.estate import open_estate
from siterecovery.intent import Intent, IntentJournal, os_user
from siterecovery.model import Direction
from siterecovery.placement import plan_placements
from siterecovery.report import RunReport, StepRecord
from siterecovery.request import ConfirmationRequired, RunRequest
from tasks.limits import RunRefused
from tasks.vm import vm_operation

from .forms import RecoverAdvanced, fabric_of, requester
from .recovery_plan import (
    MAX_WORKERS,
    PlanFailed,
    _write_report,
    execute_plan,
    load_plan,
)
from .session import RunSession

Action = Literal["resume", "commit", "cancel-failover"]
OPERATION = {"commit": "commit_failover", "cancel-failover": "cancel_failover"}


def stopped_failover(state: Any, plan: str) -> dict[str, Any] | None:
    """The open (not completed) planned or unplanned failover intent of `plan`, newest last: its entry."""
    found = [e for e in IntentJournal(state).open_entries()
             if (e.get("params") or {}).get("plan") == plan and (e.get("params") or {}).get("failover_type") != "test"]
    return found[-1] if found else None


def execute_recover(plan: str, action: Action, confirm: str = "", project: str = "plans",
                    fabric: str | None = None, fabric_options: dict[str, Any] | None = None,
                    direction: Direction | None = None, requested_by: str = "") -> dict[str, Any]:
    log = get_run_logger()
    proj, source = load_plan(plan, project)
    rp = source.plan
    if confirm != rp.name:
        raise ConfirmationRequired(f"{action} of '{rp.name}' changes production; confirm it by passing "
                                   f"confirm='{rp.name}' (CLI: --confirm {rp.name})")
    state = open_estate(proj.root)
    entry = stopped_failover(state, rp.name)
    if action == "resume":
        if entry is None:
            raise RunRefused(f"plan '{rp.name}' has no stopped failover to resume (every failover of it completed "
                             "or was cancelled); start a new one from failover/" + rp.name)
        log.info("resuming intent %s (%s failover started %s)", entry["id"], entry["params"]["failover_type"],
                 entry.get("created"))
        return execute_plan(RunRequest.resume(entry["params"], entry["id"], project, requested_by))
    params = (entry or {}).get("params") or {}
    fabric = fabric or params.get("fabric")
    fabric_options = fabric_options if fabric_options is not None else params.get("fabric_options")
    way = direction or Direction(params.get("direction", "forward"))
    placements = plan_placements(proj, rp, way)
    started = datetime.now(UTC)
    op = OPERATION[action]
    records: list[StepRecord] = []
    failures: list[str] = []
    # Commit and cancel act on the stopped failover's intent; they do not run one: the session holds the plan.
    with RunSession(state, rp.name, placements, action, log) as session:
        flow_run = session.flow_run
        futures: dict[str, PrefectFuture[Any]] = {}
        for vm, pl in placements.items():
            kind = fabric or pl.target.fabric.value
            futures[vm] = vm_operation.submit(f"{op.replace('_', ' ')} {vm}", op, pl, kind, str(state),  # type: ignore[call-overload]
                                              fabric_options)
        for vm, fut in futures.items():
            try:
                rec = StepRecord.model_validate(fut.result())
            except Exception as exc:  # noqa: BLE001 - reported per VM
                failures.append(f"{op} {vm}: {exc}")
                log.error("%s %s: %s", op, vm, exc)
                rec = StepRecord(id=f"recover/{op}/{vm}", label=f"{op} {vm}", stage="recover", operation=op, vm=vm,
                                 host=placements[vm].target.name, status="failed", error=str(exc))
            else:
                log.info("%s %s: %s", op, vm, rec.message)
            records.append(rec)
    status: Literal["succeeded", "failed"] = "failed" if failures else "succeeded"
    if entry is not None and status == "succeeded":
        IntentJournal(state).complete(Intent(id=entry["id"], key=entry["key"]),
                                      "cancelled" if action == "cancel-failover" else "committed")
    # Commit and cancel are idempotent per VM: after a failure, the same action again finishes the rest.
    retry = [f"run recover/{rp.name} with action={action} again once the cause is fixed: VMs already done answer "
             "'no change'"] if failures else []
    report = RunReport(plan=rp.name, plan_version=rp.version, failover_type=action, direction=way.value,
                       recovery_point="(as failed over)", failure_policy="continue",
                       intent=entry["id"] if entry else "(none open)", flow_run_id=flow_run,
                       fabric=fabric or ", ".join(sorted({p.target.fabric.value for p in placements.values()})),
                       started_at=started, finished_at=datetime.now(UTC), status=status, steps=tuple(records),
                       failures=tuple(failures), operator=os_user(), choices=tuple(retry),
                       requested_by=requested_by or f"{os_user()} (OS user of a command-line run)")
    path = _write_report(report, state)
    changed = [r.vm for r in records if r.changed]
    summary = report.summary() | {"report": str(path), "changed": changed}
    log.info("%s of %s: %s; %d VM(s) changed (%s); report %s", action, rp.name, status, len(changed),
             ", ".join(v for v in changed if v) or "none", path)
    if failures:
        raise PlanFailed(f"{rp.name}: {action} failed: " + "; ".join(failures[:5]), summary=summary, report=str(path))
    return summary


@flow(name="recover", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))  # type: ignore[arg-type]
def recover(confirm: str, action: Action, requested_by: str, plan: str,
            advanced: RecoverAdvanced = RecoverAdvanced()) -> dict[str, Any]:  # noqa: B008 - frozen model
    """The way on from a stopped planned or unplanned failover: resume it, commit it, or cancel it.

    Args:
        confirm: type the plan's name to go ahead: every action changes production.
        action: resume (run the stopped failover on), commit (keep the failed-over VMs), or cancel-failover
            (every VM back to before the failover, its source VM started again).
        requested_by: who asks for this (name, team or ticket). The UI has no login: the report shows what
            is typed here as the requester.
        plan: the recovery plan (its name in the project).
        advanced: project directory and fabric (default: the stopped failover's).
    """
    return execute_recover(plan, action, confirm, advanced.project, fabric_of(advanced.fabric),
                           requested_by=requester(requested_by))
