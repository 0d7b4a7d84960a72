"""The engine's host-side entry point: `python3 -m siterecovery.replica.agent <command> ...`.

The orchestrator runs it on each host (over an SSH exec channel, or in-process for local paths), so
hashing, compression, verification and apply happen where the disks are. protocol.py declares every
command and answer: control commands answer one JSON object on stdout; `send` writes the binary stream
on stdout and its result as the last stderr line; `send-to` pipes it into another host's `receive` over
this host's ssh (peer.py). Failures exit 3 with {"error": code, "message": ...}. Host side: it imports
only the standard library, xxhash and zstandard (a test holds it to that).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO, TypeVar

from . import engine, peer, process, qemu, qga, virt
from . import protocol as P
from .engine import Progress, Replica, ReplicaError, SourceState

R = TypeVar("R")

log = logging.getLogger(__name__)


# How long a command waits for another agent working on the same replica or source state (an agent
# orphaned by a dropped connection finishes or fails within seconds; a live cycle may take longer).
LOCK_WAIT = float(os.environ.get("SITERECOVERY_AGENT_LOCK_WAIT", "300"))


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid and boot id it names one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner(fd: int) -> dict[str, Any]:
    """Who holds (or last held) a lock: the record its holder wrote and keeps beating."""
    raw = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        d = json.loads(raw)
        return d if isinstance(d, dict) else {"pid": raw}
    except ValueError:
        return {"pid": raw or "?"}  # an older agent wrote only its pid


def _describe(o: dict[str, Any]) -> str:
    beat = o.get("beat")
    age = f", last heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
    return f"pid {o.get('pid', '?')} on {o.get('host', '?')} ({o.get('cmd', '?')}{age})"


def _dead_owner(o: dict[str, Any], stale_after: float) -> bool:
    """A holder that stopped beating (stopped, hung, or stuck on a connection nobody serves) on this
    host, this boot, and still the same process: safe to kill, its apply is journaled."""
    beat, pid = o.get("beat"), o.get("pid")
    if not isinstance(beat, (int, float)) or not isinstance(pid, int) or pid == os.getpid():
        return False
    if o.get("host") != socket.gethostname() or o.get("boot") != _boot_id():
        return False
    every = o.get("every")
    if isinstance(every, (int, float)):
        stale_after = max(stale_after, 6 * every)  # twice the holder's own deadline (it beats 3x per deadline)
    return time.time() - beat > stale_after and _start_time(pid) == o.get("start")


def lock_path(path: str) -> str:
    """The lock file beside a replica's meta (or a source's state) directory. Its name ends in `@lock`:
    `@` is outside the identifier set (siterecovery.paths), so no disk's directory can be another
    disk's lock file (disks `x` and `x.lock` once shared one, and a cycle deadlocked on itself)."""
    return os.path.abspath(path).rstrip("/") + "@lock"


@contextlib.contextmanager
def _exclusive(path: str, what: str, cmd: str) -> Iterator[None]:
    """One agent at a time per replica (or source state): a lock file next to its directory.

    Without it an agent left running by a dropped SSH connection (still staging or applying) and the
    next command (its recovery step) would work on the same files at once: the newcomer deletes the
    staging file under the receiver, or rolls an apply back while it is being written. The holder
    writes who it is (host, pid, start time, boot id, command) and beats every third of the dead-link
    deadline; a holder silent for twice that deadline is killed, and the newcomer's own recovery step
    (every replica command runs it first) rolls its journaled apply back or forward.
    """
    lock = lock_path(path)
    try:
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        writable = True
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES):
            raise
        # A read-only filesystem: nobody can change what is there, reading needs no exclusive right.
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            yield
            return
        writable = False
    dead = engine.dead_link_seconds()
    stop = threading.Event()
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner = _owner(fd)
                if _dead_owner(owner, 2 * dead):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(owner["pid"]), signal.SIGKILL)
                    log.warning("broke the lock on %s %s: %s stopped beating", what, path, _describe(owner))
                    time.sleep(0.05)
                    continue
                if time.monotonic() > deadline:
                    raise ReplicaError(f"another agent, {_describe(owner)}, has been working on {what} {path} for "
                                       f"over {LOCK_WAIT:.0f} s", code="Busy") from None
                time.sleep(0.05)
        if writable:
            me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
                  "boot": _boot_id(), "cmd": cmd, "since": time.time(), "every": max(0.2, dead / 3)}

            def beat() -> None:
                while True:
                    rec = json.dumps({**me, "beat": time.time()}).encode().ljust(512)
                    with contextlib.suppress(OSError):
                        os.pwrite(fd, rec, 0)
                    if stop.wait(max(0.2, dead / 3)):
                        return

            threading.Thread(target=beat, name="agent-lock-heartbeat", daemon=True).start()
        yield
    finally:
        stop.set()
        os.close(fd)  # releases the lock


