"""End to end through the Prefect UI, as an operator uses it: `siterecovery ui up` starts a real server,
work pool, deployments and worker for a test project on the in-memory fabric; headless chromium
triggers `dr-drill/shop` from the deployment's page, approves the manual action in the paused run's
form and reads the report artifact. A second test lets a near schedule start a drill by itself.

Screenshots of every step go to tests/output/<test>/; SITERECOVERY_UPDATE_DOCS_IMG=1 also copies them to
docs/img/ for the walkthrough in docs/UI.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from siterecovery import ui
from siterecovery.deployments import PlanSettings, Schedule, Settings, dump, render
from siterecovery.fabric import FabricContext
from siterecovery.fabric.memory import MemoryFabric
from siterecovery.placement import plan_placements
from siterecovery.project import load_project
from siterecovery.testing.postgres import available, reachable_tmpdir
from siterecovery.testing.prefect_server import free_port

pytestmark = [pytest.mark.prefect_server, pytest.mark.browser, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
PROJECT = Path(__file__).resolve().parent / "project"
# The `project` parameter as deployed: relative to the repository root, where the flow runs start.
PROJECT_PARAM = str(PROJECT.relative_to(ROOT))
OUTPUT = ROOT / "tests" / "output"
CHROMIUM = Path("/usr/bin/chromium")
POOL = "siterecovery-test"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Generous: the first page load compiles nothing but the server answers slowly while a run starts.
WAIT_MS = 90_000


def _need() -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup-system.sh installs it)")
    pytest.importorskip("playwright.sync_api", reason="playwright (the `test` extra) is not installed")


def _write_deployments(path: Path, settings: Settings, only: set[str] | None = None) -> Path:
    """The test project's rendered deployments, as `make ui` deploys them for plans/."""
    doc = render(load_project(PROJECT), settings)
    deps = []
    for d in doc["deployments"]:
        if "protection" in d["tags"]:
            # Deployed to prove they deploy; their schedules stay off so no cycle competes with a drill.
            d["schedules"] = [{**sch, "active": False} for sch in d["schedules"]]
        if only is None or d["name"] in only:
            deps.append(d)
    doc["deployments"] = deps
    path.write_text(dump(doc, PROJECT_PARAM, "test settings"))
    return path


class Stack:
    def __init__(self, state: Path, url: str) -> None:
        self.state = state
        self.url = url
        self.fabric_file = state / "memory-fabric.json"

    def fabric(self) -> MemoryFabric:
        return MemoryFabric(FabricContext(state_dir=self.state, options={"state_file": str(self.fabric_file)}))

    def vms(self) -> dict[str, Any]:
        return dict(json.loads(self.fabric_file.read_text())["vms"])

    def calls(self, vm: str) -> list[str]:
        return [c[1] for c in self.fabric().all_calls() if c[2] == vm]

    def logs(self) -> str:
        out = []
        for log in sorted(ui.Layout(self.state).run.glob("*.log")):
            name = log.stem
            if log.exists():
                out.append(f"---- {name} log (tail) ----\n" + log.read_text(errors="replace")[-6000:])
        return "\n".join(out)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    _need()
    # The UI runs on PostgreSQL (ui.DEFAULT_DB), whose cluster lives in the state directory: a
    # directory the postgres user can reach, not pytest's root-private one.
    state = reachable_tmpdir("siterecovery-ui-state-")
    project = load_project(PROJECT)
    # The VMs are protected before any drill: seed the shared memory-fabric state the flows read.
    fabric = MemoryFabric(FabricContext(state_dir=state, options={"state_file": str(state / "memory-fabric.json")}))
    for plan in project.plans.values():
        for placement in plan_placements(project, plan.plan).values():
            fabric.seed(placement)
    settings = Settings(work_pool=POOL, project=PROJECT_PARAM,
                        # Scheduled weekly drills must not fire while the tests run.
                        drills={"schedule": Schedule(cron="0 2 * * 6", active=False)})  # type: ignore[arg-type]
    prefect_file = _write_deployments(state / "prefect.yaml", settings)
    saved = os.environ.get("SITERECOVERY_STATE")
    os.environ["SITERECOVERY_STATE"] = str(state)
    # The server schedules runs of a newly deployed schedule within 2 s (default 5 s). Faster loops
    # add SQLite write contention (`database is locked`) for nothing.
    os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS"] = "2"
    try:
        url = ui.up(state, ROOT, prefect_file, pool=POOL, port=free_port(), say=lambda _m: None,
                    db="sqlite" if available() else "postgres")
        st = Stack(state, url)
        yield st
    finally:
        ui.down(state, say=lambda _m: None)
        os.environ.pop("PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS", None)
        if saved is None:
            os.environ.pop("SITERECOVERY_STATE", None)
        else:
            os.environ["SITERECOVERY_STATE"] = saved
    # `down` stopped exactly what `up` started.
    assert not any(ui.status(state).values()), ui.status(state)
    shutil.rmtree(state, ignore_errors=True)


