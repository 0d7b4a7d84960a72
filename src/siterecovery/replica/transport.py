"""Where the agent runs: in this process for local paths, over a paramiko exec channel for remote hosts.

A transfer wires the sending agent's stream into the receiving agent: both local -> an OS pipe between
two threads; one side local -> that side runs in-process on the channel of the other; both remote ->
the orchestrator only relays bytes between two exec channels (hashing, compression and verification
stay on the hosts), unless the source host sends itself (peer.py). Bulk data never goes through SFTP.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paramiko

from .. import ssh
from ..model import Host
from ..render import sh_join
from . import agent
from .engine import Progress, ReplicaError

RELAY_CHUNK = 1 << 20


def _error(payload: bytes | str, rc: int, where: str, host: str | None = None) -> ReplicaError:
    text = payload.decode(errors="replace") if isinstance(payload, bytes) else payload
    for line in reversed(text.strip().splitlines()):
        line = line[2:] if line.startswith(("E ", "R ")) else line
        with contextlib.suppress(ValueError):
            d = json.loads(line)
            if isinstance(d, dict) and "error" in d:
                return ReplicaError(f"{where}: {d['message']}", code=d["error"], path=d.get("path"), host=host)
    tail = text.strip()[-400:]
    return ReplicaError(f"{where}: agent exited {rc}: {tail or 'no output'}", code="AgentFailed", host=host)


def _on(host: str, exc: BaseException) -> BaseException:
    """`exc` marked with the host it happened on (an in-process agent's error names no host itself)."""
    if isinstance(exc, ReplicaError) and exc.host is None:
        exc.host = host
    return exc


class Endpoint:
    """One host's agent. `call` runs a control command, `transfer` a cycle between two endpoints."""

    name: str
    local: bool

    def call(self, args: Sequence[str], stdin: bytes = b"") -> dict[str, Any]:
        raise NotImplementedError

    def raw(self, args: Sequence[str], stdin: bytes = b"") -> bytes:
        raise NotImplementedError


@dataclass
class LocalEndpoint(Endpoint):
    name: str = "local"
    local: bool = True

    def call(self, args: Sequence[str], stdin: bytes = b"") -> dict[str, Any]:
        try:
            return agent.run_command(list(args), io.BytesIO(stdin), io.BytesIO())
        except ReplicaError as exc:
            raise _on(self.name, exc) from None

    def raw(self, args: Sequence[str], stdin: bytes = b"") -> bytes:
        out = io.BytesIO()
        try:
            agent.run_command(list(args), io.BytesIO(stdin), out)
        except ReplicaError as exc:
            raise _on(self.name, exc) from None
        return out.getvalue()


@dataclass
class SSHEndpoint(Endpoint):
    """An agent reached over SSH: `python -m siterecovery.replica.agent` on the host, through the
    orchestrator's one connection pool (ssh.Pool) for both commands and streams."""

    name: str
    pool: ssh.Pool
    host: Host
    python: str = "python3"
    local: bool = False
    timeout: float = 600.0
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, args: Sequence[str]) -> list[str]:
        pre = ["env", *(f"{k}={v}" for k, v in self.env.items())] if self.env else []
        return [*pre, self.python, "-m", "siterecovery.replica.agent", *args]

    def channel(self, args: Sequence[str]) -> paramiko.Channel:
        return self.pool.channel(self.host, self.argv(args), timeout=self.timeout)

    def raw(self, args: Sequence[str], stdin: bytes = b"") -> bytes:
        r = self.pool.run(self.host, self.argv(args), stdin=stdin or None, deadline=self.timeout)
        if r.rc != 0:
            raise _error(r.stdout + b"\n" + r.stderr, r.rc, f"{self.name}: {args[0]}", self.name)
        return r.stdout

    def call(self, args: Sequence[str], stdin: bytes = b"") -> dict[str, Any]:
        out = self.raw(args, stdin)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise ReplicaError(f"{self.name}: {args[0]} answered no JSON", code="AgentFailed") from None


