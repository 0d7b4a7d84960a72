"""The operator's day in the Prefect UI (issue 19), in headless chromium against `siterecovery ui up` on the
test project (tests/ui/project, in-memory fabric):

- two drills of one plan submitted from the UI: the second is refused, naming the run that holds the plan
  (in the default set: the short one);
- a planned failover whose approval is rejected in the UI stops saying where each VM is and what the
  choices are; cancel-failover from recover/<plan> reverts every VM; a drill afterwards succeeds;
- the worker and its flow process killed mid-drill: the zombie-run automation marks the run Crashed, the
  next run of the plan writes the dead run's report, reclaims its slots, cleans up its test VMs and succeeds;
- three drills, then the drill-trends artifact lists them against the plan's objectives.

Screenshots go to tests/output/<test>/; SITERECOVERY_UPDATE_DOCS_IMG=1 also copies the ones docs/UI.md
shows to docs/img/.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from siterecovery import ui
from tests.ui.uikit import (
    POOL,
    ROOT,
    Stack,
    browser_page,
    client,
    custom_run,
    form_field,
    open_deployment,
    resume,
    submit,
    submit_run,
    wait_state,
)

pytestmark = [pytest.mark.prefect_server, pytest.mark.browser, pytest.mark.timeout(600)]

# The run page's state badge, by state.
BADGE = ".page-heading-flow-run__meta .state-badge.state--{}"


def _run_by_name(stack: Stack, name: str) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with client(stack) as c:
        [run] = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return run


def _open_run(page: Any, stack: Stack, run_id: Any) -> None:
    page.goto(f"{stack.url}/runs/flow-run/{run_id}")
    page.wait_for_url("**/runs/flow-run/**")


def _choose(page: Any, field: Any, option: str) -> None:
    """Pick `option` in a schema form's choice field (the UI renders an enum as a select)."""
    from playwright.sync_api import expect

    native = field.locator("select")
    if native.count():
        native.first.select_option(option)
        return
    field.locator(".p-select-button__control").first.click()
    options = page.locator(".p-select-option")
    page.wait_for_timeout(1000)
    if not options.count():  # the click focused it without opening the list: the keyboard opens it
        page.keyboard.press("ArrowDown")
    options.filter(has=page.get_by_text(option, exact=True)).first.click()
    expect(field.locator(".p-select-button__value")).to_have_text(option)


def test_two_drills_at_once_from_the_ui_the_second_is_refused(stack: Stack, request: pytest.FixtureRequest) -> None:
    """Two people start a drill of `shop` from its deployment's form, one right after the other: one runs
    (and waits at the plan's approval), the other is refused at its start, naming the run that holds the
    plan, before it touches a VM."""
    from playwright.sync_api import expect

    before = stack.calls("shop-db-01").count("test_failover")
    with browser_page(stack, request.node.name) as (page, shot):
        open_deployment(page, stack, "dr-drill", "shop")
        names = []
        for who in ("carol (drill owner)", "dave (second drill)"):
            form = custom_run(page)
            form_field(form, page, "requested_by").locator("textarea, input").first.fill(who)
            names.append(submit_run(page))
        assert len(set(names)) == 2, names
        runs = [_run_by_name(stack, n) for n in names]
        ends = [wait_state(stack, r.id, {"PAUSED", "FAILED", "COMPLETED", "CRASHED"}) for r in runs]
        states = [r.state.type.value for r in ends]
        assert sorted(states) == ["FAILED", "PAUSED"], states
        held, refused = (ends[0], ends[1]) if states[0] == "PAUSED" else (ends[1], ends[0])
        line = f"plan 'shop' already has a live run: flow run {held.id}"
        assert line in (refused.state.message or ""), refused.state.message
        # What the person who clicked second sees: the run Failed, and its log says who holds the plan.
        _open_run(page, stack, refused.id)
        page.locator(BADGE.format("failed")).wait_for()
        expect(page.locator("body")).to_contain_text(line)
        shot("second-drill-refused")
        # The first goes on: it waits at the approval; its approver says no, and it cleans up.
        resume(stack, held.id, {"approved": False, "approver": "erin", "comment": "drill over"})
        done = wait_state(stack, held.id, {"FAILED", "COMPLETED", "CRASHED"})
        assert "rejected by erin" in (done.state.message or ""), done.state
    shot.publish("day")
    # One test failover of the database (by the first run), not two; nothing left behind.
    assert stack.calls("shop-db-01").count("test_failover") == before + 1
    assert not any(vm["test_active"] for vm in stack.vms().values()), stack.vms()


