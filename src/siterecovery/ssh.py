"""SSH to managed hosts: one pool of verified paramiko connections and one way to run a command.

Every remote call (the hyperv and linux drivers, the replication agents' channels, plan scripts) goes
through a `Pool`: `run(host, argv, stdin, deadline)` for a command, `channel` for a stream. Host keys
are always verified (the topology's pinned key, else its known_hosts file); an unknown or changed key
raises HostKeyError, never trust-on-first-use. argv is quoted for the host's shell (render.sh_join on
POSIX hosts); secrets never reach a log or an error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paramiko
from paramiko.packet import Packetizer

from .errors import (
    CommandTimedOut,
    ConfigurationError,
    ConnectionFailed,
    FabricError,
    HostKeyError,
    LinkDown,
)
from .model import Host
from .model.topology import Credential
from .render import sh_join
from .replica.engine import DEAD_LINK_ENV, DEAD_LINK_SECONDS, dead_link_seconds  # noqa: F401 - one place

# The dead-link deadline (engine.DEAD_LINK_SECONDS, 30 s): SSH keepalives every third of it, TCP
# keepalive and TCP_USER_TIMEOUT, and a deadline on every socket write (paramiko's own retries a full
# socket buffer forever) close a path that went silent, with a reason naming the host.

log = logging.getLogger(__name__)

# AES-GCM measured about twice as fast as the CTR modes paramiko prefers by default.
GCM_FIRST = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# Bulk transfers: a wide window keeps the pipe full on fast links.
WINDOW_SIZE = 16 * 1024 * 1024

Secrets = Callable[[Credential], str]


def env_secrets(cred: Credential) -> str:
    """The default resolver: environment variables only (the core knows nothing of Prefect blocks)."""
    if cred.env:
        value = os.environ.get(cred.env)
        if value is None:
            raise ConfigurationError(f"environment variable {cred.env} is not set (it holds an SSH credential)")
        return value
    raise ConfigurationError(f"credential from secret block '{cred.secret_block}' needs a secrets resolver "
                             "(run through a flow, or use env / key_file)")


class _PinnedOrKnown(paramiko.MissingHostKeyPolicy):
    """Refuses every key that paramiko's own known-hosts check did not accept (pinned keys are
    loaded as known hosts, so they pass there)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        fp = _fingerprint(key)
        raise HostKeyError(
            f"unknown SSH host key {key.get_name()} {fp} for {hostname}",
            host=self.host.name, operation="connect",
            hint="verify the fingerprint out of band, then pin it as host_key in the topology "
                 "or add it to the known_hosts file")


