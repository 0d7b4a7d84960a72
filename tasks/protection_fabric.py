"""Fabric drivers for the protection flows, behind one function: the protection core's driver factory
with the flows' secret resolver (tasks/fabric.py), so both kinds of flow read secrets one way."""

from __future__ import annotations

from pathlib import Path

from siterecovery.fabric import Fabric
from siterecovery.protection import open_fabric
from tasks.fabric import resolve_secret


def get_fabric(kind: str, state: str | Path) -> Fabric:
    """A driver for `kind` on the project's estate (siterecovery.estate resolves it)."""
    return open_fabric(kind, Path(state), secrets=resolve_secret)
