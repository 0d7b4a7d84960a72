"""Flow tests: the session's one Prefect test harness (`prefect_harness` in tests/fixtures_prefect.py),
a project of memory-fabric hosts per test, and the state directory ($SITERECOVERY_STATE) the flow, its
tasks and the asserting test share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.fabric import FabricContext
from siterecovery.fabric.memory import MemoryFabric
from siterecovery.testing import postgres
from siterecovery.testing.prefect_server import PrefectServer, running_server
from siterecovery.testing.projects import memory_project, seed_memory

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# The plan most tests run: two groups, a boot dependency in the first.
APP = {"name": "app", "version": "7", "groups": [
    {"name": "db", "vms": ["db-1", {"name": "db-2", "depends_on": ["db-1"]}]},
    {"name": "web", "vms": ["web-1", "web-2", "web-3"]},
]}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One real Prefect server (own PREFECT_HOME) for every multi-process test of the session, on a private
    PostgreSQL cluster as `make ui` runs it (SQLite where PostgreSQL 15 is missing, or with
    SITERECOVERY_TEST_DB=sqlite). test_concurrency_pg has a PostgreSQL server of its own, fresh."""
    home = tmp_path_factory.mktemp("prefect-home")
    if os.environ.get("SITERECOVERY_TEST_DB", "postgres") == "postgres" and postgres.available() is None:
        with postgres.scratch_cluster() as pg, running_server(home, database_url=pg.url) as srv:
            yield srv
    else:
        with running_server(home) as srv:
            yield srv


class Estate:
    """A test's project, state directory and a view of the memory fabric they share."""

    def __init__(self, root: Path, state: Path) -> None:
        self.root, self.state = root, state
        self.fabric = MemoryFabric(FabricContext(options={"state_file": str(state / "memory-fabric.json")}))

    def calls(self, operation: str | None = None, vm: str | None = None) -> list[tuple[float, str, str, str]]:
        return [c for c in self.fabric.all_calls() if (operation is None or c[1] == operation)
                and (vm is None or c[2] == vm)]

    def vm(self, name: str) -> dict[str, Any]:
        return self.fabric.vm_state(name)


@pytest.fixture
def estate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Estate]:
    def make(plans: list[dict[str, Any]] | None = None, seed: str | None = "app", **kw: Any) -> Estate:
        plans = plans or [APP]
        root = memory_project(tmp_path / "project", plans, **kw)
        state = tmp_path / "state"
        monkeypatch.setenv("SITERECOVERY_STATE", str(state))
        if seed:
            seed_memory(root, seed, state / "memory-fabric.json")
        return Estate(root, state)
    return make
