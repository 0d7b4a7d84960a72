"""Manual actions against a real Prefect server: the flow runs in its own process and pauses; a separate
client process finds the paused run and resumes it with input (approve, reject) or lets it time out.
The three runs share one server and go side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from siterecovery.fabric import FabricContext
from siterecovery.fabric.memory import MemoryFabric
from siterecovery.testing.prefect_server import PrefectServer
from siterecovery.testing.projects import memory_project, seed_memory

pytestmark = pytest.mark.prefect_server
REPO = Path(__file__).resolve().parents[2]


def gated(timeout: int, name: str = "gated") -> dict[str, object]:
    return {"name": name, "version": "2", "groups": [
        {"name": "db", "vms": ["db-1"]},
        {"name": "web", "vms": ["web-1"], "before": [{
            "type": "manual", "name": "go-web", "instructions": "Check the **db** tier answers.",
            "approver_group": "web-oncall", "timeout_seconds": timeout}]}]}


FLOW = textwrap.dedent("""
    import json, sys
    from flows.recovery_plan import PlanFailed, recovery_plan
    try:
        out = recovery_plan(plan=sys.argv[2] if len(sys.argv) > 2 else "gated", project=sys.argv[1])
    except PlanFailed as exc:
        out = exc.summary
    print("SUMMARY " + json.dumps(out, default=str))
""")

RESUME = textwrap.dedent("""
    import json, sys, time
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run
    from flows.approval import input_form_ready
    project, answer = sys.argv[1], json.loads(sys.argv[2])
    deadline = time.time() + 90
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            mine = [r for r in runs if r.parameters.get("project") == project and input_form_ready(client, r)]
            if mine:
                run = mine[0]
                print("PAUSED", run.id, run.state.state_details.pause_key, flush=True)
                resume_flow_run(run.id, run_input=answer)
                sys.exit(0)
            time.sleep(0.5)
    sys.exit("no paused run found")
""")


def _env(server: PrefectServer, state: Path) -> dict[str, str]:
    env = server.env()
    env.update({"PYTHONPATH": str(REPO), "SITERECOVERY_STATE": str(state), "PREFECT_LOGGING_LEVEL": "WARNING"})
    return env


def test_manual_action_approved_rejected_timed_out(server: PrefectServer, tmp_path: Path) -> None:
    cases = {
        "approved": (120, {"approved": True, "approver": "alice", "comment": "db answers", "ticket": "CHG-42"}),
        "rejected": (120, {"approved": False, "approver": "bob", "comment": "db is not up", "ticket": "INC-7"}),
        "timed_out": (4, None),
    }
    procs = {}
    for name, (timeout, _) in cases.items():
        # A plan of its own per case: one live run per plan (the three run at once on one server).
        plan = f"gated-{name.replace('_', '-')}"
        root = memory_project(tmp_path / name / "project", [gated(timeout, plan)])
        state = tmp_path / name / "state"
        seed_memory(root, plan, state / "memory-fabric.json")
        procs[name] = (root, state, subprocess.Popen([sys.executable, "-c", FLOW, str(root), plan], env=_env(server, state),
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    resumers = {}
    for name, (_, answer) in cases.items():
        if answer is not None:
            root, state, _ = procs[name]
            resumers[name] = subprocess.run([sys.executable, "-c", RESUME, str(root), json.dumps(answer)],
                                            env=_env(server, state), capture_output=True, text=True, timeout=150)
    results = {}
    for name, (_, _, proc) in procs.items():
        out, err = proc.communicate(timeout=150)
        line = next((x for x in out.splitlines() if x.startswith("SUMMARY ")), None)
        assert line, f"{name}: no summary\n{out}\n{err[-3000:]}"
        results[name] = json.loads(line[len("SUMMARY "):])
    for name, r in resumers.items():
        assert r.returncode == 0, f"{name}: {r.stdout}\n{r.stderr[-2000:]}"
        assert "approve-02-web-before-go-web" in r.stdout  # the pause key is stable per step

    ok = results["approved"]
    assert ok["status"] == "succeeded"
    [appr] = ok["approvals"]
    assert (appr["decision"], appr["approver"], appr["comment"], appr["ticket"]) == ("approved", "alice", "db answers",
                                                                                     "CHG-42")
    assert ok["people_seconds"] > 0
    no = results["rejected"]
    assert no["status"] == "stopped" and no["approvals"][0]["decision"] == "rejected"
    assert no["approvals"][0]["approver"] == "bob" and any("rejected by bob" in f for f in no["failures"])
    late = results["timed_out"]
    assert late["status"] == "stopped" and late["approvals"][0]["decision"] == "timed_out"
    assert 3.5 < late["people_seconds"] < 30

    for name in ("rejected", "timed_out"):
        root, state, _ = procs[name]
        fab = MemoryFabric(FabricContext(options={"state_file": str(state / "memory-fabric.json")}))
        # the plan stopped before the web group, and the drill was still cleaned up
        assert not [c for c in fab.all_calls() if c[2] == "web-1" and c[1] == "test_failover"]
        assert not fab.vm_state("db-1")["test_active"]
        assert [c for c in fab.all_calls() if c[1] == "cleanup_test_failover" and c[2] == "db-1"]
        html = Path(results[name]["report"]).read_text()
        assert "waiting on people" in html


def test_cli_run_guard_and_dry_run(server: PrefectServer, tmp_path: Path) -> None:
    root = memory_project(tmp_path / "project", [{"name": "app", "groups": [{"name": "g", "vms": ["vm-1", "vm-2"]}]}])
    state = tmp_path / "state"
    seed_memory(root, "app", state / "memory-fabric.json")
    env = _env(server, state)
    exe = str(Path(sys.executable).with_name("siterecovery"))
    refused = subprocess.run([exe, "run", "app", "--project", str(root), "--type", "planned"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--confirm app" in refused.stderr + refused.stdout
    assert not (state / "reports").exists()
    done = subprocess.run([exe, "run", "app", "--project", str(root), "--type", "test", "--fabric", "memory"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "succeeded" in done.stdout and "report:" in done.stdout
    assert os.path.exists(done.stdout.split("report:")[1].split()[0])
