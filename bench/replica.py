"""Benchmarks of the block replication engine against rsync, on this machine, in one run.

    python -m bench.replica [local|ssh|direct|rss|crash|sustained|all] [--dir DIR] [--size-gib 2] [--out FILE]
    python -m bench.replica tput [--reps 5] [--before OTHER_CHECKOUT/src]   (SSH initial copy vs OpenSSH, rsync)
    python -m bench.replica cap [--cap-mbps 16 80] [--cap-mib 32]   (bandwidth cap: achieved rate, rsync --bwlimit)
    python -m bench.replica reverse [--size-gib 2]   (reverse replication: no block compare against block compare)

Each part prints one JSON object and `all` writes bench/results/replica.json, from which
docs/BENCHMARKS.md quotes. Timings are wall clock on a warm page cache for both tools alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from siterecovery.render import sh_join
from siterecovery.replica.engine import BLOCK, file_digest
from siterecovery.replica.orchestrator.endpoints import Endpoint, LocalEndpoint, SSHEndpoint
from siterecovery.replica.orchestrator.transfer import send_to_args, transfer, transfer_direct
from siterecovery.replica.selfcheck import crash_trials
from siterecovery.testing.disks import rewrite_random

ROOT = Path(__file__).resolve().parent.parent
MiB, GiB = 1024 * 1024, 1024 * 1024 * 1024


def log(*a: object) -> None:
    print("#", *a, file=sys.stderr, flush=True)


def machine() -> dict[str, str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    free = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.rstrip()
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "free_h": free,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "python": sys.version.split()[0],
            "rsync": subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.split("\n")[0]}


def random_image(path: Path, size: int, seed: int = 1) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(rnd.randbytes(n))
            left -= n


def rewrite(path: Path, fraction: float, seed: int) -> int:
    """Rewrite `fraction` of the 64 KiB blocks at random; bytes changed."""
    return rewrite_random(path, int(os.path.getsize(path) // BLOCK * fraction), random.Random(seed))


def warm(path: Path) -> None:
    """Flush dirty pages (so neither tool pays for the other's writeback) and read the file into cache."""
    os.sync()
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


class Cycle:
    """A source image and its replica, driven through the same transfer() the linux fabric uses."""

    def __init__(self, src: Endpoint, dst: Endpoint, disk: Path, work: Path, remote_work: Path | None = None,
                 peer: dict[str, Any] | None = None, send_extra: tuple[str, ...] = ()) -> None:
        self.src, self.dst, self.disk, self.send_extra = src, dst, disk, send_extra
        self.peer = peer  # send_to_args' keywords: the source host sends to the target over its own ssh
        w = remote_work or work
        self.state = str(work / "src-state")
        self.rep = ["--replica", str(w / "replica.img"), "--meta", str(w / "replica-meta")]
        self.gen: str | None = None
        self.n = 0

    def run(self, mode: str) -> dict[str, Any]:
        self.n += 1
        point = {"id": f"b@{self.n}", "created_at": datetime.now(UTC).isoformat(), "consistency": "crash"}
        send = ["send", "--disk", str(self.disk), "--state", self.state, "--mode", mode, *self.send_extra]
        if mode == "delta":
            assert self.gen
            send += ["--expect-gen", self.gen]
        recv = ["receive", *self.rep, "--point", json.dumps(point), "--retention-hours", "0"]
        if self.peer is not None:
            assert isinstance(self.src, SSHEndpoint) and isinstance(self.dst, SSHEndpoint)
            sent, got = transfer_direct(self.src, send_to_args(send, self.src, self.dst, recv, **self.peer))
        else:
            sent, got = transfer(self.src, send, self.dst, recv)
        self.gen = got["point"]["gen"]
        return {**sent, **got}


def rsync_run(args: list[str]) -> tuple[float, dict[str, int]]:
    t, r = timed(lambda: subprocess.run(["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats", *args],
                                        capture_output=True, text=True, check=True))
    stats = {}
    for key, name in (("Total bytes sent", "sent"), ("Literal data", "literal")):
        m = re.search(rf"{key}: ([\d,]+)", r.stdout)
        if m:
            stats[name] = int(m.group(1).replace(",", ""))
    return t, stats


def bench_local(work: Path, size: int, rounds: int = 3) -> dict[str, Any]:
    disk = work / "local-src.img"
    log(f"local: writing a {size // GiB} GiB random image")
    random_image(disk, size)
    c = Cycle(LocalEndpoint(), LocalEndpoint(), disk, work / "local")
    (work / "local").mkdir(exist_ok=True)
    t_full, full = timed(lambda: c.run("full"))
    rs = work / "rsync-copy.img"
    shutil.copyfile(disk, rs)
    runs = []
    for r in range(rounds):
        changed = rewrite(disk, 0.01, seed=100 + r)
        warm(disk)
        warm(rs)
        t_eng, out = timed(lambda: c.run("delta"))
        warm(disk)
        t_rs, st = rsync_run([str(disk), str(rs)])
        runs.append({"engine_s": round(t_eng, 3), "rsync_s": round(t_rs, 3), "ratio": round(t_rs / t_eng, 2),
                     "changed_bytes": changed, "engine_bytes": out["bytes"], "rsync_sent": st.get("sent"),
                     "overhead_pct": round(100 * (out["bytes"] - changed) / changed, 3)})
        log("local round", runs[-1])
    assert file_digest(str(work / "local" / "replica.img")) == file_digest(str(disk)) == file_digest(str(rs))
    med = sorted(runs, key=lambda x: x["ratio"])[len(runs) // 2]
    return {"size": size, "initial_s": round(t_full, 2), "initial_MBps": round(size / t_full / 1e6, 1),
            "runs": runs, "median": med}


def bench_ssh(work: Path, size: int, rounds: int = 3) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from sshd import running_sshd  # the same real sshd the tests use

    disk = work / "ssh-src.img"
    log(f"ssh: writing a {size // GiB} GiB random (incompressible) image")
    random_image(disk, size, seed=3)
    remote = work / "ssh-remote"
    remote.mkdir(exist_ok=True)
    with running_sshd() as srv:
        host = srv.host("target", "chi", root=str(remote))
        dst = _endpoint("target", host)
        cipher = dst.pool.client(host).get_transport().remote_cipher  # type: ignore[union-attr]
        c = Cycle(LocalEndpoint(), dst, disk, work / "ssh-local", remote)
        (work / "ssh-local").mkdir(exist_ok=True)
        warm(disk)
        t_full, full = timed(lambda: c.run("full"))
        log(f"ssh initial {size / t_full / 1e6:.0f} MB/s")
        # both sides remote: the orchestrator only relays bytes between two exec channels
        src_remote = _endpoint("source", host)
        relay_dir = work / "ssh-relay"
        relay_dir.mkdir(exist_ok=True)
        c2 = Cycle(src_remote, dst, disk, relay_dir)
        t_relay, _ = timed(lambda: c2.run("full"))
        log(f"ssh relay initial {size / t_relay / 1e6:.0f} MB/s")
        shutil.rmtree(relay_dir)
        rs = remote / "rsync-copy.img"
        shutil.copyfile(disk, rs)
        e = sh_join(["ssh", "-p", str(srv.port), "-i", str(srv.client_key), "-o", f"UserKnownHostsFile={srv.known_hosts}",
                     "-o", "BatchMode=yes", "-c", "aes128-gcm@openssh.com"])
        runs = []
        for r in range(rounds):
            changed = rewrite(disk, 0.01, seed=200 + r)
            warm(disk)
            warm(rs)
            t_eng, out = timed(lambda: c.run("delta"))
            warm(disk)
            t_rs, st = rsync_run(["-e", e, str(disk), f"{srv.user}@127.0.0.1:{rs}"])
            runs.append({"engine_s": round(t_eng, 3), "rsync_s": round(t_rs, 3), "ratio": round(t_rs / t_eng, 2),
                         "changed_bytes": changed, "engine_bytes": out["bytes"], "rsync_sent": st.get("sent")})
            log("ssh round", runs[-1])
        assert file_digest(str(remote / "replica.img")) == file_digest(str(disk)) == file_digest(str(rs))
        dst.pool.close()
        src_remote.pool.close()
    med = sorted(runs, key=lambda x: x["ratio"])[len(runs) // 2]
    return {"size": size, "cipher": cipher, "initial_s": round(t_full, 2), "initial_MBps": round(size / t_full / 1e6, 1),
            "relay_initial_MBps": round(size / t_relay / 1e6, 1), "runs": runs, "median": med}


def _endpoint(name: str, host: Any, env: dict[str, str] | None = None) -> SSHEndpoint:
    """An agent over SSH with a pool of its own: source and target on one sshd still get a connection
    each, as two hosts would."""
    from siterecovery import ssh
    return SSHEndpoint(name=name, pool=ssh.Pool(), host=host, python=sys.executable, env=env or {})


def _sock_bytes(*clients: Any) -> int:
    """Bytes the kernel moved over these paramiko clients' sockets (TCP_INFO bytes_acked + bytes_received)."""
    import socket
    import struct
    total = 0
    for c in clients:
        info = c.get_transport().sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        total += sum(struct.unpack_from("<QQ", info, 120))
    return total


def _cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_direct(work: Path, size: int, rounds: int = 3) -> dict[str, Any]:
    """Both hosts remote: the orchestrator relaying between two exec channels against the source host
    sending to the target over its own OpenSSH client (peer_ssh), alternating, in the same run.
    Per run: wall time, bytes over the orchestrator's sockets, CPU seconds of the orchestrator process."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sshd import running_sshd

    disk = work / "direct-src.img"
    log(f"direct: writing a {size / GiB:g} GiB random (incompressible) image")
    random_image(disk, size, seed=4)
    with running_sshd() as srv:
        host = srv.host("target", "chi", root=str(work))
        peer = srv.peer_ssh(work / "peer-keys")
        src, dst = _endpoint("source", host), _endpoint("target", host)
        kw = {"address": "127.0.0.1", "port": srv.port, "user": srv.user, **peer}
        cycles = {}
        for name in ("relay", "peer"):
            (work / f"direct-{name}").mkdir(exist_ok=True)
            cycles[name] = Cycle(src, dst, disk, work / f"direct-{name}", peer=kw if name == "peer" else None)

        def one(name: str, mode: str) -> dict[str, Any]:
            b0, c0 = _sock_bytes(src.pool.client(host), dst.pool.client(host)), _cpu()
            t, out = timed(lambda: cycles[name].run(mode))
            return {"s": round(t, 3), "orch_kB": round((_sock_bytes(src.pool.client(host), dst.pool.client(host)) - b0) / 1e3),
                    "orch_cpu_s": round(_cpu() - c0, 2), "bytes": out["bytes"]}

        runs: dict[str, list[dict[str, Any]]] = {"full": [], "delta": []}
        warm(disk)
        order = ("relay", "peer")
        for mode in ("full", "delta"):
            for r in range(1 if mode == "full" else rounds):
                if mode == "delta":
                    rewrite(disk, 0.01, seed=300 + r)
                    warm(disk)
                row: dict[str, Any] = {}
                for name in order if r % 2 == 0 else order[::-1]:
                    row[name] = one(name, mode)
                row["relay_over_peer"] = round(row["relay"]["s"] / row["peer"]["s"], 2)
                runs[mode].append(row)
                log(f"direct {mode}", row)
        for name in ("relay", "peer"):
            assert file_digest(str(work / f"direct-{name}" / "replica.img")) == file_digest(str(disk))
        src.pool.close()
        dst.pool.close()
    ratios = sorted(x["relay_over_peer"] for x in runs["delta"])
    return {"size": size, "full": runs["full"][0], "delta": runs["delta"], "delta_median_ratio": ratios[len(ratios) // 2],
            "full_relay_MBps": round(size / runs["full"][0]["relay"]["s"] / 1e6, 1),
            "full_peer_MBps": round(size / runs["full"][0]["peer"]["s"] / 1e6, 1)}


def bench_cap(work: Path, caps_mbps: list[float], each: int, disks: int = 3) -> dict[str, Any]:
    """The bandwidth cap over real sshd: `disks` full copies at once from one source host sharing its
    token bucket (the agent's --bandwidth/--bandwidth-bucket, as the linux fabric passes them), on the
    orchestrator relay and on the host-to-host path (peer_ssh); achieved rate = stream bytes / wall time
    of the whole batch (SSH exec setup and hashing included). Reference in the same run: one rsync -e ssh
    with --bwlimit at the same cap copying the same files, and the engine uncapped."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sshd import running_sshd

    images = [work / f"cap-{i}.img" for i in range(disks)]
    for i, img in enumerate(images):
        random_image(img, each, seed=40 + i)  # random: zstd cannot shrink it, stream bytes ~ disk bytes
    rows: list[dict[str, Any]] = []
    with running_sshd() as srv:
        host = srv.host("target", "chi", root=str(work))
        peer = srv.peer_ssh(work / "peer-keys")
        src, dst = _endpoint("source", host), _endpoint("target", host)
        kw = {"address": "127.0.0.1", "port": srv.port, "user": srv.user, **peer}

        def batch(path: str, cap: float | None) -> dict[str, Any]:
            extra = ("--bandwidth", str(cap * 1e6 / 8), "--bandwidth-bucket", str(work / "bandwidth.bucket")) if cap else ()
            cycles = []
            for i, img in enumerate(images):
                d = work / f"cap-{path}-{cap}-{i}"
                d.mkdir(exist_ok=True)
                cycles.append(Cycle(src, dst, img, d, peer=kw if path == "peer" else None, send_extra=extra))
            outs: list[dict[str, Any]] = [{} for _ in cycles]

            def run(i: int) -> None:
                outs[i] = cycles[i].run("full")
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cycles))]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            total = sum(int(o["bytes"]) for o in outs)
            for i, img in enumerate(images):
                assert file_digest(str(work / f"cap-{path}-{cap}-{i}" / "replica.img")) == file_digest(str(img))
                shutil.rmtree(work / f"cap-{path}-{cap}-{i}")
            rate = total * 8 / wall / 1e6
            # The senders' own span: first send started to last send finished (no SSH exec setup, no
            # receiver's final fsync and apply): what the bucket governs.
            t_first = min(float(o["send_started"]) for o in outs)
            t_last = max(float(o["send_started"]) + float(o["send_seconds"]) for o in outs)
            data_rate = total * 8 / (t_last - t_first) / 1e6
            row = {"tool": f"engine {path}", "cap_mbps": cap, "bytes": total, "s": round(wall, 2),
                   "achieved_mbps": round(rate, 2), "of_cap": round(rate / cap, 3) if cap else None,
                   "send_s": round(t_last - t_first, 2), "send_mbps": round(data_rate, 2),
                   "send_of_cap": round(data_rate / cap, 3) if cap else None}
            log("cap", row)
            return row

        def rsync_ref(cap: float) -> dict[str, Any]:
            dest = work / "cap-rsync"
            dest.mkdir(exist_ok=True)
            e = sh_join(["ssh", "-p", str(srv.port), "-i", str(srv.client_key), "-o", f"UserKnownHostsFile={srv.known_hosts}",
                         "-o", "BatchMode=yes"])
            # --bwlimit is in units of 1024 bytes per second
            t, st = rsync_run(["-e", e, f"--bwlimit={cap * 1e6 / 8 / 1024:.0f}", *map(str, images),
                               f"{srv.user}@127.0.0.1:{dest}/"])
            shutil.rmtree(dest)
            sent = st.get("sent", disks * each)
            rate = sent * 8 / t / 1e6
            row = {"tool": "rsync --bwlimit", "cap_mbps": cap, "bytes": sent, "s": round(t, 2),
                   "achieved_mbps": round(rate, 2), "of_cap": round(rate / cap, 3)}
            log("cap", row)
            return row

        for img in images:
            warm(img)
        for path in ("relay", "peer"):
            rows.append(batch(path, None))
        for cap in caps_mbps:
            for path in ("relay", "peer"):
                rows.append(batch(path, cap))
            rows.append(rsync_ref(cap))
        src.pool.close()
        dst.pool.close()
    return {"disks": disks, "each": each, "rows": rows}


def _engine_copy_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One initial copy, local source -> target over SSH, run in a child process so that the code under
    test (orchestrator side and remote agent alike) comes from `spec["code"]` (PYTHONPATH)."""
    from siterecovery.model import Host
    host = Host.model_validate(spec["host"])
    env = {"PYTHONPATH": spec["code"]} if spec.get("code") else {}
    dst = _endpoint("target", host, env)
    t = dst.pool.client(host).get_transport()
    assert t is not None
    remote, state = Path(spec["remote"]), Path(spec["state"])
    shutil.rmtree(remote, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    remote.mkdir(parents=True)
    point = {"id": "t@1", "created_at": datetime.now(UTC).isoformat(), "consistency": "crash"}
    secs, _ = timed(lambda: transfer(LocalEndpoint(), ["send", "--disk", spec["disk"], "--state", str(state), "--mode", "full"],
                                     dst, ["receive", "--replica", str(remote / "replica.img"), "--meta", str(remote / "meta"),
                                           "--point", json.dumps(point)]))
    ok = file_digest(str(remote / "replica.img")) == spec["digest"]
    dst.pool.close()
    shutil.rmtree(remote, ignore_errors=True)
    return {"s": secs, "ok": ok, "cipher_out": t.local_cipher, "cipher_in": t.remote_cipher}


def bench_tput(work: Path, size: int, reps: int = 5, before: str | None = None) -> dict[str, Any]:
    """Initial copy of incompressible data over SSH on loopback against the OpenSSH ceiling
    (`ssh -c aes128-gcm@openssh.com host 'cat > /dev/null' < file`; also into a file with `dd conv=fsync`,
    as a replica is written) and `rsync -e ssh`, each repetition
    running every variant back to back (order rotated), so ratios compare figures from the same moment
    of a noisy machine. `before`: another checkout's src/ whose engine runs as a further variant."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sshd import running_sshd
    disk = work / "tput-src.img"
    if not disk.exists() or disk.stat().st_size != size:
        log(f"tput: writing a {size / GiB:g} GiB random (incompressible) image")
        random_image(disk, size, seed=4)
    digest = file_digest(str(disk))
    variants = ["openssh", "openssh-file", "rsync", "engine"] + (["engine-before"] if before else [])
    runs: list[dict[str, Any]] = []
    with running_sshd() as srv:
        host = srv.host("target", "chi", root=str(work / "tput-remote")).model_dump(mode="json")
        ssh_cmd = ["ssh", "-p", str(srv.port), "-i", str(srv.client_key), "-o", f"UserKnownHostsFile={srv.known_hosts}",
                   "-o", "BatchMode=yes", "-c", "aes128-gcm@openssh.com"]
        for rep in range(reps):
            row: dict[str, Any] = {}
            for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
                warm(disk)
                if v == "openssh":
                    with open(disk, "rb") as f:
                        secs, _ = timed(lambda f=f: subprocess.run([*ssh_cmd, "127.0.0.1", "cat > /dev/null"], stdin=f, check=True))
                elif v == "openssh-file":  # the same, written to a file and fsynced, as a replica is
                    dest = work / "tput-ssh-file.img"
                    with open(disk, "rb") as f:
                        secs, _ = timed(lambda f=f, dest=dest: subprocess.run(
                            [*ssh_cmd, "127.0.0.1", sh_join(["dd", f"of={dest}", "bs=1M", "conv=fsync", "status=none"])],
                            stdin=f, check=True))
                    assert dest.stat().st_size == size
                    dest.unlink()
                elif v == "rsync":
                    dest = work / "tput-rsync.img"
                    dest.unlink(missing_ok=True)
                    secs, _ = timed(lambda dest=dest: subprocess.run(
                        ["rsync", "--inplace", "-e", sh_join(ssh_cmd), str(disk), f"{srv.user}@127.0.0.1:{dest}"], check=True))
                    dest.unlink()
                else:
                    spec = {"host": host, "disk": str(disk), "digest": digest, "remote": str(work / "tput-remote"),
                            "state": str(work / "tput-state"), "code": before if v == "engine-before" else str(ROOT / "src")}
                    env = {**os.environ, "PYTHONPATH": f"{spec['code']}:{ROOT}"}
                    p = subprocess.run([sys.executable, "-m", "bench.replica", "tput-child", "--spec", json.dumps(spec)],
                                       env=env, cwd=ROOT, capture_output=True, text=True, check=True)
                    child = json.loads(p.stdout.strip().splitlines()[-1])
                    assert child["ok"], f"{v}: the replica differs from the source"
                    row["cipher"] = f"{child['cipher_out']} / {child['cipher_in']}"
                    secs = child["s"]
                row[v] = round(size / secs / 1e6, 1)
            for v in variants[1:]:
                row[f"{v}_ratio"] = round(row[v] / row["openssh"], 3)
            runs.append(row)
            log("tput rep", rep + 1, row)

    def med(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else round((xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2, 3)

    summary = {v: {"best_MBps": max(r[v] for r in runs), "median_MBps": med([r[v] for r in runs])} for v in variants}
    for v in variants[1:]:
        summary[v].update(best_ratio=max(r[f"{v}_ratio"] for r in runs), median_ratio=med([r[f"{v}_ratio"] for r in runs]))
    return {"size": size, "reps": reps, "before": before, "runs": runs, "summary": summary}


def _agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "siterecovery.replica.agent", *args]


class PeakRSS(threading.Thread):
    """Samples /proc/<pid>/status every 2 ms: peak VmRSS and peak RssAnon (the process's own memory,
    without the page cache it maps). wait4's ru_maxrss is no good here: a child inherits the
    high-water mark of the parent it was forked from."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.rss, self.anon = pid, 0, 0
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for ln in f:
                        if ln.startswith("VmRSS:"):
                            self.rss = max(self.rss, int(ln.split()[1]))
                        elif ln.startswith("RssAnon:"):
                            self.anon = max(self.anon, int(ln.split()[1]))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            time.sleep(0.002)


def _cycle_rss(disk: Path, work: Path, gen: str, n: int) -> tuple[dict[str, Any], PeakRSS, PeakRSS, float]:
    """One delta cycle as two agent processes joined by a pipe; (result, sender peak, receiver peak, s)."""
    point = json.dumps({"id": f"r@{n}", "created_at": datetime.now(UTC).isoformat(), "consistency": "crash"})
    t = time.perf_counter()
    s = subprocess.Popen(_agent("send", "--disk", str(disk), "--state", str(work / "st"), "--mode", "delta",
                                "--expect-gen", gen), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    r = subprocess.Popen(_agent("receive", "--replica", str(work / "rep.img"), "--meta", str(work / "meta"),
                                "--point", point), stdin=s.stdout, stdout=subprocess.PIPE)
    ps, pr = PeakRSS(s.pid), PeakRSS(r.pid)
    assert s.stdout is not None
    s.stdout.close()
    out, _ = r.communicate()
    s.wait()
    secs = time.perf_counter() - t
    ps.done.set()
    pr.done.set()
    ps.join()
    pr.join()
    return json.loads(out), ps, pr, secs


def bench_rss(work: Path) -> dict[str, Any]:
    out = {}
    for gib, data_every in ((2, 1), (8, 4)):
        d = work / f"rss{gib}"
        d.mkdir(exist_ok=True)
        disk = d / "disk.img"
        log(f"rss: {gib} GiB image ({'dense' if data_every == 1 else 'sparse: 1 MiB of data every 4 MiB'})")
        rnd = random.Random(gib)
        with open(disk, "wb") as f:
            f.truncate(gib * GiB)
            for off in range(0, gib * GiB, data_every * MiB):
                f.seek(off)
                f.write(rnd.randbytes(MiB))
        subprocess.run(_agent("send", "--disk", str(disk), "--state", str(d / "st"), "--mode", "full",
                              "--output", str(d / "full.stream")), check=True, stdout=subprocess.DEVNULL)
        res = json.loads(subprocess.run(_agent("receive", "--replica", str(d / "rep.img"), "--meta", str(d / "meta"),
                                               "--point", json.dumps({"id": "r@0", "created_at": datetime.now(UTC).isoformat()}),
                                               "--input", str(d / "full.stream")), check=True, capture_output=True).stdout)
        os.unlink(d / "full.stream")
        gen = res["point"]["gen"]
        changed = rewrite(disk, 0.01, seed=gib)
        warm(disk)
        got, ps, pr, secs = _cycle_rss(disk, d, gen, 1)
        assert file_digest(str(disk)) == file_digest(str(d / "rep.img"))
        out[f"{gib}GiB"] = {"sender_peak_rss_MiB": round(ps.rss / 1024, 1), "sender_peak_anon_MiB": round(ps.anon / 1024, 1),
                            "receiver_peak_rss_MiB": round(pr.rss / 1024, 1), "receiver_peak_anon_MiB": round(pr.anon / 1024, 1),
                            "cycle_s": round(secs, 2), "changed_bytes": changed}
        log("rss", gib, out[f"{gib}GiB"])
        shutil.rmtree(d)
    return out


def bench_crash(work: Path, trials: int = 50) -> dict[str, Any]:
    log(f"crash: {trials} trials")
    res = crash_trials(work / "crash", trials=trials, size=64 * MiB, seed=2026)
    return {k: v for k, v in res.items() if k != "results"}


def bench_sustained(work: Path, size: int, seconds: float = 60, every: float = 5, rate: float = 20e6) -> dict[str, Any]:
    """Cycles every `every` s (over SSH loopback, through the linux fabric) while a writer rewrites
    random 64 KiB blocks at `rate` bytes/s; achieved RPO = age of the newest point just before the
    next one lands (the worst moment)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sshd import running_sshd

    from siterecovery.fabric import FabricContext
    from siterecovery.fabric.base import Placement
    from siterecovery.fabric.linux import LinuxFabric
    from siterecovery.mapping import DiskPlacement
    from siterecovery.model import Host, ReplicationPolicy

    disk = work / "sustained.img"
    log(f"sustained: {size // GiB} GiB, writes {rate / 1e6:.0f} MB/s, cycle every {every} s for {seconds} s")
    random_image(disk, size, seed=9)
    with running_sshd() as srv:
        f = LinuxFabric(FabricContext(state_dir=work / "sustained-state", options={"python": sys.executable}))
        p = Placement(vm="load", pairing="b", source=Host(name="src", site="a", fabric="linux", address="local",
                                                          root=str(work / "s-src")),
                      target=srv.host("dst", "b", root=str(work / "s-dst")),
                      policy=ReplicationPolicy(name="5s", copy_frequency_seconds=5),
                      disks=(DiskPlacement(disk="d", source_path=str(disk), target_location=None, classification=None),))
        f.enable_replication(p)
        f.start_initial_replication(p)
        stop = threading.Event()
        written = [0]

        def writer() -> None:
            rnd = random.Random(5)
            n = size // BLOCK
            fd = os.open(disk, os.O_RDWR)
            t0 = time.perf_counter()
            while not stop.is_set():
                os.pwrite(fd, rnd.randbytes(BLOCK), rnd.randrange(n) * BLOCK)
                written[0] += BLOCK
                ahead = written[0] / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            os.close(fd)

        th = threading.Thread(target=writer, daemon=True)
        th.start()
        start = time.perf_counter()
        cycles, rpos, lags = [], [], []
        prev_capture = time.time()
        next_at = start
        while time.perf_counter() - start < seconds:
            now = time.perf_counter()
            if now < next_at:
                time.sleep(next_at - now)
            next_at += every
            t0 = time.perf_counter()
            r = f.replicate(p)
            dt = time.perf_counter() - t0
            landed = time.time()
            assert r.point is not None
            rpos.append(landed - prev_capture)  # the previous point's age just before this one landed
            prev_capture = r.point.created_at.timestamp()
            cycles.append(dt)
            lags.append(max(0.0, time.perf_counter() - next_at))
            if time.perf_counter() > next_at:
                next_at = time.perf_counter()  # a cycle overran its slot: start the next at once
        stop.set()
        th.join()
        elapsed = time.perf_counter() - start
        h = f.replication_health(p)
        f.close()
    rpos_sorted = sorted(rpos)
    return {"size": size, "seconds": round(elapsed, 1), "target_every_s": every,
            "write_MBps": round(written[0] / elapsed / 1e6, 1), "cycles": len(cycles),
            "cycle_s_mean": round(sum(cycles) / len(cycles), 2), "cycle_s_max": round(max(cycles), 2),
            "rpo_s_p50": round(rpos_sorted[len(rpos) // 2], 2), "rpo_s_max": round(max(rpos), 2),
            "missed_cycles": h.missed_cycles}


def _ok(ok: bool) -> str:
    return "met" if ok else "**missed**"


def bench_reverse(work: Path, size: int) -> dict[str, Any]:
    """Reverse replication after a planned failover, 1% of the blocks written at the recovery site: with
    the old primary adopted (no block compare) and with it compared block by block (its ctime moved by
    a no-op utime, so the proof fails on identical bytes). Linux fabric, local hosts, no QEMU."""
    from bench.soak import placement
    from siterecovery.fabric import FabricContext
    from siterecovery.fabric.linux import LinuxFabric
    from siterecovery.model import Host

    out: dict[str, Any] = {"size": size}
    for how in ("adopt", "compare"):
        d = work / f"reverse-{how}"
        shutil.rmtree(d, ignore_errors=True)
        (d / "a").mkdir(parents=True)
        disk = d / "a" / "vm.img"
        random_image(disk, size)
        hosts = [Host(name=f"{s}-h1", site=s, fabric="linux", address="local", root=str(d / f"r{s}")) for s in "ab"]
        f = LinuxFabric(FabricContext(state_dir=d / "state", options={"python": sys.executable}))
        p = placement("rev-01", hosts[0], hosts[1], disk, 1.0, 30)
        f.enable_replication(p)
        f.start_initial_replication(p)
        rewrite(disk, 0.01, 1)
        f.replicate(p)
        f.prepare_planned_failover(p)
        f.failover(p)
        f.commit_failover(p)
        replica = d / "rb" / "rev-01" / "replica" / "os.img"
        changed = rewrite(replica, 0.01, 2)  # the failed-over VM writes at the recovery site
        if how == "compare":
            st = os.stat(disk)
            os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))
        warm(disk)
        warm(replica)
        secs, r = timed(lambda: f.reverse_replication(p))  # noqa: B023 - called at once
        assert file_digest(str(disk)) == file_digest(str(replica)), "the reversed replica differs"
        out[how] = {"seconds": round(secs, 3), "bytes_sent": r.bytes_sent, "changed_bytes": changed,
                    "compared": r.details.get("compared"), "message": r.message}
        log(f"reverse ({how}): {secs:.2f} s, {r.bytes_sent} bytes sent; {r.message}")
        shutil.rmtree(d, ignore_errors=True)
    out["compare_over_adopt"] = round(out["compare"]["seconds"] / out["adopt"]["seconds"], 2)
    return out


def report(res: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md's replication section from a results file."""
    m = res["machine"]
    out = ["## Block replication engine (`bench/replica.py`)", "",
           f"Command: `{res['command']}` (scratch on the same ext4 disk as everything else; no reflink).", "",
           f"Machine: {m['nproc']} CPUs ({m['cpu']}), run {m['date']}, Python {m['python']}, {m['rsync']}.", "",
           "```", m["free_h"], "```", ""]
    if "local" in res:
        lo = res["local"]
        md = lo["median"]
        out += ["### Local delta cycle: 2 GiB raw image, 1% of its 64 KiB blocks rewritten at random", "",
                "Warm page cache for both tools, `sync` before each timed run; rsync is "
                "`rsync --inplace --no-whole-file --ignore-times` (`--ignore-times` because the quick check "
                "would otherwise skip a file rewritten within the same second). Three rounds, each with fresh changes.", "",
                "| round | engine cycle (s) | rsync (s) | rsync / engine | changed bytes | engine bytes shipped | rsync bytes sent |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for i, r in enumerate(lo["runs"], 1):
            out.append(f"| {i} | {r['engine_s']} | {r['rsync_s']} | {r['ratio']}x | {r['changed_bytes']:,} | "
                       f"{r['engine_bytes']:,} (+{r['overhead_pct']}%) | {r['rsync_sent']:,} |")
        worst = max(r["overhead_pct"] for r in lo["runs"])
        out += ["", f"- median ratio {md['ratio']}x (target >= 5x: {_ok(md['ratio'] >= 5)}); bytes shipped = changed "
                f"+ {worst}% at worst (target <= +2%: {_ok(worst <= 2)}).",
                f"- the initial local full copy of the same image took {lo['initial_s']} s ({lo['initial_MBps']} MB/s).", ""]
    if "ssh" in res:
        ss = res["ssh"]
        md = ss["median"]
        out += ["### Over SSH on loopback (real OpenSSH sshd, paramiko exec channel, cipher "
                f"`{ss['cipher']}`)", "",
                f"- initial copy of 2 GiB of incompressible data, source local -> target over SSH: {ss['initial_s']} s = "
                f"**{ss['initial_MBps']} MB/s** (target >= 200 MB/s: {_ok(ss['initial_MBps'] >= 200)}).",
                f"- the same with both hosts remote (the orchestrator relays between two exec channels, four SSH "
                f"crypto passes on one 2-CPU box): {ss['relay_initial_MBps']} MB/s.",
                "- delta cycle, 1% of blocks rewritten, against `rsync --inplace --no-whole-file --ignore-times -e "
                "'ssh -c aes128-gcm@openssh.com ...'` to the same sshd:", "",
                "| round | engine cycle (s) | rsync -e ssh (s) | rsync / engine | engine bytes | rsync bytes sent |",
                "| --- | --- | --- | --- | --- | --- |"]
        for i, r in enumerate(ss["runs"], 1):
            out.append(f"| {i} | {r['engine_s']} | {r['rsync_s']} | {r['ratio']}x | {r['engine_bytes']:,} | {r['rsync_sent']:,} |")
        out += ["", f"- median ratio {md['ratio']}x (target >= 3x: {_ok(md['ratio'] >= 3)}).", ""]
    if "direct" in res:
        di = res["direct"]
        fu = di["full"]
        out += ["### Both hosts remote: orchestrator relay against host to host (`peer_ssh`)", "",
                "Same run, same sshd, alternating order. relay: the orchestrator copies the stream between two "
                "paramiko exec channels; peer: the source host's OpenSSH client pipes it into the target's "
                "receiver. `orchestrator kB` is what the kernel moved over the orchestrator's two SSH sockets "
                "(TCP_INFO), `orchestrator CPU` the CPU seconds of the orchestrator process.", "",
                "| cycle | path | wall (s) | orchestrator kB | orchestrator CPU (s) | relay / peer |",
                "| --- | --- | --- | --- | --- | --- |"]
        rows = [("initial, " + f"{di['size'] / GiB:g} GiB incompressible", fu)] + [
            (f"delta {i} (1% of blocks)", r) for i, r in enumerate(di["delta"], 1)]
        for label, r in rows:
            for name in ("relay", "peer"):
                x = r[name]
                out.append(f"| {label} | {name} | {x['s']} | {x['orch_kB']:,} | {x['orch_cpu_s']} | "
                           f"{str(r['relay_over_peer']) + 'x' if name == 'peer' else ''} |")
        out += ["", f"- initial copy: relay {di['full_relay_MBps']} MB/s, peer {di['full_peer_MBps']} MB/s; delta "
                f"median relay / peer {di['delta_median_ratio']}x.", ""]
    if "rss" in res:
        out += ["### Peak memory of a delta cycle (1% of blocks rewritten)", "",
                "Sender and receiver as separate agent processes joined by a pipe.", "",
                "| disk | sender peak RSS (anon) | receiver peak RSS (anon) | cycle (s) |", "| --- | --- | --- | --- |"]
        for k, v in res["rss"].items():
            out.append(f"| {k} | {v['sender_peak_rss_MiB']} MiB ({v['sender_peak_anon_MiB']} MiB) | "
                       f"{v['receiver_peak_rss_MiB']} MiB ({v['receiver_peak_anon_MiB']} MiB) | {v['cycle_s']} |")
        out += ["", "Sampled from /proc/<pid>/status every 2 ms. The 8 GiB image is sparse (1 MiB of data every 4 "
                "MiB). The sender maps the disk 64 MiB at a time, so its RSS includes up to one window of clean, "
                "shared page cache; RssAnon is the process's own memory.", ""]
    if "crash" in res:
        c = res["crash"]
        out += ["### Crash trials: kill -9 of the apply at random moments", "",
                f"{c['trials']} trials on a 64 MiB image, 25% of its blocks rewritten per cycle (a ~16 MiB apply, "
                f"{c['apply_seconds']} s per receive including interpreter start-up). After every kill the replica's "
                "checksum equalled a recovery point (the previous or the new one), matched its manifest, the next "
                "cycle carried on, and every retained point still rebuilt exactly.", "",
                f"- outcomes: {c['outcomes']}", f"- where the kill landed: {c['killed_in']}", ""]
    if "sustained" in res:
        su = res["sustained"]
        out += ["### Sustained 5 s copy frequency under random writes", "",
                f"2 GiB disk, a writer rewriting random 64 KiB blocks at {su['write_MBps']} MB/s, `LinuxFabric.replicate` "
                f"every {su['target_every_s']} s for {su['seconds']} s, source local -> target over SSH loopback.", "",
                f"- {su['cycles']} cycles, {su['missed_cycles']} missed; cycle time mean {su['cycle_s_mean']} s, max "
                f"{su['cycle_s_max']} s.",
                f"- achieved RPO (age of the newest point just before the next one lands): median {su['rpo_s_p50']} s, "
                f"worst {su['rpo_s_max']} s.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replica")
    ap.add_argument("what", nargs="?", default="all",
                    choices=["local", "ssh", "direct", "rss", "crash", "sustained", "all", "report", "tput", "tput-child",
                             "cap", "reverse"])
    ap.add_argument("--dir", default=None, help="scratch directory (needs ~8 GiB free)")
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--crash-trials", type=int, default=50)
    ap.add_argument("--sustained-seconds", type=float, default=60)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "replica.json"))
    ap.add_argument("--reps", type=int, default=5, help="tput: repetitions")
    ap.add_argument("--before", help="tput: src/ of another checkout, measured as 'engine-before'")
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--cap-mbps", type=float, nargs="+", default=[16.0, 80.0], help="cap: the caps to measure")
    ap.add_argument("--cap-mib", type=int, default=32, help="cap: MiB per disk (three disks at once)")
    a = ap.parse_args(argv)
    if a.what == "tput-child":
        print(json.dumps(_engine_copy_child(json.loads(a.spec))))
        return 0
    if a.what == "report":
        print(report(json.loads(Path(a.out).read_text())))
        return 0
    work = Path(a.dir or tempfile.mkdtemp(prefix="sr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    size = int(a.size_gib * GiB)
    res: dict[str, Any] = {"machine": machine(), "command": "python -m bench.replica " + " ".join(argv or sys.argv[1:])}
    try:
        if a.what in ("local", "all"):
            res["local"] = bench_local(work, size)
        if a.what in ("ssh", "all"):
            res["ssh"] = bench_ssh(work, size)
        if a.what in ("direct", "all"):
            res["direct"] = bench_direct(work, size)
        if a.what in ("rss", "all"):
            res["rss"] = bench_rss(work)
        if a.what in ("crash", "all"):
            res["crash"] = bench_crash(work, a.crash_trials)
        if a.what in ("sustained", "all"):
            res["sustained"] = bench_sustained(work, size, a.sustained_seconds)
        if a.what == "tput":
            res["tput"] = bench_tput(work, size, a.reps, a.before)
        if a.what == "cap":
            res["cap"] = bench_cap(work, a.cap_mbps, a.cap_mib * MiB)
        if a.what == "reverse":
            res["reverse"] = bench_reverse(work, size)
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if a.what in ("all", "tput", "cap", "reverse"):
        out = Path(a.out) if a.what == "all" else Path(a.out).with_name(f"{a.what}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
