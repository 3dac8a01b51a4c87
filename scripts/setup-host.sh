#!/usr/bin/env bash
# Host setup for beluga-testbed: system packages (QEMU >= 10, debootstrap,
# e2fsprogs, gcc and the Python headers, ...), a virtualenv at .venv with the
# package installed editable, and the store's C read path (beluga/_native*.so).
# Idempotent: a second run only checks and takes seconds.
set -eEuo pipefail
cd "$(dirname "$0")/.."

say() { printf '%s\n' "$*" >&2; }
die() { trap - ERR; say "✗ $1"; [ -n "${2:-}" ] && say "  hint: $2"; exit 1; }
# Any command that fails ends setup with its name and line, never silently.
trap 'rc=$?; die "setup failed (exit $rc) at scripts/setup-host.sh:$LINENO: $BASH_COMMAND" \
    "fix what the command above printed, then run make setup again"' ERR
. scripts/apt-sources.sh

QEMU_MIN_MAJOR=10
# gcc, python3-dev: the store's C read path (beluga/_native.c).
# chromium: the unit test that renders the scenario report in a real headless browser.
APT_PACKAGES=(debootstrap e2fsprogs openssh-client redis-server python3-venv python3-dev gcc ca-certificates chromium)
QEMU_PACKAGES=(qemu-system-x86 qemu-utils)
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

qemu_major() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
    qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1
}

need_system=0
[ "$(qemu_major)" -ge "$QEMU_MIN_MAJOR" ] || need_system=1
command -v qemu-img >/dev/null 2>&1 || need_system=1
for tool in debootstrap mkfs.ext4 ssh redis-server chromium; do
    command -v "$tool" >/dev/null 2>&1 || need_system=1
done
python3 -c 'import ensurepip, venv' 2>/dev/null || need_system=1
# The store's C read path: a compiler and the headers of the Python the virtualenv uses.
command -v gcc >/dev/null 2>&1 || need_system=1
python3 -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || need_system=1

if [ "$need_system" = 1 ]; then
    . /etc/os-release 2>/dev/null || true
    manual="install QEMU >= $QEMU_MIN_MAJOR (qemu-system-x86_64 and qemu-img), debootstrap, e2fsprogs, openssh-client, redis-server, chromium, gcc and python3 (>= 3.11) with venv and its headers (python3-dev), then run 'make setup' again"
    case "${ID:-}:${VERSION_CODENAME:-}" in
        debian:bookworm|debian:trixie|debian:forky|debian:sid) ;;
        *) die "this system (${PRETTY_NAME:-unknown}) is not Debian 12 or later: automatic setup only knows Debian" "$manual" ;;
    esac
    [ "$(id -u)" = 0 ] || die "installing system packages needs root" "run 'sudo make setup', or $manual"
    export DEBIAN_FRONTEND=noninteractive
    apt_target=()
    if [ "$VERSION_CODENAME" = bookworm ]; then
        # Debian 12's own QEMU is 7.2, too old for the CXL switch devices; the
        # bookworm-backports suite of the same mirror has 10.0.
        if ! apt_has_suite /etc/apt bookworm-backports; then
            mirror=${BELUGA_TESTBED_MIRROR:-$(debian_mirror /etc/apt bookworm)}
            [ -n "$mirror" ] || die "no Debian mirror for bookworm found in /etc/apt/sources.list or /etc/apt/sources.list.d/*.{list,sources}" \
                "set BELUGA_TESTBED_MIRROR to a Debian mirror URL (for example http://deb.debian.org/debian), or add a 'bookworm-backports' entry, then run 'make setup' again"
            say "• adding bookworm-backports from $mirror"
            printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$mirror" > /etc/apt/sources.list.d/beluga-testbed-backports.sources
        fi
        apt_target=(-t bookworm-backports)
    fi
    say "• apt-get update"
    apt-get update -q >&2
    say "• installing ${QEMU_PACKAGES[*]} ${APT_PACKAGES[*]}"
    apt-get install -y -q "${apt_target[@]}" "${QEMU_PACKAGES[@]}" >&2
    apt-get install -y -q "${APT_PACKAGES[@]}" >&2
    # The benchmark starts its own redis-server; the distribution's service is not needed.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q redis-server 2>/dev/null; then
        systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
    [ "$(qemu_major)" -ge "$QEMU_MIN_MAJOR" ] || die "QEMU $(qemu_major) installed, >= $QEMU_MIN_MAJOR needed" "install qemu-system-x86 from bookworm-backports by hand"
fi
say "✓ system packages (QEMU $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}'))"

stamp="$VENV/.beluga-setup"
want=$( (cat pyproject.toml; echo "$TORCH_SPEC") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/beluga-testbed" ]; then
    say "✓ virtualenv $VENV is up to date"
else
    say "• creating virtualenv $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
    # torch first: the CPU build, so the package's torch range pulls nothing more.
    "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC" >&2
    # bench: Mooncake Store, a peer in `beluga bench` (tests/unit/beluga/test_store_bench.py runs it under CI).
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test,bench]' >&2
    echo "$want" > "$stamp"
    say "✓ virtualenv $VENV ($("$VENV/bin/python" --version))"
fi

# The store's C read path (rebuilt only when beluga/_native.c is newer than the module).
native=$("$VENV/bin/python" -m beluga.native_build) \
    || die "building the store's C read path (beluga/_native.c) failed" \
           "install gcc and python3-dev, then run 'make setup' again; the store also runs without it (BELUGA_NATIVE=0)"
say "✓ store read path built (${native#"$PWD/"})"
