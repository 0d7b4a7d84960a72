"""Concurrency without locks (docs/SCALE.md): on the shared PostgreSQL-backed server, ten drills of
different plans run at once, five of them pause for an approval, and 20 approvals (four per paused run)
are submitted at the same instant over raw HTTP, as browsers do, without retries. No request may
answer 5xx, each paused run is resumed exactly once, every drill succeeds, and the server's log holds
no "database is locked"."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.testing import postgres
from siterecovery.testing.prefect_server import PrefectServer, running_server
from siterecovery.testing.projects import memory_project, seed_memory

pytestmark = [pytest.mark.prefect_server, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
DRILLS, GATED, PER_RUN = 10, 5, 4

FLOW = textwrap.dedent("""
    import json, sys
    from flows.recovery_plan import PlanFailed, recovery_plan
    try:
        out = recovery_plan(plan=sys.argv[2], project=sys.argv[1])
    except PlanFailed as exc:
        out = exc.summary
    print("SUMMARY " + json.dumps(out, default=str), flush=True)
""")


def _plan(i: int) -> dict[str, Any]:
    web: dict[str, Any] = {"name": "web", "vms": [f"web-{i}"]}
    if i < GATED:
        web["before"] = [{"type": "manual", "name": "go", "instructions": "Check the db tier.",
                          "approver_group": "oncall", "timeout_seconds": 300}]
    return {"name": f"d{i}", "groups": [{"name": "db", "vms": [f"db-{i}"]}, web]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server of this module's own on a private PostgreSQL cluster (the session's shared one
    runs on SQLite: tests/orchestration/conftest.py says why)."""
    if postgres.available() is not None:
        pytest.skip(f"no PostgreSQL 15 here: {postgres.available()}")
    with postgres.scratch_cluster() as pg, running_server(tmp_path_factory.mktemp("pg-home"),
                                                          database_url=pg.url) as srv:
        yield srv


SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tasks.fabric import result_storage
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together
    result_storage(Path(sys.argv[1]))
    print("saved", flush=True)
""")


def test_first_result_stores_saved_at_once_on_a_fresh_database(server: PrefectServer, tmp_path: Path) -> None:
    """Runs it first in this module, on the fresh database: the first block saves race inside the server
    (tasks.fabric._save_block says how); every run must still get its result store."""
    env = server.env() | {"PYTHONPATH": str(REPO)}
    at = time.time() + 8  # past every process's import time
    procs = [subprocess.Popen([sys.executable, "-c", SAVE, str(tmp_path / f"state-{i}"), str(at)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o for o, _ in outs] == ["saved\n"] * len(procs), [e[-2000:] for _, e in outs if e]


def test_concurrent_drills_and_approvals_on_postgres(server: PrefectServer, tmp_path: Path) -> None:
    import httpx

    procs, roots = {}, set()
    for i in range(DRILLS):
        # One project and one estate per drill (one project has one estate: siterecovery.estate).
        root = memory_project(tmp_path / f"project-{i}", [_plan(i)])
        state = tmp_path / f"state-{i}"
        roots.add(str(root))
        seed_memory(root, f"d{i}", state / "memory-fabric.json")
        env = server.env() | {"PYTHONPATH": str(REPO), "SITERECOVERY_STATE": str(state),
                              "PREFECT_LOGGING_LEVEL": "WARNING"}
        with open(tmp_path / f"d{i}.log", "w") as err:
            procs[i] = subprocess.Popen([sys.executable, "-c", FLOW, str(root), f"d{i}"], env=env,
                                        stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        def paused() -> list[dict[str, Any]]:
            r = httpx.post(f"{server.api_url}/flow_runs/filter", timeout=30,
                           json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "limit": 50})
            r.raise_for_status()
            return [fr for fr in r.json() if fr["parameters"].get("project") in roots]

        deadline = time.monotonic() + 420
        while len(runs := paused()) < GATED:
            assert time.monotonic() < deadline, f"only {len(runs)} of {GATED} runs paused"
            time.sleep(1)

        answers: list[tuple[str, int, str]] = []
        lock = threading.Lock()
        barrier = threading.Barrier(GATED * PER_RUN)

        def resume(run_id: str, n: int) -> None:
            body = {"run_input": {"approved": True, "approver": f"op{n}", "comment": "", "ticket": f"CHG-{n}"}}
            barrier.wait(30)
            r = httpx.post(f"{server.api_url}/flow_runs/{run_id}/resume", json=body, timeout=60)
            status = r.json().get("status", "") if r.status_code in (200, 201) else ""
            with lock:
                answers.append((run_id, r.status_code, status))

        threads = [threading.Thread(target=resume, args=(run["id"], k * PER_RUN + j))
                   for k, run in enumerate(runs) for j in range(PER_RUN)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(answers) == GATED * PER_RUN
        assert [a for a in answers if a[1] >= 500] == [], answers
        # Extra resumes of one run are refused (409, or 200 ABORT); exactly one was accepted (201 ACCEPT).
        for run in runs:
            accepted = [a for a in answers if a[0] == run["id"] and a[2] == "ACCEPT"]
            assert len(accepted) == 1, (run["id"], [a for a in answers if a[0] == run["id"]])

        results = {}
        for i, proc in procs.items():
            out, _ = proc.communicate(timeout=300)
            line = next((x for x in out.splitlines() if x.startswith("SUMMARY ")), None)
            assert line, f"d{i}: no summary\n{(tmp_path / f'd{i}.log').read_text()[-3000:]}"
            results[i] = json.loads(line[len("SUMMARY "):])
        assert {i: r["status"] for i, r in results.items()} == dict.fromkeys(range(DRILLS), "succeeded")
        assert all(len(results[i]["approvals"]) == 1 for i in range(GATED))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()  # also closes the pipe of one that already ended
    logs = [server.home / "server.log", *tmp_path.glob("d*.log")]
    locked = [str(p) for p in logs if p.exists() and "database is locked" in p.read_text(errors="replace")]
    assert locked == []