class ChannelReader(io.RawIOBase):
    """A channel's stdout as a file; its stderr, when `stderr` is given, is fed to it as it comes."""

    def __init__(self, chan: paramiko.Channel, stderr: _SenderProgress | None = None) -> None:
        self.chan = chan
        self.stderr = stderr

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.chan.recv(len(b))
        n = len(data)
        b[:n] = data
        if self.stderr is not None and self.chan.recv_stderr_ready():
            self.stderr.feed(self.chan.recv_stderr(1 << 16))
        return n


class ChannelWriter(io.RawIOBase):
    def __init__(self, chan: paramiko.Channel) -> None:
        self.chan = chan

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        send_all(self.chan, b)
        return len(b)


def send_all(chan: paramiko.Channel, b: Any) -> None:
    """Channel.sendall without its copies: it re-slices the rest of the buffer after every 32 KiB
    packet (up to 1 MiB copied per packet, 16x the data); packet-sized pieces copy each byte once."""
    mv = memoryview(b).cast("B")
    n = len(mv)
    step = max(1024, chan.out_max_packet_size - 64)  # what one CHANNEL_DATA packet carries
    off = 0
    while off < n:
        sent = chan.send(bytes(mv[off:off + step]))
        if sent == 0:
            raise BrokenPipeError("the SSH channel closed while sending")
        off += sent


def _finish(chan: paramiko.Channel, where: str, early_err: bytes = b"",
            host: str | None = None) -> tuple[dict[str, Any], bytes]:
    """Exit status, stdout rest and stderr of a finished channel; raises on failure. `early_err` is
    stderr already read from the channel (the relay reads the sender's progress lines as they come)."""
    out = bytearray()
    while True:
        d = chan.recv(1 << 16)
        if not d:
            break
        out += d
    rc = chan.recv_exit_status()
    err = bytearray(early_err)
    while chan.recv_stderr_ready():
        err += chan.recv_stderr(1 << 16)
    chan.close()
    if rc != 0:
        raise _error(bytes(out) + b"\n" + bytes(err), rc, where, host)
    res: dict[str, Any] = {}
    for line in reversed((bytes(out) + b"\n" + bytes(err)).decode(errors="replace").splitlines()):
        line = line[2:] if line.startswith("R ") else line
        with contextlib.suppress(ValueError):
            d = json.loads(line)
            if isinstance(d, dict):
                res = d
                break
    return res, bytes(err)


