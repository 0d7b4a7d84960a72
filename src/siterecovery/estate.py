"""Where a project's estate lives: the one resolver of the state directory, and the estate's identity.

The estate is the orchestrator's state directory for one project: VM records, the linux hosts' default
roots (replicas included), intents, reports and leases. Two estates for one project each hold their own
replicas, and a failover from the wrong one boots stale data while saying "succeeded", so every command
and flow resolves the estate here, from the project, never from the current directory; and an estate
records the project it belongs to (an id and the project's real path) and refuses any other.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

STATE_ENV = "SITERECOVERY_STATE"
ESTATE_FILE = "estate.json"
HOME_NAME = ".siterecovery"


class EstateError(ConfigurationError):
    """A command would use a second estate for a project that has one, or another project's estate."""


def project_root(project: Path | str) -> Path:
    """The project's directory, resolved (a file's project is its directory)."""
    p = Path(project).expanduser().resolve()
    return p if p.is_dir() or not p.suffix else p.parent


def home(project: Path | str) -> Path:
    """The project's default estate: `.siterecovery` beside the project directory (for a checkout's
    `plans/`, the checkout's `.siterecovery`, which is also the Makefile's STATE)."""
    return project_root(project).parent / HOME_NAME


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / ESTATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EstateError(f"{path / ESTATE_FILE}: unreadable estate record ({exc}); it says which project owns "
                          "this state directory: restore it from a backup rather than deleting it") from None
    if not isinstance(data, dict) or not isinstance(data.get("project_root"), str):
        raise EstateError(f"{path / ESTATE_FILE}: not an estate record (no project_root)")
    return data


def _explicit(explicit: Path | str | None) -> Path | None:
    chosen = explicit or os.environ.get(STATE_ENV)
    return Path(chosen).expanduser().resolve() if chosen else None


def state_dir(project: Path | str, explicit: Path | str | None = None) -> Path:
    """The project's state directory, without creating anything: `explicit` (a --state option), else
    $SITERECOVERY_STATE, else the project's home, or where the home says the estate was created."""
    chosen = _explicit(explicit)
    if chosen is not None:
        return chosen
    at = home(project)
    rec = _read(at)
    if rec and rec.get("location") and rec["project_root"] == str(project_root(project)):
        return Path(rec["location"])
    return at


def open_estate(project: Path | str, explicit: Path | str | None = None, *, create: bool = True) -> Path:
    """The project's state directory, checked: it belongs to this project, and no other estate of the
    project exists. With `create`, a new estate is recorded (and the project's home points to it when it
    lives elsewhere, so a command run without $SITERECOVERY_STATE finds it); read-only callers pass
    create=False and nothing is written."""
    root = str(project_root(project))
    state = state_dir(project, explicit)
    rec = _read(state)
    if rec is not None and not rec.get("location"):
        if rec["project_root"] != root:
            raise EstateError(
                f"state directory {state} belongs to the project at {rec['project_root']} (estate "
                f"{rec.get('estate_id')}), not to {root}: choose this project's own state directory with "
                f"--state or ${STATE_ENV}. If the project moved, set project_root in {state / ESTATE_FILE}.")
        return state
    existing = _existing_elsewhere(project, state)
    if existing is not None:
        raise EstateError(
            f"the project at {root} already has its estate in {existing}; using {state} would make a second "
            f"estate with its own replicas and records, and a failover from it would boot stale data. Use "
            f"{existing} (unset ${STATE_ENV} or pass --state {existing}), or remove it first.")
    if create:
        _record(project, state)
    return state


def _existing_elsewhere(project: Path | str, state: Path) -> Path | None:
    """Another live estate of this project, found through the project's home."""
    root = str(project_root(project))
    at = home(project)
    rec = _read(at)
    if rec is None or rec["project_root"] != root:
        return None
    where = Path(rec.get("location") or at)
    if where == state:
        return None
    there = _read(where) if where != at else rec
    if there is None or there.get("location") or there["project_root"] != root:
        return None  # the estate it pointed to is gone: a new one may take its place
    return where


def _record(project: Path | str, state: Path) -> None:
    root = str(project_root(project))
    rec = {"estate_id": uuid.uuid4().hex, "project_root": root,
           "created": datetime.now(UTC).isoformat(timespec="seconds")}
    state.mkdir(parents=True, exist_ok=True)
    _write(state, rec)
    at = home(project)
    if at != state:
        # The home remembers where the estate went, so the next command finds it without the variable.
        at.mkdir(parents=True, exist_ok=True)
        _write(at, {"project_root": root, "location": str(state), "estate_id": rec["estate_id"]})


def _write(directory: Path, rec: dict[str, Any]) -> None:
    tmp = directory / f".{ESTATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, directory / ESTATE_FILE)
