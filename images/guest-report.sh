#!/bin/sh
# The guest's own view of its size, for the host to check a resize from inside the guest:
# prints "vmhost-guest: ready boot_id=…" once, then "vmhost-guest: cpus=N mem_total_kb=M"
# on the console each time that changes, and keeps every hotplugged CPU online.
# Run as the last step of the test image's init, and as a unit in the Postgres image.
boot_id=$(cat /proc/sys/kernel/random/boot_id)
echo "vmhost-guest: ready boot_id=$boot_id"

# Shell builtins only in this loop: a fork per tick would itself show up as guest load
# under emulation and skew the autoscaling tests.
count_cpus() {
    # "0-2,4" → cpus=4, without a subshell
    local part low high
    local IFS=,
    cpus=0
    for part in $1; do
        low=${part%-*}
        high=${part#*-}
        cpus=$((cpus + high - low + 1))
    done
}
last=""
while true; do
    for online in /sys/devices/system/cpu/cpu*/online; do
        [ -f "$online" ] || continue
        read -r state < "$online"
        [ "$state" = 0 ] && echo 1 > "$online"
    done
    read -r cpu_list < /sys/devices/system/cpu/online
    while read -r key value _; do
        [ "$key" = "MemTotal:" ] && { mem_kb=$value; break; }
    done < /proc/meminfo
    count_cpus "$cpu_list"
    now="cpus=$cpus mem_total_kb=$mem_kb"
    if [ "$now" != "$last" ]; then
        echo "vmhost-guest: $now"
        last=$now
    fi
    sleep 0.1
done
