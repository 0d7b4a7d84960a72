"""Every test of this package runs once per fabric (the `subject` fixture); tests/fabric's conftest
provides the simulator, its hosts and the sshd these subjects are built on."""

from .subjects import subject  # noqa: F401 - a fixture, found by name
