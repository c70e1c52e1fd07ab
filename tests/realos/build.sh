#!/usr/bin/env bash
# Builds the real-OS install medium: a Debian 12 system made with debootstrap (systemd, Debian's
# kernel, GRUB for BIOS and for UEFI, openssh-server, cloud-init, curl, python3 for
# Ansible, Open vSwitch, and Ignition) as an ext4 filesystem image. The test installer, on a
# real-OS profile, finds this image on a second disk of the VM, copies it to the VM's disk as
# its root filesystem, installs GRUB for both firmware kinds, and points the installed system's
# real consumer (cloud-init, or Ignition) at provision.
#
# The image is a generic one: no host keys, no machine id, no hostname, no users but root
# (locked) — what makes a machine itself comes from provision's configs at its first boot.
#
# The result is cached in OUT, keyed by the candidate versions of the packages asked for and
# this directory's files: a second run is a no-op (`make test` keeps it in
# ~/.cache/provision-tests, beside the test installer).
#
# usage: build.sh OUT     → OUT/root.img (ext4, label provision-root), OUT/key
set -euo pipefail
OUT=${1:?usage: build.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)

mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9

# linux-image-amd64: Debian's kernel for real machines (its cloud flavour has no SATA driver,
# and the VMs' disks are SATA: provision::lab::VmSpec::sata), with the openvswitch datapath.
# selinux-policy-default and policycoreutils: Debian builds Ignition with SELinux relabelling
# on (as Fedora CoreOS's), so its files stage reads the policy type from the new root's
# /etc/selinux/config and runs setfiles on what it wrote; SELinux itself stays off
# (rootfs/etc/selinux/config, and Debian's kernel does not start it unless asked to).
PACKAGES=(systemd-sysv udev linux-image-amd64 initramfs-tools grub2-common grub-pc-bin
    grub-efi-amd64-bin openssh-server cloud-init curl ca-certificates python3 sudo
    openvswitch-switch ifupdown isc-dhcp-client iproute2 dosfstools fdisk e2fsprogs ignition
    passwd locales selinux-policy-default policycoreutils)

if ! apt-cache policy linux-image-amd64 2>/dev/null | grep -q Candidate; then
    apt-get update -qq
fi
versions=$(for p in "${PACKAGES[@]}"; do apt-cache policy "$p" | awk -v p="$p" '/Candidate/ {print p"="$2}'; done)
key=$( (echo "$versions"; cat "$HERE/build.sh"; cd "$HERE" && find rootfs -type f | LC_ALL=C sort | while read -r f; do echo "$f"; cat "$f"; done) | sha256sum | cut -c1-16)
if [[ -f "$OUT/key" && "$(cat "$OUT/key")" == "$key" && -f "$OUT/root.img" ]]; then
    echo "real-OS medium up to date in $OUT"
    exit 0
fi

# The mirror apt uses here (deb822 sources, or the one-line kind).
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[[ -n "$mirror" ]] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[[ -n "$mirror" ]] || mirror=http://deb.debian.org/debian

work=$(mktemp -d /var/tmp/provision-realos.XXXXXX)
root="$work/root"
# Downloaded packages are kept beside OUT, so a rebuild (a changed file here) fetches nothing
# that has not changed.
debs="$OUT.debs"
mkdir -p "$debs/partial"
cleanup() {
    for m in var/cache/apt/archives dev/pts dev proc sys; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT

echo "build.sh: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --cache-dir="$debs" bookworm "$root" "$mirror" > "$work/debootstrap.log" 2>&1 || {
    tail -30 "$work/debootstrap.log" >&2
    echo "build.sh: debootstrap failed (log above)" >&2
    exit 1
}
# Nothing starts services inside the build (invoke-rc.d asks policy-rc.d; 101: not allowed).
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount --bind "$debs" "$root/var/cache/apt/archives"
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
in_root apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" > "$work/apt.log" 2>&1 || {
    tail -30 "$work/apt.log" >&2
    echo "build.sh: installing the packages failed (log above)" >&2
    exit 1
}

# The system's own configuration (rootfs/), then what makes the image generic.
cp -r "$HERE"/rootfs/etc/. "$root/etc/"
chmod 0440 "$root/etc/sudoers.d/provision-sudo-group"
in_root visudo -c -q || { echo "build.sh: rootfs/etc/sudoers.d does not parse" >&2; exit 1; }
# cloud-init's default locale (en_US.UTF-8) must exist for its locale module to set it; as the
# system's default already, that module has nothing to do (it would otherwise run locale-gen
# again at the first boot: 20 seconds under TCG).
sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' "$root/etc/locale.gen"
in_root locale-gen >/dev/null
in_root update-locale LANG=en_US.UTF-8
# Timers and jobs that only slow a test machine's first minutes (and make the boot vary).
# (selinux-autorelabel-mark only leaves a note for a later switch to SELinux.)
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer selinux-autorelabel-mark.service >/dev/null 2>&1
in_root systemctl enable provision-ssh-host-keys.service >/dev/null 2>&1
rm -f "$root"/etc/ssh/ssh_host_*
# Empty: systemd makes the machine's own id at its first boot. Not "uninitialized", which would
# make that boot a first boot to systemd (machine-id(5)) and apply every preset: Debian enables
# units when it installs them and ships no presets to speak of, so preset-all would enable
# every unit a package left off (systemd-networkd beside ifupdown, for one). The installer
# applies Ignition's presets to the units they name instead.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# Where the installer mounts the new root for Ignition run from this system (its default root).
mkdir -p "$root/sysroot"
: > "$root/etc/hostname"
: > "$root/etc/resolv.conf"         # debootstrap copied this machine's; DHCP writes the machine's
passwd -R "$root" -l root >/dev/null
rm -f "$root/usr/sbin/policy-rc.d"
# (the package cache is unmounted first: it is kept, not emptied)
for m in var/cache/apt/archives dev/pts dev proc sys; do umount "$root/$m"; done
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/log/*.log "$root"/var/log/apt/* "$root/boot/grub/grub.cfg"

# The filesystem image: what the tree holds, plus room for a first boot's logs; the installer
# grows it to its partition.
used_mb=$(du -sm "$root" | cut -f1)
size_mb=$((used_mb + used_mb / 4 + 128))
rm -f "$work/root.img"
# metadata_csum_seed: the installer gives each copy a UUID of its own (the medium and the disk
# must not share one: the initramfs mounts root by UUID), and with the seed that is instant.
mkfs.ext4 -q -F -L provision-root -O metadata_csum_seed -d "$root" "$work/root.img" "${size_mb}M" >/dev/null
mkdir -p "$OUT"
mv "$work/root.img" "$OUT/root.img"
echo "$key" > "$OUT/key"
echo "built the real-OS medium in $OUT ($size_mb MiB, Debian $(cat "$root/etc/debian_version"), $(ls "$root/boot" | grep -m1 vmlinuz))"
