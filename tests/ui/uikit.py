"""What the browser tests share: a running `siterecovery ui up` stack on the test project (tests/ui/project,
in-memory fabric), screenshots, the approval submit that survives a refused click, and API helpers.
The `stack` fixture itself is in conftest.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from siterecovery import ui
from siterecovery.deployments import Schedule, Settings, dump, render
from siterecovery.fabric import FabricContext
from siterecovery.fabric.memory import MemoryFabric
from siterecovery.placement import plan_placements
from siterecovery.project import load_project
from siterecovery.testing.postgres import available, reachable_tmpdir
from siterecovery.testing.prefect_server import free_port

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


def need_browser() -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup-system.sh installs it)")
    pytest.importorskip("playwright.sync_api", reason="playwright (the `test` extra) is not installed")


def ui_settings(**extra: Any) -> Settings:
    """The settings the tests deploy with: the test pool and project; weekly drills that stay off."""
    drills = {"schedule": Schedule(cron="0 2 * * 6", active=False)} | extra.pop("drills", {})
    return Settings(work_pool=POOL, project=PROJECT_PARAM, drills=drills, **extra)  # type: ignore[arg-type]


def write_deployments(path: Path, settings: Settings, only: set[str] | None = None,
                      protection_active: bool = False) -> Path:
    """The test project's rendered deployments, as `make ui` deploys them for plans/."""
    doc = render(load_project(PROJECT), settings)
    deps = []
    for d in doc["deployments"]:
        if "protection" in d["tags"] and not protection_active:
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

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

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


@contextmanager
def running_stack(settings: Settings | None = None, protection_active: bool = False,
                  env: dict[str, str] | None = None) -> Iterator[Stack]:
    """`siterecovery ui up` for the test project in a fresh state directory, its VMs protected; `down`
    afterwards, checking it stopped exactly what `up` started."""
    need_browser()
    # The UI runs on PostgreSQL (ui.DEFAULT_DB), whose cluster lives in the state directory: a
    # directory the postgres user can reach, not pytest's root-private one.
    state = reachable_tmpdir("siterecovery-ui-state-")
    project = load_project(PROJECT)
    # The VMs are protected before any drill: seed the shared memory-fabric state the flows read.
    fabric = MemoryFabric(FabricContext(state_dir=state, options={"state_file": str(state / "memory-fabric.json")}))
    for plan in project.plans.values():
        for placement in plan_placements(project, plan.plan).values():
            fabric.seed(placement)
    prefect_file = write_deployments(state / "prefect.yaml", settings or ui_settings(),
                                     protection_active=protection_active)
    overrides = {
        "SITERECOVERY_STATE": str(state),
        # The server schedules runs of a newly deployed schedule within 2 s (default 5 s). Faster loops
        # add SQLite write contention (`database is locked`) for nothing.
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2",
        **(env or {})}
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        url = ui.up(state, ROOT, prefect_file, pool=POOL, port=free_port(), say=lambda _m: None,
                    db="sqlite" if available() else "postgres")
        yield Stack(state, url)
    finally:
        # A run a test left in flight (a drill paused at its approval) would hold each worker for the
        # default 20 s grace; the tests need no graceful stop.
        ui.down(state, say=lambda _m: None, grace=5)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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

    def publish(self, prefix: str | None = None, only: Callable[[str], bool] = lambda _n: True) -> None:
        """With SITERECOVERY_UPDATE_DOCS_IMG=1, copy the screenshots to docs/img/: as ui-<nn>-<label>.png
        (the walkthrough's numbered steps), or with a prefix as ui-<prefix>-<label>.png."""
        if os.environ.get("SITERECOVERY_UPDATE_DOCS_IMG") == "1":
            dest = ROOT / "docs" / "img"
            dest.mkdir(parents=True, exist_ok=True)
            for png in sorted(self.dir.glob("*.png")):
                label = png.name.split("-", 1)[1]
                if only(label):
                    shutil.copy(png, dest / (f"ui-{png.name}" if prefix is None else f"ui-{prefix}-{label}"))


