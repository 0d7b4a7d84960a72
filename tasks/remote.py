"""Running a plan's script on a named host over SSH.

The connection is siterecovery.ssh.connect (host key verified, never trust on first use). The script is
copied to a private temporary file, run under coreutils `timeout` on the host (which signals the
script's whole process group, so nothing it started outlives the plan step), and removed afterwards.
The orchestrator also keeps a total deadline of its own: output that keeps flowing does not extend it.
"""

from __future__ import annotations

import posixpath
import secrets
import select
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import paramiko

from siterecovery import ssh
from siterecovery.errors import ScriptError, TransientFabricError
from siterecovery.model import Credential, Host

# After the host's own `timeout` fires: TERM, then KILL after KILL_AFTER s; the orchestrator waits
# GRACE s beyond the script's timeout for that before it gives up on the channel.
KILL_AFTER = 5
GRACE = KILL_AFTER + 10
TIMED_OUT = 124  # coreutils timeout's exit status when the time limit was hit


def _exec(client: paramiko.SSHClient, argv: Sequence[str], timeout: float) -> tuple[int | None, bytes, bytes]:
    """(exit status or None when the deadline passed, stdout, stderr) of argv, bounded in total time."""
    chan = ssh.exec_channel(client, list(argv), timeout=30)
    deadline = time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    try:
        chan.shutdown_write()
        while True:
            while chan.recv_ready():
                out += chan.recv(1 << 16)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(1 << 16)
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                # The exit status can arrive before the last data: drain what is already here.
                while (d := chan.recv(1 << 16)):
                    out += d
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                return chan.recv_exit_status(), bytes(out), bytes(err)
            left = deadline - time.monotonic()
            if left <= 0:
                return None, bytes(out), bytes(err)
            select.select([chan], [], [], min(left, 1.0))
    except OSError as exc:
        raise TransientFabricError(f"SSH channel failed while the script ran: {type(exc).__name__}",
                                   operation="run_script", hint="check the host and the connection") from None
    finally:
        chan.close()


def run_remote(host: Host, script: Path, args: Sequence[str], env: dict[str, str], timeout: float,
               resolve: Callable[[Credential], str] | None = None) -> tuple[int, bytes, bytes]:
    """Copy `script` to a private temporary file on `host`, run it with `args`, remove it (even on failure).

    The environment is passed through `env NAME=VALUE` in argv (sshd refuses most SendEnv names).
    A timeout raises ScriptError, like the local runner.
    """
    client = ssh.connect(host, resolve)
    remote = posixpath.join("/tmp", f"siterecovery-{secrets.token_hex(8)}-{script.name}")  # noqa: S108 - private name, mode 700
    try:
        # Over an exec channel, not SFTP (many sshd configurations have no sftp subsystem). noclobber
        # refuses a file (or a planted symlink) already at the random name; umask keeps it private.
        copied, _, err = ssh.run(client, ["sh", "-c", 'set -C; umask 077; cat > "$0" && chmod 700 "$0"', remote],
                                 stdin=script.read_bytes(), timeout=60)
        if copied != 0:
            raise ScriptError(f"cannot copy script {script.name} to {host.name}:{remote}: "
                              f"{err.decode(errors='replace').strip()[-300:]}", host=host.name,
                              operation="run_script", hint="check /tmp on the host (space, permissions)")
        argv = ["timeout", "-k", str(KILL_AFTER), f"{timeout:g}", "env",
                *[f"{k}={v}" for k, v in sorted(env.items())], remote, *args]
        t0 = time.monotonic()
        rc, out, err = _exec(client, argv, timeout + GRACE)
        # 124: `timeout` stopped it with TERM; 137: it ignored TERM and took KILL. A script that exits 124
        # by itself before its time is up is just a failed script.
        if rc is None or (rc in (TIMED_OUT, 128 + 9) and time.monotonic() - t0 >= timeout):
            raise ScriptError(f"script {script.name} timed out after {timeout:g} s on {host.name}; it and every "
                              "process it started were signalled (TERM, then KILL)", host=host.name,
                              operation="run_script", hint="raise timeout_seconds or check the script")
        return rc, out, err
    finally:
        try:
            _exec(client, ["rm", "-f", remote], 30)
        except Exception:  # noqa: BLE001 - best effort: the script already ran (or failed); keep its error
            pass
        client.close()
