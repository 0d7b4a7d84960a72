"""A cycle between two endpoints: the sending agent's stream flows into the receiving agent.

The data path follows where each side runs: both local -> an OS pipe between two threads; one side local
-> that side runs in-process on the channel of the other; both remote -> the orchestrator only relays
bytes between two exec channels (hashing, compression and verification stay on the hosts), or, with
transfer_direct, the source host sends over its own ssh (peer.py) and only progress and results come
back. Bulk data never goes through SFTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
from collections.abc import Sequence
from typing import Any, TypeVar

import paramiko

from .. import agent
from ..engine import Progress, ReplicaError
from ..protocol import (
    RESULT,
    Command,
    ProtocolError,
    Receive,
    ReceiveResult,
    Send,
    SendResult,
    SendTo,
    last_json,
    parse_progress,
    parse_result,
)
from .endpoints import Endpoint, SSHEndpoint, agent_error, command, on_host

RELAY_CHUNK = 1 << 20
R = TypeVar("R")
C = TypeVar("C", bound=Command[Any])


class ChannelReader(io.RawIOBase):
    """A channel's stdout as a file; its stderr, when `stderr` is given, is fed to it as it comes."""

    def __init__(self, chan: paramiko.Channel, stderr: SenderProgress | None = None) -> None:
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


def _finish(chan: paramiko.Channel, cmd: Command[R], where: str, early_err: bytes = b"",
            host: str | None = None) -> tuple[R, bytes]:
    """The checked answer and stderr of a finished channel; raises on failure. `early_err` is stderr
    already read from the channel (the relay reads the sender's progress lines as they come)."""
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
        raise agent_error(bytes(out) + b"\n" + bytes(err), rc, where, host)
    res = last_json(bytes(out) + b"\n" + bytes(err), (f"{RESULT} ",))
    if res is None:
        raise ReplicaError(f"{where} answered no JSON", code="AgentFailed", host=host)
    return parse_result(cmd, res), bytes(err)


def _typed(cmd: Command[Any] | Sequence[str], want: type[C]) -> C:
    c = command(cmd)
    if not isinstance(c, want):
        raise ProtocolError(f"a transfer needs {want.command}, not {c.command}", "command")
    return c


def transfer(src: Endpoint, send: Send | Sequence[str], dst: Endpoint, recv: Receive | Sequence[str],
             progress: Progress | None = None, prefix: bytes = b"") -> tuple[SendResult, ReceiveResult]:
    """Run `send` at src and `receive` at dst, the stream flowing between them; (sent, received).

    `prefix` goes to the sender's stdin first (the replica's manifest for a resynchronization).
    """
    send_args, recv_args = _typed(send, Send), _typed(recv, Receive)
    if src.local:
        if dst.local:
            return _local_local(send_args, recv_args, progress, prefix, src.name, dst.name)
        assert isinstance(dst, SSHEndpoint)
        chan = dst.channel(recv_args)
        w = io.BufferedWriter(ChannelWriter(chan), RELAY_CHUNK)
        sent: SendResult | None = None
        send_exc: BaseException | None = None
        try:
            sent = agent.execute(send_args, io.BytesIO(prefix), w, progress)
            w.flush()
        except (ReplicaError, OSError) as exc:
            send_exc = on_host(src.name, exc)
        with contextlib.suppress(OSError):
            chan.shutdown_write()
        try:
            got, _ = _finish(chan, recv_args, f"{dst.name}: receive", host=dst.name)
        except ReplicaError:
            if isinstance(send_exc, ReplicaError):
                raise send_exc from None  # the sender's failure explains the torn stream
            raise  # the receiver refused: the sender's broken pipe is only a consequence
        if send_exc is not None or sent is None:
            raise send_exc or ReplicaError(f"{src.name}: send answered nothing", code="AgentFailed")
        return sent, got
    assert isinstance(src, SSHEndpoint)
    schan = src.channel(send_args)
    if prefix:
        send_all(schan, prefix)  # a manifest: up to 16 bytes per 64 KiB block
    schan.shutdown_write()
    if dst.local:
        lines = SenderProgress(progress)
        reader = io.BufferedReader(ChannelReader(schan, lines), RELAY_CHUNK)
        recv_exc: BaseException | None = None
        got_l: ReceiveResult | None = None
        try:
            got_l = agent.execute(recv_args, reader, io.BytesIO(), progress)
        except (ReplicaError, OSError) as exc:
            recv_exc = on_host(dst.name, exc)
        if recv_exc is not None or got_l is None:
            # A sender that failed (e.g. lost change tracking) ends its stream early: its own error
            # explains the torn stream better than the receiver's.
            if schan.status_event.wait(2) and schan.recv_exit_status() != 0:
                err = bytearray(lines.kept())
                while schan.recv_stderr_ready():
                    err += schan.recv_stderr(1 << 16)
                schan.close()
                raise agent_error(bytes(err), 3, f"{src.name}: send", src.name) from None
            schan.close()  # do not drain the rest of a stream nobody will apply
            raise recv_exc or ReplicaError(f"{dst.name}: receive answered nothing", code="AgentFailed")
        sent_r, _ = _finish(schan, send_args, f"{src.name}: send", lines.kept(), src.name)
        return sent_r, got_l
    assert isinstance(dst, SSHEndpoint)
    dchan = dst.channel(recv_args)
    err_lines = SenderProgress(progress)
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
        sent_r, _ = _finish(schan, send_args, f"{src.name}: send", err_lines.kept(), src.name)
    except ReplicaError as exc:
        send_err = exc
    try:
        got_r, _ = _finish(dchan, recv_args, f"{dst.name}: receive", host=dst.name)
    except ReplicaError:
        if send_err is not None:
            raise send_err from None
        raise
    if send_err is not None:
        raise send_err
    return sent_r, got_r


