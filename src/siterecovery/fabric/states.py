"""The VM replication state machine of the fabrics that keep their own records (memory, linux): the per-VM
record, the table of allowed transitions with the one check every operation goes through, and the locked
record store. The Hyper-V simulator (siterecovery.testing.hyperv_sim) keeps its own state machine, written
from Microsoft's documentation, so the contract tests compare two independent ones.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..errors import ExecutionError, InvalidStateError, NotFoundError, StorageError, TransientFabricError
from ..paths import child
from ..replica.engine import storage_error
from .base import Placement, ReplicationState, utcnow

S = ReplicationState
log = logging.getLogger(__name__)


@dataclass
class VMRecord:
    """What a fabric knows of one protected VM: which way it replicates, its replication state, its
    drill and failover, and its cycles. Drivers extend it with their data path's fields."""

    primary: str
    replica: str
    state: str = S.ReadyForInitialReplication.value
    running: list[str] = field(default_factory=list)  # hosts where the VM (or its test copy, host#test) runs
    test_active: bool = False
    test_point: str | None = None
    failover_point: str | None = None
    last_replication: str | None = None
    cycles_ok: int = 0
    cycles_missed: int = 0
    resync_required: bool = False
    network_applied: bool = False
    networks: dict[str, dict[str, str | None]] = field(default_factory=dict)  # host -> NIC -> network (None: unplugged)
    seq: int = 0  # the last recovery point's number (points are "<vm>@<seq>")


R = TypeVar("R", bound=VMRecord)


def forward(rec: VMRecord, p: Placement) -> bool:
    """Replication runs the placement's way (source -> target)."""
    return rec.primary == p.source.name and rec.replica == p.target.name


def reversed_(rec: VMRecord | None, p: Placement) -> bool:
    """Replication runs against the placement's way (after reverse replication)."""
    return rec is not None and rec.primary == p.target.name and rec.replica == p.source.name


@dataclass(frozen=True)
class Transition:
    """One operation of the state machine. It acts from `allowed` states (empty: any), passing through
    `via` while it works (`working`), and leaves the VM in `to` (None: as it was). When `done` says the VM is
    already where the operation would take it, the operation is a no-op that says `said`."""

    allowed: tuple[S, ...]
    to: S | None
    done: Callable[[VMRecord | None, Placement], bool]
    said: str = ""
    via: S | None = None
    creates: bool = False  # the operation makes the record (no record, or Disabled, is where it starts)
    refuse_during_test: bool = False  # a running drill must be cleaned up first


def _in(*states: S) -> Callable[[VMRecord | None, Placement], bool]:
    values = {s.value for s in states}
    return lambda rec, p: rec is not None and forward(rec, p) and rec.state in values


def _never(rec: VMRecord | None, p: Placement) -> bool:
    return False


TRANSITIONS: dict[str, Transition] = {
    "enable_replication": Transition(
        (S.Disabled,), S.ReadyForInitialReplication, lambda rec, p: rec is not None and rec.state != S.Disabled.value,
        "already enabled", creates=True),
    "start_initial_replication": Transition(
        (S.ReadyForInitialReplication, S.InitialReplicationInProgress), S.Replicating, _in(S.Replicating),
        "initial replication already done", via=S.InitialReplicationInProgress),
    "replicate": Transition((S.Replicating,), S.Replicating, _never),
    # The driver decides whether a resynchronization is needed (a flag, or its own look at the disks).
    "resynchronize": Transition(
        (S.Replicating, S.WaitingForStartResynchronize, S.Suspended, S.Error), S.Replicating, _never,
        "no resynchronization needed", via=S.Resynchronizing),
    "mark_resync_required": Transition((), S.WaitingForStartResynchronize, _never),
    "suspend": Transition(
        (S.Replicating, S.Resynchronizing, S.InitialReplicationInProgress), S.Suspended, _in(S.Suspended),
        "already suspended"),
    "resume": Transition(
        (S.Suspended, S.Error, S.WaitingForStartResynchronize), S.Replicating, _in(S.Replicating),
        "already replicating"),
    "disable_replication": Transition((), S.Disabled, lambda rec, p: rec is None, "replication is not enabled"),
    "test_failover": Transition(
        (S.Replicating, S.Suspended), None, lambda rec, p: rec is not None and forward(rec, p) and rec.test_active,
        "test failover already running"),
    "cleanup_test_failover": Transition(
        (), None, lambda rec, p: rec is not None and forward(rec, p) and not rec.test_active,
        "no test failover to clean up"),
    "prepare_planned_failover": Transition(
        (S.Replicating,), S.PreparedForFailover, _in(S.PreparedForFailover, S.FailedOverWaitingCompletion, S.FailedOver),
        "already prepared"),
    "failover": Transition(
        (S.Replicating, S.PreparedForFailover, S.Suspended), S.FailedOverWaitingCompletion,
        _in(S.FailedOverWaitingCompletion, S.FailedOver), "already failed over", refuse_during_test=True),
    "commit_failover": Transition(
        (S.FailedOverWaitingCompletion,), S.FailedOver, _in(S.FailedOver), "already committed"),
    "cancel_failover": Transition(
        (S.FailedOverWaitingCompletion, S.PreparedForFailover), S.Replicating, _in(S.Replicating),
        "no failover to cancel"),
    # Checked before the direction: a reversed pair is exactly what it asks for.
    "reverse_replication": Transition(
        (S.FailedOver, S.FailedOverWaitingCompletion), S.Replicating, reversed_, "replication already reversed"),
}


