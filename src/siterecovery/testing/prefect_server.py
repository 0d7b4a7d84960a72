"""Start and stop a real Prefect server on 127.0.0.1 as a subprocess, with its own PREFECT_HOME.

Anything interactive (pause and resume, deployments, schedules, the UI) is tested against a real
server, not the ephemeral one. Used by the test suite, `make ui` and the demo. Never imports prefect.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment for the server and for its clients: analytics off (it causes SQLite's
    `database is locked`), a private PREFECT_HOME, fast polling so tests do not wait 10 s."""
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": env.get("PREFECT_UI_ENABLED", "true"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": env.get("PREFECT_LOGGING_LEVEL", "INFO"),
    })
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@dataclass
class PrefectServer:
    home: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    logfile: Any = None
    # PREFECT_API_DATABASE_CONNECTION_URL (postgresql+asyncpg://...); None: SQLite in `home`. Holds a
    # password: it goes to the server's environment only, never to a log or a client.
    database_url: str | None = field(default=None, repr=False)
    # Where it listens, and a command prefix (e.g. ("ip", "netns", "exec", NS): a server in a network
    # namespace, reached from outside at `host`).
    host: str = "127.0.0.1"
    wrap: tuple[str, ...] = ()
    # False: `--no-services`, an API-only replica beside one that runs the services (docs/SCALE.md).
    services: bool = True
    # More server settings, e.g. redis_settings() for several API processes on one database.
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def env(self) -> dict[str, str]:
        return server_env(self.home, self.api_url)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:  # noqa: S310 - loopback only
                return r.status == 200 and json.loads(r.read() or b"false") is True
        except (OSError, ValueError):
            return False

    def start(self, timeout: float = 120.0, log: Path | None = None) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        logf = open(log or self.home / "server.log", "ab")  # noqa: SIM115 - closed once the child has it
        exe = Path(sys.executable).with_name("prefect")
        cmd = [*self.wrap, str(exe), "server", "start", "--host", self.host, "--port", str(self.port)]
        if not self.services:
            cmd.append("--no-services")
        env = server_env(self.home)
        # Without it the UI's JavaScript calls the default port (4200), not this server's.
        env["PREFECT_UI_API_URL"] = self.api_url
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        env.update(self.extra_env)
        self.process = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        # The child holds its own copy of the descriptor; ours would leak (a ResourceWarning, an error
        # under filterwarnings=error) when the server outlives this call, as `ui up` makes it.
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.process.returncode}; see {logf.name}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"prefect server not healthy after {timeout:.0f}s; see {logf.name}")

    def stop(self, grace: float = 15.0) -> None:
        try:
            self._stop(grace)
        finally:
            if self.logfile is not None:
                self.logfile.close()
                self.logfile = None

    def _stop(self, grace: float) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        # The server starts uvicorn and services in its own session: signal the whole group.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass


def redis_settings(host: str, port: int, db: int = 0) -> dict[str, str]:
    """Server settings that move the event broker, its cache, event ordering and concurrency leases from
    process memory to Redis (the `prefect-redis` package): what lets several API processes share one
    database. Without them events sent through one process never reach the others' services, and a
    lease lives only in the process that granted it."""
    return {
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": host,
        "PREFECT_REDIS_MESSAGING_PORT": str(port),
        "PREFECT_REDIS_MESSAGING_DB": str(db),
    }


@contextmanager
def running_server(home: Path, port: int | None = None, timeout: float = 120.0,
                   database_url: str | None = None) -> Iterator[PrefectServer]:
    """A real Prefect server for the duration of the block (on SQLite in `home` unless `database_url`)."""
    server = PrefectServer(home, port or free_port(), database_url=database_url).start(timeout)
    try:
        yield server
    finally:
        server.stop()
