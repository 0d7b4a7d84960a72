"""The guest agent client (replica/qga.py) against a fake agent on a unix socket: stale replies before the
sync delimiter are dropped, an earlier client's sync answer is not taken for ours, errors and silence
become GuestAgentError / GuestAgentTimeout, and every call has a deadline."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.replica import qga

Reply = Callable[[dict[str, Any]], bytes | None]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[..., tuple[str, list[bytes]]]]:
    """fake(on_request, greeting=b"") -> (socket path, raw bytes received); on_request(request) answers
    bytes to send back (None: stay silent)."""
    servers: list[tuple[socket.socket, threading.Thread]] = []

    def make(on_request: Reply, greeting: bytes = b"") -> tuple[str, list[bytes]]:
        path = str(tmp_path / f"qga{len(servers)}.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        got: list[bytes] = []

        def serve() -> None:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                if greeting:
                    conn.sendall(greeting)
                buf = b""
                while True:
                    try:
                        chunk = conn.recv(4096)
                    except OSError:
                        return
                    if not chunk:
                        return
                    got.append(chunk)
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        req = json.loads(line.replace(qga.DELIMITER, b""))
                        out = on_request(req)
                        if out is None:
                            continue
                        if out == b"CLOSE":
                            return
                        conn.sendall(out)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        servers.append((srv, t))
        return path, got

    yield make
    for srv, t in servers:
        srv.close()
        t.join(5)


def agent(answers: dict[str, Any], stale: bytes = b"") -> Reply:
    """A well-behaved agent: sync-delimited answered with 0xFF + the id (after `stale` bytes)."""
    def on(req: dict[str, Any]) -> bytes | None:
        if req["execute"] == "guest-sync-delimited":
            return stale + qga.DELIMITER + json.dumps({"return": req["arguments"]["id"]}).encode() + b"\n"
        return json.dumps(answers[req["execute"]]).encode() + b"\n"
    return on


def test_a_call_syncs_first_and_answers_the_commands_return(fake: Any) -> None:
    path, got = fake(agent({"guest-fsfreeze-freeze": {"return": 2}}))
    assert qga.call(path, "guest-fsfreeze-freeze", timeout=5) == 2
    sent = b"".join(got)
    assert sent.startswith(qga.DELIMITER)  # resets the agent's parser
    first, second = sent[1:].split(b"\n")[:2]
    assert json.loads(first)["execute"] == "guest-sync-delimited"
    assert json.loads(second) == {"execute": "guest-fsfreeze-freeze"}


def test_stale_replies_before_the_delimiter_are_dropped(fake: Any) -> None:
    # An earlier client's late answers (a freeze that timed out, a half line) wait in the port.
    stale = b'{"return": 7}\n{"error": {"class": "GenericError", "desc": "old"}}\n{"retu'
    path, _ = fake(agent({"guest-fsfreeze-status": {"return": "thawed"}}, stale=stale), greeting=b'{"return": 3}\n')
    assert qga.call(path, "guest-fsfreeze-status", timeout=5) == "thawed"


def test_an_earlier_sync_answer_is_not_taken_for_ours(fake: Any) -> None:
    def on(req: dict[str, Any]) -> bytes | None:
        if req["execute"] == "guest-sync-delimited":
            old = qga.DELIMITER + b'{"return": 1}\n'  # the sync of a client that gave up
            return old + qga.DELIMITER + json.dumps({"return": req["arguments"]["id"]}).encode() + b"\n"
        return b'{"return": {}}\n'
    path, _ = fake(on)
    assert qga.call(path, "guest-ping", timeout=5) == {}


def test_an_agent_error_is_a_guest_agent_error_with_its_description(fake: Any) -> None:
    path, _ = fake(agent({"guest-fsfreeze-freeze": {"error": {"class": "GenericError",
                                                               "desc": "failed to freeze /mnt: Device busy"}}}))
    with pytest.raises(qga.GuestAgentError, match="Device busy") as e:
        qga.call(path, "guest-fsfreeze-freeze", timeout=5)
    assert e.value.code == "GuestAgentError"


def test_a_guest_without_an_agent_times_out(fake: Any) -> None:
    path, got = fake(lambda req: None)  # QEMU's port is there, nothing in the guest answers
    with pytest.raises(qga.GuestAgentError, match="no answer in time") as e:
        qga.call(path, "guest-fsfreeze-freeze", timeout=0.3)
    # The freeze itself never went out: nothing to thaw.
    assert e.value.code == qga.NOT_SENT and b"guest-fsfreeze-freeze" not in b"".join(got)


def test_an_answer_to_the_sync_then_silence_times_out(fake: Any) -> None:
    def on(req: dict[str, Any]) -> bytes | None:
        if req["execute"] == "guest-sync-delimited":
            return qga.DELIMITER + json.dumps({"return": req["arguments"]["id"]}).encode() + b"\n"
        return None
    path, _ = fake(on)
    with pytest.raises(qga.GuestAgentTimeout, match="guest-fsfreeze-freeze") as e:
        qga.call(path, "guest-fsfreeze-freeze", timeout=0.3)
    assert e.value.code == "GuestAgentTimeout"  # sent: the freeze may still happen, so the caller thaws


def test_no_socket_or_a_closed_connection_is_unreachable(fake: Any, tmp_path: Path) -> None:
    with pytest.raises(qga.GuestAgentError, match="was not sent") as e:
        qga.call(str(tmp_path / "absent.sock"), "guest-ping", timeout=1)
    assert e.value.code == qga.NOT_SENT
    path, _ = fake(lambda req: b"CLOSE")
    with pytest.raises(qga.GuestAgentError, match="closed") as e:
        qga.call(path, "guest-ping", timeout=5)
    assert e.value.code == qga.NOT_SENT

    def close_after_sync(req: dict[str, Any]) -> bytes:
        if req["execute"] == "guest-sync-delimited":
            return qga.DELIMITER + json.dumps({"return": req["arguments"]["id"]}).encode() + b"\n"
        return b"CLOSE"
    path, _ = fake(close_after_sync)
    with pytest.raises(qga.GuestAgentError, match="closed") as e:
        qga.call(path, "guest-fsfreeze-freeze", timeout=5)
    assert e.value.code == "GuestAgentUnreachable"  # the freeze went out: its outcome is unknown
