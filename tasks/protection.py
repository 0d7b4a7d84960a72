"""Prefect tasks of the protection lifecycle: one fabric side effect each, on one VM or host.

Tasks use NO_CACHE on purpose: safety on re-runs comes from the fabric contract (every operation is
idempotent and says when it changed nothing), not from Prefect's cache, which would hide a VM that
drifted since the last run. Transient fabric errors (a host briefly unreachable) are retried.
"""

from __future__ import annotations

import inspect
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.events.schemas.events import Event

from siterecovery.errors import ExecutionError, NotFoundError
from siterecovery.fabric import Fabric, OpResult, Placement, ReplicationState
from siterecovery.model.common import Frozen
from siterecovery.model.protection import NetworkInitial
from siterecovery.model.topology import Host
from siterecovery.protection import DATA_PATH_KINDS, Alert, HealthRow
from tasks.limits import slot
from tasks.progress import reporting
from tasks.runtime import RETRIES, RETRY_DELAY_SECONDS, only_transient

S = ReplicationState


RETRY: dict[str, Any] = {"retries": RETRIES, "retry_delay_seconds": RETRY_DELAY_SECONDS, "retry_condition_fn": only_transient,
                         "cache_policy": NO_CACHE}


class Step(Frozen):
    """What one step did to one VM, for reports."""

    vm: str
    step: str
    changed: bool
    state: str
    message: str = ""
    bytes_sent: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    consistency: str = ""  # the point's label, which says what the cycle achieved (not what was asked)

    @classmethod
    def of(cls, r: OpResult, step: str | None = None) -> Step:
        return cls(vm=r.vm, step=step or r.operation, changed=r.changed, state=r.state.value, message=r.message,
                   bytes_sent=r.bytes_sent, started_at=r.started_at, finished_at=r.finished_at,
                   consistency=r.point.consistency if r.point is not None else "")


# ---- enable protection -------------------------------------------------------------------------

@task(name="configure replica server", task_run_name="configure {host.name}", **RETRY)
def configure_host(driver: Fabric, host: Host, primaries: list[Host]) -> str:
    """Replica server settings and authorization of the replica site (Set-VMReplicationServer and an
    authorization entry for the primaries), where the driver has such a step; the Fabric contract
    leaves it optional because the built-in engine needs none."""
    configure = getattr(driver, "configure_replica_server", None)
    if configure is None:
        return f"{driver.kind} fabric: no replica server settings to configure"
    r = configure(host, primaries)
    return str(getattr(r, "message", r))


@task(name="enable replication", task_run_name="enable replication {p.vm}", **RETRY)
def enable_vm(driver: Fabric, p: Placement) -> Step:
    return Step.of(driver.enable_replication(p))


def initial_due(p: Placement, now: datetime) -> datetime | None:
    """A network initial copy scheduled for later: when it is due, or None when it may run now."""
    init = p.policy.initial_replication
    if isinstance(init, NetworkInitial) and init.start_at is not None:
        start = init.start_at if init.start_at.tzinfo else init.start_at.replace(tzinfo=UTC)
        return start if start > now else None
    return None


@task(name="initial replication", task_run_name="initial replication {p.vm}", **RETRY)
def initial_replication_vm(driver: Fabric, p: Placement) -> Step:
    """By the policy's method. A network copy with a later start time is handed to Hyper-V, which
    schedules it itself; on fabrics where we move the data, the `replicate` flow starts it when due."""
    due = initial_due(p, datetime.now(UTC))
    if due is not None and driver.kind in DATA_PATH_KINDS:
        h = driver.replication_health(p)
        if h.state == S.ReadyForInitialReplication:
            return Step(vm=p.vm, step="initial_replication", changed=False, state=h.state.value,
                        message=f"scheduled for {due.isoformat(timespec='minutes')}; the replicate flow starts it")
    with reporting(p.vm, "initial replication") as progress:
        return Step.of(driver.start_initial_replication(p, progress=progress))


@task(name="extended replication", task_run_name="extended replication {p.vm}", **RETRY)
def extend_vm(driver: Fabric, p: Placement) -> Step:
    """The pairing's extended replication (A -> B -> C) from the replica, where the fabric has it."""
    extend = getattr(driver, "enable_extended_replication", None)
    if p.extended is None or extend is None:
        return Step(vm=p.vm, step="enable_extended_replication", changed=False, state="",
                    message="no extended replication" if p.extended is None
                    else f"{driver.kind} fabric: no extended replication")
    r = extend(p, p.extended, p.extended_frequency_seconds)
    return Step.of(r)


