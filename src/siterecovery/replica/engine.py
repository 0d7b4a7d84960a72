"""The block replication engine: manifests, the delta stream, journaled apply, undo-log recovery points.

Self-contained on purpose (stdlib + xxhash + zstandard only): it is what runs on every host through
siterecovery.replica.agent, so the orchestrator can stay out of hashing, compression and verification.
A disk is cut into 64 KiB blocks hashed with xxh3-128; the source keeps the manifest of what it last
shipped, the replica keeps the manifest of what it holds, so a cycle reads the source once and never
reads the target. Each applied cycle is a recovery point whose overwritten blocks went to an undo log
first; a journal makes a killed apply roll back to exactly the previous point.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import itertools
import json
import mmap
import os
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import xxhash
import zstandard

from .nbd import NBDClient, NBDError

BLOCK = 64 * 1024
CHUNK = 64 * BLOCK  # 4 MiB reads: few syscalls, memory flat in disk size
MAP_WINDOW = 16 * CHUNK  # 64 MiB of the disk mapped at a time
STREAM_MAGIC = b"SRSTRM1\n"
MANIFEST_MAGIC = b"SRMANIF1"
REC = struct.Struct("<QBI16s")  # block index, flag, payload length, xxh3-128 of the uncompressed block
TRAILER = struct.Struct("<Q16s")  # record count, xxh3-128 over every record header
END = 2**64 - 1
NOP = END - 1  # a keepalive record: no block, not counted (a long scan that finds nothing still speaks)
F_RAW, F_ZSTD, F_ZERO = 0, 1, 2
MHDR = struct.Struct("<8sIQQ16s20x")  # magic, block size, disk size, point seq, generation: 64 bytes
DIG = 16
PROGRESS_EVERY = 16 * 1024 * 1024  # in-process callbacks; the agent's P lines are sparser (agent.py)
# A network path that carries nothing for this long is dead (a silent partition: packets dropped, no
# RST). The orchestrator's SSH connections (ssh.py), the hosts' own ssh (peer.py) and the agents'
# stream deadlines (agent.py) all use it; the fabric option `dead_link_seconds` sets it per fabric and
# reaches the agents through this environment variable (tests use a few seconds).
DEAD_LINK_ENV = "SITERECOVERY_DEAD_LINK_SECONDS"
DEAD_LINK_SECONDS = 30.0


def dead_link_seconds(value: object = None) -> float:
    """The dead-link deadline: `value` if given, else the environment, else 30 s."""
    raw = value if value is not None else os.environ.get(DEAD_LINK_ENV)
    try:
        return float(raw) if raw is not None else DEAD_LINK_SECONDS  # type: ignore[arg-type]
    except ValueError:
        raise ReplicaError(f"dead-link deadline {raw!r} is not a number of seconds", code="Config") from None


PROGRESS_RECORDS = 256  # a receiver reports every this many records (16 MiB of full blocks)

Progress = Callable[[int, int], None]


class ReplicaError(Exception):
    """Base of the engine's errors; `code` is stable and crosses the agent boundary as JSON."""

    code = "ReplicaError"

    def __init__(self, message: str, code: str | None = None, path: str | None = None,
                 host: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code
        self.path = path  # the file or directory concerned (storage errors)
        self.host = host  # the host it happened on, once an endpoint knows


# A filesystem that refuses writes: reported as such (host, path), never as the torn stream or
# broken pipe it causes further on.
STORAGE_CODES = frozenset({"ENOSPC", "EDQUOT", "EROFS"})


def storage_error(exc: OSError, where: str | None = None) -> ReplicaError | None:
    """A full or read-only filesystem as a ReplicaError (code = the errno's name, path = the file, or
    `where` when the OS named none, as for a failed write); None for any other OSError."""
    code = errno.errorcode.get(exc.errno or 0, "")
    if code not in STORAGE_CODES:
        return None
    path = exc.filename or where
    return ReplicaError(f"{exc.strerror or exc} ({code}): {path or 'path unknown'}", code=code, path=path)


class CorruptTransfer(ReplicaError):
    code = "CorruptTransfer"


class ManifestMismatch(ReplicaError):
    code = "ManifestMismatch"


class NoReplica(ReplicaError):
    code = "NoReplica"


def digest(buf: Any) -> bytes:
    return xxhash.xxh3_128_digest(buf)


_ZERO_DIGESTS: dict[int, bytes] = {}


def zero_digest(n: int = BLOCK) -> bytes:
    d = _ZERO_DIGESTS.get(n)
    if d is None:
        d = _ZERO_DIGESTS[n] = digest(bytes(n))
    return d


ZERO = zero_digest()


def nblocks(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK


def block_len(index: int, size: int) -> int:
    return min(BLOCK, size - index * BLOCK)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


# ---- small durable-file helpers -------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


_libc: Any = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE) so zero blocks stay sparse."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    return bool(_libc.fallocate(fd, 0x02 | 0x01, offset, length) == 0)


def zero_range(fd: int, offset: int, length: int) -> None:
    if not punch_hole(fd, offset, length):
        os.pwrite(fd, bytes(length), offset)


# ---- manifests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestHeader:
    size: int
    seq: int
    gen: bytes
    block: int = BLOCK

    def pack(self) -> bytes:
        return MHDR.pack(MANIFEST_MAGIC, self.block, self.size, self.seq, self.gen)


def read_manifest_header(path: str) -> ManifestHeader | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(MHDR.size)
    except FileNotFoundError:
        return None
    if len(raw) != MHDR.size:
        return None
    magic, block, size, seq, gen = MHDR.unpack(raw)
    if magic != MANIFEST_MAGIC or block != BLOCK:
        return None
    if os.path.getsize(path) != MHDR.size + nblocks(size) * DIG:
        return None  # a torn manifest is as good as none: change tracking is lost, resync
    return ManifestHeader(size=size, seq=seq, gen=gen)


class ManifestReader:
    """Random and sequential access to a manifest's digests without loading it whole."""

    def __init__(self, path: str | None, header: ManifestHeader | None = None) -> None:
        self.f: BinaryIO | None = open(path, "rb") if path else None  # noqa: SIM115 - closed by close()
        self.header = header
        self.count = nblocks(header.size) if header else 0

    def range(self, start: int, count: int) -> bytes:
        """Digests of blocks [start, start+count); blocks beyond the manifest read as absent (b'')."""
        if self.f is None or start >= self.count:
            return b""
        count = min(count, self.count - start)
        self.f.seek(MHDR.size + start * DIG)
        return self.f.read(count * DIG)

    def get(self, index: int) -> bytes | None:
        d = self.range(index, 1)
        return d or None

    def close(self) -> None:
        if self.f:
            self.f.close()


# ---- the stream -----------------------------------------------------------------------------------


class Encoder:
    """Per-block zstd, raw when it does not shrink. After a run of incompressible blocks it only
    samples every 16th, so incompressible disks do not pay for a compressor that never wins."""

    def __init__(self, compress: bool = True, level: int = 1) -> None:
        self.c = zstandard.ZstdCompressor(level=level) if compress else None
        self.misses = 0
        self.skip = 0

    def encode(self, block: Any) -> tuple[int, Any]:
        if self.c is None:
            return F_RAW, block
        if self.skip:
            self.skip -= 1
            return F_RAW, block
        z = self.c.compress(block)
        if len(z) < len(block) - 64:
            self.misses = 0
            return F_ZSTD, z
        self.misses += 1
        if self.misses >= 8:
            self.skip = 15
        return F_RAW, block


class StreamWriter:
    def __init__(self, out: BinaryIO, header: dict[str, Any]) -> None:
        self.out = out
        self.count = 0
        self.hh = xxhash.xxh3_128()
        self.payload_bytes = 0
        hj = json.dumps(header).encode()
        out.write(STREAM_MAGIC + struct.pack("<I", len(hj)) + hj)
        self.last = time.monotonic()

    def keepalive(self, every: float) -> None:
        """A NOP record when nothing was written for `every` seconds: the receiver's idle deadline
        then tells a silent sender (scanning unchanged blocks) from a dead connection."""
        if time.monotonic() - self.last >= every:
            self.out.write(REC.pack(NOP, 0xFE, 0, b"\0" * 16))
            self.out.flush()
            self.last = time.monotonic()

    def record(self, index: int, flag: int, payload: Any, dig: bytes) -> None:
        h = REC.pack(index, flag, len(payload), dig)
        self.hh.update(h)
        self.out.write(h)
        if len(payload):
            self.out.write(payload)
        self.count += 1
        self.payload_bytes += len(payload) + REC.size
        self.last = time.monotonic()

    def close(self) -> None:
        self.out.write(REC.pack(END, 0xFF, 0, b"\0" * 16) + TRAILER.pack(self.count, self.hh.digest()))
        self.out.flush()


def _read_exact(inp: BinaryIO, n: int) -> bytes:
    buf = inp.read(n)
    if buf is None:
        buf = b""
    while len(buf) < n:
        more = inp.read(n - len(buf))
        if not more:
            raise CorruptTransfer(f"transfer torn: stream ended after {len(buf)} of {n} bytes")
        buf += more
    return buf


class StreamReader:
    """Reads and verifies a stream: every block's digest, the record count and the header digest.
    Nothing it yields is trusted until `trailer_ok` is True at the end."""

    def __init__(self, inp: BinaryIO) -> None:
        self.inp = inp
        magic = _read_exact(inp, len(STREAM_MAGIC))
        if magic != STREAM_MAGIC:
            raise CorruptTransfer("not a replication stream (bad magic)")
        (hl,) = struct.unpack("<I", _read_exact(inp, 4))
        if hl > 1 << 20:
            raise CorruptTransfer("stream header too large")
        try:
            self.header: dict[str, Any] = json.loads(_read_exact(inp, hl))
        except ValueError:
            raise CorruptTransfer("stream header is not JSON") from None
        self.d = zstandard.ZstdDecompressor()
        self.trailer_ok = False
        self.count = 0

    def records(self) -> Iterator[tuple[int, int, bytes, bytes, bytes]]:
        """(index, flag, payload as sent, block data, digest) per record, each verified."""
        hh = xxhash.xxh3_128()
        size = int(self.header["size"])
        last = -1
        while True:
            h = _read_exact(self.inp, REC.size)
            index, flag, length, dig = REC.unpack(h)
            if index == NOP and not length:
                continue
            if index == END:
                count, total = TRAILER.unpack(_read_exact(self.inp, TRAILER.size))
                if count != self.count or total != hh.digest():
                    raise CorruptTransfer(f"transfer corrupt: trailer says {count} records, got {self.count}")
                self.trailer_ok = True
                return
            hh.update(h)
            if index <= last or index >= nblocks(size) or length > 2 * BLOCK:
                raise CorruptTransfer(f"transfer corrupt: bad record for block {index}")
            last = index
            want = block_len(index, size)
            payload = _read_exact(self.inp, length) if length else b""
            if flag == F_ZERO:
                data = b""
                ok = not length and dig == zero_digest(want)
            else:
                if flag == F_ZSTD:
                    try:
                        data = self.d.decompress(payload, max_output_size=BLOCK)
                    except zstandard.ZstdError:
                        raise CorruptTransfer(f"transfer corrupt: block {index} does not decompress") from None
                elif flag == F_RAW:
                    data = payload
                else:
                    raise CorruptTransfer(f"transfer corrupt: unknown flag {flag}")
                ok = len(data) == want and digest(data) == dig
            if not ok:
                raise CorruptTransfer(f"transfer corrupt: block {index} fails its checksum")
            self.count += 1
            yield index, flag, payload, data, dig


# ---- reading a disk -------------------------------------------------------------------------------

SEEK_DATA, SEEK_HOLE = getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)


