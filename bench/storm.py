#!/usr/bin/python3
"""End-to-end boot storm: N simulated BIOS machines boot through provision at once.

Runs in the client network namespace (bench/run.py starts it with `ip netns exec`). Each
machine, as a PXE ROM, then iPXE, then the installer and the installed OS would:

  1. DHCPDISCOVER with PXE options (60 PXEClient:Arch:00000:UNDI:002001, 93 arch 0, 94, 97
     GUID) broadcast from port 68; the ProxyDHCP offer names the boot file and next-server.
     Retransmitted after 4, 8, 16 and 32 s (each +-1 s, RFC 2131) like a PXE ROM; then
     the machine fails. Then the DHCPREQUEST for the address the site's DHCP server (not
     simulated) gave it, which ProxyDHCP does not answer but uses to tie the address to the
     MAC. Each machine has its own address on the client side of the veth.
  2. TFTP RRQ of that file (blksize 1468, tsize; windowsize 1, as PXE ROMs do), every block
     ACKed; the size must match the file the server serves.
  3. DHCPDISCOVER again as iPXE (option 77 "iPXE", option 175): the offer's file is the
     /boot.ipxe URL.
  4. GET /boot.ipxe; take its `chain` URL and fill in ${mac:hexhyp}, ${uuid}, ${buildarch},
     ${platform} as iPXE does; GET it (the install script).
  5. GET every /config/<token>/... URL in the script (the kernel command line carries them),
     then POST the SSH host key to the phone-home URL found in the config.

Replies to broadcast DISCOVERs come to 255.255.255.255:68: one socket bound to 0.0.0.0:68
with SO_BROADCAST (and SO_BINDTODEVICE, as there is no route in the client namespace)
receives them all and hands each to its machine by xid.

Prints one JSON line: completed, failed, wall time, per-machine p50/p99, the first failure
reasons and the count of each failure kind. Standard library only.
"""

import argparse
import asyncio
import collections
import json
import os
import random
import re
import resource
import socket
import statistics
import struct
import sys
import time
import urllib.parse

SO_BINDTODEVICE = 25
SO_RCVBUFFORCE = 33

PXE_CLASS = b"PXEClient:Arch:00000:UNDI:002001"


class Fail(Exception):
    def __init__(self, phase, msg):
        super().__init__(f"{phase}: {msg}")
        self.phase = phase


def opt(code, value):
    return bytes([code, len(value)]) + value


def discover(mac, xid, guid, ipxe, msgtype=1, requested=None, server_id=None):
    hdr = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1, 1, 6, 0, xid, 0, 0x8000,
        bytes(4), bytes(4), bytes(4), bytes(4),
        mac + bytes(10), b"", b"",
    )
    o = b"\x63\x82\x53\x63"
    o += opt(53, bytes([msgtype]))
    if requested:
        o += opt(50, socket.inet_aton(requested))
    if server_id:
        o += opt(54, socket.inet_aton(server_id))
    o += opt(57, struct.pack("!H", 1472))
    o += opt(93, b"\x00\x00")
    o += opt(94, b"\x01\x02\x01")
    o += opt(97, b"\x00" + guid)
    o += opt(60, PXE_CLASS)
    o += opt(55, bytes([1, 3, 6, 12, 15, 17, 43, 60, 66, 67, 119, 128, 129, 130, 131, 132,
                        133, 134, 135, 175, 203]))
    if ipxe:
        o += opt(77, b"iPXE")
        o += opt(175, b"\x13\x01\x01\x11\x01\x01")  # iPXE features: HTTP, PXE extensions
    o += b"\xff"
    pkt = hdr + o
    return pkt + bytes(max(0, 300 - len(pkt)))


