#!/usr/bin/env bash
# Installs the Debian packages the tests need (`make deps`), then prints the versions of the
# real clients the tests run against, so a red run says what it ran on.
#
# Usage: tests/deps.sh PACKAGE...
#
# Idempotent and quick when everything is present: it reads dpkg's status only and runs apt
# (update + install) only when a package is missing or the QEMU pair disagrees. When apt cannot
# install, it says which packages it was asked for and shows apt's own reason, and exits non-zero.
#
# The QEMU pair. qemu-system-x86 (with qemu-system-common) and qemu-utils (qemu-img) come from
# one source package and must be the same build: a newer qemu-utils declares
# `Breaks: qemu-system-common (< its own version)`, so a machine image that ships qemu-utils
# from bookworm-backports (10.x) cannot take bookworm's qemu-system-x86 (7.2) beside it, and a
# plain `apt-get install qemu-system-x86` fails to resolve. We install qemu-utils at exactly the
# version of the qemu-system-x86 that is (or will be) installed, downgrading the image's copy
# with --allow-downgrades when it differs. Why downgrade rather than move everything to
# backports: bookworm's QEMU 7.2 is what the firmware lab (SeaBIOS, OVMF, the Debian ipxe-qemu
# ROMs) is tested with, it comes from the sources the machine already has configured, and the
# pair stays consistent whatever the image ships next. Afterwards `qemu-system-x86_64 --version`
# and `qemu-img --version` must report the same version, or this fails.
set -euo pipefail

[ $# -gt 0 ] || { echo "usage: $0 PACKAGE..." >&2; exit 2; }
packages=("$@")

if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
export DEBIAN_FRONTEND=noninteractive

installed_version() { # the installed version of $1, or nothing
    dpkg-query -W -f='${Status}|${Version}\n' "$1" 2>/dev/null |
        awk -F'|' '$1 == "install ok installed" { print $2 }'
}

candidate_version() { # the version apt would install of $1, or nothing
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'
}

# The version qemu-utils must have: that of the qemu-system-x86 installed, else of the one apt
# would install. Empty when qemu-system-x86 is not among the packages.
qemu_pair_version() {
    local v
    v=$(installed_version qemu-system-x86)
    [ -n "$v" ] || v=$(candidate_version qemu-system-x86)
    printf '%s' "$v"
}

wants_qemu=no
for p in "${packages[@]}"; do [ "$p" = qemu-system-x86 ] && wants_qemu=yes; done

missing=()
for p in "${packages[@]}"; do
    [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
qemu_mismatch=no
if [ $wants_qemu = yes ] && [ -n "$(installed_version qemu-system-x86)" ] &&
    [ "$(installed_version qemu-utils)" != "$(installed_version qemu-system-x86)" ]; then
    qemu_mismatch=yes
fi

if [ ${#missing[@]} -gt 0 ] || [ $qemu_mismatch = yes ]; then
    started=$(date +%s)
    log=$(mktemp /tmp/provision-deps.XXXXXX)
    trap 'rm -f "$log"' EXIT
    fail() {
        echo "make deps: $1" >&2
        echo "--- apt said:" >&2
        cat "$log" >&2
        exit 1
    }
    echo "installing Debian packages: ${missing[*]:-(none missing)}"
    "${sudo[@]}" apt-get update -q >"$log" 2>&1 || fail "apt-get update failed; the package lists could not be fetched"
    install=("${missing[@]}")
    if [ $wants_qemu = yes ]; then
        want=$(qemu_pair_version)
        [ -n "$want" ] || fail "no installable qemu-system-x86 in the configured apt sources"
        if [ "$(installed_version qemu-utils)" != "$want" ]; then
            echo "QEMU pair: qemu-utils ${want} to match qemu-system-x86 (installed qemu-utils: $(installed_version qemu-utils | grep . || echo none))"
            install+=("qemu-utils=$want")
        fi
    fi
    if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends --allow-downgrades \
        -o Dpkg::Use-Pty=0 "${install[@]}" >"$log" 2>&1; then
        fail "apt-get could not install: ${install[*]}"
    fi
    for p in "${packages[@]}"; do
        [ -n "$(installed_version "$p")" ] || fail "$p is still not installed after apt-get install"
    done
    echo "installed in $(($(date +%s) - started)) s"
fi
echo "Debian packages present: ${packages[*]}"

# The QEMU that boots the VMs and the qemu-img beside it must be one release.
if [ $wants_qemu = yes ]; then
    sys=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([^ ]*\).*/\1/p')
    img=$(qemu-img --version | sed -n 's/^qemu-img version \([^ ]*\).*/\1/p')
    if [ -z "$sys" ] || [ "$sys" != "$img" ]; then
        echo "make deps: qemu-system-x86_64 is version '${sys}' but qemu-img is '${img}';" \
            "install qemu-utils at the version of qemu-system-x86 (dpkg -l 'qemu-*')" >&2
        exit 1
    fi
fi

# The versions of the real clients the tests use, one line each.
pkgver() { installed_version "$1" || true; }
first() { "$@" 2>&1 | head -n 1 || true; }
echo "test clients:"
printf '  %-14s %s\n' \
    QEMU "$(first qemu-system-x86_64 --version) / $(first qemu-img --version)" \
    OVMF "ovmf $(pkgver ovmf)" \
    iPXE "ipxe $(pkgver ipxe), ipxe-qemu $(pkgver ipxe-qemu)" \
    dnsmasq "$(first dnsmasq --version)" \
    cloud-init "$(first cloud-init --version)" \
    ignition "$(first ignition-validate --version)" \
    "Open vSwitch" "$(first ovs-vsctl --version)" \
    OpenSSH "$(first ssh -V)" \
    ansible-core "$(first ansible --version)" \
    tftp "tftp-hpa $(pkgver tftp-hpa), atftp $(pkgver atftp)" \
    libvirt "$(first virsh --version) (virt-install $(first virt-install --version))" \
    Chromium "$(chromium --version 2>/dev/null | head -n 1) / $(first chromedriver --version)"
