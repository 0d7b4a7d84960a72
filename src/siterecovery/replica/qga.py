"""A client for the QEMU guest agent (qemu-ga) on a VM's virtio-serial port, as QEMU exposes it on the host.

QEMU serves the port `org.qemu.guest_agent.0` on a unix socket in the VM's run directory (qemu.py). The
agent speaks one JSON object per line, but a port keeps whatever an earlier client left unread (a reply
that came after its deadline), so every call first sends `guest-sync-delimited` with a fresh id: the agent
answers with a 0xFF byte and then that id, and everything before it is stale and dropped. Every call has
one deadline covering connect, sync and the command: a guest without an agent never answers at all.
"""

from __future__ import annotations

import json
import random
import socket
import time
from typing import Any

from .engine import ReplicaError

TIMEOUT = 10.0
DELIMITER = b"\xff"
NOT_SENT = "GuestAgentNotSent"


class GuestAgentError(ReplicaError):
    """The guest agent answered with an error, or could not be reached."""

    code = "GuestAgentError"


class GuestAgentTimeout(GuestAgentError):
    code = "GuestAgentTimeout"


class _Conn:
    def __init__(self, path: str, deadline: float) -> None:
        self.path, self.deadline, self.buf = path, deadline, b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._settimeout("connecting")
            self.sock.connect(path)
        except TimeoutError:
            self.sock.close()
            raise GuestAgentTimeout(f"guest agent socket {path}: connect timed out", code="GuestAgentTimeout") from None
        except OSError as exc:
            self.sock.close()
            raise GuestAgentError(f"guest agent socket {path}: {exc.strerror or exc} (the VM has no agent port, "
                                  "or QEMU is not running)", code="GuestAgentUnreachable") from None

    def _settimeout(self, doing: str) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise GuestAgentTimeout(f"guest agent at {self.path}: no answer in time ({doing})", code="GuestAgentTimeout")
        self.sock.settimeout(left)

    def send(self, data: bytes, doing: str) -> None:
        self._settimeout(doing)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise GuestAgentTimeout(f"guest agent at {self.path}: no answer in time ({doing})",
                                    code="GuestAgentTimeout") from None
        except OSError as exc:
            raise GuestAgentError(f"guest agent at {self.path}: {exc}", code="GuestAgentUnreachable") from None

    def _fill(self, doing: str) -> None:
        self._settimeout(doing)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise GuestAgentTimeout(f"guest agent at {self.path}: no answer in time ({doing})",
                                    code="GuestAgentTimeout") from None
        except OSError as exc:
            raise GuestAgentError(f"guest agent at {self.path}: {exc}", code="GuestAgentUnreachable") from None
        if not chunk:
            raise GuestAgentError(f"guest agent at {self.path}: the connection closed ({doing})",
                                  code="GuestAgentUnreachable")
        self.buf += chunk

    def skip_to_delimiter(self, doing: str) -> None:
        while DELIMITER not in self.buf:
            self.buf = b""  # all stale
            self._fill(doing)
        self.buf = self.buf.split(DELIMITER, 1)[1]

    def line(self, doing: str) -> dict[str, Any]:
        """The next JSON object; bytes that are not one (a partial stale reply, stray delimiters) are skipped."""
        while True:
            while b"\n" not in self.buf:
                self._fill(doing)
            raw, self.buf = self.buf.split(b"\n", 1)
            raw = raw.replace(DELIMITER, b"").strip()
            if not raw:
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj

    def close(self) -> None:
        self.sock.close()


def call(path: str, command: str, args: dict[str, Any] | None = None, timeout: float = TIMEOUT) -> Any:
    """Run one agent command within `timeout` seconds; its `return` value. Raises GuestAgentError with
    code GuestAgentNotSent when the agent could not be reached or did not answer the sync (no agent in
    the guest: the command never reached it), GuestAgentTimeout when the command itself got no answer in
    time (it may still run: a busy guest), GuestAgentError for the agent's own errors."""
    deadline = time.monotonic() + timeout
    try:
        conn = _Conn(path, deadline)
    except GuestAgentError as exc:
        raise GuestAgentError(f"{exc}; {command} was not sent", code=NOT_SENT) from None
    try:
        sync_id = random.randrange(1, 2**31)
        try:
            # The leading 0xFF resets the agent's parser (a half-sent request of an earlier client).
            conn.send(DELIMITER + json.dumps({"execute": "guest-sync-delimited",
                                              "arguments": {"id": sync_id}}).encode() + b"\n", "guest-sync-delimited")
            while True:
                conn.skip_to_delimiter("guest-sync-delimited")
                reply = conn.line("guest-sync-delimited")
                if reply.get("return") == sync_id:
                    break  # replies of earlier syncs (other ids) were stale: look for the next delimiter
        except GuestAgentError as exc:
            # The agent never saw the command: a caller need not undo it (no thaw after a freeze not sent).
            raise GuestAgentError(f"{exc}; {command} was not sent", code=NOT_SENT) from None
        req: dict[str, Any] = {"execute": command}
        if args:
            req["arguments"] = args
        conn.send(json.dumps(req).encode() + b"\n", command)
        while True:
            reply = conn.line(command)
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                raise GuestAgentError(f"guest agent: {command}: {err.get('desc') or reply['error']}",
                                      code="GuestAgentError")
            if "return" in reply:
                return reply["return"]
            # an event or anything else without an answer: not ours
    finally:
        conn.close()
