# What qemu/build.sh builds, and the parts of it that need no build: the recipe key and
# the patch series. Sourced by qemu/build.sh and by the unit tests (tests/unit/test_qemu_recipe.py),
# which point the functions at fixture folders.

# The source: Debian's QEMU source package (upstream QEMU plus Debian's own patches,
# which dpkg-source applies when it unpacks it). 10.2 is newer than the 10.0 that
# `make setup` installs from bookworm-backports. Pinned, so the key (and the cache)
# stays the same until someone changes it; BELUGA_QEMU_VERSION overrides it ("" takes
# the newest version the suite lists), BELUGA_QEMU_SUITE the suite it comes from.
QEMU_SOURCE_PACKAGE=qemu
QEMU_SOURCE_SUITE=${BELUGA_QEMU_SUITE-unstable}
QEMU_SOURCE_VERSION=${BELUGA_QEMU_VERSION-1:10.2.2+ds-1}

# Only what the testbed uses: the x86_64 system emulator (TCG; KVM for the machines
# where it works), the CXL devices (built in: they come with the q35/pc machines'
# Kconfig), slirp user networking (-netdev user: SSH to every guest), virtio-9p
# (`up --share`, `up --modules`; it needs the xattr calls of --enable-attr). No tools,
# docs, user-mode emulation or display; qemu-img stays the system's.
# Debian's source package carries no firmware blobs (so --disable-install-blobs, or the
# install stops at the first missing one): SeaBIOS, the iPXE ROMs and the option ROMs
# (pvh.bin, linuxboot_dma.bin, ...) come from Debian's seabios, ipxe-qemu and
# qemu-system-data packages, the firmware path of Debian's own build.
QEMU_CONFIGURE_OPTS=(
    --target-list=x86_64-softmmu
    --without-default-features
    --enable-kvm
    --enable-slirp
    --enable-virtfs
    --enable-attr
    --enable-pixman
    --disable-tools
    --disable-user
    --disable-docs
    --disable-download
    --disable-install-blobs
    --python=/usr/bin/python3
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
)

# The Debian packages the build needs, in one place. meson must be >= 1.5 (QEMU's
# pythondeps.toml; Debian 12 has 1.0, bookworm-backports 1.7): see build.sh.
QEMU_BUILD_DEPS=(dpkg-dev patch gcc make ninja-build meson pkg-config python3 python3-venv flex bison
                 libglib2.0-dev libpixman-1-dev libslirp-dev zlib1g-dev)
# What the built QEMU loads at run time (the firmware path above).
QEMU_RUNTIME_DEPS=(seabios ipxe-qemu qemu-system-data)

# The patches named in folder $1's `series` file, in order, one per line: the first
# word of each line; blank lines and lines starting with # are skipped.
series_entries() {
    local series=$1/series
    [ -f "$series" ] || { printf '%s: no such file\n' "$series" >&2; return 1; }
    awk '{ sub(/#.*/, "") } NF { print $1 }' "$series"
}

# The text the key is the hash of: the source version, the configure options and every
# patch of folder $2's series (name and content hash), in order. $1: the source version.
recipe_text() {
    local version=$1 dir=$2 name
    printf 'source %s %s\n' "$QEMU_SOURCE_PACKAGE" "$version"
    printf 'configure %s\n' "${QEMU_CONFIGURE_OPTS[@]}"
    series_entries "$dir" >/dev/null || return 1
    while read -r name; do
        [ -f "$dir/$name" ] || { printf '%s/series: %s: no such file in %s\n' "$dir" "$name" "$dir" >&2; return 1; }
        printf 'patch %s %s\n' "$name" "$(sha256sum < "$dir/$name" | cut -d' ' -f1)"
    done < <(series_entries "$dir")
}

# The recipe key: 16 hex digits of the SHA-256 of recipe_text. Same arguments.
recipe_key() {
    local text
    text=$(recipe_text "$@") || return 1
    printf '%s\n' "$text" | sha256sum | cut -c1-16
}

# Apply folder $2's series to the source tree $1 in order (patch -p1). The first patch
# that does not apply stops it: its name, its place in the series and patch's own
# output go to stderr, and nothing of that patch is left half-applied (each is tried
# with --dry-run first). No fuzz, as dpkg-source applies Debian's own: a patch whose
# context moved is refreshed, never guessed into place.
apply_series() {
    local src=$1 dir=$2 name n=0 out total
    total=$(series_entries "$dir" | wc -l) || return 1
    while read -r name; do
        n=$((n + 1))
        if [ ! -f "$dir/$name" ]; then
            printf '%s/series: patch %d of %d, %s: no such file\n' "$dir" "$n" "$total" "$name" >&2
            return 1
        fi
        if ! out=$(patch -d "$src" -p1 --forward --batch --fuzz=0 --dry-run < "$dir/$name" 2>&1); then
            printf '%s/%s (patch %d of %d in %s/series) does not apply to %s:\n%s\n' \
                "$dir" "$name" "$n" "$total" "$dir" "$src" "$out" >&2
            return 1
        fi
        patch -d "$src" -p1 --forward --batch --fuzz=0 --no-backup-if-mismatch --silent < "$dir/$name" >&2 || return 1
        printf '  applied %s\n' "$name" >&2
    done < <(series_entries "$dir")
}
