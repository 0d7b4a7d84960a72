"""QEMU VMs on a host, through QMP (the `qemu.qmp` library): start, stop, pause, point-in-time views.

Runs where the VM runs (the agent's `qemu-*` commands), so it works the same for local hosts and over
SSH. A VM's run directory holds `<name>.pid`, `<name>.log`, `<name>.qmp` (the QMP socket),
`<name>.nbd` (the NBD server QEMU starts for views), `<name>.qga` (the guest agent's port, when the VM has
one: qga.py) and the views' scratch files.

A view (capture) is QEMU's image fleecing, as measured on QEMU 7.2 (docs/ENGINE.md): with the guest
stopped for a few milliseconds, every disk's dirty bitmap rotates in one transaction and a
copy-before-write filter goes in front of every disk, so all disks are captured at one instant; the
guest then runs on while the agent reads each disk's snapshot-access node over NBD (64 KiB reads:
nbd.READ_MAX). The disabled bitmap of the previous capture, exported with the view, holds exactly
the blocks written between the two captures (changed-block tracking).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import process
from .engine import ReplicaError

T = TypeVar("T")
QMP_TIMEOUT = 30.0
BITMAP_PREFIX = "sr-"


# qemu.qmp logs a refused connection (QEMU still starting, or gone) at ERROR with a traceback; every
# failure reaches the caller as a QemuError naming the socket, so its own log stays quiet.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QemuError(ReplicaError):
    code = "QemuError"


def paths(run: str, name: str) -> dict[str, str]:
    return {k: os.path.join(run, f"{name}.{k}") for k in ("pid", "log", "qmp", "nbd", "serial", "qga")}


def _session(sock: str, fn: Callable[[Any], Awaitable[T]], timeout: float = QMP_TIMEOUT) -> T:
    """Connect to a VM's QMP socket, run fn(client), disconnect; every step under a deadline."""
    from qemu.qmp import QMPClient

    async def go() -> T:
        c = QMPClient("siterecovery")
        await asyncio.wait_for(c.connect(sock), timeout)
        try:
            return await asyncio.wait_for(fn(c), timeout)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.disconnect(), 5)

    try:
        return asyncio.run(go())
    except ReplicaError:
        raise
    except (OSError, TimeoutError) as exc:
        raise QemuError(f"QMP at {sock}: {type(exc).__name__}: {exc}", code="QmpUnreachable") from None
    except Exception as exc:  # qemu.qmp's ExecuteError, ConnectError, EOF...
        raise QemuError(f"QMP at {sock}: {exc}", code="QmpFailed") from None


def qmp(sock: str, command: str, args: dict[str, Any] | None = None) -> Any:
    async def one(c: Any) -> Any:
        return await c.execute(command, args)
    return _session(sock, one)


# ---- lifecycle -------------------------------------------------------------------------------------

def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def command_line(spec: dict[str, Any], p: dict[str, str]) -> list[str]:
    """The QEMU argv for a spec: {accel, memory_mb, vcpus, kernel, initrd, append, disks: [{path, format}],
    guest_agent, args}. accel: kvm, tcg, or empty for KVM when /dev/kvm opens (TCG otherwise). guest_agent:
    a virtio-serial port org.qemu.guest_agent.0 that QEMU serves on the unix socket `<name>.qga`."""
    accel = spec.get("accel") or ("kvm" if kvm_usable() else "tcg")
    argv = [spec.get("binary") or "qemu-system-x86_64", "-accel", accel, "-m", str(spec.get("memory_mb") or 256),
            "-smp", str(spec.get("vcpus") or 1), "-display", "none", "-no-user-config", "-nodefaults",
            "-serial", f"file:{p['serial']}", "-qmp", f"unix:{p['qmp']},server=on,wait=off"]
    if spec.get("kernel"):
        argv += ["-kernel", spec["kernel"]]
    if spec.get("initrd"):
        argv += ["-initrd", spec["initrd"]]
    if spec.get("append"):
        argv += ["-append", spec["append"]]
    for i, d in enumerate(spec.get("disks", [])):
        fmt = d.get("format") or "raw"
        if fmt not in ("raw", "qcow2"):
            raise QemuError(f"disk format {fmt} is not supported (raw or qcow2)", code="StartFailed")
        # The format is the topology's, never probed: a guest could write an image header into a raw disk.
        argv += ["-blockdev", json.dumps({"driver": "file", "filename": d["path"], "node-name": f"d{i}-file"}),
                 "-blockdev", json.dumps({"driver": fmt, "file": f"d{i}-file", "node-name": f"d{i}"}),
                 "-device", f"virtio-blk-pci,drive=d{i},id=vd{i}"]
    if spec.get("guest_agent"):
        sock = p["qga"].replace(",", ",,")  # QEMU's option syntax: a comma in a value is doubled
        argv += ["-chardev", f"socket,id=qga0,path={sock},server=on,wait=off",
                 "-device", "virtio-serial-pci,id=qga-serial0",
                 "-device", "virtserialport,bus=qga-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0"]
    argv += [str(a) for a in spec.get("args", [])]
    if spec.get("track"):
        argv.append("-S")  # the guest waits until start() has put a dirty bitmap on every disk
    return argv


