"""Cycles over connections that re-key all the time (paramiko/paramiko#822).

paramiko re-keys a connection every 512 MiB. When sshd closed a channel while paramiko's own KEXINIT
was in flight, paramiko's transport thread waited on itself for 30 s and the connection died (one
failed cycle in the 10-minute soak). Here both connections re-key every 128 KiB, so a re-key is under
way at nearly every channel close; every cycle must complete and leave the replica equal to the
source's point, and every older point must still rebuild exactly.

With `siterecovery.ssh.Transport` replaced by plain `paramiko.Transport` this test fails within a few
cycles ("Key-exchange timed out waiting for key negotiation" after `clear_to_send_timeout`, lowered
here to 10 s so a regression fails quickly instead of stalling).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sshd import SSHServer

from siterecovery import ssh
from siterecovery.replica.engine import Replica, file_digest, now_iso
from siterecovery.replica.orchestrator.endpoints import SSHEndpoint
from siterecovery.replica.orchestrator.transfer import transfer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "replica"))
from helpers import MiB, make_disk, scribble  # noqa: E402 - tests/replica is not a package

REKEY_BYTES = 32 * 1024
CYCLES = 30


def _endpoint(srv: SSHServer, name: str, root: Path) -> SSHEndpoint:
    # A pool each: both hosts are this one sshd, and each side must have a connection of its own.
    host, pool = srv.host(name, "s", root=str(root)), ssh.Pool()
    t = pool.client(host).get_transport()
    assert isinstance(t, ssh.Transport)
    t.packetizer.REKEY_BYTES = REKEY_BYTES  # read through self: this connection only
    t.clear_to_send_timeout = 10.0
    return SSHEndpoint(name=name, pool=pool, host=host, python=sys.executable, timeout=60.0)


@pytest.mark.sshd
@pytest.mark.timeout(600)
def test_cycles_survive_constant_rekeying(sshd_server: SSHServer, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, 4 * MiB, fill=0.5)
    rep_path, meta = tmp_path / "rep" / "disk.img", tmp_path / "rep" / "meta"
    state = str(tmp_path / "src-state")
    # Both hosts remote (the orchestrator relays): the source connection re-keys on bytes it
    # receives, the target connection on bytes it sends.
    src, dst = _endpoint(sshd_server, "src", tmp_path), _endpoint(sshd_server, "dst", tmp_path)
    rep_args = ["--replica", str(rep_path), "--meta", str(meta)]
    digests: dict[int, str] = {}
    gen = None
    try:
        for n in range(1, CYCLES + 1):
            if n > 1:
                scribble(disk, 4 + n % 5, seed=n)  # 256-512 KiB per cycle
            point = {"id": f"vm@{n}", "created_at": now_iso(), "consistency": "crash"}
            send = ["send", "--disk", str(disk), "--state", state, "--seq", str(n)]
            send += ["--mode", "full"] if gen is None else ["--mode", "delta", "--expect-gen", gen]
            sent, got = transfer(src, send, dst, ["receive", *rep_args, "--point", json.dumps(point),
                                                  "--retention-hours", "24"])
            gen = got["point"]["gen"]
            assert sent["gen"] == gen
            digests[got["point"]["seq"]] = file_digest(str(disk))
            # A control command on each connection between cycles: more channels closing mid re-key.
            status = dst.call(["status", *rep_args])
            assert status["gen"] == gen and status["disk_matches"], status
            assert src.call(["digest", "--path", str(disk)])["digest"] == digests[got["point"]["seq"]]
            assert file_digest(str(rep_path)) == digests[got["point"]["seq"]], f"cycle {n}"
            # #822's own pattern on the connection the next cycle uses: output that crosses the
            # threshold just before the command ends, so sshd's CHANNEL_CLOSE meets our KEXINIT.
            for _ in range(3):
                r = src.pool.run(src.host, ["head", "-c", str(REKEY_BYTES + 4096), "/dev/zero"], deadline=60)
                assert r.rc == 0 and len(r.stdout) == REKEY_BYTES + 4096
        transports = [e.pool.client(e.host).get_transport() for e in (src, dst)]
        assert all(isinstance(t, ssh.Transport) for t in transports)
        rekeys = sum(t.rekeys for t in transports if isinstance(t, ssh.Transport))
        held = sum(t.held_messages for t in transports if isinstance(t, ssh.Transport))
        assert rekeys >= CYCLES, rekeys  # the threshold really was crossed over and over
        # The race of #822 really happened (answers the transport thread had to hold back).
        assert held >= 1, (rekeys, held)
    finally:
        src.pool.close()
        dst.pool.close()
    r = Replica(str(rep_path), str(meta))
    assert r.status()["disk_matches"]
    for seq in (1, CYCLES // 2, CYCLES - 1):
        out = tmp_path / f"point-{seq}.img"
        r.rebuild(seq, str(out))
        assert file_digest(str(out)) == digests[seq], seq
