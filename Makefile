# provision: `make test` installs the Debian packages the tests need (idempotent), then runs
# every test level. `.ci/run` calls it.

# cloud-init: `cloud-init schema` checks rendered user-data / cloud-config.
# ignition: `ignition-validate` checks rendered Ignition configs.
# debconf: `debconf-set-selections -c` checks rendered preseeds.
# util-linux: setpriv, to test the privileged-port message as an unprivileged user.
# tftp-hpa, atftp: real TFTP clients for the interop tests; ipxe: the binaries TFTP serves.
# qemu-system-x86, ipxe-qemu, ovmf: BIOS and UEFI VMs that PXE-boot in the firmware lab;
# dnsmasq-base: the site's DHCP server there; iproute2: namespaces, bridge, taps.
# cpio: packs the test installer's initramfs (tests/installer/build.sh).
# libvirt-daemon-system, libvirt-daemon-driver-qemu, virtinst: the virt-install --pxe test.
# openssh-server, openvswitch-switch (ovs-pki comes with openvswitch-common): the fake
# hypervisor hosts the registrar registers; openssh-client, ansible-core: `ansible -m ping`
# through provision's inventory; openssl: `openssl verify` of node certs; curl: phone-home
# from inside a host's namespace.
DEBIAN_PACKAGES := cloud-init ignition debconf util-linux tftp-hpa atftp ipxe \
	qemu-system-x86 ipxe-qemu ovmf dnsmasq-base iproute2 cpio \
	libvirt-daemon-system libvirt-daemon-driver-qemu virtinst \
	openssh-server openssh-client openvswitch-switch ansible-core openssl curl

CARGO ?= cargo

.PHONY: test deps lint unit it

test: deps lint unit it

deps:
	@missing=""; \
	for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	else \
	  echo "Debian packages present: $(DEBIAN_PACKAGES)"; \
	fi

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

# Levels 1 and 2: pure tests (policy, store, render snapshots, filters) and in-process router
# tests.
unit:
	$(CARGO) test --locked --lib

# Level 3: the real binary on port 0, driven by its CLI and HTTP, with rendered configs
# checked by cloud-init, ignition-validate and debconf.
it:
	$(CARGO) test --locked --test it
