"""A silent network partition (packets dropped, no FIN, no RST) over the real sshd: the fabric notices a
dead path within the dead-link deadline and says so ("no traffic from host X for N s"), the receiving
agent on the far side exits by itself instead of holding the replica's lock, an idle cached connection
is checked before use, and a wait for a VM's record names its holder and gives up.

The deadline is the fabric option `dead_link_seconds` (default 30 s); these tests use 3 s. The proxy in
tests/fabric/cutproxy.py black-holes the link: it stops reading and forwarding both ways, so the
senders' socket buffers fill up exactly as with a dropped route. Figures: docs/RELIABILITY-replication.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import time
from pathlib import Path

import pytest
from cutproxy import CutProxy
from estate import fabric, local_host, placement
from faultrig import Rig, agents, wait_no_agents
from sshd import SSHServer

from siterecovery.errors import FabricError, LinkDown
from siterecovery.fabric.base import Health
from siterecovery.replica.engine import file_digest
from siterecovery.testing.disks import make_disk, rewrite_random

# 3 s in CI; `DEAD_LINK_TRIAL=30` measures the default deadline (docs/RELIABILITY-replication.md)
DEAD = float(os.environ.get("DEAD_LINK_TRIAL", "3"))


def _rig(sshd: SSHServer, tmp: Path, proxy: CutProxy) -> Rig:
    a = sshd.host("ny-h1", "ny", root=str(tmp / "root-a"))
    b = sshd.host("chi-h1", "chi", root=str(tmp / "root-b"), port=proxy.port)
    rig = Rig(tmp, a, b)
    rig.f.close()
    rig.f = fabric(tmp / "state", ssh_timeout=5, dead_link_seconds=DEAD)
    return rig


@pytest.mark.sshd
def test_silent_partition_mid_transfer(sshd_server: SSHServer, tmp_path: Path) -> None:
    proxy = CutProxy(sshd_server.port)
    rig = _rig(sshd_server, tmp_path, proxy)
    try:
        rig.start()
        written = rewrite_random(rig.disk, 96, random.Random(4))  # 6 MiB: far more than the buffers hold
        proxy.blackhole_after(512 * 1024)
        t0 = time.monotonic()
        with pytest.raises(FabricError) as ei:
            rig.cycle()
        detected = time.monotonic() - t0
        err = ei.value
        assert isinstance(err, LinkDown), err
        assert err.host == "chi-h1" and err.error_id == "NoTraffic", err
        assert f"no traffic from host chi-h1 for {DEAD:g} s" in err.message, err.message
        # Before: 928-959 s (the kernel's TCP retries). The bound is loose on purpose (a loaded box).
        assert detected < 10 * DEAD, detected
        # The orchestrator gave up first; the partition still holds. The receiving agent on the far
        # side must not live on with the replica's lock (sshd with default settings keeps it for hours).
        t1 = time.monotonic()
        left = wait_no_agents(str(tmp_path), timeout=10 * DEAD)
        orphan_gone = time.monotonic() - t1
        assert not left, f"agents still running behind the partition: {left}"
        print(f"FAULTS silent-partition: detected_after={detected:.1f}s agent_exited_after={orphan_gone:.1f}s "
              f"deadline={DEAD:g}s")
        proxy.release()  # the link heals
        h = rig.f.replication_health(rig.p)
        assert h.health == Health.Warning and "no traffic from host chi-h1" in h.details, h
        assert h.missed_cycles == 1
        rig.verify(clean=False, rebuild=1)
        r = rig.cycle()  # carries on from the previous point: the delta again, no resync
        assert r.changed and "resynchronized" not in r.message
        assert r.bytes_sent <= written + 256 * 1024
        assert file_digest(str(rig.replica)) == file_digest(str(rig.disk))
        rig.verify(clean=True, rebuild=1)
        assert rig.f.replication_health(rig.p).health == Health.Normal
    finally:
        rig.close()
        proxy.close()


@pytest.mark.sshd
def test_idle_cached_connection_is_checked_before_use(sshd_server: SSHServer, tmp_path: Path) -> None:
    proxy = CutProxy(sshd_server.port)
    rig = _rig(sshd_server, tmp_path, proxy)
    try:
        rig.start()
        proxy.blackhole_after(0)  # the path dies while the cached connection sits idle
        proxy.hold("up")
        proxy.hold("down")
        t0 = time.monotonic()
        h = rig.f.replication_health(rig.p)  # before: the channel open waited 600 s on the dead connection
        took = time.monotonic() - t0
        assert "chi-h1" in h.details and "unreachable" in h.details, h
        # the dead-link check (3 s) plus a new connection refused by the partition (ssh_timeout 5 s)
        assert took < 4 * (DEAD + 5), took
        print(f"FAULTS idle-cached-connection: health answered after {took:.1f}s")
        proxy.release()
        assert rig.f.replication_health(rig.p).health == Health.Normal
    finally:
        rig.close()
        proxy.close()
        assert not agents(str(tmp_path)) or not wait_no_agents(str(tmp_path))


def test_vm_record_wait_names_its_holder_and_gives_up(tmp_path: Path) -> None:
    disk = tmp_path / "src" / "web-01.img"
    make_disk(disk, 1 << 20, seed=2)
    f = fabric(tmp_path / "state", vm_lock_wait=1)
    p = placement(local_host("ny-h1", "ny", tmp_path / "a"), local_host("chi-h1", "chi", tmp_path / "b"), disk)
    f.enable_replication(p)
    lock = tmp_path / "state" / "linux" / "vms" / "web-01.lock"
    # another orchestrator process in the middle of a cycle (its record, as _vm writes it)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": 4242, "operation": "replicate", "since": "2026-01-01T00:00:00+00:00"}).encode(), 0)
    try:
        t0 = time.monotonic()
        with pytest.raises(FabricError) as ei:
            f.replication_health(p)
        assert time.monotonic() - t0 < 30
        assert ei.value.error_id == "Busy" and "4242" in ei.value.message and "replicate" in ei.value.message
    finally:
        os.close(fd)
    assert f.replication_health(p).vm == "web-01"  # free again: no wait
    f.close()
