"""Protection lifecycle flows for one cloud pairing: enable-protection, replicate, replication-health,
resynchronize, disable-protection, suspend-replication and resume-replication. Each takes `pairing`,
`project`, `vms` (default: every VM of the pairing's protected cloud) and `fabric` (override the hosts'
fabric kind, e.g. `memory` for a dry run).

Every flow is safe to re-run: fabric operations are idempotent and report when they changed nothing,
and the little state the flows keep (open RPO breaches, unsent alerts, failed cycles) lives in
<state>/protection/<pairing>.json under a lock. Run one from a shell: `python -m flows.protection -h`.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from siterecovery import protection as core
from siterecovery.errors import ConfigurationError, ExecutionError
from siterecovery.estate import open_estate
from siterecovery.fabric import Fabric, OpResult, Placement, ReplicationState
from siterecovery.model import Direction, Pairing
from siterecovery.model.common import Frozen
from siterecovery.placement import pairing_placements
from siterecovery.project import Project, load_project
from siterecovery.protection import EVENT_CORRUPT, Alert, HealthRow, PairingState
from tasks.limits import reclaim_and_say
from tasks.protection import (
    Readiness,
    Step,
    configure_host,
    disable_vm,
    emit_alert,
    enable_vm,
    extend_vm,
    finalize_vm,
    host_limit_name,
    initial_due,
    initial_replication_vm,
    power_vm,
    read_health,
    replicate_group_task,
    replicate_vm,
    resume_vm,
    resync_vm,
    scrub_vm,
    supports_bandwidth,
    supports_groups,
    supports_scrub,
    suspend_vm,
)
from tasks.protection_fabric import get_fabric
from tasks.runtime import task_outcome

S = ReplicationState
# One thread per VM would be unbounded (Prefect's default); transfers are further limited per host.
RUNNER_WORKERS = 8


def runner() -> Any:
    return ThreadPoolTaskRunner(max_workers=RUNNER_WORKERS)


@dataclass
class Scope:
    """What a protection flow acts on: the pairing's placements and one driver per fabric kind."""

    project: Project
    pairing: Pairing
    placements: dict[str, Placement]
    state: Path
    fabric: str | None
    drivers: dict[str, Fabric] = field(default_factory=dict)

    def kind(self, p: Placement) -> str:
        return core.kind_of(p, self.fabric)

    def driver(self, p: Placement) -> Fabric:
        kind = self.kind(p)
        if kind not in self.drivers:
            self.drivers[kind] = get_fabric(kind, self.state)
        return self.drivers[kind]


@contextmanager
def scope(pairing: str, project: str, vms: list[str] | None, fabric: str | None) -> Iterator[Scope]:
    proj = load_project(Path(project))
    try:
        pair = proj.protection.pairing(pairing)
        placements = pairing_placements(proj, pair, Direction.forward, vms)
    except KeyError as exc:
        raise ConfigurationError(str(exc.args[0])) from None
    sc = Scope(project=proj, pairing=pair, placements=placements, state=open_estate(proj.root), fabric=fabric)
    try:
        yield sc
    finally:
        for d in sc.drivers.values():
            d.close()


def outcome(fut: PrefectFuture[Any]) -> tuple[Any, BaseException | None]:
    """A task's value, or the exception it ended with (so one VM's failure does not hide the others')."""
    fut.wait()
    status, value, exc = task_outcome(fut)
    if status != "completed" and exc is None:
        exc = ExecutionError(f"the task ended {fut.state.type.value} without an error", hint="read its run's log")
    return value, exc


def collect(futs: dict[str, PrefectFuture[Any]]) -> tuple[dict[str, Any], dict[str, BaseException]]:
    """Every VM's task value, and the errors apart: one VM's failure does not hide the others'."""
    done: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}
    for vm, fut in futs.items():
        value, exc = outcome(fut)
        if exc is not None:
            errors[vm] = exc
        else:
            done[vm] = value
    return done, errors


def fail_if(errors: dict[str, BaseException], total: int, flow_name: str) -> None:
    if errors:
        lines = "; ".join(f"{vm}: {exc}" for vm, exc in sorted(errors.items()))
        raise ExecutionError(f"{len(errors)} of {total} VMs failed: {lines}",
                             hint=f"fix the cause and re-run {flow_name}; VMs that succeeded are left as they are")


