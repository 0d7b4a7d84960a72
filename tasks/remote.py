"""Running a plan's script on a named host over SSH.

Behind the one function `run_remote`: it uses siterecovery.ssh (host-key-verifying connect + run,
from the engine branch) when that module exists, else a minimal paramiko helper with the same rules
(pinned key or known_hosts, never trust on first use). Switching to the shared module is automatic.
"""

from __future__ import annotations

import base64
import os
import posixpath
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

import paramiko

from siterecovery.errors import ConnectionFailed, HostKeyError, ScriptError
from siterecovery.model import Credential, Host
from siterecovery.render import sh_join


def _connect_minimal(host: Host, resolve: Callable[[Credential], str] | None) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    if host.host_key:
        kind, b64 = host.host_key.split()[:2]
        hid = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
        client.get_host_keys().add(hid, kind, paramiko.PKey.from_type_string(kind, base64.b64decode(b64)))
    elif host.known_hosts:
        client.load_host_keys(os.path.expanduser(host.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    kw: dict[str, object] = {"allow_agent": False, "look_for_keys": False}
    cred = host.credential
    if cred is not None:
        if cred.key_file:
            kw["key_filename"] = os.path.expanduser(cred.key_file)
        elif resolve is not None:
            text = resolve(cred)
            if cred.kind == "password":
                kw["password"] = text
            else:
                import io
                kw["pkey"] = paramiko.Ed25519Key.from_private_key(io.StringIO(text)) if "OPENSSH" in text \
                    else paramiko.RSAKey.from_private_key(io.StringIO(text))
    try:
        client.connect(host.address, port=host.port, username=host.user, timeout=15, **kw)  # type: ignore[arg-type]
    except paramiko.SSHException as exc:
        client.close()
        if "not found in known_hosts" in str(exc) or isinstance(exc, paramiko.BadHostKeyException):
            raise HostKeyError(f"SSH host key of {host.address} is unknown or changed", host=host.name,
                               operation="run_script", hint="pin host_key in the topology") from None
        raise ConnectionFailed(f"SSH to {host.address}:{host.port} failed: {type(exc).__name__}", host=host.name,
                               operation="run_script", hint="check the host and its credential") from None
    except OSError as exc:
        client.close()
        raise ConnectionFailed(f"cannot reach {host.address}:{host.port}: {exc.strerror or exc}", host=host.name,
                               operation="run_script", hint="check that the host is up") from None
    return client


def _connect(host: Host, resolve: Callable[[Credential], str] | None) -> paramiko.SSHClient:
    try:
        from siterecovery import ssh  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return _connect_minimal(host, resolve)
    return ssh.connect(host, resolve)  # type: ignore[no-any-return,unused-ignore]


def _exec(client: paramiko.SSHClient, argv: Sequence[str], timeout: float) -> tuple[int, bytes, bytes]:
    # One quoted command line; the remote login shell parses it back into exactly `argv`.
    _, out, err = client.exec_command(sh_join(argv), timeout=timeout)
    chan = out.channel
    stdout, stderr = out.read(), err.read()
    return chan.recv_exit_status(), stdout, stderr


def run_remote(host: Host, script: Path, args: Sequence[str], env: dict[str, str], timeout: float,
               resolve: Callable[[Credential], str] | None = None) -> tuple[int, bytes, bytes]:
    """Copy `script` to a private temporary file on `host`, run it with `args`, remove it.

    The environment is passed through `env NAME=VALUE` in argv (sshd refuses most SendEnv names).
    A timeout raises ScriptError, like the local runner.
    """
    client = _connect(host, resolve)
    remote = posixpath.join("/tmp", f"siterecovery-{secrets.token_hex(8)}-{script.name}")  # noqa: S108 - private name, mode 700
    try:
        sftp = client.open_sftp()
        try:
            sftp.put(str(script), remote)
            sftp.chmod(remote, 0o700)
        finally:
            sftp.close()
        argv = ["env", *[f"{k}={v}" for k, v in sorted(env.items())], remote, *args]
        try:
            return _exec(client, argv, timeout)
        except TimeoutError:
            raise ScriptError(f"script {script.name} timed out after {timeout:.0f} s on {host.name}", host=host.name,
                              operation="run_script", hint="raise timeout_seconds or check the script") from None
    finally:
        try:
            _exec(client, ["rm", "-f", remote], 30)
        except Exception:  # noqa: BLE001 - best effort: the script already ran (or failed); keep its error
            pass
        client.close()
