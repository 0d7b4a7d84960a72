#!/usr/bin/env python3
"""The demo's three-tier workload: each tier is a real process serving HTTP, standard library only.

  db   keeps its rows on a raw disk image (the replicated disk): a header block with the row count,
       then one 4 KiB slot per row, each write fsynced row first and header last, so any
       crash-consistent copy of the image reads back a whole prefix of the rows;
  app  the order API, in front of db: each order is written to the orders db (--upstream), then its
       payment to the payments db (--payments), so payments trail orders by at most one at any moment;
  web  the page, in front of app.

Quiesce protocol for app-consistent recovery points: `tier.py freeze DISK` asks db to finish its write
and hold further writes (it answers by creating DISK.frozen); `tier.py thaw DISK` lets it go on. A db
holds a lock on DISK.lock while it serves DISK, so freezing a disk nobody serves (a VM that is shut
down, as during a planned failover's last cycle) succeeds at once: a quiet disk is already consistent.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SLOT = 4096
ORDER_LOCK = threading.Lock()  # app: orders are written one at a time (order, then its payment)


class Disk:
    """Rows on a raw image: block 0 is {"count": n}, block i+1 is row i."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.fd = os.open(path, os.O_RDWR)
        # Held for the life of the process: tells `freeze` that someone serves this disk.
        self.owner = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"another db serves {path}")

    def _read_block(self, i: int) -> dict | None:
        raw = os.pread(self.fd, SLOT, i * SLOT).rstrip(b"\0")
        return json.loads(raw) if raw else None

    def rows(self) -> list[dict]:
        with self.lock:
            head = self._read_block(0) or {"count": 0}
            return [r for r in (self._read_block(i + 1) for i in range(head["count"])) if r is not None]

    def _wait_thawed(self) -> None:
        freeze, frozen = Path(self.path + ".freeze"), Path(self.path + ".frozen")
        if freeze.exists():
            frozen.touch()
            while freeze.exists():
                time.sleep(0.01)
            frozen.unlink(missing_ok=True)

    def append(self, row: dict) -> int:
        data = json.dumps(row).encode()
        if len(data) > SLOT:
            raise ValueError("row too large")
        with self.lock:
            self._wait_thawed()
            head = self._read_block(0) or {"count": 0}
            n = head["count"]
            if n and "order" in row and (self._read_block(n) or {}).get("order") == row["order"]:
                return n  # a payment retried after its first write went in: written once
            if (n + 2) * SLOT > os.fstat(self.fd).st_size:
                raise OSError("disk full")
            os.pwrite(self.fd, data.ljust(SLOT, b"\0"), (n + 1) * SLOT)
            os.fsync(self.fd)
            os.pwrite(self.fd, json.dumps({"count": n + 1}).encode().ljust(SLOT, b"\0"), 0)
            os.fsync(self.fd)
            return n + 1

    def serve_freeze(self) -> None:
        """Acknowledge a freeze even when no write comes along."""
        while True:
            if Path(self.path + ".freeze").exists() and self.lock.acquire(timeout=0.05):
                try:
                    self._wait_thawed()
                finally:
                    self.lock.release()
            time.sleep(0.02)


