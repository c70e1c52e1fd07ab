# provision: `make test` installs the Debian packages the tests need (idempotent), then runs
# every test level. `.ci/run` calls it.

# cloud-init: `cloud-init schema` checks rendered user-data / cloud-config.
# ignition: `ignition-validate` checks rendered Ignition configs.
# debconf: `debconf-set-selections -c` checks rendered preseeds.
# util-linux: setpriv, to test the privileged-port message as an unprivileged user.
# tftp-hpa, atftp: real TFTP clients for the interop tests; ipxe: the binaries TFTP serves.
# qemu-system-x86 (with qemu-utils at its exact version, see deps), ipxe-qemu, ovmf: BIOS and
# UEFI VMs that PXE-boot in the firmware lab;
# dnsmasq-base: the site's DHCP server there; iproute2: namespaces, bridge, taps.
# cpio: packs the test installer's initramfs (tests/installer/build.sh); e2fsprogs: the ext4
# disk of the power-cut rounds' VM.
# libvirt-daemon-system, libvirt-daemon-driver-qemu, virtinst: the virt-install --pxe test.
# openssh-server, openvswitch-switch (ovs-pki comes with openvswitch-common): the fake
# hypervisor hosts the registrar registers; openssh-client, ansible-core: `ansible -m ping`
# through provision's inventory; openssl: `openssl verify` of node certs; curl: phone-home
# from inside a host's namespace; chromium, chromium-driver: the web UI's browser tests
# (tests/it/ui.rs, headless over WebDriver); systemd: systemd-analyze for the unit's checks;
# prometheus: promtool, which checks the /metrics output and the sample alerting rules;
# dpkg-dev (dpkg-shlibdeps), binutils (strip): `make deb`; lintian, debootstrap: the package
# is linted and installed into a Debian 12 chroot (tests/it/deb.rs); kea-dhcp4-server: the
# site-DHCP recipe for Kea (docs/site-dhcp.md) boots a VM in the firmware lab; man-db: the
# unit's Documentation= pages are looked up by systemd-analyze verify; dhcpcd-base: a real DHCP
# client that sends address mode the RELEASE, DECLINE and INFORM firmware never does; git: the
# inventory-in-git example of docs/fleet.md; nasm, grub-efi-amd64-bin (grub-mkimage), mtools,
# fdisk (sfdisk): the bootable disk the test installer writes, whose boot code prints a marker
# when a VM's local boot really runs it; python3-jsonschema, python3-yaml: rendered autoinstall
# user-data checked against tests/schemas/autoinstall.json; postgresql: the store's tests run on
# PostgreSQL too, on a cluster each test process starts unprivileged in a temporary directory
# (tests/common/pg_cluster.rs), as do the tests of several daemons sharing one inventory.
DEBIAN_PACKAGES := cloud-init ignition debconf util-linux tftp-hpa atftp ipxe \
	qemu-system-x86 ipxe-qemu ovmf dnsmasq-base iproute2 cpio e2fsprogs \
	libvirt-daemon-system libvirt-daemon-driver-qemu virtinst \
	openssh-server openssh-client openvswitch-switch ansible-core openssl curl \
	chromium chromium-driver systemd prometheus dpkg-dev binutils lintian debootstrap \
	kea-dhcp4-server man-db git dhcpcd-base nasm grub-efi-amd64-bin mtools fdisk \
	python3-jsonschema python3-yaml postgresql

CARGO ?= cargo

.PHONY: test deps lint unit it bench fuzz deb

