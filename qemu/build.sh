#!/usr/bin/env bash
# Build a newer QEMU for `beluga-testbed up --qemu`: Debian's QEMU source package
# (qemu/recipe.sh says which version), our patches (qemu/patches/series) applied in
# order, configured for what the testbed needs only, installed under
#     ${BELUGA_TESTBED_CACHE:-~/.cache/beluga-testbed}/qemu/<key>/
# where <key> is a hash of the source version, the patches and the configure options.
# A second run with the same recipe builds nothing. Prints the binary's path (stdout);
# progress goes to stderr. Installing the build dependencies needs root once; the rest
# runs as any user. /etc/apt is never changed: the source package comes through a
# private apt folder under the cache.
set -eEuo pipefail
cd "$(dirname "$0")/.."

say() { printf '%s\n' "$*" >&2; }
die() { trap - ERR; say "✗ $1"; [ -n "${2:-}" ] && say "  hint: $2"; exit 1; }
step="start"
# Any command that fails ends the build with the step, the command and its line.
# (Only the script itself reports: a subshell's failure is reported once, by its parent.)
trap 'rc=$?; [ "$BASH_SUBSHELL" = 0 ] || exit $rc; die "QEMU build failed (exit $rc) in step \"$step\" at qemu/build.sh:$LINENO: $BASH_COMMAND" \
    "fix what the command above printed, then run make qemu again"' ERR
. scripts/apt-sources.sh
. qemu/recipe.sh

PATCHES=qemu/patches
cache=${BELUGA_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/beluga-testbed}/qemu
JOBS=${JOBS:-$(nproc)}
times=()
t_step=$SECONDS
begin() {  # begin STEP: the previous step ends here (its time is logged)
    if [ "$step" != start ]; then
        times+=("$step $((SECONDS - t_step))")
        say "  ($step: $((SECONDS - t_step)) s)"
    fi
    step=$1 t_step=$SECONDS
    say "• $step"
}

. /etc/os-release 2>/dev/null || true
mkdir -p "$cache"

# The key, the lock on it, and nothing more to do when that QEMU is built already.
# (A pinned version needs no network for that: a second `make qemu` runs offline.)
have_key() {
    key=$(recipe_key "$1" "$PATCHES") || die "the patch series in $PATCHES is broken (see above)" \
        "every line of $PATCHES/series names a file in $PATCHES"
    dest="$cache/$key"
    binary="$dest/bin/qemu-system-x86_64"
    exec 9>"$cache/.lock-$key"
    flock -n 9 || { say "  another build of $key is running; waiting for it"; flock 9; }
    if [ -x "$binary" ]; then
        say "✓ QEMU $1 ($key) is built already"
        printf '%s\n' "$binary"
        exit 0
    fi
}
[ -z "$QEMU_SOURCE_VERSION" ] || have_key "$QEMU_SOURCE_VERSION"

