"""End to end through the Prefect UI, as an operator uses it: `siterecovery ui up` starts a real server,
work pool, deployments and worker for a test project on the in-memory fabric; headless chromium
triggers `dr-drill/shop` from the deployment's page, approves the manual action in the paused run's
form and reads the report artifact. A second test lets a near schedule start a drill by itself.

Screenshots of every step go to tests/output/<test>/; SITERECOVERY_UPDATE_DOCS_IMG=1 also copies them to
docs/img/ for the walkthrough in docs/UI.md.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from siterecovery import ui
from siterecovery.deployments import PlanSettings, Schedule, Settings
from tests.ui.uikit import (
    POOL,
    PROJECT_PARAM,
    ROOT,
    Stack,
    browser_page,
    client,
    flow_runs,
    resume,
    submit,
    wait_state,
    write_deployments,
)

pytestmark = [pytest.mark.prefect_server, pytest.mark.browser, pytest.mark.timeout(420)]


def test_drill_from_the_ui(stack: Stack, request: pytest.FixtureRequest) -> None:
    from playwright.sync_api import expect

    with browser_page(stack, request.node.name) as (page, shot):
        # 1. The deployments list: dr-drill/shop and its siblings.
        page.goto(f"{stack.url}/deployments")
        row = page.locator("tr").filter(has_text="dr-drill").filter(has=page.locator("a[title='shop']"))
        expect(row).to_have_count(1)
        shot("deployments")
        row.locator("a[title='shop']").click()
        page.wait_for_url("**/deployments/deployment/**")
        expect(page.locator(".p-bread-crumbs")).to_contain_text("shop")
        shot("deployment")

        # 2. Run > Custom run: the parameter form, pre-filled from the deployment; `requested_by` is
        # required (the UI has no login: the report shows who the person says they are).
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        requested = page.locator(".schema-form-property").filter(
            has=page.locator(".schema-form-property__label", has_text=re.compile("^requested_by")))
        requested.locator("textarea, input").first.fill("carol (drill owner)")
        shot("run-form")
        page.get_by_role("button", name="Submit").click()
        toast = page.locator(".toast-flow-run-create__message--emphasized").first
        run_name = toast.inner_text().strip()
        assert run_name, "the toast named no run"

        # 3. The run pauses at the manual action (check-db, after the database group).
        # The custom run's toast offers "View run" (the quick run's names the run as a link).
        page.get_by_role("link", name=run_name, exact=True).or_(
            page.get_by_role("button", name="View run")).or_(page.get_by_role("link", name="View run")).first.click()
        page.wait_for_url("**/runs/flow-run/**")
        page.locator(".page-heading-flow-run__meta .state-badge.state--paused").wait_for()
        shot("paused")

        # 4. Resume: the form shows the plan, group, instructions and failover type.
        page.get_by_role("button", name="Resume").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("Approver")
        for text in ("Plan: shop", "Group: database", "Failover: test", "run the consistency check"):
            expect(dialog).to_contain_text(text)

        def field(label: str) -> Any:
            return dialog.locator(".schema-form-property").filter(
                has=page.locator(".schema-form-property__label", has_text=re.compile(f"^{label}")))

        field("Approved").get_by_role("switch").click()
        field("Approver").locator("textarea").fill("alice@example.test")
        comment = "consistency check passed on the isolated test network"
        field("Comment").locator("textarea").fill(comment)
        field("Ticket").locator("textarea").fill("CHG-4711")
        shot("approval-form")
        submit(dialog)

        # 5. The run completes.
        page.locator(".page-heading-flow-run__meta .state-badge.state--completed").wait_for()
        shot("completed")

        # 6. The report artifact records the approver and the comment.
        page.get_by_text("Artifacts", exact=True).click()
        card = page.get_by_text("drill-shop", exact=True).first
        card.wait_for()
        shot("artifacts")
        card.click()
        page.wait_for_url("**/artifacts/artifact/**")
        # The page holds two markdown blocks (the artifact's description and its body): the body
        # is the one that renders the report's heading.
        report = page.locator(".markdown-renderer").filter(has=page.locator("h1, h2"))
        expect(report).to_contain_text(comment)
        expect(report).to_contain_text("alice@example.test")
        expect(report).to_contain_text("CHG-4711")
        page.get_by_text(comment).first.scroll_into_view_if_needed()
        shot("report")

        # 7. The failover deployment's form: type, direction, recovery point, options, confirm.
        page.goto(f"{stack.url}/deployments")
        row = page.locator("tr").filter(has_text="failover").filter(has=page.locator("a[title='shop']"))
        row.locator("a[title='shop']").click()
        page.wait_for_url("**/deployments/deployment/**")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        form = page.locator("form, [role=dialog]").filter(has_text="confirm").first
        for text in ("confirm", "failover_type", "requested_by", "recovery_point", "direction", "options",
                     "advanced"):
            expect(form).to_contain_text(text)
        shot("failover-form")
        # Further down: the options and the guard, an empty `confirm` a person must fill in.
        page.locator(".schema-form-property__label", has_text=re.compile("^confirm")).scroll_into_view_if_needed()
        shot("failover-confirm")
    shot.publish()
    # The drill went through the fabric and cleaned up after itself.
    for vm in ("shop-db-01", "shop-web-01"):
        calls = stack.calls(vm)
        assert "test_failover" in calls and "cleanup_test_failover" in calls, calls
        assert not stack.vms()[vm]["test_active"]


def test_failover_deployment_needs_the_plan_name_to_fail_over(stack: Stack) -> None:
    """A planned failover started from failover/shop without confirming does nothing to the estate."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = {vm: stack.calls(vm) for vm in ("shop-db-01", "shop-web-01")}
    with temporary_settings(updates={PREFECT_API_URL: f"{stack.url}/api"}):
        # Without confirm the server does not even create the run (the form requires the field).
        with pytest.raises(Exception, match="confirm"):
            run_deployment("failover/shop", parameters={"failover_type": "planned", "requested_by": "dave"},
                           timeout=0)
        run = run_deployment("failover/shop", parameters={"failover_type": "planned", "requested_by": "dave",
                                                          "confirm": "shop please"}, timeout=120, poll_interval=1)
    assert run.state is not None and run.state.is_failed(), run.state
    assert "confirm" in (run.state.message or ""), run.state.message
    assert {vm: stack.calls(vm) for vm in before} == before  # not one fabric call


