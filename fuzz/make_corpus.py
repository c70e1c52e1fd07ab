#!/usr/bin/python3
"""Writes the seed corpora in fuzz/corpus/<target>/: the golden firmware packets, the shapes of
past CVEs in dnsmasq, atftpd and tftpd-hpa, and API bodies that test every escaping context.
Deterministic: run it again and git shows no change. Standard library only.

    python3 fuzz/make_corpus.py
"""

import json
import os
import shutil
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "corpus"


def put(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


# --- DHCP ---------------------------------------------------------------------------------

def dhcp_packet(options, op=1, htype=1, hlen=6, xid=0x12345678, file=b"", sname=b"", cookie=True):
    """A BOOTP header (RFC 951) with `options` (bytes) after the magic cookie."""
    chaddr = bytes.fromhex("525400123456").ljust(16, b"\0")
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, htype, hlen, 0, xid, 0, 0x8000,
                       b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4, chaddr,
                       sname.ljust(64, b"\0")[:64], file.ljust(128, b"\0")[:128])
    return head + (b"\x63\x82\x53\x63" if cookie else b"") + options


def opt(code, payload):
    return bytes([code, len(payload)]) + payload


PXE = (opt(53, b"\x01") + opt(60, b"PXEClient:Arch:00000:UNDI:002001") + opt(93, b"\0\0")
       + opt(94, b"\x01\x02\x01") + opt(97, b"\0" + bytes(range(16))))


def dhcp_seeds():
    for f in sorted((ROOT / "tests/data/dhcp").glob("*.bin")):
        put("dhcp", "golden-" + f.stem, f.read_bytes())
    put("dhcp", "pxe-discover", dhcp_packet(PXE + b"\xff"))
    # Truncated: shorter than the fixed header, and a header with a cut option.
    put("dhcp", "short-header", dhcp_packet(PXE + b"\xff")[:200])
    put("dhcp", "cut-option", dhcp_packet(PXE + b"\x3c\xff" + b"PXE"))
    # An option whose length runs past the end (the class of dnsmasq's option parsing CVEs,
    # e.g. CVE-2017-14491/14492/14493 in its DNS and DHCPv6 parsers).
    put("dhcp", "option-past-end", dhcp_packet(opt(53, b"\x01") + b"\x3c\xfe" + b"PXEClient"))
    # hlen larger than chaddr (16): a copy sized by hlen overflows.
    put("dhcp", "hlen-255", dhcp_packet(PXE + b"\xff", hlen=255))
    put("dhcp", "htype-ieee802", dhcp_packet(PXE + b"\xff", htype=6))
    # Option overload (52) pointing options into file and sname, which themselves run over.
    put("dhcp", "overload-3", dhcp_packet(opt(52, b"\x03") + PXE + b"\xff",
                                          file=b"\x3c\xff" + b"A" * 126, sname=b"\x35\x01\x01\x3c"))
    # Relay agent information (82) with sub-options whose lengths lie.
    put("dhcp", "option82-lies", dhcp_packet(PXE + opt(82, b"\x01\xff\x02\x00\x05") + b"\xff"))
    # Fixed-size options of the wrong size; duplicates; no end option; pad flood.
    put("dhcp", "msgtype-empty", dhcp_packet(opt(53, b"") + PXE[3:] + b"\xff"))
    put("dhcp", "arch-odd", dhcp_packet(opt(53, b"\x01") + opt(60, b"PXEClient") + opt(93, b"\x07") + b"\xff"))
    put("dhcp", "guid-empty", dhcp_packet(opt(53, b"\x01") + opt(60, b"PXEClient") + opt(97, b"") + b"\xff"))
    put("dhcp", "guid-long", dhcp_packet(opt(53, b"\x01") + opt(60, b"PXEClient") + opt(97, b"\0" * 255) + b"\xff"))
    put("dhcp", "duplicate-msgtype", dhcp_packet(opt(53, b"\x03") + PXE + b"\xff"))
    put("dhcp", "no-end", dhcp_packet(PXE))
    put("dhcp", "pad-flood", dhcp_packet(b"\0" * 1200 + PXE + b"\xff"))
    put("dhcp", "no-cookie", dhcp_packet(PXE + b"\xff", cookie=False))
    put("dhcp", "bootreply", dhcp_packet(PXE + b"\xff", op=2))
    # Vendor class of 255 bytes, and option 43 (PXE) with nested sub-options that overflow.
    put("dhcp", "class-255", dhcp_packet(opt(53, b"\x01") + opt(60, b"PXEClient" + b"X" * 246) + b"\xff"))
    put("dhcp", "opt43-nested", dhcp_packet(PXE + opt(43, b"\x06\x01\x08\x47\xff\x00\x00") + b"\xff"))
    # HTTP Boot client (arch 16) and iPXE's user class (77) "iPXE" with odd framing.
    put("dhcp", "httpclient", dhcp_packet(opt(53, b"\x01") + opt(60, b"HTTPClient:Arch:00016:UNDI:003001") + opt(93, b"\x00\x10") + b"\xff"))
    put("dhcp", "ipxe-userclass", dhcp_packet(PXE + opt(77, b"iPXE") + opt(175, b"\xb1\x05\x01\x80\x86\x10\x0e") + b"\xff"))
    put("dhcp", "request-4011", dhcp_packet(opt(53, b"\x03") + PXE[3:] + opt(54, b"\x0a\x00\x00\x01") + b"\xff"))
    put("dhcp", "inform", dhcp_packet(opt(53, b"\x08") + PXE[3:] + b"\xff"))