class Shots:
    def __init__(self, page: Any, name: str) -> None:
        self.page = page
        self.dir = OUTPUT / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.n = 0

    def __call__(self, label: str) -> None:
        self.n += 1
        self.page.screenshot(path=str(self.dir / f"{self.n:02d}-{label}.png"))

    def publish(self) -> None:
        if os.environ.get("SITERECOVERY_UPDATE_DOCS_IMG") == "1":
            dest = ROOT / "docs" / "img"
            dest.mkdir(parents=True, exist_ok=True)
            for png in sorted(self.dir.glob("*.png")):
                shutil.copy(png, dest / f"ui-{png.name}")


def _submit(dialog: Any) -> None:
    """Submit the approval as a person would: if the server refused it ("Oops. Something went wrong":
    SQLite's `database is locked` under the load of server, worker and browser on two cores), the form
    stays open with its values, and a second click sends it again."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    for attempt in range(3):
        dialog.get_by_role("button", name="Submit").click()
        try:
            expect(dialog).to_be_hidden(timeout=20_000)
            return
        except (AssertionError, PlaywrightError):
            if attempt == 2:
                raise


def test_drill_from_the_ui(stack: Stack, request: pytest.FixtureRequest) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(WAIT_MS)
        shot = Shots(page, request.node.name)
        try:
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
            assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)+", run_name), run_name

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
            _submit(dialog)

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
        except Exception:
            print(f"failed after screenshot {shot.n} ({page.url})")
            shot("failure")
            print(stack.logs())
            raise
        finally:
            browser.close()
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


def _flow_runs(stack: Stack, deployment: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with _client(stack) as client:
        return list(client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))))


@contextmanager
def _client(stack: Stack) -> Iterator[Any]:
    """A client of the stack's server. Prefect reads its settings once, at import, so setting
    PREFECT_API_URL in the environment now would not reach it: override the settings context."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"{stack.url}/api"}), get_client(sync_client=True) as client:
        yield client


def test_deployed_as_rendered(stack: Stack) -> None:
    """What `ui up` deployed is what the renderer wrote: names, parameters, schedules, work pool."""
    with _client(stack) as client:
        deployed = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
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
    with _client(stack) as client:
        autos = client.read_automations()
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
    prefect_file = _write_deployments(tmp_path / "prefect.yaml", settings, only={"web-drill"})
    assert yaml.safe_load(prefect_file.read_text())["deployments"][0]["schedules"][0]["anchor_date"] == due.isoformat()
    ui.up(stack.state, ROOT, prefect_file, pool=POOL, port=int(stack.url.rsplit(":", 1)[1]), say=lambda _m: None)
    assert datetime.now(UTC) < due - timedelta(seconds=3), "the redeploy outlasted the schedule's margin"
    started = time.monotonic()
    state = None
    while time.monotonic() - started < 120:
        runs = [r for r in _flow_runs(stack, "web-drill") if r.state and r.state.type.value != "SCHEDULED"]
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


def _wait_state(stack: Stack, run_id: Any, types: set[str], seconds: float = 180) -> Any:
    deadline = time.monotonic() + seconds
    with _client(stack) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.type.value in types:
                return run
            time.sleep(1)
    raise AssertionError(f"flow run {run_id} never reached {types}\n{stack.logs()}")


def test_two_drills_at_once_through_the_api_the_second_is_refused(stack: Stack) -> None:
    """Both submitted together: one runs (and waits at the plan's approval), the other is refused at its
    start naming the first; nothing of the estate is shared between them."""
    from prefect.flow_runs import resume_flow_run

    with _client(stack) as client:
        dep = client.read_deployment_by_name("dr-drill/shop")
        runs = [client.create_flow_run_from_deployment(dep.id, parameters={"requested_by": f"api-{i}"})
                for i in (1, 2)]
    ends = {}
    for r in runs:
        ends[r.id] = _wait_state(stack, r.id, {"PAUSED", "FAILED", "COMPLETED", "CRASHED"})
    paused = [r for r in ends.values() if r.state.type.value == "PAUSED"]
    refused = [r for r in ends.values() if r.state.type.value == "FAILED"]
    assert len(paused) == 1 and len(refused) == 1, {str(k): v.state for k, v in ends.items()}
    msg = refused[0].state.message or ""
    assert f"plan 'shop' already has a live run: flow run {paused[0].id}" in msg, msg
    # The one that runs goes on to its end; its approver says no: it stops and cleans up.
    from flows.approval import input_form_ready

    with _client(stack) as client:
        deadline = time.monotonic() + 60
        while not input_form_ready(client, client.read_flow_run(paused[0].id)):
            assert time.monotonic() < deadline, "the paused run never saved its approval form"
            time.sleep(0.5)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: f"{stack.url}/api"}):
            resume_flow_run(paused[0].id, run_input={"approved": False, "approver": "erin", "comment": "test over"})
    done = _wait_state(stack, paused[0].id, {"FAILED", "COMPLETED", "CRASHED"})
    assert done.state.type.value == "FAILED" and "rejected by erin" in (done.state.message or "")
    assert not any(vm["test_active"] for vm in stack.vms().values()), stack.vms()
