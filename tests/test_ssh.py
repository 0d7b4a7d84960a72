"""ssh.connect verifies host keys (pinned or known_hosts); ssh.Pool.run quotes argv exactly, delivers
stdin, reuses one connection per host identity, reconnects a dropped one and keeps its deadline."""

from __future__ import annotations

import logging
import time

import pytest
from sshd import SSHServer, keygen

from siterecovery import ssh
from siterecovery.errors import (
    CommandTimedOut,
    ConnectionFailed,
    FabricError,
    HostKeyError,
    TransientFabricError,
)

pytestmark = pytest.mark.sshd


def test_pinned_key_accepted_and_argv_round_trips(sshd_server: SSHServer) -> None:
    with ssh.Pool() as pool:
        h = sshd_server.host()
        tricky = ["it's", "a b", "$(touch /tmp/pwned)", "`x`", "\\", "*", ""]
        r = pool.run(h, ["printf", "%s|", *tricky])
        assert r.rc == 0, r.stderr
        assert r.stdout.decode() == "".join(f"{t}|" for t in tricky)
        assert r.host == "h1" and r.seconds > 0
        assert pool.run(h, ["false"]).rc == 1
        r = pool.run(h, ["sh", "-c", "echo oops >&2; exit 3"])
        assert (r.rc, r.stdout, r.stderr) == (3, b"", b"oops\n")
        # AES-GCM is negotiated when the server offers it.
        cipher = pool.client(h).get_transport().remote_cipher  # type: ignore[union-attr]
        assert cipher in ssh.GCM_FIRST


def test_stdin_delivered_whole(sshd_server: SSHServer) -> None:
    data = bytes(range(256)) * 40_000  # 10 MB: many windows' worth, both ways at once
    with ssh.Pool() as pool:
        r = pool.run(sshd_server.host(), ["cat"], stdin=data, deadline=60)
        assert r.rc == 0 and r.stdout == data
        r = pool.run(sshd_server.host(), ["wc", "-c"], stdin=b"x" * 300_000)
        assert r.stdout.strip() == b"300000"
        # a command that reads none of its stdin still finishes
        assert pool.run(sshd_server.host(), ["true"], stdin=b"y" * 5_000_000, deadline=30).rc == 0


def test_deadline_stops_a_hung_command_and_names_the_host(sshd_server: SSHServer) -> None:
    with ssh.Pool() as pool:
        h = sshd_server.host(name="slow-1")
        t0 = time.monotonic()
        with pytest.raises(CommandTimedOut) as e:
            pool.run(h, ["sleep", "30"], deadline=1.5)
        took = time.monotonic() - t0
        assert took < 5, took
        assert e.value.host == "slow-1" and "slow-1" in str(e.value) and "1.5 s" in e.value.message
        assert e.value.sent  # it had its (empty) stdin: it may have acted
        assert isinstance(e.value, TransientFabricError)
        # Output that keeps flowing does not extend the deadline (a per-read timeout would never fire).
        t1 = time.monotonic()
        with pytest.raises(CommandTimedOut):
            pool.run(h, ["sh", "-c", "while true; do echo tick; sleep 0.2; done"], deadline=1.5)
        assert time.monotonic() - t1 < 5
        # The same pooled connection still serves the next command.
        assert pool.run(h, ["true"]).rc == 0 and pool.connects == 1
        # Deadline on write: stdin the command never reads, more than the windows hold.
        with pytest.raises(CommandTimedOut) as e:
            pool.run(h, ["sleep", "30"], stdin=b"z" * (64 << 20), deadline=1.5)
        assert not e.value.sent and time.monotonic() - t0 < 15


def test_one_connection_for_two_runs(sshd_server: SSHServer) -> None:
    with ssh.Pool() as pool:
        # SSH_CONNECTION names the client's port: one TCP connection answers both.
        a = pool.run(sshd_server.host(name="a"), ["sh", "-c", 'echo "$SSH_CONNECTION"']).stdout
        b = pool.run(sshd_server.host(name="b"), ["sh", "-c", 'echo "$SSH_CONNECTION"']).stdout
        assert a == b and a.strip()
        assert pool.connects == 1
        # A different identity (here: another user) is another connection.
        other = sshd_server.host(user="nobody-else")
        assert ssh.identity(other) != ssh.identity(sshd_server.host())


def test_dropped_connection_reconnects_once(sshd_server: SSHServer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    h = sshd_server.host()
    with ssh.Pool() as pool:
        first = pool.run(h, ["sh", "-c", 'echo "$SSH_CONNECTION"']).stdout
        # The server side drops the connection: kill the sshd process serving this session.
        with pytest.raises(ConnectionFailed) as e:
            pool.run(h, ["sh", "-c", "kill -9 $PPID; sleep 5"], deadline=10)
        assert e.value.host == "h1" and e.value.error_id == "ConnectionLost"
        again = pool.run(h, ["sh", "-c", 'echo "$SSH_CONNECTION"']).stdout
        assert again and again != first and pool.connects == 2
        # Dropped silently under the pool (no one saw it close): the next run still gets through.
        pool.client(h).get_transport().sock.close()  # type: ignore[union-attr]
        assert pool.run(h, ["echo", "ok"]).stdout == b"ok\n" and pool.connects == 3
        # Dropped although the check before use passed (it closed just after): opening the session
        # fails, and the pool reconnects once before anything was sent.
        pool.client(h).get_transport().close()  # type: ignore[union-attr]
        monkeypatch.setattr(pool, "_usable", lambda client, timeout: True)
        assert pool.run(h, ["echo", "ok"]).stdout == b"ok\n" and pool.connects == 4


def test_pool_refuses_a_changed_host_key(sshd_server: SSHServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = keygen(tmp_path / "other")
    kind, b64 = other.split()[:2]
    with ssh.Pool() as pool, pytest.raises(HostKeyError, match="CHANGED") as e:
        pool.run(sshd_server.host(host_key=f"{kind} {b64}"), ["true"])
    assert e.value.host == "h1"
    assert pool.connects == 0


def test_secrets_stay_out_of_logs_and_errors(sshd_server: SSHServer, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SR_TEST_KEY", sshd_server.client_key.read_text())
    h = sshd_server.host(credential={"env": "SR_TEST_KEY"})
    caplog.set_level(logging.DEBUG)
    with ssh.Pool() as pool:
        assert pool.run(h, ["echo", "s3cr3t-value"]).rc == 0
        with pytest.raises(CommandTimedOut) as e:
            pool.run(h, ["sh", "-c", "sleep 10", "s3cr3t-value"], deadline=0.5)
    text = caplog.text + str(e.value)
    assert "s3cr3t-value" not in text and "PRIVATE KEY" not in text


def test_windows_command_line_is_plain_tokens() -> None:
    from siterecovery.fabric.hyperv import COMMAND
    from siterecovery.model import Host
    hv = Host(name="hv1", site="s", fabric="hyperv", address="hv1.example")
    assert ssh.command_line(hv, COMMAND.split()) == COMMAND
    with pytest.raises(ValueError, match="plain tokens"):
        ssh.command_line(hv, ["powershell.exe", "-Command", "Get-VM 'a b'"])
    lx = Host(name="l1", site="s", fabric="linux", address="l1.example")
    assert ssh.command_line(lx, ["echo", "a b"]) == "echo 'a b'"


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