def run_command(argv: list[str], stdin: BinaryIO, stdout: BinaryIO, progress: Progress | None = None) -> dict[str, Any]:
    """Run the agent command `argv` names in this process; its JSON answer (send also writes its stream)."""
    return dict(execute(P.parse_command(argv), stdin, stdout, progress))


def execute(cmd: P.Command[R], stdin: BinaryIO, stdout: BinaryIO, progress: Progress | None = None) -> R:
    """Run one command in this process; its answer, checked against the protocol's shape for it."""
    try:
        return P.parse_result(cmd, _locked(cmd, stdin, stdout, progress))
    except OSError as exc:
        # A full or read-only filesystem is said as such, with its path (the command's directory
        # when the OS names no file, as for a failed write), never as the torn stream it causes.
        err = engine.storage_error(exc, getattr(cmd, "meta", None) or getattr(cmd, "state", None))
        if err is None:
            raise
        raise err from None


def _locked(cmd: P.Command[Any], stdin: BinaryIO, stdout: BinaryIO, progress: Progress | None) -> dict[str, Any]:
    if isinstance(cmd, P._ReplicaCommand) and not isinstance(cmd, P.Scrub):
        with _exclusive(cmd.meta, "the replica", cmd.command):
            if isinstance(cmd, P.Receive) and cmd.ready:
                # From here on no other agent touches this replica until this one is done: a sender
                # that waited for this line cannot race a newer cycle's status check.
                stdout.write(P.READY + b"\n")
                stdout.flush()
            return _run(cmd, stdin, stdout, progress)
    if isinstance(cmd, (P.Send, P.SendTo, P.SourceCommit, P.SourceDrop)):
        with _exclusive(cmd.state, "the source state", cmd.command):
            return _run(cmd, stdin, stdout, progress)
    return _run(cmd, stdin, stdout, progress)


def _read_base(cmd: P.Send | P.SendTo, stdin: BinaryIO) -> str | None:
    """The replica's own manifest arrives first on stdin (resynchronization); its path here."""
    if cmd.mode != "base":
        return None
    base = os.path.join(cmd.state, "base.manifest")
    os.makedirs(cmd.state, exist_ok=True)
    with open(base, "wb") as f:
        (n,) = engine.struct.unpack("<Q", engine._read_exact(stdin, 8))
        while n:
            chunk = stdin.read(min(n, 1 << 20))
            if not chunk:
                raise engine.CorruptTransfer("base manifest torn")
            f.write(chunk)
            n -= len(chunk)
    return base


def _send(cmd: P.Send | P.SendTo, base: str | None, out: BinaryIO, progress: Progress | None) -> dict[str, Any]:
    if cmd.bandwidth:
        if not cmd.bandwidth_bucket:
            raise P.ProtocolError(f"{cmd.command}: --bandwidth needs --bandwidth-bucket (the host's shared bucket file)",
                                  "--bandwidth-bucket")
        out = engine.Throttled(out, engine.HostBucket(cmd.bandwidth_bucket, cmd.bandwidth))  # type: ignore[assignment]

    def go(nbd: dict[str, Any] | None) -> dict[str, Any]:
        return engine.send(cmd.disk, cmd.state, out, mode=cmd.mode,
                           expect_gen=bytes.fromhex(cmd.expect_gen) if cmd.expect_gen else None,
                           base_manifest=base, compress=not cmd.no_compress, progress=progress,
                           freeze=list(cmd.freeze), thaw=list(cmd.thaw),
                           seq=cmd.seq, nbd=nbd, keepalive=cmd.keepalive, settle=cmd.settle)
    if cmd.offline_format:
        os.makedirs(cmd.state, exist_ok=True)
        with qemu.offline_export(cmd.disk, cmd.offline_format, os.path.join(cmd.state, "offline.nbd")) as view:
            return go({**view, "view": "qemu-off"})
    return go(cmd.nbd)


def _remove(paths: list[str]) -> dict[str, Any]:
    removed = []
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif os.path.exists(path):
            os.unlink(path)
            removed.append(path)
    return {"removed": removed}


