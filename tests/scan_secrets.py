"""Scan what a run produced for secret material: files under directories (logs, reports, state, pytest's
tmp dirs), strings, and a Prefect server's stored logs, artifacts and flow-run parameters.

Usable on its own after any test run, no make needed:
    python tests/scan_secrets.py /tmp/pytest-of-$USER --secret "$CANARY" --key-file id_ed25519
exits 1 and names file and offset for every hit. A private key counts as leaked when any line of its
base64 body appears (a partial dump is still a leak); strings are also looked for JSON- and repr-escaped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_FILE = 64 * 1024 * 1024  # bigger files (databases of a long soak) are read in their first 64 MiB


@dataclass(frozen=True)
class Hit:
    where: str
    needle: str  # a short, safe label of what was found (never the secret itself)
    offset: int


def needles(secrets: Iterable[str] = (), keys: Iterable[str] = ()) -> dict[str, bytes]:
    """label -> bytes to look for: each secret raw and escaped, each key's body lines (min 16 chars)."""
    out: dict[str, bytes] = {}
    for i, s in enumerate(secrets):
        for form in {s, json.dumps(s)[1:-1], repr(s)[1:-1]}:
            out[f"secret#{i} ({len(s)} chars){'' if form == s else ' escaped'}"] = form.encode()
    for k, text in enumerate(keys):
        body = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("-----")]
        for j, line in enumerate(body):
            if len(line) >= 16:
                out[f"key#{k} body line {j}"] = line.encode()
    return out


def scan_bytes(where: str, data: bytes, wanted: dict[str, bytes]) -> list[Hit]:
    return [Hit(where, label, data.find(n)) for label, n in wanted.items() if n and n in data]


def scan_paths(paths: Iterable[Path], wanted: dict[str, bytes], skip: Iterable[Path] = ()) -> tuple[list[Hit], int]:
    """Every regular file under `paths` (except `skip`, e.g. the key file itself); (hits, files read)."""
    skipped = {p.resolve() for p in skip}
    hits: list[Hit] = []
    count = 0
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for f in files:
            if f.resolve() in skipped:
                continue
            try:
                with open(f, "rb") as fh:
                    data = fh.read(MAX_FILE)
            except OSError:
                continue
            count += 1
            hits += scan_bytes(str(f), data, wanted)
    return hits, count


def scan_objects(label: str, objects: Iterable[Any], wanted: dict[str, bytes]) -> list[Hit]:
    """str, repr and JSON of each object (exceptions, summaries, pydantic models)."""
    hits: list[Hit] = []
    for i, o in enumerate(objects):
        dump = o.model_dump_json() if hasattr(o, "model_dump_json") else json.dumps(o, default=str)
        for form in (str(o), repr(o), dump):
            hits += scan_bytes(f"{label}[{i}]", form.encode("utf-8", "replace"), wanted)
    return hits


def scan_prefect(wanted: dict[str, bytes]) -> tuple[list[Hit], dict[str, int]]:
    """The server's stored flow runs (parameters, state messages), task runs, logs and artifacts, through
    the client API (PREFECT_API_URL decides which server)."""
    from prefect.client.orchestration import get_client

    hits: list[Hit] = []
    counts: dict[str, int] = {}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
        tasks = client.read_task_runs(limit=200)
        logs = client.read_logs(limit=200)
        more = logs
        while len(more) == 200:  # page through every stored log line
            more = client.read_logs(limit=200, offset=len(logs))
            logs += more
        arts = client.read_artifacts(limit=200)
    counts.update(flow_runs=len(runs), task_runs=len(tasks), logs=len(logs), artifacts=len(arts))
    for r in runs:
        hits += scan_bytes(f"flow run {r.id} parameters/state", (json.dumps(r.parameters, default=str)
                                                                + str(r.state)).encode(), wanted)
    for t in tasks:
        hits += scan_bytes(f"task run {t.id}", t.model_dump_json().encode(), wanted)
    for lg in logs:
        hits += scan_bytes(f"log of run {lg.flow_run_id}", lg.message.encode("utf-8", "replace"), wanted)
    for a in arts:
        hits += scan_bytes(f"artifact {a.key}", json.dumps(a.data, default=str).encode() + (a.description or "").encode(),
                           wanted)
    return hits, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, help="files or directories to scan")
    ap.add_argument("--secret", action="append", default=[], help="a secret string (repeatable)")
    ap.add_argument("--secret-env", action="append", default=[], help="read a secret from this env variable")
    ap.add_argument("--key-file", action="append", default=[], type=Path, help="a private key whose body must not appear")
    ap.add_argument("--prefect", action="store_true", help="also scan the Prefect server at PREFECT_API_URL")
    a = ap.parse_args(argv)
    import os

    secrets = a.secret + [os.environ[e] for e in a.secret_env if os.environ.get(e)]
    wanted = needles(secrets, [k.read_text() for k in a.key_file])
    if not wanted:
        ap.error("nothing to look for: give --secret, --secret-env or --key-file")
    hits, n = scan_paths(a.paths, wanted, skip=a.key_file)
    extra = ""
    if a.prefect:
        more, counts = scan_prefect(wanted)
        hits += more
        extra = "; prefect: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    for h in hits:
        print(f"LEAK {h.needle} in {h.where} at offset {h.offset}")
    print(f"scanned {n} files{extra}: {len(hits)} leaks")
    return 1 if hits else 0


if __name__ == "__main__":
    sys.exit(main())