def transfer(src: Endpoint, send_args: list[str], dst: Endpoint, recv_args: list[str],
             progress: Progress | None = None, prefix: bytes = b"") -> tuple[dict[str, Any], dict[str, Any]]:
    """Run `send` at src and `receive` at dst, the stream flowing between them; (sent, received).

    `prefix` goes to the sender's stdin first (the replica's manifest for a resynchronization).
    """
    if src.local:
        if dst.local:
            return _local_local(send_args, recv_args, progress, prefix, src.name, dst.name)
        assert isinstance(dst, SSHEndpoint)
        chan = dst.channel(recv_args)
        w = io.BufferedWriter(ChannelWriter(chan), RELAY_CHUNK)
        sent: dict[str, Any] = {}
        send_exc: BaseException | None = None
        try:
            sent = agent.run_command(send_args, io.BytesIO(prefix), w, progress)
            w.flush()
        except (ReplicaError, OSError) as exc:
            send_exc = _on(src.name, exc)
        with contextlib.suppress(OSError):
            chan.shutdown_write()
        try:
            got, _ = _finish(chan, f"{dst.name}: receive", host=dst.name)
        except ReplicaError:
            if isinstance(send_exc, ReplicaError):
                raise send_exc from None  # the sender's failure explains the torn stream
            raise  # the receiver refused: the sender's broken pipe is only a consequence
        if send_exc is not None:
            raise send_exc
        return sent, got
    assert isinstance(src, SSHEndpoint)
    schan = src.channel(send_args)
    if prefix:
        send_all(schan, prefix)  # a manifest: up to 16 bytes per 64 KiB block
    schan.shutdown_write()
    if dst.local:
        lines = _SenderProgress(progress)
        reader = io.BufferedReader(ChannelReader(schan, lines), RELAY_CHUNK)
        recv_exc: BaseException | None = None
        got = {}
        try:
            got = agent.run_command(recv_args, reader, io.BytesIO(), progress)
        except (ReplicaError, OSError) as exc:
            recv_exc = _on(dst.name, exc)
        if recv_exc is not None:
            # A sender that failed (e.g. lost change tracking) ends its stream early: its own error
            # explains the torn stream better than the receiver's.
            if schan.status_event.wait(2) and schan.recv_exit_status() != 0:
                err = bytearray(lines.kept())
                while schan.recv_stderr_ready():
                    err += schan.recv_stderr(1 << 16)
                schan.close()
                raise _error(bytes(err), 3, f"{src.name}: send", src.name) from None
            schan.close()  # do not drain the rest of a stream nobody will apply
            raise recv_exc
        sent, _ = _finish(schan, f"{src.name}: send", lines.kept(), src.name)
        return sent, got
    assert isinstance(dst, SSHEndpoint)
    dchan = dst.channel(recv_args)
    err_lines = _SenderProgress(progress)
    try:
        while True:
            data = schan.recv(RELAY_CHUNK)
            if not data:
                break
            send_all(dchan, data)
            if schan.recv_stderr_ready():
                err_lines.feed(schan.recv_stderr(1 << 16))
        while schan.recv_stderr_ready():  # lines that came with the end of the stream
            err_lines.feed(schan.recv_stderr(1 << 16))
    except OSError:
        pass  # one side gave up; its exit status says why
    with contextlib.suppress(OSError):
        dchan.shutdown_write()
    send_err: ReplicaError | None = None
    try:
        sent, _ = _finish(schan, f"{src.name}: send", err_lines.kept(), src.name)
    except ReplicaError as exc:
        send_err = exc
    try:
        got, _ = _finish(dchan, f"{dst.name}: receive", host=dst.name)
    except ReplicaError:
        if send_err is not None:
            raise send_err from None
        raise
    if send_err is not None:
        raise send_err
    return sent, got


class _SenderProgress:
    """The sending agent's stderr as the relay reads it: `P done total` lines (disk bytes scanned of the
    disk's size) go to `progress`; every other byte is kept for _finish, which finds the result there."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.other = bytearray()
        self.tail = b""

    def feed(self, data: bytes) -> None:
        *lines, self.tail = (self.tail + data).split(b"\n")
        for line in lines:
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"P" and parts[1].isdigit() and parts[2].isdigit():
                if self.progress:
                    self.progress(int(parts[1]), int(parts[2]))
            else:
                self.other += line + b"\n"

    def kept(self) -> bytes:
        return bytes(self.other) + self.tail


def _local_local(send_args: list[str], recv_args: list[str], progress: Progress | None,
                 prefix: bytes, src: str = "local", dst: str = "local") -> tuple[dict[str, Any], dict[str, Any]]:
    r_fd, w_fd = os.pipe()
    box: dict[str, Any] = {}

    def receiver() -> None:
        with os.fdopen(r_fd, "rb", buffering=RELAY_CHUNK) as rf:
            try:
                box["got"] = agent.run_command(recv_args, rf, io.BytesIO())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                box["exc"] = _on(dst, exc)

    t = threading.Thread(target=receiver, name="replica-receive", daemon=True)
    t.start()
    send_exc: BaseException | None = None
    sent: dict[str, Any] = {}
    try:
        with os.fdopen(w_fd, "wb", buffering=RELAY_CHUNK) as wf:
            sent = agent.run_command(send_args, io.BytesIO(prefix), wf, progress)
    except (ReplicaError, OSError) as exc:  # BrokenPipe when the receiver refused the stream
        send_exc = _on(src, exc)
    t.join()
    if "exc" in box:
        if isinstance(send_exc, ReplicaError):
            raise send_exc
        raise box["exc"]
    if send_exc is not None:
        raise send_exc
    return sent, box["got"]


def stream_argv(python: str, args: Sequence[str]) -> str:
    """The shell line an SSH endpoint runs (for logs and docs)."""
    return sh_join([python, "-m", "siterecovery.replica.agent", *args])