def start(run: str, name: str, spec: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """Start the VM detached unless it runs; answers once its QMP socket answers."""
    p = paths(run, name)
    if process.alive(p["pid"]):
        return {"started": False, "pid": process.alive(p["pid"])}
    os.makedirs(run, exist_ok=True)
    for k in ("qmp", "nbd", "qga"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p[k])
    argv = command_line(spec, p)
    out = process.spawn(p["pid"], p["log"], argv)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive(p["pid"]):
            if argv[2] == "kvm" and not spec.get("accel"):
                # /dev/kvm opened but KVM does not work here (nested hosts): TCG, said in the answer.
                res = start(run, name, {**spec, "accel": "tcg"}, timeout)
                return {**res, "kvm_failed": True}
            raise QemuError(f"QEMU exited while starting; see {p['log']}", code="StartFailed")
        st = None
        if os.path.exists(p["qmp"]):
            with contextlib.suppress(QemuError):
                st = qmp(p["qmp"], "query-status")
        if st is not None:
            res = {"started": True, "pid": out["pid"], "status": st.get("status"), "accel": argv[2]}
            if spec.get("track"):
                try:
                    res.update(_track_from_start(p["qmp"], spec))
                except QemuError as exc:
                    res["track_error"] = str(exc)  # its first cycle reads every disk
                    qmp(p["qmp"], "cont")  # the guest runs, untracked; if even this fails, the start failed
            return res
        time.sleep(0.05)
    process.kill(p["pid"], 0)
    raise QemuError(f"QEMU's QMP socket did not answer within {timeout:.0f} s; see {p['log']}", code="StartFailed")


def _track_from_start(sock: str, spec: dict[str, Any]) -> dict[str, Any]:
    """QEMU started with -S: a dirty bitmap on every disk before the guest's first instruction, then
    cont. The bitmaps then hold every block the guest ever writes, so the first cycle from this VM reads
    only those (reverse replication after a failover). A disk whose bitmap could not be added is left
    out of the answer (its first cycle reads the whole disk); the guest runs either way."""
    tag = uuid.uuid4().hex[:8]

    async def go(c: Any) -> dict[str, Any]:
        bitmaps: dict[str, str] = {}
        try:
            for i, d in enumerate(spec.get("disks", [])):
                add: dict[str, Any] = {"node": f"d{i}", "name": f"{BITMAP_PREFIX}start-{tag}-d{i}"}
                if (d.get("format") or "raw") == "qcow2":
                    add["persistent"] = True
                await c.execute("block-dirty-bitmap-add", add)
                bitmaps[add["node"]] = add["name"]
        finally:
            await c.execute("cont")
        st = await c.execute("query-status")
        return {"bitmaps": bitmaps, "status": st.get("status")}

    return _session(sock, go)


def stop(run: str, name: str, grace: float) -> dict[str, Any]:
    """ACPI power-off, wait up to `grace` seconds, then kill (TERM, then KILL)."""
    p = paths(run, name)
    if not process.alive(p["pid"]):
        return process.kill(p["pid"], 0)
    how = "powerdown"
    try:
        if grace > 0:
            qmp(p["qmp"], "system_powerdown")
    except QemuError:
        how = "kill"
    deadline = time.monotonic() + grace
    while grace > 0 and process.alive(p["pid"]) and time.monotonic() < deadline:
        child = process.children.get(process.alive(p["pid"]) or -1)
        if child is not None and child.poll() is not None:
            break
        time.sleep(0.05)
    if process.alive(p["pid"]):
        how = "kill"
    res = process.kill(p["pid"], 2)
    return {"stopped": True, "how": how if res.get("stopped") else "powerdown", **{k: v for k, v in res.items() if k != "stopped"}}


def status(run: str, name: str) -> dict[str, Any]:
    p = paths(run, name)
    pid = process.alive(p["pid"])
    if not pid:
        return {"running": False, "status": "off", "pid": None}
    try:
        st = qmp(p["qmp"], "query-status")
        nodes = qmp(p["qmp"], "query-named-block-nodes", {"flat": True})
    except QemuError as exc:
        return {"running": True, "status": "unknown", "pid": pid, "error": str(exc)}
    # Bytes each dirty bitmap has seen written (a capture starts one: writes since that point).
    dirty = {b["name"]: int(b.get("count", 0)) for n in nodes for b in n.get("dirty-bitmaps", [])
             if b.get("recording") and not b.get("inconsistent")}
    return {"running": st.get("status") == "running", "status": st.get("status"), "pid": pid, "dirty": dirty}


def control(run: str, name: str, command: str) -> dict[str, Any]:
    """pause (QMP stop) or cont."""
    p = paths(run, name)
    qmp(p["qmp"], {"pause": "stop", "cont": "cont"}[command])
    return status(run, name)


# ---- point-in-time views --------------------------------------------------------------------------

def _node_bitmaps(nodes: list[dict[str, Any]], node: str) -> dict[str, dict[str, Any]]:
    for n in nodes:
        if n.get("node-name") == node:
            return {b["name"]: b for b in n.get("dirty-bitmaps", [])}
    return {}


Session = Callable[[Callable[[Any], Awaitable[Any]]], Any]


def capture(run: str, name: str, disks: list[dict[str, Any]], tag: str, session: Session | None = None) -> dict[str, Any]:
    """A view of all the VM's disks at one instant, exported over NBD; the previous bitmaps rotated.

    disks: [{node, format, prev[, key]}] where prev is the bitmap the last capture started (or None).
    Answers {socket, window_seconds, was_running, disks: [{node, export, size, bitmap (usable prev or
    None), new_bitmap, qdev, scratch}]}; release() takes the same answer back.
    session: how to reach the VM's monitor (default: its QMP socket; virt.py: libvirt's passthrough).
    """
    p = paths(run, name)
    sess: Session = session or (lambda fn: _session(p["qmp"], fn))
    scratch_dir = os.path.join(run, "views")
    os.makedirs(scratch_dir, exist_ok=True)

    async def go(c: Any) -> dict[str, Any]:
        blocks = await c.execute("query-block")
        if left := _left_behind(blocks, disks, scratch_dir):
            # Otherwise the device reads through the old filter and this disk has "no device": every
            # cycle would fail until QEMU restarts, and the old scratch would grow with every write.
            if errors := await _teardown(c, left, ok=True):
                raise QemuError(f"a view an earlier cycle left behind could not be removed: {'; '.join(errors)}",
                                code="CaptureFailed")
            blocks = await c.execute("query-block")
        qdev = {b["inserted"]["node-name"]: b.get("qdev") for b in blocks if b.get("inserted")}
        sizes = {b["inserted"]["node-name"]: b["inserted"]["image"]["virtual-size"] for b in blocks if b.get("inserted")}
        nodes = await c.execute("query-named-block-nodes", {"flat": True})
        view: dict[str, Any] = {"socket": p["nbd"], "tag": tag, "disks": []}
        for d in disks:
            node = d["node"]
            if node not in qdev or not qdev[node]:
                raise QemuError(f"QEMU has no device on node {node}", code="QemuNoDisk")
            have = _node_bitmaps(nodes, node)
            prev = d.get("prev")
            usable = prev if prev in have and not have[prev].get("inconsistent") and have[prev].get("recording") else None
            stale = [b for b, info in have.items() if b.startswith(BITMAP_PREFIX) and b != usable]
            view["disks"].append({"node": node, "qdev": qdev[node], "size": sizes[node], "bitmap": usable,
                                  "new_bitmap": f"{BITMAP_PREFIX}{tag}", "stale": stale,
                                  "persistent": d.get("format") == "qcow2", **_names(d, tag, scratch_dir)})
        for v in view["disks"]:
            # Bitmaps of an older QEMU life or an earlier failed chain (inconsistent after a crash) go.
            for b in v["stale"]:
                await c.execute("block-dirty-bitmap-remove", {"node": v["node"], "name": b})
            _sparse_scratch(v["scratch"], v["size"])
            await c.execute("blockdev-add", {"driver": "raw", "node-name": v["tmp"], "discard": "unmap",
                                             "file": {"driver": "file", "filename": v["scratch"]}})
        st = await c.execute("query-status")
        view["was_running"] = st.get("status") == "running"
        t0 = time.monotonic()
        # The window: 7.2 cannot put blockdev-add or qom-set in a transaction, so the guest is stopped
        # (all in-flight I/O drained) while every disk's bitmap rotates and its filter goes in.
        if view["was_running"]:
            await c.execute("stop")
        try:
            actions = []
            for v in view["disks"]:
                add = {"node": v["node"], "name": v["new_bitmap"]}
                if v["persistent"]:
                    add["persistent"] = True
                actions.append({"type": "block-dirty-bitmap-add", "data": add})
                if v["bitmap"]:
                    actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": v["node"], "name": v["bitmap"]}})
            await c.execute("transaction", {"actions": actions})
            for v in view["disks"]:
                await c.execute("blockdev-add", {"driver": "copy-before-write", "node-name": v["cbw"],
                                                 "file": v["node"], "target": v["tmp"]})
                await c.execute("qom-set", {"path": v["qdev"], "property": "drive", "value": v["cbw"]})
                v["filtered"] = True
        finally:
            if view["was_running"]:
                await c.execute("cont")
            view["window_seconds"] = round(time.monotonic() - t0, 4)
        try:
            await c.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": p["nbd"]}}})
        except Exception as exc:
            if "already running" not in str(exc):
                raise
        for v in view["disks"]:
            await c.execute("blockdev-add", {"driver": "snapshot-access", "node-name": v["acc"], "file": v["cbw"]})
            exp: dict[str, Any] = {"type": "nbd", "id": v["export"], "node-name": v["acc"], "name": v["export"]}
            if v["bitmap"]:
                exp["bitmaps"] = [{"node": v["node"], "name": v["bitmap"]}]
            await c.execute("block-export-add", exp)
        return view

    try:
        view: dict[str, Any] = sess(go)
        return view
    except ReplicaError:  # QemuError, or LibvirtError (virt.py) reaching the domain
        # Tear down whatever the failed capture made (best effort), so the next cycle starts clean.
        with contextlib.suppress(ReplicaError):
            release(run, name, {"socket": p["nbd"], "disks": _guess(disks, tag, scratch_dir)}, ok=False, session=session)
        raise


def _sparse_scratch(path: str, size: int) -> None:
    """The view's scratch: a sparse raw file of the disk's virtual size (copy-before-write needs the
    sizes equal). It holds only the old copies of blocks the guest overwrites while the view is open; no
    format, so no `qemu-img create` per disk per cycle, and the filter's cluster stays 64 KiB (its
    default, a raw target reports none), the size the view's reads are kept to."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except OSError as exc:
        raise QemuError(f"the view's scratch file {path}: {exc.strerror}", code="CaptureFailed") from None


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _names(d: dict[str, Any], tag: str, scratch_dir: str) -> dict[str, str]:
    """The names a view adds for one disk; `key` (default: the node) keeps them within QEMU's 31
    characters where the node's own name is long (libvirt's libvirt-N-format)."""
    k = d.get("key") or d["node"]
    if not _NAME.fullmatch(f"{tag}-{k}"):  # QEMU's own charset for node names; and it becomes a file name
        raise QemuError(f"a view's tag and disk key must be letters, digits, '.', '_' or '-': {tag!r}, {k!r}",
                        code="CaptureFailed")
    return {"scratch": os.path.join(scratch_dir, f"{tag}-{k}.scratch"), "tmp": f"sr-tmp-{tag}-{k}",
            "cbw": f"sr-cbw-{tag}-{k}", "acc": f"sr-acc-{tag}-{k}", "export": f"sr-view-{tag}-{k}"}


def _guess(disks: list[dict[str, Any]], tag: str, scratch_dir: str) -> list[dict[str, Any]]:
    return [{"node": d["node"], "qdev": None, "bitmap": d.get("prev"), "new_bitmap": f"{BITMAP_PREFIX}{tag}",
             **_names(d, tag, scratch_dir)} for d in disks]


def release(run: str, name: str, view: dict[str, Any], ok: bool, session: Session | None = None) -> dict[str, Any]:
    """Tear a view down in the order QEMU 7.2 needs: export, snapshot-access, the device back on its
    disk, the filter, the scratch node; then the previous bitmap. ok=False (the cycle failed): the
    previous bitmap is merged into the new one instead, so the new one still covers every change since
    the point the replica holds."""
    p = paths(run, name)

    async def go(c: Any) -> dict[str, Any]:
        return {"released": True, "errors": await _teardown(c, view["disks"], ok)}

    out: dict[str, Any] = (session or (lambda fn: _session(p["qmp"], fn)))(go)
    return out


async def _teardown(c: Any, disks: list[dict[str, Any]], ok: bool) -> list[str]:
    """release()'s steps on an open monitor session; the errors other than "already gone"."""
    errors: list[str] = []

    async def step(cmd: str, args: dict[str, Any]) -> None:
        try:
            await c.execute(cmd, args)
        except Exception as exc:
            msg = str(exc)
            if "not found" not in msg and "Cannot find" not in msg and "does not exist" not in msg:
                errors.append(f"{cmd}: {msg}")

    blocks = await c.execute("query-block")
    qdev = {b["inserted"]["node-name"]: b.get("qdev") for b in blocks if b.get("inserted")}
    for v in disks:
        await step("block-export-del", {"id": v["export"]})
        for _ in range(100):  # a client still connected keeps the export until it leaves
            exports = await c.execute("query-block-exports")
            if not any(e.get("id") == v["export"] for e in exports):
                break
            await asyncio.sleep(0.05)
        await step("blockdev-del", {"node-name": v["acc"]})
        dev = v.get("qdev") or qdev.get(v["cbw"])
        if dev and qdev.get(v["cbw"]):
            await step("qom-set", {"path": dev, "property": "drive", "value": v["node"]})
        await step("blockdev-del", {"node-name": v["cbw"]})
        await step("blockdev-del", {"node-name": v["tmp"]})
        if v.get("bitmap"):
            if not ok:
                await step("block-dirty-bitmap-merge", {"node": v["node"], "target": v["new_bitmap"],
                                                        "bitmaps": [v["bitmap"]]})
            await step("block-dirty-bitmap-remove", {"node": v["node"], "name": v["bitmap"]})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(v["scratch"])
    return errors


