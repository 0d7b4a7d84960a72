"""The run session: what one run of a plan holds from its start to its report, entered once by every kind
of run (recovery-plan, dr-drill, failover, and recover's commit and cancel). In order: the run's intent
(begun: resumed or new), the intent's run lock (closing earlier runs of it whose process died), the
reclaim of slots dead runs left leased, and the plan with its VMs (one live run per plan, one owner per VM).
Leaving releases the plan, then the lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from prefect.context import FlowRunContext

from siterecovery.intent import Intent, IntentJournal, RunLock, StepJournal
from tasks.limits import live_run, reclaim_and_say

Log = logging.Logger | logging.LoggerAdapter  # type: ignore[type-arg]


@dataclass(frozen=True)
class IntentStart:
    """How IntentJournal.begin finds the run's intent: its key, id prefix, an explicit id, whether it always
    starts afresh, and the parameters kept with it for a resume by name."""

    key: str
    prefix: str
    explicit: str | None = None
    fresh: bool = False
    params: dict[str, Any] = field(default_factory=dict)


def current_flow_run() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


class RunSession:
    """`with RunSession(...) as session:` the run holds its intent, lock and plan; `session.intent`,
    `session.journal` (the intent's step journal), `session.closed` (earlier runs of the intent marked
    Crashed) and `session.flow_run` are what the run and its report use. Without `start` (recover's commit
    and cancel act on a stopped intent, they do not run one) the session holds the plan only."""

    def __init__(self, state: Path, plan: str, vms: Iterable[str], kind: str, log: Log,
                 start: IntentStart | None = None) -> None:
        self.state, self.plan, self.vms, self.kind, self.log, self.start = state, plan, sorted(vms), kind, log, start
        self.flow_run = current_flow_run()
        self.intents = IntentJournal(state)
        self.intent: Intent | None = None
        self.journal: StepJournal | None = None
        self.closed: list[str] = []
        self._stack = ExitStack()

    def __enter__(self) -> RunSession:
        s = self.start
        try:
            if s is not None:
                self.intent = self.intents.begin(s.key, prefix=s.prefix, explicit=s.explicit, fresh=s.fresh,
                                                 params=s.params)
                lock = RunLock(self.state, self.intent.id)
                earlier = lock.acquire(self.flow_run)
                self._stack.callback(lock.release)
                self.closed = close_abandoned(earlier, self.intent.id, self.flow_run, self.log)
                self.journal = StepJournal(self.state, self.intent.id)
            reclaim_and_say(self.state / "leases", self.log)
            # One live run per plan, one owner per VM: refused here, before any fabric call.
            self._stack.enter_context(live_run(self.state, self.plan, self.vms, self.flow_run, self.kind))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stack.close()

    def complete(self, status: str) -> None:
        """Close the run's intent: later runs with the same parameters start afresh."""
        assert self.intent is not None
        self.intents.complete(self.intent, status)


# Flow-run states in which nobody will ever finish a run whose process is gone.
_OPEN_STATES = ("PAUSED", "RUNNING", "PENDING", "SCHEDULED", "CANCELLING")


def close_abandoned(earlier: list[str], intent: str, flow_run: str | None, log: Log) -> list[str]:
    """Mark earlier runs of this intent that the server still shows as open Crashed, with a reason.

    Only called while holding the intent's RunLock: their process is dead (a killed worker, a lost node),
    else the lock would be taken. Without this, a run killed while waiting for an approval stays Paused on
    the server for ever, and one killed mid-batch stays Running. Returns "<run id> (<old state>)"s."""
    if not earlier:
        return []
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    closed: list[str] = []
    with get_client(sync_client=True) as client:
        for run_id in earlier:
            try:
                fr = client.read_flow_run(run_id)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - an unknown or purged run: nothing to close
                log.warning("earlier run %s of intent %s: not readable (%s)", run_id, intent, type(exc).__name__)
                continue
            if fr.state is None or fr.state.type.value not in _OPEN_STATES:
                continue
            msg = (f"its process died while {fr.state.type.value.lower()} ({fr.state.name}); flow run "
                   f"{flow_run} of the same intent {intent} took over and resumes it")
            client.set_flow_run_state(fr.id, Crashed(message=msg), force=True)
            closed.append(f"{run_id} ({fr.state.name})")
            log.warning("earlier run %s of intent %s marked Crashed: %s", run_id, intent, msg)
    return closed
