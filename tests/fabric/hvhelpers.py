"""Helpers shared by the Hyper-V driver tests: hosts on the simulator and placements between them.
Kept out of conftest.py because several test directories have a conftest and `from conftest import`
would pick whichever was imported first."""

from __future__ import annotations

from pathlib import Path

from siterecovery.fabric.base import Placement
from siterecovery.model import Credential, Host, ReplicationPolicy
from siterecovery.model.topology import ReplicaServer
from siterecovery.testing.hyperv_sim import HyperVSimulator

VM = "web-01"


def make_host(sim: HyperVSimulator, name: str, key_path: Path, **kw: object) -> Host:
    fields: dict[str, object] = {
        "name": name, "site": "site-" + name[-1], "fabric": "hyperv", "address": "127.0.0.1", "port": sim.port,
        "user": name, "host_key": sim.host_key_line, "credential": Credential(key_file=str(key_path)),
        "replica_server": ReplicaServer(port=80, storage_location="D:\\Replica"),
    }
    fields.update(kw)
    return Host(**fields)  # type: ignore[arg-type]


def placement(hosts: dict[str, Host], vm: str = VM, src: str = "hv-a", dst: str = "hv-b",
              **policy: object) -> Placement:
    pol = ReplicationPolicy(name="gold", **{"copy_frequency_seconds": 300, "recovery_history_hours": 4,
                                            **policy})  # type: ignore[arg-type]
    return Placement(vm=vm, pairing="p1", source=hosts[src], target=hosts[dst], policy=pol)