def _fingerprint(key: paramiko.PKey) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class _Packetizer(Packetizer):
    """paramiko's Packetizer with a dead-link deadline (armed once the connection is up): a socket
    write that moves no byte for `dead_after` seconds, or nothing received for that long although
    keepalives asked for an answer, closes the connection with a reason naming the host."""

    dead_after = 0.0
    peer = "?"
    dead_reason: str | None = None
    last_rx = 0.0

    def die(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
            log.warning("SSH connection to %s closed: %s", self.peer, reason)
        self.close()
        raise EOFError(reason)

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        out: bytes = super().read_all(n, check_rekey)
        self.last_rx = time.monotonic()
        return out

    def _check_keepalive(self) -> None:
        # Called by the transport thread every 0.1 s while it waits for the next packet.
        if self.dead_after and time.monotonic() - self.last_rx > self.dead_after:
            self.die(f"no traffic from host {self.peer} for {self.dead_after:g} s (the network path "
                     "is down or the host stopped answering)")
        super()._check_keepalive()

    def write_all(self, out: bytes) -> None:
        if not self.dead_after:
            super().write_all(out)
            return
        sock = self._Packetizer__socket  # type: ignore[attr-defined]
        self._Packetizer__keepalive_last = time.time()
        stalled: float | None = None
        while out:
            try:
                n = sock.send(out)
            except (TimeoutError, BlockingIOError):
                n = 0  # the socket buffer is full (its timeout is paramiko's 0.1 s poll)
            except OSError:
                raise EOFError(self.dead_reason or "the connection closed") from None
            if n:
                out, stalled = out[n:], None
                continue
            if self.closed:
                raise EOFError(self.dead_reason or "the connection closed")
            now = time.monotonic()
            if stalled is None:
                stalled = now
            elif now - stalled > self.dead_after:
                self.die(f"no traffic from host {self.peer} for {self.dead_after:g} s (it took no data: "
                         "the network path is down or the host stopped reading)")


class Transport(paramiko.Transport):
    """paramiko's Transport without its re-key self-deadlock (paramiko/paramiko#822, open upstream).

    paramiko re-keys after 512 MiB either way (Packetizer.REKEY_BYTES). Once it has sent its KEXINIT
    it holds back every channel message until the new keys are in place (`_send_user_message` waits on
    `clear_to_send`). Messages the server sent before it saw that KEXINIT still arrive; for a
    CHANNEL_CLOSE (a command that just ended) or a request wanting a reply, paramiko's own transport
    thread answers from its read loop, so it waits there for a key exchange that only it can finish:
    30 s later (`clear_to_send_timeout`) "Key-exchange timed out waiting for key negotiation" kills
    the connection and every channel on it. Here an answer the transport thread would have to wait
    for is queued instead and sent as soon as the new keys are active, which is what OpenSSH does
    with packets queued during a re-key. Other threads still wait as before. Re-keying itself is
    unchanged (same limits, same algorithms).
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._held: list[paramiko.Message] = []
        self.rekeys = 0  # key exchanges completed after the first
        self.held_messages = 0  # answers that would have deadlocked without the queue
        self.packetizer.__class__ = _Packetizer  # deadlines on writes and reads (armed by `arm`)

    @property
    def _pk(self) -> _Packetizer:
        assert isinstance(self.packetizer, _Packetizer)
        return self.packetizer

    def arm(self, peer: str, dead_after: float) -> None:
        """From now on a link silent for `dead_after` s is closed; keepalives ask for an answer every
        third of it (OpenSSH's keepalive@openssh.com with want-reply, as ServerAliveInterval sends)."""
        pk = self._pk
        pk.peer, pk.last_rx, pk.dead_after = peer, time.monotonic(), float(dead_after)
        pk.set_keepalive(max(0.5, dead_after / 3), self._keepalive)

    @property
    def dead_reason(self) -> str | None:
        """Why the connection was closed as dead, if it was."""
        return self._pk.dead_reason

    def _keepalive(self) -> None:
        m = paramiko.Message()
        m.add_byte(paramiko.common.cMSG_GLOBAL_REQUEST)
        m.add_string("keepalive@openssh.com")
        m.add_boolean(True)  # the server answers (REQUEST_FAILURE): proof the path works both ways
        self._send_user_message(m)

    def probe(self, timeout: float) -> bool:
        """Is the peer still answering? True at once when it sent something recently; else a keepalive
        is sent and its answer awaited up to `timeout` s (a cached connection checked before use)."""
        pk = self._pk
        if not self.is_active():
            return False
        if not pk.dead_after or time.monotonic() - pk.last_rx < pk.dead_after / 3:
            return True
        sent = time.monotonic()
        try:
            self._keepalive()
        except (EOFError, OSError, paramiko.SSHException):
            return False
        end = sent + timeout
        while time.monotonic() < end:
            if pk.last_rx > sent:
                return True
            if not self.is_active():
                return False
            time.sleep(0.02)
        return False

    def _send_user_message(self, data: Any) -> None:
        if threading.current_thread() is self:
            with self.clear_to_send_lock:
                if not self.clear_to_send.is_set():
                    self._held.append(data)
                    self.held_messages += 1
                    return
        super()._send_user_message(data)

    def _parse_newkeys(self, m: Any) -> None:
        first = not self.initial_kex_done
        super()._parse_newkeys(m)  # both directions now use the new keys; clear_to_send is set
        with self.clear_to_send_lock:
            held, self._held = self._held, []
            for msg in held:
                self._send_message(msg)
        if not first:
            self.rekeys += 1


def _host_id(host: Host) -> str:
    return host.address if host.port == 22 else f"[{host.address}]:{host.port}"


def _load_pkey(text: str) -> paramiko.PKey:
    errors = []
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError) as exc:
            errors.append(type(exc).__name__)
    raise ConfigurationError("the credential does not hold a private key paramiko can read (ed25519, ecdsa, rsa)")


def tcp_keepalive(sock: socket.socket, dead_after: float) -> None:
    """Kernel-side detection of a dead peer: keepalive probes on an idle socket, and TCP_USER_TIMEOUT
    (unacknowledged data older than the deadline aborts the connection with ETIMEDOUT)."""
    idle = max(1, int(dead_after / 3))
    for level, opt, val in ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle),
                            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), max(1, idle // 2)),
                            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
                            (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), int(dead_after * 1000))):
        if opt is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, opt, val)