def test_deployed_as_rendered(stack: Stack) -> None:
    """What `ui up` deployed is what the renderer wrote: names, parameters, schedules, work pool."""
    with client(stack) as c:
        deployed = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()}
    assert {"dr-drill/shop", "dr-drill/web-drill", "enable-protection/east-west", "replicate/east-west",
            "replication-health/east-west", "resynchronize/east-west"} <= set(deployed)
    drill = deployed["dr-drill/shop"]
    assert drill.parameters == {"plan": "shop", "cleanup": "immediate", "advanced": {"project": PROJECT_PARAM}}
    assert [sch.parameters for sch in drill.schedules] == [{"requested_by": "schedule of dr-drill/shop"}]
    assert drill.work_pool_name == POOL and drill.enforce_parameter_schema
    assert [sch.schedule.cron for sch in drill.schedules] == ["0 2 * * 6"]  # type: ignore[union-attr]
    repl = deployed["replicate/east-west"]
    assert [sch.schedule.interval.total_seconds() for sch in repl.schedules] == [30]  # type: ignore[union-attr]
    assert repl.global_concurrency_limit is not None and repl.global_concurrency_limit.limit == 1
    # `ui up` created the dead-run and lost-site automations (once each, however often it ran).
    with client(stack) as c:
        autos = c.read_automations()
    zombies = [a for a in autos if a.name == "siterecovery-zombie-runs"]
    assert len(zombies) == 1 and zombies[0].trigger.within.total_seconds() == 90  # type: ignore[union-attr]
    lost = [a for a in autos if a.name == "siterecovery-site-unreachable"]
    assert len(lost) == 1 and lost[0].trigger.within.total_seconds() == 120  # type: ignore[union-attr]
    # The parameter form validates against the flow's schema: cleanup is a choice, not free text.
    cleanup_schema = drill.parameter_openapi_schema["properties"]["cleanup"]
    assert "immediate" in json.dumps(cleanup_schema) and "after_approval" in json.dumps(cleanup_schema)


