#!/bin/sh
# Build the tiny test guest from Debian packages (linux-image-amd64, busybox-static; scripts/setup-system.sh
# installs both): DIR/vmlinuz and DIR/initramfs.gz. Used by the QEMU tests and the bench at test time.
#
# The guest's /init (busybox sh) reads `srmode=` from the kernel command line:
#   write  append numbered records to every virtio disk (vda, vdb...), each fsync'ed, then its header
#          (the disk's last 4 KiB: "SRH <n>"), and print "ACK <n>" on the serial console once record n is
#          durable on all disks. Record n lives in 4 KiB slot n: "SR <disk> <n, 8 digits>". Continues after
#          the last record the headers name, so a restarted guest keeps one gap-free sequence.
#   check  print "CHECK <disk> ok records=<n>" when records 1..n match the header, else "CHECK <disk> bad ...",
#          then "CHECK done" and power off.
#   fs     mount vda as ext4 (the host made it: mkfs.ext4) at /mnt and append lines "FS <n, 8 digits>" to
#          /mnt/records, each fsync'ed, printing "ACK <n>" once line n is durable; continues after the
#          file's last line. The host reads a copy with e2fsck/debugfs (tests/fabric/guest.py).
# `srqga=1` on the kernel command line starts the QEMU guest agent (Debian's qemu-ga, copied in with its
# libraries when /usr/sbin/qemu-ga exists: package qemu-guest-agent) on the port org.qemu.guest_agent.0;
# DIR/stamp then says qga=<its mtime> (qga=none without it).
# Usage: scripts/build-test-guest.sh DIR   (idempotent: rebuilds only when the kernel or busybox changed)
set -eu
DIR=${1:?usage: build-test-guest.sh DIR}
KERNEL=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$KERNEL" ] || { echo "no /boot/vmlinuz-*: install linux-image-amd64" >&2; exit 2; }
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || { echo "no $BUSYBOX: install busybox-static" >&2; exit 2; }
if ldd "$BUSYBOX" >/dev/null 2>&1; then echo "$BUSYBOX is dynamically linked: install busybox-static" >&2; exit 2; fi
VER=${KERNEL#/boot/vmlinuz-}
MODS=/lib/modules/$VER
QGA=/usr/sbin/qemu-ga
QGA_STAMP=none
[ -x "$QGA" ] && QGA_STAMP=$(stat -c %Y "$QGA")
STAMP="$VER $(stat -c %Y "$BUSYBOX") qga=$QGA_STAMP v5"
mkdir -p "$DIR"
if [ -f "$DIR/stamp" ] && [ "$(cat "$DIR/stamp")" = "$STAMP" ] && [ -f "$DIR/initramfs.gz" ]; then
    exit 0
fi
WORK=$(mktemp -d "$DIR/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/root/bin" "$WORK/root/proc" "$WORK/root/sys" "$WORK/root/dev" "$WORK/root/mods" "$WORK/root/run" \
    "$WORK/root/mnt" "$WORK/root/tmp"
cp "$BUSYBOX" "$WORK/root/bin/busybox"
for a in sh mount insmod dd printf cat tr md5sum seq sleep poweroff echo head sed cut expr wc mkdir kill; do
    ln -s busybox "$WORK/root/bin/$a"
done
# virtio_blk, virtio_console (the guest agent's port), ext4 and their dependencies are modules in Debian's
# kernel, in load order; where one is built in (=y) it has no .ko and is skipped.
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev \
         drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
         drivers/char/virtio_console lib/crc16 crypto/crc32c_generic lib/libcrc32c fs/mbcache fs/jbd2/jbd2 \
         fs/ext4/ext4; do
    for f in "$MODS/kernel/$m.ko" "$MODS/kernel/$m.ko.xz" "$MODS/kernel/$m.ko.zst"; do
        if [ -f "$f" ]; then
            case "$f" in
                *.xz) xz -dc "$f" > "$WORK/root/mods/$(basename "$m").ko" ;;
                *.zst) zstd -qdc "$f" > "$WORK/root/mods/$(basename "$m").ko" ;;
                *) cp "$f" "$WORK/root/mods/$(basename "$m").ko" ;;
            esac
            echo "$(basename "$m")" >> "$WORK/root/mods/order"
        fi
    done