def parse_reply(data):
    """(xid, msgtype, siaddr, file) of a BOOTREPLY, or None."""
    if len(data) < 240 or data[0] != 2 or data[236:240] != b"\x63\x82\x53\x63":
        return None
    xid = struct.unpack("!I", data[4:8])[0]
    siaddr = socket.inet_ntoa(data[20:24])
    fname = data[108:236].split(b"\0", 1)[0].decode("ascii", "replace")
    i, mtype, opt67 = 240, None, None
    while i < len(data):
        c = data[i]
        if c == 255:
            break
        if c == 0:
            i += 1
            continue
        if i + 1 >= len(data):
            break
        n = data[i + 1]
        v = data[i + 2:i + 2 + n]
        if c == 53 and n == 1:
            mtype = v[0]
        elif c == 67:
            opt67 = v.split(b"\0", 1)[0].decode("ascii", "replace")
        i += 2 + n
    return xid, mtype, siaddr, fname or opt67 or ""


class Dhcp:
    """One socket on 0.0.0.0:68 for every simulated machine; replies demultiplexed by xid."""

    def __init__(self, iface, server_port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, iface.encode())
        # 500 real machines have 500 NICs; one socket must not be the bottleneck.
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        s.bind(("0.0.0.0", 68))
        s.setblocking(False)
        self.sock = s
        self.server_port = server_port
        self.waiting = {}
        self.retransmits = 0

    def start(self, loop):
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self):
        while True:
            try:
                data, _ = self.sock.recvfrom(4096)
            except BlockingIOError:
                return
            r = parse_reply(data)
            if r is None:
                continue
            fut = self.waiting.get(r[0])
            if fut is not None and not fut.done() and r[1] in (2, 5):  # OFFER / ACK
                fut.set_result(r)

    def request(self, mac, guid, ip, site_server):
        """The DHCPREQUEST a PXE ROM broadcasts to take the site server's address; ProxyDHCP
        does not answer it but learns the client's address from it (TFTP attribution)."""
        pkt = discover(mac, random.getrandbits(32), guid, False, msgtype=3, requested=ip,
                       server_id=site_server)
        self.sock.sendto(pkt, ("255.255.255.255", self.server_port))

    async def exchange(self, mac, guid, ipxe, schedule=(4, 8, 16, 32)):
        loop = asyncio.get_running_loop()
        xid = random.getrandbits(32)
        fut = loop.create_future()
        self.waiting[xid] = fut
        pkt = discover(mac, xid, guid, ipxe)
        try:
            for n, wait in enumerate(schedule):
                if n:
                    self.retransmits += 1
                self.sock.sendto(pkt, ("255.255.255.255", self.server_port))
                try:
                    # RFC 2131 4.1: retransmission delays randomized by +-1 s.
                    return await asyncio.wait_for(asyncio.shield(fut),
                                                  wait + random.uniform(-1, 1))
                except asyncio.TimeoutError:
                    continue
            raise Fail("dhcp-ipxe" if ipxe else "dhcp", f"no offer after {len(schedule)} DISCOVERs ({sum(schedule)} s)")
        finally:
            self.waiting.pop(xid, None)


async def tftp_get(server, name, blksize, local_ip, timeout=2.0, retries=5):
    """Downloads `name`; returns (bytes received, tsize from the OACK or None)."""
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.bind((local_ip, 0))
    try:
        rrq = (b"\x00\x01" + name.encode() + b"\0octet\0blksize\0" + str(blksize).encode()
               + b"\0tsize\x000\0")
        dest, peer = (server, 69), None
        last, expected, total, tsize, bs, tries = rrq, 1, 0, None, 512, 0
        await loop.sock_sendto(s, rrq, dest)
        while True:
            try:
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(s, 65536), timeout)
            except asyncio.TimeoutError:
                tries += 1
                if tries > retries:
                    raise Fail("tftp", f"{name}: no answer after {retries} retransmits "
                                       f"(block {expected}, {total} bytes)") from None
                await loop.sock_sendto(s, last, peer or dest)
                continue
            if peer is None:
                peer = addr
            elif addr != peer:
                continue
            op = struct.unpack("!H", data[:2])[0]
            if op == 6:  # OACK
                f = data[2:].split(b"\0")
                opts = {f[i].decode().lower(): f[i + 1].decode() for i in range(0, len(f) - 1, 2)}
                bs = int(opts.get("blksize", 512))
                tsize = int(opts["tsize"]) if "tsize" in opts else None
                last, tries = b"\x00\x04\x00\x00", 0
                await loop.sock_sendto(s, last, peer)
            elif op == 3:  # DATA
                blk = struct.unpack("!H", data[2:4])[0]
                if blk == expected & 0xFFFF:
                    total += len(data) - 4
                    last, tries = b"\x00\x04" + data[2:4], 0
                    await loop.sock_sendto(s, last, peer)
                    expected += 1
                    if len(data) - 4 < bs:
                        return total, tsize
                else:
                    await loop.sock_sendto(s, last, peer)
            elif op == 5:  # ERROR
                code = struct.unpack("!H", data[2:4])[0]
                msg = data[4:].split(b"\0", 1)[0].decode("utf-8", "replace")
                raise Fail("tftp", f"{name}: TFTP error {code}: {msg}")
    finally:
        s.close()