class Readiness(Frozen):
    vm: str
    network: Step
    ready: bool
    state: str
    health: str
    points: int
    reason: str = ""


@task(name="finalize protection", task_run_name="finalize protection {p.vm}", **RETRY)
def finalize_vm(driver: Fabric, p: Placement) -> Readiness:
    """The source documents' 'finalize protection' job: network mapping and failover IP settings on
    the replica, then check the VM could fail over (replicating, not Critical, a recovery point)."""
    net = Step.of(driver.apply_network(p), "apply_network")
    h = driver.replication_health(p)
    try:
        points = len(driver.recovery_points(p))
    except NotFoundError:
        points = 0
    reason = ""
    if h.state != S.Replicating:
        reason = f"state {h.state.value}"
    elif h.health.value == "Critical":
        reason = h.details or "health Critical"
    elif points == 0:
        reason = "no recovery point yet"
    return Readiness(vm=p.vm, network=net, ready=not reason, state=h.state.value, health=h.health.value,
                     points=points, reason=reason)


# ---- replicate ----------------------------------------------------------------------------------

def supports_bandwidth(driver: Fabric) -> bool:
    return "bandwidth_bytes_per_second" in inspect.signature(driver.replicate).parameters


def _transfer_slot(p: Placement, ledger: str | None, what: str) -> Any:
    """One of the source host's transfer slots (strict: a missing limit fails loudly rather than allowing
    unlimited transfers), in the estate's lease ledger: a replicate killed mid-transfer frees its slot at
    the next flow's start (tasks.limits.reclaim_and_say), not when its lease expires."""
    from prefect.runtime import task_run

    return slot(host_limit_name(p.source.name), Path(ledger) if ledger else None,
                key=f"{task_run.id or 'task'}:{what}:{p.vm}", timeout=3600)


@task(name="replicate", task_run_name="replicate {p.vm}", **RETRY)
def replicate_vm(driver: Fabric, p: Placement, consistency: Literal["crash", "app"],
                 bandwidth_bytes_per_second: int | None, initial: bool, ledger: str | None = None) -> Step:
    """One transfer (a delta cycle, or a due initial copy) under the source host's transfer limit."""
    with _transfer_slot(p, ledger, "replicate"):
        if initial:
            with reporting(p.vm, "initial replication") as progress:
                return Step.of(driver.start_initial_replication(p, progress=progress))
        kwargs: dict[str, Any] = {}
        if bandwidth_bytes_per_second and supports_bandwidth(driver):
            kwargs["bandwidth_bytes_per_second"] = bandwidth_bytes_per_second
        with reporting(p.vm, "replicate") as progress:
            return Step.of(driver.replicate(p, consistency, progress=progress, **kwargs))


def supports_groups(driver: Fabric) -> bool:
    """Drivers that can capture several VMs at one instant (linux, memory); Hyper-V Replica cannot."""
    return callable(getattr(driver, "replicate_group", None))


@task(name="replicate group", task_run_name="replicate group {group}", **RETRY)
def replicate_group_task(driver: Fabric, ps: list[Placement], group: str, consistency: Literal["crash", "app"],
                         bandwidth_bytes_per_second: int | None, ledger: str | None = None) -> list[Step]:
    """One cycle of a consistency group under one transfer slot of each member's source host."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        for host in sorted({p.source.name for p in ps}):
            stack.enter_context(_transfer_slot(next(p for p in ps if p.source.name == host), ledger, f"group-{group}"))
        kwargs: dict[str, Any] = {}
        if bandwidth_bytes_per_second and supports_bandwidth(driver):
            kwargs["bandwidth_bytes_per_second"] = bandwidth_bytes_per_second
        with reporting(group, "replicate group") as progress:
            return [Step.of(r) for r in driver.replicate_group(ps, group, consistency, progress=progress, **kwargs)]  # type: ignore[attr-defined]


def host_limit_name(host: str) -> str:
    return f"replication-host-{host}"


# ---- health -------------------------------------------------------------------------------------

@task(name="read health", task_run_name="read health {p.vm}", cache_policy=NO_CACHE)
def read_health(driver: Fabric, p: Placement) -> HealthRow:
    try:
        return HealthRow.of(driver.replication_health(p), p)
    except ExecutionError as exc:
        return HealthRow.unreadable(p, exc)


def event_resource(alert: Alert) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Resource ids automations match on: the VM, with its pairing and hosts as related resources."""
    row = alert.row
    resource = {
        "prefect.resource.id": f"siterecovery.vm.{alert.vm}",
        "prefect.resource.name": alert.vm,
        "siterecovery.pairing": alert.pairing,
        "siterecovery.health": row.health,
        "siterecovery.state": row.state,
    }
    related = [{"prefect.resource.id": f"siterecovery.pairing.{alert.pairing}",
                "prefect.resource.role": "pairing", "prefect.resource.name": alert.pairing}]
    for role, host in (("primary-host", row.primary), ("replica-host", row.replica)):
        if host:
            related.append({"prefect.resource.id": f"siterecovery.host.{host}", "prefect.resource.role": role,
                            "prefect.resource.name": host})
    return resource, related