def connect(host: Host, secrets: Secrets | None = None, timeout: float = 15.0,
            dead_after: float | None = None) -> paramiko.SSHClient:
    """A connected, authenticated client for `host`, its host key verified; a link silent for
    `dead_after` s (default dead_link_seconds()) is closed with a reason naming the host."""
    dead = dead_link_seconds() if dead_after is None else dead_after
    client = paramiko.SSHClient()
    hid = _host_id(host)
    keys = client.get_host_keys()
    if host.host_key:
        kind, b64 = host.host_key.split()[:2]
        try:
            keys.add(hid, kind, paramiko.PKey.from_type_string(kind, base64.b64decode(b64)))
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a bad pin
            raise ConfigurationError(f"host {host.name}: pinned host_key cannot be read ({type(exc).__name__})") from None
    elif host.known_hosts:
        try:
            client.load_host_keys(os.path.expanduser(host.known_hosts))
        except OSError as exc:
            raise ConfigurationError(f"host {host.name}: cannot read known_hosts {host.known_hosts}: {exc.strerror}") from None
    else:
        # Neither pinned nor named: the user's own ~/.ssh/known_hosts, as OpenSSH would (still no TOFU).
        with contextlib.suppress(OSError):
            client.load_system_host_keys()
    client.set_missing_host_key_policy(_PinnedOrKnown(host))

    kw: dict[str, Any] = {"allow_agent": False, "look_for_keys": False}
    cred = host.credential
    if cred is not None:
        if cred.key_file:
            kw["key_filename"] = os.path.expanduser(cred.key_file)
        else:
            try:
                text = (secrets or env_secrets)(cred)
            except ConfigurationError as exc:
                raise ConfigurationError(f"host {host.name}: {exc.message}") from None
            if cred.kind == "password":
                kw["password"] = text
            else:
                kw["pkey"] = _load_pkey(text)

    def transport_factory(sock: Any, **tkw: Any) -> paramiko.Transport:
        # Without TCP_NODELAY every small request (channel open, exec, EOF) waits out a delayed ACK:
        # about 40 ms each, 170 ms per command measured.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(sock, socket.socket) and dead > 0:
            tcp_keepalive(sock, dead)
        t = Transport(sock, default_window_size=WINDOW_SIZE, **tkw)
        # GCM first; the other modern ciphers stay (servers without GCM remain reachable); CBC modes go.
        prefs = t.get_security_options()
        prefs.ciphers = tuple(c for c in GCM_FIRST if c in prefs.ciphers) + tuple(
            c for c in prefs.ciphers if c not in GCM_FIRST and "-cbc" not in c)
        return t

    try:
        client.connect(host.address, port=host.port, username=host.user, timeout=timeout, banner_timeout=timeout,
                       auth_timeout=timeout, transport_factory=transport_factory, **kw)
    except HostKeyError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyError(
            f"SSH host key of {host.address} CHANGED: got {exc.key.get_name()} {_fingerprint(exc.key)}, "
            f"expected {_fingerprint(exc.expected_key)}",
            host=host.name, operation="connect",
            hint="someone may be intercepting the connection; if the host was rebuilt, verify the new "
                 "fingerprint out of band and update host_key / known_hosts") from None
    except paramiko.AuthenticationException:
        client.close()
        # Not transient: retrying with the same credential fails the same way.
        raise FabricError(f"SSH authentication as {host.user} failed", host=host.name, operation="connect",
                          error_id="AuthenticationFailed",
                          hint="check the host's credential (key file, environment variable or secret block) "
                               "and that its public key is authorized") from None
    except (OSError, paramiko.SSHException, EOFError) as exc:
        client.close()
        # The message of a socket error names address and errno only; no secret can be in it.
        raise ConnectionFailed(f"cannot reach {host.address}:{host.port} over SSH: {type(exc).__name__}: {exc}",
                               host=host.name, operation="connect",
                               hint="check that the host is up, sshd listens on that port and the network allows it") from None
    t = client.get_transport()
    if isinstance(t, Transport) and dead > 0:
        t.arm(host.name, dead)
    return client