def test_a_near_schedule_runs_a_drill_by_itself(stack: Stack, tmp_path: Path) -> None:
    before = stack.calls("shop-web-01").count("cleanup_test_failover")
    # One run, due shortly: an hourly interval anchored just ahead. The margin covers the redeploy
    # (5-10 s here): the scheduler never creates a run whose time has passed, so an anchor that is
    # already behind when the deployment lands would mean no run for an hour.
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=20)
    settings = Settings(work_pool=POOL, project=PROJECT_PARAM, drills={  # type: ignore[arg-type]
        "schedule": Schedule(cron="0 2 * * 6", active=False),
        "plans": {"web-drill": PlanSettings(drill=Schedule(interval_seconds=3600, anchor_date=due))}})
    prefect_file = write_deployments(tmp_path / "prefect.yaml", settings, only={"web-drill"})
    assert yaml.safe_load(prefect_file.read_text())["deployments"][0]["schedules"][0]["anchor_date"] == due.isoformat()
    ui.up(stack.state, ROOT, prefect_file, pool=POOL, port=stack.port, say=lambda _m: None)
    assert datetime.now(UTC) < due - timedelta(seconds=3), "the redeploy outlasted the schedule's margin"
    started = time.monotonic()
    state = None
    while time.monotonic() - started < 120:
        runs = [r for r in flow_runs(stack, "web-drill") if r.state and r.state.type.value != "SCHEDULED"]
        if runs:
            state = runs[0].state
            if state is not None and state.is_final():
                break
        time.sleep(1)
    assert state is not None and state.is_completed(), f"scheduled drill ended as {state}\n{stack.logs()}"
    run = runs[0]
    assert run.auto_scheduled, "the run was created by the schedule, not by a person"
    assert run.expected_start_time is not None and abs(run.expected_start_time - due) < timedelta(seconds=1)
    # It failed over for test and cleaned up: no test failover remains in the estate.
    calls = stack.calls("shop-web-01")
    assert calls.count("cleanup_test_failover") > before, calls
    assert not any(vm["test_active"] for vm in stack.vms().values()), stack.vms()


def test_two_drills_at_once_through_the_api_the_second_is_refused(stack: Stack) -> None:
    """Both submitted together: one runs (and waits at the plan's approval), the other is refused at its
    start naming the first; nothing of the estate is shared between them."""
    with client(stack) as c:
        dep = c.read_deployment_by_name("dr-drill/shop")
        runs = [c.create_flow_run_from_deployment(dep.id, parameters={"requested_by": f"api-{i}"})
                for i in (1, 2)]
    ends = {}
    for r in runs:
        ends[r.id] = wait_state(stack, r.id, {"PAUSED", "FAILED", "COMPLETED", "CRASHED"})
    paused = [r for r in ends.values() if r.state.type.value == "PAUSED"]
    refused = [r for r in ends.values() if r.state.type.value == "FAILED"]
    assert len(paused) == 1 and len(refused) == 1, {str(k): v.state for k, v in ends.items()}
    msg = refused[0].state.message or ""
    assert f"plan 'shop' already has a live run: flow run {paused[0].id}" in msg, msg
    # The one that runs goes on to its end; its approver says no: it stops and cleans up.
    resume(stack, paused[0].id, {"approved": False, "approver": "erin", "comment": "test over"})
    done = wait_state(stack, paused[0].id, {"FAILED", "COMPLETED", "CRASHED"})
    assert done.state.type.value == "FAILED" and "rejected by erin" in (done.state.message or "")
    assert not any(vm["test_active"] for vm in stack.vms().values()), stack.vms()
