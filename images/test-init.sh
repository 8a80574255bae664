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

# A static address from the kernel command line (vmhost.ip=10.88.0.50/24) and a TCP echo
# server on port 7000, for the network tests.
ip link set lo up
guest_ip=$(sed -n 's/.*vmhost\.ip=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$guest_ip" ]; then
    ip link set eth0 up
    ip addr add "$guest_ip" dev eth0
    nc -ll -p 7000 -e cat &
fi

boot_id=$(cat /proc/sys/kernel/random/boot_id)

# The monitor, when the image carries it and the kernel command line does not say
# vmhost.monitor=off; it creates the workload cgroup.
if [ -x /bin/vm-monitor ] && ! grep -q 'vmhost\.monitor=off' /proc/cmdline; then
    vm-monitor &
fi
# A test workload named on the kernel command line, e.g. vmhost.workload=vmhost-memhog,700,16,50,20
# runs inside the monitor's cgroup.
workload=$(sed -n 's/.*vmhost\.workload=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
if [ -n "$workload" ]; then
    (
        until [ -f /sys/fs/cgroup/workload/cgroup.procs ]; do sleep 0.1; done
        exec sh -c 'echo $$ > /sys/fs/cgroup/workload/cgroup.procs && exec "$@"' workload $workload
    ) &
fi

# A disk writer, when the kernel command line says vmhost.diskwriter: it fills the first
# 16 MiB of /dev/vda with random bytes once and reports their checksum, then writes one
# numbered record per 512-byte sector after them, flushed, and reports each one with its
# boot. The host checks the disk image against these reports.
if grep -q 'vmhost\.diskwriter' /proc/cmdline; then
    (
        until [ -b /dev/vda ]; do sleep 0.1; done
        dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null
        dd if=/tmp/blob of=/dev/vda bs=1M conv=fsync 2>/dev/null
        set -- $(md5sum /tmp/blob)
        rm /tmp/blob
        echo "vmhost-disk: blob_md5=$1 boot=$boot_id"
        i=0
        while true; do
            printf 'record %08d %s\n' "$i" "$boot_id" \
                | dd of=/dev/vda bs=512 seek=$((32768 + i)) conv=notrunc,sync,fsync 2>/dev/null \
                && echo "vmhost-disk: record=$i boot=$boot_id"
            i=$((i + 1))
            sleep 0.2
        done
    ) &
fi

exec /bin/busybox sh /bin/vmhost-report
