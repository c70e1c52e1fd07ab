#!/usr/bin/env bash
# Prints the QEMU accelerator the VM tests should use: "kvm" when /dev/kvm really runs a Linux
# guest here, else "tcg". The probe boots the test installer's kernel and initramfs (built by
# build.sh in DIR) under KVM with no config on its command line: its /init says so on the
# serial console and powers off, a few seconds' work with KVM. A usable-looking /dev/kvm is not
# enough: under nested virtualisation without the CPU features a kernel needs, KVM runs a boot
# sector but hangs a Linux kernel early (seen on this project's CI machines: no output after
# "Probing EDD"), so only the installer's own words count. `make it` runs this while the tests
# compile, so its 20 s timeout (a working KVM needs a few seconds) hides behind the compile.
#
# usage: accel.sh DIR
set -uo pipefail
DIR=${1:?usage: accel.sh INSTALLER_DIR}
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo tcg
    exit 0
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
timeout 20 qemu-system-x86_64 -accel kvm -m 256 -display none -nodefaults -no-reboot \
    -serial "file:$log" -kernel "$DIR/vmlinuz" -initrd "$DIR/initrd.img" \
    -append "console=ttyS0 panic=-1" >/dev/null 2>&1
if grep -q "provision-test-installer: FAILED: no config source" "$log"; then
    echo kvm
else
    echo tcg
fi
