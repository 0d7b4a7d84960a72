"""One live run per plan, one owner per VM, and refusals that read as one line: the recovery-plan flow
under the Prefect test harness (a real server), two runs started together in two threads."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from flows.recovery_plan import PlanFailed, recovery_plan
from siterecovery.model import FailoverType
from siterecovery.request import ConfirmationRequired
from tasks.limits import RunRefused, _leased, live_run, plan_limit

pytestmark = pytest.mark.usefixtures("prefect_harness")

OTHER = {"name": "other", "version": "1", "groups": [{"name": "g", "vms": ["db-1", "mail-1"]}]}


class Lines(logging.Handler):
    """What the flow-run logger emitted, as Prefect's API handler would format it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_two_drills_of_one_plan_started_together_one_is_refused(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    slow = {"latency": {"test_failover": 1.0}}
    results: dict[str, Any] = {}

    def drill(name: str) -> None:
        try:
            results[name] = recovery_plan(plan="app", project=str(e.root), fabric_options=slow)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            results[name] = exc

    threads = [threading.Thread(target=drill, args=(n,)) for n in ("a", "b")]
    threads[0].start()
    # The second starts while the first is live (its record is written before its first fabric call).
    deadline = time.monotonic() + 120
    while not list((e.state / "live").glob("app-*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    threads[1].start()
    for t in threads:
        t.join(180)
    refused = [r for r in results.values() if isinstance(r, RunRefused)]
    done = [r for r in results.values() if isinstance(r, dict)]
    assert len(refused) == 1 and len(done) == 1, results
    assert done[0]["status"] == "succeeded"
    # The refusal names the run that holds the plan: a flow run id the winner reported as its own.
    winner = Path(done[0]["report"]).with_suffix(".json").read_text()
    msg = str(refused[0])
    assert "plan 'app' already has a live run: flow run " in msg, msg
    holder = msg.split("flow run ", 1)[1].split(" ", 1)[0]
    assert holder in winner
    # Exactly one drill's worth of fabric calls: the refused one touched nothing.
    assert len(e.calls("test_failover")) == 5 and len(e.calls("cleanup_test_failover")) == 5


def test_a_vm_in_a_live_run_of_another_plan_is_refused(estate) -> None:  # type: ignore[no-untyped-def]
    from siterecovery.estate import state_dir
    from siterecovery.testing.projects import seed_memory

    e = estate([{"name": "app", "version": "7", "groups": [{"name": "db", "vms": ["db-1", "db-2"]}]}, OTHER])
    seed_memory(e.root, "other", e.state / "memory-fabric.json")
    state = state_dir(e.root)
    with live_run(state, "app", ["db-1", "db-2"], "11111111-2222-3333-4444-555555555555", "planned failover"):
        with pytest.raises(RunRefused, match=r"VM\(s\) db-1 of plan 'other' belong to a live run of another plan: "
                                             r"flow run 11111111-2222-3333-4444-555555555555 \(planned failover of "
                                             r"plan 'app'"):
            recovery_plan(plan="other", project=str(e.root))
    assert e.calls("test_failover") == []
    # Once that run is over, the same drill goes ahead.
    assert recovery_plan(plan="other", project=str(e.root))["status"] == "succeeded"


def test_the_plan_limit_holds_across_state_directories(estate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A run elsewhere (another machine, another state directory) is seen through the Prefect limit."""
    e = estate()
    recovery_plan(plan="app", project=str(e.root))  # creates the limit siterecovery-plan-app
    with _leased([plan_limit("app")], 1, tmp_path / "elsewhere", "elsewhere", timeout=30):
        t0 = time.monotonic()
        with pytest.raises(RunRefused, match="concurrency limit siterecovery-plan-app is held"):
            recovery_plan(plan="app", project=str(e.root))
        assert time.monotonic() - t0 < 60  # refused at once, not queued behind the other run


def test_refusals_log_one_line_without_a_traceback(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate()
    lines = Lines()
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(lines)
    try:
        with pytest.raises(ConfirmationRequired):
            recovery_plan(plan="app", project=str(e.root), failover_type=FailoverType.planned)
    finally:
        logger.removeHandler(lines)
    errors = [r for r in lines.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is None and errors[0].getMessage().startswith("refused: a planned failover of 'app'")


def test_one_missing_precondition_is_one_error(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate(seed=None)  # protection never enabled
    with pytest.raises(PlanFailed) as exc:
        recovery_plan(plan="app", project=str(e.root), failure_policy="continue")
    failures = exc.value.summary["failures"]
    assert len(failures) == 1, failures
    assert "replication is not enabled" in failures[0] and failures[0].startswith("4 VMs failed the same way (test failover db-1, "), failures
    assert failures[0].endswith("not run (they boot after a VM that failed): test failover db-2"), failures
    # db-1 and (the continue policy going on) the three web VMs: one cause, one line; db-2 boots after
    # db-1, so it was skipped, not failed.
    # No cleanup error for VMs whose failover never began.
    assert not any("cleanup" in f for f in failures)


HOLD = """
import sys, time
from pathlib import Path
from tasks.limits import live_run
with live_run(Path(sys.argv[1]), "app", ["db-1"], "99999999-8888-7777-6666-555555555555", "test failover"):
    print("HELD", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_does_not_block_the_next_run(estate) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL (a dead worker and flow process): its record's lock and its ledger entry die with it, so the
    next run of the plan goes ahead at once instead of waiting for the lease to expire (5 min)."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from siterecovery.estate import state_dir

    e = estate()
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(state_dir(e.root))], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
        with pytest.raises(RunRefused, match="99999999-8888-7777-6666-555555555555"):
            recovery_plan(plan="app", project=str(e.root))
    finally:
        holder.kill()
        holder.wait(30)
        if holder.stdout is not None:
            holder.stdout.close()
    t0 = time.monotonic()
    assert recovery_plan(plan="app", project=str(e.root))["status"] == "succeeded"
    assert time.monotonic() - t0 < 120  # not the 300 s lease