async def http(method, url, local_ip, body=b"", timeout=30.0):
    """One HTTP/1.1 request on its own connection (Connection: close); (status, body)."""
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname, u.port or 80
    path = u.path + ("?" + u.query if u.query else "")
    r, w = await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(local_ip, 0)), timeout)
    try:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                f"User-Agent: iPXE/1.0.0+ (bench)\r\nConnection: close\r\n")
        if method == "POST":
            head += f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        w.write(head.encode() + b"\r\n" + body)
        await w.drain()
        raw = await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise Fail("http", f"{method} {path}: bad status line {lines[0]!r}") from None
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, data = b"", rest
        while True:
            size_line, _, data = data.partition(b"\r\n")
            n = int(size_line.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out, data = out + data[:n], data[n + 2:]
        rest = out
    return status, rest.decode("utf-8", "replace")


CONFIG_RE = re.compile(r"https?://[^\s'\"]+/config/[0-9a-f]{64}/[^\s'\"]+")
PHONE_RE = re.compile(r"https?://[^\s'\"]+/phone-home/[0-9a-f]{64}")
CHAIN_RE = re.compile(r"chain\s+(?:--\S+\s+)*(\S+)")


async def machine(i, mac, ip, dhcp, a, pubkey, tftp_size, phases):
    hyph = "-".join(f"{b:02x}" for b in mac)
    guid = os.urandom(16)
    uuid = "%s-%s-%s-%s-%s" % tuple(guid.hex()[x:y] for x, y in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))
    t0 = time.monotonic()

    def mark(phase):
        phases[phase].append(time.monotonic() - t0)

    _, _, siaddr, bootfile = await dhcp.exchange(mac, guid, ipxe=False)
    mark("dhcp")
    if not bootfile or siaddr == "0.0.0.0":
        raise Fail("dhcp", f"offer without boot file/next-server: {bootfile!r} {siaddr}")
    # The site's DHCP server (not simulated) handed out `ip`; the ROM broadcasts its REQUEST.
    dhcp.request(mac, guid, ip, a.site_server)
    got, tsize = await tftp_get(siaddr, bootfile, a.blksize, ip)
    if got != tftp_size or (tsize is not None and tsize != tftp_size):
        raise Fail("tftp", f"{bootfile}: got {got} bytes, tsize {tsize}, file has {tftp_size}")
    mark("tftp")
    _, _, _, url = await dhcp.exchange(mac, guid, ipxe=True)
    if not url.startswith("http"):
        raise Fail("dhcp-ipxe", f"iPXE offer without a URL: {url!r}")
    st, text = await http("GET", url, ip, timeout=a.http_timeout)
    if st != 200 or not text.startswith("#!ipxe"):
        raise Fail("boot.ipxe", f"HTTP {st}: {text[:120]!r}")
    m = CHAIN_RE.search(text)
    if not m:
        raise Fail("boot.ipxe", "no chain line")
    nxt = (m.group(1).replace("${mac:hexhyp}", hyph).replace("${uuid}", uuid)
           .replace("${buildarch}", "i386").replace("${platform}", "pcbios"))
    st, script = await http("GET", nxt, ip, timeout=a.http_timeout)
    if st != 200:
        raise Fail("ipxe", f"HTTP {st}: {script[:120]!r}")
    configs = CONFIG_RE.findall(script)
    if not configs:
        raise Fail("ipxe", f"no /config/ URL in the script: {script[:160]!r}")
    mark("ipxe")
    phone = None
    for c in dict.fromkeys(configs):
        st, cfg = await http("GET", c, ip, timeout=a.http_timeout)
        if st != 200 or not cfg:
            raise Fail("config", f"{c.rsplit('/', 1)[-1]}: HTTP {st}: {cfg[:120]!r}")
        phone = phone or (PHONE_RE.search(cfg) or [None])[0]
    mark("config")
    if phone is None:
        raise Fail("config", "no phone-home URL in the configs")
    st, text = await http("POST", phone, ip, pubkey, timeout=a.http_timeout)
    if st != 200 or "installed" not in text:
        raise Fail("phone-home", f"HTTP {st}: {text[:120]!r}")
    mark("done")


