"""The first hour (issue 19): `siterecovery ui up` as `make ui` sets it up, with every schedule of the test
project live (replication cycles every 30 s, health checks and a drill of web-drill brought forward so
their first windows fall within three minutes), and nobody touching anything: no run is Failed or Crashed,
and the dashboard is green. Screenshot of the dashboard in tests/output/ (and docs/img/ with
SITERECOVERY_UPDATE_DOCS_IMG=1)."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.deployments import PlanSettings, ProtectionSettings, Schedule
from tests.ui.uikit import browser_page, client, flow_runs, running_stack, ui_settings

pytestmark = [pytest.mark.prefect_server, pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]

WINDOW = 180  # seconds of nobody acting


def test_first_window_of_every_schedule_has_no_failed_run(request: pytest.FixtureRequest) -> None:
    from playwright.sync_api import expect

    # The drill's first window: after `ui up` (a minute or two here), within the watched window.
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=150)
    settings = ui_settings(
        protection=ProtectionSettings(health_interval_seconds=60),
        drills={"plans": {"web-drill": PlanSettings(drill=Schedule(interval_seconds=3600, anchor_date=due))}})
    with running_stack(settings, protection_active=True) as stack:
        # Nobody acts: the watched window, and at least a minute past the drill's first window.
        time.sleep(max(WINDOW, (due - datetime.now(UTC)).total_seconds() + 60))
        runs = flow_runs(stack)
        by_dep: dict[str, list[str]] = {}
        with_ids = {}
        with client(stack) as c:
            names = {d.id: f"{c.read_flow(d.flow_id).name}/{d.name}" for d in c.read_deployments()}
        for r in runs:
            state = r.state.type.value if r.state else "?"
            by_dep.setdefault(names.get(r.deployment_id, "?"), []).append(state)
            with_ids[str(r.id)] = (names.get(r.deployment_id), state, r.state.message if r.state else "")
        print({k: dict(Counter(v)) for k, v in by_dep.items()})
        bad = {k: v for k, v in with_ids.items() if v[1] in ("FAILED", "CRASHED")}
        assert not bad, f"{bad}\n{stack.logs()}"
        # Each schedule's first window went by with a run that did its work.
        for dep in ("replicate/east-west", "replication-health/east-west", "dr-drill/web-drill"):
            assert "COMPLETED" in by_dep.get(dep, []), (dep, by_dep)
        with browser_page(stack, request.node.name) as (page, shot):
            page.goto(f"{stack.url}/dashboard")
            expect(page.get_by_text("Flow Runs").first).to_be_visible()
            expect(page.get_by_text("You currently have 0 failed or crashed runs")).to_be_visible()
            page.wait_for_timeout(3000)  # the dashboard's cards load one by one
            shot("dashboard")
        shot.publish("first-hour")