@contextmanager
def browser_page(stack: Stack, name: str) -> Iterator[tuple[Any, Shots]]:
    """A headless chromium page and its screenshots; on a failure, a last screenshot and the stack's logs."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(WAIT_MS)
        shot = Shots(page, name)
        try:
            yield page, shot
        except BaseException:
            print(f"failed after screenshot {shot.n} ({page.url})")
            shot("failure")
            print(stack.logs())
            raise
        finally:
            browser.close()


def submit(dialog: Any) -> None:
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


def form_field(scope: Any, page: Any, label: str) -> Any:
    """A schema form's property whose label starts with `label`."""
    return scope.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text=re.compile(f"^{label}")))


def open_deployment(page: Any, stack: Stack, flow: str, name: str) -> None:
    """From the deployments list, the page of deployment `flow/name`."""
    from playwright.sync_api import expect

    page.goto(f"{stack.url}/deployments")
    # The list shows ten to a page: search, as a person would.
    page.get_by_placeholder("Search deployments").fill(name)
    # The flow's name exactly: every row's tags hold "siterecovery", which contains "recover".
    row = page.locator("tr").filter(has=page.get_by_text(flow, exact=True)).filter(
        has=page.locator(f"a[title='{name}']"))
    expect(row).to_have_count(1)
    row.locator(f"a[title='{name}']").click()
    page.wait_for_url("**/deployments/deployment/**")
    expect(page.locator(".p-bread-crumbs")).to_contain_text(name)


def custom_run(page: Any) -> Any:
    """Run > Custom run on a deployment's page: the parameter form."""
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    return page.locator("form").filter(has_text="requested_by").first


def submit_run(page: Any) -> str:
    """Submit a custom run's form; the new run's name, from the toast."""
    toasts = page.locator(".toast-flow-run-create__message--emphasized")
    # An earlier submission's toast may still be showing: the new run's is the one not seen before.
    seen = {t.strip() for t in toasts.all_inner_texts()}
    page.get_by_role("button", name="Submit").click()
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        new = [t.strip() for t in toasts.all_inner_texts() if t.strip() and t.strip() not in seen]
        if new:
            break
        assert time.monotonic() < deadline, "no toast named the new run"
        page.wait_for_timeout(200)
    # Whatever its shape: the server names runs "adjective-animal", but a run submitted from the UI's
    # form was once named "epsilon156" (CI, stop 22); the name is only used to find the run's link.
    return new[0]


def flow_runs(stack: Stack, deployment: str | None = None) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with client(stack) as c:
        if deployment is None:
            return list(c.read_flow_runs())
        return list(c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))))


@contextmanager
def client(stack: Stack) -> Iterator[Any]:
    """A client of the stack's server. Prefect reads its settings once, at import, so setting
    PREFECT_API_URL in the environment now would not reach it: override the settings context."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"{stack.url}/api"}), get_client(sync_client=True) as c:
        yield c


def wait_state(stack: Stack, run_id: Any, types: set[str], seconds: float = 180) -> Any:
    deadline = time.monotonic() + seconds
    with client(stack) as c:
        while time.monotonic() < deadline:
            run = c.read_flow_run(run_id)
            if run.state is not None and run.state.type.value in types:
                return run
            time.sleep(1)
    raise AssertionError(f"flow run {run_id} never reached {types}\n{stack.logs()}")


def resume(stack: Stack, run_id: Any, run_input: dict[str, Any]) -> None:
    """Answer a paused run's approval through the API, once its form is saved."""
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.approval import input_form_ready

    with client(stack) as c:
        deadline = time.monotonic() + 60
        while not input_form_ready(c, c.read_flow_run(run_id)):
            assert time.monotonic() < deadline, "the paused run never saved its approval form"
            time.sleep(0.5)
    with temporary_settings(updates={PREFECT_API_URL: f"{stack.url}/api"}):
        # Synchronously, also inside a Playwright block (whose event loop would make it return a coroutine).
        resume_flow_run(run_id, run_input=run_input, _sync=True)  # type: ignore[call-arg]