class SenderProgress:
    """The sending agent's stderr as the relay reads it: `P done total` lines (disk bytes scanned of the
    disk's size) go to `progress`; every other byte is kept for _finish, which finds the result there."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.other = bytearray()
        self.tail = b""

    def feed(self, data: bytes) -> None:
        *lines, self.tail = (self.tail + data).split(b"\n")
        for line in lines:
            p = parse_progress(line)
            if p is not None:
                if self.progress:
                    self.progress(*p)
            else:
                self.other += line + b"\n"

    def kept(self) -> bytes:
        return bytes(self.other) + self.tail


def _local_local(send_args: Send, recv_args: Receive, progress: Progress | None,
                 prefix: bytes, src: str = "local", dst: str = "local") -> tuple[SendResult, ReceiveResult]:
    r_fd, w_fd = os.pipe()
    box: dict[str, Any] = {}

    def receiver() -> None:
        with os.fdopen(r_fd, "rb", buffering=RELAY_CHUNK) as rf:
            try:
                box["got"] = agent.execute(recv_args, rf, io.BytesIO())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                box["exc"] = on_host(dst, exc)

    t = threading.Thread(target=receiver, name="replica-receive", daemon=True)
    t.start()
    send_exc: BaseException | None = None
    sent: SendResult | None = None
    try:
        with os.fdopen(w_fd, "wb", buffering=RELAY_CHUNK) as wf:
            sent = agent.execute(send_args, io.BytesIO(prefix), wf, progress)
    except (ReplicaError, OSError) as exc:  # BrokenPipe when the receiver refused the stream
        send_exc = on_host(src, exc)
    t.join()
    if "exc" in box:
        if isinstance(send_exc, ReplicaError):
            raise send_exc
        raise box["exc"]
    if send_exc is not None or sent is None:
        raise send_exc or ReplicaError(f"{src}: send answered nothing", code="AgentFailed")
    got: ReceiveResult = box["got"]
    return sent, got


def send_to_args(send: Send | Sequence[str], src: SSHEndpoint, dst: SSHEndpoint, recv: Receive | Sequence[str],
                 address: str, port: int, user: str, identity_file: str, known_hosts: str,
                 connect_timeout: int = 15) -> SendTo:
    """The `send-to` command that makes the source host send straight to the target's `receive`."""
    ready = dataclasses.replace(_typed(recv, Receive), ready=True)
    return SendTo.of(_typed(send, Send), from_name=src.name, to_name=dst.name, to_address=address, to_port=port,
                     to_user=user, identity_file=identity_file, known_hosts=known_hosts,
                     connect_timeout=connect_timeout, remote_argv=dst.argv(ready))


def transfer_direct(src: SSHEndpoint, cmd: SendTo | Sequence[str], progress: Progress | None = None,
                    prefix: bytes = b"") -> tuple[SendResult, ReceiveResult]:
    """Run `send-to` (from send_to_args) at the source host; (sent, received) as transfer() answers.

    Only the prefix (a resynchronization's manifest), progress lines and two JSON results cross the
    orchestrator's connection. stdin stays open until the agent is done (its EOF aborts send-to).
    """
    send_to = _typed(cmd, SendTo)
    chan = src.channel(send_to)
    lines = SenderProgress(progress)
    try:
        if prefix:
            chan.sendall(prefix)
        while True:
            d = chan.recv_stderr(1 << 16)
            if not d:
                break
            lines.feed(d)
        out = chan.makefile("rb").read()
        rc = chan.recv_exit_status()
    finally:
        chan.close()
    where = f"{src.name}: send-to"
    if rc != 0:
        raise agent_error(bytes(out) + b"\n" + lines.kept()[-4096:], rc, where, src.name)
    res = last_json(bytes(out))
    if res is None:
        raise ReplicaError(f"{where} answered no result", code="AgentFailed", host=src.name)
    both = parse_result(send_to, res)
    return both["sent"], both["received"]
