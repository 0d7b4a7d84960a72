"""Shared fixtures: the real sshd lives in tests/sshd.py so any test tier can reuse it."""

from sshd import sshd_server  # noqa: F401 - a fixture, found by name