done
# The guest agent and the shared libraries it loads (ldd), at their own paths.
if [ -x "$QGA" ]; then
    for f in "$QGA" $(ldd "$QGA" | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p'); do
        mkdir -p "$WORK/root$(dirname "$f")"
        cp -L "$f" "$WORK/root$f"
    done
fi
cat > "$WORK/root/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
[ -f /mods/order ] && for m in $(cat /mods/order); do insmod /mods/$m.ko 2>/dev/null; done
mode=write
qga=0
for w in $(cat /proc/cmdline); do case "$w" in srmode=*) mode=${w#srmode=} ;; srqga=*) qga=${w#srqga=} ;; esac; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
if [ "$qga" = 1 ]; then
    # Devices appear as their drivers probe them: give the agent's port a few seconds, like vda above.
    port=""
    n=0
    while [ -z "$port" ] && [ $n -lt 50 ]; do
        for p in /sys/class/virtio-ports/*; do
            [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
        done
        [ -n "$port" ] && [ -c "$port" ] || { port=""; sleep 0.1; n=$((n + 1)); }
    done
    if [ -n "$port" ] && [ -x /usr/sbin/qemu-ga ]; then
        /usr/sbin/qemu-ga -m virtio-serial -p $port -t /run &
        echo $! > /run/qemu-ga.pid
        echo "GUEST agent on $port"
    else
        echo "GUEST no agent port"
    fi
fi
DISKS=""
for d in vda vdb vdc vdd; do [ -b /dev/$d ] && DISKS="$DISKS $d"; done
[ -n "$DISKS" ] || { echo "GUEST no virtio disk"; poweroff -f; }
last() { echo $(( $(cat /sys/block/$1/size) / 8 - 1 )); }
header() {
    h=$(dd if=/dev/$1 bs=4096 skip=$(last $1) count=1 2>/dev/null | tr -d '\000' | head -n 1)
    case "$h" in "SRH "*) echo "${h#SRH }" | sed 's/^0*//;s/^$/0/' ;; *) echo 0 ;; esac
}
put() { printf "$2" | dd of=/dev/$1 bs=4096 seek=$3 conv=sync,notrunc,fsync 2>/dev/null; }
if [ "$mode" = check ]; then
    for d in $DISKS; do
        c=$(header $d)
        want=$(i=1; while [ $i -le $c ]; do printf 'SR %s %08d\n' $d $i; i=$((i + 1)); done | md5sum | cut -d' ' -f1)
        got=$(dd if=/dev/$d bs=4096 skip=1 count=$c 2>/dev/null | tr -d '\000' | md5sum | cut -d' ' -f1)
        [ $c -eq 0 ] && got=$want
        if [ "$want" = "$got" ]; then echo "CHECK $d ok records=$c"; else echo "CHECK $d bad records=$c"; fi
    done
    echo "CHECK done"
    poweroff -f
fi
if [ "$mode" = fs ]; then
    mount -t ext4 /dev/vda /mnt || { echo "GUEST no filesystem on vda"; poweroff -f; }
    n=0
    [ -f /mnt/records ] && n=$(wc -l < /mnt/records)
    echo "GUEST fs writing from $((n + 1))"
    while true; do
        n=$((n + 1))
        printf "FS %08d\n" $n | dd of=/mnt/records oflag=append conv=notrunc,fsync 2>/dev/null
        echo "ACK $n"
    done
fi
n=0
for d in $DISKS; do h=$(header $d); [ $h -gt $n ] && n=$h; done
echo "GUEST writing from $((n + 1)) on$DISKS"
while true; do
    n=$((n + 1))
    for d in $DISKS; do put $d "SR $d $(printf %08d $n)\n" $n; done
    for d in $DISKS; do put $d "SRH $(printf %08d $n)\n" $(last $d); done
    echo "ACK $n"
done
INIT
chmod +x "$WORK/root/init"
(cd "$WORK/root" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initramfs.gz"
cp "$KERNEL" "$WORK/vmlinuz"
mv "$WORK/vmlinuz" "$DIR/vmlinuz"
mv "$WORK/initramfs.gz" "$DIR/initramfs.gz"
echo "$STAMP" > "$DIR/stamp"
