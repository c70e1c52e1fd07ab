#!/usr/bin/env bash
# Builds the test installer: a Debian kernel and a small initramfs whose /init behaves like an
# installer (see init). Only Debian packages are used, fetched with apt-get download, so the
# build needs no network but the Debian mirror. The result is cached in OUT, keyed by the
# package versions and the hash of this directory's files: a second run is a no-op, so OUT may
# live outside the checkout and serve every run on one machine (`make it` keeps it in
# ~/.cache/provision-tests).
#
# usage: build.sh OUT     → OUT/vmlinuz, OUT/initrd.img
set -euo pipefail
OUT=${1:?usage: build.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)

# One build at a time per OUT: `make it` builds it before the tests, and a test that finds it
# missing (cargo test run by hand) builds it too; a second builder waits, then finds it done.
mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9


# The kernel flavour package depends on the versioned image package; resolve it.
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z "$KPKG" ]]; then
    # No package lists yet (a fresh machine): fetch them once.
    apt-get update -qq
    KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[[ -n "$KPKG" ]] || { echo "build.sh: no linux-image-amd64 in the Debian package lists" >&2; exit 1; }
versions=$(for p in "$KPKG" busybox-static dropbear-bin libtomcrypt1 libtommath1 jq libjq1 libonig5 nasm grub-efi-amd64-bin mtools; do apt-cache policy "$p" | awk -v p="$p" '/Candidate/ {print p"="$2}'; done)
key=$( (echo "$versions"; cat "$HERE/build.sh" "$HERE/init" "$HERE"/disk/*) | sha256sum | cut -c1-16)
if [[ -f "$OUT/key" && "$(cat "$OUT/key")" == "$key" && -f "$OUT/vmlinuz" && -f "$OUT/initrd.img" ]]; then
    echo "test installer up to date in $OUT"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT" "$work/debs" "$work/x" "$work/root"
(cd "$work/debs" && apt-get download -q "$KPKG" busybox-static dropbear-bin libtomcrypt1 libtommath1 jq libjq1 libonig5 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
for d in "$work"/debs/*.deb; do dpkg-deb -x "$d" "$work/x"; done

kver=$(ls "$work/x/lib/modules")
r="$work/root"
mkdir -p "$r"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,lib/modules,etc/dropbear,usr/share/udhcpc}
cp "$work/x/bin/busybox" "$r/bin/busybox"
for applet in $("$r/bin/busybox" --list); do
    [[ -e "$r/bin/$applet" ]] || ln -s busybox "$r/bin/$applet"
done
# Virtio drivers (Debian builds them as modules; init loads them in dependency passes), and
# ext4 with what it needs (crc32c for its metadata checksums): the power-cut test
# (tests/it/powercut.rs) boots this kernel and these modules with its own /init and keeps the
# daemon's data directory on an ext4 virtio disk. FAT (with the code page and character set
# Debian's kernel mounts it with by default): the real-OS install mounts the EFI system
# partition it makes, for grub-install. SATA (AHCI, and the SCSI disk driver): the real-OS
# VMs' disks are SATA (provision::lab::VmSpec::sata says why).
mods=(kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
      kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko
      kernel/drivers/virtio/virtio_pci.ko kernel/net/core/failover.ko
      kernel/drivers/net/net_failover.ko kernel/drivers/net/virtio_net.ko
      kernel/drivers/block/virtio_blk.ko
      kernel/crypto/crc32c_generic.ko kernel/lib/crc16.ko kernel/fs/mbcache.ko
      kernel/fs/jbd2/jbd2.ko kernel/fs/ext4/ext4.ko
      kernel/fs/fat/fat.ko kernel/fs/fat/vfat.ko kernel/fs/nls/nls_cp437.ko kernel/fs/nls/nls_ascii.ko
      kernel/drivers/scsi/scsi_common.ko kernel/drivers/scsi/scsi_mod.ko kernel/lib/crc-t10dif.ko
      kernel/crypto/crct10dif_common.ko kernel/lib/crc64.ko kernel/crypto/crc64_rocksoft_generic.ko
      kernel/lib/crc64-rocksoft.ko kernel/block/t10-pi.ko
      kernel/drivers/scsi/sd_mod.ko kernel/drivers/ata/libata.ko kernel/drivers/ata/libahci.ko
      kernel/drivers/ata/ahci.ko)
: > "$r/lib/modules/load-order"
for m in "${mods[@]}"; do
    cp "$work/x/lib/modules/$kver/$m" "$r/lib/modules/"
    basename "$m" >> "$r/lib/modules/load-order"
done

# Dynamic binaries with the libraries they need: libraries from the downloaded packages
# first (LD_LIBRARY_PATH), then the host's (the host is the same Debian release).
copy_with_libs() {
    local bin=$1 dest=$2
    cp "$bin" "$r/$dest"
    LD_LIBRARY_PATH="$work/x/usr/lib/x86_64-linux-gnu:$work/x/lib/x86_64-linux-gnu" ldd "$bin" |
        awk '/not found/ {print "MISSING " $1} /=>/ && !/not found/ {print $3}' | while read -r lib rest; do
        if [[ "$lib" == MISSING ]]; then
            echo "build.sh: $bin needs $rest, which no downloaded package provides" >&2
            exit 1
        fi
        local target=${lib#"$work/x"}
        mkdir -p "$r$(dirname "$target")"
        cp -L "$lib" "$r$target"
    done
}
copy_with_libs "$work/x/usr/sbin/dropbear" sbin/dropbear
copy_with_libs "$work/x/usr/bin/dropbearkey" bin/dropbearkey
copy_with_libs "$work/x/usr/bin/jq" bin/jq
mkdir -p "$r/lib64"
cp -L /lib64/ld-linux-x86-64.so.2 "$r/lib64/"

# The disk the installer writes (/disk.img, 3 MiB): an MBR whose boot code prints a marker
# (disk/boot-sector.asm, for SeaBIOS) and one EFI system partition (type 0xef, 2 MiB at 1 MiB,
# FAT made with mtools: no loop device or mount needed) holding a GRUB that prints the same kind
# of marker (disk/grub.cfg, for OVMF). The lab test asserts the marker after the local boot.
nasm -f bin -o "$work/boot-sector.bin" "$HERE/disk/boot-sector.asm"
# GRUB's image with the config built in as its early config (grub-mkimage -c, which has no
# timestamps, unlike grub-mkstandalone's memdisk): that parser knows no comments, so they go.
grep -v '^#' "$HERE/disk/grub.cfg" > "$work/early.cfg"
grub-mkimage -O x86_64-efi -p /EFI/BOOT -c "$work/early.cfg" -o "$work/BOOTX64.EFI" echo sleep halt
touch -d @0 "$work/BOOTX64.EFI"
truncate -s 3M "$r/disk.img"
printf 'label: dos\nlabel-id: 0x50524f56\nstart=2048, size=4096, type=ef\n' | sfdisk -q "$r/disk.img"
dd if="$work/boot-sector.bin" of="$r/disk.img" conv=notrunc status=none
esp="$r/disk.img@@1M"
export SOURCE_DATE_EPOCH=0   # mtools' directory entries: same inputs, same bytes
mformat -i "$esp" -T 4096 -h 1 -s 32 -N 50524f56 -v PVTEST ::
mmd -i "$esp" ::/EFI ::/EFI/BOOT
mcopy -m -i "$esp" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI

cp "$HERE/init" "$r/init"
chmod +x "$r/init"
echo 'root:x:0:0:root:/root:/bin/sh' > "$r/etc/passwd"
echo 'root::0:0:99999:7:::' > "$r/etc/shadow"

cp "$work/x/boot/vmlinuz-$kver" "$OUT/vmlinuz.new"
# Same inputs, same bytes: fixed mtimes, sorted names, no cpio inode numbers, no gzip name/time.
find "$r" -exec touch -h -d @0 {} +
(cd "$r" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible | gzip -9n) > "$OUT/initrd.img.new"
mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
mv "$OUT/initrd.img.new" "$OUT/initrd.img"
echo "$key" > "$OUT/key"
echo "built the test installer in $OUT ($(du -h "$OUT/initrd.img" | cut -f1) initrd, kernel $kver)"
