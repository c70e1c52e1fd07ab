#!/usr/bin/env bash
# Gathers the debconf templates of the Debian 12 installer components (udebs) and target
# packages whose questions the built-in preseed answers, and writes them, concatenated, to
# OUT/templates (and the questions made at run time, OUT/registered). tests/it/validators.rs checks that every question the rendered preseed sets
# exists there with the type the preseed gives it (d-i silently ignores a misspelt question,
# so nothing else would catch one).
#
# Three sources, because no one holds them all: the netboot initrd of
# debian-installer-12-netboot-amd64 (the first stage's 25 components: netcfg, choose-mirror,
# localechooser, console-setup, preseed); udebs from the archive's main/debian-installer index,
# read with a private apt state that leaves the host's alone (partman and pkgsel, which d-i
# fetches from the mirror during the install); and regular packages that carry the same
# templates (user-setup) or own target questions (tasksel, popularity-contest).
# Not covered, because the package mirror this is built with serves neither the udebs nor a
# package with their templates: clock-setup, tzsetup, grub-installer, finish-install and
# partman-partitioning (the test names the questions it cannot check).
# Cached in OUT, keyed by the package versions and this script.
#
# usage: templates.sh OUT
set -euo pipefail
OUT=${1:?usage: templates.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9

udebs=(partman-base partman-auto partman-auto-lvm partman-lvm partman-md pkgsel)
debs=(debian-installer-12-netboot-amd64 user-setup tasksel popularity-contest)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/state/lists/partial" "$work/cache/archives/partial" "$work/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main/debian-installer" > "$work/sources.list"
apt_di=(-o "Dir::State=$work/state" -o "Dir::Cache=$work/cache" -o "Dir::Etc::SourceList=$work/sources.list"
        -o Dir::Etc::SourceParts=/nonexistent -o APT::Architecture=amd64)
apt-get "${apt_di[@]}" update -q >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; exit 1; }

versions=$( (for p in "${udebs[@]}"; do apt-cache "${apt_di[@]}" policy "$p"; done
             for p in "${debs[@]}"; do apt-cache policy "$p"; done) | awk '/^[a-z]/ {p=$1} /Candidate/ {print p $2}')
key=$( (echo "$versions"; cat "$HERE/templates.sh") | sha256sum | cut -c1-16)
if [[ -f "$OUT/key" && "$(cat "$OUT/key")" == "$key" && -f "$OUT/templates" && -f "$OUT/registered" ]]; then
    echo "d-i templates up to date in $OUT"
    exit 0
fi
(cd "$work/debs" && apt-get "${apt_di[@]}" download -q "${udebs[@]}" && apt-get download -q "${debs[@]}") \
    >"$work/download.log" 2>&1 || { grep -v '^W: Download is performed unsandboxed' "$work/download.log" >&2; exit 1; }
: > "$work/templates"
add() { cat "$1" >> "$work/templates"; echo >> "$work/templates"; }
# Some questions exist only at run time: a component's script makes one from a template with
# `db_register TEMPLATE QUESTION` (partman-lvm/confirm_nooverwrite is partman-lvm/confirm's).
# Those with literal names go to OUT/registered as "QUESTION TEMPLATE" lines.
: > "$work/registered"
for d in "$work"/debs/*.udeb "$work"/debs/*.deb; do
    [[ "$d" == *debian-installer-12-netboot* ]] && continue
    dpkg-deb -e "$d" "$work/ctl"
    [[ -f "$work/ctl/templates" ]] && add "$work/ctl/templates"
    if [[ "$d" == *.udeb ]]; then
        dpkg-deb -x "$d" "$work/data"
        { grep -rhoE 'db_register [a-z0-9_.-]+/[a-z0-9/_.-]+ [a-z0-9_.-]+/[a-z0-9/_.-]+' "$work/data" || true; } |
            awk '{print $3, $2}' >> "$work/registered"
        rm -rf "$work/data"
    fi
    rm -rf "$work/ctl"
done
mkdir -p "$work/initrd"
dpkg-deb --fsys-tarfile "$work"/debs/debian-installer-12-netboot-amd64_*.deb |
    tar -xO ./usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64/initrd.gz |
    gzip -d | (cd "$work/initrd" && cpio -id --quiet 'var/lib/dpkg/info/*.templates')
for t in "$work"/initrd/var/lib/dpkg/info/*.templates; do add "$t"; done
mkdir -p "$OUT"
mv "$work/templates" "$OUT/templates"
sort -u "$work/registered" > "$OUT/registered"
echo "$key" > "$OUT/key"
echo "d-i templates ($(grep -c '^Template:' "$OUT/templates")) in $OUT"