# ---- enable-protection --------------------------------------------------------------------------

class VMProtection(Frozen):
    vm: str
    outcome: Literal["protected", "already protected", "pending initial replication", "not ready", "failed"]
    steps: tuple[Step, ...] = ()
    ready: bool = False
    note: str = ""

    @property
    def changed(self) -> bool:
        return any(s.changed for s in self.steps)


@flow(name="enable-protection", task_runner=runner())
def enable_protection(pairing: str, project: str = "plans", vms: list[str] | None = None,
                      fabric: str | None = None, configure_sites: bool = True) -> list[VMProtection]:
    """Configure the replica site, enable replication, run or schedule the initial copy, finalize.

    Reports per VM whether anything changed: a VM already protected reports `already protected`.
    """
    log = get_run_logger()
    with scope(pairing, project, vms, fabric) as sc:
        if configure_sites:
            primaries: dict[str, dict[str, Any]] = {}
            replica_hosts = {}
            for p in sc.placements.values():
                primaries.setdefault(p.target.name, {})[p.source.name] = p.source
                replica_hosts[p.target.name] = p
            for name, p in sorted(replica_hosts.items()):
                hosts = [primaries[name][h] for h in sorted(primaries[name])]
                log.info("%s: %s", name, configure_host(sc.driver(p), p.target, hosts))
            # Reverse replication makes each primary a replica of its replica hosts (seed 003: enable the
            # primary as a replica server too), so the primaries are configured the other way round.
            reverse: dict[str, tuple[Any, dict[str, Any]]] = {}
            for p in sc.placements.values():
                if p.source.replica_server is not None:
                    reverse.setdefault(p.source.name, (p, {}))[1][p.target.name] = p.target
            for name, (p, targets) in sorted(reverse.items()):
                hosts = [targets[h] for h in sorted(targets)]
                log.info("%s (for reverse replication): %s", name,
                         configure_host(sc.driver(p), p.source, hosts))

        steps: dict[str, list[Step]] = {vm: [] for vm in sc.placements}
        errors: dict[str, BaseException] = {}
        ready: dict[str, Readiness] = {}

        def phase(fn: Any, *extra: Any) -> None:
            futs = {vm: fn.submit(sc.driver(p), p, *extra) for vm, p in sc.placements.items() if vm not in errors}
            for vm, fut in futs.items():
                value, exc = outcome(fut)
                if exc is not None:
                    errors[vm] = exc
                elif isinstance(value, Readiness):
                    ready[vm] = value
                    steps[vm].append(value.network)
                else:
                    steps[vm].append(value)

        phase(enable_vm)
        phase(initial_replication_vm)
        if any(p.extended is not None for p in sc.placements.values()):
            phase(extend_vm)
        phase(finalize_vm)

        reports = []
        for vm in sc.placements:
            if vm in errors:
                reports.append(VMProtection(vm=vm, outcome="failed", steps=tuple(steps[vm]), note=str(errors[vm])))
                continue
            r = ready[vm]
            changed = any(s.changed for s in steps[vm])
            if r.ready:
                kind: Any = "protected" if changed else "already protected"
                note = f"{r.points} recovery point(s), network {'applied' if r.network.changed else 'already applied'}"
            elif r.state in (S.ReadyForInitialReplication, S.InitialReplicationInProgress, S.WaitingForInitialReplication):
                kind, note = "pending initial replication", steps[vm][1].message if len(steps[vm]) > 1 else r.reason
            else:
                kind, note = "not ready", r.reason
            reports.append(VMProtection(vm=vm, outcome=kind, steps=tuple(steps[vm]), ready=r.ready, note=note))

        create_markdown_artifact(key=f"enable-protection-{pairing}", markdown=_protection_markdown(pairing, reports),
                                 description=f"enable-protection of pairing {pairing}")
        for rep in reports:
            log.info("%s: %s (%s)", rep.vm, rep.outcome, rep.note)
        fail_if(errors, len(sc.placements), "enable-protection")
        return reports


