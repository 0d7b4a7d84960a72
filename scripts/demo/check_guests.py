#!/usr/bin/env python3
"""The QEMU demo plan's check (plans/demo/qemu): what the guests say on their serial consoles where
they run now. WHERE is `test` (a drill: every test copy checked its own records and found them whole,
at least as many as were acknowledged before the point), or `recovery` / `primary` (after a failover /
failback: every guest went on from the record after the last one it acknowledged at the other site,
so nothing acknowledged was lost, and it acknowledged a new record since).

Usage: check_guests.py WHERE [--expect FILE] [--wait SECONDS]; FILE (default $SITERECOVERY_DEMO_EXPECT)
is JSON {"vms": {vm: {"primary": run dir, "recovery": run dir}}, "drill_records": {vm: n}}, written by
`siterecovery demo --qemu`. Waits for the guests to boot (minutes under TCG on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
if SRC.is_dir():  # run from a checkout by any python3: the record reader is the test guest's own
    sys.path.insert(0, str(SRC))

from siterecovery.testing.guest import acks, resumed_from, self_check  # noqa: E402


def drill(vm: str, run: Path, expected: int) -> str | None:
    """None while the test copy is still checking; else its verdict (raises when it is wrong)."""
    found = self_check(run / "test.serial")
    if found is None:
        return None
    bad = [f"{d} bad ({n} records)" for d, (ok, n) in found.items() if not ok]
    if not found or bad:
        raise Failed(f"{vm}: the test copy found its records damaged: {', '.join(bad) or 'no disk checked'}")
    least = min(n for _, n in found.values())
    if least < expected:
        raise Failed(f"{vm}: the test copy holds {least} records, {expected} were acknowledged before the point")
    disks = ", ".join(f"{d} ok ({n} records)" for d, (_, n) in found.items())
    return f"{vm}: the test copy checked its own records: {disks}; {expected} were acknowledged before the point"


def moved(vm: str, here: Path, there: Path) -> str | None:
    """None until the guest here has started and acknowledged a record; else its verdict."""
    start = resumed_from(here / "vm.serial")
    if start is None or acks(here / "vm.serial") < start:
        return None
    last = acks(there / "vm.serial")  # that guest is shut down: its last word
    if start <= last:
        raise Failed(f"{vm}: LOST RECORDS: it went on from record {start}, but record {last} had been acknowledged")
    if start > last + 2:  # at most one record written whole but not yet acknowledged when it stopped
        raise Failed(f"{vm}: went on from record {start}, after the last acknowledged {last}: records it never wrote")
    return (f"{vm}: went on from record {start}; the last acknowledged before the move was {last}: "
            "nothing acknowledged was lost")


class Failed(RuntimeError):
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("where", choices=("test", "recovery", "primary"))
    ap.add_argument("--expect", default=os.environ.get("SITERECOVERY_DEMO_EXPECT"))
    ap.add_argument("--wait", type=float, default=800.0)
    a = ap.parse_args()
    if not a.expect:
        print("no expectation file: give --expect or SITERECOVERY_DEMO_EXPECT", file=sys.stderr)
        return 2
    with open(a.expect) as f:
        exp = json.load(f)
    deadline = time.monotonic() + a.wait
    said: dict[str, str] = {}
    while True:
        try:
            for vm, runs in exp["vms"].items():
                if vm in said:
                    continue
                if a.where == "test":
                    verdict = drill(vm, Path(runs["recovery"]), int(exp.get("drill_records", {}).get(vm, 0)))
                else:
                    other = "primary" if a.where == "recovery" else "recovery"
                    verdict = moved(vm, Path(runs[a.where]), Path(runs[other]))
                if verdict is not None:
                    said[vm] = verdict
                    print(verdict, flush=True)
        except Failed as exc:
            print(f"check failed: {exc}", file=sys.stderr)
            return 1
        if len(said) == len(exp["vms"]):
            return 0
        if time.monotonic() > deadline:
            waiting = sorted(set(exp["vms"]) - set(said))
            print(f"check failed: no word from {', '.join(waiting)} after {a.wait:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