# --- the source package's index, in a private apt folder -------------------------------
begin "source index"
apt_dir="$cache/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/sources.list.d"
# The machine's own deb-src entry for that suite, else its Debian mirror (scripts/apt-sources.sh).
mirror=${BELUGA_TESTBED_MIRROR:-$(source_mirror /etc/apt "$QEMU_SOURCE_SUITE" "${VERSION_CODENAME:-}")}
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d/*.{list,sources}" \
    "set BELUGA_TESTBED_MIRROR to a Debian mirror URL (for example http://deb.debian.org/debian)"
printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" "$QEMU_SOURCE_SUITE" > "$apt_dir/sources.list.d/qemu-src.sources"
apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir" -o "Dir::Cache::Archives=$apt_dir/archives"
          -o "Debug::NoLocking=1" -o "APT::Get::List-Cleanup=0")
# As root apt downloads as the _apt user, who cannot write into root's cache folder.
[ "$(id -u)" != 0 ] || apt_opts+=(-o "APT::Sandbox::User=root")
say "  deb-src $mirror $QEMU_SOURCE_SUITE (in $apt_dir)"
apt-get "${apt_opts[@]}" -q update >&2
versions=$(apt-cache "${apt_opts[@]}" showsrc "$QEMU_SOURCE_PACKAGE" 2>/dev/null | awk '$1 == "Version:" { print $2 }' | sort -Vr | uniq)
[ -n "$versions" ] || die "$mirror $QEMU_SOURCE_SUITE lists no source package $QEMU_SOURCE_PACKAGE" \
    "set BELUGA_QEMU_SUITE to a Debian suite that has it (for example unstable or trixie)"
version=${QEMU_SOURCE_VERSION:-$(head -n1 <<< "$versions")}
grep -qxF -- "$version" <<< "$versions" || die "$QEMU_SOURCE_PACKAGE $version is not in $QEMU_SOURCE_SUITE at $mirror (it lists: $(tr '\n' ' ' <<< "$versions"))" \
    "set BELUGA_QEMU_VERSION to one of those (\"\" for the newest), or change QEMU_SOURCE_VERSION in qemu/recipe.sh"
[ -n "$QEMU_SOURCE_VERSION" ] || have_key "$version"
say "  key $key: $QEMU_SOURCE_PACKAGE $version, $(series_entries "$PATCHES" | wc -l) patch(es) from $PATCHES/series"

# --- build dependencies --------------------------------------------------------------
begin "build dependencies"
# QEMU's configure runs the meson that the Python it is given (/usr/bin/python3, in
# QEMU_CONFIGURE_OPTS) imports, not the first one on PATH.
meson_version() { /usr/bin/python3 -c 'from mesonbuild.coredata import version; print(version)' 2>/dev/null || echo none; }
meson_ok() {
    local v; v=$(meson_version)
    [ "$v" != none ] && [ "$(printf '%s\n1.5.0\n' "$v" | sort -V | head -n1)" = 1.5.0 ]
}
missing=()
for pkg in "${QEMU_BUILD_DEPS[@]}" "${QEMU_RUNTIME_DEPS[@]}"; do
    [ "$pkg" = meson ] && { meson_ok || missing+=(meson); continue; }
    dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q ' installed$' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "the build needs ${missing[*]} and this is not a Debian system" \
        "install them (meson >= 1.5) by hand, then run make qemu again"
    [ "$(id -u)" = 0 ] || die "the build needs ${missing[*]}; installing them needs root" \
        "run 'sudo make qemu' once, or install them with apt-get (meson >= 1.5: from bookworm-backports on Debian 12)"
    export DEBIAN_FRONTEND=noninteractive
    say "  installing ${missing[*]}"
    # Debian 12's meson is 1.0; bookworm-backports (which make setup adds) has 1.7.
    backports="${VERSION_CODENAME:-}-backports"
    target=()
    if [ "${VERSION_CODENAME:-}" = bookworm ] && apt_has_suite /etc/apt "$backports"; then target=(-t "$backports"); fi
    others=()
    for pkg in "${missing[@]}"; do [ "$pkg" = meson ] || others+=("$pkg"); done
    [ ${#others[@]} -eq 0 ] || apt-get install -y -q "${others[@]}" >&2
    case " ${missing[*]} " in *" meson "*) apt-get install -y -q "${target[@]}" meson >&2 ;; esac
fi
meson_ok || die "meson $(meson_version) found (for /usr/bin/python3), QEMU needs >= 1.5" \
    "on Debian 12: apt-get install -t bookworm-backports meson"

work="$cache/.work-$key"
rm -rf "$work"
mkdir -p "$work"

begin "download"
(cd "$work" && apt-get "${apt_opts[@]}" -q source --download-only "$QEMU_SOURCE_PACKAGE=$version" >&2)

begin "unpack"
dsc=$(ls "$work"/*.dsc)
# apt checked the files against the signed index already (the .dsc's own signature
# would need the debian-keyring package).
dpkg-source --no-check -x "$dsc" "$work/src" >/dev/null

begin "patches"
apply_series "$work/src" "$PATCHES" || die "the patch series does not apply to $QEMU_SOURCE_PACKAGE $version (see above)" \
    "refresh that patch against this version (qemu/patches/README.md), or drop it from $PATCHES/series"

begin "configure"
mkdir -p "$work/build"
# QEMU installs relocatably: configured for $work/install, it runs from $dest as well.
(cd "$work/build" && ../src/configure --prefix="$work/install" --with-pkgversion="beluga-$key" \
    "${QEMU_CONFIGURE_OPTS[@]}" >&2)

begin "build"
# Only what gets installed: `make` would also build QEMU's own test programs (a third of
# the compiling, measured on 10.2: 2138 C files against 1348).
mapfile -t targets < <(cd "$work/build" && ./pyvenv/bin/meson introspect --installed . |
    /usr/bin/python3 -c 'import json, os, sys
for built in json.load(sys.stdin):
    rel = os.path.relpath(built)
    if not rel.startswith(".."):
        print(rel)')
[ ${#targets[@]} -gt 0 ] || die "meson lists nothing to install in $work/build" "see the configure output above"
ninja -C "$work/build" -j"$JOBS" "${targets[@]}" >&2

begin "install"
(cd "$work/build" && ./pyvenv/bin/meson install --no-rebuild --quiet >&2)
recipe_text "$version" "$PATCHES" > "$work/install/beluga-recipe.txt"
printf 'mirror %s %s\n' "$mirror" "$QEMU_SOURCE_SUITE" >> "$work/install/beluga-recipe.txt"
"$work/install/bin/qemu-system-x86_64" --version | head -n1 | grep -qF "beluga-$key" \
    || die "the installed QEMU does not report beluga-$key in --version" "see the build output above"
begin "done"
printf '%s\n' "${times[@]}" > "$work/install/beluga-build-times.txt"
mv "$work/install" "$dest"
rm -rf "$work"
say "✓ QEMU $version ($key) in $dest; use it with: beluga-testbed up TOPOLOGY --qemu $binary"
printf '%s\n' "$binary"
