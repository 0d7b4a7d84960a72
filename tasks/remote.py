"""Running a plan's script on a named host over SSH.

The connection comes from a siterecovery.ssh.Pool (host key verified, never trust on first use) and
every command goes through its one `run`. The script is copied to a private temporary file, run under
coreutils `timeout` on the host (which signals the script's whole process group, so nothing it started
outlives the plan step), and removed afterwards. The orchestrator also keeps a total deadline of its
own (run's deadline): output that keeps flowing does not extend it.
"""

from __future__ import annotations

import posixpath
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from siterecovery import ssh
from siterecovery.errors import CommandTimedOut, ScriptError
from siterecovery.model import Credential, Host

# After the host's own `timeout` fires: TERM, then KILL after KILL_AFTER s; the orchestrator waits
# GRACE s beyond the script's timeout for that before it gives up on the channel.
KILL_AFTER = 5
GRACE = KILL_AFTER + 10
TIMED_OUT = 124  # coreutils timeout's exit status when the time limit was hit


def run_remote(host: Host, script: Path, args: Sequence[str], env: dict[str, str], timeout: float,
               resolve: Callable[[Credential], str] | None = None) -> tuple[int, bytes, bytes]:
    """Copy `script` to a private temporary file on `host`, run it with `args`, remove it (even on failure).

    The environment is passed through `env NAME=VALUE` in argv (sshd refuses most SendEnv names).
    A timeout raises ScriptError, like the local runner.
    """
    remote = posixpath.join("/tmp", f"siterecovery-{secrets.token_hex(8)}-{script.name}")  # noqa: S108 - private name, mode 700
    with ssh.Pool(resolve) as pool:
        pool.client(host)  # connect first: a host that cannot be reached has nothing to clean up
        try:
            # Over an exec channel, not SFTP (many sshd configurations have no sftp subsystem). noclobber
            # refuses a file (or a planted symlink) already at the random name; umask keeps it private.
            copied = pool.run(host, ["sh", "-c", 'set -C; umask 077; cat > "$0" && chmod 700 "$0"', remote],
                              stdin=script.read_bytes(), deadline=60)
            if copied.rc != 0:
                raise ScriptError(f"cannot copy script {script.name} to {host.name}:{remote}: "
                                  f"{copied.stderr.decode(errors='replace').strip()[-300:]}", host=host.name,
                                  operation="run_script", hint="check /tmp on the host (space, permissions)")
            argv = ["timeout", "-k", str(KILL_AFTER), f"{timeout:g}", "env",
                    *[f"{k}={v}" for k, v in sorted(env.items())], remote, *args]
            t0 = time.monotonic()
            try:
                r = pool.run(host, argv, deadline=timeout + GRACE)
            except CommandTimedOut:
                r = None
            # 124: `timeout` stopped it with TERM; 137: it ignored TERM and took KILL. A script that exits
            # 124 by itself before its time is up is just a failed script.
            if r is None or (r.rc in (TIMED_OUT, 128 + 9) and time.monotonic() - t0 >= timeout):
                raise ScriptError(f"script {script.name} timed out after {timeout:g} s on {host.name}; it and "
                                  "every process it started were signalled (TERM, then KILL)", host=host.name,
                                  operation="run_script", hint="raise timeout_seconds or check the script")
            return r.rc, r.stdout, r.stderr
        finally:
            try:
                pool.run(host, ["rm", "-f", remote], deadline=30)
            except Exception:  # noqa: BLE001 - best effort: the script already ran (or failed); keep its error
                pass
