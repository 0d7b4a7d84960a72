"""A TCP proxy on 127.0.0.1 that the fault tests control: it relays SSH bytes to the real sshd and,
when armed, cuts every connection (both sockets closed) once N more bytes have passed in one direction.
A Host pointed at it keeps its pinned host key, so the fabric connects exactly as it would to sshd.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class CutProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port: int = self.lsock.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._budget: int | None = None  # bytes left before the cut, in the armed direction
        self._direction = "up"
        self._hold_budget: int | None = None
        self._hole_budget: int | None = None
        self.cuts = 0
        self.relayed = {"up": 0, "down": 0}
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._flowing = {"up": threading.Event(), "down": threading.Event()}
        for e in self._flowing.values():
            e.set()
        t = threading.Thread(target=self._accept, name="cutproxy-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def arm(self, after_bytes: int, direction: str = "up") -> None:
        """Cut all connections once `after_bytes` more bytes went `direction` ('up': to sshd)."""
        with self._lock:
            self._budget, self._direction = after_bytes, direction

    def hold(self, direction: str) -> None:
        """Stop relaying `direction` (bytes wait in the proxy) until released or cut: a link that stalls."""
        self._flowing[direction].clear()

    def hold_after(self, up_bytes: int) -> None:
        """Hold everything sshd sends back once `up_bytes` more bytes went up (inside a transfer, after
        its channel was set up): the far end finishes its work but its answer never arrives."""
        with self._lock:
            self._hold_budget = up_bytes

    def blackhole_after(self, up_bytes: int) -> None:
        """A silent partition once `up_bytes` more bytes went up: nothing passes either way and
        nobody is told (no FIN, no RST); the proxy stops reading, so the senders' buffers fill up."""
        with self._lock:
            self._hole_budget = up_bytes

    def release(self) -> None:
        for e in self._flowing.values():
            e.set()

    def disarm(self) -> None:
        with self._lock:
            self._budget = None

    @property
    def armed(self) -> bool:
        with self._lock:
            return self._budget is not None

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=10)
            except OSError:
                c.close()
                continue
            u.settimeout(None)
            with self._lock:
                self._conns.append((c, u))
            for src, dst, direction in ((c, u, "up"), (u, c, "down")):
                t = threading.Thread(target=self._pump, args=(src, dst, direction), name=f"cutproxy-{direction}",
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                cut = False
                with self._lock:
                    if self._budget is not None and direction == self._direction:
                        if len(data) >= self._budget:
                            data, cut = data[:self._budget], True
                        self._budget -= len(data)
                    self.relayed[direction] += len(data)
                    if self._hole_budget is not None and direction == "up":
                        self._hole_budget -= len(data)
                        if self._hole_budget <= 0:
                            self._hole_budget = None
                            for e in self._flowing.values():
                                e.clear()
                    if self._hold_budget is not None and direction == "up":
                        self._hold_budget -= len(data)
                        if self._hold_budget <= 0:
                            self._hold_budget = None
                            self._flowing["down"].clear()
                while not self._flowing[direction].wait(0.05):
                    pass
                if data:
                    dst.sendall(data)
                if cut:
                    self.cuts += 1
                    self.cut_all()
                    return
        except OSError:
            pass
        # One side closed: pass the close on so neither end waits for the other forever.
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut_all(self) -> None:
        """Close every relayed connection now (the network link drops)."""
        with self._lock:
            conns, self._conns = self._conns, []
            self._budget = None
        self.release()  # held pumps wake up and find their sockets closed
        for pair in conns:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.lsock.close()
        self.cut_all()
        for t in self._threads:
            t.join(5)
