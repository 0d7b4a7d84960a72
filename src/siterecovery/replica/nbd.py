"""A small NBD client (stdlib only): reads a QEMU export and its dirty-bitmap extents.

It speaks the fixed-newstyle handshake with structured replies (NBD_OPT_STRUCTURED_REPLY), so it can
ask for a `qemu:dirty-bitmap:NAME` meta context and read its extents with NBD_CMD_BLOCK_STATUS.
Reads are at most READ_MAX bytes and aligned to it: QEMU 7.2's snapshot-access node returns data
written after the view for reads spanning more than one copy-before-write cluster (64 KiB), so a
larger request would silently read a torn point (see docs/ENGINE.md, "Point-in-time capture").
Every socket operation has a deadline.
"""

from __future__ import annotations

import collections
import socket
import struct
from collections.abc import Iterable, Iterator

READ_MAX = 64 * 1024  # never more per request: see the module docstring
DEPTH = 64  # read requests in flight at once (4 MiB)
WINDOW = 16 * 1024 * 1024  # bytes of jobs read ahead of the one being consumed
RECV_BUF = 256 * 1024

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
_REQ = struct.Struct(">IHHQQI")
_U32, _U64 = struct.Struct(">I"), struct.Struct(">Q")
_SIMPLE_REST, _STRUCT_REST = struct.Struct(">IQ"), struct.Struct(">HHQI")


class NBDError(Exception):
    pass


class _Job:
    """One read_many job: its buffer and how many of its requests are still unanswered."""
    __slots__ = ("offset", "buf", "left")

    def __init__(self, offset: int, length: int) -> None:
        self.offset, self.buf, self.left = offset, bytearray(length), 0


class _Req:
    """One read request in flight and the reply chunks that answered it so far."""
    __slots__ = ("job", "offset", "length", "chunks")

    def __init__(self, job: _Job, offset: int, length: int) -> None:
        self.job, self.offset, self.length = job, offset, length
        self.chunks: list[tuple[int, int]] = []


