"""Host to host over the real sshd: the source host's own ssh (its `peer_ssh` key and known_hosts, made
here in tmp) carries the stream into `receive` at the target, and the orchestrator's two SSH connections
carry only control traffic. Both "hosts" are the test sshd on 127.0.0.1 with their own roots.

What the orchestrator's connections carried is read from the kernel (TCP_INFO byte counters of their
sockets), so a stream relayed through the orchestrator shows up whatever code path sent it; the relay
test proves the measure sees a relayed stream.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from estate import fabric, placement
from faultrig import Rig, wait_no_agents
from sshd import SSHServer, keygen

from siterecovery.errors import FabricError, HostKeyError, TransientFabricError
from siterecovery.fabric.linux import LinuxFabric
from siterecovery.model import Host
from siterecovery.replica.engine import BLOCK, Replica, file_digest
from siterecovery.testing.disks import make_disk, rewrite_random, scribble

MiB = 1024 * 1024
pytestmark = pytest.mark.sshd


def hosts(sshd: SSHServer, tmp: Path, peer: bool = True) -> tuple[Host, Host]:
    extra: dict[str, object] = {}
    if peer:
        extra["peer_ssh"] = sshd.peer_ssh(tmp / "on-source-host")
    a = sshd.host("ny-h1", "ny", root=str(tmp / "root-a"), **extra)
    b = sshd.host("chi-h1", "chi", root=str(tmp / "root-b"))
    return a, b


def orchestrator_bytes(f: LinuxFabric, *hs: Host) -> int:
    """Bytes the kernel moved over the orchestrator's SSH sockets to these hosts, both directions."""
    total = 0
    for h in hs:
        t = f._client(h).get_transport()
        assert t is not None
        info = t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)  # type: ignore[union-attr]
        acked, received = struct.unpack_from("<QQ", info, 120)  # tcpi_bytes_acked, tcpi_bytes_received
        total += acked + received
    return total


def test_peer_path_lands_identical_without_the_orchestrator(sshd_server: SSHServer, tmp_path: Path) -> None:
    disk = tmp_path / "src" / "web-01.img"
    data = make_disk(disk, 16 * MiB, seed=7)
    events = tmp_path / "events.log"
    a, b = hosts(sshd_server, tmp_path)
    f = fabric(tmp_path / "state", ssh_timeout=30)
    p = placement(a, b, disk, events)
    assert f.data_path(p) == "peer"
    replica = tmp_path / "root-b" / "web-01" / "replica" / "os.img"
    seen: list[tuple[int, int]] = []
    try:
        f.enable_replication(p)
        before = orchestrator_bytes(f, a, b)
        r = f.start_initial_replication(p, progress=lambda d, t: seen.append((d, t)))
        moved = orchestrator_bytes(f, a, b) - before
        assert r.details["data_path"] == "peer" and "relayed" not in r.message
        assert file_digest(str(replica)) == file_digest(str(disk))
        assert r.bytes_sent >= data  # the stream carried the disk's data...
        assert moved < 256 * 1024, moved  # ...and the orchestrator's connections did not (5.3 MB of it)
        assert seen and seen[-1] == (16 * MiB, 16 * MiB)  # progress from the sender, through the source host
        assert "freeze" in events.read_text() and "thaw" in events.read_text()

        scribble(disk)
        r = f.replicate(p, consistency="app")
        assert r.details["data_path"] == "peer" and 0 < r.bytes_sent < 10 * (BLOCK + 100)
        assert file_digest(str(replica)) == file_digest(str(disk))
        assert "quiesce" in events.read_text()

        # change tracking lost at the source: the resync ships the replica's manifest through the
        # orchestrator to the source host (the stdin prefix), then only differing blocks host to host
        shutil.rmtree(tmp_path / "root-a" / "web-01" / "source")
        scribble(disk)
        before = orchestrator_bytes(f, a, b)
        r = f.replicate(p)
        assert "resynchronized" in r.message and r.bytes_sent < MiB
        assert orchestrator_bytes(f, a, b) - before < 256 * 1024
        assert file_digest(str(replica)) == file_digest(str(disk))
        assert len(f.recovery_points(p)) == 3
        assert not wait_no_agents(str(tmp_path))
    finally:
        f.close()