@pytest.mark.slow
def test_rejected_failover_then_cancel_failover_from_the_ui(stack: Stack, request: pytest.FixtureRequest) -> None:
    """A planned failover of `wholesale` from the UI form; the change board rejects the app tier in the
    approval form: the run stops, its last log line names each VM's state and the choices. recover/wholesale
    with action cancel-failover, from the UI, brings every VM back; a drill afterwards succeeds."""
    from playwright.sync_api import expect

    with browser_page(stack, request.node.name) as (page, shot):
        open_deployment(page, stack, "failover", "wholesale")
        form = custom_run(page)
        form_field(form, page, "confirm").locator("textarea, input").first.fill("wholesale")
        _choose(page, form_field(form, page, "failover_type"), "planned")
        form_field(form, page, "requested_by").locator("textarea, input").first.fill("frank (wholesale owner)")
        shot("failover-form")
        run = _run_by_name(stack, submit_run(page))
        _open_run(page, stack, run.id)
        page.locator(BADGE.format("paused")).wait_for()

        # The change board says no.
        page.get_by_role("button", name="Resume").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("Group: database")
        form_field(dialog, page, "Approver").locator("textarea").fill("grace@change-board")
        form_field(dialog, page, "Comment").locator("textarea").fill("app tier not ready: roll back")
        shot("reject")
        submit(dialog)
        stopped = wait_state(stack, run.id, {"FAILED", "COMPLETED", "CRASHED"})
        msg = stopped.state.message or ""
        assert stopped.state.type.value == "FAILED" and "rejected by grace@change-board" in msg, msg
        # Where each VM is and the ways on, in the state message and the run's last log line.
        assert "VMs now:" in msg and "wh-db-01" in msg and "wh-app-01" in msg and "cancel-failover" in msg, msg
        page.locator(BADGE.format("failed")).wait_for()
        expect(page.locator("body")).to_contain_text("VMs now:")
        expect(page.locator("body")).to_contain_text("action=cancel-failover")
        page.get_by_text("VMs now:").last.scroll_into_view_if_needed()
        shot("failover-stopped")
        assert stack.vms()["wh-db-01"]["state"] != "Replicating", stack.vms()["wh-db-01"]

        # The way back: recover/wholesale, action cancel-failover.
        open_deployment(page, stack, "recover", "wholesale")
        form = custom_run(page)
        form_field(form, page, "confirm").locator("textarea, input").first.fill("wholesale")
        _choose(page, form_field(form, page, "action"), "cancel-failover")
        form_field(form, page, "requested_by").locator("textarea, input").first.fill("frank (wholesale owner)")
        shot("recover-form")
        rec = _run_by_name(stack, submit_run(page))
        _open_run(page, stack, rec.id)
        page.locator(BADGE.format("completed")).wait_for()
        expect(page.locator("body")).to_contain_text("cancel-failover of wholesale: succeeded")
        shot("cancelled")
    shot.publish("day", lambda n: "stopped" in n or "recover-form" in n or "cancelled" in n)
    # Every VM of the plan is back where it was before the failover: replicating from the protected site.
    for vm in ("wh-db-01", "wh-app-01"):
        rec_vm = stack.vms()[vm]
        assert rec_vm["state"] == "Replicating" and rec_vm["running"] == ["mem-east-01"], (vm, rec_vm)
    # And the plan drills again.
    with client(stack) as c:
        dep = c.read_deployment_by_name("dr-drill/wholesale")
        drill = c.create_flow_run_from_deployment(dep.id, parameters={"requested_by": "frank"})
    done = wait_state(stack, drill.id, {"FAILED", "COMPLETED", "CRASHED"})
    assert done.state.type.value == "COMPLETED", done.state