class NBDClient:
    """One export over a unix socket; `size`, `read_many(jobs)`, `dirty(ctx)` (the bitmap's extents)."""

    def __init__(self, path: str, export: str, contexts: tuple[str, ...] = (), timeout: float = 60,
                 optional: tuple[str, ...] = ()) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._handle = 0
        self._out = bytearray()  # requests queued for one sendall
        # Received bytes are buffered: one recv_into takes in many small replies (and the start of the
        # next read's data) at once; a large payload's rest goes straight into its destination.
        self._rmv = memoryview(bytearray(RECV_BUF))
        self._rpos = self._rend = 0
        try:
            self.sock.connect(path)
            self._handshake(export, contexts, optional)
        except BaseException:
            self.sock.close()
            raise

    # ---- wire --------------------------------------------------------------------------------
    def _more(self) -> None:
        """Receive whatever the socket holds (at least one byte) into the buffer, after what is unread."""
        if self._rpos == self._rend:
            self._rpos = self._rend = 0
        elif self._rend == len(self._rmv):  # full: move the unread bytes to the front
            k = self._rend - self._rpos
            self._rmv[:k] = self._rmv[self._rpos:self._rend]
            self._rpos, self._rend = 0, k
        got = self.sock.recv_into(self._rmv[self._rend:])
        if not got:
            raise NBDError("the NBD server closed the connection")
        self._rend += got

    def _recv_into(self, view: memoryview) -> None:
        """Fill view exactly: from the buffer, then (a large rest) straight from the socket."""
        while len(view):
            k = min(len(view), self._rend - self._rpos)
            if k:
                view[:k] = self._rmv[self._rpos:self._rpos + k]
                self._rpos += k
                view = view[k:]
            elif len(view) >= RECV_BUF // 4:
                got = self.sock.recv_into(view)
                if not got:
                    raise NBDError("the NBD server closed the connection")
                view = view[got:]
            else:
                self._more()

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _take(self, n: int) -> memoryview:
        """The next n (<= RECV_BUF) bytes, as a view of the buffer valid until the next receive."""
        while self._rend - self._rpos < n:
            if len(self._rmv) - self._rpos < n:  # no room for n after the unread bytes: compact
                k = self._rend - self._rpos
                self._rmv[:k] = self._rmv[self._rpos:self._rend]
                self._rpos, self._rend = 0, k
            self._more()
        v = self._rmv[self._rpos:self._rpos + n]
        self._rpos += n
        return v

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
        """Queue one request (sent by _flush); every read is checked here, whatever path asked for it."""
        if cmd == _CMD_READ and (length > READ_MAX or length <= 0 or offset % READ_MAX):
            raise NBDError(f"refusing a read of {length} bytes at {offset}: reads are at most {READ_MAX} bytes, "
                           "aligned to it (QEMU 7.2's view bug)")
        self._handle += 1
        self._out += _REQ.pack(_REQ_MAGIC, 0, cmd, self._handle, offset, length)
        return self._handle

    def _flush(self) -> None:
        if self._out:
            self.sock.sendall(self._out)
            self._out.clear()

    def _chunk_header(self) -> tuple[int, int, int, int]:
        """The next reply's header: (handle, type, flags, payload length); a simple reply reads as type
        -1 with no payload (its error raised here)."""
        (magic,) = _U32.unpack_from(self._take(4))
        if magic == _SIMPLE_MAGIC:
            err, handle = _SIMPLE_REST.unpack_from(self._take(12))
            if err:
                raise NBDError(f"NBD request failed with error {err}")
            return handle, -1, _FLAG_DONE, 0
        if magic != _STRUCT_MAGIC:
            raise NBDError("bad reply magic from the NBD server")
        flags, rtype, handle, length = _STRUCT_REST.unpack_from(self._take(16))
        if rtype & 0x8000:
            data = self._recv(length)
            err = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else -1
            raise NBDError(f"NBD request failed with error {err}: {data[6:].decode(errors='replace')}")
        return handle, rtype, flags, length

    def _chunk(self) -> tuple[int, int, int, bytes]:
        """One reply chunk: (handle, type, flags, payload); a simple reply reads as type -1."""
        handle, rtype, flags, length = self._chunk_header()
        return handle, rtype, flags, self._recv(length) if length else b""

    # ---- reads -------------------------------------------------------------------------------
    def read_many(self, jobs: Iterable[tuple[int, int]], depth: int = DEPTH,
                  window: int = WINDOW) -> Iterator[tuple[int, memoryview]]:
        """Read each (offset, length) job whole and yield (offset, its data) in job order.

        A job starts on a READ_MAX boundary and is read in aligned READ_MAX requests; up to `depth`
        requests are in flight at once, across jobs (the server may answer them in any order), and jobs
        are read ahead up to `window` bytes past the one being yielded. Replies land straight in each
        job's buffer (recv_into). A reply that falls outside its request, overlaps another, leaves part
        of it unread, answers no request, or reports an error raises NBDError: no job is yielded unless
        every byte of it came from the server. The yielded data is valid until the next iteration.
        """
        it = iter(jobs)
        ahead: collections.deque[_Job] = collections.deque()
        inflight: dict[int, _Req] = {}
        queued: collections.deque[tuple[_Job, int, int]] = collections.deque()  # requests not sent yet
        ahead_bytes = 0
        exhausted = False
        while True:
            # Take jobs while the read-ahead window has room (always at least one).
            while not exhausted and (not ahead or ahead_bytes < window):
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    break
                off, ln = nxt
                if ln <= 0 or off < 0:
                    raise NBDError(f"bad read job ({off}, {ln})")
                job = _Job(off, ln)
                for o in range(0, ln, READ_MAX):
                    queued.append((job, o, min(READ_MAX, ln - o)))
                    job.left += 1
                ahead.append(job)
                ahead_bytes += ln
            if not ahead:
                return
            if queued and len(inflight) <= depth // 2:
                while queued and len(inflight) < depth:
                    job, o, ln = queued.popleft()
                    inflight[self._request(_CMD_READ, job.offset + o, ln)] = _Req(job, job.offset + o, ln)
                self._flush()
            head = ahead[0]
            if head.left == 0:
                ahead.popleft()
                ahead_bytes -= len(head.buf)
                yield head.offset, memoryview(head.buf)
                continue
            self._read_reply(inflight)

    def _read_reply(self, inflight: dict[int, _Req]) -> None:
        """Receive one reply chunk of a pipelined read into its job's buffer."""
        handle, rtype, flags, length = self._chunk_header()
        req = inflight.get(handle)
        if req is None:
            raise NBDError("a reply for an unknown request")
        job, roff, rlen, chunks = req.job, req.offset, req.length, req.chunks
        if rtype == _R_DATA or rtype == _R_HOLE:
            if length < (8 if rtype == _R_DATA else 12):
                raise NBDError("a malformed read reply")
            (at,) = _U64.unpack_from(self._take(8))
            if rtype == _R_DATA:
                n = length - 8
            else:
                if length != 12:
                    raise NBDError("a malformed hole reply")
                (n,) = _U32.unpack_from(self._take(4))
            if at < roff or at + n > roff + rlen or n <= 0:
                raise NBDError(f"a read reply for {n} bytes at {at} lies outside its request ({rlen} at {roff})")
            dst = memoryview(job.buf)[at - job.offset:at - job.offset + n]
            if rtype == _R_DATA:
                self._recv_into(dst)
            else:
                dst[:] = bytes(n)
            chunks.append((at, n))
        elif rtype == -1:
            raise NBDError("a simple reply to a read (structured replies were agreed)")
        elif rtype != _R_NONE:
            raise NBDError(f"an unexpected reply type {rtype} to a read")
        if flags & _FLAG_DONE:
            del inflight[handle]
            # The chunks must tile the request exactly: nothing missing, nothing twice.
            pos = roff
            for at, n in sorted(chunks):
                if at != pos:
                    raise NBDError(f"a read of {rlen} bytes at {roff} came back with a gap or overlap at {pos}")
                pos = at + n
            if pos != roff + rlen:
                raise NBDError(f"a short read: {pos - roff} of {rlen} bytes at {roff}")
            job.left -= 1

    def extents(self, context: str, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) of the context's extents over [offset, offset+length)."""
        cid = self.contexts[context]
        end = self.size if length is None else offset + length
        while offset < end:
            self._request(_CMD_BLOCK_STATUS, offset, min(end - offset, 1 << 30))
            self._flush()
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
            self._out.clear()
            self._request(_CMD_DISC, 0, 0)
            self._flush()
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
