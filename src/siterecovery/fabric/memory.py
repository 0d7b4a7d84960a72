"""The in-memory fabric: Hyper-V Replica's state machine without hosts, for dry runs, flow tests and
benchmarks (like httpx's MockTransport).

It enforces the same preconditions as the real fabrics, records every call, and has knobs for latency
and failure injection. With `context.options["state_file"]` its state lives in a JSON file guarded by
a lock, so several processes (a flow run, a re-run, a test asserting afterwards) see one estate.
"""

from __future__ import annotations

import copy
import fcntl
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..errors import ConnectionFailed, FabricError, InvalidStateError, NotFoundError, TransientFabricError
from ..paths import check_ident
from . import FabricContext
from .base import (
    LATEST,
    Consistency,
    Health,
    OpResult,
    Placement,
    PointChoice,
    Progress,
    RecoveryPoint,
    ReplicationHealth,
    ReplicationMode,
    ReplicationState,
    Side,
    result,
    utcnow,
)

S = ReplicationState


@dataclass
class _VM:
    primary: str
    replica: str
    state: str = S.ReadyForInitialReplication.value
    points: list[dict[str, Any]] = field(default_factory=list)
    running: list[str] = field(default_factory=list)  # hosts where the VM (or its test copy) runs
    test_active: bool = False
    test_point: str | None = None
    failover_point: str | None = None
    last_replication: str | None = None
    cycles_ok: int = 0
    cycles_missed: int = 0
    resync_required: bool = False
    network_applied: bool = False
    networks: dict[str, dict[str, str | None]] = field(default_factory=dict)  # host -> NIC -> network (None: unplugged)
    needs_resync_after_reverse: bool = False
    seq: int = 0