def _protection_markdown(pairing: str, reports: list[VMProtection]) -> str:
    lines = [f"# Protection of pairing `{pairing}`", "", "| VM | outcome | steps | note |", "|---|---|---|---|"]
    for r in reports:
        done = ", ".join(f"{s.step}: {'changed' if s.changed else 'no change'}" for s in r.steps)
        lines.append(f"| {r.vm} | {r.outcome} | {done} | {r.note.replace('|', '/')} |")
    return "\n".join(lines)


# ---- replicate ----------------------------------------------------------------------------------

class CycleReport(Frozen):
    vm: str
    action: Literal["cycle", "initial", "skipped", "failed"]
    consistency: str = ""
    bytes_sent: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    note: str = ""


def submit_groups(sc: Scope, todo: dict[str, tuple[Placement, bool]], reports: dict[str, CycleReport],
                  consistency: str, bandwidth_mbps: float | None, ledger: str, log: Any) -> dict[str, Any]:
    """One group cycle per consistency group of the pairing (its members leave `todo`). A group cycles only
    when every member is due a delta cycle; otherwise no member cycles and each says which member holds
    the group back (a member's own point would be no group point: a failover of the group never uses it)."""
    out: dict[str, Any] = {}
    for g in sc.project.protection.consistency_groups:
        members = [vm for vm in g.vms if vm in sc.placements]
        if not members:
            continue
        waiting = [vm for vm in g.vms if vm not in todo or todo[vm][1]]
        if waiting:
            held = "; ".join(f"{m}: " + ("initial replication first" if m in todo else
                                         reports[m].note if m in reports else "not in this run") for m in waiting)
            for vm in members:
                if vm in todo and not todo[vm][1]:
                    del todo[vm]
                    reports[vm] = CycleReport(vm=vm, action="skipped",
                                              note=f"consistency group {g.name} waits for every member ({held})")
            continue
        ps = [todo.pop(vm)[0] for vm in g.vms]
        driver = sc.driver(ps[0])
        if not supports_groups(driver):
            raise ConfigurationError(f"consistency group {g.name}: the {driver.kind} fabric cannot capture VMs "
                                     "together (siterecovery validate says so)")
        cons = choose_consistency(driver, ps[0], consistency)
        cap = int(bandwidth_mbps * 1_000_000 / 8) if bandwidth_mbps else ps[0].policy.bandwidth_bytes_per_second
        log.info("consistency group %s: one %s-consistent cycle of %s", g.name, cons, ", ".join(g.vms))
        out[g.name] = (replicate_group_task.submit(driver, ps, g.name, cons, cap, ledger), cons, list(g.vms))
    return out


def transfer_ledger(sc: Scope, log: Any) -> str:
    """The estate's lease ledger, with the slots of dead transfers released first."""
    ledger = sc.state / "leases"
    reclaim_and_say(ledger, log)
    return str(ledger)


def ensure_host_limits(placements: list[Placement]) -> None:
    """Create or update one global concurrency limit per source host (Hyper-V's MaximumActiveTransfers):
    Prefect needs the limit to exist, or `concurrency()` does not limit anything."""
    from prefect.client.orchestration import get_client

    limits = {p.source.name: p.source.max_active_transfers for p in placements}
    with get_client(sync_client=True) as client:
        for host, limit in sorted(limits.items()):
            client.upsert_global_concurrency_limit_by_name(host_limit_name(host), limit)


def choose_consistency(driver: Fabric, p: Placement, mode: str) -> Literal["crash", "app"]:
    """`auto`: an app-consistent point when the policy asks for them and the newest is older than its
    frequency; otherwise crash-consistent (every cycle)."""
    if mode in ("crash", "app"):
        return mode  # type: ignore[return-value]
    hours = p.policy.app_consistent_frequency_hours
    if not hours:
        return "crash"
    apps = [pt.created_at for pt in driver.recovery_points(p) if pt.consistency == "app"]
    if not apps:
        return "app"
    return "app" if (datetime.now(UTC) - max(apps)).total_seconds() >= hours * 3600 else "crash"