async def main_async(a):
    macs = [bytes.fromhex(line.strip().replace("-", "").replace(":", ""))
            for line in open(a.macs) if line.strip()]
    addrs = [line.strip() for line in open(a.addrs) if line.strip()]
    if len(addrs) < len(macs):
        sys.exit(f"storm.py: {len(macs)} MACs but only {len(addrs)} addresses")
    pubkey = (open(a.pubkey).read().strip() + "\n").encode()
    tftp_size = a.tftp_size
    dhcp = Dhcp(a.iface, a.dhcp_port)
    loop = asyncio.get_running_loop()
    dhcp.start(loop)
    phases = collections.defaultdict(list)
    failures = []
    started = time.monotonic()

    async def one(i, mac):
        if a.spread:
            await asyncio.sleep(random.uniform(0, a.spread))
        try:
            await machine(i, mac, addrs[i], dhcp, a, pubkey, tftp_size, phases)
        except Fail as e:
            failures.append((e.phase, str(e)))
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            failures.append(("io", f"{type(e).__name__}: {e}"))

    tasks = [asyncio.create_task(one(i, m)) for i, m in enumerate(macs)]
    done, pending = await asyncio.wait(tasks, timeout=a.timeout)
    for t in pending:
        t.cancel()
    if pending:
        failures += [("timeout", f"storm timeout {a.timeout} s")] * len(pending)
    wall = time.monotonic() - started
    per = sorted(phases["done"])

    def pct(xs, q):
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

    kinds = collections.Counter(p for p, _ in failures)
    print(json.dumps({
        "machines": len(macs),
        "completed": len(per),
        "failed": len(failures),
        "wall_s": round(wall, 3),
        "last_done_s": round(per[-1], 3) if per else None,
        "p50_s": pct(per, 0.5),
        "p99_s": pct(per, 0.99),
        "phase_p50_s": {k: pct(sorted(v), 0.5) for k, v in phases.items()},
        "dhcp_retransmits": dhcp.retransmits,
        "failure_kinds": dict(kinds),
        "first_failures": [m for _, m in failures[:5]],
    }), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--macs", required=True)
    ap.add_argument("--pubkey", required=True)
    ap.add_argument("--iface", required=True)
    ap.add_argument("--addrs", required=True, help="one client address per machine, one a line")
    ap.add_argument("--site-server", default="10.201.0.254",
                    help="server id in the DHCPREQUEST (the site's DHCP server, not simulated)")
    ap.add_argument("--tftp-size", type=int, required=True, help="size of the boot file")
    ap.add_argument("--dhcp-port", type=int, default=67)
    ap.add_argument("--blksize", type=int, default=1468)
    ap.add_argument("--spread", type=float, default=0.0, help="start within this many seconds")
    ap.add_argument("--http-timeout", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=180.0, help="whole storm")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main_async(a))


if __name__ == "__main__":
    sys.exit(main())
