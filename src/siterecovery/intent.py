"""Run intents: the identity under which a run's completed steps are cached, so that re-running a
half-failed plan resumes it, and only that.

Runs with the same parameters share one open intent until a run with it completes; the next run with
the same parameters then gets a new intent, so next week's failover is a real run and not a replay of
cached results. The journal is a small JSON file in the state directory, guarded by a file lock.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .model.common import Frozen
from .paths import INTENT_MAX, check_ident, child

# Closed intents kept for the record (and to refuse re-using an explicit one); older ones are dropped.
HISTORY = 500


class Intent(Frozen):
    id: str
    key: str
    resumed: bool = False
    explicit: bool = False


def intent_key(**parts: Any) -> str:
    """A stable digest of what a run is asked to do (plan, version, type, direction, point, options)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class IntentJournal:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "intents.json"

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
                data.setdefault("open", {})
                data.setdefault("closed", [])
                yield data
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                tmp.replace(self.path)
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)

    def begin(self, key: str, prefix: str, explicit: str | None = None, fresh: bool = False,
              params: dict[str, Any] | None = None) -> Intent:
        """The intent a run with parameters `key` uses: the open one for `key` (a resume), else a new one.

        `explicit` names the intent outright (refused when a run with it already completed);
        `fresh` always starts a new one (test failovers: their cleanup resets the estate, so there is
        nothing to resume). `params` (JSON) are kept with an open intent, so that it can be resumed by
        name (`recover/<plan>` action=resume) without the operator repeating them.
        """
        now = datetime.now(UTC).isoformat(timespec="seconds")
        if explicit:
            # Settable from the UI and it names a directory under the state directory: an identifier.
            check_ident(explicit, "intent", INTENT_MAX)
        with self._locked() as data:
            if explicit:
                if any(c["id"] == explicit for c in data["closed"]):
                    raise ConfigurationError(f"intent '{explicit}' already completed; a run with it would do "
                                             "nothing. Leave intent empty, or give a new one")
                resumed = explicit in {v["id"] for v in data["open"].values()}
                data["open"][f"explicit:{explicit}"] = {"id": explicit, "key": key, "created": now, "params": params}
                return Intent(id=explicit, key=key, resumed=resumed, explicit=True)
            current = data["open"].get(key)
            if current and not fresh:
                current["runs"] = current.get("runs", 1) + 1
                return Intent(id=current["id"], key=key, resumed=True)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            new_id = f"{prefix}-{stamp}-{secrets.token_hex(3)}"
            if not fresh:
                data["open"][key] = {"id": new_id, "key": key, "created": now, "runs": 1, "params": params}
            return Intent(id=new_id, key=key)

    def complete(self, intent: Intent, status: str = "completed") -> None:
        """Close the intent: later runs with the same parameters start afresh."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._locked() as data:
            for k, v in list(data["open"].items()):
                if v["id"] == intent.id:
                    del data["open"][k]
            data["closed"].append({"id": intent.id, "key": intent.key, "closed": now, "status": status})
            data["closed"] = data["closed"][-HISTORY:]

    def open_intents(self) -> dict[str, str]:
        with self._locked() as data:
            return {k: v["id"] for k, v in data["open"].items()}

    def open_entries(self) -> list[dict[str, Any]]:
        """The open intents with what was kept of them (id, key, created, params), oldest first."""
        with self._locked() as data:
            return sorted((dict(v) for v in data["open"].values()), key=lambda v: str(v.get("created")))


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return f"uid {os.getuid()}"


class StepJournal:
    """What each step of one intent did: one JSON line per finished step (completed or failed), shared
    by every run of the intent. A VM job skips the steps already completed here (a retry or a re-run
    never repeats them), and the report is built from it, so steps done by an earlier run of the same
    intent show as cached."""

    def __init__(self, state_dir: Path, intent_id: str) -> None:
        self.path = child(state_dir, "runs", intent_id, "steps.jsonl")
        self._cache: dict[str, dict[str, Any]] | None = None

    def add(self, kind: str, step_id: str, flow_run: str | None, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # `user`: who acted, for the audit trail (the OS account of the worker process).
        line = json.dumps({"kind": kind, "step": step_id, "flow_run": flow_run, "user": os_user(), "record": record},
                          default=str)
        with open(self.path, "a") as f:
            # One write of one line under an exclusive lock: lines from concurrent tasks never interleave.
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(line + "\n")
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def entries(self) -> dict[str, dict[str, Any]]:
        """step id -> its latest entry."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return out
        with open(self.path) as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            try:
                text = f.read()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        for line in text.splitlines():
            if line.strip():
                entry = json.loads(line)
                out[entry["step"]] = entry
        return out

    def completed(self, step_id: str) -> dict[str, Any] | None:
        entry = self.entries().get(step_id)
        return entry if entry and entry["record"].get("status") in ("completed", "approved") else None


class IntentBusy(ConfigurationError):
    """Another live process is running the same intent."""


class RunLock:
    """Held by the process running an intent, for as long as it runs: an exclusive flock on
    runs/<intent>/run.lock. The kernel drops it when the process dies (SIGKILL, OOM, a lost node), so a
    re-run can tell a dead earlier run from a live one and never runs one intent twice at once.

    It also lists the flow runs that ran the intent (runs/<intent>/flow_runs), so that a re-run can find
    earlier runs that died without telling the server and close them."""

    def __init__(self, state_dir: Path, intent_id: str) -> None:
        self.dir = child(state_dir, "runs", intent_id)
        self.path = self.dir / "run.lock"
        self._file: Any = None

    def acquire(self, flow_run: str | None) -> list[str]:
        """Take the lock (IntentBusy when a live process holds it); return the earlier flow runs."""
        self.dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise IntentBusy(f"intent {self.dir.name} is being run right now by a live process (flow run {holder}); "
                             "wait for it to finish, or cancel it first") from None
        f.seek(0)
        f.truncate()
        f.write(flow_run or "")
        f.flush()
        self._file = f
        runs = self.dir / "flow_runs"
        earlier = [r for r in (runs.read_text().split() if runs.exists() else []) if r != flow_run]
        if flow_run:
            with open(runs, "a") as out:
                out.write(flow_run + "\n")
        return earlier

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