@flow(name="replicate", task_runner=runner())
def replicate(pairing: str, project: str = "plans", vms: list[str] | None = None, fabric: str | None = None,
              bandwidth_mbps: float | None = None,
              consistency: Literal["auto", "crash", "app"] = "auto") -> list[CycleReport]:
    """One delta cycle for each protected VM (deploy it at the policy's copy frequency).

    At most `max_active_transfers` transfers run at once per source host. `bandwidth_mbps` caps each
    source host's replication traffic (default: the policy's `bandwidth_mbps`); the linux engine shares
    one token bucket per source host between its concurrent transfers. Passed to drivers that accept
    `bandwidth_bytes_per_second` (a driver without it replicates uncapped, and the report says so).
    A scheduled network initial copy that has come due is started here too.
    """
    log = get_run_logger()
    with scope(pairing, project, vms, fabric) as sc:
        reports: dict[str, CycleReport] = {}
        todo: dict[str, tuple[Placement, bool]] = {}
        healths = {vm: read_health.submit(sc.driver(p), p) for vm, p in sc.placements.items()}
        now = datetime.now(UTC)
        for vm, p in sc.placements.items():
            if sc.kind(p) not in core.DATA_PATH_KINDS:
                reports[vm] = CycleReport(vm=vm, action="skipped",
                                          note=f"{sc.kind(p)} replicates by itself every {p.policy.copy_frequency_seconds} s")
                continue
            row: HealthRow = healths[vm].result()
            # A VM that needs resynchronizing waits for the resynchronize flow (and its off-hours
            # window): a cycle would read its whole disk now. The linux fabric reports lost change
            # tracking as resync_required while its state still reads Replicating.
            if row.state == S.Replicating and not row.resync_required:
                todo[vm] = (p, False)
            elif row.state == S.ReadyForInitialReplication and initial_due(p, now) is None:
                todo[vm] = (p, True)
            else:
                why = core.resync_reason(row) or f"state {row.state}"
                reports[vm] = CycleReport(vm=vm, action="skipped", note=why)
        if todo:
            ensure_host_limits([p for p, _ in todo.values()])
        ledger = transfer_ledger(sc, log)
        group_futs = submit_groups(sc, todo, reports, consistency, bandwidth_mbps, ledger, log)
        futs = {}
        for vm, (p, initial) in todo.items():
            driver = sc.driver(p)
            cons = "crash" if initial else choose_consistency(driver, p, consistency)
            # The whole host's cap: the driver shares it between the host's transfers (one bucket).
            cap = int(bandwidth_mbps * 1_000_000 / 8) if bandwidth_mbps else p.policy.bandwidth_bytes_per_second
            if cap and not supports_bandwidth(driver):
                log.warning("%s: the %s driver has no bandwidth cap; replicating uncapped", vm, driver.kind)
            futs[vm] = (replicate_vm.submit(driver, p, cons, cap, initial, ledger), cons, cap, driver)
        errors: dict[str, BaseException] = {}
        with core.pairing_state(sc.state, pairing) as ps:
            for vm, (fut, cons, cap, driver) in futs.items():
                step, exc = outcome(fut)
                if exc is not None:
                    errors[vm] = exc
                    ps.failed_cycles[vm] = ps.failed_cycles.get(vm, 0) + 1
                    reports[vm] = CycleReport(vm=vm, action="failed", note=f"{exc} ({ps.failed_cycles[vm]} in a row)")
                    continue
                ps.failed_cycles.pop(vm, None)
                note = step.message
                if cap and not supports_bandwidth(driver):
                    note += "; bandwidth cap not supported by this driver"
                reports[vm] = CycleReport(vm=vm, action="initial" if todo[vm][1] else "cycle",
                                          consistency=step.consistency or cons,
                                          bytes_sent=step.bytes_sent, started_at=step.started_at,
                                          finished_at=step.finished_at, note=note)
            for name, (fut, cons, members) in group_futs.items():
                steps, exc = outcome(fut)
                if exc is not None:
                    for vm in members:
                        errors[vm] = exc
                        ps.failed_cycles[vm] = ps.failed_cycles.get(vm, 0) + 1
                        reports[vm] = CycleReport(vm=vm, action="failed", note=f"consistency group {name}: {exc} "
                                                  f"({ps.failed_cycles[vm]} in a row)")
                    continue
                for step in steps:
                    ps.failed_cycles.pop(step.vm, None)
                    reports[step.vm] = CycleReport(vm=step.vm, action="cycle", consistency=step.consistency or cons,
                                                   bytes_sent=step.bytes_sent,
                                                   started_at=step.started_at, finished_at=step.finished_at,
                                                   note=step.message)
        ordered = [reports[vm] for vm in sc.placements]
        log.info("replicate %s: %s", pairing, ", ".join(f"{r.vm} {r.action}" for r in ordered))
        fail_if(errors, len(sc.placements), "replicate")
        return ordered


