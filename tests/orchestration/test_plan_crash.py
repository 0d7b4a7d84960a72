"""Process-level faults against the real Prefect server: the flow process SIGKILLed while a manual action
waits, and the Prefect server restarted while a run is busy. The killed run must not stay Paused or
Running for ever (the re-run marks it Crashed, with the reason), the re-run with the same intent must
finish without repeating a completed failover, and the report's audit trail must say who did what."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from siterecovery.testing.prefect_server import PrefectServer
from siterecovery.testing.projects import memory_project, seed_memory

pytestmark = pytest.mark.prefect_server
REPO = Path(__file__).resolve().parents[2]
OPS = ("prepare_planned_failover", "failover", "apply_network", "start_vm", "commit_failover")

GATED = {"name": "gated", "version": "3", "groups": [
    {"name": "db", "vms": ["db-1", "db-2"]},
    {"name": "web", "vms": ["web-1"], "before": [{
        "type": "manual", "name": "go-web", "instructions": "Check the db tier.", "approver_group": "web-oncall",
        "timeout_seconds": 600}]}]}

FLOW = textwrap.dedent("""
    import json, sys
    from flows.recovery_plan import PlanFailed, recovery_plan
    try:
        out = recovery_plan(plan=sys.argv[2], project=sys.argv[1], failover_type="planned", confirm=sys.argv[2],
                            fabric_options=json.loads(sys.argv[3]))
    except PlanFailed as exc:
        out = exc.summary
    print("SUMMARY " + json.dumps(out, default=str), flush=True)
""")


def _env(server: PrefectServer, state: Path) -> dict[str, str]:
    env = server.env()
    env.update({"PYTHONPATH": str(REPO), "SITERECOVERY_STATE": str(state), "PREFECT_LOGGING_LEVEL": "WARNING"})
    return env


def _start(server: PrefectServer, root: Path, state: Path, plan: str, log: Path,
           fabric_options: dict[str, Any] | None = None) -> subprocess.Popen[str]:
    with open(log, "w") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-c", FLOW, str(root), plan, json.dumps(fabric_options or {})],
                                env=_env(server, state), stdout=subprocess.PIPE, stderr=err, text=True)


def _summary(proc: subprocess.Popen[str], log: Path, timeout: float = 240) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    line = next((x for x in out.splitlines() if x.startswith("SUMMARY ")), None)
    assert line, f"no summary (rc {proc.returncode})\n{out}\n{log.read_text()[-4000:]}"
    return json.loads(line[len("SUMMARY "):])  # type: ignore[no-any-return]


@contextmanager
def _api(server: PrefectServer) -> Iterator[None]:
    """Point this process's client at the real server. Setting PREFECT_API_URL is not enough: prefect
    reads its settings once, when another test module imported it first."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _runs(server: PrefectServer, project: Path) -> list[Any]:
    from prefect.client.orchestration import get_client

    with _api(server), get_client(sync_client=True) as client:
        return [r for r in client.read_flow_runs() if r.parameters.get("project") == str(project)]


