# Shared by the image builders (sourced): the guest kernel, its modules, the cache and
# reproducible archives.

# The newest cloud kernel in /boot, unless $1 names one.
guest_kernel_version() {
    if [ -n "${1:-}" ]; then
        echo "$1"
    else
        ls /boot | sed -n 's/^vmlinuz-\(.*-cloud-amd64\)$/\1/p' | sort -V | tail -n 1
    fi
}

# Checks the kernel and its config; dies with the package to install when it is missing.
check_guest_kernel() {
    local kver=$1
    [ -f "/boot/vmlinuz-$kver" ] || die "no guest kernel /boot/vmlinuz-$kver (apt-get install linux-image-cloud-amd64)"
    "$images_dir/../kernel/check-config" "/boot/config-$kver" >&2
}

# Prints the .ko file of each module named after $1 (the kernel version), in order;
# a module built into the kernel has nothing to load and prints nothing.
module_files() {
    local kver=$1 m f
    shift
    for m in "$@"; do
        f=$(find "/lib/modules/$kver/kernel" -name "$m.ko" -print -quit)
        if [ -z "$f" ]; then
            grep -q "/$m.ko$" "/lib/modules/$kver/modules.builtin" \
                || die "module $m is neither built in nor present for $kver"
            continue
        fi
        echo "$f"
    done
}

# The shared libraries of each binary given.
shared_libraries() {
    local b
    for b in "$@"; do
        ldd "$b" 2>/dev/null | grep -o '/[^ ]*' || true
    done | sort -u
}

# Copies each binary into $1/bin, without debug info (of no use in the guest, and it would
# triple the image).
install_binaries() {
    local dest=$1 b
    shift
    for b in "$@"; do
        objcopy --strip-debug "$b" "$dest/$(basename "$b")"
    done
}

# Copies each shared library into the root $1 at its own path.
install_libraries() {
    local root=$1 l
    shift
    for l in "$@"; do
        mkdir -p "$root$(dirname "$l")"
        cp -L "$l" "$root$l"
    done
}

# A reproducible gzip'd newc archive of $1 on stdout: fixed owner, fixed timestamps,
# sorted entries, no gzip name or time.
reproducible_cpio() {
    find "$1" -exec touch -h -d @0 {} +
    (cd "$1" && find . -print0 | LC_ALL=C sort -z \
        | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) \
        | gzip -n -9
}

# Prints $1 and exits when the image there is complete (it holds every file named after).
found_in_cache() {
    local out=$1 f
    shift
    for f in "$@"; do
        [ -f "$out/$f" ] || return 0
    done
    echo "$out"
    exit 0
}

# Takes the build lock of the image at $1: concurrent builds of the same image (parallel
# tests) take turns, and the second finds the first one's result instead of replacing it
# under a running guest.
lock_cache_entry() {
    mkdir -p "$(dirname "$1")"
    exec 9>"$(dirname "$1")/.lock-$(basename "$1")"
    flock 9
}

# Moves the finished build folder $1 to $2, replacing any partial result left by an
# interrupted build.
publish_image() {
    chmod 0755 "$1"
    rm -rf "$2"
    mv "$1" "$2"
    echo "$2"
}

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}