# ---- replication-health -------------------------------------------------------------------------

def drain_outbox(ps: PairingState) -> int:
    """Send queued alerts in order; each leaves the outbox only once handed to Prefect."""
    sent = 0
    for alert in list(ps.outbox):
        emit_alert(alert)
        ps.outbox.remove(alert)
        sent += 1
    return sent


@flow(name="replication-health", task_runner=runner())
def replication_health(pairing: str, project: str = "plans", vms: list[str] | None = None,
                       fabric: str | None = None) -> list[HealthRow]:
    """Read every VM's replication health into a table artifact and alert on RPO breaches.

    A VM is in breach while its current RPO exceeds the policy's RPO threshold, its health is Critical,
    or its health cannot be read. Entering a breach emits one `siterecovery.replication.breached` event;
    leaving it one `siterecovery.replication.recovered` event; runs in between emit nothing for it.
    """
    log = get_run_logger()
    with scope(pairing, project, vms, fabric) as sc:
        futs = {vm: read_health.submit(sc.driver(p), p) for vm, p in sc.placements.items()}
        rows: list[HealthRow] = [f.result() for f in futs.values()]
        create_table_artifact(key=f"replication-health-{pairing}", table=[r.table_row() for r in rows],
                              description=f"Replication health of pairing {pairing}")
        with core.pairing_state(sc.state, pairing) as ps:
            for alert in ps.observe(rows, datetime.now(UTC)):
                log.warning("%s %s: %s", alert.event, alert.vm, ", ".join(alert.reasons) or "ok")
            drain_outbox(ps)
        return rows


# ---- resynchronize ------------------------------------------------------------------------------

class ResyncReport(Frozen):
    status: Literal["resynchronized", "nothing to do", "deferred", "failed"]
    window: tuple[str, str] | None = None
    waited_seconds: float = 0
    next_window: datetime | None = None
    candidates: dict[str, str] = {}
    steps: tuple[Step, ...] = ()


@flow(name="resynchronize", task_runner=runner())
def resynchronize(pairing: str, project: str = "plans", vms: list[str] | None = None, fabric: str | None = None,
                  on_demand: bool = False, outside_window: Literal["wait", "defer"] = "wait") -> ResyncReport:
    """Resynchronize VMs marked for it (resync required, WaitingForStartResynchronize, Error, or
    repeated failed cycles).

    on_demand=True runs now (the operator's manual Resynchronize; VMs named in `vms` are resynchronized
    even if not marked). Otherwise the policy's resync_window applies: outside it the flow waits for
    the window to open (`outside_window="wait"`) or returns `deferred` at once (`"defer"`, for a
    frequent schedule). No window configured: any time.
    """
    log = get_run_logger()
    with scope(pairing, project, vms, fabric) as sc:
        policy = sc.project.protection.policy(sc.pairing.policy)
        window = policy.resync_window

        def candidates() -> dict[str, str]:
            failed = core.read_pairing_state(sc.state, pairing).failed_cycles
            futs = {vm: read_health.submit(sc.driver(p), p) for vm, p in sc.placements.items()}
            out = {}
            for vm, f in futs.items():
                reason = core.resync_reason(f.result(), failed.get(vm, 0))
                if reason is None and on_demand and vms is not None:
                    reason = "requested"
                if reason is not None:
                    out[vm] = reason
            return out

        marked = candidates()
        if not marked:
            return ResyncReport(status="nothing to do", window=window)
        waited = 0.0
        if not on_demand and not core.in_window(core.CLOCK.now(), window):
            start = core.CLOCK.now()
            while not core.in_window(core.CLOCK.now(), window):
                assert window is not None  # in_window is always true without one
                opens = core.next_window_start(core.CLOCK.now(), window)
                if outside_window == "defer":
                    log.info("outside the resync window %s-%s: deferred to %s", *window, opens.isoformat())
                    return ResyncReport(status="deferred", window=window, next_window=opens, candidates=marked)
                log.info("outside the resync window %s-%s: waiting until %s", *window, opens.isoformat())
                # Short sleeps, re-reading the clock: robust to clock changes and DST shifts.
                core.CLOCK.sleep(min(300.0, max(1.0, (opens - core.CLOCK.now()).total_seconds())))
            waited = (core.CLOCK.now() - start).total_seconds()
            marked = candidates()  # the estate may have changed while we waited
        if not marked:
            return ResyncReport(status="nothing to do", window=window, waited_seconds=waited)
        ensure_host_limits([sc.placements[vm] for vm in marked])
        ledger = transfer_ledger(sc, log)
        futs = {vm: resync_vm.submit(sc.driver(sc.placements[vm]), sc.placements[vm], ledger) for vm in marked}
        done, errors = collect(futs)
        steps = list(done.values())
        with core.pairing_state(sc.state, pairing) as ps:
            for vm in done:
                ps.failed_cycles.pop(vm, None)
        report = ResyncReport(status="failed" if errors else "resynchronized", window=window, waited_seconds=waited,
                              candidates=marked, steps=tuple(steps))
        log.info("resynchronize %s: %s", pairing, ", ".join(f"{s.vm}: {s.message}" for s in steps))
        fail_if(errors, len(marked), "resynchronize")
        return report


