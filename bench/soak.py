"""Replication soak: 4 VMs replicated by the linux fabric over a real sshd every 5 s under write load,
then a planned failover of each; checks zero data loss and that memory, files, processes and SSH
sessions stay flat. `python -m bench.soak --seconds 600` (the recorded run, docs/RELIABILITY-replication.md);
tests/fabric/test_soak.py runs a short form in CI.

Each "VM" is a process-backend command that writes random records into its disk and stamps a counter
in block 0, so the planned failover (stop VM, final cycle) can be checked byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from siterecovery.fabric import FabricContext
from siterecovery.fabric.base import Placement, ReplicationState
from siterecovery.fabric.linux import LinuxFabric
from siterecovery.mapping import DiskPlacement, NICPlacement
from siterecovery.model import Compute, Host, ReplicationPolicy
from siterecovery.replica.engine import file_digest
from siterecovery.testing.disks import make_disk

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
S = ReplicationState

# The VM: `writer DISK RATE` writes 4-32 KiB of random bytes at random offsets RATE times a second and
# stamps "seq N" at offset 0 after each write (both through the page cache, as a guest would).
WRITER = r"""
import os, random, sys, time
disk, rate = sys.argv[1], float(sys.argv[2])
fd = os.open(disk, os.O_RDWR)
size = os.fstat(fd).st_size
rnd = random.Random()
n = 0
while True:
    n += 1
    ln = rnd.randrange(4096, 32768)
    os.pwrite(fd, rnd.randbytes(ln), rnd.randrange(65536, size - ln))
    os.pwrite(fd, b"seq %12d\n" % n, 0)
    time.sleep(1 / rate)