def _flow_process(run_id: Any) -> int:
    """The PID of the process running flow run `run_id` (the worker starts it in a session of its own)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    return int(proc.name)
            except OSError:
                continue
    raise AssertionError(f"no process runs flow run {run_id}")


@pytest.mark.slow
def test_worker_killed_mid_drill_then_the_next_drill_recovers(stack: Stack, request: pytest.FixtureRequest) -> None:
    """The worker and the drill's flow process are killed while the drill waits at its approval (its
    database VM failed over for test). The zombie-run automation marks the run Crashed; the next drill
    of the plan, from the UI, writes the dead run's report (status crashed), reclaims its plan and host
    slots, cleans up the test VM it left and succeeds."""
    from playwright.sync_api import expect

    with client(stack) as c:
        dep = c.read_deployment_by_name("dr-drill/shop")
        first = c.create_flow_run_from_deployment(dep.id, parameters={"requested_by": "nightly"})
    wait_state(stack, first.id, {"PAUSED"})
    assert stack.vms()["shop-db-01"]["test_active"]
    lay = ui.Layout(stack.state)
    workers = sorted(lay.run.glob("worker*.pid"))
    flow_pid = _flow_process(first.id)
    for pidfile in workers:
        pid = ui.recorded(pidfile)
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)  # the worker's whole group; the flow process is in another session
        # `ui up` started the worker from this process: collect it, or its zombie would pass for a live worker.
        child = ui._children.pop(pid, None)
        if child is not None:
            child.wait(30)
    os.kill(flow_pid, signal.SIGKILL)
    killed = time.monotonic()
    crashed = wait_state(stack, first.id, {"CRASHED", "FAILED", "COMPLETED"}, seconds=300)
    took = time.monotonic() - killed
    assert crashed.state.type.value == "CRASHED" and "No heartbeat" in (crashed.state.message or ""), crashed.state
    assert took < 180, f"marked Crashed {took:.0f} s after the kill"
    print(f"marked Crashed {took:.0f} s after the kill")
    # The test VM the dead run started is still there: the next drill cleans it up.
    assert stack.vms()["shop-db-01"]["test_active"]

    # The site's worker again (`make ui` starts a missing worker and keeps the rest).
    ui.up(stack.state, ROOT, stack.state / "prefect.yaml", pool=POOL, port=stack.port,
          say=lambda _m: None)
    with browser_page(stack, request.node.name) as (page, shot):
        _open_run(page, stack, first.id)
        page.locator(BADGE.format("crashed")).wait_for()
        shot("crashed")
        open_deployment(page, stack, "dr-drill", "shop")
        form = custom_run(page)
        form_field(form, page, "requested_by").locator("textarea, input").first.fill("carol (after the crash)")
        nxt = _run_by_name(stack, submit_run(page))
        wait_state(stack, nxt.id, {"PAUSED"})
        resume(stack, nxt.id, {"approved": True, "approver": "alice", "comment": "db consistent"})
        done = wait_state(stack, nxt.id, {"FAILED", "COMPLETED", "CRASHED"})
        assert done.state.type.value == "COMPLETED", done.state
        # The crashed run has its report too, on its own page, written by the next run.
        _open_run(page, stack, first.id)
        page.get_by_text("Artifacts", exact=True).click()
        card = page.get_by_text("drill-shop", exact=True).first
        card.wait_for()
        card.click()
        page.wait_for_url("**/artifacts/artifact/**")
        report = page.locator(".markdown-renderer").filter(has=page.locator("h1, h2"))
        expect(report).to_contain_text("crashed")
        expect(report).to_contain_text(f"found by flow run {nxt.id}")
        shot("crashed-report")
    shot.publish("day", lambda n: "crashed" in n)
    assert not stack.vms()["shop-db-01"]["test_active"], stack.vms()["shop-db-01"]
    # Every slot is free again: the plan's (else the next drill would have been refused) and the hosts'.
    deadline = time.monotonic() + 60
    with client(stack) as c:
        while True:
            held = {g.name: g.active_slots for g in c.read_global_concurrency_limits(limit=200)
                    if g.name.startswith("siterecovery-") and g.active_slots}
            if not held or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert not held, held


@pytest.mark.slow
def test_drill_trends_after_three_drills(stack: Stack, request: pytest.FixtureRequest) -> None:
    """Three drills of web-drill (objectives: RPO 15 min, RTO 10 min); its drill-trends-web-drill artifact
    lists the three, newest first, each with achieved RTO and RPO against the objectives, and the chart."""
    from playwright.sync_api import expect

    ids = []
    with client(stack) as c:
        dep = c.read_deployment_by_name("dr-drill/web-drill")
        for i in range(3):
            run = c.create_flow_run_from_deployment(dep.id, parameters={"requested_by": f"trend-{i}"})
            done = wait_state(stack, run.id, {"FAILED", "COMPLETED", "CRASHED"})
            assert done.state.type.value == "COMPLETED", done.state
            ids.append(str(run.id))
    with browser_page(stack, request.node.name) as (page, shot):
        # Artifacts > drill-trends-web-drill: one version per drill, newest first; the newest holds them all.
        page.goto(f"{stack.url}/artifacts/key/drill-trends-web-drill")
        page.locator("a[href^='/artifacts/artifact/']").first.click()
        page.wait_for_url("**/artifacts/artifact/**")
        report = page.locator(".markdown-renderer").filter(has=page.locator("h1, h2"))
        expect(report).to_contain_text("Drill trends: web-drill")
        expect(report).to_contain_text("RTO objective: 10.0 min")
        for run_id in ids:
            expect(report).to_contain_text(run_id)
        # Newest first: the three drills on top (an earlier test may have drilled web-drill before).
        rows = report.locator("tbody tr")
        expect(rows.nth(2)).to_be_visible()
        for i, run_id in enumerate(reversed(ids)):
            cells = [c.strip() for c in rows.nth(i).locator("td").all_inner_texts()]
            # started, status, RTO, vs previous, met/missed, RPO, met/missed, flow run
            assert cells[7] == run_id and cells[1] == "succeeded", cells
            assert cells[4] in ("met", "missed") and cells[6] in ("met", "missed"), cells
        expect(report.locator("img")).to_have_count(1)
        shot("drill-trends")
    shot.publish("day")
