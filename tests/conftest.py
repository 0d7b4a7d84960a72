"""Shared fixtures. The real sshd lives in tests/sshd.py so any test tier can reuse it; other areas keep
their fixtures in their own tests/fixtures_*.py modules, listed in pytest_plugins."""

from sshd import sshd_server  # noqa: F401 - a fixture, found by name

pytest_plugins: list[str] = ["tests.fixtures_prefect"]