def _run(cmd: P.Command[Any], stdin: BinaryIO, stdout: BinaryIO, progress: Progress | None) -> dict[str, Any]:
    match cmd:
        case P.Send():
            if cmd.output:
                os.makedirs(os.path.dirname(os.path.abspath(cmd.output)), exist_ok=True)
            out_f: Any = open(cmd.output, "wb") if cmd.output else stdout  # noqa: SIM115 - closed below
            try:
                return _send(cmd, _read_base(cmd, stdin), out_f, progress)
            finally:
                if cmd.output:
                    out_f.close()
        case P.SendTo():
            base = _read_base(cmd, stdin)
            send_cmd = cmd
            return peer.send_to(cmd, stdin, lambda out: _send(send_cmd, base, out, progress))
        case P.SourceCommit():
            return {"committed": SourceState(cmd.state).commit(bytes.fromhex(cmd.gen))}
        case P.SourceStatus():
            # Read-only and without the source lock: health must not wait for a running cycle.
            return engine.source_status(cmd.disk, cmd.state, bytes.fromhex(cmd.gen) if cmd.gen else None,
                                        cmd.scan_limit)
        case P.SourceDrop():
            shutil.rmtree(cmd.state, ignore_errors=True)
            return {"dropped": True}
        case P.Digest():
            return {"digest": engine.file_digest(cmd.path)}
        case P.Copy():
            os.makedirs(os.path.dirname(os.path.abspath(cmd.dst)), exist_ok=True)
            return {"copy": engine.copy_file(cmd.src, cmd.dst)}
        case P.Remove():
            return _remove(cmd.paths)
        case P.Exists():
            # The size lets the orchestrator show a copy's total before the first byte moves.
            return {"exists": os.path.exists(cmd.path),
                    "size": os.path.getsize(cmd.path) if os.path.isfile(cmd.path) else None}
        case P.Hook():
            engine.run_argv(list(cmd.argv_), cmd.what)
            return {"ran": bool(cmd.argv_)}
        case P.Spawn():
            return process.spawn(cmd.pidfile, cmd.log, list(cmd.argv_))
        case P.Kill():
            return process.kill(cmd.pidfile, cmd.grace)
        case P.Alive():
            return {"pid": process.alive(cmd.pidfile)}
        case P.QemuStart():
            return qemu.start(cmd.run, cmd.name, cmd.spec)
        case P.QemuStop():
            return qemu.stop(cmd.run, cmd.name, cmd.grace)
        case P.QemuStatus():
            return qemu.status(cmd.run, cmd.name)
        case P.QemuControl():
            return qemu.control(cmd.run, cmd.name, cmd.action)
        case P.QemuCapture():
            return qemu.capture(cmd.run, cmd.name, cmd.disks, cmd.tag)
        case P.QemuRelease():
            return qemu.release(cmd.run, cmd.name, cmd.view, ok=not cmd.failed)
        case P.LibvirtStart():
            return virt.start(cmd.uri, cmd.domain, cmd.copy_of, cmd.disks, cmd.network, cmd.track)
        case P.LibvirtStop():
            return virt.stop(cmd.uri, cmd.domain, cmd.grace)
        case P.LibvirtStatus():
            return virt.status(cmd.uri, cmd.domain)
        case P.LibvirtControl():
            return virt.control(cmd.uri, cmd.domain, cmd.action)
        case P.LibvirtCapture():
            return virt.capture(cmd.uri, cmd.domain, cmd.run, cmd.disks, cmd.tag)
        case P.LibvirtRelease():
            return virt.release(cmd.uri, cmd.domain, cmd.run, cmd.view, ok=not cmd.failed)
        case P.QemuAgent():
            return {"answer": qga.call(qemu.paths(cmd.run, cmd.name)["qga"], cmd.execute, timeout=cmd.timeout)}
        case P._ReplicaCommand():
            return _replica(cmd, stdin, stdout, progress)
    raise P.ProtocolError(f"the agent has no handler for {cmd.command!r}", "command")


def _replica(cmd: P._ReplicaCommand[Any], stdin: BinaryIO, stdout: BinaryIO, progress: Progress | None) -> dict[str, Any]:
    r = Replica(cmd.replica, cmd.meta)
    match cmd:
        case P.Scrub():
            # Not under the replica's lock for its long read pass (cycles go on); it takes the lock to
            # confirm what it found and to record it (Replica.scrub).
            return r.scrub(lambda: _exclusive(cmd.meta, "the replica", cmd.command), start=cmd.start,
                           max_seconds=cmd.max_seconds, rate=cmd.rate or None, points=cmd.points)
        case P.Status():
            return r.status()
        case P.Receive():
            if cmd.input:
                with open(cmd.input, "rb") as f:
                    return r.receive(f, cmd.point, cmd.retention_hours, progress)
            return r.receive(stdin, cmd.point, cmd.retention_hours, progress)
        case P.Rehash():
            return r.rehash()
        case P.SeedSource():
            with _exclusive(cmd.state, "the source state", cmd.command):
                return engine.seed_source(r, cmd.state)
        case P.Adopt():
            with _exclusive(cmd.state, "the source state", cmd.command):
                return engine.adopt(r, cmd.state, bytes.fromhex(cmd.gen), cmd.manifest, dict(cmd.point))
        case P.Manifest():
            r.recover()
            with open(r.manifest, "rb") as f:
                data = f.read()
            stdout.write(engine.struct.pack("<Q", len(data)) + data)
            return {"bytes": len(data)}
        case P.Rebuild():
            return r.rebuild(cmd.seq, cmd.dest)
        case P.Revert():
            return r.revert(cmd.seq)
        case P.Prune():
            r.recover()
            return {"dropped": r.prune(cmd.hours)}
        case P.Drop():
            r.drop()
            return {"dropped": True}
    raise P.ProtocolError(f"the agent has no handler for {cmd.command!r}", "command")


