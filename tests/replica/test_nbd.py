"""The NBD reader against a scripted server: many requests in flight, answered out of order and in
pieces, land in the right place; a short read, a gap, an overlap, a reply outside its request, an
unknown handle and an error reply mid-pipeline all raise instead of yielding a job; no request is
ever larger than 64 KiB or unaligned (QEMU 7.2's view bug). Also the span plan of scan_nbd against a
block-by-block reference. No QEMU needed (tests/replica/test_qemu_view.py runs the real thing)."""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siterecovery.replica import nbd
from siterecovery.replica.engine import BLOCK, _spans, nblocks

KiB = 1024
SIZE = 4 * 1024 * KiB
DISK = random.Random(5).randbytes(SIZE)
IHAVEOPT, REPLY_MAGIC = 0x49484156454F5054, 0x3E889045565A9
STRUCT_MAGIC = 0x668E33EF

# A reply plan: for a batch of requests [(handle, offset, length)], the chunks to send, in order:
# (handle, type, flags, payload).
Plan = Callable[[list[tuple[int, int, int]]], list[tuple[int, int, int, bytes]]]


def data_chunk(handle: int, off: int, n: int, done: bool) -> tuple[int, int, int, bytes]:
    return handle, 1, 1 if done else 0, struct.pack(">Q", off) + DISK[off:off + n]


def split_out_of_order(batch: list[tuple[int, int, int]]) -> list[tuple[int, int, int, bytes]]:
    """Every request in two pieces (the second first), one as a hole when the disk is zero there,
    the requests in reverse order: all legal."""
    out = []
    for h, off, ln in reversed(batch):
        half = ln // 2
        out.append(data_chunk(h, off + half, ln - half, False))
        out.append(data_chunk(h, off, half, True))
    return out


class FakeServer:
    """A fixed-newstyle NBD server with structured replies on a unix socket, serving DISK. It reads
    requests in batches of `batch` (or fewer when the client stops sending) and answers per `plan`."""

    def __init__(self, path: Path, plan: Plan, batch: int = 8) -> None:
        self.path, self.plan, self.batch = str(path), plan, batch
        self.requests: list[tuple[int, int]] = []  # (offset, length) of every read asked
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, c: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = c.recv(n - len(buf))
            if not got:
                raise EOFError
            buf += got
        return buf

    def _serve(self) -> None:
        c, _ = self.srv.accept()
        try:
            self._session(c)
        except (EOFError, OSError):
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            c.close()

    def _session(self, c: socket.socket) -> None:
        c.sendall(b"NBDMAGIC" + struct.pack(">QH", IHAVEOPT, 3))
        self._recv(c, 4)
        while True:
            _, opt, ln = struct.unpack(">QII", self._recv(c, 16))
            self._recv(c, ln)
            if opt == 7:  # GO: the export's size, then ACK
                info = struct.pack(">HQH", 0, SIZE, 0)
                c.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, 3, len(info)) + info)
                c.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, 1, 0))
                break
            c.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, 1, 0))
        c.settimeout(0.2)
        while True:
            batch: list[tuple[int, int, int]] = []
            while len(batch) < self.batch:
                try:
                    hdr = self._recv(c, 28)
                except TimeoutError:
                    break  # the client waits for answers
                _, _, cmd, handle, off, ln = struct.unpack(">IHHQQI", hdr)
                if cmd == 2:
                    return
                assert cmd == 0, cmd
                self.requests.append((off, ln))
                batch.append((handle, off, ln))
            for handle, rtype, flags, payload in self.plan(batch):
                c.sendall(struct.pack(">IHHQI", STRUCT_MAGIC, flags, rtype, handle, len(payload)) + payload)

    def close(self) -> None:
        self.srv.close()
        self.thread.join(5)


@pytest.fixture
def serve(tmp_path: Path) -> Any:
    opened: list[tuple[FakeServer, nbd.NBDClient]] = []

    def start(plan: Plan, batch: int = 8) -> tuple[FakeServer, nbd.NBDClient]:
        s = FakeServer(tmp_path / f"s{len(opened)}.sock", plan, batch)
        opened.append((s, nbd.NBDClient(s.path, "x", timeout=10)))
        return opened[-1]

    yield start
    for s, c in opened:
        c.close()
        s.close()


JOBS = [(0, 64 * KiB), (128 * KiB, 4 * 1024 * KiB - 128 * KiB)]  # one block, then 62 in one job


def test_out_of_order_split_replies_with_many_in_flight_land_in_place(serve: Any) -> None:
    srv, c = serve(split_out_of_order, batch=32)
    got = [(off, bytes(data)) for off, data in c.read_many(JOBS, depth=32)]
    assert got == [(off, DISK[off:off + ln]) for off, ln in JOBS]
    assert srv.error is None
    # Many were in flight at once (the server answered batches of up to 32 in reverse order), and
    # every request stayed within one aligned 64 KiB block.
    assert len(srv.requests) == 63
    assert all(ln <= 64 * KiB and off % (64 * KiB) == 0 for off, ln in srv.requests)


