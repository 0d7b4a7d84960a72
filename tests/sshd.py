"""A real OpenSSH sshd on 127.0.0.1 for driver tests: its own host key, one authorized client key.

Reusable: `sshd_server` (session scope) yields an SSHServer; `SSHServer.host(...)` builds a topology
Host that reaches it with the host key pinned. Tests that use it are marked `sshd`; the fixture skips
only when /usr/sbin/sshd is missing.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.model import Host

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path, kind: str = "ed25519") -> str:
    """A new key pair at `path`; the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return Path(f"{path}.pub").read_text().strip()


@dataclass
class SSHServer:
    port: int
    dir: Path
    host_key: str  # "ssh-ed25519 AAAA..."
    client_key: Path
    known_hosts: Path
    user: str
    address: str = "127.0.0.1"

    def authorize(self, public_key: str) -> None:
        """Let one more client key in (sshd reads authorized_keys at every login)."""
        with open(self.dir / "authorized_keys", "a") as f:
            f.write(public_key.strip() + "\n")

    def peer_ssh(self, where: Path) -> dict[str, str]:
        """What an operator puts on a source host for host-to-host replication (a topology `peer_ssh`):
        a new identity this sshd authorizes (with `restrict`: no forwarding, no pty, as ENGINE.md
        advises) and a known_hosts file holding this sshd's key."""
        where.mkdir(parents=True, exist_ok=True)
        key = where / "peer_ed25519"
        self.authorize("restrict " + keygen(key))
        kh = where / "peer_known_hosts"
        kh.write_text(self.known_hosts.read_text())
        return {"identity_file": str(key), "known_hosts": str(kh)}

    def host(self, name: str = "h1", site: str = "s1", root: str | None = None, **kw: object) -> Host:
        args: dict[str, object] = dict(name=name, site=site, fabric="linux", address=self.address, port=self.port,
                                       user=self.user, host_key=self.host_key, credential={"key_file": str(self.client_key)},
                                       root=root)
        args.update(kw)
        return Host.model_validate(args)


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SSHServer]:
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} is missing (install openssh-server: scripts/setup-system.sh)")
    with running_sshd() as server:
        yield server


@contextlib.contextmanager
def running_sshd(address: str = "127.0.0.1", netns: str | None = None) -> Iterator[SSHServer]:
    """Start sshd (also used by bench/ outside pytest); stopped when the block ends. `netns`: inside that
    network namespace (`ip netns exec`), listening on `address` there."""
    d = Path(tempfile.mkdtemp(prefix="sr-sshd-"))
    host_pub = keygen(d / "ssh_host_ed25519_key")
    client_pub = keygen(d / "client_key")
    (d / "authorized_keys").write_text(client_pub + "\n")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress {address}\nHostKey {d / 'ssh_host_ed25519_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "MaxSessions 64\nMaxStartups 64\nLogLevel ERROR\n")
    kind, b64 = host_pub.split()[:2]
    (d / "known_hosts").write_text(f"[{address}]:{port} {kind} {b64}\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory Debian's sshd wants
    log = open(d / "sshd.log", "wb")  # noqa: SIM115 - closed at teardown
    wrap = ["ip", "netns", "exec", netns] if netns else []
    proc = subprocess.Popen([*wrap, SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((address, port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                raise RuntimeError(f"sshd did not start: {(d / 'sshd.log').read_text()[-2000:]}") from None
            time.sleep(0.05)
    try:
        yield SSHServer(port=port, dir=d, host_key=f"{kind} {b64}", client_key=d / "client_key",
                        known_hosts=d / "known_hosts", user=getpass.getuser(), address=address)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)  # keys and config of a server that no longer exists
