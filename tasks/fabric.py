"""The one place flows and tasks obtain fabric drivers and secrets.

The state directory comes from siterecovery.estate (the one resolver); it holds the memory fabric's
shared estate, the intent journal, persisted task results and the HTML reports.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from siterecovery.errors import ConfigurationError
from siterecovery.fabric import Fabric, FabricContext, driver_for
from siterecovery.model import Credential

_DRIVERS: dict[tuple[str, str, str], Fabric] = {}
_LOCK = threading.Lock()


def resolve_secret(cred: Credential) -> str:
    """A Credential's secret text: a Prefect Secret block or an environment variable. The value goes
    to the driver only; it is never logged, returned as a task result or written to a report."""
    if cred.secret_block:
        from prefect.blocks.system import Secret

        try:
            block = Secret.load(cred.secret_block)
        except ValueError:
            raise ConfigurationError(f"Prefect Secret block '{cred.secret_block}' does not exist "
                                     "(create it in the UI or with Secret(value=...).save(name))") from None
        return str(block.get())  # type: ignore[union-attr]
    if cred.env:
        value = os.environ.get(cred.env)
        if value is None:
            raise ConfigurationError(f"environment variable {cred.env} is not set (it holds a host credential)")
        return value
    if cred.key_file:
        return Path(cred.key_file).expanduser().read_text()
    raise ConfigurationError("the credential names no secret source")


def get_fabric(kind: str, state: Path, options: dict[str, Any] | None = None) -> Fabric:
    """One driver per (kind, state dir, options) per process, shared by the tasks' threads.

    The memory fabric keeps its estate in <state>/memory-fabric.json so that a flow run, a re-run in
    another process and the test asserting on it see one estate; `options={"state_file": None}` keeps
    it in this process only (the benchmark: no file I/O per call).
    """
    opts = dict(options or {})
    if kind == "memory" and "state_file" not in opts:
        opts["state_file"] = str(state / "memory-fabric.json")
    if opts.get("state_file") is None:
        opts.pop("state_file", None)
    key = (kind, str(state), json.dumps(opts, sort_keys=True, default=str))
    with _LOCK:
        drv = _DRIVERS.get(key)
        if drv is None:
            drv = driver_for(kind, FabricContext(state_dir=state, secrets=resolve_secret, options=opts))
            _DRIVERS[key] = drv
        return drv


def close_all() -> None:
    with _LOCK:
        for drv in _DRIVERS.values():
            drv.close()
        _DRIVERS.clear()


_STORAGE: dict[str, Any] = {}


def result_storage(state: Path) -> Any:
    """The persisted-results store of a state directory (what lets a re-run find completed tasks).

    Prefect needs the storage block saved server-side: one LocalFileSystem block per state directory,
    named after a digest of its path, saved once per process.
    """
    import hashlib

    from prefect.filesystems import LocalFileSystem

    path = str(state / "results")
    name = f"siterecovery-results-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
    with _LOCK:
        block = _STORAGE.get(path)
        if block is None:
            block = LocalFileSystem(basepath=path)
            _save_block(block, name)
            _STORAGE[path] = block
        return block


def _save_block(block: Any, name: str, attempts: int = 5) -> None:
    """Save a block, trying again when a fresh server races with itself.

    Measured on Prefect 3.8 with PostgreSQL: the first block saves of a new database, made at once by several
    runs, race to create the server's encryption key; the loser answers 500, the client's retry then meets
    "already exists" and reads back nothing (ObjectNotFound), and the run died. Saving is idempotent
    (overwrite), so a bounded retry is safe.
    """
    import random
    import time

    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError

    for attempt in range(attempts):
        try:
            block.save(name, overwrite=True)
            return
        except (ObjectNotFound, ObjectAlreadyExists, PrefectHTTPStatusError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
