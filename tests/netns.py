"""Sites as Linux network namespaces on this machine, for tests that lose a site: each site is a namespace
with one interface on a bridge in the root namespace (where the test itself runs, as the operator's
laptop would), its own address, its own processes (`wrap(site) + argv`). `cut(site)` takes its link down
on both ends and SIGKILLs every process in it: the site is gone, as in a disaster. `close()` removes
everything it created, namespaces, links and processes, whatever happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """None when this kernel lets us create network namespaces, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not any(Path(d, "ip").exists() for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")):
        return "iproute2's `ip` is not installed (scripts/setup-system.sh)"
    probe = f"srprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"the kernel refuses network namespaces: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Sites:
    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.tag = str(tag)
        # A /24 of our own per test process, unlikely to meet another test's or the machine's.
        self.prefix = f"10.{200 + tag % 50}.{(tag // 50) % 250}"
        self.bridge = f"srb{self.tag}"
        self.ns: dict[str, str] = {}
        self.address: dict[str, str] = {}
        self._links: dict[str, str] = {}
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.prefix}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, site: str) -> str:
        """A namespace for `site` on the bridge; its address."""
        i = len(self.ns) + 1
        ns, host_end, site_end = f"sr{self.tag}-{site}", f"sv{self.tag}h{i}", f"sv{self.tag}n{i}"
        _ip("netns", "add", ns)
        self.ns[site] = ns
        _ip("link", "add", host_end, "type", "veth", "peer", "name", site_end)
        self._links[site] = host_end
        _ip("link", "set", site_end, "netns", ns)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("link", "set", host_end, "up")
        addr = f"{self.prefix}.{i}"
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", site_end, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.address[site] = addr
        return addr

    def wrap(self, site: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[site]]

    def pids(self, site: str) -> list[int]:
        out = _ip("netns", "pids", self.ns[site], check=False).stdout
        return [int(p) for p in out.split()]

    def throttle(self, site: str, rate: str) -> None:
        """Cap what leaves `site` (token bucket on its interface), e.g. "4mbit"."""
        _ip("netns", "exec", self.ns[site], "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
            "rate", rate, "burst", "32kbit", "latency", "400ms")

    def cut(self, site: str) -> None:
        """The site is lost: its link goes down on both ends and every process in it is killed."""
        _ip("-n", self.ns[site], "link", "set", "eth0", "down", check=False)
        _ip("link", "set", self._links[site], "down", check=False)
        self._kill(site)

    def _kill(self, site: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = self.pids(site)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def close(self) -> None:
        for site, ns in self.ns.items():
            self._kill(site)
            _ip("netns", "del", ns, check=False)
        for link in self._links.values():
            _ip("link", "del", link, check=False)
        _ip("link", "del", self.bridge, check=False)
