#!/usr/bin/env python3
"""A recovery plan's check of the demo shop: the web tier at URL is healthy (web -> app -> db) and
answers with every order it must hold, and its two databases agree: payments (db-02) trail orders
(db-01) by at most one and each payment is for its order, which only holds when both were recovered
from one moment (a consistency group). Standard library only, so it runs on any host.

Usage: check_shop.py URL [--expect FILE]; FILE (default $SITERECOVERY_DEMO_EXPECT) is JSON
{"items": [...]}: the orders written before the recovery point (a drill) or before the failover.
Retries for --wait seconds because a freshly started tier may still be binding its port.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=3) as r:  # noqa: S310 - a URL the plan names
        return json.loads(r.read())


def check(url: str, expected: list[str]) -> str:
    health = get(url + "/health")
    if not health.get("ok"):
        raise RuntimeError(f"unhealthy: {health}")
    orders = get(url + "/orders")
    items = {o.get("item") for o in orders["orders"]}
    missing = [i for i in expected if i not in items]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(expected)} expected orders missing, e.g. {missing[:3]}")
    said = ""
    if "payments" in orders:
        said = f"; {agree(orders['orders'], orders['payments'])}"
    return (f"web at {url} (site {orders.get('site', '?')}) is healthy and holds {len(items)} orders, "
            f"all {len(expected)} expected ones included{said}")


def agree(orders: list[dict], payments: list[dict]) -> str:
    """The cross-database invariant: payment i is for order i+1, and at most the last order is unpaid."""
    if not 0 <= len(orders) - len(payments) <= 1:
        raise InconsistentDatabases(f"{len(orders)} orders but {len(payments)} payments: the two databases were "
                                    "recovered from different moments")
    for i, pay in enumerate(payments):
        if pay.get("order") != i + 1 or pay.get("item") != orders[i].get("item"):
            raise InconsistentDatabases(f"payment {i + 1} is for {pay} but order {i + 1} is {orders[i]}")
    return f"{len(payments)} payments match their orders"


class InconsistentDatabases(RuntimeError):
    """Not a transient state: retrying cannot make two databases agree."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--expect", default=os.environ.get("SITERECOVERY_DEMO_EXPECT"))
    ap.add_argument("--wait", type=float, default=20.0)
    a = ap.parse_args()
    expected: list[str] = []
    if a.expect:
        with open(a.expect) as f:
            expected = list(json.load(f)["items"])
    deadline = time.monotonic() + a.wait
    while True:
        try:
            print(check(a.url.rstrip("/"), expected))
            return 0
        except InconsistentDatabases as exc:
            print(f"check failed at {a.url}: {exc}", file=sys.stderr)
            return 1
        except (urllib.error.URLError, OSError, ValueError, RuntimeError, KeyError) as exc:
            if time.monotonic() > deadline:
                print(f"check failed at {a.url}: {exc}", file=sys.stderr)
                return 1
            time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