def scan(fd: int, size: int, start: int = 0) -> Iterator[tuple[int, memoryview | None, list[bytes]]]:
    """(first block, chunk data or None for a hole, digests) per chunk, from byte `start` (a multiple of
    CHUNK). Holes are not read.

    The file is mapped read-only, 64 MiB at a time: hashing straight from the page cache measured
    2-5x faster than copying it out with pread. (A file truncated while mapped would fault the reader; disks of
    running VMs do not shrink, and a killed sender only tears a stream the replica then refuses.)
    """
    window: list[Any] = [None, None, -1]  # mmap, memoryview, offset of the mapped window
    use_map = size > 0
    buf = memoryview(bytearray(CHUNK))

    def unmap() -> None:
        if window[1] is not None:
            window[1].release()
        if window[0] is not None:
            with contextlib.suppress(BufferError):
                window[0].close()
        window[:] = [None, None, -1]

    def view(off: int, n: int) -> memoryview:
        """A read-only window of MAP_WINDOW bytes, remapped as the scan moves: RSS stays bounded."""
        nonlocal use_map
        if use_map:
            base = off - off % MAP_WINDOW
            if window[2] != base:
                unmap()
                try:
                    m = mmap.mmap(fd, min(MAP_WINDOW, size - base), prot=mmap.PROT_READ, offset=base)
                    m.madvise(mmap.MADV_SEQUENTIAL)
                    window[:] = [m, memoryview(m), base]
                except (OSError, ValueError):
                    use_map = False
            if use_map:
                return window[1][off - base:off - base + n]
        if os.preadv(fd, [buf[:n]], off) != n:
            raise ReplicaError(f"short read at {off}: the disk shrank while it was read")
        return buf[:n]

    data_start, data_end = 0, -1
    off = start
    try:
        while off < size:
            n = min(CHUNK, size - off)
            if off >= data_end:
                try:
                    data_start = os.lseek(fd, off, SEEK_DATA)
                    data_end = os.lseek(fd, data_start, SEEK_HOLE)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data_start = data_end = size  # no data up to EOF
                if data_end <= off:
                    data_end = off + n  # filesystems without SEEK_DATA: read everything
            first = off // BLOCK
            if data_start >= off + n:
                yield first, None, [zero_digest(min(BLOCK, n - i)) for i in range(0, n, BLOCK)]
            else:
                chunk = view(off, n)
                yield first, chunk, [digest(chunk[i:i + BLOCK]) for i in range(0, n, BLOCK)]
                chunk.release()
            off += n
    finally:
        unmap()