def emit_alert(alert: Alert) -> Event | None:
    """The one place protection events leave the process (tests observe it here)."""
    resource, related = event_resource(alert)
    row = alert.row
    payload = {
        "reasons": list(alert.reasons), "breach_started": alert.breach_started.isoformat(),
        "current_rpo_seconds": row.current_rpo_seconds, "rpo_threshold_seconds": row.rpo_threshold_seconds,
        "health": row.health, "state": row.state, "details": row.details,
        "last_replication_time": row.last_replication_time.isoformat() if row.last_replication_time else None,
    }
    return emit_event(event=alert.event, resource=resource, related=related, payload=payload,
                      occurred=alert.occurred, id=uuid.UUID(alert.id))


# ---- resync and disable -------------------------------------------------------------------------

@task(name="resynchronize", task_run_name="resynchronize {p.vm}", **RETRY)
def resync_vm(driver: Fabric, p: Placement, ledger: str | None = None) -> Step:
    # A resync reads whole disks: it counts as a transfer against the host's limit.
    with _transfer_slot(p, ledger, "resynchronize"):
        with reporting(p.vm, "resynchronize") as progress:
            return Step.of(driver.resynchronize(p, progress=progress))


def supports_scrub(driver: Fabric) -> bool:
    """Drivers whose replicas we hold (linux) can be scrubbed; Hyper-V Replica keeps its own files."""
    return callable(getattr(driver, "scrub", None))


@task(name="scrub", task_run_name="scrub {p.vm}", **RETRY)
def scrub_vm(driver: Fabric, p: Placement, rate_bytes_per_second: int | None, points: bool) -> OpResult:
    """Re-hash the VM's replica disks against their manifests (and undo logs with `points`)."""
    return driver.scrub(p, rate_bytes_per_second=rate_bytes_per_second, points=points)  # type: ignore[attr-defined,no-any-return]


@task(name="disable replication", task_run_name="disable replication {p.vm}", **RETRY)
def disable_vm(driver: Fabric, p: Placement, delete_replica: bool) -> Step:
    return Step.of(driver.disable_replication(p, delete_replica=delete_replica))


@task(name="power vm", task_run_name="{action} {p.vm}", **RETRY)
def power_vm(driver: Fabric, p: Placement, action: str) -> Step:
    """Start or stop a protected VM where it runs now: its primary, or the replica site once failed over."""
    h = driver.replication_health(p)
    if h.primary_host == p.target.name and h.replica_host == p.source.name:
        p = p.model_copy(update={"source": p.target, "target": p.source})  # replication runs reversed
    failed_over = h.state.value in ("FailedOverWaitingCompletion", "FailedOver")
    side: Literal["source", "target"] = "target" if failed_over else "source"
    if action == "start":
        return Step.of(driver.start_vm(p, side=side))
    return Step.of(driver.stop_vm(p, side=side))
# ---- suspend and resume -------------------------------------------------------------------------

@task(name="suspend replication", task_run_name="suspend replication {p.vm}", **RETRY)
def suspend_vm(driver: Fabric, p: Placement) -> Step:
    return Step.of(driver.suspend(p))


@task(name="resume replication", task_run_name="resume replication {p.vm}", **RETRY)
def resume_vm(driver: Fabric, p: Placement) -> Step:
    return Step.of(driver.resume(p))
