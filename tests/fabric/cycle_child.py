"""A replicate cycle in its own process, for the orchestrator-killed fault test: `python cycle_child.py
STATE_DIR PLACEMENT_JSON PYTHON`. Prints "go" just before the cycle and "done <bytes>" after it, so the
test can SIGKILL it at chosen moments of a real cycle over the real sshd."""

from __future__ import annotations

import sys
from pathlib import Path

from siterecovery.fabric import FabricContext
from siterecovery.fabric.base import Placement
from siterecovery.fabric.linux import LinuxFabric


def main() -> None:
    state, pjson, python = sys.argv[1:4]
    p = Placement.model_validate_json(Path(pjson).read_text())
    f = LinuxFabric(FabricContext(state_dir=Path(state), options={"python": python, "ssh_timeout": 30}))
    f._client(p.source), f._client(p.target)  # connect first: the kill lands inside the cycle itself
    print("go", flush=True)
    r = f.replicate(p)
    print("done", r.bytes_sent, flush=True)
    f.close()


if __name__ == "__main__":
    main()
