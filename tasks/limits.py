"""Per-host and per-site concurrency limits: Prefect global concurrency limits, reserved in bulk.

A limit is named `siterecovery-host-<host>` / `siterecovery-site-<site>` and is shared by every run on
the Prefect server, so two plans touching one host together stay under its limit. Acquiring a global
slot costs about 75 ms here (an HTTP round trip each way plus a lease); per VM step that would dominate
a 1,000-VM run. So a batch reserves, per limit it touches, min(limit, VMs it has there) slots in one
request, in sorted name order (no deadlock between runs), and hands them out to its VM jobs through
local semaphores of that size. (One request takes all names with the same count.)
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

DEFAULT_HOST_LIMIT = 4   # concurrent VM operations per Hyper-V / linux host (VMMS serialises more anyway)
DEFAULT_SITE_LIMIT = 16  # concurrent VM operations per site (storage and network of a recovery site)
ACQUIRE_TIMEOUT = 3600.0  # a batch waiting longer than this for another run's slots fails


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

    def __init__(self, sizes: dict[str, int]) -> None:
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


@contextmanager
def reserve(key: str, wanted: dict[str, int], limits: dict[str, int]) -> Iterator[LocalSlots]:
    """Reserve min(limit, wanted) slots of each named global limit for the block; register them
    locally under `key` for the batch's jobs."""
    from prefect.concurrency.sync import concurrency

    sizes = {n: max(1, min(limits[n], w)) for n, w in wanted.items() if w > 0}
    # One request per distinct slot count (usually one or two per batch): the server takes every name
    # of a request or none, and the requests go in a fixed order.
    by_size: dict[int, list[str]] = {}
    for name, k in sizes.items():
        by_size.setdefault(k, []).append(name)
    t0 = time.monotonic()
    with ExitStack() as stack:
        for k, names in sorted(by_size.items(), key=lambda kv: sorted(kv[1])):
            stack.enter_context(concurrency(sorted(names), occupy=k, timeout_seconds=ACQUIRE_TIMEOUT, strict=True))
        local = LocalSlots(sizes)
        local.waited = time.monotonic() - t0
        with _REG_LOCK:
            _REGISTRY[key] = local
        try:
            yield local
        finally:
            with _REG_LOCK:
                _REGISTRY.pop(key, None)
