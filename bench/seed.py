#!/usr/bin/python3
"""Seeds a running provision daemon through its own HTTP API, the way machines and operators
would: enroll (POST /api/v1/machines), boot (GET /ipxe -> install script, machine
`installing`), phone home (POST /phone-home/<token> with an SSH host key -> `installed`).

    seed.py --url http://127.0.0.1:8080 --admin-url http://127.0.0.1:8443 \
            --token-file DATA/admin-token --installed N --enrolled M --pubkey KEY.pub --out DIR [--workers 32]

Writes DIR/macs-installed.txt and DIR/macs-enrolled.txt (one MAC per line, hyphen form, as
iPXE sends ${mac:hexhyp}) and prints one JSON line with counts and timings. A request that
fails on the connection is retried once on a fresh one; a machine that still fails (or gets
an error status) is counted, left out of the MAC files, and the first reasons are printed.
Exits 1 if more than --max-failures machines failed (default 0).

Standard library only (run by /usr/bin/python3).
"""

import argparse
import http.client
import json
import re
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

TOKEN_RE = re.compile(r"/config/([0-9a-f]{64})/")


class Client:
    """One keep-alive HTTP/1.1 connection per worker thread (and per Client)."""

    def __init__(self, url, token, timeout=30.0):
        self.local = threading.local()
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.hostport = f"{self.host}:{self.port}"
        self.token = token
        self.timeout = timeout

    def _conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.local.conn = c
        return c

    def request(self, method, path, body=None, headers=None, auth=False):
        h = dict(headers or {})
        if auth:
            h["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):
            c = self._conn()
            try:
                c.request(method, path, body=body, headers=h)
                r = c.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    c.close()
                    self.local.conn = None
                return r.status, data.decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as e:
                c.close()
                self.local.conn = None
                if attempt == 1:
                    return 0, f"{type(e).__name__}: {e}"
        raise AssertionError("unreachable")


def mac_of(prefix, i):
    """A locally administered MAC: 02:PP:xx:xx:xx:xx with PP the prefix byte and i in the rest."""
    b = [0x02, prefix, (i >> 24) & 0xFF, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF]
    return "-".join(f"{x:02x}" for x in b)


def enroll(cl, mac, profile):
    body = json.dumps({"mac": mac.replace("-", ":"), "profile": profile})
    st, text = cl.request(
        "POST", "/api/v1/machines", body, {"Content-Type": "application/json"}, auth=True
    )
    if st != 201:
        raise RuntimeError(f"enroll {mac}: HTTP {st}: {text[:200]}")


def install(cl, mac, pubkey):
    st, script = cl.request("GET", f"/ipxe?mac={mac}&platform=pcbios")
    if st != 200:
        raise RuntimeError(f"/ipxe {mac}: HTTP {st}: {script[:200]}")
    m = TOKEN_RE.search(script)
    if not m:
        raise RuntimeError(f"/ipxe {mac}: no install token in the answer: {script[:200]!r}")
    st, text = cl.request(
        "POST", f"/phone-home/{m.group(1)}", pubkey, {"Content-Type": "text/plain"}
    )
    if st != 200 or "installed" not in text:
        raise RuntimeError(f"phone-home {mac}: HTTP {st}: {text[:200]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="the machine listener")
    ap.add_argument("--admin-url", required=True,
                    help="the admin listener, plain HTTP on loopback (--admin-tls off)")
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--installed", type=int, default=0)
    ap.add_argument("--enrolled", type=int, default=0)
    ap.add_argument("--installed-prefix", type=lambda s: int(s, 0), default=0x00)
    ap.add_argument("--enrolled-prefix", type=lambda s: int(s, 0), default=0x01)
    ap.add_argument("--profile", default="debian-12")
    ap.add_argument("--pubkey", help="an OpenSSH public key file (phone-home body)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--max-failures", type=int, default=0)
    a = ap.parse_args()

    token = open(a.token_file).read().strip()
    pubkey = open(a.pubkey).read().strip() + "\n" if a.pubkey else ""
    if a.installed and not pubkey:
        sys.exit("seed.py: --installed needs --pubkey")
    cl, admin = Client(a.url, token), Client(a.admin_url, token)
    installed = [mac_of(a.installed_prefix, i) for i in range(a.installed)]
    enrolled = [mac_of(a.enrolled_prefix, i) for i in range(a.enrolled)]

    failures = []
    failed_macs = set()
    lock = threading.Lock()
    done = [0]
    total = len(installed) + len(enrolled)
    started = time.monotonic()
    next_report = [0.1]

    def job(mac, full):
        try:
            enroll(admin, mac, a.profile)
            if full:
                install(cl, mac, pubkey)
        except Exception as e:  # noqa: BLE001 - every failure is reported, none is fatal here
            with lock:
                failures.append(str(e))
                failed_macs.add(mac)
        with lock:
            done[0] += 1
            if total and done[0] / total >= next_report[0]:
                el = time.monotonic() - started
                print(
                    f"  seeded {done[0]}/{total} machines in {el:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                next_report[0] += 0.1

    with ThreadPoolExecutor(a.workers) as ex:
        list(ex.map(lambda m: job(m, True), installed))
        t_installed = time.monotonic() - started
        list(ex.map(lambda m: job(m, False), enrolled))
    elapsed = time.monotonic() - started

    with open(f"{a.out}/macs-installed.txt", "w") as f:
        f.writelines(m + "\n" for m in installed if m not in failed_macs)
    with open(f"{a.out}/macs-enrolled.txt", "w") as f:
        f.writelines(m + "\n" for m in enrolled if m not in failed_macs)
    print(
        json.dumps(
            {
                "installed": len(installed),
                "enrolled": len(enrolled),
                "seconds": round(elapsed, 2),
                "seconds_installed": round(t_installed, 2),
                "failures": len(failures),
                "first_failures": failures[:5],
            }
        ),
        flush=True,
    )
    sys.exit(1 if len(failures) > a.max_failures else 0)


if __name__ == "__main__":
    main()
