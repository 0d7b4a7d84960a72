"""`siterecovery ui up|down`: a local Prefect server, work pool, deployments and worker for operators.

Everything lives in the project's state directory (.siterecovery/): the server's PREFECT_HOME under
prefect/, its database in a private PostgreSQL 15 cluster under postgres/ (or, with
SITERECOVERY_DB=sqlite, an SQLite file under prefect/), logs and PID files under ui/. `down` stops
exactly the process groups `up` recorded, after checking each PID still belongs to the process that
was started (a PID can be reused), then the cluster. Drives the `prefect` CLI and PostgreSQL's tools
as subprocesses, so the core still never imports prefect.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .deployments import worker_queues
from .errors import ConfigurationError
from .testing.postgres import PostgresCluster
from .testing.prefect_server import PrefectServer, server_env

DEFAULT_PORT = 4200
# Flow processes send a heartbeat this often (Prefect's minimum is 30 s); the zombie-run automation marks
# a run Crashed after 90 s without one.
HEARTBEAT_SECONDS = 30
ZOMBIE_AUTOMATION = Path(__file__).parent / "templates" / "zombie-runs.automation.yaml"
# A run on a lost site's work queue is failed with the reason instead of waiting as Late for ever.
SITE_AUTOMATION = Path(__file__).parent / "templates" / "site-unreachable.automation.yaml"
AUTOMATIONS = {ZOMBIE_AUTOMATION: "a run without heartbeats for 90 s is marked Crashed",
               SITE_AUTOMATION: "a run no worker of its site takes within 120 s of being Late is marked Failed"}
# SITERECOVERY_DB picks the server's database: PostgreSQL (concurrent approvals, drills and workers
# without SQLite's "database is locked") or SQLite (nothing to install; `make demo`, one user).
DATABASES = ("postgres", "sqlite")
DEFAULT_DB = "postgres"
# Processes this process started and that outlive `up`: kept so they are not garbage-collected while
# running (Popen warns), and so `down` in the same process (tests) can reap them instead of leaving
# zombies.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Layout:
    state: Path

    @property
    def home(self) -> Path:
        return self.state / "prefect"

    @property
    def run(self) -> Path:
        return self.state / "ui"

    @property
    def postgres(self) -> PostgresCluster:
        return PostgresCluster(self.state / "postgres")

    def pidfile(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.run / f"{name}.log"


def prefect_exe() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat): with the PID, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    return stat[stat.rindex(")") + 2:].split()[19]


def record(pidfile: Path, pid: int) -> None:
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{pid} {_start_time(pid) or '?'}\n")


def recorded(pidfile: Path) -> int | None:
    """The PID in `pidfile` if that very process is still running; a stale file is removed."""
    try:
        pid_s, started = pidfile.read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    if _start_time(pid) != started:
        pidfile.unlink(missing_ok=True)
        return None
    return pid


def stop_group(pidfile: Path, grace: float = 20.0) -> bool:
    """SIGTERM the process group recorded in `pidfile`, SIGKILL it after `grace`; True if one ran."""
    return stop_groups([pidfile], grace)[0]


def stop_groups(pidfiles: list[Path], grace: float = 20.0) -> list[bool]:
    """stop_group for several groups at once: all get SIGTERM, then share one `grace` before SIGKILL, so
    workers that wait for their flow runs on SIGTERM (Prefect's graceful stop) cost one grace, not one
    each. Per pidfile: True if a group ran."""
    pids: dict[Path, int] = {}
    for pidfile in pidfiles:
        pid = recorded(pidfile)
        # Each process was started as the leader of its own session and group (start_new_session), so
        # the group holds it and its children (uvicorn, flow-run subprocesses) and nothing else.
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
                pids[pidfile] = pid
        if pidfile not in pids:
            pidfile.unlink(missing_ok=True)
    deadline = time.monotonic() + grace
    live = dict(pids)
    while live and time.monotonic() < deadline:
        for pidfile, pid in list(live.items()):
            _reap(pid)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                del live[pidfile]
        if live:
            time.sleep(0.2)
    for pid in live.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    for pidfile, pid in pids.items():
        child = _children.pop(pid, None)
        if child is not None:
            child.wait(10)
        pidfile.unlink(missing_ok=True)
    return [p in pids for p in pidfiles]


def _reap(pid: int) -> None:
    # When `up` and `down` run in one process (tests), the leader is our child: collect it so it
    # does not linger as a zombie that keeps its group alive.
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def _run(cmd: list[str], env: dict[str, str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise ConfigurationError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def database(db: str | None = None) -> str:
    """The database `up` uses: `db`, else $SITERECOVERY_DB, else PostgreSQL."""
    db = db or os.environ.get("SITERECOVERY_DB") or DEFAULT_DB
    if db not in DATABASES:
        raise ConfigurationError(f"SITERECOVERY_DB={db!r}: choose one of {', '.join(DATABASES)}")
    return db


def up(
    state: Path,
    root: Path,
    prefect_file: Path,
    pool: str = "siterecovery",
    port: int = DEFAULT_PORT,
    say: Callable[[str], None] = print,
    db: str | None = None,
) -> str:
    """Start (or reuse) the database and the server, create the pool, deploy, start (or reuse) the
    worker; return the UI URL."""
    lay = Layout(state.resolve())
    lay.run.mkdir(parents=True, exist_ok=True)
    db = database(db)
    database_url = None
    if db == "postgres":
        cluster = lay.postgres
        say(f"PostgreSQL 15 cluster in {cluster.dir} ...")
        cluster.start()
        database_url = cluster.url
        say(f"database {cluster.display_url}")
    server = PrefectServer(lay.home, port, database_url=database_url)
    running = recorded(lay.pidfile("server"))
    if running is not None and server.healthy():
        say(f"server already running at {server.url}")
    elif running is not None:
        # Starting a second one would overwrite its PID file and orphan it: `down` could not stop it.
        raise ConfigurationError(f"the server `ui up` started (pid {running}) is not answering on {server.url}: "
                                 "another --port, or still starting; run `siterecovery ui down` first")
    else:
        if server.healthy():
            raise ConfigurationError(f"something else already serves {server.url}; choose another --port")
        say(f"starting the Prefect server on {server.url} (database in {lay.home}) ...")
        server.start(log=lay.log("server"))
        assert server.process is not None
        _children[server.process.pid] = server.process
        record(lay.pidfile("server"), server.process.pid)
    env = server.env()
    # The flows keep their own state (memory fabric, reports) in the same state directory.
    env["SITERECOVERY_STATE"] = str(lay.state)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root.resolve()), env.get("PYTHONPATH", "")) if p)
    env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_SECONDS)
    exe = prefect_exe()
    if not any(recorded(lay.pidfile(w)) for w in _workers(lay)):  # a running worker: an earlier `up` made it
        ensure_automations(env, root, say)
    say(f"work pool {pool} (process)")
    _run([exe, "--no-prompt", "work-pool", "create", pool, "--type", "process", "--overwrite"], env, root,
         "creating the work pool")
    say(f"deploying {prefect_file}")
    _run([exe, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)], env, root, "prefect deploy")
    # One worker per work queue the deployments use: a worker per site (deployments.site_queue), all
    # on this machine here; in production each runs at its site (docs/SCALE.md).
    for queue in worker_queues(yaml.safe_load(prefect_file.read_text())):
        name = worker_name(queue)
        if recorded(lay.pidfile(name)) is not None:
            say(f"{name} already running")
            continue
        cmd = [exe, "worker", "start", "--pool", pool, "--type", "process"]
        if queue:
            cmd += ["--work-queue", queue, "--name", f"{name}@{socket.gethostname()}"]
        logf = open(lay.log(name), "ab")  # noqa: SIM115 - the worker outlives this process
        worker = subprocess.Popen(cmd, env=env, cwd=root, stdout=logf, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        logf.close()
        _children[worker.pid] = worker
        record(lay.pidfile(name), worker.pid)
        say(f"{name} started (log: {lay.log(name)})")
    return server.url


def ensure_automations(env: dict[str, str], root: Path, say: Callable[[str], None] = print) -> None:
    """Create the automations (templates/*.automation.yaml) the server does not have yet."""
    exe = prefect_exe()
    # A wide table: rich wraps long names at the default 80 columns.
    listed = subprocess.run([exe, "--no-prompt", "automation", "ls"], env={**env, "COLUMNS": "400"}, cwd=root,
                            capture_output=True, text=True, timeout=120)
    for path, what in AUTOMATIONS.items():
        name = yaml.safe_load(path.read_text())["name"]
        if name in listed.stdout:
            continue
        say(f"automation {name} ({what})")
        _run([exe, "--no-prompt", "automation", "create", "--from-file", str(path)], env, root,
             f"creating the automation {name}")


def worker_name(queue: str | None) -> str:
    """PID and log file name of the worker polling `queue`: worker-site-east, or worker (default queue)."""
    return f"worker-{queue}" if queue else "worker"


def _workers(lay: Layout) -> list[str]:
    return sorted(p.stem for p in lay.run.glob("worker*.pid"))


def down(state: Path, say: Callable[[str], None] = print, grace: float = 20.0) -> None:
    """Stop the workers, then the server: exactly the process groups `up` recorded; then the
    PostgreSQL cluster in the state directory, if one runs. A worker with a flow run in progress (a drill
    paused at its approval) waits for it on SIGTERM: after `grace` seconds it is killed with its runs,
    which the next run of their plan recovers (a dead run's report, its slots, its test VMs)."""
    lay = Layout(state.resolve())
    workers = _workers(lay)
    # All workers at once: each waits for its flow runs on SIGTERM, up to the grace.
    for name, ran in zip(workers, stop_groups([lay.pidfile(n) for n in workers], grace), strict=True):
        if ran:
            say(f"stopped the {name}")
    for name in ([] if workers else ["worker"]) + ["server"]:
        if stop_group(lay.pidfile(name), grace):
            say(f"stopped the {name}")
        else:
            say(f"no {name} running")
    if lay.postgres.initialized() and lay.postgres.stop():
        say("stopped PostgreSQL")


def status(state: Path) -> dict[str, int | None]:
    lay = Layout(state.resolve())
    out = {name: recorded(lay.pidfile(name)) for name in ["server", *(_workers(lay) or ["worker"])]}
    if lay.postgres.initialized():
        out["postgres"] = lay.postgres.pid()
    return out


__all__ = ["DEFAULT_PORT", "Layout", "down", "server_env", "status", "up"]