# --- TFTP ---------------------------------------------------------------------------------

def rrq(name, mode=b"octet", opts=(), op=1):
    b = struct.pack("!H", op) + name + b"\0" + mode + b"\0"
    for k, v in opts:
        b += k + b"\0" + v + b"\0"
    return b


def tftp_seeds():
    put("tftp", "rrq-plain", rrq(b"undionly.kpxe"))
    put("tftp", "rrq-options", rrq(b"undionly.kpxe", opts=[(b"blksize", b"1468"), (b"tsize", b"0"), (b"windowsize", b"8"), (b"timeout", b"1")]))
    put("tftp", "rrq-uefi-probe", rrq(b"arm64/ipxe.efi", opts=[(b"tsize", b"0"), (b"blksize", b"1468")]))
    put("tftp", "netascii", rrq(b"undionly.kpxe", mode=b"netascii"))
    put("tftp", "mode-upper", rrq(b"undionly.kpxe", mode=b"OCTET"))
    put("tftp", "mode-mail", rrq(b"undionly.kpxe", mode=b"mail"))
    put("tftp", "wrq", rrq(b"undionly.kpxe", op=2))
    for op in (3, 4, 5, 6, 7, 0, 0xffff):
        put("tftp", f"opcode-{op}", struct.pack("!H", op) + b"\0\x01garbage\0")
    put("tftp", "two-bytes", b"\0\x01")
    put("tftp", "no-mode", struct.pack("!H", 1) + b"undionly.kpxe\0")
    put("tftp", "no-nul", struct.pack("!H", 1) + b"undionly.kpxe")
    # atftpd CVE-2021-41054 / CVE-2021-46671: options not NUL-terminated, read past the packet.
    put("tftp", "option-no-value", rrq(b"undionly.kpxe") + b"blksize\0")
    put("tftp", "option-unterminated", rrq(b"undionly.kpxe") + b"blksize\0" + b"1468")
    # atftpd CVE-2019-11365: many and long options; tftpd-hpa CVE-2011-2199: utimeout overflow.
    put("tftp", "options-many", rrq(b"undionly.kpxe", opts=[(b"blksize", b"65464")] * 60))
    put("tftp", "option-name-long", rrq(b"undionly.kpxe", opts=[(b"x" * 480, b"1")]))
    put("tftp", "utimeout", rrq(b"undionly.kpxe", opts=[(b"utimeout", b"99999999999999999999")]))
    for k, v in [(b"blksize", b"0"), (b"blksize", b"7"), (b"blksize", b"65465"), (b"blksize", b"-1"),
                 (b"blksize", b"99999999999999999999999"), (b"timeout", b"0"), (b"timeout", b"255"),
                 (b"timeout", b"256"), (b"tsize", b"-1"), (b"tsize", b"18446744073709551616"),
                 (b"windowsize", b"0"), (b"windowsize", b"65536"), (b"BLKSIZE", b"512")]:
        put("tftp", f"opt-{k.decode().lower()}-{v.decode()[:12]}-{k.decode()}", rrq(b"undionly.kpxe", opts=[(k, v)]))
    # Names that try to leave the root.
    for i, n in enumerate([b"../../etc/passwd", b"/etc/passwd", b"..\\..\\secret", b"link",
                           b"arm64/../../secret", b"arm64/../undionly.kpxe", b"%2e%2e/secret",
                           b"./undionly.kpxe", b"arm64//ipxe.efi", b"\xff\xfe", b"a" * 600,
                           b"", b"arm64", b"undionly.kpxe/"]):
        put("tftp", f"name-{i:02}", rrq(n))


