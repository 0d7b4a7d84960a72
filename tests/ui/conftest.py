"""The browser tests' stack: one `siterecovery ui up` per test file (tests/ui/uikit.py), shared by that file's
tests: starting one takes a minute or more on a loaded 2-core machine. The tests make no assumption about
runs the others made (they compare with counts taken first, or look for their own runs).

Per file, not per session: one project has one estate (siterecovery.estate), and a file that starts a stack
of its own (test_ui_first_hour.py, live schedules) must not meet another file's stack still running on the
same project; a session-wide stack lived until the end of the run and made it fail with EstateError.

A test that fails half-way can leave a run paused at an approval; it holds its plan and VMs (one live run per
plan, one owner per VM), so every later test of the file would be refused because of the first failure.
After a failed test, its live runs are cancelled, so the next test's result is its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.ui.uikit import Stack, client, running_stack

LIVE = {"RUNNING", "PAUSED", "PENDING", "CANCELLING"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[FAILED] = report.failed


FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as st:
        yield st


@pytest.fixture(autouse=True)
def _cancel_runs_a_failed_test_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not request.node.stash.get(FAILED, False) or "stack" not in request.fixturenames:
        return
    stack: Stack = request.getfixturevalue("stack")
    from prefect.states import Cancelling

    with client(stack) as c:
        left = [r for r in c.read_flow_runs() if r.state is not None and r.state.type.value in LIVE]
        for run in left:
            c.set_flow_run_state(run.id, Cancelling(message="cancelled after a failed test"), force=True)
        deadline = time.monotonic() + 120
        while left and time.monotonic() < deadline:
            left = [r for r in left if (s := c.read_flow_run(r.id).state) is not None and s.type.value in LIVE]
            time.sleep(1)
    if left:
        print(f"runs still live after the failed test: {[str(r.id) for r in left]}")
