#!/usr/bin/env bash
# Installs the Debian packages the test suite and the demo use, when missing and when we can
# (root with apt-get). Without them the tests that need sshd, rsync, virsh or chromium skip with a reason.
set -euo pipefail
need=()
command -v /usr/sbin/sshd >/dev/null 2>&1 || need+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
# `--ssh-only` (make demo): just what the demo's private sshd needs, not the test suite's browser.
if [ "${1:-}" != "--ssh-only" ]; then
  command -v rsync >/dev/null 2>&1 || need+=(rsync)
  command -v virsh >/dev/null 2>&1 || need+=(libvirt-clients)
  [ -x /usr/bin/chromium ] || need+=(chromium)
  [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
  # the qemu backend's tests: QEMU (TCG), qemu-img/qemu-nbd, and the tiny guest's kernel and busybox
  command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
  command -v qemu-nbd >/dev/null 2>&1 || need+=(qemu-utils)
  dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" || need+=(busybox-static)
  ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
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
