"""A private libvirtd per test "host": libvirtd (QEMU driver) and virtlogd in their own mount namespace.

A privileged libvirtd keeps its state in fixed places (/run/libvirt, /var/lib/libvirt, /etc/libvirt/qemu,
/var/log/libvirt), so two of them, or one beside the machine's own, would share domains. Each daemon
here runs under `unshare --mount` with those directories bind-mounted from its own temporary directory
(and a tmpfs on /run/libvirt) and its sockets in that directory: two daemons on one machine are two independent hosts, and nothing of
the machine's libvirt is touched. Skips (with the reason) where this cannot run: not root, no libvirtd
or libvirt-python, no mount namespaces.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# /run/libvirt is a tmpfs of its own, as /run is on a real host (libvirtd rewrites a domain's status
# file there on every state change, inside a view's pause window); the rest are bound from the temp dir.
BINDS = {"lib": "/var/lib/libvirt", "etc": "/etc/libvirt/qemu", "log": "/var/log/libvirt",
         "cache": "/var/cache/libvirt"}


def need_libvirt() -> object:
    """libvirt-python, or a skip that says what is missing."""
    try:
        import libvirt
    except ImportError:
        pytest.skip("libvirt-python is not installed (make installs the `libvirt` extra where libvirt-dev is present; "
                    "scripts/setup-system.sh installs libvirt-dev)")
    return libvirt


def need_daemon() -> None:
    need_libvirt()
    if os.geteuid() != 0:
        pytest.skip("a private privileged libvirtd needs root")
    for exe in ("/usr/sbin/libvirtd", "/usr/sbin/virtlogd"):
        if not os.path.exists(exe):
            pytest.skip(f"{exe} is missing (scripts/setup-system.sh installs libvirt-daemon-system)")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing")
    for target in BINDS.values():
        if not os.path.isdir(target):
            pytest.skip(f"{target} is missing: libvirt-daemon-system is not installed")


@contextlib.contextmanager
def libvirtd(d: Path, timeout: float = 60) -> Iterator[str]:
    """Start a private libvirtd in d; yields its URI. On exit every domain it runs is destroyed and both
    daemons are stopped (by their pids)."""
    need_daemon()
    libvirt = need_libvirt()
    d.mkdir(parents=True, exist_ok=True)
    for sub in BINDS:
        (d / sub).mkdir(exist_ok=True)
    (d / "sock").mkdir(exist_ok=True)
    conf = d / "libvirtd.conf"
    conf.write_text(f'unix_sock_dir = "{d / "sock"}"\nunix_sock_rw_perms = "0700"\n'
                    'auth_unix_rw = "none"\nauth_unix_ro = "none"\n')
    mounts = "\n".join(["mkdir -p /run/libvirt", "mount -t tmpfs -o mode=0755 tmpfs /run/libvirt",
                        *(f"mount --bind '{d / sub}' '{target}'" for sub, target in BINDS.items())])
    script = (f"set -e\n{mounts}\nvirtlogd -d -p '{d / 'virtlogd.pid'}'\n"
              f"exec libvirtd -f '{conf}' -p '{d / 'libvirtd.pid'}'\n")
    log = open(d / "libvirtd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"qemu:///system?socket={d / 'sock' / 'libvirt-sock'}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.skip(f"the private libvirtd exited at once: {(d / 'libvirtd.log').read_text()[-600:]}")
            if (d / "sock" / "libvirt-sock").exists():
                with contextlib.suppress(libvirt.libvirtError):
                    libvirt.open(uri).close()
                    break
            assert time.monotonic() < deadline, (d / "libvirtd.log").read_text()[-600:]
            time.sleep(0.1)
        yield uri
    finally:
        with contextlib.suppress(Exception):
            conn = libvirt.open(uri)
            for dom in conn.listAllDomains():
                with contextlib.suppress(Exception):
                    if dom.isActive():
                        dom.destroy()
            conn.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((d / "virtlogd.pid").read_text().strip()), signal.SIGTERM)
        log.close()


def guest_xml(name: str, kit: Path, disks: list[tuple[Path, str]], serial: Path, mode: str,
              memory_mb: int = 192) -> str:
    """A domain for the tiny test guest (guest.py): TCG, its kernel and initramfs, virtio disks vda, vdb...
    QEMU runs as root (a static DAC label): the test's files live in root's private temporary directory."""
    devs = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{path}'/>"
                   f"<target dev='vd{chr(97 + i)}' bus='virtio'/></disk>" for i, (path, fmt) in enumerate(disks))
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>{memory_mb}</memory><vcpu>1</vcpu>"
            f"<os><type arch='x86_64'>hvm</type><kernel>{kit / 'vmlinuz'}</kernel><initrd>{kit / 'initramfs.gz'}</initrd>"
            f"<cmdline>console=ttyS0 quiet srmode={mode}</cmdline></os><on_poweroff>destroy</on_poweroff>"
            f"<devices>{devs}<serial type='file'><source path='{serial}'/><target port='0'/></serial>"
            "<memballoon model='none'/></devices>"
            "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel></domain>")