F_SETPIPE_SZ = 1031
REMOTE_PROGRESS_EVERY = 64 * 1024 * 1024  # bytes between two `P done total` lines on stderr


def _widen_pipes() -> None:
    """1 MiB pipe buffers on stdin/stdout: sshd and the agent then switch context far less often."""
    import fcntl
    for fd in (0, 1):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)


class _Deadline(io.RawIOBase):
    """stdin or stdout of an agent run over SSH, with the dead-link deadline: a stream that moves no
    byte for that long (or whose parent, sshd's session, went away) ends the command with an error
    naming the network, and the agent exits and releases its lock. Without it an agent whose
    orchestrator gave up first (a silent partition) waits on its channel for hours (sshd's defaults)."""

    def __init__(self, fd: int, writing: bool, seconds: float) -> None:
        self.fd, self.writing, self.seconds = fd, writing, seconds
        self.ppid = os.getppid()

    def readable(self) -> bool:
        return not self.writing

    def writable(self) -> bool:
        return self.writing

    def _wait(self) -> None:
        end = time.monotonic() + self.seconds
        while True:
            r, w, _ = select.select([] if self.writing else [self.fd], [self.fd] if self.writing else [], [],
                                    min(1.0, self.seconds))
            if r or w:
                return
            if os.getppid() != self.ppid:
                raise ReplicaError("the agent's session ended (its parent process exited)", code="NoTraffic")
            if time.monotonic() > end:
                what = ("nobody took the stream on this host's SSH channel" if self.writing
                        else "no data arrived on this host's SSH channel")
                raise ReplicaError(f"{what} for {self.seconds:g} s: the network path went silent or the "
                                   "other side gave up; nothing torn is applied", code="NoTraffic")

    def readinto(self, b: Any) -> int:
        self._wait()
        data = os.read(self.fd, len(b))
        b[:len(data)] = data
        return len(data)

    def write(self, b: Any) -> int:
        self._wait()
        return os.write(self.fd, b)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _widen_pipes()
    out: Any = sys.stdout.buffer
    inp: Any = sys.stdin.buffer
    err = sys.stderr
    cmd: P.Command[Any] | None = None

    def answer(payload: dict[str, Any], on_stderr: bool, prefix: str) -> None:
        if on_stderr:
            err.write(f"{prefix} {json.dumps(payload)}\n")
        else:
            out.write(json.dumps(payload).encode() + b"\n")

    last = [-REMOTE_PROGRESS_EVERY]

    def progress(done: int, total: int) -> None:
        # Sparse on purpose: until a reader drains stderr, every unread byte holds back the SSH
        # channel's window (one line per 64 MiB stays far below it for any disk size).
        if done - last[0] < REMOTE_PROGRESS_EVERY and not (total and done >= total):
            return
        last[0] = done
        err.write(P.progress_line(done, total))
        err.flush()

    try:
        cmd = P.parse_command(argv)
        dead = engine.dead_link_seconds()
        if dead > 0 and isinstance(cmd, (P.Receive, P.Send, P.Manifest)) and not sys.stdin.isatty():
            # Streams over the SSH channel get the deadline (send-to's stdin is watched in peer.py).
            inp = io.BufferedReader(_Deadline(0, False, dead), 1 << 20)
            out = io.BufferedWriter(_Deadline(1, True, dead), 1 << 20)
        res = execute(cmd, inp, out, progress)
    except ReplicaError as exc:
        streaming = isinstance(cmd, P.Send)  # its stdout is the stream: the answer goes to stderr
        with contextlib.suppress(ReplicaError, OSError):  # a stdout nobody reads: the exit status says it
            answer(dict(P.failure(exc.code, str(exc), exc.path)), streaming, P.ERROR)
            err.flush()
            out.flush()
        return 3
    except OSError as exc:
        # The errno's name (ENOSPC, EACCES...) lets the fabric give the right hint; the command names
        # the step that failed when the OS gives no file name (a failed write).
        code = errno.errorcode.get(exc.errno or 0, "OSError")
        where = exc.filename or f"during {argv[0] if argv else 'the command'}"
        answer({"error": code, "message": f"{exc.strerror or exc} ({code}): {where}"}, isinstance(cmd, P.Send), P.ERROR)
        err.flush()
        out.flush()
        return 3
    if isinstance(cmd, P.Send) and not cmd.output:
        out.flush()
    answer(dict(res), isinstance(cmd, P.Send) and not cmd.output, P.RESULT)
    out.flush()
    err.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
