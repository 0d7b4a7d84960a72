"""Per-host and per-site concurrency limits: Prefect global concurrency limits, reserved in bulk.

A limit is named `siterecovery-host-<host>` / `siterecovery-site-<site>` and is shared by every run on
the Prefect server, so two plans touching one host together stay under its limit. Acquiring a global
slot costs about 75 ms here (an HTTP round trip each way plus a lease); per VM step that would dominate
a 1,000-VM run. So a run reserves, per limit it touches, min(limit, VMs it has there) slots in one
request, in sorted name order (no deadlock between runs), and hands them out to its VM jobs through
local semaphores of that size. (One request takes all names with the same count.)

A `Reservation` holds those slots across a stretch of consecutive VM batches rather than taking and
giving them back per batch: right after a release the server answers the next request with 423 and a
Retry-After of about the limit's average occupancy (measured: ~2 s per batch, 40-50 s of a 20-batch
run spent waiting for uncontended slots). It is released before anything that may wait on people or
scripts (manual actions, script batches) and at the end of the run, so other runs sharing a host wait
at most for one stretch of VM work.

A run killed by SIGKILL (or a lost node) cannot give its slots back: the server frees them only when
the lease expires (LEASE_SECONDS, renewed by a background thread while the run lives), so a re-run
after a kill waited for them. Each lease is therefore also written to a ledger in the state directory
(`<state>/leases/<lease id>.json`), locked with flock by the process that holds it. The kernel drops
that lock when the process dies, so the next run (`reclaim_abandoned`) finds the unlocked records and
releases their leases at once. Runs on other machines with their own state directories are not seen;
their leases still expire on the server.

The release is one write on the server, and right after a large run it can wait behind the server's
ingestion of that run's task events: measured 5-10 s, and 60 s once (SQLite's busy timeout in the
Prefect server), while reads answered in under 2 s. The plan's work is done by then, so the release
runs in a background (non-daemon: the process does not exit before it) thread instead of holding up
the report and the end of the flow run; the server, not this process, enforces the limits, so a
later reservation simply waits until the release has landed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from siterecovery.errors import ConfigurationError
from siterecovery.paths import child

DEFAULT_HOST_LIMIT = 4   # concurrent VM operations per Hyper-V / linux host (VMMS serialises more anyway)
DEFAULT_SITE_LIMIT = 16  # concurrent VM operations per site (storage and network of a recovery site)
ACQUIRE_TIMEOUT = 3600.0  # a batch waiting longer than this for another run's slots fails
# Prefect's default lease. Shorter would free a dead run's slots sooner without the ledger, but a lease
# that cannot be renewed in time (the server's SQLite has stalled for 60 s here) stops the run holding it.
LEASE_SECONDS = 300.0

_log = logging.getLogger(__name__)


def limit_name(kind: str, name: str) -> str:
    return f"siterecovery-{kind}-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def ensure_limits(names: dict[str, int | None]) -> dict[str, int]:
    """Create missing limits (value given, else the default for their kind) and return every limit's
    current value. An explicit value also updates an existing limit; None keeps what the server has
    (an operator may have tuned it in the UI)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    out: dict[str, int] = {}
    with get_client(sync_client=True) as client:
        for name, wanted in sorted(names.items()):
            default = DEFAULT_HOST_LIMIT if name.startswith("siterecovery-host-") else DEFAULT_SITE_LIMIT
            try:
                current = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=wanted or default))
                except ObjectAlreadyExists:  # another run created it meanwhile
                    pass
                current = client.read_global_concurrency_limit_by_name(name)
            if wanted is not None and current.limit != wanted:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=wanted))
                current = client.read_global_concurrency_limit_by_name(name)
            out[name] = current.limit
    return out


class LocalSlots:
    """The slots one batch reserved, handed to its VM jobs (threads of this flow run)."""

    def __init__(self, sizes: dict[str, int], key: str = "") -> None:
        self.key = key  # what the jobs look these slots up by
        self.sizes = dict(sizes)
        self.waited = 0.0  # seconds the batch waited for the server to grant its slots
        self._sems = {n: threading.BoundedSemaphore(max(1, k)) for n, k in sizes.items()}

    @contextmanager
    def hold(self, *names: str) -> Iterator[float]:
        """Hold one slot of each limit (always host before site, so jobs never deadlock); yields the
        seconds spent waiting."""
        t0 = time.monotonic()
        with ExitStack() as stack:
            for n in names:
                sem = self._sems.get(n)
                if sem is not None:
                    sem.acquire()
                    stack.callback(sem.release)
            yield time.monotonic() - t0