class MemoryFabric:
    kind = "memory"

    def __init__(self, context: FabricContext | None = None) -> None:
        self.context = context or FabricContext()
        opts = self.context.options
        self.latency: dict[str, float] = dict(opts.get("latency", {}))  # operation -> seconds ("*" for all)
        self.state_file: Path | None = Path(opts["state_file"]) if opts.get("state_file") else None
        self._lock = threading.RLock()
        self.calls: list[tuple[float, str, str, str]] = []  # (time, operation, vm, host)
        # Without a state file the estate is this dict, in the same shape as the file's JSON:
        # vms: name -> _VM as a dict; faults: "operation|vm or *" -> [remaining count, kind, message].
        # Kept as is between calls (no conversion per call): a 1,000-VM plan stays linear.
        self._mem: dict[str, Any] = {"vms": {}, "faults": {}, "unreachable": sorted(opts.get("unreachable", ())),
                                     "calls": []}

    # ---- knobs -------------------------------------------------------------------------------
    def inject(self, operation: str, vm: str = "*", times: int = 1, transient: bool = False, message: str = "") -> None:
        """Make the next `times` calls of `operation` on `vm` fail."""
        with self._state() as st:
            st["faults"][f"{operation}|{vm}"] = [times, "transient" if transient else "fatal", message]

    def set_unreachable(self, host: str, down: bool = True) -> None:
        with self._state() as st:
            hosts = set(st["unreachable"])
            (hosts.add if down else hosts.discard)(host)
            st["unreachable"] = sorted(hosts)

    def seed(self, p: Placement, points: int = 3, every: timedelta = timedelta(minutes=5)) -> None:
        """Put a VM straight into Replicating with `points` recovery points (for flow tests)."""
        with self._state() as st:
            vm = _VM(primary=p.source.name, replica=p.target.name, state=S.Replicating.value, running=[p.source.name])
            now = utcnow()
            for i in range(points):
                vm.seq += 1
                vm.points.append(_point(p.vm, vm.seq, now - every * (points - 1 - i), "app" if i == 0 else "crash"))
            vm.last_replication = now.isoformat()
            vm.cycles_ok = points
            st["vms"][p.vm] = asdict(vm)

    def vm_state(self, vm: str) -> dict[str, Any]:
        with self._state() as st:
            return dict(st["vms"][vm])

    # ---- state plumbing ---------------------------------------------------------------------
    @contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """The estate as a dict, committed when the block ends. A failed operation changes no VM but
        still records its call and uses up its injected fault."""
        with self._lock:
            if self.state_file is None:
                st = self._mem
                st["calls"] = []
                try:
                    with self._commit(st):
                        yield st
                finally:
                    self.calls.extend(tuple(c) for c in st["calls"])  # type: ignore[misc]
                    st["calls"] = []
                return
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.state_file.with_suffix(".lock"), "a+") as lockf:
                fcntl.flock(lockf, fcntl.LOCK_EX)
                try:
                    st = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
                    assert isinstance(st, dict)
                    for key, empty in (("vms", {}), ("faults", {}), ("unreachable", []), ("calls", [])):
                        st.setdefault(key, empty)
                    before = len(st["calls"])
                    try:
                        with self._commit(st):
                            yield st
                    finally:
                        self.calls.extend(tuple(c) for c in st["calls"][before:])  # type: ignore[misc]
                        tmp = self.state_file.with_suffix(".tmp")
                        tmp.write_text(json.dumps(st, default=str))
                        tmp.replace(self.state_file)
                finally:
                    fcntl.flock(lockf, fcntl.LOCK_UN)

    @staticmethod
    @contextmanager
    def _commit(st: dict[str, Any]) -> Iterator[None]:
        # A shallow copy is enough: operations replace a VM's entry, never change it in place (_op works
        # on a deep copy of the one VM it touches), so restoring the mapping undoes adds and deletes.
        vms = dict(st["vms"])
        try:
            yield
        except BaseException:
            st["vms"] = vms
            raise

    def all_calls(self) -> list[tuple[float, str, str, str]]:
        """Every call recorded (from the state file when there is one, so other processes' calls count)."""
        if self.state_file is None:
            return list(self.calls)
        with self._state() as st:
            return [tuple(c) for c in st["calls"]]  # type: ignore[misc]

    @contextmanager
    def _op(self, operation: str, p: Placement, host: str) -> Iterator[tuple[dict[str, Any], _VM | None]]:
        delay = self.latency.get(operation, self.latency.get("*", 0.0))
        if delay:
            time.sleep(delay)
        with self._state() as st:
            st["calls"].append((time.time(), operation, p.vm, host))
            if host in st["unreachable"]:
                raise ConnectionFailed("host is unreachable", vm=p.vm, host=host, operation=operation,
                                       hint="check the host and the network, then re-run the plan")
            for key in (f"{operation}|{p.vm}", f"{operation}|*"):
                fault = st["faults"].get(key)
                if fault and fault[0] > 0:
                    fault[0] -= 1
                    cls = TransientFabricError if fault[1] == "transient" else FabricError
                    raise cls(fault[2] or f"injected failure of {operation}", vm=p.vm, host=host, operation=operation,
                              hint="this failure was injected by a test", error_id="Injected")
            # Records are keyed by name, not by path, but the rule is the same on every fabric: a
            # name the linux fabric would refuse (`./web-01`, `../x`) is refused here too.
            check_ident(p.vm, "VM name")
            raw = st["vms"].get(p.vm)
            vm = _VM(**copy.deepcopy(raw)) if raw else None
            yield st, vm
            if vm is not None and p.vm in st["vms"]:
                st["vms"][p.vm] = asdict(vm)

    def _either_way(self, vm: _VM | None, p: Placement, operation: str) -> _VM:
        """The VM of a placement's pair of hosts, whichever way replication runs between them now (a VM's
        networks belong to a host, not to a direction)."""
        if vm is not None and vm.primary == p.target.name and vm.replica == p.source.name:
            return vm
        return self._need(vm, p, operation)

    def _need(self, vm: _VM | None, p: Placement, operation: str, *allowed: ReplicationState) -> _VM:
        if vm is None:
            raise NotFoundError("replication is not enabled for this VM", vm=p.vm, operation=operation,
                                host=p.source.name, hint="enable protection first (siterecovery protect)",
                                error_id="ObjectNotFound")
        if vm.primary != p.source.name or vm.replica != p.target.name:
            raise InvalidStateError(
                f"replication runs {vm.primary} -> {vm.replica}, not {p.source.name} -> {p.target.name}",
                vm=p.vm, operation=operation, host=p.target.name, error_id="InvalidState",
                hint="check the direction: failback needs reverse replication first")
        if allowed and vm.state not in {a.value for a in allowed}:
            raise InvalidStateError(
                f"state {vm.state} does not allow {operation} (needs {' or '.join(a.value for a in allowed)})",
                vm=p.vm, operation=operation, host=p.target.name, error_id="InvalidState",
                hint="read replication health and bring the VM to a valid state first")
        return vm

    # ---- protection -------------------------------------------------------------------------
    def enable_replication(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("enable_replication", p, p.source.name) as (st, vm):
            if vm is not None and vm.state != S.Disabled.value:
                return result(p, "enable_replication", False, S(vm.state), "already enabled", t0, host=p.source.name)
            st["vms"][p.vm] = asdict(_VM(primary=p.source.name, replica=p.target.name, running=[p.source.name]))
            return result(p, "enable_replication", True, S.ReadyForInitialReplication, "replication enabled", t0,
                          host=p.source.name)

    def _add_point(self, vm: _VM, name: str, consistency: str = "crash", when: datetime | None = None,
                   group: str | None = None) -> dict[str, Any]:
        vm.seq += 1
        pt = _point(name, vm.seq, when or utcnow(), consistency)
        if group is not None:
            pt["group"] = group
        vm.points.append(pt)
        vm.last_replication = pt["created_at"]
        vm.cycles_ok += 1
        return pt

    def start_initial_replication(self, p: Placement, progress: Progress | None = None) -> OpResult:
        t0 = utcnow()
        with self._op("start_initial_replication", p, p.source.name) as (_, vm):
            vm = self._need(vm, p, "start_initial_replication")
            if vm.state == S.Replicating.value:
                return result(p, "start_initial_replication", False, S.Replicating, "initial replication already done", t0)
            self._need(vm, p, "start_initial_replication", S.ReadyForInitialReplication)
            total = sum(d.source_path.__len__() for d in p.disks) or 1
            if progress:
                progress(total, total)
            pt = self._add_point(vm, p.vm)
            vm.state = S.Replicating.value
            return result(p, "start_initial_replication", True, S.Replicating, "initial copy complete", t0,
                          point=_rp(pt))

    def replicate(self, p: Placement, consistency: Consistency = "crash", progress: Progress | None = None) -> OpResult:
        t0 = utcnow()
        with self._op("replicate", p, p.source.name) as (_, vm):
            vm = self._need(vm, p, "replicate", S.Replicating)
            pt = self._add_point(vm, p.vm, consistency)
            return result(p, "replicate", True, S.Replicating, "delta cycle complete", t0, point=_rp(pt))

    def replicate_group(self, ps: list[Placement], group: str, consistency: Consistency = "crash",
                        progress: Progress | None = None) -> list[OpResult]:
        """One cycle of a consistency group: every member's part of one group point, captured at one instant.
        Each part commits on its own, as on the linux fabric: a member that fails leaves the group point
        incomplete (siterecovery.groups never offers it)."""
        t0 = utcnow()
        with self._state() as st:
            seq = int(st.setdefault("groups", {}).get(group, 0)) + 1
            st["groups"][group] = seq
        gid = f"{group}@{seq}"
        out = []
        for p in ps:
            with self._op("replicate", p, p.source.name) as (_, vm):
                vm = self._need(vm, p, "replicate", S.Replicating)
                pt = self._add_point(vm, p.vm, consistency, when=t0, group=gid)
                out.append(result(p, "replicate", True, S.Replicating, f"part of group point {gid}", t0, point=_rp(pt)))
        return out

    def resynchronize(self, p: Placement, progress: Progress | None = None) -> OpResult:
        t0 = utcnow()
        with self._op("resynchronize", p, p.source.name) as (_, vm):
            vm = self._need(vm, p, "resynchronize", S.Replicating, S.WaitingForStartResynchronize, S.Suspended, S.Error)
            if not vm.resync_required and vm.state == S.Replicating.value:
                return result(p, "resynchronize", False, S.Replicating, "no resynchronization needed", t0)
            vm.resync_required = False
            vm.state = S.Replicating.value
            pt = self._add_point(vm, p.vm)
            return result(p, "resynchronize", True, S.Replicating, "resynchronized", t0, point=_rp(pt))

    def mark_resync_required(self, p: Placement) -> None:
        with self._state() as st:
            st["vms"][p.vm]["resync_required"] = True
            st["vms"][p.vm]["state"] = S.WaitingForStartResynchronize.value

    def suspend(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("suspend", p, p.source.name) as (_, vm):
            vm = self._need(vm, p, "suspend")
            if vm.state == S.Suspended.value:
                return result(p, "suspend", False, S.Suspended, "already suspended", t0)
            self._need(vm, p, "suspend", S.Replicating, S.Resynchronizing, S.InitialReplicationInProgress)
            vm.state = S.Suspended.value
            return result(p, "suspend", True, S.Suspended, "replication suspended", t0)

    def resume(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("resume", p, p.source.name) as (_, vm):
            vm = self._need(vm, p, "resume")
            if vm.state == S.Replicating.value:
                return result(p, "resume", False, S.Replicating, "already replicating", t0)
            self._need(vm, p, "resume", S.Suspended, S.Error, S.WaitingForStartResynchronize)
            vm.state = S.Replicating.value
            return result(p, "resume", True, S.Replicating, "replication resumed", t0)

    def disable_replication(self, p: Placement, delete_replica: bool = False) -> OpResult:
        t0 = utcnow()
        with self._op("disable_replication", p, p.source.name) as (st, vm):
            if vm is None:
                return result(p, "disable_replication", False, S.Disabled, "replication is not enabled", t0)
            del st["vms"][p.vm]
            return result(p, "disable_replication", True, S.Disabled,
                          "replication disabled" + ("; replica deleted" if delete_replica else ""), t0)

    def replication_health(self, p: Placement) -> ReplicationHealth:
        with self._op("replication_health", p, p.source.name) as (_, vm):
            if vm is None:
                return ReplicationHealth(vm=p.vm, state=S.Disabled, health=Health.NotApplicable, mode=ReplicationMode.None_)
            last = datetime.fromisoformat(vm.last_replication) if vm.last_replication else None
            rpo = (utcnow() - last).total_seconds() if last else None
            health = Health.Normal
            details = ""
            if vm.resync_required:
                health, details = Health.Critical, f"Resynchronization is required for {p.vm}."
            elif vm.state in (S.Error.value, S.Suspended.value):
                health = Health.Critical if vm.state == S.Error.value else Health.Warning
            elif rpo is not None and rpo > p.policy.rpo_threshold:
                health, details = Health.Warning, f"last replication {int(rpo)} s ago"
            elif vm.state == S.FailedOver.value:
                health, details = Health.Warning, "failed over: reverse replication to protect it again"
            return ReplicationHealth(vm=p.vm, state=S(vm.state), health=health, mode=ReplicationMode.Primary,
                                     primary_host=vm.primary, replica_host=vm.replica, last_replication_time=last,
                                     successful_cycles=vm.cycles_ok, missed_cycles=vm.cycles_missed,
                                     current_rpo_seconds=rpo, resync_required=vm.resync_required,
                                     test_failover_active=vm.test_active, details=details)

    def recovery_points(self, p: Placement) -> tuple[RecoveryPoint, ...]:
        with self._op("recovery_points", p, p.target.name) as (_, vm):
            vm = self._need(vm, p, "recovery_points")
            return tuple(_rp(x) for x in vm.points)

    # ---- failover ---------------------------------------------------------------------------
    def _pick(self, vm: _VM, p: Placement, point: PointChoice, operation: str) -> dict[str, Any]:
        pts = {x["id"]: x for x in vm.points}
        chosen = point.choose([_rp(x) for x in vm.points])
        if chosen is None:
            raise NotFoundError(f"no recovery point matches {point.describe()}",
                                vm=p.vm, host=p.target.name, operation=operation,
                                hint="list recovery points and choose another", error_id="VMFailover_InvalidSnapshot")
        return pts[chosen.id]

    def test_failover(self, p: Placement, point: PointChoice = LATEST, network: str | None = None) -> OpResult:
        t0 = utcnow()
        with self._op("test_failover", p, p.target.name) as (_, vm):
            vm = self._need(vm, p, "test_failover")
            if vm.test_active:
                pt = next((x for x in vm.points if x["id"] == vm.test_point), None)
                return result(p, "test_failover", False, S(vm.state), "test failover already running", t0,
                              point=_rp(pt) if pt else None)
            self._need(vm, p, "test_failover", S.Replicating, S.Suspended)
            pt = self._pick(vm, p, point, "test_failover")
            vm.test_active, vm.test_point = True, pt["id"]
            return result(p, "test_failover", True, S(vm.state), f"test VM created from {pt['id']}", t0,
                          point=_rp(pt), details={"network": network})

    def cleanup_test_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("cleanup_test_failover", p, p.target.name) as (_, vm):
            vm = self._need(vm, p, "cleanup_test_failover")
            if not vm.test_active:
                return result(p, "cleanup_test_failover", False, S(vm.state), "no test failover to clean up", t0)
            vm.test_active, vm.test_point = False, None
            test_host = f"{p.target.name}#test"
            vm.running = [h for h in vm.running if h != test_host]
            return result(p, "cleanup_test_failover", True, S(vm.state), "test VM deleted", t0)

    def prepare_planned_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("prepare_planned_failover", p, p.source.name) as (_, vm):
            vm = self._need(vm, p, "prepare_planned_failover")
            if vm.state in (S.PreparedForFailover.value, S.FailedOverWaitingCompletion.value, S.FailedOver.value):
                return result(p, "prepare_planned_failover", False, S(vm.state), "already prepared", t0)
            self._need(vm, p, "prepare_planned_failover", S.Replicating)
            vm.running = [h for h in vm.running if h != p.source.name]
            pt = self._add_point(vm, p.vm)
            vm.state = S.PreparedForFailover.value
            return result(p, "prepare_planned_failover", True, S.PreparedForFailover,
                          "source shut down, pending changes sent", t0, point=_rp(pt))

    def failover(self, p: Placement, point: PointChoice = LATEST) -> OpResult:
        t0 = utcnow()
        with self._op("failover", p, p.target.name) as (_, vm):
            vm = self._need(vm, p, "failover")
            if vm.state in (S.FailedOverWaitingCompletion.value, S.FailedOver.value):
                pt = next((x for x in vm.points if x["id"] == vm.failover_point), None)
                return result(p, "failover", False, S(vm.state), "already failed over", t0,
                              point=_rp(pt) if pt else None)
            self._need(vm, p, "failover", S.Replicating, S.PreparedForFailover, S.Suspended)
            if vm.test_active:
                raise InvalidStateError("a test failover is running", vm=p.vm, host=p.target.name, operation="failover",
                                        hint="clean up the test failover first", error_id="InvalidState")
            pt = self._pick(vm, p, point, "failover")
            vm.failover_point = pt["id"]
            vm.state = S.FailedOverWaitingCompletion.value
            return result(p, "failover", True, S.FailedOverWaitingCompletion, f"failed over to {pt['id']}", t0,
                          point=_rp(pt))

    def commit_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("commit_failover", p, p.target.name) as (_, vm):
            vm = self._need(vm, p, "commit_failover")
            if vm.state == S.FailedOver.value:
                return result(p, "commit_failover", False, S.FailedOver, "already committed", t0)
            self._need(vm, p, "commit_failover", S.FailedOverWaitingCompletion)
            vm.state = S.FailedOver.value
            vm.points = [x for x in vm.points if x["id"] == vm.failover_point]
            return result(p, "commit_failover", True, S.FailedOver, "failover committed", t0)

    def cancel_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("cancel_failover", p, p.target.name) as (_, vm):
            vm = self._need(vm, p, "cancel_failover")
            if vm.state == S.Replicating.value:
                return result(p, "cancel_failover", False, S.Replicating, "no failover to cancel", t0)
            self._need(vm, p, "cancel_failover", S.FailedOverWaitingCompletion, S.PreparedForFailover)
            vm.running = [h for h in vm.running if h != p.target.name]
            vm.state, vm.failover_point = S.Replicating.value, None
            return result(p, "cancel_failover", True, S.Replicating, "failover cancelled", t0)

    def reverse_replication(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("reverse_replication", p, p.target.name) as (_, vm):
            if vm is not None and vm.primary == p.target.name and vm.replica == p.source.name:
                return result(p, "reverse_replication", False, S(vm.state), "replication already reversed", t0)
            vm = self._need(vm, p, "reverse_replication", S.FailedOver, S.FailedOverWaitingCompletion)
            vm.primary, vm.replica = p.target.name, p.source.name
            vm.state = S.Replicating.value
            vm.failover_point = None
            pt = self._add_point(vm, p.vm)
            return result(p, "reverse_replication", True, S.Replicating,
                          f"now replicating {p.target.name} -> {p.source.name}", t0, point=_rp(pt))

    def start_vm(self, p: Placement, side: Side = "target", test: bool = False) -> OpResult:
        t0 = utcnow()
        host = p.target.name if side == "target" else p.source.name
        with self._op("start_vm", p, host) as (_, vm):
            vm = self._need(vm, p, "start_vm") if vm is None else vm
            where = f"{host}#test" if test else host
            if test and not vm.test_active:
                raise InvalidStateError("no test VM to start", vm=p.vm, host=host, operation="start_vm",
                                        hint="run the test failover first", error_id="InvalidState")
            if where in vm.running:
                return result(p, "start_vm", False, S(vm.state), "already running", t0, host=host)
            vm.running.append(where)
            return result(p, "start_vm", True, S(vm.state), "started", t0, host=host)

    def stop_vm(self, p: Placement, side: Side = "source") -> OpResult:
        t0 = utcnow()
        host = p.target.name if side == "target" else p.source.name
        with self._op("stop_vm", p, host) as (_, vm):
            vm = self._need(vm, p, "stop_vm") if vm is None else vm
            if host not in vm.running:
                return result(p, "stop_vm", False, S(vm.state), "already off", t0, host=host)
            vm.running.remove(host)
            return result(p, "stop_vm", True, S(vm.state), "stopped", t0, host=host)

    def apply_network(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("apply_network", p, p.target.name) as (_, vm):
            # Hyper-V's planned order reverses replication before the network is applied and the VM starts.
            vm = self._either_way(vm, p, "apply_network")
            want = {n.nic: n.target_network for n in p.nics}
            if vm.networks.get(p.target.name) == want:
                return result(p, "apply_network", False, S(vm.state), "network settings already applied", t0)
            vm.network_applied = True
            vm.networks[p.target.name] = want
            nets = ", ".join(f"{n.nic}->{n.target_network or 'disconnected'}" for n in p.nics)
            return result(p, "apply_network", True, S(vm.state), f"network: {nets or 'no NICs'}", t0)

    def vm_networks(self, p: Placement, side: Side = "source") -> dict[str, str | None] | None:
        """The networks the VM's NICs are on at that side's host (None: never recorded there)."""
        host = p.source if side == "source" else p.target
        with self._op("vm_networks", p, host.name) as (_, vm):
            vm = self._either_way(vm, p, "vm_networks")
            nets = vm.networks.get(host.name)
            return dict(nets) if nets is not None else None

    def connect_network(self, p: Placement, side: Side, nic: str, network: str | None) -> None:
        """An operator's change of a VM's NIC at one side (Connect-/Disconnect-VMNetworkAdapter)."""
        host = p.source if side == "source" else p.target
        with self._op("connect_network", p, host.name) as (_, vm):
            vm = self._either_way(vm, p, "connect_network")
            vm.networks.setdefault(host.name, {n.nic: n.target_network for n in p.nics})[nic] = network

    def close(self) -> None:
        return None


def _point(vm: str, seq: int, when: datetime, consistency: str) -> dict[str, Any]:
    return {"id": f"{vm}@{seq}", "vm": vm, "created_at": when.isoformat(), "consistency": consistency}


def _rp(x: dict[str, Any]) -> RecoveryPoint:
    return RecoveryPoint(id=x["id"], vm=x["vm"], created_at=datetime.fromisoformat(x["created_at"]),
                         consistency=x["consistency"], group=x.get("group"))
