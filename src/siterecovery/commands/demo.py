"""`siterecovery demo`: the embedded demo. It builds two sites on this machine (siterecovery.demo),
protects the three-tier shop with the linux fabric (or, with --qemu, two real QEMU guests), then drills,
fails over and fails back through the recovery-plan flow in Prefect (ephemeral, or PREFECT_API_URL when
set), approving the drill's manual action itself. Prefect and flows/ are imported inside the command only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..cli import app

DEFAULT_STATE = Path(".siterecovery/demo")
DEFAULT_STATE_QEMU = Path(".siterecovery/demo-qemu")
APPROVER = "siterecovery-demo"


@dataclass
class Phase:
    name: str
    status: str = "waiting"  # waiting | running | done | failed
    detail: str = ""
    started: float | None = None
    ended: float | None = None

    def seconds(self) -> str:
        if self.started is None:
            return ""
        return f"{(self.ended or time.monotonic()) - self.started:5.1f}s"


@dataclass
class View:
    """The short live progress view: one row per phase, the latest log line of the running one."""

    phases: list[Phase]
    current: Phase | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, name: str, detail: str = "") -> Phase:
        ph = next(p for p in self.phases if p.name == name)
        with self.lock:
            ph.status, ph.started, ph.detail = "running", time.monotonic(), detail
            self.current = ph
        return ph

    def begin_bg(self, name: str, detail: str = "") -> None:
        """A phase that runs alongside the others (Prefect's start-up)."""
        ph = next(p for p in self.phases if p.name == name)
        with self.lock:
            ph.status, ph.started, ph.detail = "running", time.monotonic(), detail

    def end_bg(self, name: str, detail: str, ok: bool = True) -> None:
        ph = next(p for p in self.phases if p.name == name)
        with self.lock:
            ph.status, ph.ended, ph.detail = ("done" if ok else "failed"), time.monotonic(), detail

    def note(self, detail: str) -> None:
        with self.lock:
            if self.current is not None:
                self.current.detail = detail[:110]

    def end(self, detail: str | None = None, ok: bool = True) -> None:
        with self.lock:
            if self.current is not None:
                self.current.status, self.current.ended = ("done" if ok else "failed"), time.monotonic()
                if detail is not None:
                    self.current.detail = detail
            self.current = None

    def render(self) -> Table:
        t = Table(show_header=False, box=None, padding=(0, 1))
        mark = {"waiting": Text("·", "dim"), "running": Text("▶", "bold yellow"), "done": Text("✓", "bold green"),
                "failed": Text("✗", "bold red")}
        with self.lock:
            for p in self.phases:
                t.add_row(mark[p.status], Text(p.name, "bold" if p.status == "running" else ""), p.seconds(),
                          Text(p.detail, "dim" if p.status != "running" else ""))
        return t


class _ToView(logging.Handler):
    """Run-log lines of the flow and its tasks become the running phase's detail."""

    def __init__(self, view: View) -> None:
        super().__init__(logging.INFO)
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            msg = record.getMessage().splitlines()[0] if record.getMessage() else ""
            if msg and not msg.startswith(("Finished in state", "Created task run", "Executing")):
                self.view.note(msg)


PHASES = ["prefect", "sites", "workload", "protect", "replicate", "1 drill (test failover)",
          "2 planned failover", "3 failback", "tear down"]


@app.command()
def demo(
    clean: Annotated[bool, typer.Option("--clean", help="stop anything a demo left and delete its state")] = False,
    state: Annotated[Path, typer.Option("--state", help="the demo's state directory")] = DEFAULT_STATE,
    local: Annotated[bool, typer.Option("--local", help="local transport even when sshd is installed")] = False,
    cycles: Annotated[int, typer.Option("--cycles", min=1, max=20, help="delta cycles while the shop writes")] = 3,
    qemu: Annotated[bool, typer.Option("--qemu", help="real QEMU guests (plans/demo/qemu) instead of the shop; "
                                                      "needs qemu-system-x86, qemu-utils and the guest kit")] = False,
) -> None:
    """Run the embedded demo: protect a real three-tier shop (two databases in one consistency group),
    drill, fail over and fail back on this machine. With --qemu the same with two real QEMU guests."""
    from .. import demo as core

    if qemu and state == DEFAULT_STATE:
        state = DEFAULT_STATE_QEMU  # a QEMU demo never deletes the shop demo's state, nor the reverse
    state = state.resolve()
    console = Console()
    if clean:
        core.clean(state)
        console.print(f"removed {state}")
        return
    kit = None
    if qemu:
        missing = core.qemu_missing()
        try:
            kit = None if missing else core.guest_kit(core.checkout_root())
        except core.MissingKit as exc:
            missing = f"the QEMU demo's guest kit cannot be built: {exc}"
        if missing:
            console.print(f"[red]siterecovery demo --qemu:[/] {missing}", soft_wrap=True)
            raise typer.Exit(3)
    rc = _run(core, state, console, use_ssh=not local, cycles=cycles, kit=kit)
    raise typer.Exit(rc)


def _run(core: Any, state: Path, console: Console, use_ssh: bool, cycles: int, kit: Path | None = None) -> int:
    checkout = core.checkout_root()
    view = View([Phase(n) for n in PHASES])
    scenario = core.SHOP if kit is None else core.GUESTS
    estate = core.Estate(checkout=checkout, state=state, use_ssh=use_ssh, scenario=scenario, kit=kit)
    summary: dict[str, Any] = {"state": str(state), "plan": scenario.plan, "runs": [], "checks": {}}
    t_all = time.monotonic()
    ok = False
    live = Live(get_renderable=lambda: Group(Text("siterecovery demo", "bold"), view.render()), console=console,
                refresh_per_second=4, transient=False)
    writer = None
    prefect = _PrefectStart(estate, view, summary)
    with live:
        try:
            # Prefect's start-up (an ephemeral server: 10-20 s) overlaps building the estate.
            prefect.start()
            view.begin("sites")
            estate.start()
            summary.update(port=estate.port, transport=estate.transport, project=str(estate.project_dir))
            view.end(f"primary {core.SUBNET['primary']}.0/24, recovery {core.SUBNET['recovery']}.0/24, "
                     f"isolated test {core.SUBNET['test']}.0/24; hosts over {estate.transport}")

            if scenario is core.GUESTS:
                before_point: Any = _guests_protected(core, estate, view, summary, cycles)
            else:
                view.begin("workload")
                estate.start_workload()
                writer = core.Writer(estate.url("primary"))
                writer.start()
                view.end(f"orders db, payments db, app, web up; shop at {estate.url('primary')}")

                view.begin("protect", "initial replication")
                res = estate.initial_replication()
                view.end(f"{len(res)} VMs replicating to recovery-host; initial copy {sum(r.bytes_sent for r in res) / 1024:.0f} KiB sent")

                view.begin("replicate")
                last_start = time.time()
                for i in range(cycles):
                    time.sleep(0.3)  # let the customers write between points
                    last_start = time.time()
                    res = estate.cycle()
                    view.note(f"cycle {i + 1}/{cycles}: {sum(r.bytes_sent for r in res)} bytes, point {res[0].point.id if res[0].point else '-'}")
                before_point = writer.acked_before(last_start)
                view.end(f"{cycles} app-consistent delta cycles (both databases frozen at one instant by tier.py, "
                         f"one group point) while {len(writer.acked)} orders were written")

            prefect.join()
            if prefect.error is not None:
                raise prefect.error
            if scenario is core.GUESTS:
                rc = _guests_through_prefect(core, estate, view, console, before_point, summary)
            else:
                rc = _through_prefect(core, estate, view, console, writer, before_point, summary)
            ok = rc == 0
        except Exception as exc:  # noqa: BLE001 - report any failure, then tear down regardless
            view.end(f"{type(exc).__name__}: {exc}", ok=False)
            summary["error"] = f"{type(exc).__name__}: {exc}"
            logging.getLogger(__name__).exception("demo failed")
        finally:
            view.begin("tear down")
            if writer is not None and writer.is_alive():
                writer.stop()
            estate.stop_workload()
            estate.close()
            _close_prefect()
            left = core.processes_under(state / "sites") + core.processes_under(state / "sshd")
            summary["checks"]["nothing_left_running"] = not left
            ok = ok and not left
            view.end("no VM, sshd or agent left running" if not left else f"still running: {left}", ok=not left)
    summary["ok"] = ok
    summary["seconds"] = round(time.monotonic() - t_all, 1)
    (state / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _print_summary(console, summary)
    return 0 if ok else 1


# A cold first start of the server (migrations, imports without a bytecode cache) took 20-60 s here.
STARTUP_LIMIT = 300.0
_servers: list[Any] = []


class _PrefectStart(threading.Thread):
    """Imports Prefect and the flows and makes the first API call, which starts the ephemeral server
    (or reaches PREFECT_API_URL): its cost is measured and shown."""

    def __init__(self, estate: Any, view: View, summary: dict[str, Any]) -> None:
        super().__init__(daemon=True, name="demo-prefect-start")
        self.estate, self.view, self.summary = estate, view, summary
        self.error: BaseException | None = None
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ["SITERECOVERY_STATE"] = str(estate.fabric_state)

    def run(self) -> None:
        self.view.begin_bg("prefect", "starting")
        t0 = time.monotonic()
        try:
            if not os.environ.get("PREFECT_API_URL"):
                self._own_server()
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, PREFECT_HOME

            import flows.recovery_plan  # noqa: F401 - imported once here, off the main thread's path

            api = PREFECT_API_URL.value()
            with get_client(sync_client=True) as client:
                client.hello()
            startup = time.monotonic() - t0
            self.summary["prefect"] = {"mode": f"server {api}" if api else "ephemeral",
                                       "startup_seconds": round(startup, 1), "home": str(PREFECT_HOME.value())}
            self.view.end_bg("prefect", f"{'API ' + api if api else 'ephemeral server'} ready in {startup:.1f} s "
                                        "(started alongside the estate)")
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
            self.view.end_bg("prefect", f"{type(exc).__name__}: {exc}", ok=False)

    def _own_server(self) -> None:
        """Start the demo's own Prefect server and wait for it. Prefect's ephemeral server gives up after
        20 s, and a first start on a fresh machine (database migrations, no bytecode cache with
        PYTHONDONTWRITEBYTECODE=1) takes longer: the first `make demo` failed that way. Set before prefect
        is imported, so every client of this process talks to it; stopped in the demo's tear-down."""
        from ..testing.prefect_server import PrefectServer, free_port

        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")  # prefect's own default
        server = PrefectServer(home, free_port())
        _servers.append(server)
        server.start(timeout=STARTUP_LIMIT, log=home / "demo-server.log")
        os.environ["PREFECT_API_URL"] = server.api_url


def _plan_runner(estate: Any, view: View, summary: dict[str, Any]) -> Any:
    """run(phase, **recovery_plan kwargs): one run of the estate's plan through the recovery-plan flow,
    shown as a phase and kept in the summary."""
    from flows.recovery_plan import PlanFailed, recovery_plan

    def run(phase: str, extra: Any = None, **kw: Any) -> dict[str, Any]:
        view.begin(phase)
        try:
            out: dict[str, Any] = recovery_plan(plan=estate.scenario.plan, project=str(estate.project_dir),
                                                fabric_options=estate.fabric_options, **kw)
        except PlanFailed as exc:
            out = dict(getattr(exc, "summary", {}) or {"status": "failed", "failures": [str(exc)]})
        summary["runs"].append({"phase": phase, **out})
        done = out.get("status") == "succeeded"
        said = extra(out) if extra is not None and done else ""
        view.end(f"{out.get('status')}: RPO {_s(out.get('achieved_rpo_seconds'))}, RTO {_s(out.get('achieved_rto_seconds'))}"
                 + said + ("" if done else f"; {'; '.join(out.get('failures', []))[:200]}"), ok=done)
        return out

    return run


def _through_prefect(core: Any, estate: Any, view: View, console: Console, writer: Any,
                     before_point: list[str], summary: dict[str, Any]) -> int:
    from siterecovery.compile import RunOptions
    from siterecovery.model import Direction, FailoverType

    _quiet_console(view, estate.state / "demo.log")
    def expect(items: list[str]) -> None:
        (estate.state / "expected.json").write_text(json.dumps({"items": items}))

    run = _plan_runner(estate, view, summary)

    checks = summary["checks"]
    # 1. The drill: the shop starts on the isolated network from the latest point; the plan's script
    #    checks every order written before that point; the demo signs off the manual action.
    expect(before_point)
    seen = {"test_orders": 0}

    def look() -> str:
        test_url, prod_url = estate.url("test"), estate.url("primary")
        try:
            n_test = len(core.orders(test_url))
        except OSError:
            n_test = 0
        seen["test_orders"] = n_test
        n_prod = len(core.orders(prod_url))
        return (f"test shop at {test_url} holds {n_test} orders (the recovery point); production at {prod_url} "
                f"went on to {n_prod}, untouched by the drill")

    approver = _Approver(console, look)
    approver.start()
    try:
        drill = run("1 drill (test failover)", failover_type=FailoverType.test)
    finally:
        approver.halt()
    checks["drill_saw_orders_before_point"] = seen["test_orders"] >= len(before_point) > 0
    # Both databases came up from one group point (check-shop also checked that payments match orders).
    checks["drill_databases_from_one_group_point"] = bool((drill.get("group_points") or {}).get("shop-db"))
    left = core.drill_leftovers(estate.state, estate.port)
    checks["drill_left_nothing"] = not left
    checks["drill_left"] = left
    if drill.get("status") != "succeeded" or left:
        return 1

    # 2. Planned failover: the customers stop, one last order goes in, the primary shuts down, its last
    #    changes travel, the shop starts at the recovery site, which must hold that order.
    writer.stop()
    last = f"before-failover-{int(time.time())}"
    core.http(estate.url("primary") + "/orders", {"item": last})
    expect([i for _, i in writer.acked] + [last])
    planned = run("2 planned failover", failover_type=FailoverType.planned, confirm=core.PLAN,
                  options=RunOptions(reverse_replication=True))
    if planned.get("status") != "succeeded":
        return 1
    at_recovery = core.orders(estate.url("recovery"))
    checks["row_before_failover_at_recovery"] = last in at_recovery
    checks["row_before_failover"] = last
    checks["primary_down_after_failover"] = not core.answers(estate.url("primary"))
    view.note(f"'{last}' read back at {estate.url('recovery')}")

    # 3. Failback: an order taken at the recovery site must come home too.
    back = f"at-recovery-{int(time.time())}"
    core.http(estate.url("recovery") + "/orders", {"item": back})
    expect([i for _, i in writer.acked] + [last, back])
    failback = run("3 failback", failover_type=FailoverType.planned, direction=Direction.failback,
                   confirm=core.PLAN, options=RunOptions(reverse_replication=True))
    if failback.get("status") != "succeeded":
        return 1
    home = core.orders(estate.url("primary"))
    checks["rows_home_after_failback"] = last in home and back in home
    checks["recovery_down_after_failback"] = not core.answers(estate.url("recovery"))
    ok = all(v for k, v in checks.items() if k not in ("drill_left", "row_before_failover"))
    return 0 if ok else 1


def _guests_protected(core: Any, estate: Any, view: View, summary: dict[str, Any], cycles: int) -> dict[str, int]:
    """The QEMU demo's protection: boot the guests, the initial copy, then delta cycles while they write,
    each point read back from the replica: a clean prefix of what the guests acknowledged before it, on
    every disk at one instant. Returns the records acknowledged before the last point (the drill's due)."""
    from siterecovery.testing.guest import Torn

    view.begin("workload", "booting the guests (minutes under TCG)")
    t0 = time.monotonic()
    first = estate.start_workload()
    accel = (estate.accel or "tcg").upper()
    view.end(f"db (vda, vdb) and app (vda) booted under {accel} in {time.monotonic() - t0:.0f} s and writing "
             f"records ({', '.join(f'{vm} ACK {n}' for vm, n in first.items())})")
    summary["accel"] = accel

    view.begin("protect", "initial replication")
    res = estate.initial_replication()
    view.end(f"{len(res)} guests replicating to recovery-host; initial copy {sum(r.bytes_sent for r in res) / 1024:.0f} KiB sent")

    view.begin("replicate")
    rows: list[dict[str, Any]] = summary.setdefault("cycles", [])
    clean_prefixes = True
    before: dict[str, int] = {}
    for i in range(cycles):
        time.sleep(1.0)  # let the guests write between points
        before = {vm: estate.acked(vm) for vm in estate.vms}
        t = time.monotonic()
        res = estate.cycle()
        row: dict[str, Any] = {"cycle": i + 1, "point": next((r.point.group or r.point.id for r in res if r.point), None),
                               "bytes": sum(r.bytes_sent for r in res), "seconds": round(time.monotonic() - t, 2),
                               "pause_seconds": {vm: estate.guest_pause(vm) for vm in estate.vms},
                               "acked_before": before, "replica_records": {}}
        for vm in estate.vms:
            try:
                held = estate.replica_records(vm)
            except Torn as exc:
                row["replica_records"][vm] = f"TORN: {exc}"
                clean_prefixes = False
                continue
            row["replica_records"][vm] = held
            n = list(held.values())
            # Each record goes to vda, then vdb: one instant holds vda equal to vdb or one ahead.
            clean_prefixes = clean_prefixes and min(n) >= before[vm] and max(n) - min(n) <= 1 and n[0] == max(n)
        rows.append(row)
        view.note(f"cycle {i + 1}/{cycles}: point {row['point']}, {row['bytes']} bytes, guest pause "
                  + ", ".join(f"{vm} {_ms(v)}" for vm, v in row["pause_seconds"].items()))
    summary["checks"]["every_point_a_clean_prefix_of_what_the_guests_acknowledged"] = clean_prefixes
    view.end(f"{cycles} crash-consistent delta cycles (both guests captured in one QMP window, one group point); "
             f"last: {rows[-1]['bytes']} bytes, replica {rows[-1]['replica_records']}, acknowledged before {before}")
    return before


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def _guests_through_prefect(core: Any, estate: Any, view: View, console: Console, before_point: dict[str, int],
                            summary: dict[str, Any]) -> int:
    """The shop demo's three runs with the QEMU guests; the plan's check-guests script (and the demo,
    from outside) judge each by what the guests say: a drill's test copies check their own records, a
    guest moved by a planned failover or failback goes on from the record after its last acknowledged."""
    from siterecovery.compile import RunOptions
    from siterecovery.model import Direction, FailoverType
    from siterecovery.testing.guest import resumed_from, self_check

    _quiet_console(view, estate.state / "demo.log")
    (estate.state / "expected.json").write_text(json.dumps(estate.guests_expectation(before_point)))
    run = _plan_runner(estate, view, summary)
    checks, moves = summary["checks"], summary.setdefault("moves", {})

    def tested() -> dict[str, Any]:
        return {vm: self_check(estate.run_dir(vm, "recovery") / "test.serial") for vm in estate.vms}

    def look() -> str:
        said = tested()
        return "; ".join(f"test copy of {vm}: " + (", ".join(f"{d} {'ok' if ok else 'BAD'} ({n} records)"
                                                              for d, (ok, n) in found.items()) if found else "still checking")
                         for vm, found in said.items()) + f" (acknowledged before the point: {before_point})"

    def point(out: dict[str, Any]) -> str:
        gp = (out.get("group_points") or {}).get("guests")
        return f", point {gp}" if gp else ""

    # 1. The drill: test copies of the latest group point boot at the recovery site with srmode=check.
    approver = _Approver(console, look)
    approver.start()
    try:
        drill = run("1 drill (test failover)", point, failover_type=FailoverType.test)
    finally:
        approver.halt()
    found = tested()
    moves["drill"] = {vm: f for vm, f in found.items()}
    checks["drill_test_copies_found_their_records_whole"] = all(
        f and all(ok for ok, _ in f.values()) and min(n for _, n in f.values()) >= before_point[vm] for vm, f in found.items())
    checks["drill_from_one_group_point"] = bool((drill.get("group_points") or {}).get("guests"))
    left = core.drill_leftovers(estate.state, None)
    checks["drill_left_nothing"] = not left
    checks["drill_left"] = left
    if drill.get("status") != "succeeded" or left:
        return 1

    def went_on(frm: str, to: str) -> tuple[bool, dict[str, Any]]:
        said = {vm: {f"last_acked_at_{frm}": estate.acked(vm, frm),
                     f"went_on_at_{to}_from": resumed_from(estate.run_dir(vm, to) / "vm.serial")} for vm in estate.vms}
        ok = all(v[f"went_on_at_{to}_from"] is not None
                 and v[f"last_acked_at_{frm}"] < v[f"went_on_at_{to}_from"] <= v[f"last_acked_at_{frm}"] + 2
                 for v in said.values())
        return ok, said

    def moved(frm: str, to: str) -> Any:
        def said(out: dict[str, Any]) -> str:
            _, what = went_on(frm, to)
            return point(out) + "; " + ", ".join(
                f"{vm} last ACK {v[f'last_acked_at_{frm}']} at {frm}, goes on from {v[f'went_on_at_{to}_from']} at {to}"
                for vm, v in what.items())
        return said

    # 2. Planned failover: the guests are shut down, their last writes travel, they boot at the recovery
    #    site and go on from the record after the last one they acknowledged.
    planned = run("2 planned failover", moved("primary", "recovery"), failover_type=FailoverType.planned,
                  confirm=estate.scenario.plan, options=RunOptions(reverse_replication=True))
    if planned.get("status") != "succeeded":
        return 1
    checks["failover_lost_nothing"], moves["failover"] = went_on("primary", "recovery")
    checks["primary_down_after_failover"] = not any(estate.running(vm, "primary") for vm in estate.vms)

    # 3. Failback: what the guests wrote at the recovery site comes home.
    core.wait_until("the guests to write at the recovery site",
                    lambda: all(estate.acked(vm, "recovery") >= (moves["failover"][vm]["went_on_at_recovery_from"] or 0) + 2
                                for vm in estate.vms), core.GUEST_BOOT)
    failback = run("3 failback", moved("recovery", "primary"), failover_type=FailoverType.planned,
                   direction=Direction.failback, confirm=estate.scenario.plan, options=RunOptions(reverse_replication=True))
    if failback.get("status") != "succeeded":
        return 1
    checks["failback_lost_nothing"], moves["failback"] = went_on("recovery", "primary")
    checks["recovery_down_after_failback"] = not any(estate.running(vm, "recovery") for vm in estate.vms)
    ok = all(v for k, v in checks.items() if k != "drill_left")
    return 0 if ok else 1


class _Approver(threading.Thread):
    """Plays the application owner: when the drill pauses for 'drill-sign-off', it looks at the test
    copies (`look` says what it saw), prints how a person would answer in the UI, and approves."""

    def __init__(self, console: Console, look: Callable[[], str]) -> None:
        super().__init__(daemon=True, name="demo-approver")
        self.console, self.look = console, look
        self.halted = threading.Event()
        self.resumed: list[str] = []

    def halt(self) -> None:
        self.halted.set()
        self.join(10)

    def run(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType
        from prefect.flow_runs import resume_flow_run

        from flows.approval import input_form_ready

        paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
        with get_client(sync_client=True) as client:
            while not self.halted.wait(0.5):
                for fr in client.read_flow_runs(flow_run_filter=paused):
                    if str(fr.id) in self.resumed or not input_form_ready(client, fr):
                        continue
                    self.approve(fr, resume_flow_run)

    def approve(self, fr: Any, resume: Any) -> None:
        comment = self.look()
        fid = str(fr.id)
        self.console.print(
            f"[bold]manual action[/] 'drill-sign-off' paused flow run [cyan]{fr.name}[/] ({fid}).\n"
            f"  A person answers it in the Prefect UI: Runs → {fr.name} → Resume, and fills the form "
            "(approved, approver, comment, ticket);\n"
            f"  or from Python: resume_flow_run('{fid}', run_input={{'approved': True, 'approver': 'you'}}).\n"
            f"  The demo approves as {APPROVER}: {comment}")
        resume(fr.id, run_input={"approved": True, "approver": APPROVER, "comment": comment, "ticket": "DEMO-1"})
        self.resumed.append(fid)


def _quiet_console(view: View, log_path: Path) -> None:
    """Prefect's console handler would scroll the view away: warnings only there, everything in the
    demo log, and the run-log lines as the view's detail."""
    root = logging.getLogger()
    for h in root.handlers:
        if type(h).__name__ == "PrefectConsoleHandler":
            h.setLevel(logging.WARNING)
    fh = logging.FileHandler(log_path)
    fh.setLevel(logging.INFO)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(fh)
    root.addHandler(_ToView(view))


def _close_prefect() -> None:
    """Close cached fabric drivers (their SSH sessions) before the sshd stops, then the demo's server."""
    mod = sys.modules.get("tasks.fabric")
    if mod is not None:
        mod.close_all()
    handlers = sys.modules.get("prefect.logging.handlers")
    if handlers is not None and _servers:
        handlers.APILogHandler().flush()  # the runs' last log lines, while the demo's server still answers
    while _servers:
        _servers.pop().stop()


def _s(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f} s"


def _print_summary(console: Console, s: dict[str, Any]) -> None:
    console.print()
    t = Table(title="runs", title_justify="left")
    for col in ("run", "status", "achieved RPO", "achieved RTO", "waiting for people", "took"):
        t.add_column(col)
    for r in s["runs"]:
        t.add_row(r["phase"], r.get("status", "?"), _s(r.get("achieved_rpo_seconds")), _s(r.get("achieved_rto_seconds")),
                  _s(r.get("people_seconds")), _s(r.get("seconds")))
    console.print(t)
    if s.get("cycles"):
        c = Table(title="replication cycles while the guests wrote", title_justify="left")
        for col in ("cycle", "point", "bytes shipped", "took", "guest pause", "acknowledged before", "replica holds"):
            c.add_column(col)
        for row in s["cycles"]:
            c.add_row(str(row["cycle"]), str(row["point"]), str(row["bytes"]), f"{row['seconds']} s",
                      ", ".join(f"{vm} {_ms(v)}" for vm, v in row["pause_seconds"].items()),
                      ", ".join(f"{vm} {n}" for vm, n in row["acked_before"].items()),
                      "; ".join(f"{vm} {held}" for vm, held in row["replica_records"].items()))
        console.print(c)
    for what, said in (s.get("moves") or {}).items():
        console.print(f"  {what}: {said}", soft_wrap=True)
    for r in s["runs"]:
        if r.get("report"):
            console.print(f"  report {r['phase']}: {r['report']}", soft_wrap=True)
    for k, v in s["checks"].items():
        if isinstance(v, bool):
            console.print(f"  {'[green]✓[/]' if v else '[red]✗[/]'} {k.replace('_', ' ')}")
    p = s.get("prefect")
    if p:
        plan = s.get("plan", "shop")
        console.print(f"Prefect: {p['mode']} (ready in {p['startup_seconds']} s). Artifacts 'drill-{plan}' and "
                      f"'failover-{plan}' (report per run) are in the database under {p['home']}: "
                      "see them with `prefect server start` → Artifacts, or `prefect artifact ls`.")
    console.print(f"summary: {s['state']}/summary.json   log: {s['state']}/demo.log", soft_wrap=True)
    if s.get("error"):
        console.print(f"[red]error:[/] {s['error']}")
    console.print(f"[bold {'green' if s['ok'] else 'red'}]demo {'passed' if s['ok'] else 'FAILED'}[/] in {s['seconds']} s")
