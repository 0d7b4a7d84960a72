#!/usr/bin/env bash
# Installs the Debian packages the test suite and the demo use, when missing and when we can
# (root with apt-get). Without them the tests that need sshd, rsync, virsh, libvirtd or chromium skip with a reason.
set -euo pipefail
need=()
command -v /usr/sbin/sshd >/dev/null 2>&1 || need+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
# `--postgres-only` (make ui): just the PostgreSQL 15 server binaries for the UI's private cluster.
if [ "${1:-}" = "--postgres-only" ]; then
  need=()
  [ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
fi
# `--ssh-only` (make demo): just what the demo's private sshd needs, not the test suite's browser.
if [ "${1:-}" != "--ssh-only" ] && [ "${1:-}" != "--postgres-only" ]; then
  command -v rsync >/dev/null 2>&1 || need+=(rsync)
  command -v virsh >/dev/null 2>&1 || need+=(libvirt-clients)
  # the libvirt backend's tests: a private libvirtd with its QEMU driver (the tests start it), and
  # libvirt-dev, pkg-config and gcc to build libvirt-python (the venv's `libvirt` extra)
  [ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon-system)
  dpkg-query -W -f='${Status}' libvirt-daemon-driver-qemu 2>/dev/null | grep -q "ok installed" || need+=(libvirt-daemon-driver-qemu)
  pkg-config --exists libvirt 2>/dev/null || need+=(libvirt-dev pkg-config)
  command -v gcc >/dev/null 2>&1 || need+=(gcc)
  [ -x /usr/bin/chromium ] || need+=(chromium)
  [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
  # the qemu backend's tests: QEMU (TCG), qemu-img/qemu-nbd, and the tiny guest's kernel and busybox
  command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
  command -v qemu-nbd >/dev/null 2>&1 || need+=(qemu-utils)
  dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" || need+=(busybox-static)
  ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
  # the test guest's guest agent (copied into its initramfs) and the host-side check of its ext4 copies
  [ -x /usr/sbin/qemu-ga ] || need+=(qemu-guest-agent)
  command -v e2fsck >/dev/null 2>&1 || need+=(e2fsprogs)
  # Prefect on PostgreSQL (make ui, the tests' shared server) and its HA layout (Redis).
  [ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  # The site-loss test's network namespaces.
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-system: missing ${need[*]}; install them (Debian: apt-get install ${need[*]}) or the tests that need them skip" >&2
  exit 0
fi
echo "setup-system: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
