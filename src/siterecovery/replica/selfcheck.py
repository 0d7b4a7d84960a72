"""Crash self-check of the engine: kill -9 the apply at random moments and verify the replica.

Run by the test suite (a handful of trials) and the benchmark (`python -m bench.replica crash`, 50
trials); an operator can run it on a new filesystem: `python -m siterecovery.replica.selfcheck DIR`.
Each trial must leave the replica byte-identical to a recovery point, and the next cycle must carry on.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .engine import BLOCK, Replica, SourceState, file_digest, now_iso, send

MiB = 1024 * 1024


def _rewrite(path: str, fraction: float, rnd: random.Random) -> None:
    n = os.path.getsize(path) // BLOCK
    fd = os.open(path, os.O_RDWR)
    try:
        for i in rnd.sample(range(n), max(1, int(n * fraction))):
            os.pwrite(fd, rnd.randbytes(BLOCK), i * BLOCK)
    finally:
        os.close(fd)


def crash_trials(workdir: str | Path, trials: int = 5, size: int = 48 * MiB, seed: int = 7,
                 fraction: float = 0.25) -> dict[str, Any]:
    """Run `trials` killed applies; raises AssertionError on the first replica that is not a point."""
    rnd = random.Random(seed)
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    disk = str(wd / "source.img")
    with open(disk, "wb") as f:
        f.write(rnd.randbytes(size))
    state = str(wd / "source-state")
    rep = Replica(str(wd / "replica.img"), str(wd / "replica-meta"))
    stream = str(wd / "cycle.stream")
    seq = 1

    def point() -> dict[str, Any]:
        return {"id": f"crash@{seq}", "created_at": now_iso(), "consistency": "crash"}

    with open(stream, "wb") as out:
        sent = send(disk, state, out, mode="full")
    with open(stream, "rb") as inp:
        rep.receive(inp, point(), retention_hours=24)
    SourceState(state).commit(bytes.fromhex(sent["gen"]))
    by_seq = {1: file_digest(disk)}
    outcomes: dict[str, int] = {}
    phases: dict[str, int] = {}
    window: tuple[float, float] | None = None
    durations: list[float] = []
    results = []
    for t in range(trials):
        _rewrite(disk, fraction, rnd)
        st = rep.status()
        with open(stream, "wb") as out:
            sent = send(disk, state, out, mode="delta", expect_gen=bytes.fromhex(st["gen"]))
        want_new = file_digest(disk)
        before = file_digest(rep.path)
        seq = st["seq"] + 1
        argv = [sys.executable, "-m", "siterecovery.replica.agent", "receive", "--replica", rep.path,
                "--meta", rep.meta, "--point", json.dumps(point()), "--retention-hours", "24", "--input", stream]
        # Even trials: a kill at a random moment of the whole run. Odd trials: a kill at a random moment
        # after the journal appears (blocks being written, manifest being committed), the window whose
        # length the first, unkilled run measured. Times alone would rarely hit a ~20 ms window.
        expected = (sum(durations) / len(durations)) if durations else 0.6
        in_window = bool(window) and t % 2 == 1
        delay = rnd.uniform(expected * 0.2, expected * 1.05)
        if in_window:
            assert window is not None
            delay = rnd.uniform(0.0, (window[1] - window[0]) * 1.1)
        if t == 0:
            delay = 60.0  # the first run calibrates: it is watched, not killed
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if in_window:
            while proc.poll() is None and not os.path.exists(rep.journal):
                time.sleep(0.0002)
            t0 = time.monotonic()
        if t == 0:
            seen = []
            while proc.poll() is None:
                if os.path.exists(rep.journal):
                    seen.append(time.monotonic() - t0)
                time.sleep(0.0005)
            if seen:
                window = (seen[0], seen[-1])
        # Popen.wait(timeout) polls in steps of up to 50 ms: sleep precisely, then kill.
        while proc.poll() is None and time.monotonic() - t0 < delay:
            time.sleep(min(0.001, max(0.0, delay - (time.monotonic() - t0))))
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not killed:
            durations.append(time.monotonic() - t0)
        phase = _phase(rep) if killed else "finished"
        status = rep.status()  # recovery runs here, as it would at the next cycle
        now = file_digest(rep.path)
        if now == want_new:
            outcome = "new-point"
            SourceState(state).commit(bytes.fromhex(sent["gen"]))
            by_seq[status["seq"]] = now
        elif now == before:
            outcome = "previous-point"
        else:
            raise AssertionError(f"trial {t}: replica is neither the previous nor the new point "
                                 f"(killed after {delay:.3f} s)")
        assert status["disk_matches"], f"trial {t}: replica does not match its manifest after recovery"
        assert status["seq"] in by_seq and by_seq[status["seq"]] == now
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        phases[phase] = phases.get(phase, 0) + 1
        results.append({"trial": t, "killed": killed, "after_s": round(delay, 4), "phase": phase, "outcome": outcome})
        # the next cycle carries on from wherever the replica is
    st = rep.status()
    with open(stream, "wb") as out:
        sent = send(disk, state, out, mode="delta", expect_gen=bytes.fromhex(st["gen"]))
    with open(stream, "rb") as inp:
        rep.receive(inp, {"id": "crash@final", "created_at": now_iso(), "consistency": "crash"}, 24)
    SourceState(state).commit(bytes.fromhex(sent["gen"]))
    assert file_digest(rep.path) == file_digest(disk), "the cycle after the crashes did not converge"
    # every surviving point still rebuilds to its exact content through the undo logs
    for p in rep.status()["points"]:
        if p["seq"] in by_seq:
            dest = str(wd / "rebuilt.img")
            rep.rebuild(p["seq"], dest)
            assert file_digest(dest) == by_seq[p["seq"]], f"point {p['seq']} does not rebuild"
            os.unlink(dest)
    return {"trials": trials, "outcomes": outcomes, "killed_in": phases, "apply_seconds": round(sum(durations) / max(1, len(durations)), 3),
            "results": results}


def _phase(rep: Replica) -> str:
    """Where the killed apply was, read from what it left behind."""
    names = set(os.listdir(rep.meta))
    if "journal" in names:
        return "applying (journaled)"
    if any(n.endswith(".tmp") for n in os.listdir(rep.undo_dir)):
        return "writing undo log"
    if any(n.startswith("staging") for n in names):
        return "receiving (staged)"
    return "before receive / after commit"


if __name__ == "__main__":
    import tempfile
    target = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="sr-crash-")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    print(json.dumps({k: v for k, v in crash_trials(target, n).items() if k != "results"}))