_REGISTRY: dict[str, LocalSlots] = {}
_REG_LOCK = threading.Lock()


def slots(key: str) -> LocalSlots | None:
    with _REG_LOCK:
        return _REGISTRY.get(key)


class _LedgerEntry:
    """One held lease on disk, flock-ed by its holder for as long as the lease is held."""

    def __init__(self, ledger: Path, lease_id: str, names: list[str], occupy: int, key: str) -> None:
        ledger.mkdir(parents=True, exist_ok=True)
        # The id comes from the server: still one file name inside the ledger, whatever it holds.
        self.path = child(ledger, lease_id, suffix=".json")
        # Locked and written under a temporary name, then renamed: a reclaimer never sees it unlocked
        # or half written (the lock belongs to the inode and survives the rename).
        tmp = child(ledger, f".{lease_id}", suffix=".tmp")
        self._f: Any = open(tmp, "w")  # noqa: SIM115 - held until close()
        fcntl.flock(self._f, fcntl.LOCK_EX)
        json.dump({"lease_id": lease_id, "names": names, "occupy": occupy, "holder": key, "pid": os.getpid(),
                   "acquired_at": time.time()}, self._f)
        self._f.flush()
        os.replace(tmp, self.path)

    def close(self, keep: bool = False) -> None:
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._f.close()  # drops the lock


@contextmanager
def _leased(names: list[str], occupy: int, ledger: Path | None, key: str, timeout: float = ACQUIRE_TIMEOUT,
            holder: Any = None, max_retries: int | None = None) -> Iterator[None]:
    """Prefect's `concurrency()` (acquire with a lease, renew it in the background, release), plus the
    ledger entry. Uses prefect.concurrency's lease helpers directly, because `concurrency()` does not
    tell its caller the lease id (prefect pinned to 3.8.x; tests/orchestration/test_limits_leases.py
    exercises these calls against a real server)."""
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import (
        acquire_concurrency_slots_with_lease,
        release_concurrency_slots_with_lease,
    )

    got = acquire_concurrency_slots_with_lease(names, occupy, timeout_seconds=timeout, strict=True,
                                               lease_duration=LEASE_SECONDS, holder=holder, max_retries=max_retries)
    entry = _LedgerEntry(ledger, str(got.lease_id), names, occupy, key) if ledger is not None else None
    try:
        with maintain_concurrency_lease(got.lease_id, LEASE_SECONDS, raise_on_lease_renewal_failure=True):
            yield
    finally:
        try:
            release_concurrency_slots_with_lease(got.lease_id)
        except BaseException:
            if entry is not None:
                entry.close(keep=True)  # unlocked on disk: the next run's reclaim retries the release
            raise
        if entry is not None:
            entry.close()


def reclaim_abandoned(ledger: Path) -> list[dict[str, Any]]:
    """Release the leases of ledger entries whose holder process is gone (their flock is free).
    Returns the entries released. Safe to run from several processes at once."""
    if not ledger.is_dir():
        return []
    from prefect.concurrency._sync import release_concurrency_slots_with_lease

    released = []
    for path in sorted(ledger.glob("*.json")):
        try:
            f = open(path, "r+")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process holds this lease
            if not path.exists():
                continue  # its holder released it and removed the entry while we opened it
            try:
                entry = json.loads(f.read() or "{}")
                lease = entry["lease_id"]
            except (ValueError, KeyError):
                path.unlink(missing_ok=True)  # not ours to read: never written by _LedgerEntry
                continue
            try:
                release_concurrency_slots_with_lease(lease)
            except Exception as exc:  # noqa: BLE001 - already expired or released: nothing held any more
                _log.debug("lease %s: %s", lease, exc)
            path.unlink(missing_ok=True)
            released.append(entry)
    return released


