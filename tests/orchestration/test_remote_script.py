"""Plan scripts that run on a host over SSH (`host:` on a script action), against the suite's real sshd."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sshd import SSHServer

from siterecovery.errors import HostKeyError, ScriptError
from tasks.remote import run_remote

pytestmark = pytest.mark.sshd


def _script(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie waiting for its parent counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_arguments_environment_and_exit_status(sshd_server: SSHServer, tmp_path: Path) -> None:
    s = _script(tmp_path, "show.sh", 'for a in "$@"; do printf "<%s>\\n" "$a"; done; echo "vm=$SITERECOVERY_VM" >&2; exit 3\n')
    hostile = ["a b", "$(touch /tmp/sr-pwned)", "'; rm -rf /", "--x=`id`", "ünï"]
    rc, out, err = run_remote(sshd_server.host(), s, hostile, {"SITERECOVERY_VM": "web 1"}, timeout=30)
    assert rc == 3
    assert out.decode().splitlines() == [f"<{a}>" for a in hostile]
    assert err.decode().strip() == "vm=web 1"
    assert not Path("/tmp/sr-pwned").exists()


def test_the_copied_script_is_removed(sshd_server: SSHServer, tmp_path: Path) -> None:
    s = _script(tmp_path, "where.sh", 'echo "$0"\n')
    rc, out, _ = run_remote(sshd_server.host(), s, [], {}, timeout=30)
    remote = out.decode().strip()
    assert rc == 0 and remote.startswith("/tmp/siterecovery-") and remote.endswith("-where.sh")
    assert not Path(remote).exists()


def test_timeout_is_total_and_kills_what_the_script_started(sshd_server: SSHServer, tmp_path: Path) -> None:
    # Output every 0.2 s: a per-read timeout would never fire. A background child must die with it.
    pidfile = tmp_path / "child.pid"
    s = _script(tmp_path, "chatty.sh", f'sleep 300 & echo $! > {pidfile}\nwhile true; do echo tick; sleep 0.2; done\n')
    t0 = time.monotonic()
    with pytest.raises(ScriptError, match="timed out after 2 s on h1") as e:
        run_remote(sshd_server.host(), s, [], {}, timeout=2)
    took = time.monotonic() - t0
    assert took < 60, took  # the script never ends by itself: only a total deadline stops it
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the script's background child outlived the timeout"
    assert e.value.host == "h1" and e.value.operation == "run_script"


def test_a_script_exiting_124_early_is_not_a_timeout(sshd_server: SSHServer, tmp_path: Path) -> None:
    s = _script(tmp_path, "early.sh", "exit 124\n")
    rc, _, _ = run_remote(sshd_server.host(), s, [], {}, timeout=60)
    assert rc == 124


def test_unknown_host_key_refused_before_anything_runs(sshd_server: SSHServer, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    s = _script(tmp_path, "touch.sh", f"touch {marker}\n")
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError):
        run_remote(sshd_server.host(host_key=None, known_hosts=str(empty)), s, [], {}, timeout=30)
    assert not marker.exists()


@pytest.mark.usefixtures("prefect_harness")
def test_a_plan_runs_its_script_on_the_recovery_host(estate, sshd_server: SSHServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Through the recovery-plan flow: the script action names a host, which the topology points at sshd."""
    import json

    import yaml

    from flows.recovery_plan import PlanFailed, recovery_plan

    out = tmp_path / "ran-on-host"
    script = tmp_path / "project" / "check.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(f'#!/bin/sh\necho "$SITERECOVERY_VM $1" >> {out}\n[ "$1" != fail ] || exit 7\n')
    script.chmod(0o755)
    plan = {"name": "app", "groups": [{"name": "one", "vms": ["vm-a"], "after": [
        {"type": "script", "name": "check", "path": "check.sh", "host": "dst-1", "per_vm": True,
         "args": ["{{ failover_type }}"]}]}]}
    e = estate([plan])
    topo = yaml.safe_load((e.root / "topology.yaml").read_text())
    for h in topo["hosts"]:
        if h["name"] == "dst-1":
            h.update(port=sshd_server.port, user=sshd_server.user, host_key=sshd_server.host_key,
                     credential={"key_file": str(sshd_server.client_key)})
    (e.root / "topology.yaml").write_text(yaml.safe_dump(topo, sort_keys=False))
    summary = recovery_plan(plan="app", project=str(e.root))
    assert summary["status"] == "succeeded"
    assert out.read_text() == "vm-a test\n"
    rep = json.loads(Path(summary["report"]).with_suffix(".json").read_text())
    assert [(s["host"], s["returncode"]) for s in rep["scripts"]] == [("dst-1", 0)]
    # a failing remote script stops the plan and the report names the host
    plan["groups"][0]["after"][0]["args"] = ["fail"]
    (e.root / "app.yaml").write_text(yaml.safe_dump({"kind": "RecoveryPlan", "source": "Prod", "target": "Recovery",
                                                     **plan}, sort_keys=False))
    with pytest.raises(PlanFailed) as exc:
        recovery_plan(plan="app", project=str(e.root))
    assert any("exited with 7" in f for f in exc.value.summary["failures"])  # type: ignore[attr-defined]
