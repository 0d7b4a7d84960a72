"""Fabric drivers behind one Protocol, and the registry that maps a fabric kind to its driver.

Drivers are imported lazily: the hyperv driver needs only paramiko, the linux driver the replication
engine; neither should load when a plan runs on the other.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .base import (
    LATEST,
    Fabric,
    Health,
    OpResult,
    Placement,
    PointChoice,
    RecoveryPoint,
    ReplicationHealth,
    ReplicationMode,
    ReplicationState,
)

_DRIVERS: dict[str, str] = {
    "memory": "siterecovery.fabric.memory:MemoryFabric",
    "linux": "siterecovery.fabric.linux:LinuxFabric",
    "hyperv": "siterecovery.fabric.hyperv:HyperVFabric",
}


@dataclass
class FabricContext:
    """What a driver gets from its caller: where to keep state and how to reach secrets."""

    # The project's estate, from siterecovery.estate (the one resolver). No default: a driver that keeps
    # state (linux) refuses to start without it rather than open a second estate in the current directory.
    state_dir: Path | None = None
    # Resolves a Credential to the secret's text (Prefect Secret block or environment variable);
    # flows pass one that knows Prefect, the core only environment variables.
    secrets: Any = None
    options: dict[str, Any] = field(default_factory=dict)


def register(kind: str, target: str) -> None:
    """Register a driver as 'module:Class' under a fabric kind."""
    _DRIVERS[kind] = target


def known_kinds() -> list[str]:
    return sorted(_DRIVERS)


def driver_for(kind: str, context: FabricContext | None = None) -> Fabric:
    """A driver instance for `kind`; an unknown kind lists the known ones."""
    try:
        target = _DRIVERS[str(kind)]
    except KeyError:
        raise ConfigurationError(f"unknown fabric kind '{kind}' (known: {', '.join(known_kinds())})") from None
    module, _, cls = target.partition(":")
    driver_cls = getattr(importlib.import_module(module), cls)
    return driver_cls(context or FabricContext())  # type: ignore[no-any-return]


__all__ = [
    "LATEST", "Fabric", "FabricContext", "Health", "OpResult", "Placement", "PointChoice", "RecoveryPoint",
    "ReplicationHealth", "ReplicationMode", "ReplicationState", "driver_for", "known_kinds", "register",
]