def test_a_short_read_raises(serve: Any) -> None:
    def short(batch: list[tuple[int, int, int]]) -> list[tuple[int, int, int, bytes]]:
        # The third request is answered with half its bytes and DONE.
        return [data_chunk(h, off, ln // 2 if i == 2 else ln, True) for i, (h, off, ln) in enumerate(batch)]

    _, c = serve(short)
    with pytest.raises(nbd.NBDError, match="short read"):
        list(c.read_many([(0, 16 * 64 * KiB)]))


def test_a_gap_or_an_overlap_raises(serve: Any) -> None:
    def overlap(batch: list[tuple[int, int, int]]) -> list[tuple[int, int, int, bytes]]:
        out = []
        for h, off, ln in batch:  # first half twice (as much as the request): no byte of the second half
            out += [data_chunk(h, off, ln // 2, False), data_chunk(h, off, ln // 2, True)]
        return out

    _, c = serve(overlap)
    with pytest.raises(nbd.NBDError, match="gap or overlap"):
        list(c.read_many([(0, 64 * KiB)]))


def test_a_reply_outside_its_request_raises(serve: Any) -> None:
    def shifted(batch: list[tuple[int, int, int]]) -> list[tuple[int, int, int, bytes]]:
        return [data_chunk(h, off + 4096, ln, True) for h, off, ln in batch]

    _, c = serve(shifted)
    with pytest.raises(nbd.NBDError, match="outside its request"):
        list(c.read_many([(0, 64 * KiB)]))


def test_a_reply_to_an_unknown_request_raises(serve: Any) -> None:
    def stranger(batch: list[tuple[int, int, int]]) -> list[tuple[int, int, int, bytes]]:
        return [data_chunk(h + 1000, off, ln, True) for h, off, ln in batch]

    _, c = serve(stranger)
    with pytest.raises(nbd.NBDError, match="unknown request"):
        list(c.read_many([(0, 64 * KiB)]))


def test_an_error_reply_mid_pipeline_raises_and_yields_nothing_after(serve: Any) -> None:
    def failing(batch: list[tuple[int, int, int]]) -> list[tuple[int, int, int, bytes]]:
        out = []
        for h, off, ln in batch:
            if off == 5 * 64 * KiB:
                msg = b"injected"
                out.append((h, 0x8001, 1, struct.pack(">IH", 5, len(msg)) + msg))  # NBD_REPLY_TYPE_ERROR, EIO
            else:
                out.append(data_chunk(h, off, ln, True))
        return out

    _, c = serve(failing)
    seen = []
    with pytest.raises(nbd.NBDError, match="error 5: injected"):
        for off, data in c.read_many([(i * 64 * KiB, 64 * KiB) for i in range(10)], depth=8):
            assert bytes(data) == DISK[off:off + 64 * KiB]
            seen.append(off)
    assert seen == [i * 64 * KiB for i in range(5)]  # the jobs before the failed one, none after


def test_no_path_asks_for_more_than_64_kib_or_unaligned(serve: Any) -> None:
    assert nbd.READ_MAX == 64 * KiB  # QEMU 7.2's view: larger reads leak data written after the view
    _, c = serve(split_out_of_order)
    with pytest.raises(nbd.NBDError, match="reads are at most"):
        c._request(0, 0, 128 * KiB)
    with pytest.raises(nbd.NBDError, match="reads are at most"):
        list(c.read_many([(4096, 64 * KiB)]))


# ---- scan_nbd's plan ----------------------------------------------------------------------------

def reference(size: int, known: int, dirty: list[tuple[int, int]] | None, zeros: list[tuple[int, int]]) -> list[int]:
    """Kind per block, one block at a time: 0 clean, 1 zero, 2 read."""
    kinds = []
    for b in range(nblocks(size)):
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, size)
        if dirty is not None and b < known and not any(a < hi and e > lo for a, e in dirty):
            kinds.append(0)
        elif any(a <= lo and e >= hi for a, e in zeros):
            kinds.append(1)
        else:
            kinds.append(2)
    return kinds


def ranges(draw: Any, size: int, align: bool) -> list[tuple[int, int]]:
    cuts = sorted(set(draw(st.lists(st.integers(0, size), max_size=12))))
    out = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    if align:  # dirty ranges come widened to whole blocks (engine._extents)
        out = [(a - a % BLOCK, min(-(-e // BLOCK) * BLOCK, -(-size // BLOCK) * BLOCK)) for a, e in out]
        merged: list[tuple[int, int]] = []
        for a, e in out:
            if merged and merged[-1][1] >= a:
                merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
            elif e > a:
                merged.append((a, e))
        return merged
    # zero ranges come narrowed to whole blocks, the last one may end at the disk's end
    out = [(-(-a // BLOCK) * BLOCK, e if e == size else e - e % BLOCK) for a, e in out]
    return [(a, e) for a, e in out if e > a]


@st.composite
def plans(draw: Any) -> tuple[int, int, list[tuple[int, int]] | None, list[tuple[int, int]]]:
    size = draw(st.integers(1, 300)) * BLOCK - draw(st.sampled_from([0, 0, 1, BLOCK // 2]))
    known = draw(st.integers(0, nblocks(size)))
    dirty = ranges(draw, size, True) if draw(st.booleans()) else None
    return size, known, dirty, ranges(draw, size, False)


@settings(max_examples=300, deadline=None)
@given(plans())
def test_spans_cover_the_disk_in_order_as_the_block_by_block_reference(p: Any) -> None:
    size, known, dirty, zeros = p
    got: list[int] = []
    pos = 0
    for first, count, kind in _spans(size, known, dirty, zeros):
        assert first == pos and count > 0
        assert kind != 2 or count * BLOCK <= 4 * 1024 * KiB  # a read job is one 4 MiB chunk at most
        got += [kind] * count
        pos += count
    assert got == reference(size, known, dirty, zeros)


def test_read_jobs_are_the_dirty_runs_only() -> None:
    size = 1024 * BLOCK
    dirty = [(3 * BLOCK, 4 * BLOCK), (500 * BLOCK, 502 * BLOCK), (1000 * BLOCK, 1001 * BLOCK)]
    reads = [(f, n) for f, n, k in _spans(size, size // BLOCK, dirty, []) if k == 2]
    assert reads == [(3, 1), (500, 2), (1000, 1)]