def _extents(client: Any, context: str, want: int, outward: bool) -> list[tuple[int, int]]:
    """Ranges of a meta context whose flags have bit `want` set, merged, then widened to whole BLOCKs
    (outward: a dirty range marks every block it touches) or narrowed (a zero range covers only the
    blocks it holds whole)."""
    merged: list[tuple[int, int]] = []
    for off, ln, fl in client.extents(context):
        if not fl & want:
            continue
        if merged and merged[-1][1] == off:
            merged[-1] = (merged[-1][0], off + ln)
        else:
            merged.append((off, off + ln))
    out: list[tuple[int, int]] = []
    for start, end in merged:
        if outward:
            start, end = start - start % BLOCK, -(-end // BLOCK) * BLOCK
        else:
            start, end = -(-start // BLOCK) * BLOCK, end if end == client.size else end - end % BLOCK
        if end <= start:
            continue
        if out and out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _spans(size: int, known: int, dirty: list[tuple[int, int]] | None,
           zeros: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """(first block, block count, kind) covering the disk in order: kind 0 = clean (the base's digest
    holds), 1 = zero (reported zero whole by the server), 2 = to read. Blocks [0, known) have a base
    digest; with `dirty` (byte ranges widened to whole blocks) only its blocks and those past `known`
    are not clean; without it, none is. Read spans hold at most CHUNK bytes, clean ones at most
    CLEAN_RUN blocks; zero ranges are byte ranges narrowed to whole blocks."""
    total = nblocks(size)
    need = [(a // BLOCK, b // BLOCK if b < size else total) for a, b in dirty] if dirty is not None else []
    if dirty is None or known < total:
        start = 0 if dirty is None else known
        need = [(a, min(b, start)) for a, b in need if a < start] + [(start, total)]
    zb = [(a // BLOCK, b // BLOCK if b < size else total) for a, b in zeros]
    pos = zi = 0
    for a, b in need:
        while pos < a:  # clean up to this need
            n = min(a - pos, CLEAN_RUN)
            yield pos, n, 0
            pos += n
        pos = max(pos, a)
        while pos < b:
            while zi < len(zb) and zb[zi][1] <= pos:
                zi += 1
            if zi < len(zb) and zb[zi][0] <= pos:  # inside a zero range
                end = min(b, zb[zi][1])
                yield pos, end - pos, 1
            else:
                end = min(b, zb[zi][0] if zi < len(zb) else b, pos + CHUNK // BLOCK)
                yield pos, end - pos, 2
            pos = end
    while pos < total:
        n = min(total - pos, CLEAN_RUN)
        yield pos, n, 0
        pos += n


CLEAN_RUN = 16384  # blocks of base digests per item scan_nbd yields for an unchanged stretch (1 GiB)


def scan_nbd(client: Any, size: int, base: ManifestReader | None = None,
             bitmap: str | None = None) -> Iterator[tuple[int, memoryview | None, list[bytes] | bytes]]:
    """scan() over an NBD export (a point-in-time view of a running VM's disk): (first block, data or
    None, digests) per span of blocks, in order, covering the disk.

    With `bitmap` (a qemu:dirty-bitmap context holding every block written since the point the base
    manifest describes), only dirty blocks are read: the others take their digest from `base`, so the
    cycle sees them unchanged and its cost follows the change, not the disk (a clean stretch comes as
    the base's digests joined, bytes rather than a list: nothing to compare, no per-block work). Blocks the server reports
    as zero (base:allocation) are not read either. The blocks to read go to client.read_many in one
    pipeline (64 KiB requests, many in flight), so scattered dirty blocks do not wait for each other.
    """
    zeros = _extents(client, "base:allocation", 2, False) if "base:allocation" in client.contexts else []
    dirty = _extents(client, bitmap, 1, True) if bitmap else None
    known = base.count if (base is not None and dirty is not None) else 0
    spans, reads = itertools.tee(_spans(size, known, dirty, zeros))
    data = client.read_many((f * BLOCK, min(n * BLOCK, size - f * BLOCK)) for f, n, kind in reads if kind == 2)
    for first, count, kind in spans:
        if kind == 0:  # only below `known`, the base's length: its digests are all there
            assert base is not None
            yield first, None, base.range(first, count)
        elif kind == 1:
            yield first, None, [zero_digest(block_len(first + j, size)) for j in range(count)]
        else:
            off, buf = next(data)
            if off != first * BLOCK:  # read_many yields its jobs in order: never
                raise ReplicaError(f"the NBD reader answered {off} for block {first}")
            yield first, buf, [digest(buf[j * BLOCK:(j + 1) * BLOCK]) for j in range(count)]


# ---- views of a live disk -------------------------------------------------------------------------


def run_argv(argv: list[str], what: str, timeout: float = 120) -> None:
    if not argv:
        return
    try:
        r = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReplicaError(f"{what} command {argv[0]} could not run: {type(exc).__name__}", code=f"{what}Failed") from None
    if r.returncode != 0:
        tail = r.stderr.decode(errors="replace").strip()[-300:]
        raise ReplicaError(f"{what} command {argv[0]} exited {r.returncode}: {tail}", code=f"{what}Failed")


FICLONE = 0x40049409


def reflink(src: str, dst: str) -> bool:
    """A copy-on-write clone (FICLONE); False where the filesystem has none."""
    import fcntl
    try:
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        return True
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)
        return False


@contextlib.contextmanager
def disk_view(disk: str, state_dir: str, freeze: list[str], thaw: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The path to read a crash-consistent cycle from.

    With a freeze command: freeze, then a reflink clone and thaw at once (the pause lasts only as long as
    the clone takes); without reflink the freeze is held for the read pass and thawed right after it.
    Without a freeze command the live file is read (only as consistent as the workload's own writes).
    """
    info: dict[str, Any] = {"view": "live"}
    if not freeze:
        yield disk, info
        return
    run_argv(freeze, "freeze")
    thawed = False
    clone = os.path.join(state_dir, "view.img")
    try:
        t0 = time.monotonic()
        if reflink(disk, clone):
            run_argv(thaw, "thaw")
            thawed = True
            info.update(view="reflink", frozen_seconds=round(time.monotonic() - t0, 4))
            try:
                yield clone, info
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(clone)
        else:
            info["view"] = "frozen-read"
            yield disk, info
            info["frozen_seconds"] = round(time.monotonic() - t0, 4)
    finally:
        if not thawed:
            run_argv(thaw, "thaw")


# ---- the source side ------------------------------------------------------------------------------


class SourceState:
    """What the source last shipped: `manifest` (acknowledged) and `manifest.pending` (in flight)."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        os.makedirs(state_dir, exist_ok=True)
        self.manifest = os.path.join(state_dir, "manifest")
        self.pending = os.path.join(state_dir, "manifest.pending")

    def base_for(self, expect_gen: bytes) -> str:
        """The manifest whose generation the replica holds; promotes a pending one it acknowledged."""
        ph = read_manifest_header(self.pending)
        if ph is not None and ph.gen == expect_gen:
            os.replace(self.pending, self.manifest)
            fsync_dir(self.dir)
        mh = read_manifest_header(self.manifest)
        if mh is None or mh.gen != expect_gen:
            raise ManifestMismatch("the source's manifest does not match the replica's: change tracking is lost, "
                                   "resynchronize")
        return self.manifest

    def commit(self, gen: bytes) -> bool:
        ph = read_manifest_header(self.pending)
        if ph is not None and ph.gen == gen:
            os.replace(self.pending, self.manifest)
            fsync_dir(self.dir)
            return True
        return False


@contextlib.contextmanager
def _source(disk: str, state_dir: str, freeze: list[str], thaw: list[str],
            nbd: dict[str, Any] | None) -> Iterator[tuple[int, Callable[[ManifestReader | None], Iterator[Any]], dict[str, Any]]]:
    """(size, chunks(base), view info) of what a cycle reads: the file (through disk_view) or an NBD view."""
    if nbd is None:
        with disk_view(disk, state_dir, freeze, thaw) as (path, view):
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                yield size, lambda _base: scan(fd, size), view
            finally:
                os.close(fd)
        return
    bitmap = nbd.get("bitmap")
    try:
        client = NBDClient(nbd["socket"], nbd["export"], contexts=(bitmap,) if bitmap else (),
                           optional=("base:allocation",))
    except (OSError, NBDError) as exc:
        raise ReplicaError(f"the point-in-time view of {disk} is not readable over NBD: {exc}", code="ViewFailed") from None
    info: dict[str, Any] = {"view": nbd.get("view", "qemu-fleece"), "cbt": False}

    def chunks(base: ManifestReader | None) -> Iterator[Any]:
        use = bitmap if base is not None else None
        info["cbt"] = bool(use)
        try:
            yield from scan_nbd(client, client.size, base, use)
        except (OSError, NBDError) as exc:
            raise ReplicaError(f"reading the point-in-time view of {disk} failed: {exc}", code="ViewFailed") from None

    try:
        yield client.size, chunks, info
    finally:
        client.close()


# ---- the bandwidth cap ----------------------------------------------------------------------------

class HostBucket:
    """A token bucket shared by every sender on one host (every concurrent transfer, every process):
    a small file holding the moment, on the host's monotonic clock, at which the link is next free.
    Sending n bytes reserves the next n/rate seconds of that timeline under an exclusive lock, then
    waits for the reservation's start; so whatever the number of senders, their sum stays at the rate.
    The bucket holds at most `burst` seconds of sending: what a sender late for its slot (a busy CPU, a
    full pipe) may catch up on, and all an idle link lends to the next transfer."""

    def __init__(self, path: str, rate: float, burst: float = 0.25) -> None:
        if rate <= 0:
            raise ReplicaError(f"a bandwidth cap must be positive, not {rate}")
        self.path, self.rate, self.burst = path, float(rate), burst

    def reserve(self, n: int) -> float:
        """Reserve n bytes of the host's link; the seconds to wait before sending them."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            now = time.monotonic()
            try:
                free = float(os.pread(fd, 64, 0).decode() or 0)
            except ValueError:
                free = 0.0
            if free > now + 3600:  # written before a reboot (the monotonic clock restarted)
                free = 0.0
            start = max(free, now - self.burst)
            data = repr(start + n / self.rate).encode().ljust(32)
            os.pwrite(fd, data, 0)
            return max(0.0, start - now)
        finally:
            os.close(fd)  # releases the lock


class Throttled:
    """A writer that takes its bytes from a HostBucket before passing them on. Reserves in quanta of
    about 50 ms of the rate (one lock per quantum, not per record)."""

    def __init__(self, out: BinaryIO, bucket: HostBucket) -> None:
        self.out, self.bucket, self.credit = out, bucket, 0
        self.quantum = int(min(256 * 1024, max(4096, bucket.rate * 0.05)))

    def write(self, b: Any) -> int:
        n = len(b)
        if n > self.credit:
            want = max(n - self.credit, self.quantum)
            wait = self.bucket.reserve(want)
            self.credit += want
            if wait > 0:
                time.sleep(wait)
        self.credit -= n
        return self.out.write(b)

    def flush(self) -> None:
        self.out.flush()


def send(disk: str, state_dir: str, out: BinaryIO, *, mode: str = "delta", expect_gen: bytes | None = None,
         base_manifest: str | None = None, compress: bool = True, progress: Progress | None = None,
         freeze: list[str] | None = None, thaw: list[str] | None = None,
         seq: int = 0, nbd: dict[str, Any] | None = None, keepalive: float | None = None,
         settle: float = 0) -> dict[str, Any]:
    """Write the stream of one cycle to `out` (a NOP record after `keepalive` s without output,
    default a third of the dead-link deadline).

    settle: the disk is still (its VM is off, the final cycle of a planned failover): wait up to this
    many seconds for its last write to leave the racy window (RACY_NS) before its stat is recorded, so
    that the record can later prove the disk unchanged (adopt: reverse replication without a block
    compare). The wait is at most RACY_NS and only when the disk was written that recently.

    nbd: read a point-in-time view over NBD instead of the file ({socket, export, bitmap: the dirty
    bitmap exported with it or None}); the bitmap is used only in 'delta' mode, where the base is the
    point the bitmap starts from (the caller's guarantee).

    mode 'full': every non-zero block (initial copy, export); 'delta': blocks whose digest differs from
    the acknowledged manifest of generation `expect_gen`; 'base': against `base_manifest`, the digests a
    replica computed from its own disk (resynchronization).
    """
    src = SourceState(state_dir)
    keepalive = dead_link_seconds() / 3 if keepalive is None else keepalive
    if mode == "delta":
        if expect_gen is None:
            raise ReplicaError("a delta needs the replica's generation")
        base_path: str | None = src.base_for(expect_gen)
    elif mode == "base":
        base_path = base_manifest
    elif mode == "full":
        base_path = None
    else:
        raise ReplicaError(f"unknown send mode {mode}")
    bh = read_manifest_header(base_path) if base_path else None
    if base_path and bh is None:
        raise ManifestMismatch("the base manifest is unreadable: resynchronize")
    new_gen = uuid.uuid4().bytes
    started = time.time()
    if settle > 0:
        _settle(disk, settle)
    # Taken before the view, so a write racing the read changes the file's times after this record:
    # source_status then rescans instead of reporting nothing pending.
    read_stat = _disk_stat(disk)
    with _source(disk, state_dir, freeze or [], thaw or [], nbd) as (size, chunks, view):
        header = {"v": 1, "size": size, "block": BLOCK, "mode": mode, "gen": new_gen.hex(),
                  "base_gen": bh.gen.hex() if bh else None, "source": os.path.basename(disk)}
        w = StreamWriter(out, header)
        enc = Encoder(compress)
        base = ManifestReader(base_path, bh)
        try:
            tmp = src.pending + ".tmp"
            changed = zeros = 0
            with open(tmp, "wb") as mf:
                mf.write(ManifestHeader(size=size, seq=seq, gen=new_gen).pack())
                next_report = PROGRESS_EVERY
                for first, data, digs in chunks(base if (mode == "delta" and base_path) else None):
                    w.keepalive(keepalive)
                    # Everything before this chunk is done (unchanged chunks included).
                    if progress and first * BLOCK >= next_report:
                        progress(first * BLOCK, size)
                        next_report = first * BLOCK + PROGRESS_EVERY
                    if isinstance(digs, bytes):  # clean by the dirty bitmap: the base's own digests
                        mf.write(digs)
                        continue
                    new = b"".join(digs)
                    old = base.range(first, len(digs)) if base_path else b""
                    if old == new:
                        mf.write(new)
                        continue
                    for j, d in enumerate(digs):
                        if old[j * DIG:(j + 1) * DIG] == d:
                            continue
                        i = first + j
                        n = block_len(i, size)
                        if d == zero_digest(n):
                            if base_path is None:
                                continue  # a full copy lands in a sparse file: zeros need not travel
                            w.record(i, F_ZERO, b"", d)
                            zeros += 1
                            continue
                        assert data is not None
                        # A live disk may change between hashing and shipping: ship a private
                        # copy under its own digest, and record that digest in the manifest.
                        blk = bytes(data[j * BLOCK:j * BLOCK + n])
                        d2 = digest(blk)
                        if d2 != d:
                            digs[j] = d2
                        flag, payload = enc.encode(blk)
                        w.record(i, flag, payload, d2)
                        changed += 1
                    mf.write(b"".join(digs))
                mf.flush()
                os.fsync(mf.fileno())
        finally:
            base.close()
        w.close()
    os.replace(tmp, src.pending)
    _record_read(state_dir, new_gen, read_stat)
    if progress:
        progress(size, size)
    return {"gen": new_gen.hex(), "size": size, "blocks": changed, "zero_blocks": zeros,
            "bytes": w.payload_bytes, "changed_bytes": changed * BLOCK, "send_started": round(started, 3),
            "send_seconds": round(time.time() - started, 3), **view}


# ---- what is pending at the source ---------------------------------------------------------------

READS = "reads.json"
# A file whose mtime lies this close to the moment it was recorded may be written again within the
# same timestamp tick (filesystem clocks are coarse: jiffies on ext4, 1-2 s elsewhere): "racily clean",
# as git calls it. Such a record never proves that nothing changed. (ctime is compared too: it moves
# on any write or metadata change and cannot be set back, so an mtime reset does not hide a write.)
RACY_NS = 2_000_000_000


def _disk_stat(disk: str) -> dict[str, int]:
    st = os.stat(disk)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "taken_ns": time.time_ns()}


def _settle(disk: str, most: float) -> None:
    """Wait (at most `most` s) until the disk's last write is older than the racy window."""
    end = time.monotonic() + most
    while True:
        st = os.stat(disk)
        left = (st.st_mtime_ns + RACY_NS + 1_000_000 - time.time_ns()) / 1e9
        if left <= 0 or time.monotonic() >= end:
            return
        time.sleep(min(left, max(0.0, end - time.monotonic()), 0.5))


def _unchanged_since(rec: dict[str, int] | None, now: dict[str, int]) -> str | None:
    """Why a stat record does not prove the disk unchanged since it was taken (None: it does).

    Proof: size, mtime, ctime and inode are as recorded, and the record is not racily clean (its mtime
    lies more than RACY_NS before the moment it was taken): any write after that moment gives the file a
    later mtime and ctime. ctime cannot be set back by anyone, so a write with its mtime reset is caught."""
    if not rec:
        return "no record of the disk as the last cycle read it"
    keys = ("size", "mtime_ns", "ctime_ns", "ino")
    moved = [k for k in keys if rec.get(k) != now[k]]
    if moved:
        return f"the disk changed after the last cycle read it ({', '.join(moved)} differ)"
    if rec["mtime_ns"] >= rec["taken_ns"] - RACY_NS:
        return "the disk was written less than 2 s before the last cycle read it (racily clean)"
    return None


def _record_read(state_dir: str, gen: bytes, stat: dict[str, int]) -> None:
    """Remember the disk's stat as a cycle read it, per generation; only generations the manifests still
    hold are kept (the acknowledged one and the one in flight)."""
    path = os.path.join(state_dir, READS)
    reads = read_json(path, {}) or {}
    live = {h.gen.hex() for h in (read_manifest_header(os.path.join(state_dir, n)) for n in ("manifest", "manifest.pending"))
            if h is not None}
    reads = {g: r for g, r in reads.items() if g in live}
    reads[gen.hex()] = stat
    write_json_atomic(path, reads)


def source_status(disk: str, state_dir: str, gen: bytes | None, scan_limit: int) -> dict[str, Any]:
    """Is change tracking intact for the generation the replica holds, and how many bytes of the disk
    differ from it (the changes not yet replicated)? Read-only.

    tracked: the source has the manifest of `gen` (False: it is lost or stale and only a resync helps).
    pending_bytes: 0 when the disk's size, times and inode are as the cycle of `gen` found them (and that
    record is not racily clean); otherwise the changed blocks (whole blocks, as a cycle ships them),
    counted by hashing the disk against the manifest when the disk is at most `scan_limit` bytes; None
    (unknown) when it is larger, or when tracking is lost.
    how: unchanged | scanned | too large to scan | untracked.
    """
    header = path = None
    for name in ("manifest.pending", "manifest"):
        h = read_manifest_header(os.path.join(state_dir, name))
        if h is not None and gen is not None and h.gen == gen:
            header, path = h, os.path.join(state_dir, name)
            break
    if header is None or path is None:
        return {"tracked": False, "pending_bytes": None, "how": "untracked"}
    now = _disk_stat(disk)
    rec = (read_json(os.path.join(state_dir, READS), {}) or {}).get(gen.hex() if gen else "")
    if _unchanged_since(rec, now) is None:
        return {"tracked": True, "pending_bytes": 0, "how": "unchanged", "size": now["size"]}
    size = now["size"]
    if size > scan_limit:
        return {"tracked": True, "pending_bytes": None, "how": "too large to scan", "size": size}
    pending = 0
    base = ManifestReader(path, header)
    fd = os.open(disk, os.O_RDONLY)
    try:
        for first, _, digs in scan(fd, size):
            old = base.range(first, len(digs))
            new = b"".join(digs)
            if old == new:
                continue
            for j, d in enumerate(digs):
                if old[j * DIG:(j + 1) * DIG] != d:
                    pending += block_len(first + j, size)
    finally:
        os.close(fd)
        base.close()
    return {"tracked": True, "pending_bytes": pending, "how": "scanned", "size": size}


# ---- the replica side -----------------------------------------------------------------------------


class Replica:
    """A replica disk and its metadata directory: manifest, state.json (points), undo/, journal."""

    def __init__(self, path: str, meta: str) -> None:
        self.path = path
        self.meta = meta
        self.manifest = os.path.join(meta, "manifest")
        self.state_file = os.path.join(meta, "state.json")
        self.journal = os.path.join(meta, "journal")
        self.undo_dir = os.path.join(meta, "undo")
        self.staging = os.path.join(meta, "staging")

    def _mkdirs(self) -> None:
        os.makedirs(self.undo_dir, exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def undo_path(self, seq: int) -> str:
        return os.path.join(self.undo_dir, f"{seq:012d}.undo")

    def state(self) -> dict[str, Any]:
        st: dict[str, Any] = read_json(self.state_file, None) or {}
        st.setdefault("points", [])
        return st

    def header(self) -> ManifestHeader | None:
        return read_manifest_header(self.manifest)

    def _stat(self) -> list[int]:
        s = os.stat(self.path)
        return [s.st_size, s.st_mtime_ns, s.st_ino, s.st_ctime_ns]

    def quick_check(self) -> list[str]:
        """What differs between the replica file and its stat at the last commit: [] when nothing does.

        ctime is part of it: any write, truncate, chmod or rename moves it and no user can set it back,
        so bytes changed with their mtime reset (touch -d, os.utime) are caught. Bit rot changes no
        timestamp at all: only a scrub (re-hashing against the manifest) finds that.
        """
        rec = self.state().get("stat")
        if not os.path.exists(self.path):
            return ["file missing"]
        if not rec:
            return ["no committed stat"]
        now = self._stat()
        names = ("size", "mtime", "inode", "ctime")
        # A record written before ctime was part of the check has three fields: compare those (the
        # next commit writes all four).
        out = [f"{n} {rec[i]} -> {now[i]}" for i, n in enumerate(names[:len(rec)]) if rec[i] != now[i]]
        h = self.header()
        if h is not None and h.size != now[0] and not any(o.startswith("size") for o in out):
            out.append(f"size {h.size} in the manifest, {now[0]} on disk")
        return out

    # -- status and recovery --
    def status(self) -> dict[str, Any]:
        self.recover()
        h = self.header()
        st = self.state()
        exists = os.path.exists(self.path)
        differs = self.quick_check() if exists and h is not None else []
        corrupt = st.get("corrupt")
        if corrupt:
            differs.append(f"scrub found {corrupt['count']} corrupt block(s) and {len(corrupt.get('undo', []))} "
                           f"corrupt undo log(s) on {corrupt['found_at']}")
        matches = bool(exists and h is not None and not differs)
        return {"exists": exists, "initialized": h is not None, "gen": h.gen.hex() if h else None,
                "seq": h.seq if h else 0, "size": h.size if h else None, "disk_matches": matches,
                "differs": differs, "corrupt": corrupt, "last_scrub": st.get("last_scrub"),
                "points": st["points"], "undo_bytes": self._undo_bytes(),
                # False on a read-only filesystem (EROFS): cycles cannot land, reading still works
                "writable": os.access(self.meta if os.path.isdir(self.meta) else os.path.dirname(self.meta), os.W_OK)}

    def _undo_bytes(self) -> int:
        try:
            return sum(e.stat().st_size for e in os.scandir(self.undo_dir))
        except FileNotFoundError:
            return 0

    def recover(self) -> str:
        """Finish or undo whatever a killed process left: the replica ends at a committed point."""
        if not os.path.isdir(self.meta):
            return "none"
        j = read_json(self.journal)
        outcome = "clean"
        h = self.header()
        if j is not None:
            committed = h is not None and h.seq == j["seq"] and h.gen.hex() == j["gen"]
            if j["op"] == "apply":
                if committed:
                    self._finish_apply(j)
                    outcome = "rolled-forward"
                else:
                    undo = self.undo_path(j["seq"])
                    if os.path.exists(undo):
                        self._apply_undo(undo)
                    outcome = "rolled-back"
            elif j["op"] == "revert":
                # Reverting to an older point only writes known data: redo it from the start.
                if not committed:
                    self._revert_one(j["from_seq"], resume=True)
                self._finish_revert(j)
                outcome = "reverted"
            self._set_stat()
            os.unlink(self.journal)
            fsync_dir(self.meta)
        # Leftovers of a crash before the journal was written (or after it was removed).
        h = self.header()
        for name in ("manifest.new", "journal.tmp", "state.json.tmp"):
            # lexists first: on a read-only filesystem unlink answers EROFS even for a missing file,
            # and a replica with nothing to clean up must stay readable there (status, drills)
            if os.path.lexists(leftover := os.path.join(self.meta, name)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        if os.path.isdir(self.undo_dir):
            for e in os.scandir(self.undo_dir):
                if e.name.endswith(".tmp") or (h is not None and e.name.endswith(".undo") and int(e.name[:12]) > h.seq):
                    os.unlink(e.path)
        for e in list(os.scandir(self.meta)):
            if e.name.startswith("staging"):
                os.unlink(e.path)
        return outcome

    def _set_stat(self) -> None:
        st = self.state()
        if os.path.exists(self.path):
            st["stat"] = self._stat()
        write_json_atomic(self.state_file, st)

    # -- receiving --
    def receive(self, inp: BinaryIO, point: dict[str, Any], retention_hours: float = 0,
                progress: Progress | None = None, max_points: int = 0) -> dict[str, Any]:
        self._mkdirs()
        self.recover()
        r = StreamReader(inp)
        hdr = r.header
        if int(hdr.get("block", 0)) != BLOCK:
            raise CorruptTransfer(f"block size {hdr.get('block')} is not {BLOCK}")
        if hdr["mode"] == "full":
            return self._receive_full(r, point, retention_hours, progress)
        h = self.header()
        if h is None or not os.path.exists(self.path):
            raise NoReplica("there is no initialized replica to apply a delta to: run the initial replication")
        if hdr["base_gen"] != h.gen.hex():
            raise ManifestMismatch("the delta was computed against another generation of this replica: resynchronize")
        if hdr["mode"] == "delta" and (differs := self.quick_check()):
            raise ManifestMismatch(f"the replica disk was changed outside replication ({'; '.join(differs)}): "
                                   "resynchronize")
        if hdr["mode"] == "delta" and self.state().get("corrupt"):
            raise ManifestMismatch("a scrub found corrupt blocks in the replica: resynchronize")
        # Stage the whole cycle and verify it before touching the replica: a torn or corrupt
        # transfer is never applied.
        staging = self.staging + f".{h.seq + 1}"
        size = int(hdr["size"])
        try:
            with open(staging, "wb") as sf:
                for index, flag, payload, _data, dig in r.records():
                    sf.write(REC.pack(index, flag, len(payload), dig))
                    if payload:
                        sf.write(payload)
                    if progress and r.count % PROGRESS_RECORDS == 0:
                        progress(index * BLOCK, size)
                sf.flush()
                os.fsync(sf.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            raise
        out = self._apply(staging, hdr, point, r.count)
        self.prune(retention_hours, max_points)
        if progress:
            progress(size, size)
        return out

    def _receive_full(self, r: StreamReader, point: dict[str, Any], retention_hours: float,
                      progress: Progress | None) -> dict[str, Any]:
        hdr = r.header
        size = int(hdr["size"])
        partial = self.path + ".partial"
        gen = bytes.fromhex(hdr["gen"])
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        seq = int(point.get("seq") or 1)
        tmp = os.path.join(self.meta, "manifest.new")
        n = nblocks(size)
        try:
            os.ftruncate(fd, size)
            with open(tmp, "wb") as mf:
                mf.write(ManifestHeader(size=size, seq=seq, gen=gen).pack())
                pos = 0  # blocks not sent are zero; the manifest is written in block order as records come
                for index, _flag, _payload, data, dig in r.records():
                    if index > pos:
                        mf.write(b"".join(zero_digest(block_len(k, size)) for k in range(pos, index)))
                    mf.write(dig)
                    pos = index + 1
                    if data:
                        os.pwrite(fd, data, index * BLOCK)
                    if progress and r.count % PROGRESS_RECORDS == 0:
                        progress(index * BLOCK, size)
                for k in range(pos, n, 4096):
                    mf.write(b"".join(zero_digest(block_len(i, size)) for i in range(k, min(n, k + 4096))))
                mf.flush()
                os.fsync(mf.fileno())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            for leftover in (partial, tmp):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
            raise
        os.close(fd)
        os.replace(partial, self.path)
        for e in os.scandir(self.undo_dir):
            os.unlink(e.path)
        os.replace(tmp, self.manifest)
        fsync_dir(self.meta)
        pt = dict(point, seq=seq, gen=hdr["gen"], size=size)
        write_json_atomic(self.state_file, {"points": [pt], "stat": self._stat()})
        if progress:
            progress(size, size)
        return {"point": pt, "blocks": r.count, "mode": "full"}

    def _apply(self, staging: str, hdr: dict[str, Any], point: dict[str, Any], count: int) -> dict[str, Any]:
        h = self.header()
        assert h is not None
        seq = h.seq + 1
        new_size = int(hdr["size"])
        old = ManifestReader(self.manifest, h)
        undo = self.undo_path(seq)
        # 1. the undo log: every block this cycle overwrites or truncates away, as it is now
        fd = os.open(self.path, os.O_RDWR)
        try:
            with open(undo + ".tmp", "wb") as uf, open(staging, "rb") as sf:
                w = StreamWriter(uf, {"v": 1, "size": h.size, "block": BLOCK, "mode": "undo",
                                      "gen": h.gen.hex(), "seq": h.seq, "base_gen": None})
                enc = Encoder(True)

                def save(i: int) -> None:
                    od = old.get(i)
                    if od is None:
                        return  # beyond the old size: truncation restores it
                    n = block_len(i, h.size)
                    if od == zero_digest(n):
                        w.record(i, F_ZERO, b"", od)
                        return
                    data = os.pread(fd, n, i * BLOCK)
                    flag, payload = enc.encode(data)
                    w.record(i, flag, payload, od)

                for index in _staged_indexes(sf):
                    save(index)
                for i in range(nblocks(new_size), nblocks(h.size)):
                    save(i)
                w.close()
                uf.flush()
                os.fsync(uf.fileno())
            os.replace(undo + ".tmp", undo)
            fsync_dir(self.undo_dir)
            # 2. the journal: from here a crash rolls back through the undo log
            write_json_atomic(self.journal, {"op": "apply", "seq": seq, "gen": hdr["gen"],
                                             "point": dict(point, seq=seq, gen=hdr["gen"], size=new_size)})
            # 3. the blocks
            if new_size != h.size:
                os.ftruncate(fd, new_size)
            d = zstandard.ZstdDecompressor()
            with open(staging, "rb") as sf:
                for index, flag, payload, _dig in _staged_records(sf):
                    if flag == F_ZERO:
                        zero_range(fd, index * BLOCK, block_len(index, new_size))
                    else:
                        os.pwrite(fd, d.decompress(payload, max_output_size=BLOCK) if flag == F_ZSTD else payload,
                                  index * BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)
        # 4. the new manifest; its rename is the commit point
        with open(staging, "rb") as sf:
            changes = ((i, dg) for i, _f, _p, dg in _staged_records(sf))
            self._write_manifest(old, ManifestHeader(size=new_size, seq=seq, gen=bytes.fromhex(hdr["gen"])), changes)
        old.close()
        j = read_json(self.journal)
        self._finish_apply(j)
        os.unlink(self.journal)
        fsync_dir(self.meta)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        return {"point": j["point"], "blocks": count, "mode": hdr["mode"], "undo_bytes": os.path.getsize(undo)}

    def _write_manifest(self, old: ManifestReader, header: ManifestHeader, changes: Iterator[tuple[int, bytes]]) -> None:
        """The old manifest with `changes` (sorted by block) merged in, streamed: memory stays flat."""
        tmp = os.path.join(self.meta, "manifest.new")
        n = nblocks(header.size)
        pending = next(changes, None)
        with open(tmp, "wb") as mf:
            mf.write(header.pack())
            for start in range(0, n, 4096):
                cnt = min(4096, n - start)
                cur = bytearray(old.range(start, cnt))
                if len(cur) < cnt * DIG:  # grown: new blocks not sent are zero
                    cur += b"".join(zero_digest(block_len(k, header.size)) for k in range(start + len(cur) // DIG, start + cnt))
                while pending is not None and pending[0] < start + cnt:
                    k, dg = pending
                    if k >= start:
                        cur[(k - start) * DIG:(k - start + 1) * DIG] = dg
                    pending = next(changes, None)
                mf.write(cur)
            mf.flush()
            os.fsync(mf.fileno())
        os.replace(tmp, self.manifest)
        fsync_dir(self.meta)

    def _finish_apply(self, j: dict[str, Any]) -> None:
        st = self.state()
        st["points"] = [p for p in st["points"] if p["seq"] < j["seq"]] + [j["point"]]
        st["stat"] = self._stat()
        write_json_atomic(self.state_file, st)

    def _apply_undo(self, undo: str, fd: int | None = None) -> tuple[int, dict[int, bytes], dict[str, Any]]:
        """Write an undo log's blocks back (idempotent) and restore its size; (old size, digests, header)."""
        own = fd is None
        if fd is None:
            fd = os.open(self.path, os.O_RDWR)
        try:
            with open(undo, "rb") as uf:
                r = StreamReader(uf)
                size = int(r.header["size"])
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                digs: dict[int, bytes] = {}
                for index, flag, _payload, data, dig in r.records():
                    if flag == F_ZERO:
                        zero_range(fd, index * BLOCK, block_len(index, size))
                    else:
                        os.pwrite(fd, data, index * BLOCK)
                    digs[index] = dig
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            if own:
                os.close(fd)
        return size, digs, r.header

    # -- points --
    def prune(self, retention_hours: float, max_points: int = 0) -> list[int]:
        """Drop points older than the retention (the newest always stays) and the undo logs only they need."""
        st = self.state()
        pts = sorted(st["points"], key=lambda p: p["seq"])
        if not pts:
            return []
        cutoff = datetime.now(UTC) - timedelta(hours=retention_hours)
        keep = [p for p in pts if datetime.fromisoformat(p["created_at"]) >= cutoff] or [pts[-1]]
        if pts[-1] not in keep:
            keep.append(pts[-1])
        if max_points and len(keep) > max_points:
            keep = keep[-max_points:]
        oldest = keep[0]["seq"]
        dropped = [p["seq"] for p in pts if p["seq"] < oldest]
        if dropped:
            st["points"] = [p for p in pts if p["seq"] >= oldest]
            write_json_atomic(self.state_file, st)
        for e in os.scandir(self.undo_dir):
            if e.name.endswith(".undo") and int(e.name[:12]) <= oldest:
                os.unlink(e.path)
        return dropped

    def rebuild(self, seq: int, dest: str) -> dict[str, Any]:
        """Materialize point `seq` at `dest` (a copy-on-write clone where possible), the replica untouched."""
        self.recover()
        h = self.header()
        if h is None:
            raise NoReplica("no replica to rebuild a point from")
        seqs = {p["seq"] for p in self.state()["points"]}
        if seq not in seqs:
            raise ReplicaError(f"recovery point {seq} does not exist (have {sorted(seqs)})", code="NoSuchPoint")
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        how = copy_file(self.path, dest)
        fd = os.open(dest, os.O_RDWR)
        try:
            for s in range(h.seq, seq, -1):
                self._apply_undo(self.undo_path(s), fd)
        finally:
            os.close(fd)
        return {"seq": seq, "dest": dest, "copy": how, "undo_applied": h.seq - seq}

    def revert(self, seq: int) -> dict[str, Any]:
        """Roll the replica itself back to point `seq` (failover to an older point); newer points go."""
        self.recover()
        h = self.header()
        if h is None:
            raise NoReplica("no replica to revert")
        if seq not in {p["seq"] for p in self.state()["points"]}:
            raise ReplicaError(f"recovery point {seq} does not exist", code="NoSuchPoint")
        steps = 0
        while h is not None and h.seq > seq:
            j = {"op": "revert", "from_seq": h.seq, "seq": h.seq - 1, "gen": ""}
            uh = StreamReader(open(self.undo_path(h.seq), "rb"))  # noqa: SIM115 - header only
            uh.inp.close()
            j["gen"] = uh.header["gen"]
            write_json_atomic(self.journal, j)
            self._revert_one(h.seq)
            self._finish_revert(j)
            self._set_stat()
            os.unlink(self.journal)
            fsync_dir(self.meta)
            steps += 1
            h = self.header()
        return {"seq": seq, "steps": steps}

    def _revert_one(self, from_seq: int, resume: bool = False) -> None:
        h = self.header()
        assert h is not None
        old = ManifestReader(self.manifest, h)
        size, digs, uhdr = self._apply_undo(self.undo_path(from_seq))
        self._write_manifest(old, ManifestHeader(size=size, seq=from_seq - 1, gen=bytes.fromhex(uhdr["gen"])),
                             iter(sorted(digs.items())))
        old.close()

    def _finish_revert(self, j: dict[str, Any]) -> None:
        st = self.state()
        st["points"] = [p for p in st["points"] if p["seq"] <= j["seq"]]
        write_json_atomic(self.state_file, st)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.undo_path(j["from_seq"]))

    def rehash(self, out: BinaryIO | None = None) -> dict[str, Any]:
        """Recompute the manifest from the replica disk (resynchronization, or a manifest that does not
        match its disk). Points survive only when the disk still equals the newest point."""
        self._mkdirs()
        self.recover()
        h = self.header()
        fd = os.open(self.path, os.O_RDONLY)
        gen = uuid.uuid4().bytes
        tmp = os.path.join(self.meta, "manifest.new")
        try:
            size = os.fstat(fd).st_size
            same = h is not None and h.size == size
            old = ManifestReader(self.manifest, h) if h else ManifestReader(None)
            with open(tmp, "wb") as mf:
                mf.write(ManifestHeader(size=size, seq=h.seq if h else 0, gen=gen).pack())
                for first, _data, digs in scan(fd, size):
                    new = b"".join(digs)
                    if same and old.range(first, len(digs)) != new:
                        same = False
                    mf.write(new)
                mf.flush()
                os.fsync(mf.fileno())
            old.close()
        finally:
            os.close(fd)
        bad_undo = (self.state().get("corrupt") or {}).get("undo") or []
        if same and h is not None:
            # Unchanged disk: keep the generation, the chain of undo logs stays valid (except past an
            # undo log a scrub found corrupt: the points that need it cannot be rebuilt any more).
            os.unlink(tmp)
            if bad_undo:
                worst = max(bad_undo)
                st = self.state()
                st["points"] = [p for p in st["points"] if p["seq"] >= worst]
                write_json_atomic(self.state_file, st)
                for e in os.scandir(self.undo_dir):
                    if e.name.endswith(".undo") and int(e.name[:12]) <= worst:
                        os.unlink(e.path)
        else:
            os.replace(tmp, self.manifest)
            fsync_dir(self.meta)
            for e in os.scandir(self.undo_dir):
                os.unlink(e.path)
            st = self.state()
            st["points"] = []
            write_json_atomic(self.state_file, st)
        st = self.state()
        st.pop("corrupt", None)  # the manifest describes the disk again; a resync ships what differs
        write_json_atomic(self.state_file, st)
        self._set_stat()
        if out is not None:
            with open(self.manifest, "rb") as mf:
                shutil.copyfileobj(mf, out, 1 << 20)
        nh = self.header()
        assert nh is not None
        return {"gen": nh.gen.hex(), "seq": nh.seq, "size": nh.size, "points_kept": same}

    def drop(self) -> None:
        shutil.rmtree(self.meta, ignore_errors=True)

    # -- scrub --
    def scrub(self, lock: Callable[[], contextlib.AbstractContextManager[Any]], start: int = 0,
              max_seconds: float = 60.0, rate: float | None = None, points: bool = False) -> dict[str, Any]:
        """Re-hash the replica against its manifest from block `start`, for at most `max_seconds`, reading
        at most `rate` bytes/s (holes are not read); with `points`, once the disk is done, verify every
        undo log (each block's digest and the trailer). Returns `next` (the block to go on from, None
        when done), blocks and bytes read, and what was found corrupt.

        The pass runs without the replica's lock, so cycles are not held up for hours; whatever
        mismatches is read again under `lock` (after the recovery step) against the manifest current
        then, so an apply racing the pass is not mistaken for rot. Confirmed rot is recorded in
        state.json (`corrupt`): status then says the disk does not match (health Critical), deltas are
        refused, and a resynchronization (rehash + block compare with the source) repairs it.
        """
        h = self.header()
        if h is None or not os.path.exists(self.path):
            raise NoReplica("no replica to scrub")
        t0 = time.monotonic()
        suspect: list[int] = []
        read = 0
        nxt: int | None = None
        man = ManifestReader(self.manifest, h)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = min(os.fstat(fd).st_size, h.size)
            first_off = min(start * BLOCK, size)
            done_blocks = 0
            for first, data, digs in scan(fd, size, first_off - first_off % CHUNK):
                want = man.range(first, len(digs))
                new = b"".join(digs)
                if want != new:
                    suspect += [first + j for j in range(len(digs)) if want[j * DIG:(j + 1) * DIG] != digs[j]]
                done_blocks += len(digs)
                if data is not None:
                    read += len(data)
                    if rate:
                        ahead = read / rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                if time.monotonic() - t0 >= max_seconds and first + len(digs) < nblocks(size):
                    nxt = first + len(digs)
                    break
            if nxt is None and os.fstat(fd).st_size != h.size:
                suspect.append(nblocks(h.size))  # the file's size itself is wrong: confirmed under the lock
        finally:
            os.close(fd)
            man.close()
        bad_undo: list[int] = []
        if nxt is None and points:
            bad_undo = self._scrub_undo(rate, t0, read)
        confirmed: list[int] = []
        if suspect or bad_undo:
            with lock():
                self.recover()
                confirmed, bad_undo = self._confirm(suspect, bad_undo)
        st = self.state()
        now = now_iso()
        if confirmed or bad_undo:
            old = st.get("corrupt") or {}
            blocks = sorted(set(old.get("blocks", [])) | set(confirmed))
            st["corrupt"] = {"found_at": old.get("found_at", now), "count": len(blocks), "blocks": blocks[:1000],
                             "undo": sorted(set(old.get("undo", [])) | set(bad_undo))}
        st["last_scrub"] = {"at": now, "start": start, "next": nxt, "corrupt_blocks": len(confirmed),
                            "corrupt_undo": bad_undo}
        with lock():
            cur = self.state()
            cur.update({k: st[k] for k in ("corrupt", "last_scrub") if k in st})
            write_json_atomic(self.state_file, cur)
        return {"next": nxt, "bytes_read": read, "blocks": done_blocks, "seconds": round(time.monotonic() - t0, 3),
                "corrupt_blocks": confirmed, "corrupt_undo": bad_undo, "size": size}

    def _scrub_undo(self, rate: float | None, t0: float, read: int) -> list[int]:
        bad = []
        try:
            entries = sorted(e.path for e in os.scandir(self.undo_dir) if e.name.endswith(".undo"))
        except FileNotFoundError:
            return []
        for path in entries:
            try:
                with open(path, "rb") as f:
                    for _ in StreamReader(f).records():
                        pass
                read += os.path.getsize(path)
            except FileNotFoundError:
                continue  # pruned meanwhile
            except CorruptTransfer:
                bad.append(int(os.path.basename(path)[:12]))
            if rate and (ahead := read / rate - (time.monotonic() - t0)) > 0:
                time.sleep(ahead)
        return bad

    def _confirm(self, suspect: list[int], undo: list[int]) -> tuple[list[int], list[int]]:
        """Under the lock: which suspect blocks still differ from the current manifest, which undo logs
        still fail their checksums."""
        h = self.header()
        bad: list[int] = []
        if h is not None and suspect:
            man = ManifestReader(self.manifest, h)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                fsize = os.fstat(fd).st_size
                for i in suspect:
                    if i >= nblocks(h.size):
                        if fsize != h.size:
                            bad.append(i)
                        continue
                    n = block_len(i, h.size)
                    data = os.pread(fd, n, i * BLOCK)
                    if len(data) < n:
                        data += bytes(n - len(data))
                    if digest(data) != man.get(i):
                        bad.append(i)
            finally:
                os.close(fd)
                man.close()
        still = []
        for seq in undo:
            try:
                with open(self.undo_path(seq), "rb") as f:
                    for _ in StreamReader(f).records():
                        pass
            except FileNotFoundError:
                continue
            except CorruptTransfer:
                still.append(seq)
        return bad, still


def _staged_records(sf: BinaryIO) -> Iterator[tuple[int, int, bytes, bytes]]:
    while True:
        h = sf.read(REC.size)
        if len(h) < REC.size:
            return
        index, flag, length, dig = REC.unpack(h)
        yield index, flag, sf.read(length) if length else b"", dig


def _staged_indexes(sf: BinaryIO) -> Iterator[int]:
    while True:
        h = sf.read(REC.size)
        if len(h) < REC.size:
            return
        index, _flag, length, _dig = REC.unpack(h)
        if length:
            sf.seek(length, os.SEEK_CUR)
        yield index


# ---- reversing a failover without a block compare ---------------------------------------------------
#
# After a planned failover the two disks hold the same point: the old replica is that point (its manifest
# says so) and the old primary is what the final cycle read (its source state says so, and its stat
# proves it has not been written since). Reverse replication then needs no block compare of two identical
# disks: the old replica's manifest becomes the new source's base (seed_source: the first cycle ships
# only what the failed-over VM wrote), and the old primary becomes the replica of that point (adopt).
# Whatever cannot be proved is refused with the reason, and the caller falls back to the block compare.


def manifest_digest(path: str) -> str:
    """xxh3-128 of a manifest's digests (its header aside: seq and generation say nothing of content)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        f.seek(MHDR.size)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _copy_manifest(src: str, dst: str, header: ManifestHeader) -> None:
    """`src`'s digests under `header`, written to `dst` atomically and durably."""
    tmp = dst + ".tmp"
    with open(src, "rb") as f, open(tmp, "wb") as out:
        f.seek(MHDR.size)
        out.write(header.pack())
        shutil.copyfileobj(f, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def seed_source(replica: Replica, state_dir: str) -> dict[str, Any]:
    """The replica's disk becomes a source whose acknowledged manifest is the replica's newest point
    (the failover point): a delta from it ships exactly the blocks that differ from that point, whatever
    wrote them. The disk is not read. Answers the point's generation, seq, size, manifest digest and
    recovery-point record (None when the replica no longer lists it)."""
    replica.recover()
    h = replica.header()
    if h is None:
        raise NoReplica("there is no replica to make a source of")
    src = SourceState(state_dir)
    _copy_manifest(replica.manifest, src.manifest, h)
    for name in ("manifest.pending", READS, "base.manifest"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(state_dir, name))
    fsync_dir(state_dir)
    point = next((p for p in replica.state()["points"] if p.get("seq") == h.seq), None)
    return {"gen": h.gen.hex(), "seq": h.seq, "size": h.size, "manifest": manifest_digest(src.manifest),
            "point": point}


def adopt(replica: Replica, state_dir: str, gen: bytes, manifest: str, point: dict[str, Any]) -> dict[str, Any]:
    """Make a source disk the replica of the point it last shipped, without reading it: when its source
    state (`state_dir`) holds the manifest of generation `gen` with the digest `manifest` (the other
    side's copy of the same point), and the disk's stat proves it unchanged since the cycle of `gen`
    read it. Answers {adopted, reason}; on refusal nothing is written."""
    for name in ("manifest.pending", "manifest"):
        path = os.path.join(state_dir, name)
        h = read_manifest_header(path)
        if h is not None and h.gen == gen:
            break
    else:
        return {"adopted": False, "reason": "this disk's source state has no manifest of the failover point"}
    if manifest_digest(path) != manifest:
        return {"adopted": False, "reason": "the failover point's manifests differ at the two sites"}
    try:
        now = _disk_stat(replica.path)
    except FileNotFoundError:
        return {"adopted": False, "reason": "the disk is missing"}
    if now["size"] != h.size:
        return {"adopted": False, "reason": f"the disk is {now['size']} bytes, the point {h.size}"}
    why = _unchanged_since((read_json(os.path.join(state_dir, READS), {}) or {}).get(gen.hex()), now)
    if why is not None:
        return {"adopted": False, "reason": why}
    replica.drop()
    replica._mkdirs()
    _copy_manifest(path, replica.manifest, ManifestHeader(size=h.size, seq=int(point["seq"]), gen=gen))
    write_json_atomic(replica.state_file, {"points": [point]})
    replica._set_stat()
    after = _disk_stat(replica.path)
    if any(after[k] != now[k] for k in ("size", "mtime_ns", "ctime_ns", "ino")):
        replica.drop()  # written while it was being adopted: not proved after all
        return {"adopted": False, "reason": "the disk changed while it was being adopted"}
    return {"adopted": True, "reason": ""}


def copy_file(src: str, dst: str) -> str:
    """A clone where the filesystem offers reflinks, else a sparse copy (holes stay holes)."""
    tmp = dst + ".tmp"
    if reflink(src, tmp):
        os.replace(tmp, dst)
        return "reflink"
    size = os.path.getsize(src)
    with open(src, "rb") as s, open(tmp, "wb") as d:
        sfd, dfd = s.fileno(), d.fileno()
        os.ftruncate(dfd, size)
        for first, data, digs in scan(sfd, size):
            if data is None:
                continue
            for j, dg in enumerate(digs):
                if dg != zero_digest(len(data[j * BLOCK:(j + 1) * BLOCK])):
                    os.pwrite(dfd, data[j * BLOCK:(j + 1) * BLOCK], (first + j) * BLOCK)
        os.fsync(dfd)
    os.replace(tmp, dst)
    return "sparse-copy"


def file_digest(path: str) -> str:
    """xxh3-128 of a whole file's content (tests and verification: equal content, equal digest)."""
    h = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for _first, data, digs in scan(fd, size):
            h.update(b"".join(digs))
            _ = data
    finally:
        os.close(fd)
    return h.hexdigest() + f":{size}"
