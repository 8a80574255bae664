#!/bin/busybox sh
# PID 1 of the Postgres image's initramfs: mounts the shared read-only root (the one
# read-only virtio disk) under an overlay whose writable half lives on the VM's own disk,
# then hands over to systemd. Everything the VM writes (PGDATA, logs, /etc changes) is
# therefore on its disk, which migrates with it, while every VM of the image shares the root.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "vmhost-guest: boot failed: $*"
    # Stay up so the console keeps the reason; the operator stops the VM.
    while true; do sleep 3600; done
}

for m in $(cat /etc/modules-load); do
    insmod "/lib/modules/$m.ko" || fail "cannot load module $m"
done

root_disk="" data_disk=""
for _ in $(seq 100); do
    for ro in /sys/block/vd*/ro; do
        [ -f "$ro" ] || continue
        dev=/dev/$(basename "$(dirname "$ro")")
        if [ "$(cat "$ro")" = 1 ]; then root_disk=$dev; else data_disk=$dev; fi
    done
    [ -n "$root_disk" ] && [ -n "$data_disk" ] && break
    sleep 0.1
done
[ -n "$root_disk" ] || fail "no read-only root disk"
[ -n "$data_disk" ] || fail "no writable disk: create the VM with --disk-gib"

mkdir -p /lower /data /newroot
mount -t ext4 -o ro "$root_disk" /lower || fail "cannot mount the root $root_disk"
if ! mount -t ext4 "$data_disk" /data 2>/dev/null; then
    # A new, empty disk. Anything else that fails to mount is kept as it is.
    if [ -n "$(dd if="$data_disk" bs=64k count=16 2>/dev/null | tr -d '\000' | head -c 1)" ]; then
        fail "the disk $data_disk holds data that is not an ext4 file system"
    fi
    echo "vmhost-guest: formatting the new disk $data_disk"
    mke2fs.e2fsprogs -q -t ext4 -L vmhost-data "$data_disk" || fail "cannot format $data_disk"
    mount -t ext4 "$data_disk" /data || fail "cannot mount $data_disk"
fi
mkdir -p /data/root /data/.work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/data/root,workdir=/data/.work /newroot \
    || fail "cannot mount the overlay root"
umount /proc /sys
exec switch_root /newroot /sbin/init
