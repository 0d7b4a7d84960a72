"""A private PostgreSQL 15 cluster for the Prefect server: `initdb` into a directory of ours, a private
port on 127.0.0.1, started and stopped with `pg_ctl`. No system service, no shared cluster.

Used by `siterecovery ui up|down` (the cluster lives in the state directory, under postgres/) and by the
tests' shared Prefect server. PostgreSQL refuses to run as root, so as root every PostgreSQL command runs
through `runuser -u postgres` (the account Debian's postgresql-15 package creates) and the cluster's
directory belongs to that user. Never imports prefect.

Layout of the cluster directory:
  data/          PGDATA
  run/           the Unix socket directory (not /var/run/postgresql: no clash with a system cluster)
  postgres.log   the server's log
  port           the port chosen on first start, reused afterwards
  password       the database owner's password (mode 0600); never printed
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigurationError

PG_BIN = Path(os.environ.get("SITERECOVERY_PG_BIN", "/usr/lib/postgresql/15/bin"))
# The account PostgreSQL runs as when we are root (initdb: "cannot be run as root").
RUN_AS = "postgres"
DB_USER = "siterecovery"
DB_NAME = "prefect"


def available() -> str | None:
    """None when a private cluster can start here, else why not (for a skip or an error message)."""
    if not (PG_BIN / "initdb").exists():
        return (f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing): Debian `apt-get install "
                "postgresql-15` (scripts/setup-system.sh), or use SQLite (SITERECOVERY_DB=sqlite)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"running as root and there is no '{RUN_AS}' user to run PostgreSQL as (it refuses root)"
        if not shutil.which("runuser"):
            return "running as root without `runuser` (util-linux) to run PostgreSQL as another user"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresCluster:
    dir: Path
    # A prefix for every PostgreSQL command, e.g. ("ip", "netns", "exec", NS) to run the cluster in a
    # network namespace (the site-loss test's orchestration site).
    wrap: tuple[str, ...] = ()

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def log(self) -> Path:
        return self.dir / "postgres.log"

    @property
    def port(self) -> int:
        return int((self.dir / "port").read_text())

    def _password(self) -> str:
        return (self.dir / "password").read_text().strip()

    @property
    def url(self) -> str:
        """SQLAlchemy URL for Prefect (PREFECT_API_DATABASE_CONNECTION_URL). Holds the password: never log it."""
        return f"postgresql+asyncpg://{DB_USER}:{self._password()}@127.0.0.1:{self.port}/{DB_NAME}"

    @property
    def display_url(self) -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return [*self.wrap, *(["runuser", "-u", RUN_AS, "--", *cmd] if os.geteuid() == 0 else cmd)]

    def _pg(self, tool: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
        cmd = self._as_owner([str(PG_BIN / tool), *args])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "LC_ALL": "C.UTF-8", **(env or {})})
        except subprocess.TimeoutExpired:
            raise ConfigurationError(f"PostgreSQL {tool} in {self.dir}: no answer after {timeout:.0f} s; "
                                     f"see {self.log}") from None
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip()[-2000:]
            raise ConfigurationError(f"PostgreSQL {tool} in {self.dir} failed (exit {proc.returncode}): {tail}")
        return proc.stdout

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam(RUN_AS)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def running(self) -> bool:
        """True when the postmaster recorded in data/postmaster.pid is alive (pg_ctl status)."""
        if not (self.data / "postmaster.pid").exists():
            return False
        cmd = self._as_owner([str(PG_BIN / "pg_ctl"), "status", "-D", str(self.data)])
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0]) if self.running() else None
        except (OSError, ValueError, IndexError):
            return None

    def init(self) -> None:
        why = available()
        if why:
            raise ConfigurationError(why)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self._own(self.dir)
        if os.geteuid() == 0:
            # The postgres user must be able to reach its directory through every parent.
            probe = subprocess.run(["runuser", "-u", RUN_AS, "--", "test", "-w", str(self.dir)],
                                   capture_output=True, timeout=30)
            if probe.returncode != 0:
                raise ConfigurationError(f"PostgreSQL runs as '{RUN_AS}', which cannot reach {self.dir}: a parent "
                                         "directory is not searchable by other users (chmod o+x it, or use "
                                         "another state directory)")
        pwfile = self.dir / "password"
        if not pwfile.exists():
            pwfile.touch(mode=0o600)
            pwfile.write_text(secrets.token_urlsafe(24) + "\n")
            self._own(pwfile)
        if not (self.dir / "port").exists():
            (self.dir / "port").write_text(f"{_free_port()}\n")
        run = self.dir / "run"
        run.mkdir(exist_ok=True)
        self._own(run)
        if self.initialized():
            return
        # scram for TCP (the Prefect server connects over 127.0.0.1 with the password), peer for the socket.
        self._pg("initdb", "-D", str(self.data), "-U", DB_USER, f"--pwfile={pwfile}", "-E", "UTF8",
                 "--auth-local=peer", "--auth-host=scram-sha-256", "--no-instructions")

    def start(self) -> PostgresCluster:
        """Initialize when needed, start when not running, create the database; idempotent."""
        self.init()
        if not self.running():
            opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir / 'run'} "
                    # Prefect's API, services and several workers hold pools of connections.
                    "-c max_connections=200")
            if not self.log.exists():
                self.log.touch()
                self._own(self.log)
            self._pg("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts)
        deadline = time.monotonic() + 60
        while True:
            try:
                dbs = self._psql("SELECT datname FROM pg_database")
                break
            except ConfigurationError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        if DB_NAME not in dbs.split():
            self._psql(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
        return self

    def query(self, sql: str, db: str = DB_NAME) -> list[str]:
        """Rows of `sql` in `db`, one string per row (fields joined by '|')."""
        return self._psql(sql, db).splitlines()

    def _psql(self, sql: str, db: str = "postgres") -> str:
        return self._pg("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, "-d", db,
                        "-X", "-A", "-t", "-c", sql, timeout=30, env={"PGPASSWORD": self._password(),
                                                                    "PGCONNECT_TIMEOUT": "10"})

    def stop(self, timeout: float = 60) -> bool:
        """Stop the cluster (fast shutdown: open sessions are cut); True if it was running."""
        if not self.running():
            return False
        self._pg("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(timeout)),
                 timeout=timeout + 10)
        return True

    def destroy(self) -> None:
        """Stop and remove the cluster directory (tests)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def reachable_tmpdir(prefix: str) -> Path:
    """A fresh directory under the system temporary directory that the postgres user can pass through
    (mode 0711), for a state directory holding a cluster in tests and benchmarks: pytest's own
    temporary directories are private to root, out of that user's reach. The caller removes it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


@contextmanager
def scratch_cluster() -> Iterator[PostgresCluster]:
    """A throw-away running cluster in a fresh directory (tests, benchmarks)."""
    cluster = PostgresCluster(reachable_tmpdir("siterecovery-pg-") / "postgres")
    try:
        yield cluster.start()
    finally:
        cluster.destroy()
        shutil.rmtree(cluster.dir.parent, ignore_errors=True)


__all__ = ["PostgresCluster", "available", "reachable_tmpdir", "scratch_cluster"]