def need(rec: R | None, p: Placement, operation: str, *allowed: S) -> R:
    """The VM's record, replicating the placement's way and (when `allowed` names any) in one of those
    states; otherwise the error that says which of these is wrong."""
    if rec is None:
        raise NotFoundError("replication is not enabled for this VM", vm=p.vm, operation=operation,
                            host=p.source.name, hint="enable protection first (siterecovery protect)",
                            error_id="ObjectNotFound")
    if not forward(rec, p):
        raise InvalidStateError(
            f"replication runs {rec.primary} -> {rec.replica}, not {p.source.name} -> {p.target.name}",
            vm=p.vm, operation=operation, host=p.target.name, error_id="InvalidState",
            hint="check the direction: failback needs reverse replication first")
    if allowed and rec.state not in {a.value for a in allowed}:
        raise InvalidStateError(
            f"state {rec.state} does not allow {operation} (needs {' or '.join(a.value for a in allowed)})",
            vm=p.vm, operation=operation, host=p.target.name, error_id="InvalidState",
            hint="read replication health and bring the VM to a valid state first")
    return rec


def begin(rec: VMRecord | None, p: Placement, operation: str) -> bool:
    """Check `operation` against the table: False when the VM is already where it leads (a no-op, whose
    message is TRANSITIONS[operation].said), True when the driver must act; raises NotFoundError or
    InvalidStateError (naming the VM, its state and the operation) when the state forbids it."""
    t = TRANSITIONS[operation]
    if t.done(rec, p):
        return False
    if t.creates:
        return True
    rec = need(rec, p, operation, *t.allowed)
    if t.refuse_during_test and rec.test_active:
        raise InvalidStateError("a test failover is running", vm=p.vm, host=p.target.name, operation=operation,
                                hint="clean up the test failover first", error_id="InvalidState")
    return True


def working(rec: VMRecord, operation: str) -> None:
    """The operation has started work that outlasts one step (a copy): the record shows its `via` state,
    which is where a failure leaves it on a fabric that keeps failed work (linux) and from which it may
    be run again."""
    t = TRANSITIONS[operation]
    if t.via is not None:
        rec.state = t.via.value


def finish(rec: VMRecord, operation: str) -> S:
    """The operation has done its work: the record takes the state the table leads to (and returns it)."""
    t = TRANSITIONS[operation]
    if t.to is not None:
        rec.state = t.to.value
    return S(rec.state)


# ---- the record store ------------------------------------------------------------------------------

T = TypeVar("T")


class RecordStore(Generic[T]):
    """Records by name, each opened under an exclusive lock: `with store.open(name, op) as box:` gives
    box[0], the record (None: there is none), and saves what the block leaves there (None deletes it).
    `keep_on_error`: a block that raises still saves (the linux fabric counts a failed cycle), or
    leaves the record as it was (the memory fabric: a failed operation changes no VM)."""

    def __init__(self, load: Callable[[dict[str, Any]], T], dump: Callable[[T], dict[str, Any]],
                 keep_on_error: bool = True) -> None:
        self.load, self.dump, self.keep_on_error = load, dump, keep_on_error

    @contextlib.contextmanager
    def open(self, name: str, operation: str, vm: str | None = None) -> Iterator[list[T | None]]:
        with self._locked(name, operation, vm or name):
            box: list[T | None] = [self._read(name, operation, vm or name)]
            try:
                yield box
            except BaseException:
                if self.keep_on_error:
                    self._write(name, box[0], operation, vm or name)
                raise
            self._write(name, box[0], operation, vm or name)

    def read(self, name: str, operation: str = "read") -> T | None:
        with self.open(name, operation) as box:
            rec = box[0]
            return rec

    def _locked(self, name: str, operation: str, vm: str) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _read(self, name: str, operation: str, vm: str) -> T | None:
        raise NotImplementedError

    def _write(self, name: str, rec: T | None, operation: str, vm: str) -> None:
        raise NotImplementedError


def codec(cls: type[R]) -> tuple[Callable[[dict[str, Any]], R], Callable[[R], dict[str, Any]]]:
    """load and dump for a record dataclass (a record of an older layout loads: new fields have defaults)."""
    return (lambda raw: cls(**raw)), asdict


