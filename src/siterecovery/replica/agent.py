"""The engine's host-side entry point: `python3 -m siterecovery.replica.agent <command> ...`.

The linux fabric runs it on each host (over an SSH exec channel, or in-process for local paths), so
hashing, compression, verification and apply happen where the disks are. Control commands answer one
JSON object on stdout; `send` writes the binary stream on stdout and its result as the last stderr
line; `send-to` pipes it into another host's `receive` over this host's ssh (peer.py). Failures exit 3
with {"error": code, "message": ...}. Also starts and stops `process` VMs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from . import engine
from .engine import Progress, Replica, ReplicaError, SourceState

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siterecovery.replica.agent")
    sub = p.add_subparsers(dest="cmd", required=True)

    def rep(name: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name)
        s.add_argument("--replica", required=True)
        s.add_argument("--meta", required=True)
        return s

    rep("status")
    s = rep("receive")
    s.add_argument("--point", required=True, help="JSON: id, created_at, consistency")
    s.add_argument("--retention-hours", type=float, default=0)
    s.add_argument("--input", help="read the stream from this file (offline import)")
    s.add_argument("--ready", action="store_true",
                   help="print a ready line on stdout once this agent holds the replica (send-to waits for it)")
    rep("rehash")
    rep("manifest")
    s = rep("rebuild")
    s.add_argument("--seq", type=int, required=True)
    s.add_argument("--dest", required=True)
    s = rep("revert")
    s.add_argument("--seq", type=int, required=True)
    s = rep("prune")
    s.add_argument("--hours", type=float, required=True)
    rep("drop")
    s = rep("scrub")
    s.add_argument("--start", type=int, default=0, help="block to start from (where the last slice stopped)")
    s.add_argument("--max-seconds", type=float, default=60.0, help="stop after this long and answer `next`")
    s.add_argument("--rate", type=float, default=0, help="read at most this many bytes/s (0: unlimited)")
    s.add_argument("--points", action="store_true", help="also verify the undo logs (the recovery points)")
    # send's options, shared with send-to
    send = argparse.ArgumentParser(add_help=False)
    s = send
    s.add_argument("--disk", required=True)
    s.add_argument("--state", required=True)
    s.add_argument("--mode", choices=["full", "delta", "base"], default="delta")
    s.add_argument("--expect-gen")
    s.add_argument("--no-compress", action="store_true")
    s.add_argument("--freeze", default="[]")
    s.add_argument("--thaw", default="[]")
    s.add_argument("--quiesce", default="[]")
    s.add_argument("--seq", type=int, default=0)
    s.add_argument("--nbd", default=None, help="JSON {socket, export, bitmap}: read this point-in-time view over NBD")
    s.add_argument("--offline-format", default=None, choices=["raw", "qcow2"],
                   help="the disk of a QEMU VM that is off: read its guest-visible bytes through qemu-nbd")
    s.add_argument("--keepalive", type=float, default=None,
                   help="seconds of silence after which a NOP record goes out (default: dead-link deadline / 3)")
    s.add_argument("--bandwidth", type=float, default=None,
                   help="cap in bytes/s on everything this host sends, shared through --bandwidth-bucket")
    s.add_argument("--bandwidth-bucket", default=None, help="the host's token bucket file (one per host)")
    sub.add_parser("send", parents=[send]).add_argument("--output", help="write the stream to this file (offline export)")
    s = sub.add_parser("send-to", parents=[send], add_help=False,
                       help="send, piped into `receive` on another host over this host's own ssh")
    s.add_argument("--from-name", required=True, help="this host's name (for messages)")
    s.add_argument("--to-name", required=True, help="the receiving host's name (for messages)")
    s.add_argument("--to-address", required=True)
    s.add_argument("--to-port", type=int, default=22)
    s.add_argument("--to-user", required=True)
    s.add_argument("--identity-file", required=True, help="private key file on this host")
    s.add_argument("--known-hosts", required=True, help="known_hosts file on this host")
    s.add_argument("--connect-timeout", type=int, default=15)
    s.add_argument("--remote-argv", required=True, help="JSON list: the receive command at the other host")
    s = sub.add_parser("source-commit")
    s.add_argument("--state", required=True)
    s.add_argument("--gen", required=True)
    s = sub.add_parser("source-drop")
    s.add_argument("--state", required=True)
    s = sub.add_parser("source-status")
    s.add_argument("--disk", required=True)
    s.add_argument("--state", required=True)
    s.add_argument("--gen", default=None, help="the generation the replica holds")
    s.add_argument("--scan-limit", type=int, default=1 << 30, help="hash disks up to this size to count pending bytes")
    s = sub.add_parser("digest")
    s.add_argument("--path", required=True)
    s = sub.add_parser("copy")
    s.add_argument("--src", required=True)
    s.add_argument("--dst", required=True)
    s = sub.add_parser("remove")
    s.add_argument("paths", nargs="+")
    s = sub.add_parser("spawn")
    s.add_argument("--pidfile", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("argv", nargs=argparse.REMAINDER)
    s = sub.add_parser("kill")
    s.add_argument("--pidfile", required=True)
    s.add_argument("--grace", type=float, default=10)
    s = sub.add_parser("alive")
    s.add_argument("--pidfile", required=True)
    s = sub.add_parser("exists")
    s.add_argument("--path", required=True)
    s = sub.add_parser("hook", help="run a VM's freeze, thaw or quiesce command (a consistency group's hold)")
    s.add_argument("--what", required=True, choices=("freeze", "thaw", "quiesce"))
    s.add_argument("--argv", required=True, help="the command as a JSON list")
    for name in ("qemu-start", "qemu-stop", "qemu-status", "qemu-control", "qemu-capture", "qemu-release"):
        s = sub.add_parser(name)
        s.add_argument("--run", required=True, help="the VM's run directory on this host")
        s.add_argument("--name", required=True, help="vm or test")
        if name == "qemu-start":
            s.add_argument("--spec", required=True, help="JSON: memory_mb, vcpus, kernel, initrd, append, disks, args")
        elif name == "qemu-stop":
            s.add_argument("--grace", type=float, default=30)
        elif name == "qemu-control":
            s.add_argument("--action", required=True, choices=["pause", "cont"])
        elif name == "qemu-capture":
            s.add_argument("--disks", required=True, help="JSON: [{node, format, prev}]")
            s.add_argument("--tag", required=True)
        elif name == "qemu-release":
            s.add_argument("--view", required=True, help="JSON: what qemu-capture answered")
            s.add_argument("--failed", action="store_true", help="the cycle failed: keep the bitmap chain")
    return p


# How long a command waits for another agent working on the same replica or source state (an agent
# orphaned by a dropped connection finishes or fails within seconds; a live cycle may take longer).
LOCK_WAIT = float(os.environ.get("SITERECOVERY_AGENT_LOCK_WAIT", "300"))
_REPLICA_CMDS = frozenset({"status", "receive", "rehash", "manifest", "rebuild", "revert", "prune", "drop"})
_SOURCE_CMDS = frozenset({"send", "send-to", "source-commit", "source-drop"})


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
    """Run one agent command in this process; its JSON result (send also writes its stream)."""
    a = _parser().parse_args(argv)
    try:
        return _locked(a, stdin, stdout, progress)
    except OSError as exc:
        # A full or read-only filesystem is said as such, with its path (the command's directory
        # when the OS names no file, as for a failed write), never as the torn stream it causes.
        err = engine.storage_error(exc, getattr(a, "meta", None) or getattr(a, "state", None))
        if err is None:
            raise
        raise err from None


def _locked(a: argparse.Namespace, stdin: BinaryIO, stdout: BinaryIO, progress: Progress | None) -> dict[str, Any]:
    if a.cmd in _REPLICA_CMDS:
        with _exclusive(a.meta, "the replica", a.cmd):
            if getattr(a, "ready", False):
                # From here on no other agent touches this replica until this one is done: a sender
                # that waited for this line cannot race a newer cycle's status check.
                from .peer import READY
                stdout.write(READY + b"\n")
                stdout.flush()
            return _run(a, stdin, stdout, progress)
    if a.cmd in _SOURCE_CMDS:
        with _exclusive(a.state, "the source state", a.cmd):
            return _run(a, stdin, stdout, progress)
    return _run(a, stdin, stdout, progress)


def _read_base(a: argparse.Namespace, stdin: BinaryIO) -> str | None:
    """The replica's own manifest arrives first on stdin (resynchronization); its path here."""
    if a.mode != "base":
        return None
    base = os.path.join(a.state, "base.manifest")
    os.makedirs(a.state, exist_ok=True)
    with open(base, "wb") as f:
        (n,) = engine.struct.unpack("<Q", engine._read_exact(stdin, 8))
        while n:
            chunk = stdin.read(min(n, 1 << 20))
            if not chunk:
                raise engine.CorruptTransfer("base manifest torn")
            f.write(chunk)
            n -= len(chunk)
    return base


