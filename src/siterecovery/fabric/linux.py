"""The linux fabric: file-backed VMs on Linux hosts (local or over SSH), replicated by the built-in engine.

Data (replica images, manifests, undo logs, test copies, pid files and logs) lives under each host's
`root`; each VM's record lives in the state machine's locked file store (fabric.states) under the
context's state_dir, so flows in other processes see one estate. The transitions are the ones the memory
fabric runs: idempotent operations answer changed=False, a state that forbids one raises InvalidStateError.
Compute backends: `process` (a detached command with a pid file and log), `qemu` (QEMU over QMP) and
`libvirt` (libvirt domains through libvirt-python); the last two run on each host's agent.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paramiko

from .. import ssh
from ..errors import (
    ConfigurationError,
    ExecutionError,
    FabricError,
    HostKeyError,
    InvalidStateError,
    NotFoundError,
    StorageError,
    TransientFabricError,
)
from ..model import Host
from ..paths import child
from ..progress import DiskTotals
from ..render import render_args
from ..replica import qga
from ..replica.engine import RACY_NS, STORAGE_CODES, ReplicaError, read_json, storage_error, write_json_atomic
from ..replica.orchestrator.endpoints import Endpoint, LocalEndpoint, SSHEndpoint
from ..replica.orchestrator.transfer import send_to_args, transfer, transfer_direct
from ..replica.protocol import ReceiveResult, SendResult
from . import FabricContext
from .base import (
    LATEST,
    Consistency,
    Health,
    OpResult,
    Placement,
    PointChoice,
    Progress,
    RecoveryPoint,
    ReplicationHealth,
    ReplicationMode,
    ReplicationState,
    Side,
    result,
    utcnow,
)
from .states import TRANSITIONS, FileRecords, VMRecord, begin, codec, finish, need, working

S = ReplicationState
log = logging.getLogger(__name__)

_CODES: dict[str, type[ExecutionError]] = {
    "ManifestMismatch": InvalidStateError, "NoReplica": InvalidStateError, "NoSuchPoint": NotFoundError,
    "CorruptTransfer": TransientFabricError, "Busy": TransientFabricError,
    "PeerHostKey": HostKeyError, "PeerLinkLost": TransientFabricError,
    "LibvirtTimeout": TransientFabricError, "NoDomain": NotFoundError,
}
# Scrub slices: one agent call reads for at most this long (well inside the channel's timeout), then
# the fabric calls again from where it stopped.
SCRUB_SLICE_SECONDS = 60.0
_HINTS = {
    "ManifestMismatch": "resynchronize the VM (siterecovery resync); only differing blocks travel",
    "NoReplica": "run the initial replication first",
    "NoSuchPoint": "list recovery points and choose another",
    "CorruptTransfer": "the transfer was refused and nothing was applied; retry the cycle",
    "freezeFailed": "check the VM's freeze command on the source host",
    "StartFailed": "read the VM's log under the host root (run/*.log)",
    "ENOSPC": "free space on that host's filesystem (replica, undo logs and staging live under its root); "
              "nothing half-applied stays: the replica holds its last recovery point and the next cycle "
              "ships only what changed",
    "Busy": "an agent left by a dropped connection still holds the replica; retry, or stop that pid on the host",
    "EDQUOT": "raise the quota or free space for that user on that host; nothing half-applied stays",
    "EROFS": "that filesystem is mounted read-only: remount it read-write (check its health first); cycles "
             "cannot land until then, drills and failover still work from the replica as it is",
    "EACCES": "check the permissions of the host's root directory for the SSH user",
    "PeerHostKey": "verify the target host's key out of band, then add it to the source host's peer_ssh.known_hosts "
                   "file (ssh-keyscan output is not verification); nothing was applied",
    "PeerAuth": "authorize the source host's peer_ssh.identity_file public key for that user on the target host",
    "PeerConfig": "fix the source host's peer_ssh in the topology, or the files it names on that host",
    "PeerLinkLost": "the host-to-host ssh link dropped; nothing torn was applied; the next cycle carries on",
    "ViewFailed": "the point-in-time view could not be read; the replica holds its last point; retry the cycle",
    "QmpUnreachable": "QEMU's QMP socket (run/vm.qmp under the VM's directory) did not answer: is the VM's QEMU alive?",
    "QmpFailed": "QEMU refused a command; read the message and the VM's log (run/vm.log)",
    "CaptureFailed": "the point-in-time view could not be made; the guest was resumed; retry the cycle",
    "LibvirtMissing": "install libvirt-python on that host (pip install 'siterecovery[libvirt]', with libvirt-dev)",
    "LibvirtTimeout": "libvirtd did not answer in time: check the daemon on that host (virsh -c URI list)",
    "LibvirtFailed": "libvirt refused the call; read the message and the domain's log (/var/log/libvirt/qemu/)",
    "NoDomain": "define the domain at that host (virsh define), with the VM's disks at the paths the topology names",
    "DomainExists": "remove the leftover domain (virsh undefine NAME) and retry",
    "FormatMismatch": "make the VM's compute.formats match the domain's <driver type> for that disk",
}


# Failures that happen at the source host whatever host the operation is attributed to.
_SOURCE_CODES = frozenset({"freezeFailed", "thawFailed", "ViewFailed", "QemuError", "QmpFailed",
                           "QmpUnreachable", "CaptureFailed", "QemuNoDisk", "FormatMismatch"})
# Backends whose VMs run under QEMU that the agent reaches: point-in-time views, pause, dirty bitmaps.
HYPERVISORS = ("qemu", "libvirt")


def _error_id(exc: BaseException) -> str:
    """The id a failure is known by (engine code, errno name, or the project error's id)."""
    if isinstance(exc, ReplicaError):
        return exc.code
    if isinstance(exc, ExecutionError):
        return exc.error_id or ""
    if isinstance(exc, OSError):
        return errno.errorcode.get(exc.errno or 0, "")
    return ""


@dataclass
class Quiesced:
    """What the quiesce step of a cycle achieved (LinuxFabric._quiesce): the point's label and why."""

    consistency: str = "crash"
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GroupPart:
    """One member's part of a group point: the group point's id and instant, and the member's capture
    (a QEMU view, {"kind": "off"}, or None for a VM the group holds frozen while it is read)."""

    group: str
    when: datetime
    cap: dict[str, Any] | None


@dataclass
class _VM(VMRecord):
    """The linux fabric's VM record: the state machine's record and the data path's own fields."""

    paths: dict[str, dict[str, str]] = field(default_factory=dict)  # disk -> host -> image path
    last_app_point: str | None = None
    pending_bytes: int = 0  # unused (health measures it at the source); kept so older records load
    gens: dict[str, str] = field(default_factory=dict)  # disk -> generation the replica holds (a cache)
    sizes: dict[str, int] = field(default_factory=dict)  # disk -> bytes at the last look (progress totals)
    last_error: str = ""
    formats: dict[str, dict[str, str]] = field(default_factory=dict)  # disk -> host -> qemu format (raw if absent)
    cbt: dict[str, dict[str, Any]] = field(default_factory=dict)  # disk -> {bitmap, since: [gens it covers]}
    view_seconds: float | None = None  # the guest's pause in the last point-in-time capture
    last_error_id: str = ""  # ENOSPC / EDQUOT / EROFS make health Critical: no cycle lands until fixed
    test_dir: str | None = None  # where the running drill's copies are, when not under the host root


class LinuxFabric:
    kind = "linux"

    def __init__(self, context: FabricContext | None = None) -> None:
        self.context = context or FabricContext()
        self.opts = self.context.options
        if self.context.state_dir is None:
            raise ConfigurationError("the linux fabric needs the project's state directory (FabricContext.state_dir, "
                                     "from siterecovery.estate): it holds the VM records and the default host roots")
        self.root = Path(self.context.state_dir) / "linux"
        self._lock = threading.RLock()
        # Every SSH connection of this driver, commands and agent streams alike (one per host identity).
        self.pool = ssh.Pool(self.context.secrets, connect_timeout=float(self.opts.get("ssh_timeout", 15)),
                             dead_after=self.dead_link)
        self.records = FileRecords(self.root / "vms", *codec(_VM), wait=float(self.opts.get("vm_lock_wait", 300)),
                                   state_dir=self.root)

    # ---- plumbing ----------------------------------------------------------------------------
    def _is_local(self, host: Host) -> bool:
        return host.address == "local" or host.name in set(self.opts.get("local_hosts", ()))

    def host_root(self, host: Host) -> str:
        return host.root or str(child(self.root, "sites", host.site).absolute())

    def _python(self, host: Host) -> str:
        # The caller's option wins (tests, the demo), then the topology's, then the host's python3.
        default = host.python or "python3"
        py = self.opts.get("python", default)
        return str(py.get(host.name, default) if isinstance(py, dict) else py)

    @property
    def dead_link(self) -> float:
        """Seconds of silence after which a network path counts as dead (option `dead_link_seconds`)."""
        return ssh.dead_link_seconds(self.opts.get("dead_link_seconds"))

    def _client(self, host: Host) -> paramiko.SSHClient:
        """The pooled connection to `host` (checked before use, reconnected when it dropped)."""
        return self.pool.client(host)

    def _ep(self, host: Host) -> Endpoint:
        if self._is_local(host):
            return LocalEndpoint(name=host.name)
        # The agent gets the same deadline: it gives up on a stream that went silent (agent.py).
        return SSHEndpoint(name=host.name, pool=self.pool, host=host, python=self._python(host),
                           env={ssh.DEAD_LINK_ENV: f"{self.dead_link:g}"})

    def _sh(self, host: Host, argv: list[str], stdin: bytes | None = None, timeout: float = 120) -> tuple[int, str, str]:
        """Run argv at a host (no shell locally; quoted through sh_join remotely)."""
        if self._is_local(host):
            try:
                r = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
            except FileNotFoundError:
                return 127, "", f"{argv[0]}: not found"
            return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        res = self.pool.run(host, argv, stdin=stdin, deadline=timeout)
        return res.rc, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")

    @contextlib.contextmanager
    def _errors(self, p: Placement, operation: str, host: Host) -> Iterator[None]:
        """Translate engine and transport failures into the project's errors at the driver edge."""
        try:
            yield
        except ExecutionError:
            raise
        except (ReplicaError, paramiko.SSHException, EOFError, OSError) as exc:
            self._check_links(p)
            if isinstance(exc, OSError):
                exc = storage_error(exc) or exc
            if isinstance(exc, ReplicaError) and exc.code in STORAGE_CODES:
                where = exc.host or host.name
                raise StorageError(str(exc), path=exc.path, vm=p.vm, host=where, operation=operation,
                                   error_id=exc.code, hint=_HINTS[exc.code]) from None
            if isinstance(exc, ReplicaError):
                cls = _CODES.get(exc.code, FabricError)
                # the freeze, the view and QEMU live where the VM runs, whatever host the operation is on
                at = p.source.name if exc.code in _SOURCE_CODES else (exc.host or host.name)
                raise cls(str(exc), vm=p.vm, host=at, operation=operation, error_id=exc.code,
                          hint=_HINTS.get(exc.code, "read the message; fix the cause and re-run the operation")) from None
            raise TransientFabricError(f"{type(exc).__name__}: {exc}", vm=p.vm, host=host.name, operation=operation,
                                       hint="the connection or a file operation failed; retry") from None

    def _check_links(self, p: Placement) -> None:
        """A connection closed as dead explains whatever failed on top of it (a torn stream, a channel
        without exit status): raise LinkDown, naming the network rather than the consequence."""
        for h in (p.source, p.target):
            if not self._is_local(h):
                self.pool.check_link(h)

    def _cause(self, p: Placement, exc: BaseException) -> BaseException:
        try:
            self._check_links(p)
        except ExecutionError as down:
            return down
        return exc

    # ---- VM state ----------------------------------------------------------------------------
    def _vm(self, p: Placement, op: str | None = None) -> contextlib.AbstractContextManager[list[_VM | None]]:
        """The VM's record under an exclusive lock (states.FileRecords); whatever the block leaves in
        box[0] is saved. `op` names the operation; by default the with-statement's caller."""
        return self.records.open(p.vm, op or sys._getframe(1).f_code.co_name)

    # ---- paths on hosts ----------------------------------------------------------------------
    # Every path below is built from names through paths.child: a VM or disk name that bypassed
    # validation still cannot leave the host root (or the storage location).
    def _vm_dir(self, host: Host, vm: str) -> str:
        return str(child(self.host_root(host), vm))

    def _meta(self, host: Host, vm: str, disk: str) -> str:
        return str(child(self.host_root(host), vm, "meta", disk))

    def _src_state(self, host: Host, vm: str, disk: str) -> str:
        return str(child(self.host_root(host), vm, "source", disk))

    def _test_dir(self, host: Host, vm: str, elsewhere: bool = False) -> str:
        """Where a drill's copies go: under the host root, or (`elsewhere`: that root is read-only) under
        the option `test_scratch` (default /var/tmp/siterecovery) on the same host."""
        if not elsewhere:
            return str(child(self.host_root(host), vm, "test"))
        scratch = self.opts.get("test_scratch", "/var/tmp/siterecovery")
        if isinstance(scratch, dict):
            scratch = scratch.get(host.name, "/var/tmp/siterecovery")
        return str(child(str(scratch), host.name, vm, "test"))

    def _test_image(self, host: Host, vm: str, disk: str, test_dir: str | None = None) -> str:
        return str(child(test_dir or self._test_dir(host, vm), disk, suffix=".img"))

    def _replica_image(self, p: Placement, disk: str, location: str | None) -> str:
        if location:
            return str(child(location, p.vm, disk, suffix=".img"))
        return str(child(self.host_root(p.target), p.vm, "replica", disk, suffix=".img"))

    def _rep_args(self, vm: _VM, p: Placement, disk: str, host: Host) -> list[str]:
        return ["--replica", vm.paths[disk][host.name], "--meta", self._meta(host, p.vm, disk)]

    # ---- protection --------------------------------------------------------------------------
    def enable_replication(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box, self._errors(p, "enable_replication", p.source):
            vm = box[0]
            if vm is not None and not begin(vm, p, "enable_replication"):
                return result(p, "enable_replication", False, S(vm.state), TRANSITIONS["enable_replication"].said, t0,
                              host=p.source.name)
            if not p.disks:
                raise InvalidStateError("the VM has no disks to replicate", vm=p.vm, host=p.source.name,
                                        operation="enable_replication", hint="declare the VM's disks in the topology")
            src = self._ep(p.source)
            sizes = {}
            for d in p.disks:
                found = src.call(["exists", "--path", d.source_path])
                if not found["exists"]:
                    raise NotFoundError(f"disk {d.disk} not found at {d.source_path}", vm=p.vm, host=p.source.name,
                                        operation="enable_replication", hint="check the disk path in the topology")
                if isinstance(found.get("size"), int):
                    sizes[d.disk] = found["size"]
            paths = {d.disk: {p.source.name: d.source_path, p.target.name: self._replica_image(p, d.disk, d.target_location)}
                     for d in p.disks}
            fmts = p.compute.formats if p.compute is not None else {}
            formats = {d.disk: {p.source.name: str(fmts.get(d.disk, "raw")), p.target.name: "raw"} for d in p.disks}
            box[0] = new = _VM(primary=p.source.name, replica=p.target.name, paths=paths, running=[p.source.name],
                               sizes=sizes, formats=formats)
            return result(p, "enable_replication", True, finish(new, "enable_replication"), "replication enabled", t0,
                          host=p.source.name)

    def _new_point(self, vm: _VM, p: Placement, consistency: str, when: datetime) -> dict[str, Any]:
        vm.seq += 1
        return {"id": f"{p.vm}@{vm.seq}", "created_at": when.isoformat(), "consistency": consistency}

    def _hook(self, p: Placement, which: str, vm: _VM | None = None, disk: str | None = None) -> list[str]:
        """The VM's freeze, thaw or quiesce command, rendered like compute.command (disk: the disk being
        read, at the source host), since after reverse replication the VM's disks live elsewhere."""
        c = p.compute
        raw = p.quiesce if which == "quiesce" else (getattr(c, which) if c is not None else ())
        ctx: dict[str, Any] = {"vm": p.vm, "site": p.source.site, "host": p.source.name, "disks": [], "disk": ""}
        if vm is not None:
            ctx["disks"] = [vm.paths[d][p.source.name] for d in self._disks(vm)]
            ctx["disk"] = vm.paths[disk][p.source.name] if disk else (ctx["disks"] or [""])[0]
        return render_args(raw, ctx)

    def _view_args(self, p: Placement, vm: _VM | None = None, disk: str | None = None,
                   held: bool = False) -> list[str]:
        """held: a consistency group's cycle holds the VM still (and quiesced it) itself."""
        c = p.compute
        # A VM that is off needs no freeze (its disks are still), and its freeze command would fail.
        frozen = (not held and c is not None and bool(c.freeze)
                  and (vm is None or self._capture_kind(vm, p) != "off"))
        args = ["--freeze", json.dumps(self._hook(p, "freeze", vm, disk) if frozen else []),
                "--thaw", json.dumps(self._hook(p, "thaw", vm, disk) if frozen else [])]
        if not p.policy.compression:
            args.append("--no-compress")
        return args

    def _retention(self, p: Placement) -> list[str]:
        return ["--retention-hours", str(p.policy.recovery_history_hours)]

    def bandwidth_cap(self, p: Placement, override: int | None = None) -> int | None:
        """Bytes/s the source host may send for replication (None: uncapped): an explicit override (the
        replicate flow's bandwidth_mbps), else the policy's bandwidth_mbps. One bucket per source host."""
        return override or p.policy.bandwidth_bytes_per_second

    def _bandwidth_args(self, p: Placement, cap: int | None) -> list[str]:
        if not cap:
            return []
        return ["--bandwidth", str(cap), "--bandwidth-bucket", os.path.join(self.host_root(p.source), "bandwidth.bucket")]

    def _ship(self, vm: _VM, p: Placement, disk: str, point: dict[str, Any], consistency: str,
              progress: Progress | None, mode: str, cap: dict[str, Any] | None = None,
              bw: int | None = None, held: bool = False, settle: bool = False) -> dict[str, Any]:
        """One disk's cycle: 'full' copy, 'delta', or 'resync' (block compare against the replica's disk).
        cap: the cycle's capture (_capture): a QEMU view of every disk, or a QEMU VM that is off.
        bw: bytes/s overriding the policy's bandwidth cap on the source host.
        settle: the VM is off for good (a planned failover's final cycle): let the disk's stat settle
        before it is recorded, so reverse replication can prove this disk unchanged (_adopt)."""
        src, dst = self._ep(p.source), self._ep(p.target)
        rep = self._rep_args(vm, p, disk, p.target)
        state = self._src_state(p.source, p.vm, disk)
        send = ["send", "--disk", vm.paths[disk][p.source.name], "--state", state,
                "--keepalive", f"{self.dead_link / 3:g}", *self._view_args(p, vm, disk, held),
                *self._bandwidth_args(p, self.bandwidth_cap(p, bw))]
        if settle:
            send += ["--settle", f"{RACY_NS / 1e9 + 0.1:g}"]
        dview = (cap or {}).get("disks", {}).get(disk)
        if cap is not None and cap["kind"] == "off":
            send += ["--offline-format", self._format(vm, disk, p.source)]
        elif cap is not None and dview is not None:
            send += ["--nbd", json.dumps({"socket": cap["socket"], "export": dview["export"]})]
        recv = ["receive", *rep, "--point", json.dumps(point), *self._retention(p)]
        prefix = b""
        info: dict[str, Any] = {}
        if mode == "delta":
            # The generation the replica holds is cached from the last cycle, so a cycle is just the
            # two agents; the replica refuses a stale generation or a disk changed behind its back.
            gen = vm.gens.get(disk)
            if gen is None:
                st = dst.call(["status", *rep])
                if not st["initialized"]:
                    raise ReplicaError("there is no replica to apply a delta to", code="NoReplica")
                gen = st["gen"]
            dsend = [*send, "--mode", "delta", "--expect-gen", gen]
            cbt = vm.cbt.get(disk) or {}
            if dview is not None and dview.get("bitmap") and dview["bitmap"] == cbt.get("bitmap") \
                    and gen in cbt.get("since", ()):
                # Changed-block tracking: the bitmap holds every block written since the point the replica
                # holds, so only those are read.
                assert cap is not None
                dsend[dsend.index("--nbd") + 1] = json.dumps({"socket": cap["socket"],
                                                              "export": dview["export"],
                                                              "bitmap": f"qemu:dirty-bitmap:{dview['bitmap']}"})
            try:
                sent, got = self._transfer(p, src, dsend, dst, recv, progress)
                vm.gens[disk] = got["point"]["gen"]
                return {**sent, **got, "mode": "delta"}
            except ReplicaError as exc:
                vm.gens.pop(disk, None)
                if exc.code != "ManifestMismatch":
                    raise
                mode, info["resync_reason"] = "resync", str(exc).split(": ", 1)[-1]
        if mode == "resync":
            if dst.call(["exists", "--path", vm.paths[disk][p.target.name]])["exists"]:
                dst.call(["rehash", *rep])
                blob = dst.raw(["manifest", *rep])
                n = int.from_bytes(blob[:8], "little")
                prefix = blob[:8 + n]
                send += ["--mode", "base"]
            else:
                mode = "full"
        if mode == "full":
            send += ["--mode", "full"]
        sent, got = self._transfer(p, src, send, dst, recv, progress, prefix)
        vm.gens[disk] = got["point"]["gen"]
        # The source promotes its pending manifest when the next cycle names this generation.
        return {**sent, **got, **info, "mode": mode}

    def data_path(self, p: Placement) -> str:
        """How a cycle's stream travels: 'local' (both hosts are this machine), 'channel' (one is: it
        runs in-process on the other's exec channel), 'peer' (the source host's own ssh to the target,
        its `peer_ssh`), or 'relay' (both remote, no peer_ssh: the orchestrator copies every byte)."""
        src_local, dst_local = self._is_local(p.source), self._is_local(p.target)
        if src_local and dst_local:
            return "local"
        if src_local or dst_local:
            return "channel"
        return "peer" if p.source.peer_ssh is not None else "relay"

    def _transfer(self, p: Placement, src: Endpoint, send: list[str], dst: Endpoint, recv: list[str],
                  progress: Progress | None, prefix: bytes = b"") -> tuple[SendResult, ReceiveResult]:
        if self.data_path(p) != "peer":
            return transfer(src, send, dst, recv, progress, prefix=prefix)
        peer = p.source.peer_ssh
        assert peer is not None and isinstance(src, SSHEndpoint) and isinstance(dst, SSHEndpoint)
        # The source host reaches the target at the address, port and user the topology gives it.
        args = send_to_args(send, src, dst, recv, p.target.address, p.target.port, p.target.user,
                            peer.identity_file, peer.known_hosts, int(self.opts.get("ssh_timeout", 15)))
        return transfer_direct(src, args, progress, prefix)

    def _path_notes(self, p: Placement) -> list[str]:
        path = self.data_path(p)
        if path != "relay":
            log.debug("%s: %s -> %s streams %s", p.vm, p.source.name, p.target.name, path)
            return []
        note = (f"the orchestrator relayed the stream: source host {p.source.name} has no peer_ssh, so it "
                f"cannot send to {p.target.name} itself")
        log.info("%s: %s", p.vm, note)
        return [note]

    def _inflight_path(self, vm: str) -> Path:
        return child(self.root, "vms", vm, suffix=".cycle")

    def _interrupted(self, vm: str) -> dict[str, Any] | None:
        """The cycle an orchestrator process died in (read under the VM's lock, so none is running)."""
        try:
            data: dict[str, Any] = json.loads(self._inflight_path(vm).read_text())
            return data
        except (FileNotFoundError, ValueError):
            return None

    def _cycle(self, vm: _VM, p: Placement, consistency: str, progress: Progress | None, mode: str,
               operation: str, bw: int | None = None, part: GroupPart | None = None,
               modes: dict[str, str] | None = None) -> tuple[dict[str, Any], int, list[str]]:
        """Ship every disk as one recovery point; (point, bytes, notes). part: this VM's part of a group
        point (replicate_group): its id and instant, and the capture the group already made. modes: a
        disk's own mode instead of `mode` (reverse replication: adopted disks delta, the others resync)."""
        t0 = utcnow()
        marker = self._inflight_path(p.vm)
        dead = self._interrupted(p.vm)
        if dead is not None:
            # The process running the last cycle was killed: its state was never saved, but the replica
            # may have committed that cycle. Ask the replica for its generation instead of trusting the
            # cache (no needless resynchronization), and never reuse the dead cycle's point id.
            vm.gens.clear()
            vm.seq = max(vm.seq, int(dead.get("seq", 0)))
        point = self._new_point(vm, p, consistency, t0)
        if part is not None:
            point.update(created_at=part.when.isoformat(), group=part.group)
        total, notes = 0, self._path_notes(p)
        shipped: list[dict[str, Any]] = []
        try:
            tmp = marker.with_suffix(".cycle.tmp")
            try:
                tmp.write_text(json.dumps({"point": point["id"], "seq": vm.seq, "operation": operation,
                                           "started_at": t0.isoformat(), "pid": os.getpid()}))
                tmp.replace(marker)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise self.records.error(exc, operation, p.vm) from None
            # One count over the VM's disks, so a caller sees one total and done never going back.
            totals = DiskTotals(progress, self._sizes(vm, p)) if progress is not None else None
            if part is not None:
                cap = part.cap
            else:
                with self._quiesce(vm, p, consistency) as q:
                    cap = self._capture(vm, p, point)
                point["consistency"] = q.consistency
                notes += q.notes
            ok = False
            try:
                for i, d in enumerate(p.disks):
                    out = self._ship(vm, p, d.disk, point, consistency, totals.disk(i) if totals else None,
                                     (modes or {}).get(d.disk, mode), cap, bw, held=part is not None,
                                     settle=operation == "prepare_planned_failover")
                    shipped.append(out)
                    if totals:
                        size = out.get("size")
                        totals.finished(i, size if isinstance(size, int) else None)
                ok = True
            finally:
                self._release(vm, p, cap, ok)
            for d, out in zip(p.disks, shipped, strict=True):
                size = out.get("size")
                if isinstance(size, int):
                    vm.sizes[d.disk] = size
                total += int(out.get("bytes", 0))
                if out.get("resync_reason"):
                    notes.append(f"{d.disk}: resynchronized ({out['resync_reason']})")
        except BaseException as exc:
            vm.cycles_missed += 1
            # Health reports the failure until a cycle succeeds; whatever the replica holds now (the
            # transfer may have committed after the connection dropped) is asked again next time.
            cause = self._cause(p, exc)
            said = str(cause) or type(cause).__name__
            if isinstance(cause, ReplicaError) and cause.host and not said.startswith(cause.host):
                said = f"{cause.host}: {said}"  # the host whose filesystem or agent failed
            vm.last_error = f"{operation} failed: {said}"[:300]
            vm.last_error_id = _error_id(cause)
            vm.gens.clear()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
        vm.cycles_ok += 1
        vm.resync_required = False
        vm.last_error = vm.last_error_id = ""
        vm.last_replication = point["created_at"]
        if point["consistency"] == "app":
            vm.last_app_point = point["created_at"]
        return point, total, notes

    # ---- point-in-time capture (qemu) --------------------------------------------------------------
    def _format(self, vm: _VM, disk: str, host: Host) -> str:
        return vm.formats.get(disk, {}).get(host.name, "raw")

    def _capture_kind(self, vm: _VM, p: Placement) -> str:
        """How this cycle reads the source: 'view' (a running QEMU VM: point-in-time views), 'off' (the VM is
        off: its disks are still), 'freeze' (the freeze hook), or 'live' (consistency: none)."""
        c = p.compute
        if c is None:
            return "live"
        if c.backend in HYPERVISORS:
            st = self._hv(p, p.source, "status")
            if st.get("status") == "absent":
                # A misnamed domain is not a VM that is off: its disks may be written by a domain of
                # another name, so they are not read as still.
                raise ReplicaError(f"libvirt at {p.source.name} has no domain {self._domain(p, False)}", code="NoDomain",
                                   host=p.source.name)
            return "view" if st.get("pid") or st.get("active") else "off"
        pidfile = os.path.join(self._run_dir(p.source, p.vm), "vm.pid")
        ep = self._ep(p.source)
        running = (bool(ep.call(["alive", "--pidfile", pidfile])["pid"]) if ep.call(["exists", "--path", pidfile])["exists"]
                   else p.source.name in vm.running)
        if not running:
            return "off"
        return "freeze" if c.freeze else "live"

    @contextlib.contextmanager
    def _quiesce(self, vm: _VM, p: Placement, consistency: str) -> Iterator[Quiesced]:
        """The quiesce step of an app-consistent point, the one place it happens (single VMs and group
        members alike): the VM's `quiesce` command, then the guest agent's fsfreeze (QEMU VMs with
        compute.guest_agent); the block is the capture; then the thaw, always, whatever the block did.

        The point is app-consistent only when every quiesce method the VM has succeeded and the thaw
        happened (a process VM's freeze command counts: it holds the workload itself). Otherwise the
        cycle still takes its point, labelled crash-consistent, with a note naming the reason: a point
        is never labelled app-consistent unless the guest was quiesced for it."""
        q = Quiesced()
        if consistency != "app":
            yield q
            return
        c = p.compute
        kind = self._capture_kind(vm, p)
        reason, how = "", []
        agent = c is not None and c.backend == "qemu" and c.guest_agent
        timeout = c.guest_agent_timeout_seconds if c is not None else 10.0
        froze = False
        if kind == "off":
            reason = "the VM is off: there is no guest to quiesce"
        elif kind == "live":
            reason = "its disks are read live over time (consistency: none)"
        elif not (p.quiesce or agent or kind == "freeze"):
            reason = ("the VM has no way to quiesce (QEMU: compute.guest_agent with qemu-ga in the guest; any VM: "
                      "a quiesce command; process VMs: a freeze command)")
        if not reason and p.quiesce:
            try:
                self._ep(p.source).call(["hook", "--what", "quiesce", "--argv", json.dumps(self._hook(p, "quiesce", vm))])
                how.append("quiesce command")
            except (ReplicaError, OSError, paramiko.SSHException, EOFError) as exc:
                reason = f"its quiesce command failed: {exc}"
        if not reason and agent:
            froze = True  # from here on the guest may be frozen, whatever the answer: thaw in every case...
            t_freeze = time.monotonic()
            try:
                n = self._agent(p, "guest-fsfreeze-freeze", timeout)
                if n:
                    how.append(f"guest agent froze {n} filesystem(s)")
                else:  # the agent answered, but nothing in the guest was quiesced (no freezable filesystem)
                    reason = "the guest agent froze no filesystem"
            except (ReplicaError, OSError, paramiko.SSHException, EOFError) as exc:
                reason = f"the guest agent did not freeze the guest's filesystems: {exc}"
                # ...unless the freeze never reached the guest (no agent there: it did not answer the sync).
                froze = not (isinstance(exc, ReplicaError) and exc.code == qga.NOT_SENT)
        if not reason and kind == "freeze" and not how:
            how.append("freeze command")
        try:
            yield q
        finally:
            if froze:
                try:
                    self._agent(p, "guest-fsfreeze-thaw", timeout)
                    how.append(f"frozen {time.monotonic() - t_freeze:.2f} s")  # freeze to thaw, round trips included
                except (ReplicaError, OSError, paramiko.SSHException, EOFError) as exc:
                    msg = f"the guest agent's thaw failed: {exc}; the guest may still be frozen: check it"
                    log.error("%s at %s: %s", p.vm, p.source.name, msg)
                    reason = f"{reason}; {msg}" if reason else msg
            if reason:
                q.notes.append(f"crash-consistent point, not app-consistent: {reason}")
                log.warning("%s: %s", p.vm, q.notes[-1])
            else:
                q.consistency = "app"
                q.notes.append(f"app-consistent point ({', '.join(how)})")

    def _agent(self, p: Placement, execute: str, timeout: float) -> Any:
        """One guest agent command on the VM's source host (qga.py: sync first, a deadline on everything)."""
        return self._ep(p.source).call(["qemu-agent", "--run", self._run_dir(p.source, p.vm), "--name", "vm",
                                        "--execute", execute, "--timeout", f"{timeout:g}"])["answer"]

    def _capture(self, vm: _VM, p: Placement, point: dict[str, Any]) -> dict[str, Any] | None:
        """A QEMU VM's (or libvirt domain's) point-in-time view of all its disks at one instant (None for
        other backends)."""
        if p.compute is None or p.compute.backend not in HYPERVISORS:
            return None
        kind = self._capture_kind(vm, p)
        if kind == "off":
            return {"kind": "off"}
        disks = self._disks(vm)
        # node: the QEMU backend's node names; path: libvirt's disks are found by their file.
        spec = [{"node": f"d{i}", "path": vm.paths[d][p.source.name], "format": self._format(vm, d, p.source),
                 "prev": (vm.cbt.get(d) or {}).get("bitmap")} for i, d in enumerate(disks)]
        tag = f"{point['id'].rsplit('@', 1)[-1]}-{uuid.uuid4().hex[:6]}"
        view = self._hv(p, p.source, "capture", "--disks", json.dumps(spec), "--tag", tag)
        vm.view_seconds = view.get("window_seconds")
        by_disk = {d: v for d, v in zip(disks, view["disks"], strict=True)}
        return {"kind": "view", "socket": view["socket"], "disks": by_disk, "raw": view}

    def _release(self, vm: _VM, p: Placement, cap: dict[str, Any] | None, ok: bool) -> None:
        """Tear the views down; move each disk's changed-block tracking to the bitmap this capture started."""
        if cap is None or cap["kind"] != "view":
            return
        argv = ["--view", json.dumps(cap["raw"])]
        try:
            self._hv(p, p.source, "release", *(argv if ok else [*argv, "--failed"]))
        except (ReplicaError, OSError, paramiko.SSHException, EOFError) as exc:
            # A view left behind costs scratch space, not correctness; the next capture removes stale
            # bitmaps. Tracking restarts from a full read.
            log.warning("%s: releasing the point-in-time view at %s failed: %s", p.vm, p.source.name, exc)
            vm.cbt.clear()
            return
        for d, dv in cap["disks"].items():
            old = vm.cbt.get(d) or {}
            if ok and d in vm.gens:
                vm.cbt[d] = {"bitmap": dv["new_bitmap"], "since": [vm.gens[d]]}
            elif dv.get("bitmap") and dv["bitmap"] == old.get("bitmap"):
                # Merged into the new bitmap: it still covers every change since the old points.
                vm.cbt[d] = {"bitmap": dv["new_bitmap"], "since": list(old.get("since", []))}
            else:
                vm.cbt[d] = {"bitmap": dv["new_bitmap"], "since": []}

    def _sizes(self, vm: _VM, p: Placement) -> list[int]:
        """Each disk's size for progress totals: as last seen, else asked of the source host."""
        for d in p.disks:
            if d.disk not in vm.sizes:
                found = self._ep(p.source).call(["exists", "--path", vm.paths[d.disk][p.source.name]])
                if isinstance(found.get("size"), int):
                    vm.sizes[d.disk] = found["size"]
        return [vm.sizes.get(d.disk, 0) for d in p.disks]

    def start_initial_replication(self, p: Placement, progress: Progress | None = None) -> OpResult:
        t0 = utcnow()
        op = "start_initial_replication"
        with self._vm(p) as box, self._errors(p, op, p.target):
            vm = need(box[0], p, op)
            if not begin(vm, p, op):
                return result(p, op, False, S(vm.state), TRANSITIONS[op].said, t0)
            method = p.policy.initial_replication.method
            if method == "offline":
                return self._offline(vm, p, progress, t0)
            working(vm, op)
            point, sent, notes = self._cycle(vm, p, "crash", progress, "resync" if method == "existing_replica" else "full", op)
            return result(p, op, True, finish(vm, op), "; ".join([f"initial copy complete ({method})", *notes]), t0,
                          point=self._rp(p, point), bytes_sent=sent,
                          details={"method": method, "data_path": self.data_path(p)})

    def _offline(self, vm: _VM, p: Placement, progress: Progress | None, t0: datetime) -> OpResult:
        """Export at the source into export_path, import at the target from import_path. When the
        import files are not there yet (they travel by other means), the export is kept and the
        next call imports."""
        ir = p.policy.initial_replication
        assert ir.method == "offline"
        src, dst = self._ep(p.source), self._ep(p.target)
        exported = vm.state == S.InitialReplicationInProgress.value
        if not exported:
            point = self._new_point(vm, p, "crash", t0)
            gens = {}
            for d in p.disks:
                out = src.call(["send", "--disk", vm.paths[d.disk][p.source.name],
                                "--state", self._src_state(p.source, p.vm, d.disk), "--mode", "full",
                                "--output", str(child(ir.export_path, p.vm, d.disk, suffix=".srstream")),
                                *self._view_args(p, vm, d.disk)])
                gens[d.disk] = out["gen"]
            working(vm, "start_initial_replication")
            vm.paths["_offline"] = {"point": json.dumps(point), **gens}
        missing = [d.disk for d in p.disks
                   if not dst.call(["exists", "--path", str(child(ir.import_path, p.vm, d.disk, suffix=".srstream"))])["exists"]]
        if missing:
            return result(p, "start_initial_replication", bool(not exported), S.InitialReplicationInProgress,
                          f"exported to {ir.export_path}; copy it to {ir.import_path} at the target site and run "
                          "the initial replication again to import", t0, details={"missing": ", ".join(missing)})
        point = json.loads(vm.paths["_offline"]["point"])
        for d in p.disks:
            dst.call(["receive", *self._rep_args(vm, p, d.disk, p.target), "--point", json.dumps(point),
                      *self._retention(p), "--input", str(child(ir.import_path, p.vm, d.disk, suffix=".srstream"))])
            src.call(["source-commit", "--state", self._src_state(p.source, p.vm, d.disk),
                      "--gen", vm.paths["_offline"][d.disk]])
        del vm.paths["_offline"]
        vm.cycles_ok += 1
        vm.last_replication = point["created_at"]
        return result(p, "start_initial_replication", True, finish(vm, "start_initial_replication"), f"imported from {ir.import_path}", t0,
                      point=self._rp(p, point), details={"method": "offline"})

    def replicate_group(self, ps: list[Placement], group: str, consistency: Consistency = "crash",
                        progress: Progress | None = None, bandwidth_bytes_per_second: int | None = None) -> list[OpResult]:
        """One cycle of a consistency group: every member held still at one instant, each one's disks
        shipped as its part of one group point (siterecovery.groups).

        The hold: app points first quiesce every member (_quiesce); then every QEMU member is paused, every
        other running member frozen (its freeze hook). QEMU members' point-in-time views are taken, they
        continue at once and their guest agents thaw; frozen members stay frozen while they are read (no
        reflink here) and are thawed when every part has shipped or the cycle failed. The group point is
        app-consistent only if every member was quiesced. Each part commits on its own: a member
        that fails leaves the group point incomplete, and an incomplete group point is never offered."""
        t0 = utcnow()
        ps = sorted(ps, key=lambda x: x.vm)  # one lock order for every process
        out: list[OpResult] = []
        with contextlib.ExitStack() as stack:
            vms: list[_VM] = []
            for p in ps:
                box = stack.enter_context(self._vm(p, f"replicate_group {group}"))
                with self._errors(p, "replicate", p.source):
                    vms.append(need(box[0], p, "replicate", *TRANSITIONS["replicate"].allowed))
                if vms[-1].resync_required:
                    raise InvalidStateError("its replica needs resynchronization before it can join a group point",
                                            vm=p.vm, host=p.source.name, operation="replicate", error_id="ResyncRequired",
                                            hint="resynchronize the VM (siterecovery resync), then replicate the group")
            kinds = []
            for vm, p in zip(vms, ps, strict=True):
                with self._errors(p, "replicate", p.source):
                    kind = self._capture_kind(vm, p)
                if kind == "live":
                    raise InvalidStateError("nothing holds this VM still for a group point (no freeze command, not "
                                            "QEMU)", vm=p.vm, host=p.source.name, operation="replicate",
                                            error_id="NoConsistentCapture",
                                            hint="give the VM compute.freeze/thaw or run it under QEMU")
                kinds.append(kind)
            gid = f"{group}@{self._next_group_seq(group)}"
            frozen: list[tuple[_VM, Placement]] = []
            paused: list[Placement] = []
            caps: dict[str, dict[str, Any] | None] = {}
            shipped: set[str] = set()
            ok = False
            thaw_errors: list[str] = []

            def run_on() -> None:
                for p in reversed(paused):
                    try:
                        self._hv(p, p.source, "control", "--action", "cont")
                    except Exception as exc:  # noqa: BLE001 - every member must get its chance to run on
                        thaw_errors.append(f"{p.vm}: continue failed: {exc}")
                paused.clear()

            try:
                quiesced: list[Quiesced] = []
                with contextlib.ExitStack() as held:
                    # Every member quiesced first (app points), thawed last: after the paused members run
                    # on again (the callback below unwinds first), since a paused guest cannot thaw.
                    for vm, p in zip(vms, ps, strict=True):
                        with self._errors(p, "replicate", p.source):
                            quiesced.append(held.enter_context(self._quiesce(vm, p, consistency)))
                    held.callback(run_on)
                    for vm, p, kind in zip(vms, ps, kinds, strict=True):
                        with self._errors(p, "replicate", p.source):
                            if kind == "view":
                                self._hv(p, p.source, "control", "--action", "pause")
                                paused.append(p)
                            elif kind == "freeze":
                                self._ep(p.source).call(["hook", "--what", "freeze", "--argv",
                                                         json.dumps(self._hook(p, "freeze", vm))])
                                frozen.append((vm, p))
                    when = utcnow()  # every member is still: this instant is the group point's
                    for vm, p in zip(vms, ps, strict=True):
                        with self._errors(p, "replicate", p.source):
                            caps[p.vm] = self._capture(vm, p, {"id": gid})
                    # the views hold the instant: the QEMU members run on, then thaw (leaving the block)
                # One label for every part (a group point's parts share it): app only if every member was quiesced.
                label = "app" if quiesced and all(q.consistency == "app" for q in quiesced) else "crash"
                for vm, p, q in zip(vms, ps, quiesced, strict=True):
                    shipped.add(p.vm)
                    with self._errors(p, "replicate", p.source):
                        mode = "resync" if vm.resync_required else "delta"
                        point, sent, notes = self._cycle(vm, p, label, progress, mode, "replicate",
                                                         bandwidth_bytes_per_second, GroupPart(gid, when, caps[p.vm]))
                    notes = [*q.notes, *notes] if consistency == "app" else notes
                    out.append(result(p, "replicate", True, S.Replicating, "; ".join([f"part of group point {gid}", *notes]),
                                      t0, point=self._rp(p, point), bytes_sent=sent,
                                      details={"consistency": label, "group_point": gid}))
                ok = True
            finally:
                for vm, p in zip(vms, ps, strict=True):
                    if p.vm not in shipped and caps.get(p.vm) is not None:
                        self._release(vm, p, caps[p.vm], False)  # a view no part was read from
                run_on()
                for vm, p in reversed(frozen):
                    try:
                        self._ep(p.source).call(["hook", "--what", "thaw", "--argv", json.dumps(self._hook(p, "thaw", vm))])
                    except Exception as exc:  # noqa: BLE001
                        thaw_errors.append(f"{p.vm}: thaw failed: {exc}")
                if thaw_errors:
                    log.error("consistency group %s: %s", group, "; ".join(thaw_errors))
                    if ok:
                        raise FabricError(f"group point {gid} shipped, but a member was not released: "
                                          + "; ".join(thaw_errors), operation="replicate", error_id="thawFailed",
                                          hint="check those VMs now: they may still be frozen or paused")
        return out

    def _next_group_seq(self, group: str) -> int:
        """The group's next point number, under its members' locks (every member is locked by the caller)."""
        path = child(self.root, "groups", group, suffix=".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        seq = int((read_json(str(path)) or {}).get("seq", 0)) + 1
        # Durable before use; a number used twice anyway (a lost write) cannot merge two cycles: a group
        # point's parts must share one instant (siterecovery.groups).
        write_json_atomic(str(path), {"seq": seq})
        return seq

    def replicate(self, p: Placement, consistency: Consistency = "crash", progress: Progress | None = None,
                  bandwidth_bytes_per_second: int | None = None) -> OpResult:
        """One cycle. `bandwidth_bytes_per_second` overrides the policy's cap on the source host's
        replication traffic (both are shared by every transfer the host sends at once)."""
        t0 = utcnow()
        with self._vm(p) as box, self._errors(p, "replicate", p.source):
            vm = need(box[0], p, "replicate", *TRANSITIONS["replicate"].allowed)
            mode = "resync" if vm.resync_required else "delta"
            point, sent, notes = self._cycle(vm, p, consistency, progress, mode, "replicate",
                                             bandwidth_bytes_per_second)
            msg = "resynchronized" if mode == "resync" else "delta cycle complete"
            return result(p, "replicate", True, S.Replicating, "; ".join([msg, *notes]), t0,
                          point=self._rp(p, point), bytes_sent=sent,
                          details={"consistency": point["consistency"], "data_path": self.data_path(p)})

    def resynchronize(self, p: Placement, progress: Progress | None = None) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box, self._errors(p, "resynchronize", p.source):
            op = "resynchronize"
            vm = need(box[0], p, op)
            begin(vm, p, op)
            needed = vm.resync_required or vm.state != S.Replicating.value
            if not needed:
                statuses = self._disk_status(vm, p)
                needed = not all(st["disk_matches"] for st in statuses) or not all(
                    src["tracked"] for src in self._source_status(vm, p, statuses))
            if not needed:
                return result(p, op, False, S.Replicating, TRANSITIONS[op].said, t0)
            working(vm, op)
            point, sent, notes = self._cycle(vm, p, "crash", progress, "resync", op)
            return result(p, op, True, finish(vm, op),
                          "; ".join(["resynchronized (only differing blocks sent)", *notes]), t0,
                          point=self._rp(p, point), bytes_sent=sent, details={"data_path": self.data_path(p)})

    def mark_resync_required(self, p: Placement) -> None:
        with self._vm(p) as box:
            vm = need(box[0], p, "mark_resync_required")
            begin(vm, p, "mark_resync_required")
            vm.resync_required = True
            finish(vm, "mark_resync_required")

    def suspend(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box:
            vm = need(box[0], p, "suspend")
            if not begin(vm, p, "suspend"):
                return result(p, "suspend", False, S(vm.state), TRANSITIONS["suspend"].said, t0)
            return result(p, "suspend", True, finish(vm, "suspend"), "replication suspended", t0)

    def resume(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box:
            vm = need(box[0], p, "resume")
            if not begin(vm, p, "resume"):
                return result(p, "resume", False, S(vm.state), TRANSITIONS["resume"].said, t0)
            return result(p, "resume", True, finish(vm, "resume"), "replication resumed", t0)

    def disable_replication(self, p: Placement, delete_replica: bool = False) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box, self._errors(p, "disable_replication", p.source):
            vm = box[0]
            if not begin(vm, p, "disable_replication"):
                return result(p, "disable_replication", False, S.Disabled, TRANSITIONS["disable_replication"].said, t0)
            vm = need(vm, p, "disable_replication")
            if vm.test_active:
                self._cleanup_test(vm, p)
            src_host = p.source
            self._ep(src_host).call(["remove", os.path.join(self._vm_dir(src_host, p.vm), "source")])
            if delete_replica:
                paths = [os.path.join(self._vm_dir(p.target, p.vm), "meta")] + [
                    vm.paths[d][p.target.name] for d in vm.paths if p.target.name in vm.paths[d]]
                self._ep(p.target).call(["remove", *paths])
            box[0] = None
            return result(p, "disable_replication", True, finish(vm, "disable_replication"),
                          "replication disabled" + ("; replica deleted" if delete_replica else ""), t0)

    def _disk_status(self, vm: _VM, p: Placement) -> list[dict[str, Any]]:
        dst = self._ep(p.target)
        return [dst.call(["status", *self._rep_args(vm, p, d, p.target)]) for d in self._disks(vm)]

    def _source_status(self, vm: _VM, p: Placement, statuses: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per disk, from the source host: is change tracking intact for the generation the replica
        holds, and the bytes changed since (engine.source_status; None when unknown)."""
        src = self._ep(p.source)
        limit = str(int(self.opts.get("pending_scan_bytes", 1 << 30)))
        dirty = self._dirty_counts(vm, p)
        out = []
        for d, st in zip(self._disks(vm), statuses, strict=True):
            argv = ["source-status", "--disk", vm.paths[d][p.source.name], "--state", self._src_state(p.source, p.vm, d),
                    "--scan-limit", limit]
            got = (src.call([*argv, "--gen", st["gen"]]) if st.get("gen") else
                   {"tracked": False, "pending_bytes": None, "how": "no replica"})
            cbt = vm.cbt.get(d) or {}
            if got.get("tracked") and st.get("gen") in cbt.get("since", ()) and cbt.get("bitmap") in dirty:
                # A running QEMU VM: the bitmap started at the point the replica holds counts every byte
                # written since, whatever the image format (a scan of a qcow2 file measures nothing).
                got = {**got, "pending_bytes": dirty[cbt["bitmap"]], "how": "dirty bitmap"}
            elif got.get("tracked") and self._format(vm, d, p.source) == "qcow2":
                got = {**got, "pending_bytes": None, "how": "qcow2 image without a usable bitmap: unknown"}
            out.append(got)
        return out

    def _dirty_counts(self, vm: _VM, p: Placement) -> dict[str, int]:
        """Running QEMU VM or libvirt domain: bytes written per dirty bitmap (qemu.status); {} otherwise."""
        if p.compute is None or p.compute.backend not in HYPERVISORS or not vm.cbt:
            return {}
        st = self._hv(p, p.source, "status")
        return dict(st.get("dirty") or {})

    def _mismatches(self, vm: _VM, p: Placement, statuses: list[dict[str, Any]]) -> list[str]:
        """Per replica disk that fails the quick check (or a scrub): host, VM, disk and what differs."""
        return [f"replica of {p.vm} disk {d} on {p.target.name} ({vm.paths[d][p.target.name]}) does not match its "
                f"last commit: {', '.join(st.get('differs') or ['manifest'])}"
                for d, st in zip(self._disks(vm), statuses, strict=True) if not st["disk_matches"]]

    def _refuse_mismatched(self, vm: _VM, p: Placement, operation: str) -> str:
        """Failover and drills deliver the replica's bytes: never from a replica that fails its quick
        check (written behind replication's back, or rot a scrub found). With the source gone for good it
        may be the only copy left: the fabric option `accept_damaged_replica` lets a failover (never a
        drill) go on, and returns what is wrong, for the result to say it. Returns "" when intact."""
        bad = self._mismatches(vm, p, self._disk_status(vm, p))
        if not bad:
            return ""
        said = "; ".join(bad)
        if operation == "failover" and self.opts.get("accept_damaged_replica"):
            log.error("%s: failing over from a damaged replica, as asked (accept_damaged_replica): %s", p.vm, said)
            return said
        raise InvalidStateError(said, vm=p.vm, host=p.target.name, operation=operation, error_id="ReplicaMismatch",
                                hint="resynchronize (siterecovery resync PAIRING VM: block compare with the source "
                                     "repairs the replica), then retry; nothing was started. If the source is gone "
                                     "and this is the only copy: an unplanned failover with --accept-damaged-replica "
                                     "(fabric option accept_damaged_replica) boots it as it is")

    def scrub(self, p: Placement, rate_bytes_per_second: int | None = None, points: bool = False) -> OpResult:
        """Re-hash every replica disk against its manifest (and with `points` every undo log), reading at
        most `rate_bytes_per_second`. Corruption is recorded at the replica (health Critical from then on)
        and marks the VM for resynchronization, which repairs it from the source by block compare."""
        t0 = utcnow()
        op = "scrub"
        with self._vm(p) as box:
            vm = need(box[0], p, op)
            if vm.state not in (S.Replicating.value, S.Suspended.value) or vm.primary != p.source.name:
                return result(p, op, False, S(vm.state), f"not scrubbed: state {vm.state} has no replica to check", t0)
            snapshot = _VM(**json.loads(json.dumps(asdict(vm))))
        # The long read runs without the VM's record lock: health, cycles and drills go on meanwhile.
        dst = self._ep(p.target)
        read, sizes = 0, 0
        found: dict[str, int] = {}
        undo: dict[str, list[int]] = {}
        with self._errors(p, op, p.target):
            for d in self._disks(snapshot):
                nxt: int | None = 0
                while nxt is not None:
                    argv = ["scrub", *self._rep_args(snapshot, p, d, p.target), "--start", str(nxt),
                            "--max-seconds", str(self.opts.get("scrub_slice_seconds", SCRUB_SLICE_SECONDS))]
                    if rate_bytes_per_second:
                        argv += ["--rate", str(int(rate_bytes_per_second))]
                    if points:
                        argv.append("--points")
                    out = dst.call(argv)
                    read += int(out["bytes_read"])
                    if out["corrupt_blocks"]:
                        found[d] = found.get(d, 0) + len(out["corrupt_blocks"])
                    if out["corrupt_undo"]:
                        undo[d] = list(out["corrupt_undo"])
                    nxt = out["next"]
                sizes += int(out.get("size") or 0)
        seconds = max((utcnow() - t0).total_seconds(), 1e-6)
        details: dict[str, str | int | float | bool | None] = {
            "bytes_read": read, "disk_bytes": sizes, "seconds": round(seconds, 3),
            "mb_per_second": round(read / seconds / 1e6, 1), "corrupt_blocks": sum(found.values()),
            "corrupt_undo_logs": sum(len(v) for v in undo.values())}
        if not found and not undo:
            return result(p, op, False, S(snapshot.state),
                          f"replica intact: {read / 2**20:.1f} MiB re-hashed in {seconds:.1f} s", t0, details=details)
        what = [f"disk {d}: {n} corrupt block(s)" for d, n in sorted(found.items())] + [
            f"disk {d}: corrupt undo log(s) of point seq {', '.join(map(str, seqs))}" for d, seqs in sorted(undo.items())]
        with self._vm(p) as box:
            cur = box[0]
            if cur is not None:
                cur.resync_required = True
        msg = (f"replica of {p.vm} on {p.target.name} is corrupt ({'; '.join(what)}); marked for resynchronization, "
               "which repairs it from the source by block compare")
        log.warning("%s", msg)
        return result(p, op, True, S(snapshot.state), msg, t0, details=details)

    @staticmethod
    def _disks(vm: _VM) -> list[str]:
        return [d for d in vm.paths if not d.startswith("_")]

    def replication_health(self, p: Placement) -> ReplicationHealth:
        with self._vm(p) as box, self._errors(p, "replication_health", p.target):
            vm = box[0]
            if vm is None:
                return ReplicationHealth(vm=p.vm, state=S.Disabled, health=Health.NotApplicable, mode=ReplicationMode.None_)
            last = datetime.fromisoformat(vm.last_replication) if vm.last_replication else None
            rpo = (utcnow() - last).total_seconds() if last else None
            resync = vm.resync_required
            details = ""
            # Changes not yet replicated: measured at the source against what the replica holds; None
            # (unknown) rather than a false 0 when they cannot be measured. Only a prepared failover has
            # shipped everything by construction.
            pending: int | None = 0 if vm.state == S.PreparedForFailover.value else None
            read_only = ""
            if vm.state in (S.Replicating.value, S.Suspended.value) and vm.primary == p.source.name:
                statuses: list[dict[str, Any]] | None = None
                try:
                    statuses = self._disk_status(vm, p)
                    if not all(s["disk_matches"] for s in statuses):
                        resync, details = True, "; ".join(self._mismatches(vm, p, statuses))
                    ro = [self._meta(p.target, p.vm, d) for d, s in zip(self._disks(vm), statuses, strict=True)
                          if s.get("writable") is False]
                    if ro and not resync:
                        read_only = (f"the replica filesystem on host {p.target.name} is read-only (EROFS): "
                                     f"{', '.join(ro)}; no cycle can land until it is remounted read-write, "
                                     "drills and failover work from the replica as it is")
                except (ExecutionError, ReplicaError, paramiko.SSHException, EOFError, OSError) as exc:
                    # health reports, never raises: a dead path names the network (LinkDown)
                    cause = self._cause(p, exc)
                    said = str(cause) if isinstance(cause, ExecutionError) else f"{type(cause).__name__}: {cause}"
                    details = f"replica unreachable: {said}"[:400]
                    if _error_id(cause) in STORAGE_CODES:
                        read_only = details  # its filesystem refused: Critical, not just unreachable
                if statuses is not None:
                    try:
                        sources = self._source_status(vm, p, statuses)
                    except (ExecutionError, ReplicaError, paramiko.SSHException, EOFError, OSError) as exc:
                        details = details or f"pending changes unknown, the source did not answer: {exc}"[:300]
                    else:
                        lost = [d for d, src in zip(self._disks(vm), sources, strict=True) if not src["tracked"]]
                        if lost:
                            resync = True
                            details = details or (f"change tracking is lost at the source ({', '.join(lost)}: its "
                                                  "manifest is missing or older than the replica's)")
                        counts = [src["pending_bytes"] for src in sources]
                        pending = None if lost or None in counts else sum(counts)
            health = Health.Normal
            if resync:
                health, details = Health.Critical, details or f"Resynchronization is required for {p.vm}."
            elif read_only:
                health, details = Health.Critical, read_only
            elif vm.state in (S.Error.value, S.Suspended.value):
                health = Health.Critical if vm.state == S.Error.value else Health.Warning
            elif (dead := self._interrupted(p.vm)) is not None:
                health, details = Health.Warning, (
                    f"the {dead.get('operation', 'replication')} cycle started at {dead.get('started_at')} was "
                    "interrupted (the orchestrator stopped mid-cycle); the replica holds a recovery point "
                    "and the next cycle carries on from it")
            elif vm.last_error_id in STORAGE_CODES and vm.state == S.Replicating.value:
                health, details = Health.Critical, f"the last cycle failed, the replica holds the previous point: {vm.last_error}"
            elif vm.last_error and vm.state == S.Replicating.value:
                health, details = Health.Warning, f"the last cycle failed, the replica holds the previous point: {vm.last_error}"
            elif rpo is not None and rpo > p.policy.rpo_threshold:
                health, details = Health.Warning, f"last replication {int(rpo)} s ago"
            elif vm.state == S.FailedOver.value:
                health, details = Health.Warning, "failed over: reverse replication to protect it again"
            if vm.last_error and not details:
                details = vm.last_error
            return ReplicationHealth(vm=p.vm, state=S(vm.state), health=health, mode=ReplicationMode.Primary,
                                     primary_host=vm.primary, replica_host=vm.replica, last_replication_time=last,
                                     pending_bytes=pending, successful_cycles=vm.cycles_ok,
                                     missed_cycles=vm.cycles_missed, current_rpo_seconds=rpo, resync_required=resync,
                                     test_failover_active=vm.test_active, details=details)

    def _points(self, vm: _VM, p: Placement) -> list[tuple[RecoveryPoint, dict[str, int]]]:
        """Points every disk holds (a cycle that failed on one disk is no point), with each disk's seq."""
        by_id: dict[str, dict[str, Any]] = {}
        seqs: dict[str, dict[str, int]] = {}
        disks = self._disks(vm)
        for d, st in zip(disks, self._disk_status(vm, p), strict=True):
            for pt in st["points"]:
                by_id.setdefault(pt["id"], pt)
                seqs.setdefault(pt["id"], {})[d] = pt["seq"]
        out = []
        for pid, pt in by_id.items():
            if len(seqs[pid]) == len(disks):
                out.append((self._rp(p, pt), seqs[pid]))
        return sorted(out, key=lambda x: x[0].created_at)

    def _rp(self, p: Placement, pt: dict[str, Any]) -> RecoveryPoint:
        return RecoveryPoint(id=pt["id"], vm=p.vm, created_at=datetime.fromisoformat(pt["created_at"]),
                             consistency=pt.get("consistency", "crash"), size_bytes=pt.get("size"),
                             group=pt.get("group"))

    def recovery_points(self, p: Placement) -> tuple[RecoveryPoint, ...]:
        with self._vm(p) as box, self._errors(p, "recovery_points", p.target):
            vm = need(box[0], p, "recovery_points")
            return tuple(rp for rp, _ in self._points(vm, p))

    # ---- failover ----------------------------------------------------------------------------
    def _pick(self, vm: _VM, p: Placement, point: PointChoice, operation: str) -> tuple[RecoveryPoint, dict[str, int], bool]:
        pts = self._points(vm, p)
        chosen = point.choose([rp for rp, _ in pts])
        if chosen is None:
            raise NotFoundError(f"no recovery point matches {point.describe()}",
                                vm=p.vm, host=p.target.name, operation=operation,
                                hint="list recovery points and choose another", error_id="VMFailover_InvalidSnapshot")
        seqs = next(s for rp, s in pts if rp.id == chosen.id)
        return chosen, seqs, chosen.id == pts[-1][0].id

    def test_failover(self, p: Placement, point: PointChoice = LATEST, network: str | None = None) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box, self._errors(p, "test_failover", p.target):
            vm = need(box[0], p, "test_failover")
            if not begin(vm, p, "test_failover"):
                return result(p, "test_failover", False, S(vm.state), TRANSITIONS["test_failover"].said, t0)
            self._refuse_mismatched(vm, p, "test_failover")
            rp, seqs, _ = self._pick(vm, p, point, "test_failover")
            dst = self._ep(p.target)
            copies = []
            test_dir = None
            for d in self._disks(vm):
                args = ["rebuild", *self._rep_args(vm, p, d, p.target), "--seq", str(seqs[d])]
                try:
                    out = dst.call([*args, "--dest", self._test_image(p.target, p.vm, d, test_dir)])
                except ReplicaError as exc:
                    if exc.code != "EROFS" or test_dir is not None:
                        raise
                    # A read-only replica filesystem: the replica is intact and readable, only the
                    # drill's copy must live elsewhere.
                    test_dir = self._test_dir(p.target, p.vm, elsewhere=True)
                    out = dst.call([*args, "--dest", self._test_image(p.target, p.vm, d, test_dir)])
                copies.append(out["copy"])
            vm.test_active, vm.test_point, vm.test_dir = True, rp.id, test_dir
            net = network or p.test_network
            msg = f"test VM created from {rp.id} ({', '.join(sorted(set(copies)))})"
            if p.compute is not None:
                self._start(vm, p, p.target, test=True, network=net)
                vm.running.append(f"{p.target.name}#test")
                msg += f", started on {net or 'no network'}"
            return result(p, "test_failover", True, finish(vm, "test_failover"), msg, t0, point=rp, details={"network": net})

    def _cleanup_test(self, vm: _VM, p: Placement) -> None:
        if p.compute is not None:
            self._stop(vm, p, p.target, test=True)
        self._ep(p.target).call(["remove", vm.test_dir or self._test_dir(p.target, p.vm)])
        vm.test_dir = None
        vm.running = [h for h in vm.running if h != f"{p.target.name}#test"]
        vm.test_active, vm.test_point = False, None

    def cleanup_test_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box, self._errors(p, "cleanup_test_failover", p.target):
            vm = need(box[0], p, "cleanup_test_failover")
            if not begin(vm, p, "cleanup_test_failover"):
                return result(p, "cleanup_test_failover", False, S(vm.state), TRANSITIONS["cleanup_test_failover"].said, t0)
            self._cleanup_test(vm, p)
            return result(p, "cleanup_test_failover", True, finish(vm, "cleanup_test_failover"), "test VM stopped and its disks deleted", t0)

    def prepare_planned_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        op = "prepare_planned_failover"
        with self._vm(p) as box, self._errors(p, op, p.source):
            vm = need(box[0], p, op)
            if not begin(vm, p, op):
                return result(p, op, False, S(vm.state), TRANSITIONS[op].said, t0)
            if p.compute is not None:
                self._stop(vm, p, p.source, test=False)
            vm.running = [h for h in vm.running if h != p.source.name]
            point, sent, _ = self._cycle(vm, p, "crash", None, "resync" if vm.resync_required else "delta", op)
            return result(p, op, True, finish(vm, op), "source shut down, pending changes sent", t0,
                          point=self._rp(p, point), bytes_sent=sent)

    def failover(self, p: Placement, point: PointChoice = LATEST) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box, self._errors(p, "failover", p.target):
            vm = need(box[0], p, "failover")
            if not begin(vm, p, "failover"):
                return result(p, "failover", False, S(vm.state), TRANSITIONS["failover"].said, t0,
                              details={"point": vm.failover_point})
            damaged = self._refuse_mismatched(vm, p, "failover")
            rp, seqs, newest = self._pick(vm, p, point, "failover")
            if not newest:
                # The replica itself goes back to the chosen point (newer points are dropped).
                dst = self._ep(p.target)
                for d in self._disks(vm):
                    dst.call(["revert", *self._rep_args(vm, p, d, p.target), "--seq", str(seqs[d])])
            vm.failover_point = rp.id
            msg = f"failed over to {rp.id}" + (f"; DAMAGED REPLICA ACCEPTED (accept_damaged_replica): {damaged}"
                                               if damaged else "")
            return result(p, "failover", True, finish(vm, "failover"), msg, t0, point=rp)

    def commit_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box, self._errors(p, "commit_failover", p.target):
            vm = need(box[0], p, "commit_failover")
            if not begin(vm, p, "commit_failover"):
                return result(p, "commit_failover", False, S(vm.state), TRANSITIONS["commit_failover"].said, t0)
            dst = self._ep(p.target)
            for d in self._disks(vm):
                dst.call(["prune", *self._rep_args(vm, p, d, p.target), "--hours", "0"])
            return result(p, "commit_failover", True, finish(vm, "commit_failover"), "failover committed; other points deleted", t0)

    def cancel_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box, self._errors(p, "cancel_failover", p.target):
            vm = need(box[0], p, "cancel_failover")
            if not begin(vm, p, "cancel_failover"):
                return result(p, "cancel_failover", False, S(vm.state), TRANSITIONS["cancel_failover"].said, t0)
            if p.compute is not None and p.target.name in vm.running:
                self._stop(vm, p, p.target, test=False)
            vm.running = [h for h in vm.running if h != p.target.name]
            vm.failover_point = None
            # A replica the VM wrote to, or one reverted to an older point, no longer matches the
            # source's manifest: the next cycle notices and resynchronizes by block compare.
            return result(p, "cancel_failover", True, finish(vm, "cancel_failover"), "failover cancelled", t0)

    def reverse_replication(self, p: Placement) -> OpResult:
        t0 = utcnow()
        op = "reverse_replication"
        with self._vm(p) as box, self._errors(p, op, p.target):
            vm0 = box[0]
            if vm0 is not None and not begin(vm0, p, op):
                return result(p, op, False, S(vm0.state), TRANSITIONS[op].said, t0)
            vm = need(vm0, p, op, *TRANSITIONS[op].allowed)
            if p.compute is not None and p.source.name in vm.running:
                self._stop(vm, p, p.source, test=False)  # two live copies must never share one identity
            vm.running = [h for h in vm.running if h != p.source.name]
            box[0] = vm
            vm = _VM(**json.loads(json.dumps(asdict(vm))))  # swapped only once the resync succeeded
            new_src, new_dst = p.target, p.source
            # The reversed placement: the old replica is now the disk that is shipped.
            rp = p.model_copy(update={"source": new_src, "target": new_dst})
            old_meta = os.path.join(self._vm_dir(p.target, p.vm), "meta")
            old_state = os.path.join(self._vm_dir(p.source, p.vm), "source")
            self._ep(new_dst).call(["remove", os.path.join(self._vm_dir(new_dst, p.vm), "meta")])
            # Each disk whose two copies are proved to hold the failover point needs no block compare.
            compared = {d: why for d in self._disks(vm) if (why := self._adopt(vm, p, d)) is not None}
            vm.primary, vm.replica = new_src.name, new_dst.name
            vm.failover_point = None
            # vm.cbt stays: a VM started on its replica tracks changes from the failover point (_qemu_start);
            # a bitmap of the old primary's QEMU is not found in the new source's, and is not used.
            for d in compared:
                vm.gens.pop(d, None)
            for fm in vm.formats.values():
                fm[new_dst.name] = "raw"  # the old primary's disk now receives the guest's bytes: a raw replica
            point, sent, notes = self._cycle(vm, rp, "crash", None, "delta", op,
                                             modes={d: "resync" for d in compared})
            self._ep(new_src).call(["remove", old_meta])
            self._ep(new_dst).call(["remove", old_state])
            box[0] = vm
            how = [f"{d}: block compare ({why})" for d, why in compared.items()]
            kept = [d for d in self._disks(vm) if d not in compared]
            if kept:
                how.insert(0, f"{', '.join(kept)}: no block compare (both sites held the failover point; only "
                              "what the VM wrote since was sent)")
            return result(p, op, True, finish(vm, op), f"now replicating {new_src.name} -> {new_dst.name}; "
                          + "; ".join([*how, *notes]), t0, point=self._rp(rp, point), bytes_sent=sent,
                          details={"compared": ", ".join(compared) or "none"})

    def _adopt(self, vm: _VM, p: Placement, disk: str) -> str | None:
        """Reverse one disk without a block compare: the old replica (at p.target) becomes a source whose
        base is the failover point, and the old primary (at p.source) becomes the replica of that point,
        when its disk is proved unchanged since it shipped that point (engine.adopt). None when done;
        otherwise why not (the caller resynchronizes that disk by block compare)."""
        fmt = self._format(vm, disk, p.source)
        if fmt != "raw":
            return f"the disk at {p.source.name} is {fmt}: it becomes a raw replica"
        seed = self._ep(p.target).call(["seed-source", *self._rep_args(vm, p, disk, p.target),
                                        "--state", self._src_state(p.target, p.vm, disk)])
        if seed["point"] is None:
            return "the replica no longer lists the failover point"
        got = self._ep(p.source).call(["adopt", *self._rep_args(vm, p, disk, p.source),
                                       "--state", self._src_state(p.source, p.vm, disk), "--gen", seed["gen"],
                                       "--manifest", seed["manifest"], "--point", json.dumps(seed["point"])])
        if not got["adopted"]:
            return str(got["reason"])
        vm.gens[disk] = seed["gen"]
        return None

    # ---- compute -----------------------------------------------------------------------------
    def _run_dir(self, host: Host, vm: str) -> str:
        return os.path.join(self._vm_dir(host, vm), "run")

    def _libvirt_uri(self, p: Placement, host: Host) -> str:
        """The libvirt URI at host: the VM's compute.uri, else the option libvirt_uri (one URI, or host ->
        URI), else libvirt's default ("")."""
        uri = self.opts.get("libvirt_uri")
        if isinstance(uri, dict):
            uri = uri.get(host.name)
        return str((p.compute.uri if p.compute else None) or uri or "")

    def _domain(self, p: Placement, test: bool) -> str:
        base = (p.compute.domain if p.compute and p.compute.domain else p.vm)
        return f"{base}-test" if test else base

    def _hv(self, p: Placement, host: Host, verb: str, *args: str, test: bool = False) -> dict[str, Any]:
        """One call to the VM's hypervisor at host, through the agent there: qemu-<verb> (QMP) or
        libvirt-<verb> (libvirt-python); both answer alike (replica/qemu.py, replica/virt.py)."""
        assert p.compute is not None
        if p.compute.backend == "libvirt":
            argv = [f"libvirt-{verb}", "--uri", self._libvirt_uri(p, host), "--domain", self._domain(p, test)]
            if verb in ("capture", "release"):
                argv += ["--run", self._run_dir(host, p.vm)]
        else:
            argv = [f"qemu-{verb}", "--run", self._run_dir(host, p.vm), "--name", "test" if test else "vm"]
        out: dict[str, Any] = self._ep(host).call([*argv, *args])
        return out

    def _start(self, vm: _VM, p: Placement, host: Host, test: bool, network: str | None) -> bool:
        c = p.compute
        assert c is not None
        disks = ([self._test_image(host, p.vm, d, vm.test_dir) for d in self._disks(vm)] if test
                 else [vm.paths[d][host.name] for d in self._disks(vm)])
        if c.backend == "libvirt":
            # A test copy: the production definition, transient, its disks swapped for the test copies and
            # its NICs on the isolated network (virt.test_copy_xml), so cleanup leaves nothing behind.
            extra = (["--copy-of", self._domain(p, False), "--disks", json.dumps(disks), "--network", network or ""]
                     if test else [])
            since = {} if test else self._track_since(vm, p, host)
            if since:
                names = self._disks(vm)
                extra += ["--track", json.dumps([{"path": path, "format": self._format(vm, d, host), "node": f"d{i}"}
                                                 for i, (d, path) in enumerate(zip(names, disks, strict=True))
                                                 if d in since])]
            out = self._hv(p, host, "start", *extra, test=test)
            if since:
                self._tracked_from_start(vm, p, host, since, out)
            return bool(out["started"])
        if c.backend == "qemu":
            return self._qemu_start(vm, p, host, test, disks, network)
        if not c.command:
            raise InvalidStateError("the VM's compute has no command", vm=p.vm, host=host.name, operation="start_vm",
                                    hint="give compute.command in the topology")
        ctx = {"disks": disks, "disk": disks[0] if disks else "", "vm": p.vm, "site": host.site,
               "network": network or "", "test": test, "host": host.name, "ip": self._address(p, host, test)}
        argv = render_args(c.command, ctx)
        name = "test" if test else "vm"
        run = self._run_dir(host, p.vm)
        out = self._ep(host).call(["spawn", "--pidfile", os.path.join(run, f"{name}.pid"),
                                   "--log", os.path.join(run, f"{name}.log"), "--", *argv])
        return bool(out["started"])

    def _qemu_start(self, vm: _VM, p: Placement, host: Host, test: bool, disks: list[str], network: str | None) -> bool:
        c = p.compute
        assert c is not None
        ctx = {"disks": disks, "disk": disks[0] if disks else "", "vm": p.vm, "site": host.site,
               "network": network or "", "test": test, "host": host.name, "ip": self._address(p, host, test)}
        names = self._disks(vm)
        spec = {"memory_mb": p.memory_mb or 256, "vcpus": p.vcpus or 1,
                "kernel": c.kernel, "initrd": c.initrd, "append": render_args((c.append,), ctx)[0] if c.append else "",
                "accel": "" if c.accel == "auto" else c.accel, "args": render_args(c.args, ctx),
                "guest_agent": c.guest_agent,
                # Test copies and replicas are raw; the primary's disks have the topology's format.
                "disks": [{"path": path, "format": "raw" if test else self._format(vm, d, host)}
                          for d, path in zip(names, disks, strict=True)]}
        since = {} if test else self._track_since(vm, p, host)
        spec["track"] = bool(since)
        out = self._ep(host).call(["qemu-start", "--run", self._run_dir(host, p.vm), "--name", "test" if test else "vm",
                                   "--spec", json.dumps(spec)])
        if out.get("started") and not test:
            # A new QEMU has no bitmaps of the old one (raw disks), or only inconsistent ones after a
            # crash: the capture finds out and the next cycle reads everything once.
            log.info("%s: QEMU started at %s (%s)", p.vm, host.name, out.get("accel"))
            self._tracked_from_start(vm, p, host, since, out)
        return bool(out.get("started"))

    def _track_since(self, vm: _VM, p: Placement, host: Host) -> dict[str, str]:
        """Started on its replica (a failover): the replica disks hold a known point, so dirty bitmaps added
        before the guest runs track every change since that point, and the first reversed cycle reads
        only those blocks. Per disk whose replica is proved intact (status: disk_matches), the generation
        of that point; empty elsewhere."""
        since: dict[str, str] = {}
        if host.name == vm.replica:
            for d in self._disks(vm):
                st = self._ep(host).call(["status", *self._rep_args(vm, p, d, host)])
                if st["disk_matches"] and st["gen"]:
                    since[d] = st["gen"]
        return since

    def _tracked_from_start(self, vm: _VM, p: Placement, host: Host, since: dict[str, str], out: dict[str, Any]) -> None:
        """Record the bitmaps a start added (qemu-start, libvirt-start: disk key d<i> -> bitmap) as each
        disk's change tracking since its replica's point."""
        if out.get("track_error"):
            log.warning("%s: no dirty bitmaps from the start at %s (%s): its first cycle reads every disk",
                        p.vm, host.name, out["track_error"])
        bitmaps = out.get("bitmaps") or {}
        for i, d in enumerate(self._disks(vm)):
            if d in since and f"d{i}" in bitmaps:
                vm.cbt[d] = {"bitmap": bitmaps[f"d{i}"], "since": [since[d]]}

    @staticmethod
    def _address(p: Placement, host: Host, test: bool) -> str:
        """The first NIC's address where this start happens ('' when none is known): its test-network
        address for a test copy, the address it has now on the source side, its failover (or failback)
        address on the target side. A process VM has no DHCP: it binds this address itself."""
        nic = p.nics[0] if p.nics else None
        if nic is None:
            return ""
        if test:
            return str(nic.test_ip.address) if nic.test_ip else ""
        if host.name == p.source.name:
            return str(nic.source_ip or "")
        return str(nic.ip.address) if nic.ip else ""

    def _stop(self, vm: _VM, p: Placement, host: Host, test: bool) -> bool:
        c = p.compute
        assert c is not None
        grace = float(self.opts.get("stop_grace", 10))
        if c.backend == "libvirt":
            # ACPI shutdown, destroy after the grace; a test copy is thrown away at once.
            return bool(self._hv(p, host, "stop", "--grace", "0" if test else str(grace), test=test)["stopped"])
        name = "test" if test else "vm"
        if c.backend == "qemu":
            # A test copy is thrown away: no need to wait for the guest's shutdown.
            out = self._ep(host).call(["qemu-stop", "--run", self._run_dir(host, p.vm), "--name", name,
                                       "--grace", "0" if test else str(float(self.opts.get("stop_grace", 30)))])
            return bool(out["stopped"])
        out = self._ep(host).call(["kill", "--pidfile", os.path.join(self._run_dir(host, p.vm), f"{name}.pid"),
                                   "--grace", str(grace)])
        return bool(out["stopped"])

    def start_vm(self, p: Placement, side: Side = "target", test: bool = False) -> OpResult:
        t0 = utcnow()
        host = p.target if side == "target" else p.source
        with self._vm(p) as box, self._errors(p, "start_vm", host):
            vm = need(box[0], p, "start_vm")
            if test and not vm.test_active:
                raise InvalidStateError("no test VM to start", vm=p.vm, host=host.name, operation="start_vm",
                                        hint="run the test failover first", error_id="InvalidState")
            where = f"{host.name}#test" if test else host.name
            if p.compute is None:
                changed = where not in vm.running
                msg = "no compute backend: the disks are ready" if changed else "already running"
            else:
                net = p.test_network if test else next((n.target_network for n in p.nics if n.target_network), None)
                if side == "source":
                    net = next((n.source_network for n in p.nics), None)
                changed = self._start(vm, p, host, test, net)
                msg = "started" if changed else "already running"
            if where not in vm.running:
                vm.running.append(where)
            return result(p, "start_vm", changed, S(vm.state), msg, t0, host=host.name)

    def stop_vm(self, p: Placement, side: Side = "source") -> OpResult:
        t0 = utcnow()
        host = p.target if side == "target" else p.source
        with self._vm(p) as box, self._errors(p, "stop_vm", host):
            vm = need(box[0], p, "stop_vm")
            if p.compute is None:
                changed = host.name in vm.running
            else:
                changed = self._stop(vm, p, host, test=False)
            vm.running = [h for h in vm.running if h != host.name]
            return result(p, "stop_vm", changed, S(vm.state), "stopped" if changed else "already off", t0, host=host.name)

    def vm_control(self, p: Placement, action: str, side: Side = "source") -> dict[str, Any]:
        """A QEMU VM's or libvirt domain's run state ('status'), or pause it ('pause': QMP stop, libvirt
        suspend) / continue it ('cont': QMP cont, libvirt resume)."""
        host = p.target if side == "target" else p.source
        if p.compute is None or p.compute.backend not in HYPERVISORS or action not in ("status", "pause", "cont"):
            raise InvalidStateError(f"{action} needs a VM with compute backend qemu or libvirt", vm=p.vm, host=host.name,
                                    operation="vm_control", hint="pause and continue are for QEMU VMs and libvirt domains")
        with self._errors(p, "vm_control", host):
            if action == "status":
                return self._hv(p, host, "status")
            return self._hv(p, host, "control", "--action", action)

    def apply_network(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._vm(p) as box:
            vm = need(box[0], p, "apply_network")
            want = {n.nic: n.target_network for n in p.nics}
            if vm.networks.get(p.target.name) == want:
                return result(p, "apply_network", False, S(vm.state), "network settings already applied", t0)
            vm.network_applied = True
            vm.networks[p.target.name] = want
            # The process backend receives the mapped network as {{ network }} when it starts.
            nets = ", ".join(f"{n.nic}->{n.target_network or 'disconnected'}" for n in p.nics)
            return result(p, "apply_network", True, S(vm.state), f"network: {nets or 'no NICs'}", t0)

    def vm_networks(self, p: Placement, side: Side = "source") -> dict[str, str | None] | None:
        """The networks the VM's NICs are on at that side's host, as recorded when its network settings
        were applied or changed there (None: never recorded)."""
        host = p.source if side == "source" else p.target
        with self._vm(p) as box:
            vm = need(box[0], p, "vm_networks")
            nets = vm.networks.get(host.name)
            return dict(nets) if nets is not None else None

    def connect_network(self, p: Placement, side: Side, nic: str, network: str | None) -> None:
        """An operator's change of a VM's NIC at one side: it takes effect at the VM's next start."""
        host = p.source if side == "source" else p.target
        with self._vm(p) as box:
            vm = need(box[0], p, "connect_network")
            vm.networks.setdefault(host.name, {n.nic: n.target_network for n in p.nics})[nic] = network

    def close(self) -> None:
        self.pool.close()