def _left_behind(blocks: list[dict[str, Any]], disks: list[dict[str, Any]], scratch_dir: str) -> list[dict[str, Any]]:
    """Views an earlier cycle never released (its agent killed, its SSH link gone mid-release): a disk
    whose device still reads through a copy-before-write filter of ours, named sr-cbw-<tag>-<key>. Each
    as release() takes it, without bitmaps (the capture sorts those out: an unreleased chain is stale)."""
    inserted = {b["inserted"]["node-name"]: b.get("qdev") for b in blocks if b.get("inserted")}
    out = []
    for d in disks:
        if d["node"] in inserted:
            continue
        k = d.get("key") or d["node"]
        for node, dev in inserted.items():
            if node.startswith("sr-cbw-") and node.endswith(f"-{k}") and len(node) > len(f"sr-cbw--{k}"):
                tag = node[len("sr-cbw-"):-len(k) - 1]
                out.append({"node": d["node"], "qdev": dev, **_names(d, tag, scratch_dir)})
    return out


# ---- a disk of a VM that is off -------------------------------------------------------------------

@contextlib.contextmanager
def offline_export(disk: str, fmt: str, sock: str, timeout: float = 30) -> Any:
    """qemu-nbd serving a disk read-only (its guest-visible bytes, whatever the format) while the VM is off."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    proc = subprocess.Popen(["qemu-nbd", "--read-only", "--format", fmt, "--socket", sock, "--export-name", "disk",
                             "--persistent", disk],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
                raise QemuError(f"qemu-nbd could not serve {disk}: {err}", code="CaptureFailed")
            time.sleep(0.02)
        yield {"socket": sock, "export": "disk"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
