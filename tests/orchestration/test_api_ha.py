"""Prefect's HA layout (docs/SCALE.md): two API server processes on one PostgreSQL and one Redis behind a
load balancer, one of them running the services, the other `--no-services`. A plan pauses for an
approval; the API-only process is SIGKILLed while it waits; the approval is given through the load
balancer, the run completes through the surviving process, and its state events (some sent through the
killed process), its approval and its concurrency slots are all still seen.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from siterecovery.testing import postgres
from siterecovery.testing.prefect_server import PrefectServer, free_port, redis_settings, server_env
from siterecovery.testing.projects import memory_project, seed_memory

pytestmark = [pytest.mark.prefect_server, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
REDIS = "/usr/bin/redis-server"

GATED = {"name": "gated", "version": "1", "groups": [
    {"name": "db", "vms": ["db-1"]},
    {"name": "web", "vms": ["web-1", "web-2", "web-3"], "before": [{
        "type": "manual", "name": "go-web", "instructions": "Check the db tier.", "approver_group": "web-oncall",
        "timeout_seconds": 600}]}]}

FLOW = textwrap.dedent("""
    import json, sys
    from flows.recovery_plan import PlanFailed, recovery_plan
    try:
        out = recovery_plan(plan="gated", project=sys.argv[1], failover_type="planned", confirm="gated",
                            fabric_options={"latency": {"failover": 1.0, "start_vm": 1.0}})
    except PlanFailed as exc:
        out = exc.summary
    print("SUMMARY " + json.dumps(out, default=str), flush=True)
""")


class Balancer:
    """A TCP load balancer on 127.0.0.1: each connection goes to the next backend that accepts it."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.connections = [0] * len(backends)
        self._next = 0
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        for _ in range(len(self.backends)):
            with self._lock:
                i = self._next
                self._next = (i + 1) % len(self.backends)
            try:
                upstream = socket.create_connection(self.backends[i], timeout=2)
            except OSError:
                continue  # a dead backend: the next one
            upstream.settimeout(None)
            with self._lock:
                self.connections[i] += 1
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
            self._pump(client, upstream)
            return
        client.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.sock.close()


@contextmanager
def running_redis() -> Iterator[int]:
    d = Path(tempfile.mkdtemp(prefix="sr-redis-"))
    port = free_port()
    with open(d / "redis.log", "wb") as log:
        proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(d)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(d / 'redis.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def _api(url: str) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def _wait(what: str, cond: Any, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_api_server_killed_while_a_plan_waits_for_approval(tmp_path: Path) -> None:
    why = postgres.available() or (None if os.path.exists(REDIS) else f"{REDIS} is missing (Debian redis-server)")
    if why:
        pytest.skip(why)
    pytest.importorskip("prefect_redis", reason="prefect-redis (the orchestration extra) is not installed")
    with ExitStack() as stack:
        redis_port = stack.enter_context(running_redis())
        cluster = stack.enter_context(postgres.scratch_cluster())
        shared = {"database_url": cluster.url, "extra_env": redis_settings("127.0.0.1", redis_port)}
        # The services process first: it runs the migrations.
        a = PrefectServer(tmp_path / "home-a", free_port(), **shared)  # type: ignore[arg-type]
        stack.callback(a.stop)
        a.start(timeout=300)
        b = PrefectServer(tmp_path / "home-b", free_port(), services=False, **shared)  # type: ignore[arg-type]
        stack.callback(b.stop)
        b.start(timeout=300)
        lb = Balancer([("127.0.0.1", a.port), ("127.0.0.1", b.port)])
        stack.callback(lb.close)
        api = f"http://127.0.0.1:{lb.port}/api"

        root = memory_project(tmp_path / "project", [GATED])
        state = tmp_path / "state"
        fab = seed_memory(root, "gated", state / "memory-fabric.json")
        env = server_env(tmp_path / "client-home", api) | {
            "PYTHONPATH": str(REPO), "SITERECOVERY_STATE": str(state), "PREFECT_LOGGING_LEVEL": "WARNING"}
        log = tmp_path / "flow.log"
        with open(log, "w") as err:
            flow = subprocess.Popen([sys.executable, "-c", FLOW, str(root)], env=env, stdout=subprocess.PIPE,
                                    stderr=err, text=True)
        stack.callback(lambda: flow.poll() is None and flow.kill())

        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType
        from prefect.flow_runs import resume_flow_run

        from flows.approval import input_form_ready

        def paused() -> Any:
            with _api(api) as client:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
                return next((r for r in runs if r.parameters.get("project") == str(root)
                             and input_form_ready(client, r)), None)

        run = _wait("the paused run", paused, 300)
        assert lb.connections[1] > 0, "nothing went through the API-only process before it was killed"
        os.killpg(b.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        b.process.wait(10)  # type: ignore[union-attr]
        assert not b.healthy() and a.healthy()

        with _api(api):
            resume_flow_run(run.id, run_input={"approved": True, "approver": "alice", "comment": "db answers",
                                               "ticket": "CHG-7"})

        # The web group's VM operations hold slots of the host and site limits while they run.
        held: dict[str, int] = {}

        def slots_seen() -> bool:
            with _api(api) as client:
                for lim in client.read_global_concurrency_limits(limit=200):
                    if lim.name.startswith("siterecovery-") and lim.active_slots:
                        held[lim.name] = lim.active_slots
            return bool(held) or flow.poll() is not None
        _wait("slots held by the web group", slots_seen, 120)

        out, _ = flow.communicate(timeout=300)
        line = next((x for x in out.splitlines() if x.startswith("SUMMARY ")), None)
        assert line, f"no summary (rc {flow.returncode})\n{out}\n{log.read_text()[-4000:]}"
        summary = json.loads(line[len("SUMMARY "):])
        assert summary["status"] == "succeeded", summary
        assert [(x["decision"], x["approver"], x["ticket"]) for x in summary["approvals"]] == [
            ("approved", "alice", "CHG-7")], summary
        assert held, "no concurrency slot was seen held during the web group"
        assert {f"web-{i}" for i in (1, 2, 3)} <= {c[2] for c in fab.all_calls() if c[1] == "start_vm"}

        with _api(api) as client:
            final = client.read_flow_run(run.id)
            assert final.state.is_completed(), final.state
            # The slots are free again, seen through the surviving process (the leases live in Redis).
            busy = {lim.name: lim.active_slots for lim in client.read_global_concurrency_limits(limit=200)
                    if lim.name in held and lim.active_slots}
            assert busy == {}, busy

        # The run's state events, whichever process received them, reached the database through Redis.
        import httpx

        def events() -> set[str]:
            r = httpx.post(f"{api}/events/filter", timeout=10, json={
                "filter": {"any_resource": {"id": [f"prefect.flow-run.{run.id}"]},
                           "event": {"prefix": ["prefect.flow-run."]}}, "limit": 50})
            r.raise_for_status()
            return {ev["event"] for ev in r.json()["events"]}
        wanted = {"prefect.flow-run.Running", "prefect.flow-run.Paused", "prefect.flow-run.Completed"}
        _wait(f"events {wanted}", lambda: wanted <= events(), 120)
