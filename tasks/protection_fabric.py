"""Fabric drivers for the protection flows, behind one function.

Same convention as the flows branch's tasks/fabric.py (state directory from $SITERECOVERY_STATE, the
memory fabric's estate in <state>/memory-fabric.json, secrets from Prefect Secret blocks or the
environment); kept apart so the two can be unified at merge by re-pointing `get_fabric`.
"""

from __future__ import annotations

import os
from pathlib import Path

from siterecovery.errors import ConfigurationError
from siterecovery.fabric import Fabric
from siterecovery.model.topology import Credential
from siterecovery.protection import open_fabric, state_dir


def resolve_secret(cred: Credential) -> str:
    """A host credential's secret: a Prefect Secret block, an environment variable, or a key file."""
    if cred.secret_block:
        from prefect.blocks.system import Secret

        return str(Secret.load(cred.secret_block).get())  # type: ignore[union-attr]
    if cred.env:
        try:
            return os.environ[cred.env]
        except KeyError:
            raise ConfigurationError(f"environment variable {cred.env} is not set (named by a host credential)") from None
    assert cred.key_file is not None  # Credential guarantees exactly one source
    return Path(cred.key_file).expanduser().read_text()


def get_fabric(kind: str, state: str | Path | None = None) -> Fabric:
    """A driver for `kind` using the shared state directory."""
    return open_fabric(kind, state_dir(state), secrets=resolve_secret)