def _connect_pinned(host: Host, secrets: Secrets | None, timeout: float, dead_after: float | None) -> paramiko.SSHClient:
    """connect; a Replica Broker's client access point answers with the key of whichever node owns it
    now, so each node's pinned key (`node_host_keys`) is accepted, and nothing else."""
    pins = [k for k in (host.host_key, *host.node_host_keys) if k] if host.broker else []
    if len(pins) < 2:
        return connect(host, secrets, timeout, dead_after)
    changed: HostKeyError | None = None
    for key in pins:
        try:
            return connect(host.model_copy(update={"host_key": key}), secrets, timeout, dead_after)
        except HostKeyError as exc:
            changed = exc  # another node's key: try the next pin
    assert changed is not None
    raise HostKeyError(f"SSH host key of broker {host.name} matches none of its {len(pins)} pinned node keys: "
                       f"{changed.message}", host=host.name, operation="connect", hint=changed.hint) from None


# ---- one pool, one way to run a command ------------------------------------------------------------
def identity(host: Host) -> tuple[object, ...]:
    """What makes two hosts one SSH connection: where (address, port), who (user and a fingerprint of
    the credential's reference, never of the secret) and which host keys are trusted. The host's name
    and its other settings are not part of it."""
    cred = host.credential
    fp = hashlib.sha256(cred.model_dump_json().encode()).hexdigest()[:16] if cred is not None else None
    kh = os.path.expanduser(host.known_hosts) if host.known_hosts else None
    return (host.address, host.port, host.user, fp, kh, host.host_key, host.broker, host.node_host_keys)


# Windows' default SSH shell (cmd.exe) has its own quoting rules; a command for it is plain tokens only,
# and anything else (a PowerShell script, with its values) goes on stdin, which also keeps the command
# line far below cmd.exe's 8191-character limit.
_WINDOWS_TOKEN = re.compile(r"^[A-Za-z0-9_.:/\\=+-]+$")


def command_line(host: Host, argv: Sequence[object]) -> str:
    """argv as the command line the host's shell runs: POSIX sh quoting (render.sh_join) for every host
    but a Hyper-V (Windows) one, whose command is plain tokens."""
    if not argv:
        raise ValueError("an empty command")
    if host.fabric != "hyperv":
        return sh_join(argv)
    words = [str(a) for a in argv]
    bad = [w for w in words if not _WINDOWS_TOKEN.match(w)]
    if bad:
        raise ValueError(f"a Windows host's command takes plain tokens only ({len(bad)} not); send data on stdin")
    return " ".join(words)


@dataclass(frozen=True)
class Result:
    """One finished remote command. `rc` is -1 when it died by a signal (no exit status)."""

    host: str
    rc: int
    stdout: bytes
    stderr: bytes
    seconds: float


