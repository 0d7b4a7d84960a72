"""`siterecovery ui up` on PostgreSQL (the default) and `ui down`: a private cluster initialized in the
state directory on a private port, the Prefect server's tables in it, the password in no log, and
nothing left running afterwards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from siterecovery import ui
from siterecovery.deployments import Settings, dump, render
from siterecovery.errors import ConfigurationError
from siterecovery.project import load_project
from siterecovery.testing import postgres
from siterecovery.testing.prefect_server import free_port

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "tests" / "ui" / "project"
POOL = "siterecovery-pg-test"


def test_one_setting_chooses_the_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SITERECOVERY_DB", raising=False)
    assert ui.database() == "postgres"
    monkeypatch.setenv("SITERECOVERY_DB", "sqlite")
    assert ui.database() == "sqlite"
    assert ui.database("postgres") == "postgres"
    monkeypatch.setenv("SITERECOVERY_DB", "mysql")
    with pytest.raises(ConfigurationError, match="SITERECOVERY_DB='mysql'"):
        ui.database()


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{cmdline.parent.name}: {cmd}")
    return found


@pytest.mark.prefect_server
@pytest.mark.timeout(400)
def test_ui_up_on_postgres_then_down_leaves_nothing_running() -> None:
    why = postgres.available()
    if why:
        pytest.skip(why)
    # Not pytest's tmp_path: that is private to root, and PostgreSQL runs as the postgres user.
    state = postgres.reachable_tmpdir("siterecovery-ui-pg-")
    try:
        doc = render(load_project(PROJECT), Settings(work_pool=POOL, project=str(PROJECT.relative_to(ROOT))))
        doc["deployments"] = [d for d in doc["deployments"] if d["entrypoint"].startswith("deployments/failover")]
        prefect_file = state / "prefect.yaml"
        prefect_file.write_text(dump(doc, "tests/ui/project", "test settings"))
        os.environ.pop("SITERECOVERY_DB", None)
        said: list[str] = []
        url = ui.up(state, ROOT, prefect_file, pool=POOL, port=free_port(), say=said.append)
        try:
            running = ui.status(state)
            # Both plans fail over into WestCloud: one worker, for the recovery site's queue.
            assert set(running) == {"server", "worker-site-west", "postgres"} and all(running.values()), running
            cluster = ui.Layout(state).postgres
            assert cluster.data.is_dir() and cluster.data.is_relative_to(state)
            # The server's tables are in the cluster, not in an SQLite file.
            assert sorted(cluster.query("SELECT name FROM deployment")) == sorted(d["name"] for d in doc["deployments"])
            assert not list((state / "prefect").glob("*.db"))
            assert url.startswith("http://127.0.0.1:")
            password = (cluster.dir / "password").read_text().strip()
            for log in (*ui.Layout(state).run.glob("*.log"), cluster.log):
                assert password not in log.read_text(errors="replace"), log
            assert not any(password in line for line in said)
        finally:
            said.clear()
            ui.down(state, say=said.append)
        assert said == ["stopped the worker-site-west", "stopped the server", "stopped PostgreSQL"]
        assert not any(ui.status(state).values()), ui.status(state)
        assert _processes_mentioning(str(state)) == []
    finally:
        ui.down(state, say=lambda _m: None)
        shutil.rmtree(state, ignore_errors=True)
