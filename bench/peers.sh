#!/usr/bin/env bash
# Installs what `make bench` runs against: the peers (dnsmasq, atftpd, tftpd-hpa, nginx), the
# load generators and clients (perfdhcp from kea-admin, wrk, atftp, tftp-hpa, curl), ipxe (the
# undionly.kpxe the end-to-end storm serves), iproute2, python3, GNU time (the peak memory
# of a CLI command) and postgresql (the `pg` section starts a cluster of its own from its
# binaries; the packaged service is not used). Missing Debian packages are
# installed by tests/deps.sh (the same script as `make deps`: apt only when something is
# missing, loud failures).
#
# tftpd-hpa declares Conflicts: atftpd, so apt cannot install both. atftpd is installed; the
# tftpd-hpa package is fetched with `apt-get download` and unpacked (not installed) into
# target/bench-peers/tftpd-hpa, where bench/run.py finds in.tftpd. Nothing of it is
# configured or started as a service. Its one library, libwrap0, is installed normally.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(dnsmasq-base atftpd nginx-light kea-admin wrk hyperfine atftp tftp-hpa iproute2
    python3 curl ipxe openssh-client libwrap0 util-linux time postgresql)
bash tests/deps.sh "${packages[@]}" >/tmp/provision-bench-deps.$$ 2>&1 || {
    cat /tmp/provision-bench-deps.$$ >&2
    rm -f /tmp/provision-bench-deps.$$
    exit 1
}
grep -E '^(installing|installed|Debian packages present)' /tmp/provision-bench-deps.$$ || true
installed_now=no
grep -q '^installing Debian packages' /tmp/provision-bench-deps.$$ && installed_now=yes
rm -f /tmp/provision-bench-deps.$$

# Package scripts may start the services they ship (nginx, atftpd) when there is an init
# system that lets them. The bench runs its own instances in private network namespaces, so
# host listeners cannot interfere with it; still, a service the install above just started is
# stopped again, by its own PID (nginx: its PID file; atftpd: the Debian default instance,
# which writes none, by the PID listening on UDP 69 with the packaged /srv/tftp root).
# Anything else is only reported: it is not ours to stop.
stop_pid() { # PID COMM WHY
    [ -n "$1" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 0
    echo "stopping $2 (pid $1), $3"
    kill "$1" || true
}
if [ $installed_now = yes ]; then
    [ -f /run/nginx.pid ] && stop_pid "$(cat /run/nginx.pid)" nginx "started by the nginx package (/run/nginx.pid)"
    for pid in $(ss -Hlunp 'sport = :69' 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q '/srv/tftp'; then
            stop_pid "$pid" atftpd "started by the atftpd package (serving /srv/tftp)"
        fi
    done
fi
listeners=$( { ss -Hlnup '( sport = :67 or sport = :69 or sport = :4011 )'
    ss -Hlntp '( sport = :80 )'; } 2>/dev/null || true)
if [ -n "$listeners" ]; then
    echo "note: listeners in the host network namespace (the bench uses its own namespaces, so they do not interfere):"
    echo "$listeners" | sed 's/^/  /'
fi

dest=target/bench-peers/tftpd-hpa
if [ ! -x "$dest/usr/sbin/in.tftpd" ]; then
    tmp=$(mktemp -d /tmp/provision-bench-tftpd-hpa.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT
    echo "fetching tftpd-hpa (unpacked into $dest; it conflicts with atftpd as a package)"
    (cd "$tmp" && apt-get download tftpd-hpa >"$tmp/log" 2>&1) || {
        apt-get update -q >/dev/null 2>&1 || true
        (cd "$tmp" && apt-get download tftpd-hpa >"$tmp/log" 2>&1) || {
            echo "bench/peers.sh: apt-get download tftpd-hpa failed:" >&2
            cat "$tmp/log" >&2
            exit 1
        }
    }
    mkdir -p "$dest"
    dpkg-deb -x "$tmp"/tftpd-hpa_*.deb "$dest"
fi
"$dest/usr/sbin/in.tftpd" -V 2>&1 | head -n 1