# --- API bodies ---------------------------------------------------------------------------

HOSTILE = [
    "{{ 7*7 }}", "{% raw %}", "$(reboot)", "`id`", "'; rm -rf / #", "a\nb: c", "\"quoted\"",
    "</script><script>alert(1)</script>", "\u0000", "\u202e", "ünï©ødé", "- item", "key: value",
    "#!ipxe\nshell", "${mac}", "%00", "\\", "a" * 5000,
]


def api_seeds():
    profiles = sorted(p.stem for p in (ROOT / "templates/profiles").glob("*.toml"))
    for p in profiles:
        put("api", f"enroll-{p}", json.dumps({"mac": "52:54:00:12:34:56", "profile": p,
                                              "hostname": "node1", "vars": {"ip": "10.0.0.5"},
                                              "labels": {"rack": "r1"}}))
    for i, v in enumerate(HOSTILE):
        p = profiles[i % len(profiles)]
        put("api", f"hostile-var-{i:02}", json.dumps({"mac": "52-54-00-12-34-56", "profile": p,
                                                      "vars": {"note": v, "x": v}}))
        put("api", f"hostile-host-{i:02}", json.dumps({"mac": "525400123456", "profile": p, "hostname": v,
                                                       "serial": v, "uuid": v, "labels": {v[:60] or "l": v}}))
    put("api", "bad-ip", json.dumps({"mac": "52:54:00:12:34:56", "profile": profiles[0], "vars": {"ip": "999.1.1.1"}}))
    put("api", "unknown-field", json.dumps({"mac": "52:54:00:12:34:56", "profile": profiles[0], "root": True}))
    put("api", "bad-var-name", json.dumps({"mac": "52:54:00:12:34:56", "profile": profiles[0], "vars": {"a b": "1", "": "2"}}))
    put("api", "deep", "[" * 5000 + "]" * 5000)
    put("api", "huge-number", '{"mac": 1e999999, "profile": 18446744073709551616}')
    put("api", "surrogate", '{"mac": "52:54:00:12:34:56", "profile": "\\ud800"}')
    put("api", "update", json.dumps({"profile": profiles[-1], "hostname": None, "vars": {"a": "b"}}))
    put("api", "not-json", "mac=52:54:00:12:34:56&profile=debian-12")


def inventory_seeds():
    fleet = (HERE.parent / "docs" / "fleet.md").read_text()
    example = fleet.split("<!-- example: inventory.yaml -->", 1)[1].split("```yaml\n", 1)[1]
    put("inventory", "fleet-example-yaml", example.split("```", 1)[0])
    put("inventory", "toml", '[[groups]]\nname = "rack3"\nselector = { rack = 3 }\n'
        'profile = "debian-12"\n\n[[machines]]\nmac = "52:54:00:00:00:01"\n[machines.vars]\n'
        'vlan = 100\nflag = true\nratio = 1.5\n')
    put("inventory", "csv", 'mac,hostname,vars.ip,labels.rack\n52:54:00:00:00:01,a,10.0.0.5,3\n'
        '"52:54:00:00:00:02",,,"r,4"\n,,,\n')
    put("inventory", "csv-ragged", "mac,hostname\n52:54:00:00:00:01\n52:54:00:00:00:02,b,c\n")
    put("inventory", "yaml-aliases", "a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b]\nmachines: [*c]\n")
    put("inventory", "deep", "[" * 5000 + "]" * 5000)
    put("inventory", "deep-toml", "a = " + "[" * 5000 + "]" * 5000)
    put("inventory", "yaml-strings", "machines:\n  - mac: ~\n    hostname: 'null'\n"
        "    vars: {a: '', b: 'true', c: '0x10', d: '1e999', e: \"\\u0000\", f: 'line\\nbreak'}\n")
    put("inventory", "numbers", "groups:\n  - name: 1\n    vars: {big: 18446744073709551616, f: 1e999, n: -0}\n")
    put("inventory", "not-utf8", b"machines:\n  - mac: \xff\xfe\n")


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    dhcp_seeds()
    tftp_seeds()
    api_seeds()
    inventory_seeds()
    for t in sorted(os.listdir(OUT)):
        print(t, len(os.listdir(OUT / t)))


if __name__ == "__main__":
    main()
