"""Concurrency slots of a run that was SIGKILLed: the next run releases them at once (the lease ledger)
instead of waiting for the server to expire the dead run's lease. Against a real Prefect server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from test_plan_crash import REPO, _api, _env, _wait

from siterecovery.testing.prefect_server import PrefectServer
from siterecovery.testing.projects import memory_project, seed_memory

pytestmark = pytest.mark.prefect_server

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tasks.limits import Reservation
    r = Reservation("killed-run:slots", {sys.argv[1]: 1}, Path(sys.argv[2]))
    r.cover({sys.argv[1]: 1})
    print("held", flush=True)
    time.sleep(600)
""")


def test_reclaim_releases_only_the_dead_holders_lease(server: PrefectServer, tmp_path: Path) -> None:
    from prefect.concurrency.sync import concurrency

    from tasks.limits import ensure_limits, reclaim_abandoned

    name = f"siterecovery-host-lease-{uuid.uuid4().hex[:8]}"
    ledger = tmp_path / "leases"
    with _api(server):
        assert ensure_limits({name: 1}) == {name: 1}
        p = subprocess.Popen([sys.executable, "-c", HOLDER, name, str(ledger)], env=_env(server, tmp_path),
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "held"
            assert reclaim_abandoned(ledger) == []  # a live holder is left alone
            assert len(list(ledger.glob("*.json"))) == 1
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        # the premise: the dead process's lease still occupies the only slot
        with pytest.raises(TimeoutError), concurrency(name, occupy=1, timeout_seconds=3, strict=True):
            pass
        gone = reclaim_abandoned(ledger)
        assert [(g["names"], g["pid"]) for g in gone] == [([name], p.pid)]
        assert list(ledger.glob("*.json")) == []
        with concurrency(name, occupy=1, timeout_seconds=60, strict=True):
            pass  # free again, long before the 300 s lease would have expired


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:  # a lease released between the listing and the read
        return ""


FLOW = textwrap.dedent("""
    import json, sys
    from flows.recovery_plan import PlanFailed, recovery_plan
    try:
        out = recovery_plan(plan="two", project=sys.argv[1], failover_type="planned", confirm="two",
                            fabric_options=json.loads(sys.argv[2]), host_limit=2)
    except PlanFailed as exc:
        out = exc.summary
    print("SUMMARY " + json.dumps(out, default=str), flush=True)
""")


def test_rerun_after_a_kill_mid_batch_takes_the_dead_runs_slots_back(server: PrefectServer, tmp_path: Path) -> None:
    from tasks.limits import DEFAULT_HOST_LIMIT, ensure_limits, limit_name

    plan = {"name": "two", "version": "1", "groups": [{"name": "g", "vms": ["a-1", "a-2"]}]}
    root = memory_project(tmp_path / "project", [plan], source_hosts=1, target_hosts=1)
    state = tmp_path / "state"
    seed_memory(root, "two", state / "memory-fabric.json")
    ledger = state / "leases"
    log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"
    try:
        with open(log1, "w") as err:
            first = subprocess.Popen([sys.executable, "-c", FLOW, str(root), json.dumps({"latency": {"failover": 600}})],
                                     env=_env(server, state), stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        try:
            # the run takes its plan's slot first, then the hosts' slots in the batch: kill it once it holds those
            host = limit_name("host", "dst-1")
            _wait("the first run to hold its host slots",
                  lambda: any(host in _text(f) for f in ledger.glob("*.json")))
        finally:
            first.kill()
            first.wait()
        with open(log2, "w") as err:
            second = subprocess.run([sys.executable, "-c", FLOW, str(root), "{}"], env=_env(server, state),
                                    stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, timeout=240)
        line = next((x for x in second.stdout.splitlines() if x.startswith("SUMMARY ")), None)
        assert line, log2.read_text()[-3000:]
        assert json.loads(line[len("SUMMARY "):])["status"] == "succeeded"
        text = log2.read_text()
        assert "held by a dead run" in text and limit_name("host", "dst-1") in text, text[-3000:]
        assert list(ledger.glob("*.json")) == []
    finally:
        with _api(server):  # other tests on this server share the host limits by name
            ensure_limits({limit_name("host", h): DEFAULT_HOST_LIMIT for h in ("src-1", "dst-1")})


def _active(server: PrefectServer, name: str) -> int:
    from prefect.client.orchestration import get_client

    with _api(server), get_client(sync_client=True) as client:
        try:
            return int(client.read_global_concurrency_limit_by_name(name).active_slots)
        except Exception:  # noqa: BLE001 - not created yet
            return 0


REPLICATE = textwrap.dedent("""
    import json, sys, time
    if sys.argv[2] == "hang":  # a transfer that never ends, until the process is killed
        from siterecovery.fabric.memory import MemoryFabric
        MemoryFabric.replicate = lambda self, *a, **k: time.sleep(600)
    from flows.protection import replicate
    out = replicate(pairing="prod", project=sys.argv[1])
    print("CYCLES " + json.dumps([r.model_dump(mode="json") for r in out]), flush=True)
""")


def test_a_replicate_killed_mid_transfer_frees_its_transfer_slot_at_the_next_run(
        server: PrefectServer, tmp_path: Path) -> None:
    """The protection flows' transfer slots are leased through the same ledger as a plan's: a replicate
    SIGKILLed mid-transfer no longer holds its host's only transfer slot until the lease expires."""
    import yaml

    from tasks.limits import ensure_limits
    from tasks.protection import host_limit_name

    plan = {"name": "one", "groups": [{"name": "g", "vms": ["a-1"]}]}
    root = memory_project(tmp_path / "project", [plan], source_hosts=1, target_hosts=1)
    topo = yaml.safe_load((root / "topology.yaml").read_text())
    for h in topo["hosts"]:
        h["max_active_transfers"] = 1  # one slot: a leaked one blocks every later transfer
    (root / "topology.yaml").write_text(yaml.safe_dump(topo, sort_keys=False))
    state = tmp_path / "state"
    seed_memory(root, "one", state / "memory-fabric.json")
    ledger, name = state / "leases", host_limit_name("src-1")
    try:
        with open(tmp_path / "run1.log", "w") as err:
            first = subprocess.Popen([sys.executable, "-c", REPLICATE, str(root), "hang"], env=_env(server, state),
                                     stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        try:
            _wait("the first replicate to hold its transfer slot", lambda: _active(server, name) == 1)
        finally:
            first.kill()
            first.wait()
        with open(tmp_path / "run2.log", "w") as err:
            second = subprocess.run([sys.executable, "-c", REPLICATE, str(root), "-"], env=_env(server, state),
                                    stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, timeout=150)
        text = (tmp_path / "run2.log").read_text()
        line = next((x for x in second.stdout.splitlines() if x.startswith("CYCLES ")), None)
        assert line, text[-3000:]
        assert [(r["vm"], r["action"]) for r in json.loads(line[len("CYCLES "):])] == [("a-1", "cycle")], line
        assert "held by a dead run" in text and name in text, text[-3000:]
        assert list(ledger.glob("*.json")) == []
    finally:
        with _api(server):  # the server is shared: give the host's transfer limit its default back
            ensure_limits({name: 3})