def _send(a: argparse.Namespace, base: str | None, out: BinaryIO, progress: Progress | None) -> dict[str, Any]:
    if a.bandwidth:
        if not a.bandwidth_bucket:
            raise ReplicaError("--bandwidth needs --bandwidth-bucket (the host's shared bucket file)")
        out = engine.Throttled(out, engine.HostBucket(a.bandwidth_bucket, a.bandwidth))  # type: ignore[assignment]

    def go(nbd: dict[str, Any] | None) -> dict[str, Any]:
        return engine.send(a.disk, a.state, out, mode=a.mode,
                           expect_gen=bytes.fromhex(a.expect_gen) if a.expect_gen else None,
                           base_manifest=base, compress=not a.no_compress, progress=progress,
                           freeze=json.loads(a.freeze), thaw=json.loads(a.thaw), quiesce=json.loads(a.quiesce),
                           seq=a.seq, nbd=nbd, keepalive=a.keepalive)
    if a.offline_format:
        from .qemu import offline_export
        os.makedirs(a.state, exist_ok=True)
        with offline_export(a.disk, a.offline_format, os.path.join(a.state, "offline.nbd")) as view:
            return go({**view, "view": "qemu-off"})
    return go(json.loads(a.nbd) if a.nbd else None)


def _run(a: argparse.Namespace, stdin: BinaryIO, stdout: BinaryIO, progress: Progress | None) -> dict[str, Any]:
    cmd = a.cmd
    if cmd == "send":
        if a.output:
            os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        out_f: Any = open(a.output, "wb") if a.output else stdout  # noqa: SIM115 - closed below
        try:
            return _send(a, _read_base(a, stdin), out_f, progress)
        finally:
            if a.output:
                out_f.close()
    if cmd == "send-to":
        from .peer import send_to
        base = _read_base(a, stdin)
        return send_to(a, stdin, lambda out: _send(a, base, out, progress))
    if cmd == "source-commit":
        return {"committed": SourceState(a.state).commit(bytes.fromhex(a.gen))}
    if cmd == "source-status":
        # Read-only and without the source lock: health must not wait for a running cycle.
        return engine.source_status(a.disk, a.state, bytes.fromhex(a.gen) if a.gen else None, a.scan_limit)
    if cmd == "source-drop":
        import shutil
        shutil.rmtree(a.state, ignore_errors=True)
        return {"dropped": True}
    if cmd == "digest":
        return {"digest": engine.file_digest(a.path)}
    if cmd == "copy":
        os.makedirs(os.path.dirname(os.path.abspath(a.dst)), exist_ok=True)
        return {"copy": engine.copy_file(a.src, a.dst)}
    if cmd == "remove":
        import shutil
        removed = []
        for path in a.paths:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif os.path.exists(path):
                os.unlink(path)
                removed.append(path)
        return {"removed": removed}
    if cmd == "exists":
        # The size lets the orchestrator show a copy's total before the first byte moves.
        return {"exists": os.path.exists(a.path), "size": os.path.getsize(a.path) if os.path.isfile(a.path) else None}
    if cmd == "hook":
        argv = json.loads(a.argv)
        engine.run_argv(argv, a.what)
        return {"ran": bool(argv)}
    if cmd == "spawn":
        return spawn(a.pidfile, a.log, [x for x in a.argv if x != "--"] if a.argv[:1] == ["--"] else a.argv)
    if cmd == "kill":
        return kill(a.pidfile, a.grace)
    if cmd == "alive":
        return {"pid": alive(a.pidfile)}
    if cmd.startswith("qemu-"):
        from . import qemu
        if cmd == "qemu-start":
            return qemu.start(a.run, a.name, json.loads(a.spec))
        if cmd == "qemu-stop":
            return qemu.stop(a.run, a.name, a.grace)
        if cmd == "qemu-status":
            return qemu.status(a.run, a.name)
        if cmd == "qemu-control":
            return qemu.control(a.run, a.name, a.action)
        if cmd == "qemu-capture":
            return qemu.capture(a.run, a.name, json.loads(a.disks), a.tag)
        if cmd == "qemu-release":
            return qemu.release(a.run, a.name, json.loads(a.view), ok=not a.failed)
    r = Replica(a.replica, a.meta)
    if cmd == "scrub":
        # Not under the replica's lock for its long read pass (cycles go on); it takes the lock to
        # confirm what it found and to record it (Replica.scrub).
        return r.scrub(lambda: _exclusive(a.meta, "the replica", a.cmd), start=a.start, max_seconds=a.max_seconds,
                       rate=a.rate or None, points=a.points)
    if cmd == "status":
        return r.status()
    if cmd == "receive":
        point = json.loads(a.point)
        if a.input:
            with open(a.input, "rb") as f:
                return r.receive(f, point, a.retention_hours, progress)
        return r.receive(stdin, point, a.retention_hours, progress)
    if cmd == "rehash":
        return r.rehash()
    if cmd == "manifest":
        r.recover()
        with open(r.manifest, "rb") as f:
            data = f.read()
        stdout.write(engine.struct.pack("<Q", len(data)) + data)
        return {"bytes": len(data)}
    if cmd == "rebuild":
        return r.rebuild(a.seq, a.dest)
    if cmd == "revert":
        return r.revert(a.seq)
    if cmd == "prune":
        r.recover()
        return {"dropped": r.prune(a.hours)}
    if cmd == "drop":
        r.drop()
        return {"dropped": True}
    raise ReplicaError(f"unknown command {cmd}")


