#!/bin/busybox sh
# PID 1 of the minimal test image: load the virtio/vsock modules, then keep every
# hotplugged CPU online and report the guest's view of its size on the serial console
# each time it changes, so the host can prove a resize from inside the guest.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup

for m in $(cat /etc/modules-load); do
    insmod "/lib/modules/$m.ko" || echo "vmhost-guest: failed to load $m"
done

boot_id=$(cat /proc/sys/kernel/random/boot_id)
echo "vmhost-guest: ready boot_id=$boot_id"

last=""
while true; do
    for online in /sys/devices/system/cpu/cpu*/online; do
        [ -f "$online" ] && [ "$(cat "$online")" = 0 ] && echo 1 > "$online"
    done
    cpus=$(grep -c '^processor' /proc/cpuinfo)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    now="cpus=$cpus mem_total_kb=$mem_kb"
    if [ "$now" != "$last" ]; then
        echo "vmhost-guest: $now"
        last=$now
    fi
    sleep 0.1
done