# The VM tests' artifacts (below) are started in the background first, while lint and unit
# compile: on a machine where they are not cached yet, the real-OS medium alone takes about six
# minutes, mostly downloads and unpacking. `it` runs the same scripts again; each takes its
# output's lock, so they wait for the background build and then find it up to date (or, if it
# failed, build again and report why).
test: deps
	@mkdir -p $(TEST_CACHE); \
	for b in "tests/installer/build.sh $(TEST_INSTALLER_DIR)" "tests/realos/build.sh $(REALOS_DIR)" \
	         "tests/d-i/templates.sh $(TEST_DI_TEMPLATES_DIR)"; do \
	    nohup bash $$b > $(TEST_CACHE)/$$(basename $${b##* }).early.log 2>&1 & \
	done
	@$(MAKE) --no-print-directory lint unit it

# tests/deps.sh installs what is missing (apt-get update + install only then, so a machine
# where the tests already ran is done in about a second), fails with the package names and
# apt's own output when apt cannot install, and prints the versions of the real clients the
# tests use. QEMU: the machine image may ship qemu-utils from bookworm-backports (10.x), whose
# `Breaks: qemu-system-common (<< 8.0)` stops bookworm's qemu-system-x86 (7.2) from installing.
# We deliberately install qemu-utils at the exact version of qemu-system-x86 (downgrading the
# image's copy with --allow-downgrades): bookworm's QEMU 7.2 is what the firmware lab is tested
# with, it comes from the apt sources the machine already has, and the pair stays one build
# whatever the image ships next. The script then checks that `qemu-system-x86_64 --version`
# and `qemu-img --version` agree.
deps:
	@bash tests/deps.sh $(DEBIAN_PACKAGES)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

# Levels 1 and 2: pure tests (policy, store, render snapshots, filters), in-process router
# tests, and every fuzz target over its corpus in fuzz/corpus (fuzz::tests, seconds).
unit:
	$(CARGO) test --locked --lib

# Level 3: the real binary on port 0, driven by its CLI and HTTP, with rendered configs
# checked by cloud-init, ignition-validate and debconf. The VM tests (the firmware lab,
# lab::, and the power cuts, powercut::) take one lock and run one VM set at a time: in one
# test process they would hold both test threads while the second waits for the lock, and
# every other test would wait behind them. So they run in a process of their own, beside one
# running the rest a test at a time (QEMU without KVM needs the other CPU). Both must pass.
#
# The test installer (tests/installer/build.sh), the real-OS medium it installs on a real-OS
# profile (tests/realos/build.sh: a Debian 12 made by debootstrap) and the d-i templates the
# preseed is checked against (tests/d-i/templates.sh) are built while the tests compile (`make
# test` starts them earlier still, and here they wait for that), into TEST_CACHE outside the
# checkout, so runs on one machine share them; each is keyed by its
# inputs, so a cached copy is always of the same inputs. tests/installer/accel.sh then says
# whether KVM really runs a guest here (LAB_ACCEL=kvm for the VM tests) or TCG it is.
TEST_CACHE ?= $(HOME)/.cache/provision-tests
export TEST_INSTALLER_DIR := $(TEST_CACHE)/test-installer
export TEST_DI_TEMPLATES_DIR := $(TEST_CACHE)/d-i-templates
export REALOS_DIR := $(TEST_CACHE)/realos
it:
	@{ bash tests/installer/build.sh $(TEST_INSTALLER_DIR) && \
	   bash tests/installer/accel.sh $(TEST_INSTALLER_DIR) > $(TEST_CACHE)/accel; } & installer=$$!; \
	bash tests/d-i/templates.sh $(TEST_DI_TEMPLATES_DIR) & templates=$$!; \
	bash tests/realos/build.sh $(REALOS_DIR) & realos=$$!; \
	$(CARGO) test --locked --test it --no-run; built=$$?; \
	wait $$installer || { echo "building the test installer failed"; exit 1; }; \
	wait $$templates || { echo "fetching the d-i templates failed"; exit 1; }; \
	wait $$realos || { echo "building the real-OS medium failed"; exit 1; }; \
	[ $$built -eq 0 ]
	@export LAB_ACCEL=$$(cat $(TEST_CACHE)/accel); echo "VM tests accelerated by $$LAB_ACCEL"; \
	$(CARGO) test --locked --test it -- lab:: powercut:: & vm=$$!; \
	$(CARGO) test --locked --test it -- --skip lab:: --skip powercut:: --test-threads 1; rest=$$?; \
	wait $$vm; vms=$$?; \
	echo "integration tests: VM tests exit $$vms, the others exit $$rest"; \
	[ $$vms -eq 0 ] && [ $$rest -eq 0 ]

# The Debian package: target/deb/provision_<version>_amd64.deb (contrib/deb/build.sh says
# what is in it). Install with `apt install ./target/deb/provision_*.deb`.
deb:
	$(CARGO) build --release --locked
	bash contrib/deb/build.sh target/release/provision target/deb

# Benchmarks (not part of `make test`): installs the peers (bench/peers.sh), builds the release
# binary, runs bench/run.py and appends its table to bench/RESULTS.md. Needs root and 2 CPUs.
# BENCH_QUICK=1: short runs; BENCH_ONLY=dhcp,ipxe,tftp,storm,e2e,fleet,rss: a subset;
# PROVISION_BIN=path: benchmark that binary instead of target/release/provision;
# BENCH_NOTE='text': a note recorded with the results (e.g. what else the machine was doing).
# bench/run.py reads PROVISION_BIN and BENCH_NOTE from the environment (make exports them).
bench:
	@bash bench/peers.sh
	$(if $(PROVISION_BIN),,$(CARGO) build --release --locked)
	/usr/bin/python3 bench/run.py $(if $(BENCH_QUICK),--quick) $(if $(BENCH_ONLY),--only $(BENCH_ONLY))

# Fuzzing (not part of `make test`; its unit level runs every target over its seed corpus).
# cargo fuzz (installed from crates.io if missing) builds each target in fuzz/fuzz_targets with
# libFuzzer's coverage instrumentation on the stable toolchain: --sanitizer none, because
# AddressSanitizer needs nightly and the code under test is safe Rust, where a bug shows as a
# panic. Each runs FUZZ_SECONDS (default 300) from its seeds in fuzz/corpus/<target> (written
# by fuzz/make_corpus.py); new inputs go to fuzz/corpus-found/<target>, a crash to
# fuzz/artifacts/<target>/ and stops the run. The first build takes about 10 minutes.
FUZZ_SECONDS ?= 300
FUZZ_TARGETS := dhcp tftp api inventory
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus-found/$$t && \
		$(CARGO) fuzz run $$t --sanitizer none -O corpus-found/$$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done