# ---- process VMs ----------------------------------------------------------------------------------


def alive(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # A zombie or a reused pid is not our VM.
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return None
    except FileNotFoundError:
        return None
    return pid


# VMs this process started (the agent in-process for local hosts): kept so they are reaped, not
# left as zombies or reported as leaked by Popen's finalizer.
_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(pidfile: str, log: str, argv: list[str]) -> dict[str, Any]:
    """Start `argv` detached (own session, stdin closed, stdout/stderr appended to `log`)."""
    pid = alive(pidfile)
    if pid:
        return {"pid": pid, "started": False}
    os.makedirs(os.path.dirname(os.path.abspath(pidfile)), exist_ok=True)
    with open(log, "ab") as lf:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                             start_new_session=True, close_fds=True)
    _children[p.pid] = p
    with open(pidfile + ".tmp", "w") as f:
        f.write(f"{p.pid}\n")
    os.replace(pidfile + ".tmp", pidfile)
    time.sleep(0.05)
    rc = p.poll()
    if rc is not None:
        _children.pop(p.pid, None)
        raise ReplicaError(f"{argv[0]} exited at once with status {rc}; see {log}", code="StartFailed")
    return {"pid": p.pid, "started": True}


def kill(pidfile: str, grace: float) -> dict[str, Any]:
    """TERM the process group, KILL it after `grace` seconds."""
    pid = alive(pidfile)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        return {"stopped": False}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    how = "TERM"
    while alive(pidfile) and time.monotonic() < deadline:
        child = _children.get(pid)
        if child is not None and child.poll() is not None:
            break
        time.sleep(0.02)
    if alive(pidfile):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        how = "KILL"
        while alive(pidfile):
            child = _children.get(pid)
            if child is not None and child.poll() is not None:
                break
            time.sleep(0.02)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait()
    os.unlink(pidfile)
    return {"stopped": True, "signal": how}


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
    dead = engine.dead_link_seconds()
    out: Any = sys.stdout.buffer
    inp: Any = sys.stdin.buffer
    if dead > 0 and argv[:1] in (["receive"], ["send"], ["manifest"]) and not sys.stdin.isatty():
        # Streams over the SSH channel get the deadline (send-to's stdin is watched in peer.py).
        inp = io.BufferedReader(_Deadline(0, False, dead), 1 << 20)
        out = io.BufferedWriter(_Deadline(1, True, dead), 1 << 20)
    err = sys.stderr

    last = [-REMOTE_PROGRESS_EVERY]

    def progress(done: int, total: int) -> None:
        # Sparse on purpose: until a reader drains stderr, every unread byte holds back the SSH
        # channel's window (one line per 64 MiB stays far below it for any disk size).
        if done - last[0] < REMOTE_PROGRESS_EVERY and not (total and done >= total):
            return
        last[0] = done
        err.write(f"P {done} {total}\n")
        err.flush()

    is_send = bool(argv) and argv[0] == "send"
    try:
        res = run_command(argv, inp, out, progress)
    except ReplicaError as exc:
        msg = json.dumps({"error": exc.code, "message": str(exc), "path": exc.path})
        with contextlib.suppress(ReplicaError, OSError):  # a stdout nobody reads: the exit status says it
            (err.write("E " + msg + "\n") if is_send else out.write(msg.encode() + b"\n"))
            err.flush()
            out.flush()
        return 3
    except OSError as exc:
        # The errno's name (ENOSPC, EACCES...) lets the fabric give the right hint; the command names
        # the step that failed when the OS gives no file name (a failed write).
        code = errno.errorcode.get(exc.errno or 0, "OSError")
        where = exc.filename or f"during {argv[0] if argv else 'the command'}"
        msg = json.dumps({"error": code, "message": f"{exc.strerror or exc} ({code}): {where}"})
        (err.write("E " + msg + "\n") if is_send else out.write(msg.encode() + b"\n"))
        err.flush()
        out.flush()
        return 3
    if is_send and not any(x.startswith("--output") for x in argv):
        out.flush()
        err.write("R " + json.dumps(res) + "\n")
    else:
        out.write(json.dumps(res).encode() + b"\n")
    out.flush()
    err.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
