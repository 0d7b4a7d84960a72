"""Disk images and one-call cycles for the engine tests and benchmarks."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

from siterecovery.replica.engine import BLOCK, Replica, SourceState, now_iso, send
from siterecovery.testing.disks import rewrite_blocks

MiB = 1024 * 1024


def make_disk(path: Path, size: int, fill: float = 0.3, seed: int = 1, compressible: bool = False) -> None:
    """A sparse image with `fill` of its blocks written (random bytes, or text-like when compressible)."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // BLOCK):
            if rnd.random() < fill:
                f.seek(i * BLOCK)
                f.write((b"log line %d\n" % i) * (BLOCK // 16) if compressible else rnd.randbytes(BLOCK))
                f.truncate(size)


def scribble(path: Path, blocks: int, seed: int = 2) -> set[int]:
    """Rewrite `blocks` random whole blocks; their indexes."""
    rnd = random.Random(seed)
    idx = set(rnd.sample(range(os.path.getsize(path) // BLOCK), blocks))
    rewrite_blocks(path, sorted(idx), rnd)
    return idx


class Pair:
    """A source disk and its replica on local paths, driven one cycle at a time."""

    def __init__(self, root: Path, disk: Path) -> None:
        self.disk = disk
        self.state = str(root / "src-state")
        self.rep = Replica(str(root / "replica" / "disk.img"), str(root / "replica" / "meta"))
        self.seq = 0

    def point(self, consistency: str = "crash", created_at: str | None = None) -> dict[str, Any]:
        self.seq += 1
        return {"id": f"vm@{self.seq}", "created_at": created_at or now_iso(), "consistency": consistency}

    def stream(self, mode: str = "delta", **kw: Any) -> tuple[bytes, dict[str, Any]]:
        buf = io.BytesIO()
        gen = None
        if mode == "delta":
            gen = bytes.fromhex(self.rep.status()["gen"])
        sent = send(str(self.disk), self.state, buf, mode=mode, expect_gen=gen, **kw)
        return buf.getvalue(), sent

    def cycle(self, mode: str = "delta", retention_hours: float = 24, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        data, sent = self.stream(mode, **kw)
        got = self.rep.receive(io.BytesIO(data), self.point(kw.get("consistency", "crash")), retention_hours)
        SourceState(self.state).commit(bytes.fromhex(sent["gen"]))
        return sent, got