def fetch(url: str, body: dict | None = None, timeout: float = 5.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback demo tiers
        return json.loads(r.read())


def pay(payment: dict, url: str, patience: float = 120.0) -> None:
    """Write an order's payment, retrying: an order left without its payment would break the invariant
    for good (the next order's payment would land in its place)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fetch(url + "/rows", payment, timeout=60)
            return
        except (urllib.error.URLError, OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def make_handler(tier: str, args: argparse.Namespace, disk: Disk | None):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *a: object) -> None:  # keep the VM's log quiet but useful
            sys.stdout.write(f"{tier} {self.address_string()} {fmt % a}\n")
            sys.stdout.flush()

        def reply(self, code: int, obj: object, ctype: str = "application/json") -> None:
            body = (json.dumps(obj) if ctype == "application/json" else str(obj)).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def do_GET(self) -> None:  # noqa: N802
            try:
                if self.path == "/health":
                    for below in (args.upstream, getattr(args, "payments", None)):
                        if below:
                            fetch(below + "/health")
                    return self.reply(200, {"tier": tier, "site": args.site, "ok": True})
                if tier == "db" and self.path == "/rows":
                    return self.reply(200, {"rows": disk.rows()})  # type: ignore[union-attr]
                if tier == "app" and self.path == "/orders":
                    out = {"orders": fetch(args.upstream + "/rows")["rows"], "site": args.site}
                    if args.payments:
                        out["payments"] = fetch(args.payments + "/rows")["rows"]
                    return self.reply(200, out)
                if tier == "web" and self.path in ("/", "/orders"):
                    orders = fetch(args.upstream + "/orders")
                    if self.path == "/orders":
                        return self.reply(200, orders)
                    items = "".join(f"<li>{o.get('item', '?')}</li>" for o in orders["orders"])
                    return self.reply(200, f"<h1>Orders at {args.site}</h1><ul>{items}</ul>", "text/html")
                self.reply(404, {"error": "not found"})
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self.reply(503, {"error": str(exc)})

        def do_POST(self) -> None:  # noqa: N802
            try:
                if tier == "db" and self.path == "/rows":
                    return self.reply(200, {"count": disk.append(self.body())})  # type: ignore[union-attr]
                if tier == "app" and self.path == "/orders":
                    order = self.body()
                    # One order at a time, its payment included: a customer who gave up waiting (a frozen
                    # db) must not leave its order half done while the next one goes in, or payments would
                    # trail orders by more than one and the check could not tell that from a torn point.
                    with ORDER_LOCK:
                        done = fetch(args.upstream + "/rows", order, timeout=60)
                        if args.payments:  # the order is in; its payment follows (the cross-VM invariant)
                            pay({"order": done["count"], "item": order.get("item")}, args.payments)
                    return self.reply(200, done)
                if tier == "web" and self.path == "/orders":
                    return self.reply(200, fetch(args.upstream + "/orders", self.body()))
                self.reply(404, {"error": "not found"})
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self.reply(503, {"error": str(exc)})

    return Handler


def serve(tier: str, args: argparse.Namespace) -> None:
    disk = None
    if tier == "db":
        disk = Disk(args.disk)
        threading.Thread(target=disk.serve_freeze, daemon=True).start()
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), make_handler(tier, args, disk))
    print(f"{tier} serving on {args.listen} at site {args.site}", flush=True)
    server.serve_forever()


def served(disk: str) -> bool:
    """Whether a db process holds the disk (its lock on DISK.lock)."""
    try:
        fd = os.open(disk + ".lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def freeze(disk: str, timeout: float = 10.0) -> None:
    if not served(disk):
        return
    Path(disk + ".freeze").touch()
    deadline = time.monotonic() + timeout
    while not Path(disk + ".frozen").exists():
        if time.monotonic() > deadline:
            Path(disk + ".freeze").unlink(missing_ok=True)
            sys.exit(f"db did not acknowledge the freeze of {disk} within {timeout}s")
        time.sleep(0.01)


def thaw(disk: str) -> None:
    Path(disk + ".freeze").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for tier in ("db", "app", "web"):
        p = sub.add_parser(tier)
        p.add_argument("--listen", required=True, help="HOST:PORT")
        p.add_argument("--site", default="?")
        p.add_argument("--disk", required=(tier == "db"))
        p.add_argument("--upstream", required=(tier != "db"), help="URL of the tier below")
        if tier == "app":
            p.add_argument("--payments", help="URL of the payments db (each order's payment is written there)")
    for cmd in ("freeze", "thaw"):
        p = sub.add_parser(cmd)
        p.add_argument("disk")
    p = sub.add_parser("mkdisk", help="create an empty raw disk image")
    p.add_argument("disk")
    p.add_argument("--size-mib", type=int, default=16)
    args = ap.parse_args()
    if args.cmd == "freeze":
        freeze(args.disk)
    elif args.cmd == "thaw":
        thaw(args.disk)
    elif args.cmd == "mkdisk":
        with open(args.disk, "wb") as f:
            f.truncate(args.size_mib << 20)
    else:
        serve(args.cmd, args)


if __name__ == "__main__":
    main()
