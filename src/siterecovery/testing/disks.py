"""Raw disk images for tests, benchmarks and the soak: sparse where unwritten, incompressible where
written, reproducible when seeded. Writes go through pwrite on 64 KiB block boundaries, the engine's
unit, so "blocks changed" means what the engine will see."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

from ..replica.engine import BLOCK


def _bytes(rnd: random.Random | None, n: int) -> bytes:
    return rnd.randbytes(n) if rnd is not None else os.urandom(n)


def make_disk(path: Path, size: int, every: int = 3, seed: int | None = None) -> int:
    """A `size`-byte image with random data in every `every`-th block, the rest a hole; its data bytes.
    Parent directories are created. `seed` makes the content reproducible."""
    rnd = random.Random(seed) if seed is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(0, size // BLOCK, every):
            f.seek(i * BLOCK)
            f.write(_bytes(rnd, BLOCK))
            written += BLOCK
    return written


def rewrite_blocks(path: Path, blocks: Iterable[int], rnd: random.Random | None = None) -> int:
    """Overwrite these whole blocks with random data; the bytes written."""
    fd = os.open(path, os.O_RDWR)
    n = 0
    try:
        for i in blocks:
            os.pwrite(fd, _bytes(rnd, BLOCK), i * BLOCK)
            n += BLOCK
    finally:
        os.close(fd)
    return n


def rewrite_random(path: Path, count: int, rnd: random.Random) -> int:
    """Overwrite `count` distinct blocks chosen at random (some land on holes); the bytes written."""
    n = os.path.getsize(path) // BLOCK
    return rewrite_blocks(path, rnd.sample(range(n), min(count, n)), rnd)


def scribble(path: Path, n: int = 8, length: int = 5000) -> None:
    """`n` unaligned writes of `length` random bytes at random offsets (they straddle block edges)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(n):
            os.pwrite(fd, os.urandom(length), int.from_bytes(os.urandom(4), "little") % (size - length))
    finally:
        os.close(fd)


def rot(path: Path, offset: int, length: int = 16) -> None:
    """Flip every bit of `length` bytes at `offset`, then set atime and mtime back to what they were:
    what a user (or a bug) can do behind replication's back. The kernel still moves ctime; no user-space
    write can keep it, which is why a scrub, not the quick check, is what finds real bit rot."""
    st = os.stat(path)
    fd = os.open(path, os.O_RDWR)
    try:
        data = os.pread(fd, length, offset)
        os.pwrite(fd, bytes(b ^ 0xFF for b in data), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
