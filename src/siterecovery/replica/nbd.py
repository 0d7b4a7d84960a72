"""A small NBD client (stdlib only): reads a QEMU export and its dirty-bitmap extents.

It speaks the fixed-newstyle handshake with structured replies (NBD_OPT_STRUCTURED_REPLY), so it can
ask for a `qemu:dirty-bitmap:NAME` meta context and read its extents with NBD_CMD_BLOCK_STATUS.
Reads are at most READ_MAX bytes and aligned to it: QEMU 7.2's snapshot-access node returns data
written after the view for reads spanning more than one copy-before-write cluster (64 KiB), so a
larger request would silently read a torn point (see docs/ENGINE.md, "Point-in-time capture").
Every socket operation has a deadline.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

READ_MAX = 64 * 1024  # never more per request: see the module docstring
PIPELINE = 16  # requests in flight at once (1 MiB)

_NBDMAGIC = b"NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054
_REPLY_MAGIC = 0x3E889045565A9
_OPT_GO, _OPT_STRUCTURED, _OPT_SET_META = 7, 8, 10
_REP_ACK, _REP_INFO, _REP_META = 1, 3, 4
_INFO_EXPORT = 0
_REQ_MAGIC, _SIMPLE_MAGIC, _STRUCT_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
_CMD_READ, _CMD_DISC, _CMD_BLOCK_STATUS = 0, 2, 7
_R_NONE, _R_DATA, _R_HOLE, _R_STATUS = 0, 1, 2, 5
_FLAG_DONE = 1


class NBDError(Exception):
    pass


class NBDClient:
    """One export over a unix socket; `size`, `read(offset, n)`, `dirty(ctx)` (the bitmap's extents)."""

    def __init__(self, path: str, export: str, contexts: tuple[str, ...] = (), timeout: float = 60,
                 optional: tuple[str, ...] = ()) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            self._handshake(export, contexts, optional)
        except BaseException:
            self.sock.close()
            raise
        self._handle = 0

    # ---- wire --------------------------------------------------------------------------------
    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NBDError("the NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _option(self, opt: int, data: bytes) -> None:
        self.sock.sendall(struct.pack(">QII", _IHAVEOPT, opt, len(data)) + data)

    def _reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = struct.unpack(">QIII", self._recv(20))
        data = self._recv(length)
        if magic != _REPLY_MAGIC or ropt != opt:
            raise NBDError("bad option reply from the NBD server")
        if rtype & 0x80000000:
            raise NBDError(f"the NBD server refused option {opt} ({rtype & 0x7FFFFFFF}): {data.decode(errors='replace')}")
        return rtype, data

    def _handshake(self, export: str, contexts: tuple[str, ...], optional: tuple[str, ...]) -> None:
        hello = self._recv(18)
        if hello[:8] != _NBDMAGIC or struct.unpack(">Q", hello[8:16])[0] != _IHAVEOPT:
            raise NBDError("not a newstyle NBD server")
        self.sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        self._option(_OPT_STRUCTURED, b"")
        self._reply(_OPT_STRUCTURED)
        name = export.encode()
        self.contexts: dict[str, int] = {}
        asked = (*contexts, *optional)
        if asked:
            q = b"".join(struct.pack(">I", len(c.encode())) + c.encode() for c in asked)
            self._option(_OPT_SET_META, struct.pack(">I", len(name)) + name + struct.pack(">I", len(asked)) + q)
            while True:
                rtype, data = self._reply(_OPT_SET_META)
                if rtype == _REP_ACK:
                    break
                if rtype == _REP_META:
                    self.contexts[data[4:].decode()] = struct.unpack(">I", data[:4])[0]
            missing = [c for c in contexts if c not in self.contexts]
            if missing:
                raise NBDError(f"the export has no meta context {', '.join(missing)}")
        self._option(_OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, _INFO_EXPORT))
        self.size = -1
        while True:
            rtype, data = self._reply(_OPT_GO)
            if rtype == _REP_ACK:
                break
            if rtype == _REP_INFO and struct.unpack(">H", data[:2])[0] == _INFO_EXPORT:
                self.size = struct.unpack(">Q", data[2:10])[0]
        if self.size < 0:
            raise NBDError("the NBD server did not say the export's size")

    def _request(self, cmd: int, offset: int, length: int) -> int:
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", _REQ_MAGIC, 0, cmd, self._handle, offset, length))
        return self._handle

    def _chunk(self) -> tuple[int, int, int, bytes]:
        """One reply chunk: (handle, type, flags, payload); a simple reply reads as type -1."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == _SIMPLE_MAGIC:
            err, handle = struct.unpack(">IQ", self._recv(12))
            if err:
                raise NBDError(f"NBD request failed with error {err}")
            return handle, -1, _FLAG_DONE, b""
        if magic != _STRUCT_MAGIC:
            raise NBDError("bad reply magic from the NBD server")
        flags, rtype, handle, length = struct.unpack(">HHQI", self._recv(16))
        data = self._recv(length)
        if rtype & 0x8000:
            err = struct.unpack(">I", data[:4])[0]
            raise NBDError(f"NBD request failed with error {err}: {data[6:].decode(errors='replace')}")
        return handle, rtype, flags, data

    # ---- reads -------------------------------------------------------------------------------
    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill buf from the export at offset, in aligned READ_MAX requests, PIPELINE at a time."""
        n = len(buf)
        if offset % READ_MAX:
            raise NBDError("reads must start on a 64 KiB boundary")
        pieces = [(o, min(READ_MAX, n - o)) for o in range(0, n, READ_MAX)]
        for i in range(0, len(pieces), PIPELINE):
            batch = pieces[i:i + PIPELINE]
            pending = {self._request(_CMD_READ, offset + o, ln): o for o, ln in batch}
            while pending:
                handle, rtype, flags, data = self._chunk()
                base = pending.get(handle)
                if base is None:
                    raise NBDError("a reply for an unknown request")
                if rtype == _R_DATA:
                    (at,) = struct.unpack(">Q", data[:8])
                    at -= offset
                    buf[at:at + len(data) - 8] = data[8:]
                elif rtype == _R_HOLE:
                    at, ln = struct.unpack(">QI", data[:12])
                    at -= offset
                    buf[at:at + ln] = bytes(ln)
                if flags & _FLAG_DONE:
                    del pending[handle]

    def read(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.read_into(memoryview(buf), offset)
        return bytes(buf)

    def extents(self, context: str, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) of the context's extents over [offset, offset+length)."""
        cid = self.contexts[context]
        end = self.size if length is None else offset + length
        while offset < end:
            self._request(_CMD_BLOCK_STATUS, offset, min(end - offset, 1 << 30))
            got: list[tuple[int, int]] = []
            while True:
                _, rtype, flags, data = self._chunk()
                if rtype == _R_STATUS and struct.unpack(">I", data[:4])[0] == cid:
                    got += [struct.unpack(">II", data[i:i + 8]) for i in range(4, len(data), 8)]
                if flags & _FLAG_DONE:
                    break
            if not got:
                raise NBDError(f"no extents for {context} at {offset}")
            for ln, fl in got:
                ln = min(ln, end - offset)
                if ln <= 0:
                    break
                yield offset, ln, fl
                offset += ln

    def dirty(self, context: str) -> list[tuple[int, int]]:
        """The dirty ranges of a qemu:dirty-bitmap context, merged: [(offset, length)]."""
        out: list[tuple[int, int]] = []
        for off, ln, fl in self.extents(context):
            if not fl & 1:
                continue
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + ln)
            else:
                out.append((off, ln))
        return out

    def close(self) -> None:
        try:
            self._request(_CMD_DISC, 0, 0)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
