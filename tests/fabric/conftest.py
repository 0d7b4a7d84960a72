"""Fixtures for the Hyper-V driver tests: a simulator with three hosts behind a real SSH server,
a client key authorized there, and topology Hosts that pin the simulator's host key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hvhelpers import VM, make_host, placement  # noqa: F401 - re-exported for fixtures

from siterecovery.fabric import FabricContext
from siterecovery.fabric.hyperv import HyperVFabric
from siterecovery.model import Host
from siterecovery.testing.hyperv_sim import HyperVSimulator, generate_key


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    key, text = generate_key()
    path = tmp_path_factory.mktemp("keys") / "id_ed25519"
    path.write_text(text)
    path.chmod(0o600)
    return key, path


@pytest.fixture
def sim(client_key: tuple[object, Path]) -> Iterator[HyperVSimulator]:
    s = HyperVSimulator()
    for name in ("hv-a", "hv-b", "hv-c"):
        s.add_host(name, switches=("LAN", "DR-LAN", "TEST-ISO"))
    s.authorize(client_key[0])  # type: ignore[arg-type]
    with s:
        yield s


@pytest.fixture
def hosts(sim: HyperVSimulator, client_key: tuple[object, Path]) -> dict[str, Host]:
    return {n: make_host(sim, n, client_key[1]) for n in ("hv-a", "hv-b", "hv-c")}


@pytest.fixture
def driver() -> Iterator[HyperVFabric]:
    d = HyperVFabric(FabricContext(options={"timeout": 20}))
    yield d
    d.close()