# ---- scrub --------------------------------------------------------------------------------------

class ScrubReport(Frozen):
    vm: str
    outcome: Literal["intact", "corrupt", "repaired", "skipped", "failed"]
    replica_host: str = ""
    bytes_read: int = 0
    seconds: float = 0
    mb_per_second: float = 0
    corrupt_blocks: int = 0
    corrupt_undo_logs: int = 0
    note: str = ""


@flow(name="scrub", task_runner=runner())
def scrub(pairing: str, project: str = "plans", vms: list[str] | None = None, fabric: str | None = None,
          rate_mb_per_second: float = 50.0, points: bool = False, repair: bool = True) -> list[ScrubReport]:
    """Re-hash every replica disk of the pairing against its manifest (`points`: every undo log too),
    at most `rate_mb_per_second` MB/s per replica host (its VMs are scrubbed one after the other), so
    production I/O is not starved. Bit rot changes no timestamp: only this finds it.

    A corrupt replica is reported Critical (its health stays so until repaired), emits one
    `siterecovery.replication.corrupt` event, and with `repair` is resynchronized at once: the block
    compare with the source ships exactly the blocks that differ.
    """
    log = get_run_logger()
    rate = int(rate_mb_per_second * 1_000_000) if rate_mb_per_second and rate_mb_per_second > 0 else None
    with scope(pairing, project, vms, fabric) as sc:
        reports: dict[str, ScrubReport] = {}
        futs: dict[str, PrefectFuture[OpResult]] = {}
        last_on_host: dict[str, PrefectFuture[OpResult]] = {}
        for vm, p in sc.placements.items():
            driver = sc.driver(p)
            if not supports_scrub(driver):
                reports[vm] = ScrubReport(vm=vm, outcome="skipped", replica_host=p.target.name,
                                          note=f"the {driver.kind} fabric keeps its own replica files: nothing to scrub")
                continue
            prev = last_on_host.get(p.target.name)
            futs[vm] = scrub_vm.submit(driver, p, rate, points, return_state=False,
                                       wait_for=[prev] if prev else None)
            last_on_host[p.target.name] = futs[vm]
        errors: dict[str, BaseException] = {}
        corrupt: dict[str, OpResult] = {}
        for vm, fut in futs.items():
            res, exc = outcome(fut)
            p = sc.placements[vm]
            if exc is not None:
                errors[vm] = exc
                reports[vm] = ScrubReport(vm=vm, outcome="failed", replica_host=p.target.name, note=str(exc))
                continue
            d = res.details
            reports[vm] = ScrubReport(vm=vm, outcome="corrupt" if res.changed else "intact", replica_host=p.target.name,
                                      bytes_read=int(d.get("bytes_read") or 0), seconds=float(d.get("seconds") or 0),
                                      mb_per_second=float(d.get("mb_per_second") or 0),
                                      corrupt_blocks=int(d.get("corrupt_blocks") or 0),
                                      corrupt_undo_logs=int(d.get("corrupt_undo_logs") or 0), note=res.message)
            if res.changed:
                corrupt[vm] = res
        if corrupt:
            rows = {vm: read_health.submit(sc.driver(sc.placements[vm]), sc.placements[vm]) for vm in corrupt}
            now = datetime.now(UTC)
            with core.pairing_state(sc.state, pairing) as ps:
                for vm, res in corrupt.items():
                    log.error("%s", res.message)
                    ps.outbox.append(Alert(id=str(uuid.uuid4()), event=EVENT_CORRUPT, pairing=pairing, vm=vm,
                                           occurred=now, reasons=(res.message,), breach_started=now,
                                           row=rows[vm].result()))
                drain_outbox(ps)
            if repair:
                ensure_host_limits([sc.placements[vm] for vm in corrupt])
                ledger = transfer_ledger(sc, log)
                fixes = {vm: resync_vm.submit(sc.driver(sc.placements[vm]), sc.placements[vm], ledger)
                         for vm in corrupt}
                for vm, fix in fixes.items():
                    step, exc = outcome(fix)
                    r = reports[vm]
                    if exc is not None:
                        errors[vm] = exc
                        reports[vm] = r.model_copy(update={"note": f"{r.note}; repair failed: {exc}"})
                    else:
                        reports[vm] = r.model_copy(update={"outcome": "repaired", "note": f"{r.note}; {step.message}"})
        ordered = [reports[vm] for vm in sc.placements]
        create_table_artifact(key=f"scrub-{pairing}", table=[r.model_dump(mode="json") for r in ordered],
                              description=f"Scrub of the replicas of pairing {pairing}")
        log.info("scrub %s: %s", pairing, ", ".join(f"{r.vm} {r.outcome}" for r in ordered))
        fail_if(errors, len(sc.placements), "scrub")
        return ordered


