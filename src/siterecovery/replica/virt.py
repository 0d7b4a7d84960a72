"""libvirt domains on a host, through libvirt-python: start, stop, pause, state, point-in-time views.

Runs where the domain runs (the agent's `libvirt-*` commands) with the VM's connection URI, so it works
the same for local hosts and over SSH. Every libvirt call has a deadline (CALL_TIMEOUT): libvirt's own
calls can block for ever on a wedged daemon, so each runs in a worker thread that the caller stops
waiting for. Views are qemu.py's capture sequence, sent through libvirt's QEMU monitor passthrough
(libvirt_qemu.qemuMonitorCommand) onto the nodes libvirt named, so a libvirt domain gets the same
point-in-time view, pause window and dirty-bitmap tracking as a QEMU VM (docs/ENGINE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from . import qemu
from .engine import ReplicaError

T = TypeVar("T")
CALL_TIMEOUT = 30.0
# virDomainState -> the words `virsh domstate` uses.
STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down", 5: "shut off",
          6: "crashed", 7: "pmsuspended"}
_OFF = (0, 5, 6)  # no QEMU process: nothing to pause, view or stop
VIR_ERR_NO_DOMAIN = 42


class LibvirtError(ReplicaError):
    code = "LibvirtFailed"


def _lib(name: str = "libvirt") -> Any:
    """libvirt-python, imported when a libvirt command runs (hosts without libvirt never need it)."""
    try:
        mod = importlib.import_module(name)
    except ImportError:
        raise LibvirtError("libvirt-python is not installed on this host (pip install 'siterecovery[libvirt]'; "
                           "it builds against libvirt-dev)", code="LibvirtMissing") from None
    if name == "libvirt":
        # libvirt prints every error on stderr by default; each one reaches the caller as a LibvirtError.
        mod.registerErrorHandler(lambda _ctx, _err: None, None)
    return mod


def _call(what: str, fn: Callable[..., T], *args: Any, timeout: float = CALL_TIMEOUT) -> T:
    """fn(*args) with a deadline; libvirt's errors become LibvirtError naming `what`."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["ok"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["err"] = exc

    t = threading.Thread(target=run, name=f"libvirt {what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise LibvirtError(f"libvirt did not answer {what} within {timeout:.0f} s", code="LibvirtTimeout")
    if "err" in box:
        # Popped: the error's traceback holds the worker's frame, which holds box; a cycle would keep the
        # connection (fn's object) open until the garbage collector runs.
        exc = box.pop("err")
        if isinstance(exc, ReplicaError):
            raise exc
        msg = exc.get_error_message() if hasattr(exc, "get_error_message") else str(exc)
        err = LibvirtError(f"{what}: {msg}")
        err.libvirt_code = exc.get_error_code() if hasattr(exc, "get_error_code") else None  # type: ignore[attr-defined]
        raise err
    result: T = box["ok"]
    return result


@contextlib.contextmanager
def _connect(uri: str) -> Iterator[Any]:
    lib = _lib()
    conn = _call(f"connect to {uri or 'the default URI'}", lib.open, uri or None)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            _call("close", conn.close, timeout=5)


def _lookup(conn: Any, domain: str) -> Any | None:
    try:
        return _call(f"look up domain {domain}", conn.lookupByName, domain)
    except LibvirtError as exc:
        if getattr(exc, "libvirt_code", None) == VIR_ERR_NO_DOMAIN:
            return None
        raise


def _need(conn: Any, domain: str) -> Any:
    dom = _lookup(conn, domain)
    if dom is None:
        raise LibvirtError(f"libvirt has no domain {domain}", code="NoDomain")
    return dom


def _state(dom: Any) -> int:
    return int(_call("read the domain's state", dom.state)[0])


def _dirty(dom: Any) -> dict[str, int]:
    """Bytes each recording dirty bitmap has seen written (as qemu.status)."""
    nodes = _monitor(dom, "query-named-block-nodes", {"flat": True})
    return {b["name"]: int(b.get("count", 0)) for n in nodes for b in n.get("dirty-bitmaps", [])
            if b.get("recording") and not b.get("inconsistent")}


def status(uri: str, domain: str) -> dict[str, Any]:
    """{running, status (virsh's words, 'absent' without a domain), active (a QEMU process exists), dirty}."""
    with _connect(uri) as conn:
        return _status(conn, domain)


def _status(conn: Any, domain: str) -> dict[str, Any]:
    dom = _lookup(conn, domain)
    if dom is None:
        return {"running": False, "status": "absent", "active": False}
    st = _state(dom)
    out: dict[str, Any] = {"running": st in (1, 2), "status": STATES.get(st, str(st)), "active": st not in _OFF}
    if out["active"]:
        try:
            out["dirty"] = _dirty(dom)
        except ReplicaError as exc:
            out["error"] = str(exc)
    return out


def start(uri: str, domain: str, copy_of: str = "", disks: list[str] | None = None, network: str = "",
          track: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Start a defined domain (virDomainCreate) unless it runs; copy_of: start `domain` instead as a
    transient copy of that domain with its disks swapped for `disks` and its NICs on `network`.

    track ([{path, format, node}], a domain started on its replica): the domain starts paused, each of
    these disks gets a dirty bitmap, then it runs; the answer's `bitmaps` maps each disk's `node` (the
    fabric's key) to its bitmap, which then holds every block the guest ever writes. If they cannot all
    be added, none is reported and `track_error` says why (the first cycle reads the views whole; a
    bitmap added all the same is removed by the next capture as stale); the guest runs either way."""
    with _connect(uri) as conn:
        dom = _lookup(conn, domain)
        if dom is not None and _state(dom) not in _OFF:
            return {"started": False, "status": STATES.get(_state(dom), "")}
        if copy_of:
            if dom is not None:  # a stale persistent definition under the test name would outlive cleanup
                raise LibvirtError(f"a domain named {domain} already exists; remove it (virsh undefine {domain})",
                                   code="DomainExists")
            prod = _need(conn, copy_of)
            xml = test_copy_xml(_call("read the domain's XML", prod.XMLDesc, 0), domain, list(disks or ()), network)
            dom = _call(f"create domain {domain}", conn.createXML, xml, 0)
        else:
            if dom is None:
                raise LibvirtError(f"libvirt has no domain {domain}; define it at this host (virsh define)",
                                   code="NoDomain")
            if not track:
                _call(f"start domain {domain}", dom.create)
                return {"started": True, "status": STATES.get(_state(dom), "")}
            _call(f"start domain {domain} paused", dom.createWithFlags, _lib().VIR_DOMAIN_START_PAUSED)
            out: dict[str, Any] = {"started": True}
            try:
                out["bitmaps"] = _track_from_start(dom, domain, track)
            except ReplicaError as exc:
                out["track_error"] = str(exc)
            finally:
                _call(f"resume domain {domain}", dom.resume)  # if even this fails, the start failed
            out["status"] = STATES.get(_state(dom), "")
            return out
        return {"started": True, "status": STATES.get(_state(dom), "")}


def _track_from_start(dom: Any, domain: str, track: list[dict[str, Any]]) -> dict[str, str]:
    """A dirty bitmap on each of these disks of a domain not yet running (qemu._track_from_start over
    libvirt's monitor passthrough); the disks are found by file, their format checked as capture does."""
    tag = uuid.uuid4().hex[:8]
    blocks = _monitor(dom, "query-block")
    out: dict[str, str] = {}
    for i, ins in enumerate(_match(blocks, domain, track)):
        add: dict[str, Any] = {"node": ins["node"], "name": f"{qemu.BITMAP_PREFIX}start-{tag}-{i}"}
        if ins["format"] == "qcow2":
            add["persistent"] = True
        _monitor(dom, "block-dirty-bitmap-add", add)
        out[ins["key"]] = add["name"]
    return out


def stop(uri: str, domain: str, grace: float) -> dict[str, Any]:
    """ACPI shutdown (virDomainShutdown), wait up to `grace` seconds, then destroy."""
    with _connect(uri) as conn:
        dom = _lookup(conn, domain)
        if dom is None or _state(dom) in _OFF:
            return {"stopped": False, "how": "already off"}
        how = "shutdown"
        if grace > 0:
            try:
                _call(f"shut down domain {domain}", dom.shutdown)
            except LibvirtError:
                how = "destroy"
            deadline = time.monotonic() + grace
            while how == "shutdown" and time.monotonic() < deadline:
                # A transient domain is gone once it stops.
                if _lookup(conn, domain) is None or _state(dom) in _OFF:
                    return {"stopped": True, "how": how}
                time.sleep(0.1)
        with contextlib.suppress(LibvirtError):
            if _lookup(conn, domain) is None or _state(dom) in _OFF:  # it stopped right at the deadline
                return {"stopped": True, "how": how}
        try:
            _call(f"destroy domain {domain}", dom.destroy)
        except LibvirtError:
            if _lookup(conn, domain) is not None and _state(dom) not in _OFF:
                raise
        return {"stopped": True, "how": "destroy"}


def control(uri: str, domain: str, action: str) -> dict[str, Any]:
    """pause (virDomainSuspend) or cont (virDomainResume); a no-op when the domain already is (as QMP's)."""
    if action not in ("pause", "cont"):
        raise LibvirtError(f"unknown action {action!r} (pause or cont)", code="BadAction")
    with _connect(uri) as conn:
        dom = _need(conn, domain)
        st = _state(dom)
        if action == "pause" and st != 3:
            _call(f"suspend domain {domain}", dom.suspend)
        elif action == "cont" and st == 3:
            _call(f"resume domain {domain}", dom.resume)
        return _status(conn, domain)


def test_copy_xml(xml: str, name: str, disks: list[str], network: str) -> str:
    """The production definition as a transient test copy: a new name and no UUID, its file disks
    swapped (in order) for `disks`, NICs moved to `network` (or unplugged when none is named)."""
    tree = ET.fromstring(xml)
    name_el = tree.find("name")
    if name_el is not None:
        name_el.text = name
    for u in tree.findall("uuid"):
        tree.remove(u)
    file_disks = [d for d in tree.iter("disk") if d.get("device", "disk") == "disk"]
    if len(file_disks) != len(disks):
        raise LibvirtError(f"the domain has {len(file_disks)} disks, the VM {len(disks)}", code="DiskMismatch")
    for el, path in zip(file_disks, disks, strict=True):
        src = el.find("source")
        if src is None:
            src = ET.SubElement(el, "source")
        src.attrib.clear()
        src.set("file", path)
        el.set("type", "file")
        drv = el.find("driver")
        if drv is not None:
            drv.set("type", "raw")  # test copies are raw, like every replica
        for b in el.findall("backingStore"):
            el.remove(b)
    for nic in tree.iter("interface"):
        src = nic.find("source")
        if network and src is not None:
            src.attrib.clear()
            src.set("network" if nic.get("type") == "network" else "bridge", network)
        elif src is not None:
            nic.remove(src)  # no isolated network named: leave the NIC unplugged
    return ET.tostring(tree, encoding="unicode")


# ---- point-in-time views, through the QEMU monitor ------------------------------------------------

def _monitor(dom: Any, command: str, args: dict[str, Any] | None = None) -> Any:
    lq = _lib("libvirt_qemu")
    msg: dict[str, Any] = {"execute": command, **({"arguments": args} if args else {})}
    raw = _call(f"QEMU monitor {command}", lq.qemuMonitorCommand, dom, json.dumps(msg), 0)
    ans = json.loads(raw)
    if "error" in ans:
        raise qemu.QemuError(f"{command}: {ans['error'].get('desc', ans['error'])}", code="QmpFailed")
    return ans.get("return")


class _Monitor:
    """qemu.qmp's client as qemu.capture/release use it (`await c.execute(cmd, args)`), over libvirt."""

    def __init__(self, dom: Any) -> None:
        self.dom = dom

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return await asyncio.to_thread(_monitor, self.dom, command, args)


def _session(uri: str, domain: str) -> Callable[[Callable[[Any], Awaitable[Any]]], Any]:
    def run(fn: Callable[[Any], Awaitable[Any]]) -> Any:
        with _connect(uri) as conn:
            dom = _need(conn, domain)
            try:
                return asyncio.run(asyncio.wait_for(fn(_Monitor(dom)), qemu.QMP_TIMEOUT))
            except ReplicaError:
                raise
            except TimeoutError:
                raise qemu.QemuError(f"domain {domain}'s QEMU monitor did not answer within {qemu.QMP_TIMEOUT:.0f} s",
                                     code="QmpUnreachable") from None
            except Exception as exc:
                raise qemu.QemuError(f"domain {domain}'s QEMU monitor: {exc}", code="QmpFailed") from None
    return run


def _nodes(uri: str, domain: str, disks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[{path, node, format, prev}] -> [{node, key, format, prev}]: the node libvirt gave each disk (by its
    file; the fabric's node name d0, d1... becomes the key the view's own names use),
    after checking the domain opened it in the format the topology declares (a raw read of a qcow2
    container, or the reverse, would ship the wrong bytes)."""
    with _connect(uri) as conn:
        blocks = _monitor(_need(conn, domain), "query-block")
    return _match(blocks, domain, disks)


def _match(blocks: list[dict[str, Any]], domain: str, disks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """_nodes from an answer of query-block."""
    by_file = {os.path.realpath(b["inserted"]["file"]): b["inserted"] for b in blocks if b.get("inserted")}
    out: list[dict[str, Any]] = []
    for d in disks:
        ins = by_file.get(os.path.realpath(d["path"]))
        if ins is None:
            raise qemu.QemuError(f"domain {domain} has no disk on {d['path']}", code="QemuNoDisk")
        fmt = d.get("format") or "raw"
        if ins.get("drv") != fmt:
            raise qemu.QemuError(f"domain {domain} opened {d['path']} as {ins.get('drv')}, the topology says {fmt}: "
                                 "make compute.formats match the domain's <driver type>", code="FormatMismatch")
        out.append({"node": ins["node-name"], "key": d.get("node") or f"d{len(out)}", "format": fmt,
                    "prev": d.get("prev")})
    return out


def capture(uri: str, domain: str, run: str, disks: list[dict[str, Any]], tag: str) -> dict[str, Any]:
    """qemu.capture on the domain's QEMU (one instant for every disk), its NBD socket in `run`."""
    return qemu.capture(run, "vm", _nodes(uri, domain, disks), tag, session=_session(uri, domain))


def release(uri: str, domain: str, run: str, view: dict[str, Any], ok: bool) -> dict[str, Any]:
    return qemu.release(run, "vm", view, ok, session=_session(uri, domain))
