"""ssh.connect verifies host keys (pinned or known_hosts) and ssh.run quotes argv exactly."""

from __future__ import annotations

import pytest
from sshd import SSHServer, keygen

from siterecovery import ssh
from siterecovery.errors import ConnectionFailed, FabricError, HostKeyError, TransientFabricError

pytestmark = pytest.mark.sshd


def test_pinned_key_accepted_and_argv_round_trips(sshd_server: SSHServer) -> None:
    c = ssh.connect(sshd_server.host())
    try:
        tricky = ["it's", "a b", "$(touch /tmp/pwned)", "`x`", "\\", "*", ""]
        rc, out, err = ssh.run(c, ["printf", "%s|", *tricky])
        assert rc == 0, err
        assert out.decode() == "".join(f"{t}|" for t in tricky)
        rc, _, _ = ssh.run(c, ["false"])
        assert rc == 1
        rc, out, _ = ssh.run(c, ["cat"], stdin=b"x" * 300_000)
        assert out == b"x" * 300_000
        # AES-GCM is negotiated when the server offers it.
        cipher = c.get_transport().remote_cipher  # type: ignore[union-attr]
        assert cipher in ssh.GCM_FIRST
    finally:
        c.close()


def test_known_hosts_file_accepted(sshd_server: SSHServer) -> None:
    h = sshd_server.host(host_key=None, known_hosts=str(sshd_server.known_hosts))
    ssh.connect(h).close()


def test_unknown_key_refused(sshd_server: SSHServer) -> None:
    with pytest.raises(HostKeyError, match="unknown SSH host key") as e:
        ssh.connect(sshd_server.host(host_key=None))
    assert "Next:" in str(e.value)


def test_changed_key_refused(sshd_server: SSHServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = keygen(tmp_path / "other")
    kind, b64 = other.split()[:2]
    with pytest.raises(HostKeyError, match="CHANGED"):
        ssh.connect(sshd_server.host(host_key=f"{kind} {b64}"))
    kh = tmp_path / "kh"
    kh.write_text(f"[127.0.0.1]:{sshd_server.port} {kind} {b64}\n")
    with pytest.raises(HostKeyError, match="CHANGED"):
        ssh.connect(sshd_server.host(host_key=None, known_hosts=str(kh)))


def test_bad_credential_is_a_permanent_fabric_error(sshd_server: SSHServer, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    keygen(tmp_path / "stranger")
    monkeypatch.setenv("SR_TEST_KEY", (tmp_path / "stranger").read_text())
    with pytest.raises(FabricError, match="authentication") as e:
        ssh.connect(sshd_server.host(credential={"env": "SR_TEST_KEY"}))
    assert e.value.error_id == "AuthenticationFailed"
    assert not isinstance(e.value, TransientFabricError)  # a retry with the same key cannot help
    assert "BEGIN OPENSSH" not in str(e.value)
    # the right key through an environment variable works
    monkeypatch.setenv("SR_TEST_KEY", sshd_server.client_key.read_text())
    ssh.connect(sshd_server.host(credential={"env": "SR_TEST_KEY"})).close()


def test_unreachable_port_is_transient(sshd_server: SSHServer) -> None:
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{port}") as e:
        ssh.connect(sshd_server.host(port=port), timeout=5)
    assert isinstance(e.value, TransientFabricError) and e.value.host == "h1"


def test_missing_credential_variable_names_the_host(sshd_server: SSHServer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from siterecovery.errors import ConfigurationError
    monkeypatch.delenv("SR_NOT_SET", raising=False)
    with pytest.raises(ConfigurationError, match="host h1: environment variable SR_NOT_SET is not set"):
        ssh.connect(sshd_server.host(credential={"env": "SR_NOT_SET"}))


def test_gcm_negotiated_and_cbc_never_offered(sshd_server: SSHServer) -> None:
    c = ssh.connect(sshd_server.host())
    try:
        t = c.get_transport()
        assert t is not None
        assert t.remote_cipher.endswith("-gcm@openssh.com") and t.local_cipher == t.remote_cipher
        offered = t.get_security_options().ciphers
        assert offered[0] == ssh.GCM_FIRST[0] and not any("-cbc" in x for x in offered)
    finally:
        c.close()
