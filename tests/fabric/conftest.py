"""Fixtures for the Hyper-V driver tests: a simulator with three hosts behind a real SSH server,
a client key authorized there, and topology Hosts that pin the simulator's host key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.fabric import FabricContext
from siterecovery.fabric.base import Placement
from siterecovery.fabric.hyperv import HyperVFabric
from siterecovery.model import Credential, Host, ReplicationPolicy
from siterecovery.model.topology import ReplicaServer
from siterecovery.testing.hyperv_sim import HyperVSimulator, generate_key

VM = "web-01"


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


def make_host(sim: HyperVSimulator, name: str, key_path: Path, **kw: object) -> Host:
    fields: dict[str, object] = {
        "name": name, "site": "site-" + name[-1], "fabric": "hyperv", "address": "127.0.0.1", "port": sim.port,
        "user": name, "host_key": sim.host_key_line, "credential": Credential(key_file=str(key_path)),
        "replica_server": ReplicaServer(port=80, storage_location="D:\\Replica"),
    }
    fields.update(kw)
    return Host(**fields)  # type: ignore[arg-type]


@pytest.fixture
def hosts(sim: HyperVSimulator, client_key: tuple[object, Path]) -> dict[str, Host]:
    return {n: make_host(sim, n, client_key[1]) for n in ("hv-a", "hv-b", "hv-c")}


@pytest.fixture
def driver() -> Iterator[HyperVFabric]:
    d = HyperVFabric(FabricContext(options={"timeout": 20}))
    yield d
    d.close()


def placement(hosts: dict[str, Host], vm: str = VM, src: str = "hv-a", dst: str = "hv-b",
              **policy: object) -> Placement:
    pol = ReplicationPolicy(name="gold", **{"copy_frequency_seconds": 300, "recovery_history_hours": 4,
                                            **policy})  # type: ignore[arg-type]
    return Placement(vm=vm, pairing="p1", source=hosts[src], target=hosts[dst], policy=pol)