def reclaim_and_say(ledger: Path, log: Any) -> list[dict[str, Any]]:
    """reclaim_abandoned, each release logged as a warning (what every flow does when it starts)."""
    gone = reclaim_abandoned(ledger)
    for g in gone:
        log.warning("released %d slot(s) of %s held by a dead run (%s, pid %s) instead of waiting for its "
                    "lease to expire", g.get("occupy"), ", ".join(g.get("names", [])), g.get("holder"), g.get("pid"))
    return gone


@contextmanager
def slot(name: str, ledger: Path | None, key: str, timeout: float = ACQUIRE_TIMEOUT) -> Iterator[None]:
    """One slot of a global limit for the block, leased and recorded in the ledger like a plan's slots, so
    a process killed while holding it frees it at the next run's reclaim rather than at lease expiry."""
    with _leased([name], 1, ledger, key, timeout=timeout):
        yield


@contextmanager
def reserve(key: str, wanted: dict[str, int], limits: dict[str, int], ledger: Path | None = None) -> Iterator[LocalSlots]:
    """Reserve min(limit, wanted) slots of each named global limit for the block; register them
    locally under `key` for the batch's jobs. With a `ledger` directory, each lease is recorded there
    for `reclaim_abandoned`."""
    sizes = {n: max(1, min(limits[n], w)) for n, w in wanted.items() if w > 0}
    # One request per distinct slot count (usually one or two per batch): the server takes every name
    # of a request or none, and the requests go in a fixed order.
    by_size: dict[int, list[str]] = {}
    for name, k in sizes.items():
        by_size.setdefault(k, []).append(name)
    t0 = time.monotonic()
    with ExitStack() as stack:
        for k, names in sorted(by_size.items(), key=lambda kv: sorted(kv[1])):
            stack.enter_context(_leased(sorted(names), k, ledger, key))
        local = LocalSlots(sizes, key)
        local.waited = time.monotonic() - t0
        with _REG_LOCK:
            _REGISTRY[key] = local
        try:
            yield local
        finally:
            with _REG_LOCK:
                _REGISTRY.pop(key, None)


class Reservation:
    """The slots one run holds, re-used by consecutive VM batches whose needs they cover.

    `cover(wanted)` returns local slots that include min(limit, wanted) of each named limit: the held
    ones when they already do, else (after releasing the held ones: never hold some while waiting for
    others) a fresh reservation of `plan_ahead`, the needs of the whole stretch the caller expects to
    run next. Jobs find the slots under `key`.
    """

    def __init__(self, key: str, limits: dict[str, int], ledger: Path | None = None) -> None:
        self.key = key
        self.limits = limits
        self.ledger = ledger
        self.requests = 0  # server reservations made (each one a wait the run paid for)
        self._stack: ExitStack | None = None
        self._local: LocalSlots | None = None

    def _sizes(self, wanted: dict[str, int]) -> dict[str, int]:
        return {n: max(1, min(self.limits[n], w)) for n, w in wanted.items() if w > 0}

    def covers(self, wanted: dict[str, int]) -> bool:
        held = self._local.sizes if self._local is not None else {}
        return all(held.get(n, 0) >= k for n, k in self._sizes(wanted).items())

    def cover(self, wanted: dict[str, int], plan_ahead: dict[str, int] | None = None) -> LocalSlots:
        if self._local is not None and self.covers(wanted):
            self._local.waited = 0.0
            return self._local
        self.release()
        ahead = dict(plan_ahead or {})
        for n, w in wanted.items():
            ahead[n] = max(ahead.get(n, 0), w)
        stack = ExitStack()
        try:
            # A key per reservation: a release still running in the background unregisters its own.
            self._local = stack.enter_context(reserve(f"{self.key}:{self.requests}", ahead, self.limits,
                                                            self.ledger))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self.requests += 1
        return self._local

    def release(self, wait: bool = False) -> None:
        """Give the slots back to the server: in the background unless `wait`."""
        stack, self._stack, self._local = self._stack, None, None
        if stack is None:
            return
        if wait:
            stack.close()
            return
        t = threading.Thread(target=_close, args=(stack, self.key), name=f"release-slots-{self.key}")
        with _REG_LOCK:
            _RELEASING.append(t)
        t.start()


_RELEASING: list[threading.Thread] = []


def _close(stack: ExitStack, key: str) -> None:
    t0 = time.monotonic()
    try:
        stack.close()
    except Exception:  # the lease then expires on the server by itself (lease duration)
        _log.exception("releasing the concurrency slots of %s failed", key)
        return
    _log.debug("slots of %s released in %.2f s", key, time.monotonic() - t0)


