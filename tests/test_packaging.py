"""flows/ and tasks/ are installed with the package (issue 14): the installed CLI runs plans from any
directory, and pyproject's explicit package list matches the packages on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_list_names_every_package_on_disk() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    found |= {d for d in ("flows", "tasks") if (ROOT / d / "__init__.py").exists()}
    assert listed == found


def test_flows_and_tasks_import_outside_the_checkout(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", "import flows.recovery_plan, flows.protection, tasks.vm; "
                        "print(flows.recovery_plan.__file__)"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == ROOT / "flows" / "recovery_plan.py"
