#!/usr/bin/env bash
# Builds the Debian package from a built binary, with plain dpkg-deb: the package is one
# binary and a few files, so debhelper's source-package machinery would add a build
# dependency and a second description of the same layout without doing more.
#
# Usage: contrib/deb/build.sh BINARY OUTDIR
#   BINARY  the provision binary to package (make deb: target/release/provision)
#   OUTDIR  where provision_<version>_<arch>.deb is written; its path is printed
#
# What goes in: /usr/bin/provision (stripped), the unit (/lib/systemd/system), the sample
# configuration as the conffile /etc/provision/provision.toml, the manual pages generated from
# the binary's own command definitions (`provision man`), the sample alerting rules, the
# copyright and changelog; maintainer scripts from contrib/deb/ (postinst creates the system
# user and /var/lib/provision 0700).
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 BINARY OUTDIR" >&2; exit 2; }
bin=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
[ -x "$bin" ] || { echo "$0: $bin is not an executable (build it first: cargo build --release)" >&2; exit 2; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$top/Cargo.toml" | head -n1)
# Who it is from: DEB_MAINTAINER ("Name <address>"), else the author of the commit built.
maintainer=${DEB_MAINTAINER:-$(git -C "$top" log -1 --format='%an <%ae>' 2>/dev/null || true)}
case $maintainer in
*" <"*@*">") ;;
*) echo "$0: set DEB_MAINTAINER=\"Name <address>\" (not a git checkout, so no commit author to use)" >&2; exit 2 ;;
esac
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root/DEBIAN"

install -D -m 0755 "$bin" "$root/usr/bin/provision"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/provision"
install -D -m 0644 "$top/contrib/provision.service" "$root/lib/systemd/system/provision.service"
install -D -m 0644 "$top/contrib/provision.toml" "$root/etc/provision/provision.toml"
install -D -m 0644 "$top/contrib/provision-alerts.yml" \
    "$root/usr/share/provision/provision-alerts.yml"

mkdir -p "$root/usr/share/man/man1"
"$root/usr/bin/provision" man "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1

doc=$root/usr/share/doc/provision
install -D -m 0644 "$here/copyright" "$doc/copyright"
# A native package's changelog: this version, dated by the last commit (reproducible).
date=$(git -C "$top" log -1 --format=%aD 2>/dev/null || date -R)
printf 'provision (%s) unstable; urgency=medium\n\n  * Release %s: see the project'"'"'s commit log.\n\n -- %s  %s\n' \
    "$version" "$version" "$maintainer" "$date" | gzip -9n > "$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

for s in postinst postrm; do
    install -m 0755 "$here/$s" "$root/DEBIAN/$s"
done
echo /etc/provision/provision.toml > "$root/DEBIAN/conffiles"
install -D -m 0644 "$here/lintian-overrides" "$root/usr/share/lintian/overrides/provision"

# The shared libraries the binary links, as package dependencies (dpkg-shlibdeps wants a
# debian/control to read; it only needs one to exist).
mkdir -p "$stage/src/debian"
printf 'Source: provision\n\nPackage: provision\nArchitecture: any\n' > "$stage/src/debian/control"
shlibs=$(cd "$stage/src" && dpkg-shlibdeps -O -e"$root/usr/bin/provision" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "$0: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }

size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: provision
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $shlibs, adduser
Section: admin
Priority: optional
Description: bare-metal provisioning server: ProxyDHCP, TFTP, iPXE, installer configs
 provision takes a machine from power-on to an installed, registered node:
 ProxyDHCP beside the site's DHCP server and TFTP hand PXE firmware an iPXE
 binary, iPXE asks over HTTP what this MAC should boot, the installer fetches
 its preseed, autoinstall, cloud-config or Ignition behind a one-time token,
 and the installed system phones home. One daemon, one binary, one SQLite
 file; a REST API, a CLI and a web UI.
CONTROL

mkdir -p "$out"
deb=$out/provision_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