def wait_released(timeout: float | None = None) -> bool:
    """Wait for background releases started so far; True when all have finished."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _REG_LOCK:
        pending = list(_RELEASING)
    for t in pending:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    with _REG_LOCK:
        _RELEASING[:] = [t for t in _RELEASING if t.is_alive()]
        return not _RELEASING


# ---- one live run per plan, one owner per VM -------------------------------------------------------

# A plan's slot is free or held: a start never queues behind another run. The first answer (423 Locked,
# or the slot) decides; the timeout only bounds a server that does not answer (seconds under load here).
PLAN_ACQUIRE_SECONDS = 60.0


class RunRefused(ConfigurationError):
    """A run was refused at its start because another live run holds its plan or some of its VMs."""


def plan_limit(plan: str) -> str:
    return limit_name("plan", plan)


def _live_records(live: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The records of runs whose process still holds them (flock); records of dead runs are removed."""
    out = []
    for path in sorted(live.glob("*.json")):
        try:
            f = open(path)  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its holder is alive: read what it wrote
                try:
                    out.append((path, json.loads(f.read() or "{}")))
                except ValueError:
                    pass
                continue
            path.unlink(missing_ok=True)  # its process died: nobody owns these VMs any more
    return out


def _holder(rec: dict[str, Any]) -> str:
    run = rec.get("flow_run") or f"pid {rec.get('pid')}"
    return f"flow run {run} ({rec.get('kind', 'run')} of plan '{rec.get('plan')}', started {rec.get('started', '?')})"


@contextmanager
def live_run(state: Path, plan: str, vms: list[str], flow_run: str | None, kind: str) -> Iterator[None]:
    """Hold plan `plan` and its `vms` for the block, or raise RunRefused naming the run that holds them.

    The plan is a Prefect global concurrency limit of 1 (`siterecovery-plan-<plan>`, strict), taken
    without waiting, with its lease in the ledger (a killed holder's slot is reclaimed by the next run,
    not after the lease expires). The VMs are owned through a record in `<state>/live/`, flock-ed by the
    run's process for as long as it runs, so a run of another plan sharing a VM is refused too."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

    live = state / "live"
    live.mkdir(parents=True, exist_ok=True)
    name = plan_limit(plan)
    ensure_limits({name: 1})
    me = {"plan": plan, "kind": kind, "flow_run": flow_run, "pid": os.getpid(), "vms": sorted(vms),
          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    record: Any = None
    with open(live / ".lock", "a") as guard:
        # One starting run at a time checks and claims: two runs started together cannot both pass.
        fcntl.flock(guard, fcntl.LOCK_EX)
        for _, rec in _live_records(live):
            if rec.get("plan") == plan:
                raise RunRefused(f"plan '{plan}' already has a live run: {_holder(rec)}; wait for it to finish "
                                 "or cancel it, then start again")
            shared = sorted(set(vms) & set(rec.get("vms", [])))
            if shared:
                raise RunRefused(f"VM(s) {', '.join(shared)} of plan '{plan}' belong to a live run of another plan: "
                                 f"{_holder(rec)}; wait for it to finish or cancel it, then start again")
        holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run) if flow_run else None
        stack = ExitStack()
        try:
            stack.enter_context(_leased([name], 1, state / "leases", f"{flow_run}:plan", timeout=PLAN_ACQUIRE_SECONDS,
                                        holder=holder, max_retries=0))
        except ConcurrencySlotAcquisitionError as exc:
            if getattr(getattr(exc.__cause__, "response", None), "status_code", None) != 423:  # not "held"
                raise
            raise RunRefused(f"plan '{plan}' already has a live run (Prefect concurrency limit {name} is held, by a "
                             "run on another machine or state directory); wait for it to finish or cancel it, then "
                             "start again") from None
        path = live / f"{plan}-{os.getpid()}-{threading.get_ident()}.json"
        record = open(path, "w")  # noqa: SIM115 - held for the run
        fcntl.flock(record, fcntl.LOCK_EX)
        json.dump(me, record)
        record.flush()
    try:
        with stack:
            yield
    finally:
        Path(record.name).unlink(missing_ok=True)
        record.close()