class MappingRecords(RecordStore[T]):
    """Records kept as plain dicts in a mapping the caller holds and guards (the memory fabric's estate):
    each open works on a deep copy, written back when the block ends."""

    def __init__(self, mapping: MutableMapping[str, dict[str, Any]], load: Callable[[dict[str, Any]], T],
                 dump: Callable[[T], dict[str, Any]], keep_on_error: bool = False) -> None:
        super().__init__(load, dump, keep_on_error)
        self.mapping = mapping

    def _locked(self, name: str, operation: str, vm: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the caller holds the mapping's lock

    def _read(self, name: str, operation: str, vm: str) -> T | None:
        raw = self.mapping.get(name)
        return self.load(copy.deepcopy(raw)) if raw else None

    def _write(self, name: str, rec: T | None, operation: str, vm: str) -> None:
        if rec is None:
            self.mapping.pop(name, None)
        else:
            self.mapping[name] = self.dump(rec)


class FileRecords(RecordStore[T]):
    """One JSON file per record under `directory` (`<name><suffix>`), next to its lock file
    (`<name>.lock`, holding the holder's pid and operation), so processes see one estate. A save is
    atomic (a temporary file renamed over the record); only a full filesystem falls back to rewriting
    the record in place. Within a process one thread at a time holds a record of this store.

    A wait for the lock says what it waits for (the holder, from the lock file) and gives up after
    `wait` seconds with a Busy error naming it. Failures of the directory are StorageError (full,
    read-only) or TransientFabricError, at host "orchestrator"."""

    def __init__(self, directory: Path, load: Callable[[dict[str, Any]], T], dump: Callable[[T], dict[str, Any]],
                 keep_on_error: bool = True, wait: float = 300, suffix: str = ".json",
                 what: Callable[[str], str] = lambda name: f"VM {name}'s record", state_dir: Path | None = None) -> None:
        super().__init__(load, dump, keep_on_error)
        self.directory, self.wait, self.suffix, self.what = Path(directory), wait, suffix, what
        self.state_dir = Path(state_dir or directory)  # named in errors of the directory
        self._lock = threading.RLock()

    def path(self, name: str) -> Path:
        return child(self.directory, name, suffix=self.suffix)

    @contextlib.contextmanager
    def _locked(self, name: str, operation: str, vm: str) -> Iterator[None]:
        path = self.path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lf = open(path.with_suffix(".lock"), "a+")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise self.error(exc, operation, vm) from None
        with lf:
            self._acquire(lf, name, operation, vm)
            try:
                with contextlib.suppress(OSError):
                    lf.truncate(0)
                    lf.write(json.dumps({"pid": os.getpid(), "operation": operation, "since": utcnow().isoformat()}))
                    lf.flush()
                yield
            finally:
                fcntl.flock(lf, fcntl.LOCK_UN)
                self._lock.release()

    def _acquire(self, lf: Any, name: str, operation: str, vm: str) -> None:
        t0 = time.monotonic()
        told = False
        if not self._lock.acquire(timeout=self.wait):
            raise TransientFabricError(f"another operation of this process has held {self.what(name)} for over "
                                       f"{self.wait:g} s", vm=vm, operation=operation, error_id="Busy",
                                       hint="wait for it to finish, or raise the fabric option vm_lock_wait")
        try:
            while True:
                try:
                    fcntl.flock(lf, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    lf.seek(0)
                    holder = lf.read(300).strip() or "unknown"
                    waited = time.monotonic() - t0
                    if not told and waited > 1:
                        log.info("%s: %s waits for the record lock, held by %s", name, operation, holder)
                        told = True
                    if waited > self.wait:
                        raise TransientFabricError(
                            f"{self.what(name)} has been locked for over {self.wait:g} s by {holder} (lock file "
                            f"{lf.name})", vm=vm, operation=operation, error_id="Busy",
                            hint="that operation is still running or stuck; wait for it, or stop that process") from None
                    time.sleep(0.05)
        except BaseException:
            self._lock.release()
            raise

    def _read(self, name: str, operation: str, vm: str) -> T | None:
        path = self.path(name)
        raw = json.loads(path.read_text()) if path.exists() else None
        return self.load(raw) if raw else None

    def error(self, exc: OSError, operation: str, vm: str) -> ExecutionError:
        err = storage_error(exc, str(self.state_dir))
        if err is None:
            return TransientFabricError(f"the orchestrator's state directory failed: {exc}", vm=vm, operation=operation,
                                        host="orchestrator", hint="check the state directory")
        return StorageError(f"orchestrator state directory: {err}", path=err.path, vm=vm, host="orchestrator",
                            operation=operation, error_id=err.code,
                            hint=f"free space in (or remount read-write) the state directory {self.state_dir}")

    def _write(self, name: str, rec: T | None, operation: str, vm: str) -> None:
        path = self.path(name)
        if rec is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        data = json.dumps(self.dump(rec), default=str)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(data)
            tmp.replace(path)
            return
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
                raise self.error(exc, operation, vm) from None
        # A full state directory: the record is rewritten in place, in the blocks it already has, so
        # a failed cycle is still counted and health can say why (not atomic; only this fallback).
        try:
            with open(path, "r+") as f:
                f.write(data)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise self.error(exc, operation, vm) from None