# ---- disable-protection -------------------------------------------------------------------------

class VMDisable(Frozen):
    vm: str
    changed: bool
    delete_replica: bool
    message: str


@flow(name="disable-protection", task_runner=runner())
def disable_protection(pairing: str, project: str = "plans", vms: list[str] | None = None,
                       fabric: str | None = None, delete_replica: bool | None = None) -> list[VMDisable]:
    """Disable replication; delete the replica VM when the policy's delete_replica_on_disable says so
    (or `delete_replica` overrides it). An open RPO breach of a disabled VM is closed with a
    `recovered` event so that an automation can resolve its incident."""
    with scope(pairing, project, vms, fabric) as sc:
        policy = sc.project.protection.policy(sc.pairing.policy)
        delete = policy.delete_replica_on_disable if delete_replica is None else delete_replica
        rows = {vm: read_health.submit(sc.driver(p), p) for vm, p in sc.placements.items()}
        futs = {vm: disable_vm.submit(sc.driver(p), p, delete) for vm, p in sc.placements.items()}
        reports, errors = [], {}
        with core.pairing_state(sc.state, pairing) as ps:
            for vm, fut in futs.items():
                step, exc = outcome(fut)
                if exc is not None:
                    errors[vm] = exc
                    continue
                ps.forget(vm, rows[vm].result(), datetime.now(UTC))
                reports.append(VMDisable(vm=vm, changed=step.changed, delete_replica=delete and step.changed,
                                         message=step.message))
            drain_outbox(ps)
        fail_if(errors, len(sc.placements), "disable-protection")
        return reports


# ---- suspend-replication and resume-replication --------------------------------------------------

