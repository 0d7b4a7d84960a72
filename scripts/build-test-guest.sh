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
STAMP="$VER $(stat -c %Y "$BUSYBOX") v3"
mkdir -p "$DIR"
if [ -f "$DIR/stamp" ] && [ "$(cat "$DIR/stamp")" = "$STAMP" ] && [ -f "$DIR/initramfs.gz" ]; then
    exit 0
fi
WORK=$(mktemp -d "$DIR/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/root/bin" "$WORK/root/proc" "$WORK/root/sys" "$WORK/root/dev" "$WORK/root/mods"
cp "$BUSYBOX" "$WORK/root/bin/busybox"
for a in sh mount insmod dd printf cat tr md5sum seq sleep poweroff echo head sed cut expr; do
    ln -s busybox "$WORK/root/bin/$a"
done
# virtio_blk and its dependencies are modules in Debian's kernel (CONFIG_VIRTIO_BLK=m), in load order;
# where one is built in (=y) it has no .ko and is skipped.
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev \
         virtio/virtio_pci block/virtio_blk; do
    for f in "$MODS/kernel/drivers/$m.ko" "$MODS/kernel/drivers/$m.ko.xz" "$MODS/kernel/drivers/$m.ko.zst"; do
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
cat > "$WORK/root/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
[ -f /mods/order ] && for m in $(cat /mods/order); do insmod /mods/$m.ko 2>/dev/null; done
mode=write
for w in $(cat /proc/cmdline); do case "$w" in srmode=*) mode=${w#srmode=} ;; esac; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
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
