"""Host to host: the source host pipes its send stream into `receive` on the target over its own ssh.

`send_to` runs on the source host inside the agent (stdlib only): it starts OpenSSH's client with the
host's own identity and known_hosts files (strict host key checking, batch mode), waits until the
receiving agent holds the replica's lock, then sends. The orchestrator's side (orchestrator/transfer.py,
transfer_direct) only starts `send-to` and reads its progress lines and result; no disk byte crosses
it. It keeps the channel's stdin open: when it closes (the orchestrator died or gave up) send-to kills
its ssh, so no cycle lands that nobody waits for. Errors keep transfer()'s meaning.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shlex
import subprocess
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from .engine import ReplicaError, dead_link_seconds, storage_error
from .protocol import READY, SendTo, last_json, parse_failure

F_SETPIPE_SZ = 1031
CHUNK = 1 << 20


def ssh_argv(a: SendTo, remote: str) -> list[str]:
    """OpenSSH client argv for `send-to`: nothing from ~/.ssh or an agent decides trust or identity."""
    alive = max(1, round(dead_link_seconds() / 3))
    o = [f"UserKnownHostsFile={a.known_hosts}", "GlobalKnownHostsFile=/dev/null", "StrictHostKeyChecking=yes",
         "UpdateHostKeys=no", "CheckHostIP=no", "BatchMode=yes", "IdentitiesOnly=yes", "IdentityAgent=none",
         "PasswordAuthentication=no", "KbdInteractiveAuthentication=no", "ClearAllForwardings=yes",
         # a silent path is given up after the dead-link deadline (3 unanswered keepalives)
         f"ConnectTimeout={a.connect_timeout}", f"ServerAliveInterval={alive}", "ServerAliveCountMax=3",
         # the stream is zstd already; OpenSSH's default ciphers with AES-GCM (AES-NI) first, spelt out
         # because the "^" prepend syntax is missing from older clients
         "Compression=no", "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
         "aes128-ctr,aes192-ctr,aes256-ctr", "LogLevel=ERROR"]
    argv = ["ssh", "-T", "-x", "-a", "-i", a.identity_file]
    for opt in o:
        argv += ["-o", opt]
    return [*argv, "-p", str(a.to_port), "-l", a.to_user, "--", a.to_address, remote]


def _tail(text: bytes, n: int = 600) -> str:
    lines = [ln for ln in text.decode(errors="replace").splitlines() if ln.strip() and not ln.startswith("P ")]
    return " | ".join(lines)[-n:]


def send_to(a: SendTo, stdin: BinaryIO,
            run_send: Callable[[BinaryIO], dict[str, Any]]) -> dict[str, Any]:
    """Start ssh to the target, wait for its receiver, run the send into it; {"sent": ..., "received": ...}.

    `stdin` is the orchestrator's side: its end (EOF) aborts the transfer.
    """
    src, dst = a.from_name, a.to_name
    where = f"{src} -> {dst}"
    if not os.path.isfile(a.known_hosts):
        raise ReplicaError(f"{where}: {src} cannot verify the SSH host key of {dst}: its peer_ssh.known_hosts "
                           f"{a.known_hosts} does not exist on {src}; nothing was sent or applied", code="PeerHostKey")
    if not os.path.isfile(a.identity_file):
        raise ReplicaError(f"{where}: peer_ssh.identity_file {a.identity_file} does not exist on {src} (it is "
                           "read there, by the host's ssh)", code="PeerConfig")
    remote = shlex.join(a.remote_argv)
    try:
        proc = subprocess.Popen(ssh_argv(a, remote), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0, close_fds=True)
    except FileNotFoundError:
        raise ReplicaError(f"{where}: {src} has no OpenSSH client (ssh) on its PATH; install openssh-client "
                           "there or remove its peer_ssh", code="PeerConfig") from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    err = bytearray()
    out = bytearray()

    def drain(f: BinaryIO, buf: bytearray, keep: int) -> None:
        # The receiver's progress lines come back through ssh's stderr: drained so it never blocks.
        while True:
            d = f.read(1 << 16)
            if not d:
                return
            buf += d
            if len(buf) > keep:
                del buf[:len(buf) - keep]

    t_err = threading.Thread(target=drain, args=(proc.stderr, err, 1 << 16), daemon=True)
    t_err.start()
    gone = threading.Event()

    def watch() -> None:
        # The orchestrator holds our stdin open while it waits for the result; EOF means it is gone
        # (killed, or its connection dropped): stop the stream rather than land a cycle nobody records.
        # os.read on the descriptor: a daemon thread blocked inside the BufferedReader would hold its
        # lock at interpreter exit and abort the agent.
        with contextlib.suppress(OSError):
            while os.read(fd, 1 << 12):
                pass
        if proc.poll() is None:
            gone.set()
            proc.kill()

    try:
        fd = stdin.fileno()
    except (OSError, ValueError, AttributeError):
        fd = -1  # in-process (tests): nobody to outlive
    if fd >= 0:
        threading.Thread(target=watch, daemon=True).start()
    # Nothing is read, frozen or sent until the receiving agent holds the replica: a refused host key
    # or login costs no work at the source.
    for _ in range(200):  # a login shell may print lines of its own first
        first = proc.stdout.readline()
        if not first or first.strip() == READY:
            break
        out += first
    if first.strip() != READY:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        rest = proc.stdout.read()
        out += rest or b""
        rc = proc.wait()
        t_err.join()
        raise _failure(a, rc, bytes(out), bytes(err), before=True)
    t_out = threading.Thread(target=drain, args=(proc.stdout, out, 1 << 20), daemon=True)
    t_out.start()
    with contextlib.suppress(OSError):
        fcntl.fcntl(proc.stdin.fileno(), F_SETPIPE_SZ, CHUNK)
    w = io.BufferedWriter(proc.stdin, CHUNK)  # type: ignore[arg-type]
    sent: dict[str, Any] = {}
    send_exc: BaseException | None = None
    try:
        sent = run_send(w)
        w.flush()
    except ReplicaError as exc:
        send_exc = exc
    except OSError as exc:  # BrokenPipe when the receiver or the link gave up; a full disk says so
        send_exc = storage_error(exc, a.state) or exc
    with contextlib.suppress(OSError):
        w.close()
    rc = proc.wait()
    t_out.join()
    t_err.join()
    if gone.is_set():
        raise ReplicaError(f"{where}: the orchestrator's connection to {src} closed; the stream was stopped",
                           code="PeerLinkLost")
    if rc != 0:
        if isinstance(send_exc, ReplicaError):
            raise send_exc  # the sender's failure explains the torn stream
        raise _failure(a, rc, bytes(out), bytes(err), before=False)
    if send_exc is not None:
        raise send_exc
    got = last_json(bytes(out))
    if got is None:
        raise ReplicaError(f"{where}: receive at {dst} answered no JSON: {_tail(bytes(out) + bytes(err))}",
                           code="AgentFailed")
    return {"sent": sent, "received": got}


def _failure(a: SendTo, rc: int, out: bytes, err: bytes, before: bool) -> ReplicaError:
    """The ReplicaError for a failed ssh / receive: a host key, login or link problem, or the receiver's refusal."""
    src, dst = a.from_name, a.to_name
    where = f"{src} -> {dst}"
    target = f"{a.to_address}:{a.to_port}"
    said = _tail(err)
    refused = parse_failure(last_json(out))
    if refused is not None:
        return ReplicaError(f"{dst}: receive: {refused['message']}", code=refused["error"])
    text = err.decode(errors="replace")
    if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        changed = "CHANGED" in text
        return ReplicaError(
            f"{where}: {src} refused the SSH host key of {dst} ({target}): "
            f"{'it CHANGED from the one' if changed else 'no matching key is'} in {a.known_hosts} on {src}; "
            f"nothing was sent or applied (ssh: {said})", code="PeerHostKey")
    if "Permission denied" in text:
        return ReplicaError(f"{where}: {dst} ({target}) refused {src}'s key {a.identity_file} for user "
                            f"{a.to_user} (ssh: {said})", code="PeerAuth")
    if rc < 0:
        return ReplicaError(f"{where}: the ssh client on {src} was killed (signal {-rc}) "
                            f"{'before the stream started' if before else 'mid-stream'}; the receiver applies "
                            "no torn stream", code="PeerLinkLost")
    if rc == 255:
        return ReplicaError(f"{where}: ssh from {src} to {dst} ({target}) failed: {said or 'no message'}",
                            code="PeerLinkLost")
    said = _tail(out + b"\n" + err) or "no output"
    return ReplicaError(f"{where}: receive at {dst} exited {rc}: {said}", code="AgentFailed")