def _each_vm(pairing: str, project: str, vms: list[str] | None, fabric: str | None, task_: Any,
             flow_name: str, *args: Any) -> list[Step]:
    """One task per VM of the pairing (or the named VMs); every VM is tried, failures reported together."""
    log = get_run_logger()
    with scope(pairing, project, vms, fabric) as sc:
        futs = {vm: task_.submit(sc.driver(p), p, *args) for vm, p in sc.placements.items()}
        done, errors = collect(futs)
        steps = list(done.values())
        log.info("%s %s: %s", flow_name, pairing, ", ".join(f"{s.vm}: {s.message}" for s in steps))
        fail_if(errors, len(sc.placements), flow_name)
        return steps


@flow(name="suspend-replication", task_runner=runner())
def suspend_replication(pairing: str, project: str = "plans", vms: list[str] | None = None,
                        fabric: str | None = None) -> list[Step]:
    """Suspend replication of the pairing's VMs (or the named ones), like Suspend-VMReplication: no
    cycle ships changes until resume-replication; the replica and its recovery points stay, so a
    failover still works (to the newest point). A VM already suspended reports no change."""
    return _each_vm(pairing, project, vms, fabric, suspend_vm, "suspend-replication")


@flow(name="resume-replication", task_runner=runner())
def resume_replication(pairing: str, project: str = "plans", vms: list[str] | None = None,
                       fabric: str | None = None) -> list[Step]:
    """Resume suspended replication, like Resume-VMReplication: the next cycle ships everything written
    while suspended (changes are still tracked). A VM already replicating reports no change."""
    return _each_vm(pairing, project, vms, fabric, resume_vm, "resume-replication")


# ---- vm start / stop ------------------------------------------------------------------------------

@flow(name="vm-power", task_runner=runner())
def vm_power(pairing: str, action: Literal["start", "stop"], project: str = "plans", vms: list[str] | None = None,
             fabric: str | None = None) -> list[Step]:
    """Start or stop protected VMs where they run now (the primary, or the replica site once failed
    over): for the qemu backend an ACPI power-off with a deadline, then kill."""
    return _each_vm(pairing, project, vms, fabric, power_vm, f"vm {action}", action)


# ---- running from a shell -----------------------------------------------------------------------

FLOWS: dict[str, Any] = {"enable-protection": enable_protection, "replicate": replicate,
                         "replication-health": replication_health, "resynchronize": resynchronize,
                         "disable-protection": disable_protection, "scrub": scrub,
                         "suspend-replication": suspend_replication, "resume-replication": resume_replication}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.protection", description="Run one protection flow now.")
    ap.add_argument("flow", choices=sorted(FLOWS))
    ap.add_argument("pairing")
    ap.add_argument("vms", nargs="*", help="VMs (default: every VM of the pairing)")
    ap.add_argument("--project", default="plans")
    ap.add_argument("--fabric", default=None, help="override the hosts' fabric kind, e.g. memory")
    ap.add_argument("--on-demand", action="store_true", help="resynchronize: ignore the resync window")
    ap.add_argument("--defer", action="store_true", help="resynchronize: outside the window return at once")
    ap.add_argument("--bandwidth-mbps", type=float, default=None, help="replicate: cap per source host")
    ap.add_argument("--rate-mb", type=float, default=50.0, help="scrub: MB/s per replica host (0: unlimited)")
    ap.add_argument("--points", action="store_true", help="scrub: also verify the recovery points' undo logs")
    ap.add_argument("--no-repair", action="store_true", help="scrub: report corruption, do not resynchronize")
    args = ap.parse_args(argv)
    kw: dict[str, Any] = {"pairing": args.pairing, "project": args.project, "vms": args.vms or None,
                          "fabric": args.fabric}
    if args.flow == "resynchronize":
        kw.update(on_demand=args.on_demand, outside_window="defer" if args.defer else "wait")
    if args.flow == "replicate":
        kw.update(bandwidth_mbps=args.bandwidth_mbps)
    if args.flow == "scrub":
        kw.update(rate_mb_per_second=args.rate_mb, points=args.points, repair=not args.no_repair)
    state = FLOWS[args.flow](**kw, return_state=True)
    value = state.result(raise_on_failure=False)
    if isinstance(value, BaseException):
        print(f"{args.flow} failed: {value}", file=sys.stderr)
        return 1
    items = value if isinstance(value, list) else [value]
    print(json.dumps([v.model_dump(mode="json") for v in items], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
