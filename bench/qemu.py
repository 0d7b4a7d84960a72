"""Changed-block tracking against the full-scan engine and rsync, on a disk of a running QEMU, in one run.

    python -m bench.qemu [--sizes 1,4,16] [--rounds 2] [--fraction 0.01] [--fixed-mib 64] [--dir DIR] [--out FILE]
    python -m bench.qemu --rpo [--rate 20] [--every 5] [--rpo-seconds 120] [--rpo-size 4]

Per size: a random raw image attached to a running QEMU (TCG, no guest kernel: the firmware idles, so the
machine runs and the capture's stop/cont window is real); an initial copy; then per round 1% of its 64 KiB
blocks rewritten with random bytes through the VM's device (HMP qemu-io, where a guest's writes go), and three ways to bring
a replica up to date, each with its own replica:
  cbt   a point-in-time view of the running VM and a delta that reads only the dirty bitmap's blocks
        (what the qemu backend does each cycle, capture and teardown included);
  scan  the full-scan engine over the image file (what the process backend does: reads and hashes it all);
  rsync rsync --inplace --no-whole-file of the image file.
Also the guest's pause per capture (the stop/cont window) and where a CBT cycle's time goes (capture,
send: extents, NBD reads and hashing, apply on the replica, teardown). Rounds alternate warm (the image
read into the page cache before each method) and cold (posix_fadvise(DONTNEED) on the image before each,
checked with fincore); rsync runs in the warm rounds only. Then one more cold round rewrites the same
--fixed-mib at every size: CBT's time should follow the change, not the disk. The load average is
recorded with every round (other sessions may share the machine). Writes results/qemu.json;
docs/BENCHMARKS.md quotes it.

--rpo: the sustained RPO instead. The guest writes --rate MB/s (1 MiB writes at random offsets through the
VM's device) while a cycle (capture, delta of the dirty blocks, apply, teardown) starts every --every
seconds; reports each cycle's time and the worst RPO (commit of a point minus the capture of the one
before), and checks the last replica against the disk. Writes results/qemu-rpo.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.replica import machine, rsync_run, timed, warm
from siterecovery.replica import nbd, qemu
from siterecovery.replica.engine import BLOCK, Replica, SourceState, file_digest, now_iso, send

ROOT = Path(__file__).resolve().parent.parent
MiB, GiB = 1 << 20, 1 << 30


def log(*a: object) -> None:
    print("#", *a, file=sys.stderr, flush=True)


def image(path: Path, size: int) -> None:
    """Random-looking, incompressible, every 64 KiB block distinct; fast (one random buffer, varied)."""
    base = bytearray(os.urandom(16 * MiB))
    with open(path, "wb") as f:
        for i in range(0, size, 16 * MiB):
            base[:8] = i.to_bytes(8, "little")
            for j in range(0, 16 * MiB, BLOCK):
                base[j:j + 8] = (i + j).to_bytes(8, "little")
            f.write(base[:min(16 * MiB, size - i)])


def write_sources(stem: Path, size: int, n: int = 64) -> list[Path]:
    """n files of `size` random (incompressible) bytes, <stem>.<i>: what the guest's writes write, one
    picked per write, so a slot written again gets new bytes (with one source it would get the bytes
    it already held, which no cycle needs to ship, and the bench would under-state the change)."""
    out = []
    for i in range(n):
        f = stem.with_name(f"{stem.name}.{i}")
        f.write_bytes(os.urandom(size))
        out.append(f)
    return out


def guest_writes(run: str, blocks: list[int], sources: list[Path]) -> None:
    """Rewrite these blocks through the VM's device, as a guest would (one QMP session), with random
    bytes (one of `sources` per block): incompressible, so compression hides none of the change."""
    from qemu.qmp import QMPClient

    async def go() -> None:
        c = QMPClient("bench")
        await c.connect(qemu.paths(run, "vm")["qmp"])
        try:
            for b in blocks:
                out = await c.execute("human-monitor-command", {
                    "command-line": f'qemu-io -d /machine/peripheral/vd0/virtio-backend "write -s {random.choice(sources)} {b * BLOCK} 64k"'})
                assert out == "", out
        finally:
            await c.disconnect()
    asyncio.run(go())


class Target:
    """A replica fed in-process (engine.send -> a stream file -> Replica.receive), with its own source
    state; with keep=False only the sender runs (the stream goes to /dev/null): the source's cost, for
    disks too large to hold three copies of here."""

    def __init__(self, work: Path, name: str, keep: bool = True) -> None:
        self.state = str(work / f"{name}-state")
        self.rep = Replica(str(work / f"{name}-replica.img"), str(work / f"{name}-meta")) if keep else None
        self.stream = work / f"{name}.stream"
        self.gen: bytes | None = None
        self.n = 0

    def cycle(self, disk: Path, mode: str, **kw: Any) -> dict[str, Any]:
        gen = self.gen if mode == "delta" else None
        with open(self.stream if self.rep else os.devnull, "wb") as out:
            sent = send(str(disk), self.state, out, mode=mode, expect_gen=gen, **kw)
        self.n += 1
        if self.rep is not None:
            with open(self.stream, "rb") as inp:
                self.rep.receive(inp, {"id": f"b@{self.n}", "created_at": now_iso(), "consistency": "crash"}, 0)
            self.stream.unlink()
        self.gen = bytes.fromhex(sent["gen"])
        SourceState(self.state).commit(self.gen)
        return sent


class Phases:
    """Where a CBT cycle's time goes: wall-clock seconds per phase, and the seconds send() spent waiting
    for NBD replies (the reads) and asking for the bitmap's extents."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.real_reply = nbd.NBDClient._read_reply
        self.real_extents = nbd.NBDClient.extents
        phases = self

        def reply(client: nbd.NBDClient, inflight: Any) -> None:
            t = time.perf_counter()
            try:
                phases.real_reply(client, inflight)
            finally:
                phases.add("nbd_wait", time.perf_counter() - t)

        def extents(client: nbd.NBDClient, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                yield from phases.real_extents(client, *a, **k)
            finally:
                phases.add("extents", time.perf_counter() - t)
        self.reply, self.extents = reply, extents

    def add(self, k: str, dt: float) -> None:
        self.t[k] = self.t.get(k, 0.0) + dt

    def __enter__(self) -> Phases:
        setattr(nbd.NBDClient, "_read_reply", self.reply)  # noqa: B010 - patched for the measure only
        setattr(nbd.NBDClient, "extents", self.extents)  # noqa: B010
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(nbd.NBDClient, "_read_reply", self.real_reply)  # noqa: B010
        setattr(nbd.NBDClient, "extents", self.real_extents)  # noqa: B010


def cbt_cycle(run: str, target: Target, disk: Path, prev: str, tag: str,
              phases: Phases | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One qemu-backend cycle: a point-in-time view of the running VM, a delta reading only the dirty
    bitmap's blocks, the view torn down; (what was sent, the view)."""
    ph = phases or Phases()
    t = time.perf_counter()
    view = qemu.capture(run, "vm", [{"node": "d0", "format": "raw", "prev": prev}], tag)
    ph.add("capture", time.perf_counter() - t)
    d = view["disks"][0]
    try:
        with ph:
            t = time.perf_counter()
            sent = target.cycle(disk, "delta", nbd={"socket": view["socket"], "export": d["export"],
                                                    "bitmap": f"qemu:dirty-bitmap:{d['bitmap']}"})
            ph.add("send_and_apply", time.perf_counter() - t)
            ph.add("send", sent["send_seconds"])
    finally:
        t = time.perf_counter()
        qemu.release(run, "vm", view, ok=True)
        ph.add("release", time.perf_counter() - t)
    return sent, view


def warm_cache(path: Path) -> float:
    warm(path)
    return resident(path)


def drop_cache(path: Path) -> float:
    """Evict the file from the page cache (posix_fadvise DONTNEED after a sync); the fraction of it still
    resident afterwards (util-linux fincore, which asks mincore; -1 without it), so "cold" is checked."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident(path)


def resident(path: Path) -> float:
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0]) / max(1, path.stat().st_size)
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return -1.0


def git_commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+changes" if dirty else "")


def load() -> float:
    return round(os.getloadavg()[0], 1)


def bench_size(work: Path, size: int, rounds: int, fraction: float, keep: bool, with_rsync: bool = True,
               fixed_mib: float = 0) -> dict[str, Any]:
    disk = work / "disk.img"
    if disk.exists() and disk.stat().st_size == size:
        log(f"{size / GiB:g} GiB: reusing the image left in {work}")
    else:
        log(f"{size / GiB:g} GiB: writing the image")
        image(disk, size)
    run = str(work / "run")
    qemu.start(run, "vm", {"accel": "tcg", "memory_mb": 64, "disks": [{"path": str(disk), "format": "raw"}]})
    try:
        cbt, scan = Target(work, "cbt", keep), Target(work, "scan", keep)
        log("initial copies")
        v = qemu.capture(run, "vm", [{"node": "d0", "format": "raw", "prev": None}], "i")
        t_init, _ = timed(lambda: cbt.cycle(disk, "full", nbd={"socket": v["socket"], "export": v["disks"][0]["export"]}))
        qemu.release(run, "vm", v, ok=True)
        prev = v["disks"][0]["new_bitmap"]
        scan.cycle(disk, "full")
        rs = work / "rsync-copy.img"
        if with_rsync:
            shutil.copyfile(disk, rs)
        rnd = random.Random()  # fresh changes every run: a reused image must not get its old bytes again
        sources = write_sources(work / "block", BLOCK)
        nblocks = size // BLOCK
        runs = []
        # Rounds alternate warm (the image in the page cache for both methods) and cold (dropped before
        # each); then one cold round of a fixed size. Both methods bring their replica over the same change.
        plan = [(f"{fraction:.0%}", max(1, int(nblocks * fraction)), r % 2 == 0) for r in range(rounds)]
        if fixed_mib:
            plan.append((f"{fixed_mib:g} MiB", int(fixed_mib * MiB) // BLOCK, False))
        same = True
        last_rsync = max((r for r, (_, _, w) in enumerate(plan) if w), default=-1) if with_rsync else -1
        for r, (kind, count, is_warm) in enumerate(plan):
            blocks = rnd.sample(range(nblocks), count)
            guest_writes(run, blocks, sources)
            load0 = load()
            cache = warm_cache(disk) if is_warm else drop_cache(disk)
            ph = Phases()
            t0 = time.perf_counter()
            s_cbt, view = cbt_cycle(run, cbt, disk, prev, f"r{r}", ph)
            t_cbt = time.perf_counter() - t0
            prev = view["disks"][0]["new_bitmap"]
            assert s_cbt["cbt"], s_cbt
            cache_scan = warm_cache(disk) if is_warm else drop_cache(disk)
            t_scan, s_scan = timed(lambda: scan.cycle(disk, "delta"))
            assert s_cbt["blocks"] == s_scan["blocks"] <= len(blocks), (s_cbt, s_scan)  # the same changes
            row: dict[str, Any] = {
                "changed": kind, "cache": "warm" if is_warm else "cold", "resident": [round(cache, 3), round(cache_scan, 3)],
                "cbt_s": round(t_cbt, 3), "scan_s": round(t_scan, 3), "scan_over_cbt": round(t_scan / t_cbt, 1),
                "pause_s": view["window_seconds"], "changed_bytes": len(blocks) * BLOCK,
                "cbt_bytes": s_cbt["bytes"], "scan_bytes": s_scan["bytes"],
                "cbt_phases_s": {k: round(v, 3) for k, v in ph.t.items()}}
            if r <= last_rsync and is_warm:
                warm(disk)
                warm(rs)
                t_rs, st = rsync_run([str(disk), str(rs)])
                row.update(rsync_s=round(t_rs, 3), rsync_over_cbt=round(t_rs / t_cbt, 1), rsync_sent=st.get("sent"))
                if r == last_rsync:
                    same = file_digest(str(disk)) == file_digest(str(rs))
            row["load"] = [load0, load()]
            runs.append(row)
            log(f"{size / GiB:g} GiB round {r}", runs[-1])
        if cbt.rep is not None and scan.rep is not None:
            same = same and file_digest(cbt.rep.path) == file_digest(scan.rep.path) == file_digest(str(disk))
        assert same, "the replicas differ"
        return {"size": size, "replicas": keep, "initial_cbt_s": round(t_init, 2), "initial_MBps": round(size / t_init / 1e6, 1),
                "runs": runs, "replicas_identical": same}
    finally:
        qemu.stop(run, "vm", 0)
        for p in list(work.iterdir()):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()


class SteadyWriter:
    """A guest writing at a steady rate: 1 MiB writes at random 1 MiB-aligned offsets through the VM's
    device (HMP qemu-io on a second QMP monitor, so the capture's own QMP session is never kept waiting)."""

    def __init__(self, sock: str, size: int, rate_mbps: float, source: Path, seed: int = 7) -> None:
        import threading

        self.sock, self.size, self.interval = sock, size, 1.0 / max(rate_mbps, 0.1)
        # Incompressible, and new bytes at every write: compression cannot hide the volume from the
        # transfer (with one source, a third of a 2-minute run's writes needed no shipping).
        self.sources = write_sources(source, MiB)
        self.rnd = random.Random(seed)
        self.written = 0
        self.late = 0.0  # seconds the writer fell behind its schedule (the machine could not keep up)
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="bench-writer")

    def _run(self) -> None:
        from qemu.qmp import QMPClient

        async def go() -> None:
            c = QMPClient("bench-writer")
            await c.connect(self.sock)
            try:
                due = time.monotonic()
                while not self.halt.is_set():
                    off = self.rnd.randrange(self.size // MiB) * MiB
                    src = self.rnd.choice(self.sources)
                    out = await c.execute("human-monitor-command", {
                        "command-line": f'qemu-io -d /machine/peripheral/vd0/virtio-backend "write -s {src} {off} 1M"'})
                    assert out == "", out
                    self.written += MiB
                    due += self.interval
                    lag = due - time.monotonic()
                    if lag > 0:
                        await asyncio.sleep(lag)
                    else:
                        self.late = max(self.late, -lag)
            finally:
                await c.disconnect()
        try:
            asyncio.run(go())
        except BaseException as exc:  # noqa: BLE001 - reported by the bench
            self.error = exc


def bench_rpo(work: Path, size: int, seconds: float, rate_mbps: float, every: float) -> dict[str, Any]:
    """Sustained RPO: the guest writes `rate_mbps` MB/s while a cycle starts every `every` seconds (or at
    once when the previous one overran). RPO at a moment is its distance to the capture of the newest
    committed point; its worst case is just before a commit: commit(k) - capture(k-1)."""
    disk = work / "rpo-disk.img"
    image(disk, size)
    run = str(work / "rpo-run")
    writer_sock = str(work / "rpo-writer.sock")
    qemu.start(run, "vm", {"accel": "tcg", "memory_mb": 64, "disks": [{"path": str(disk), "format": "raw"}],
                           "args": ["-qmp", f"unix:{writer_sock},server=on,wait=off"]})
    try:
        rep = Target(work, "rpo")
        v = qemu.capture(run, "vm", [{"node": "d0", "format": "raw", "prev": None}], "i")
        rep.cycle(disk, "full", nbd={"socket": v["socket"], "export": v["disks"][0]["export"]})
        qemu.release(run, "vm", v, ok=True)
        prev, last_capture = v["disks"][0]["new_bitmap"], time.monotonic()
        w = SteadyWriter(writer_sock, size, rate_mbps, work / "rpo-writes.bin")
        w.thread.start()
        cycles: list[dict[str, Any]] = []
        t0 = time.monotonic()
        nxt = t0 + every
        while time.monotonic() - t0 < seconds and w.error is None:
            time.sleep(max(0.0, nxt - time.monotonic()))
            t_cap = time.monotonic()
            ph = Phases()
            sent, view = cbt_cycle(run, rep, disk, prev, f"c{len(cycles)}", ph)
            t_commit = time.monotonic()
            prev = view["disks"][0]["new_bitmap"]
            cycles.append({"cycle_s": round(t_commit - t_cap, 2), "rpo_before_commit_s": round(t_commit - last_capture, 2),
                           "bytes": sent["bytes"], "blocks": sent.get("blocks"), "pause_s": view["window_seconds"],
                           "phases_s": {k: round(v, 3) for k, v in ph.t.items()}, "load": load()})
            log("rpo cycle", cycles[-1])
            last_capture = t_cap
            nxt = max(t_cap + every, time.monotonic())
        w.halt.set()
        w.thread.join(30)
        if w.error is not None:
            raise w.error
        wrote_s = time.monotonic() - t0
        # The replica of a last point taken with the writer stopped equals the disk.
        cbt_cycle(run, rep, disk, prev, "last")
        assert rep.rep is not None
        same = file_digest(rep.rep.path) == file_digest(str(disk))
        assert same, "the replica differs from the disk"
        rpos = sorted(c["rpo_before_commit_s"] for c in cycles)
        return {"size": size, "seconds": round(wrote_s, 1), "target_MBps": rate_mbps,
                "written_MBps": round(w.written / wrote_s / 1e6, 1), "writer_fell_behind_s": round(w.late, 2),
                "cycle_every_s": every, "cycles": len(cycles),
                "sent_MBps": round(sum(c["bytes"] for c in cycles) / wrote_s / 1e6, 1),
                "cycle_s_mean": round(sum(c["cycle_s"] for c in cycles) / max(1, len(cycles)), 2),
                "cycle_s_max": max((c["cycle_s"] for c in cycles), default=None),
                "rpo_s_median": rpos[len(rpos) // 2] if rpos else None,
                "rpo_s_p95": rpos[min(len(rpos) - 1, int(len(rpos) * 0.95))] if rpos else None,
                "rpo_s_max": rpos[-1] if rpos else None,
                "pause_s_max": max((c["pause_s"] for c in cycles if c["pause_s"] is not None), default=None),
                "replica_identical": same, "runs": cycles}
    finally:
        qemu.stop(run, "vm", 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.qemu")
    ap.add_argument("--sizes", default="1,4,16", help="GiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--fixed-mib", type=float, default=64, help="one more round rewriting this much at every size (0: none)")
    ap.add_argument("--send-only-above", type=float, default=8,
                    help="GiB: larger disks measure the senders only (no replicas: disk space)")
    ap.add_argument("--rsync-max", type=float, default=1e9, help="GiB: skip rsync for larger disks (its copy's space and time)")
    ap.add_argument("--dir", default=None, help="scratch directory (needs 3x the largest size free)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "qemu.json"))
    ap.add_argument("--rpo", action="store_true", help="measure the sustained RPO instead (results/qemu-rpo.json)")
    ap.add_argument("--rpo-size", type=float, default=4, help="GiB, with --rpo")
    ap.add_argument("--rpo-seconds", type=float, default=120, help="how long the guest writes, with --rpo")
    ap.add_argument("--rate", type=float, default=20, help="MB/s the guest writes, with --rpo")
    ap.add_argument("--every", type=float, default=5, help="seconds between cycles, with --rpo")
    a = ap.parse_args(argv)
    work = Path(a.dir or tempfile.mkdtemp(prefix="sr-bench-qemu-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"machine": machine(), "command": "python -m bench.qemu " + " ".join(argv or sys.argv[1:]),
                           "commit": git_commit(), "load_at_start": load(), "sizes": []}
    t0 = time.time()
    if a.rpo:
        out = a.out if a.out != ap.get_default("out") else str(ROOT / "bench" / "results" / "qemu-rpo.json")
        try:
            res["rpo"] = bench_rpo(work, int(a.rpo_size * GiB), a.rpo_seconds, a.rate, a.every)
        finally:
            if not a.dir:
                shutil.rmtree(work, ignore_errors=True)
        res["wall_s"] = round(time.time() - t0, 1)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({k: v for k, v in res["rpo"].items() if k != "runs"}, indent=1))
        return 0
    try:
        for s in a.sizes.split(","):
            res["sizes"].append(bench_size(work, int(float(s) * GiB), a.rounds, a.fraction,
                                           keep=float(s) <= a.send_only_above, with_rsync=float(s) <= a.rsync_max,
                                           fixed_mib=a.fixed_mib))
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    res["wall_s"] = round(time.time() - t0, 1)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