def test_without_peer_ssh_the_orchestrator_relays_and_says_so(sshd_server: SSHServer, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    disk = tmp_path / "src" / "web-01.img"
    data = make_disk(disk, 16 * MiB, seed=7)
    a, b = hosts(sshd_server, tmp_path, peer=False)
    f = fabric(tmp_path / "state", ssh_timeout=30)
    p = placement(a, b, disk)
    assert f.data_path(p) == "relay"
    try:
        f.enable_replication(p)
        before = orchestrator_bytes(f, a, b)
        with caplog.at_level("INFO", logger="siterecovery.fabric.linux"):
            r = f.start_initial_replication(p)
        moved = orchestrator_bytes(f, a, b) - before
        assert r.details["data_path"] == "relay"
        assert "orchestrator relayed the stream" in r.message and "ny-h1 has no peer_ssh" in r.message
        assert any("orchestrator relayed" in rec.getMessage() for rec in caplog.records)
        # the measure the peer test relies on sees a relayed stream: in from the source, out to the target
        assert moved > 2 * data, moved
        replica = tmp_path / "root-b" / "web-01" / "replica" / "os.img"
        assert file_digest(str(replica)) == file_digest(str(disk))
    finally:
        f.close()


@pytest.mark.parametrize("trouble", ["unknown", "changed", "missing"])
def test_target_host_key_not_trusted_by_source_host(sshd_server: SSHServer, tmp_path: Path, trouble: str) -> None:
    disk = tmp_path / "src" / "web-01.img"
    make_disk(disk, 4 * MiB)
    events = tmp_path / "events.log"
    a, b = hosts(sshd_server, tmp_path)
    assert a.peer_ssh is not None
    kh = Path(a.peer_ssh.known_hosts)
    good = kh.read_text()
    f = fabric(tmp_path / "state", ssh_timeout=30)
    p = placement(a, b, disk, events)
    replica = tmp_path / "root-b" / "web-01" / "replica" / "os.img"
    meta = tmp_path / "root-b" / "web-01" / "meta" / "os"
    try:
        f.enable_replication(p)
        f.start_initial_replication(p)
        held = file_digest(str(replica))
        points = f.recovery_points(p)
        if trouble == "unknown":
            kh.write_text("")
        elif trouble == "changed":
            other = keygen(tmp_path / "other_host_key")
            kind, b64 = other.split()[:2]
            kh.write_text(f"[127.0.0.1]:{sshd_server.port} {kind} {b64}\n")
        else:
            kh.unlink()
        freezes = events.read_text().count("freeze")
        scribble(disk)
        with pytest.raises(HostKeyError) as ei:
            f.replicate(p)
        msg = str(ei.value)
        assert "ny-h1" in msg and "chi-h1" in msg and str(kh) in msg, msg
        assert ei.value.error_id == "PeerHostKey"
        if trouble == "changed":
            assert "CHANGED" in msg
        # nothing was applied, and the source did no work (no freeze, no read) for a link it cannot use
        assert file_digest(str(replica)) == held
        assert Replica(str(replica), str(meta)).status()["disk_matches"]
        assert [x.id for x in f.recovery_points(p)] == [x.id for x in points]
        assert events.read_text().count("freeze") == freezes
        assert not wait_no_agents(str(tmp_path))
        h = f.replication_health(p)
        assert h.missed_cycles == 1 and "chi-h1" in (h.details or "")
        # trusted again: the next cycle carries on with a delta
        kh.write_text(good)
        r = f.replicate(p)
        assert r.changed and "resynchronized" not in r.message
        assert file_digest(str(replica)) == file_digest(str(disk))
    finally:
        f.close()


def _procs(marker: str) -> list[tuple[int, list[str]]]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                argv = [x.decode(errors="replace") for x in fh.read().split(b"\0") if x]
        except OSError:
            continue
        if argv and any(marker in x for x in argv):
            out.append((int(d), argv))
    return out


def test_ssh_killed_mid_stream_leaves_the_previous_point(sshd_server: SSHServer, tmp_path: Path) -> None:
    a, b = hosts(sshd_server, tmp_path)
    rig = Rig(tmp_path, a, b)
    rnd = random.Random(11)
    marker = str(tmp_path)
    try:
        rig.start()
        written = rewrite_random(rig.disk, 160, rnd)  # 10 MiB of incompressible blocks: far more than the buffers
        stopped: list[int] = []
        killed: list[int] = []
        stop = threading.Event()

        def saboteur() -> None:
            # Once the receiver stages the stream, hold it still (SIGSTOP) so the rest is surely in
            # flight, kill the source host's ssh client, then let the receiver find its stream torn.
            while not stop.is_set() and not any(n.startswith("staging") for n in os.listdir(rig.meta)):
                time.sleep(0.002)
            while not stop.is_set() and not stopped:
                for pid, argv in _procs(marker):
                    if argv[1:4] == ["-m", "siterecovery.replica.agent", "receive"]:
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
                time.sleep(0.005)
            while not stop.is_set() and not killed:
                for pid, argv in _procs(marker):
                    if os.path.basename(argv[0]) == "ssh":
                        time.sleep(0.3)  # let the sender fill the pipes it is blocked on
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        break
                time.sleep(0.005)
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)

        t = threading.Thread(target=saboteur, daemon=True)
        t.start()
        try:
            with pytest.raises(TransientFabricError) as ei:
                rig.cycle()
        finally:
            stop.set()
            t.join()
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        assert stopped and killed, (stopped, killed)
        assert ei.value.error_id == "PeerLinkLost" and "mid-stream" in str(ei.value), str(ei.value)
        assert not wait_no_agents(marker)
        rig.verify(clean=False, rebuild=1)  # still exactly the previous point
        h = rig.f.replication_health(rig.p)
        assert h.missed_cycles == 1 and "killed" in (h.details or "")
        r = rig.cycle()
        assert r.changed and r.details["data_path"] == "peer" and "resynchronized" not in r.message
        assert r.bytes_sent <= written + 256 * 1024
        assert file_digest(str(rig.replica)) == file_digest(str(rig.disk))
        rig.verify(clean=True, rebuild=1)
    finally:
        rig.close()


def test_target_refuses_the_source_hosts_key(sshd_server: SSHServer, tmp_path: Path) -> None:
    disk = tmp_path / "src" / "web-01.img"
    make_disk(disk, 4 * MiB)
    a, b = hosts(sshd_server, tmp_path)
    assert a.peer_ssh is not None
    f = fabric(tmp_path / "state", ssh_timeout=30)
    p = placement(a, b, disk)
    replica = tmp_path / "root-b" / "web-01" / "replica" / "os.img"
    try:
        f.enable_replication(p)
        f.start_initial_replication(p)
        held = file_digest(str(replica))
        key = Path(a.peer_ssh.identity_file)
        key.unlink()
        Path(f"{key}.pub").unlink()
        keygen(key)  # a key the target never authorized, at the same path
        scribble(disk)
        with pytest.raises(FabricError) as ei:
            f.replicate(p)
        assert ei.value.error_id == "PeerAuth" and not isinstance(ei.value, TransientFabricError)
        assert "chi-h1" in str(ei.value) and str(key) in str(ei.value) and sshd_server.user in str(ei.value)
        assert file_digest(str(replica)) == held
    finally:
        f.close()