"""


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (sshd's connection and session children, agents, shells)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                kids.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def agents(marker: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"siterecovery.replica.agent" in cmd and marker.encode() in cmd:
                found.append(int(d))
    return found


def stray_files(*roots: Path) -> list[str]:
    """Files a cycle should never leave behind: staging, journals, temporaries, clones, partial copies."""
    bad = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if (name.startswith(("staging", "journal")) or name.endswith((".tmp", ".partial", ".cycle"))
                        or name in ("view.img", "manifest.new", "base.manifest.tmp")):
                    bad.append(os.path.join(dirpath, name))
    return bad


def count_files(*roots: Path) -> int:
    return sum(len(files) for root in roots for _d, _s, files in os.walk(root))


def placement(vm: str, a: Host, b: Host, disk: Path, rate: float, interval: int) -> Placement:
    return Placement(
        vm=vm, pairing="soak", source=a, target=b,
        policy=ReplicationPolicy(name="soak", copy_frequency_seconds=interval,
                                  recovery_history_hours=0),  # newest point only: files reach a steady state
        disks=(DiskPlacement(disk="os", source_path=str(disk), target_location=None, classification=None),),
        nics=(NICPlacement(nic="eth0", source_network="prod", target_network="dr", target_subnet=None, ip=None),),
        compute=Compute(backend="process", command=(sys.executable, "-c", WRITER, "{{ disk }}", str(rate))),
    )


def run_soak(seconds: float, work: Path, vms: int = 4, interval: int = 5, size: int = 32 * MiB,
             rate: float = 5.0, log: Any = print) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from sshd import running_sshd  # the same real sshd the tests use

    work.mkdir(parents=True, exist_ok=True)
    marker = str(work)
    out: dict[str, Any] = {"vms": vms, "interval_s": interval, "seconds": seconds, "disk_mib": size // MiB,
                           "write_rate_per_s": rate, "started": datetime.now(UTC).isoformat(timespec="seconds")}
    with running_sshd() as srv:
        sshd_pid = _sshd_pid(str(srv.dir / "sshd_config"))
        a = srv.host("ny-h1", "ny", root=str(work / "root-a"))
        b = srv.host("chi-h1", "chi", root=str(work / "root-b"))
        f = LinuxFabric(FabricContext(state_dir=work / "state", options={"python": sys.executable, "stop_grace": 5}))
        ps = []
        for i in range(vms):
            disk = work / "disks" / f"vm-{i + 1}.img"
            make_disk(disk, size, every=4)
            ps.append(placement(f"vm-{i + 1}", a, b, disk, rate, interval))
        roots = (work / "root-a", work / "root-b", work / "state")
        try:
            out.update(_soak(f, ps, a, roots, sshd_pid, marker, seconds, interval, log))
        finally:
            # Interrupted or failed: no writer VM may outlive the soak (the planned failover stops them).
            for p in ps:
                with contextlib.suppress(Exception):
                    f.stop_vm(p, side="source")
            f.close()
    return out


def _soak(f: LinuxFabric, ps: list[Placement], a: Host, roots: tuple[Path, ...], sshd_pid: int, marker: str,
          seconds: float, interval: int, log: Any) -> dict[str, Any]:
    work = roots[0].parent
    out: dict[str, Any] = {}
    for p in ps:
        f.enable_replication(p)
        f.start_initial_replication(p)
        f.start_vm(p, side="source")  # the writer starts: load from here on
    base = {"rss_kib": rss_kib(), "fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "sshd_children": len(descendants(sshd_pid)) if sshd_pid else None}
    samples: list[dict[str, Any]] = []
    cycles = failures = 0
    shipped = 0
    errors: list[str] = []
    files_mid = 0
    t0 = time.monotonic()
    tick = 0
    # The replicate flow's shape: one delta cycle per VM per tick, at most max_active_transfers
    # (3) transfers from one source host at once.
    with ThreadPoolExecutor(max_workers=a.max_active_transfers) as pool:
        while time.monotonic() - t0 < seconds:
            start = time.monotonic()
            results = list(pool.map(lambda p: _one(f, p), ps))
            for ok, n, err in results:
                cycles += 1
                shipped += n
                if not ok:
                    failures += 1
                    errors.append(err)
            tick += 1
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_kib": rss_kib(),
                            "fds": len(os.listdir("/proc/self/fd")),
                            "sshd_children": len(descendants(sshd_pid)) if sshd_pid else None,
                            "files": count_files(*roots), "tick_s": round(time.monotonic() - start, 2)})
            if not files_mid and time.monotonic() - t0 >= seconds / 2:
                files_mid = samples[-1]["files"]
            time.sleep(max(0.0, interval - (time.monotonic() - start)))
    log(f"soak: {cycles} cycles in {tick} ticks, {failures} failed, {shipped / MiB:.0f} MiB shipped")
    # Planned failover of every VM: stop the writer, ship the last changes, fail over.
    lost = []
    stamps = []
    for p in ps:
        prep = f.prepare_planned_failover(p)
        assert prep.state == S.PreparedForFailover, prep
        fo = f.failover(p)
        assert fo.state == S.FailedOverWaitingCompletion, fo
        src = p.disks[0].source_path
        rep = work / "root-b" / p.vm / "replica" / "os.img"
        with open(src, "rb") as sf, open(rep, "rb") as rf:
            last, got = sf.read(17), rf.read(17)
        stamps.append(last.decode().strip())
        if file_digest(src) != file_digest(str(rep)) or last != got:
            lost.append(p.vm)
        f.commit_failover(p)
    f.close()  # reconnects if used again (the cleanup's stop_vm finds the writers already stopped)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ((sshd_pid and descendants(sshd_pid)) or agents(marker)):
        time.sleep(0.2)
    end = {"rss_kib": rss_kib(), "fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
           "sshd_children": len(descendants(sshd_pid)) if sshd_pid else None}
    out.update({
        "cycles": cycles, "ticks": tick, "failed_cycles": failures, "errors": errors[:5],
        "shipped_mib": round(shipped / MiB, 1), "vms_with_data_lost": lost, "last_stamps": stamps,
        "rss_kib": {"start": base["rss_kib"], "end_before_close": samples[-1]["rss_kib"] if samples else None,
                    "peak": max(s["rss_kib"] for s in samples) if samples else None, "after_close": end["rss_kib"]},
        "fds": {"start": base["fds"], "peak": max(s["fds"] for s in samples) if samples else None,
                "after_close": end["fds"]},
        "sshd_children": {"during": base["sshd_children"],
                          "peak": max(s["sshd_children"] or 0 for s in samples) if samples else None,
                          "after_close": end["sshd_children"]},
        "threads": {"start": base["threads"], "after_close": end["threads"]},
        "files": {"mid": files_mid, "end": samples[-1]["files"] if samples else None},
        "stray_files": stray_files(*roots), "stray_agents": agents(marker),
        "max_tick_s": max(s["tick_s"] for s in samples) if samples else None,
        "rss_samples_kib": [s["rss_kib"] for s in samples][:: max(1, len(samples) // 24)],
    })
    return out


def _sshd_pid(config: str) -> int:
    """The listening sshd started with `config` (its connection children are counted as SSH sessions)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ")
            except OSError:
                continue
            # newer sshd retitles its listener ("sshd: /usr/sbin/sshd -D ... [listener]"): match the text
            if b"sshd" in cmd and config.encode() in cmd:
                return int(d)
    return 0


def _one(f: LinuxFabric, p: Placement) -> tuple[bool, int, str]:
    try:
        r = f.replicate(p)
        return True, r.bytes_sent, ""
    except Exception as exc:  # noqa: BLE001 - a soak counts failures, it does not stop at the first
        return False, 0, f"{p.vm}: {exc}"[:300]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    a = ap.parse_args(argv)
    import signal
    import tempfile

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds: writers stopped, sshd terminated

    signal.signal(signal.SIGTERM, stop)
    work = Path(a.work or tempfile.mkdtemp(prefix="sr-soak-"))
    res = run_soak(a.seconds, work, vms=a.vms, interval=a.interval)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "rss_samples_kib"}, indent=2))
    ok = not res["vms_with_data_lost"] and not res["failed_cycles"] and not res["stray_files"] and not res["stray_agents"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