class _Slot:
    """One pooled connection and the lock that serialises (re)connecting it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: paramiko.SSHClient | None = None


class Pool:
    """Verified SSH connections to hosts, one per identity(), shared by everything that talks to them:
    commands (`run`), streaming channels (`channel`, the replication agents) and their link checks.

    A pooled connection is checked before use (active, and answering within the dead-link deadline if
    it was quiet); one that dropped is replaced by a new connection, once, before a command is sent.
    """

    def __init__(self, secrets: Secrets | None = None, connect_timeout: float = 15.0,
                 dead_after: float | None = None) -> None:
        self.secrets = secrets
        self.connect_timeout = connect_timeout
        self.dead_after = dead_link_seconds() if dead_after is None else dead_after
        self._slots: dict[tuple[object, ...], _Slot] = {}
        self._lock = threading.Lock()
        self.connects = 0  # connections opened (a reused one is not counted again)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slot(self, host: Host) -> _Slot:
        with self._lock:
            return self._slots.setdefault(identity(host), _Slot())

    def _usable(self, client: paramiko.SSHClient, timeout: float) -> bool:
        t = client.get_transport()
        if t is None or not t.is_active():
            return False
        return t.probe(timeout) if isinstance(t, Transport) else True

    def client(self, host: Host, timeout: float | None = None) -> paramiko.SSHClient:
        """The pooled, verified connection to `host` (connected now if there is none or it dropped);
        `timeout` bounds the connect and the liveness check."""
        return self._client(host, timeout)[0]

    def _client(self, host: Host, timeout: float | None) -> tuple[paramiko.SSHClient, bool]:
        limit = self.connect_timeout if timeout is None else max(0.1, min(timeout, self.connect_timeout))
        slot = self._slot(host)
        with slot.lock:
            c = slot.client
            if c is not None and self._usable(c, min(limit, self.dead_after or limit)):
                return c, False
            if c is not None:
                c.close()
                slot.client = None
            c = _connect_pinned(host, self.secrets, limit, self.dead_after)
            slot.client = c
            self.connects += 1
            return c, True

    def drop(self, host: Host) -> None:
        """Close the pooled connection to `host` (the next use connects again)."""
        slot = self._slot(host)
        with slot.lock:
            c, slot.client = slot.client, None
        if c is not None:
            c.close()

    def close(self) -> None:
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            with slot.lock:
                c, slot.client = slot.client, None
            if c is not None:
                c.close()

    def dead_reason(self, host: Host) -> str | None:
        """Why the pooled connection to `host` was closed as dead (no traffic within the deadline)."""
        with self._lock:
            slot = self._slots.get(identity(host))
        t = slot.client.get_transport() if slot is not None and slot.client is not None else None
        return t.dead_reason if isinstance(t, Transport) else None

    def check_link(self, host: Host) -> None:
        """Raise LinkDown when the connection to `host` was closed as dead: the error names the network."""
        reason = self.dead_reason(host)
        if reason:
            raise LinkDown(reason, host=host.name, error_id="NoTraffic",
                           hint="check the network path to that host (firewall, routing, link); the operation "
                                "can be retried once it answers")

    def _open(self, host: Host, end: float) -> tuple[paramiko.SSHClient, paramiko.Channel]:
        """A session channel on the pooled connection; a pooled connection that turns out to have
        dropped is replaced once (nothing was sent on it yet)."""
        for attempt in (0, 1):
            left = end - time.monotonic()
            if left <= 0:
                raise CommandTimedOut(f"no SSH session to {host.name} within the deadline", host=host.name,
                                      sent=False, hint="check the host and the network, then retry")
            client, fresh = self._client(host, left)
            transport = client.get_transport()
            try:
                if transport is None:
                    raise EOFError("no transport")
                chan = transport.open_session(window_size=WINDOW_SIZE, max_packet_size=32768,
                                              timeout=max(0.1, end - time.monotonic()))
                return client, chan
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if fresh or attempt:
                    self.check_link(host)
                    raise ConnectionFailed(f"cannot open an SSH session to {host.name}: {exc or type(exc).__name__}",
                                           host=host.name, hint="check the host and the network, then retry") from None
                log.info("SSH connection to %s dropped while pooled; reconnecting", host.name)
                self.drop(host)
        raise AssertionError("unreachable")

    def channel(self, host: Host, argv: Sequence[object], timeout: float | None = None) -> paramiko.Channel:
        """An exec channel running `argv` on `host`, for a caller that streams stdin and stdout itself
        (the replication agents); `timeout` bounds opening it and each of the caller's reads and writes."""
        end = time.monotonic() + (timeout if timeout is not None else self.connect_timeout)
        _, chan = self._open(host, end)
        try:
            chan.settimeout(timeout)
            chan.exec_command(command_line(host, argv))
        except BaseException:
            chan.close()
            raise
        return chan

    def run(self, host: Host, argv: Sequence[object], stdin: bytes | None = None, deadline: float = 120.0) -> Result:
        """Run `argv` on `host` and wait for it, everything within `deadline` seconds: connecting, sending
        stdin, reading the output. A command still running then is sent KILL and its channel closed
        (CommandTimedOut, naming the host; `sent` says whether it had all its stdin). A connection lost
        while it ran is ConnectionFailed (LinkDown when the path went silent). Output that keeps flowing
        does not extend the deadline."""
        t0 = time.monotonic()
        end = t0 + deadline
        line = command_line(host, argv)
        client, chan = self._open(host, end)
        sent = False
        out, err = bytearray(), bytearray()
        try:
            chan.settimeout(max(0.1, end - time.monotonic()))
            chan.exec_command(line)
            data = memoryview(stdin or b"")
            pos = 0
            while True:
                moved = False
                while chan.recv_ready():
                    out += chan.recv(1 << 16)
                    moved = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                    moved = True
                if chan.closed or (chan.eof_received and chan.exit_status_ready()):
                    break
                if not sent:
                    if pos < len(data):
                        if chan.send_ready():
                            pos += chan.send(data[pos:pos + 32768])
                            moved = True
                    else:
                        chan.shutdown_write()
                        sent = True
                if time.monotonic() >= end:
                    raise TimeoutError
                if not moved:
                    # stdout, stderr and close wake the select; a send window that opens does not, so
                    # poll briefly while stdin is pending.
                    select.select([chan], [], [], min(max(0.0, end - time.monotonic()), 0.01 if not sent else 0.5))
            # Whatever arrived with the close (the exit status can come before the last data).
            while chan.recv_ready():
                out += chan.recv(1 << 16)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(1 << 16)
            rc = chan.recv_exit_status() if chan.exit_status_ready() else -1
        except TimeoutError:
            _kill(chan)
            raise CommandTimedOut(f"{_program(argv)} on {host.name} still running after {deadline:g} s: "
                                  "killed and its channel closed", host=host.name, sent=sent,
                                  hint="the host may be overloaded or the command hung; raise the deadline "
                                       "or check the host") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.check_link(host)
            raise ConnectionFailed(f"SSH session to {host.name} failed while {_program(argv)} ran: "
                                   f"{exc or type(exc).__name__}", host=host.name, error_id="ConnectionLost",
                                   hint="check the host and the network, then retry") from None
        finally:
            chan.close()
        t = client.get_transport()
        if rc == -1 and (t is None or not t.is_active()):
            # No exit status because the connection, not the command, died.
            self.check_link(host)
            raise ConnectionFailed(f"the connection to {host.name} closed before {_program(argv)} finished",
                                   host=host.name, error_id="ConnectionLost",
                                   hint="check the host; retry (the command may or may not have run)")
        seconds = time.monotonic() - t0
        log.debug("ssh %s: %s exited %d in %.3f s", host.name, _program(argv), rc, seconds)
        return Result(host=host.name, rc=rc, stdout=bytes(out), stderr=bytes(err), seconds=seconds)


def _program(argv: Sequence[object]) -> str:
    """The command's name for messages and logs: never its arguments (they can hold values a plan passes)."""
    return os.path.basename(str(argv[0])) or "command"


def _kill(chan: paramiko.Channel) -> None:
    """Ask sshd to KILL the command's process group (RFC 4254 "signal"), best effort: OpenSSH honours it
    for privilege-separated sessions only (not a root login), so the channel is closed right after in
    any case, and a command that then writes gets SIGPIPE."""
    with contextlib.suppress(Exception):
        m = paramiko.Message()
        m.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
        m.add_int(chan.remote_chanid)
        m.add_string("signal")
        m.add_boolean(False)
        m.add_string("KILL")
        chan.transport._send_user_message(m)  # type: ignore[union-attr]