def _wait(what: str, cond: Any, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_killed_while_approval_waits_then_rerun(server: PrefectServer, tmp_path: Path) -> None:
    root = memory_project(tmp_path / "project", [GATED])
    state = tmp_path / "state"
    fab = seed_memory(root, "gated", state / "memory-fabric.json")
    first = _start(server, root, state, "gated", tmp_path / "first.log")
    try:
        paused = _wait("the first run to pause", lambda: [r for r in _runs(server, root) if r.state.type.value == "PAUSED"])
    finally:
        first.send_signal(signal.SIGKILL)  # a worker lost while a person is deciding
        first.wait(30)
        if first.stdout is not None:
            first.stdout.close()
    killed = paused[0].id
    # The db group was failed over and started before the pause.
    assert sorted(c[2] for c in fab.all_calls() if c[1] == "start_vm") == ["db-1", "db-2"]
    assert next(r for r in _runs(server, root) if r.id == killed).state.type.value == "PAUSED"  # nobody closes it

    second = _start(server, root, state, "gated", tmp_path / "second.log")
    try:
        new = _wait("the re-run to pause", lambda: [r for r in _runs(server, root)
                                                    if r.state.type.value == "PAUSED" and r.id != killed])
        from prefect.client.orchestration import get_client
        from prefect.flow_runs import resume_flow_run

        from flows.approval import input_form_ready

        with _api(server), get_client(sync_client=True) as client:
            _wait("the re-run's approval form", lambda: input_form_ready(client, client.read_flow_run(new[0].id)))
            resume_flow_run(new[0].id, run_input={"approved": True, "approver": "carol", "comment": "db ok",
                                                  "ticket": "CHG-9"})
        s = _summary(second, tmp_path / "second.log")
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(30)
    assert s["status"] == "succeeded" and s["resumed"], s
    # The killed run ends in a clear state, with the reason, instead of staying Paused for ever.
    old = next(r for r in _runs(server, root) if r.id == killed)
    assert old.state.type.value == "CRASHED" and "took over" in (old.state.message or ""), old.state
    # Nothing completed was repeated; the web group ran once, after the approval.
    for vm in ("db-1", "db-2", "web-1"):
        for op in OPS:
            assert len([c for c in fab.all_calls() if c[1] == op and c[2] == vm]) == 1, (op, vm)

    rep = json.loads(Path(s["report"]).with_suffix(".json").read_text())
    assert rep["superseded"] and str(killed) in rep["superseded"][0]
    audit = rep["audit"]
    db = [a for a in audit if a["kind"] == "fabric" and a["action"] == "failover" and a["target"].startswith("db-")]
    # Done by the killed run: attributed to it, by the OS user that ran it.
    assert len(db) == 2 and all(a["flow_run"] == str(killed) and a["outcome"].startswith("cached") for a in db)
    assert all(a["who"] for a in audit)
    web = [a for a in audit if a["kind"] == "fabric" and a["action"] == "commit_failover" and "web-1" in a["target"]]
    assert len(web) == 1 and web[0]["flow_run"] == str(new[0].id) and web[0]["outcome"] == "completed"
    [appr] = [a for a in audit if a["kind"] == "approval"]
    assert (appr["who"], appr["outcome"]) == ("carol", "approved, ticket CHG-9") and "web-oncall" in appr["target"]
    assert [a for a in audit if a["kind"] == "run" and str(killed) in a["target"]]
    html = Path(s["report"]).read_text()
    assert "<h2>Audit</h2>" in html and "carol" in html and "Earlier runs taken over" in html


def test_a_live_run_of_the_same_intent_is_refused(server: PrefectServer, tmp_path: Path) -> None:
    """Two processes must never run one intent at once (both would fail the same VMs over)."""
    root = memory_project(tmp_path / "project", [GATED])
    state = tmp_path / "state"
    fab = seed_memory(root, "gated", state / "memory-fabric.json")
    first = _start(server, root, state, "gated", tmp_path / "first.log")
    try:
        _wait("the first run to pause", lambda: [r for r in _runs(server, root) if r.state.type.value == "PAUSED"])
        before = len(fab.all_calls())
        second = subprocess.run([sys.executable, "-c", FLOW, str(root), "gated", "{}"], env=_env(server, state),
                                capture_output=True, text=True, timeout=240)
        assert "is being run right now by a live process" in second.stderr, second.stderr[-3000:]
        assert len(fab.all_calls()) == before
    finally:
        first.kill()
        first.communicate(timeout=30)


@pytest.mark.slow
def test_server_restarted_during_a_run(server: PrefectServer, tmp_path: Path) -> None:
    """Stop the Prefect server in the middle of a slow run and start it again (same port and home)."""
    plan = {"name": "slow", "groups": [{"name": f"g{i}", "vms": [f"vm-{i}"]} for i in range(6)]}
    root = memory_project(tmp_path / "project", [plan])
    state = tmp_path / "state"
    fab = seed_memory(root, "slow", state / "memory-fabric.json")
    opts = {"latency": {"failover": 1.0, "start_vm": 0.5}}
    log = tmp_path / "first.log"
    first = _start(server, root, state, "slow", log, opts)
    try:
        _wait("the second group", lambda: [c for c in fab.all_calls() if c[1] == "failover" and c[2] == "vm-1"])
        server.stop()
        time.sleep(3)
        server.start(timeout=180)
        out, _ = first.communicate(timeout=400)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
    line = next((x for x in out.splitlines() if x.startswith("SUMMARY ")), None)
    if line is None or json.loads(line[8:])["status"] != "succeeded":
        # It did not ride it out: it must have ended clearly (a non-zero exit with the reason), and the
        # re-run with the same intent must finish the job.
        assert first.returncode != 0 or line is not None, log.read_text()[-3000:]
        before = {vm for (_, op, vm, _) in fab.all_calls() if op == "commit_failover"}
        again = _summary(_start(server, root, state, "slow", tmp_path / "again.log", opts), tmp_path / "again.log")
        assert again["status"] == "succeeded" and again["resumed"], again
        after = [vm for (_, op, vm, _) in fab.all_calls() if op == "commit_failover"]
        assert len(after) == len(set(after)) and before <= set(after)
    for i in range(6):
        assert len([c for c in fab.all_calls() if c[1] == "failover" and c[2] == f"vm-{i}"]) == 1, i
        assert fab.vm_state(f"vm-{i}")["state"] == "FailedOver"
