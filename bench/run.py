#!/usr/bin/python3
"""provision benchmark harness (`make bench`). See bench/README.md for what each row means.

    bench/run.py [--quick] [--only dhcp,ipxe,pg,ui,tftp,storm,e2e,fleet,rss] [--bin PATH]
                 [--rounds N]
                 [--no-append] [--note TEXT] [--keep]

Runs provision and its peers (dnsmasq, atftpd, tftpd-hpa, nginx) alternately (A B A B ...),
the server pinned to one CPU and every client to another, all traffic on loopback or on a
veth pair between two network namespaces this script creates. Prints one markdown table and
appends it, with the command, date, commit and machine, to bench/RESULTS.md.

Everything it starts is stopped by PID, and every namespace it made is deleted, also on an
error or Ctrl-C. Timings are never asserted: the table is the record. Standard library only.
"""

import argparse
import ctypes
import datetime
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = "/usr/bin/python3"
CLK = os.sysconf("SC_CLK_TCK")
SECTIONS = ["dhcp", "ipxe", "pg", "ui", "tftp", "storm", "e2e", "fleet", "rss"]

FULL = dict(
    rounds=3,
    dhcp_step_s=2,
    dhcp_rates=[100, 300, 1000, 3000, 10000, 30000],
    dhcp_refine=2,
    dhcp_macs=[1000, 1000000],
    seed_installed=100000,
    seed_enrolled=10000,
    seed_timeout=1500,
    wrk_s=8,
    tftp_single_mib=64,
    tftp_windows=[1, 8, 16],
    tftp_conc_clients=200,
    tftp_conc_mib=4,
    tftp_conc_windows=[1, 8],
    storm_clients=200,
    storm_mib=(10, 20),
    e2e_machines=500,
    ui_requests=30,
    fleet_machines=10000,
    pg_installed=10000,
    pg_enrolled=5000,
    pg_dhcp_macs=[1000, 1000000],
)
QUICK = dict(
    FULL,
    rounds=1,
    dhcp_step_s=1,
    dhcp_rates=[200, 1000, 5000, 20000],
    dhcp_refine=0,
    seed_installed=1000,
    seed_enrolled=500,
    seed_timeout=300,
    wrk_s=2,
    tftp_single_mib=16,
    tftp_conc_clients=50,
    tftp_conc_mib=4,
    storm_clients=50,
    e2e_machines=100,
    ui_requests=10,
    pg_installed=1000,
    pg_enrolled=500,
    pg_dhcp_macs=[1000],
)

# The ProxyDHCP test's PXE client options (perfdhcp -o CODE,HEX): vendor class, arch 0
# (BIOS), client NII (UNDI 2.1), GUID (type 0 + 16 bytes).
PXE_CLASS = b"PXEClient:Arch:00000:UNDI:002001"
PERFDHCP_OPTS = [
    "-o", "60," + PXE_CLASS.hex(),
    "-o", "93,0000",
    "-o", "94,010201",
    "-o", "97,00" + "5d1c2b3a4f6e7d8c9bab0c1d2e3f4051",
]

T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A harness or peer problem that ends a section (reported in the table, not a hang)."""


# ---------------------------------------------------------------------------------------------
# Processes: every one we start is registered and stopped by its own PID.

LIVE = {}  # pid -> (Popen, name)


def spawn(name, argv, logfile, env=None, stdout=None):
    out = open(logfile, "ab") if stdout is None else stdout
    try:
        p = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if stdout is None else subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it ourselves
        )
    finally:
        if stdout is None:
            out.close()
    LIVE[p.pid] = (p, name)
    return p


def stop(p, grace=10.0):
    """SIGTERM to this PID, SIGKILL after `grace` seconds; returns the exit status."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    LIVE.pop(p.pid, None)
    return p.returncode


def run(argv, timeout, env=None, check=True, show_stderr=False):
    """Runs a client to completion (killed by PID on timeout); returns CompletedProcess."""
    try:
        r = subprocess.run(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None if show_stderr else subprocess.PIPE,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{Path(str(argv[0])).name} ... timed out after {timeout} s: "
                         f"{' '.join(map(str, argv))[:200]}") from e
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))[:200]} exited {r.returncode}: "
                         f"{(r.stderr or r.stdout or '')[-500:]}")
    return r


def run_many(argvs, timeout, env=None):
    """Starts every client at once; waits for all (killing stragglers at the deadline).
    Returns (wall seconds, [(returncode, stdout)])."""
    procs = []
    t0 = time.monotonic()
    try:
        for a in argvs:
            p = subprocess.Popen([str(x) for x in a], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            LIVE[p.pid] = (p, "client")
            procs.append(p)
        deadline = t0 + timeout
        for p in procs:
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        wall = time.monotonic() - t0
        return wall, [(p.returncode, p.stdout.read().decode("utf-8", "replace")) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
            if p.stdout:
                p.stdout.close()
            LIVE.pop(p.pid, None)


def proc_cpu(pid):
    """CPU seconds of a process: utime + stime, plus those of children it waited for."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime is field 14.
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK


def proc_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------------
# Network namespaces. NS holds the servers (loopback tests run entirely inside it; this
# process enters it, so nothing here touches the host's network); NSC holds the DHCP and
# end-to-end clients, joined to NS by a veth pair.

NS = f"pvb{os.getpid()}"
NSC = f"pvb{os.getpid()}c"
VS, VC = f"pvb{os.getpid()}s0", f"pvb{os.getpid()}c0"
SRV_IP, CLI_IP = "10.201.0.1", "10.201.0.2"  # on a /16
ADMIN = "127.0.0.1:8443"  # provision's admin listener, in NS
# The e2e machines' addresses (10.202.1.0 and up) are routed to NS through CLI_IP, as through
# a DHCP relay: every simulated machine sends from the one veth VC, so on-link the server's
# neighbour table would show VC's one MAC for all of them, which contradicts each machine's
# install claim (provision refuses those). Routed, the server sees no neighbour entry for
# them, and each machine's claim rests on DHCP's evidence: its DHCPREQUEST for its address.
MACHINE_NET = "10.202.0.0/16"
ADDED_ADDRS = []
MADE_NS = []
HOST_NS_FD = None
CLONE_NEWNET = 0x40000000


def sh(*argv):
    run(argv, timeout=30)


def setns(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def make_namespaces():
    global HOST_NS_FD
    for n in (NS, NSC):
        sh("ip", "netns", "add", n)
        MADE_NS.append(n)
        sh("ip", "-n", n, "link", "set", "lo", "up")
    sh("ip", "-n", NS, "link", "add", VS, "type", "veth", "peer", "name", VC, "netns", NSC)
    sh("ip", "-n", NS, "addr", "add", f"{SRV_IP}/16", "dev", VS)
    sh("ip", "-n", NSC, "addr", "add", f"{CLI_IP}/16", "dev", VC)
    sh("ip", "-n", NS, "link", "set", VS, "up")
    sh("ip", "-n", NSC, "link", "set", VC, "up")
    sh("ip", "-n", NS, "route", "add", MACHINE_NET, "via", CLI_IP)
    # ...and their ARP requests for SRV_IP name CLI_IP as the sender (the address in SRV_IP's
    # subnet), as a router's would: with a machine address as sender, the server would
    # learn that address at VC's MAC from the ARP request itself.
    sh("ip", "netns", "exec", NSC, "sysctl", "-q", "-w", "net.ipv4.conf.all.arp_announce=2")
    # Enter NS (this is the only thread, so every later thread and child is in NS too).
    HOST_NS_FD = os.open("/proc/self/ns/net", os.O_RDONLY)
    fd = os.open(f"/run/netns/{NS}", os.O_RDONLY)
    try:
        setns(fd)
    finally:
        os.close(fd)


def delete_namespaces():
    if HOST_NS_FD is not None:
        try:
            setns(HOST_NS_FD)
        except OSError as e:
            log(f"cleanup: could not return to the host namespace: {e}")
    for n in reversed(MADE_NS):
        r = subprocess.run(["ip", "netns", "del", n], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"cleanup: ip netns del {n}: {r.stderr.strip()}")
    MADE_NS.clear()


def in_client_ns(argv):
    return ["ip", "netns", "exec", NSC] + list(argv)


def udp_stats(ns=None):
    if ns is None:
        text = open("/proc/net/snmp").read()
    else:
        text = run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], 10).stdout
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    return dict(zip(rows[0], map(int, rows[1])))


def udp_bound(port):
    """Whether a UDP socket in this namespace is bound to `port`."""
    return udp_bound_count(port) > 0


def udp_bound_count(port):
    """How many UDP sockets in this namespace are bound to `port`."""
    with open("/proc/net/udp") as f:
        next(f)
        return sum(int(line.split()[1].split(":")[1], 16) == port for line in f)


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url, timeout=5.0, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with NO_PROXY.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------------------------------------
# Daemons.


class Daemon:
    def __init__(self, name, argv, work, env=None):
        self.name = name
        self.log = work / f"{name}.log"
        self.proc = spawn(name, argv, self.log, env=env)
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def cpu(self):
        return proc_cpu(self.pid)

    def kb(self, key):
        return proc_kb(self.pid, key)

    def wait_ready(self, check, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited with {self.proc.returncode} at start: "
                                 f"{self.tail()}")
            try:
                if check():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.name} not ready after {timeout} s: {self.tail()}")

    def tail(self, n=600):
        try:
            return self.log.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def stop(self):
        rc = stop(self.proc)
        return rc


class Bench:
    def __init__(self, args, cfg, work):
        self.a = args
        self.cfg = cfg
        self.work = work
        self.bin = args.bin
        self.rows = []
        self.notes = []
        self.errors = []
        self.srv_cpu = str(args.server_cpu)
        self.cli_cpu = str(args.client_cpu)
        self.idle_rss = []
        self.counter = 0

    # --- helpers -------------------------------------------------------------------------

    def pin_s(self):
        return ["taskset", "-c", self.srv_cpu]

    def pin_c(self):
        return ["taskset", "-c", self.cli_cpu]

    def fresh(self, name):
        self.counter += 1
        d = self.work / f"{name}-{self.counter}"
        d.mkdir(parents=True)
        return d

    def row(self, work, prov, peer=None, ratio="auto", notes="", fmt="{:,.0f}"):
        def f(x):
            if x is None:
                return "—"
            if isinstance(x, str):
                return x
            return fmt.format(x)
        if ratio == "auto":
            ratio = (f"{prov / peer:.2f}" if isinstance(prov, (int, float))
                     and isinstance(peer, (int, float)) and peer else "—")
        self.rows.append((work, f(prov), f(peer), ratio or "—", notes))
        log(f"ROW | {work} | {f(prov)} | {f(peer)} | {ratio} | {notes}")

    def provision(self, name, data_dir, http="127.0.0.1:8080", tftp="off", dhcp="off",
                  extra=(), admin=ADMIN):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISION_")}
        # The admin API only seeds machines here; plain HTTP on loopback (which provision
        # allows without --insecure-admin) keeps seed.py on the standard library.
        argv = self.pin_s() + [self.bin, "serve", "--data-dir", data_dir, "--http", http,
                               "--admin", admin, "--admin-tls", "off",
                               "--tftp", tftp, "--dhcp", dhcp, *extra]
        # Daemons sharing a database may share port 67 (each on its own interface): this
        # one is up when one more socket is bound to it than before it started.
        on67 = udp_bound_count(67)
        d = Daemon(name, argv, self.work, env=env)

        def ready():
            ok = http_get(f"http://{http}/healthz", timeout=1)[0] == 200
            if tftp != "off":
                ok = ok and udp_bound(int(tftp.rsplit(":", 1)[1]))
            if dhcp != "off":
                ok = ok and udp_bound_count(67) > on67
            return ok

        return d.wait_ready(ready)

    def nginx(self, root, listen="127.0.0.1:8080", assets=None):
        prefix = self.fresh("nginx")
        (prefix / "logs").mkdir()
        conf = prefix / "nginx.conf"
        alias = f"location /assets/ {{ alias {assets}/; }}" if assets else ""
        conf.write_text(f"""# provision bench: nginx as the static-file reference
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    default_type text/plain;
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    server {{
        listen {listen} backlog=4096;
        root {root};
        {alias}
    }}
}}
""")
        argv = self.pin_s() + ["nginx", "-p", prefix, "-c", conf]
        d = Daemon("nginx", argv, self.work)
        return d.wait_ready(lambda: http_get(f"http://{listen}/nonexistent", 1)[0] == 404)

    def wait_udp(self, d, port):
        return d.wait_ready(lambda: udp_bound(port))

    # --- result file metadata --------------------------------------------------------------


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mb(nbytes):
    return nbytes / 1e6


# =============================================================================================
# 1. ProxyDHCP DISCOVER -> OFFER (perfdhcp) vs dnsmasq in proxy mode.


def perfdhcp_argv(b, rate, secs, nmacs, seed, iface=None):
    return in_client_ns(b.pin_c() + [
        "perfdhcp", "-4", "-l", iface or VC, "-i", "-g", "single", "-r", rate, "-p", secs,
        "-R", nmacs, "-s", seed, "-d", "1", "-W", "500000", *PERFDHCP_OPTS])


def perfdhcp(b, rate, secs, nmacs, seed):
    r = run(perfdhcp_argv(b, rate, secs, nmacs, seed), timeout=secs + 30, check=False)
    return perfdhcp_counts(r.returncode, r.stdout + r.stderr)


def perfdhcp_counts(returncode, out):
    """perfdhcp's sent and received packet counts, from its report."""
    if returncode not in (0, 3):
        raise BenchError(f"perfdhcp exited {returncode}: {out[-400:]}")

    def num(label):
        m = re.search(rf"{label}:\s*([0-9.]+)", out)
        if not m:
            raise BenchError(f"perfdhcp output without '{label}': {out[-400:]}")
        return float(m.group(1))

    return {"sent": num("sent packets"), "received": num("received packets")}


def task_cpu(pid):
    """CPU seconds of every live thread of `pid`, from /proc/PID/task/*/schedstat (ns
    resolution; utime+stime in /proc/PID/stat only counts 10 ms ticks, too coarse for the
    few hundred offers of a slow step)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def dhcp_step(b, d, rate, nmacs, seed):
    secs = b.cfg["dhcp_step_s"]
    s0, c0, cpu0, tc0 = udp_stats(), udp_stats(NSC), d.cpu(), task_cpu(d.pid)
    r = perfdhcp(b, rate, secs, nmacs, seed)
    sent, got = r["sent"], r["received"]
    r.update(rate=rate, offered=sent / secs, loss=(1 - got / sent) if sent else 1.0,
             gen_bound=sent / secs < 0.9 * rate)
    if not d.alive():
        r.update(died=True, loss=1.0, srv_drop=0, cli_drop=0, cpu_us=None, stat_us=None)
        return r
    cpu1, tc1, s1, c1 = d.cpu(), task_cpu(d.pid), udp_stats(), udp_stats(NSC)
    r.update(
        cpu_us=((tc1 - tc0) / got * 1e6) if got else None,
        stat_us=((cpu1 - cpu0) / got * 1e6) if got else None,
        srv_drop=s1["RcvbufErrors"] - s0["RcvbufErrors"],
        cli_drop=c1["RcvbufErrors"] - c0["RcvbufErrors"],
    )
    log(f"  {d.name} {nmacs} MACs @ {rate}/s: sent {sent:.0f} ({r['offered']:.0f}/s), "
        f"answered {got:.0f}, unanswered {r['loss']:.2%}, server RcvbufErrors "
        f"{r['srv_drop']}, client RcvbufErrors {r['cli_drop']}, "
        f"{r['cpu_us'] or 0:.1f} µs CPU/offer{' GENERATOR-BOUND' if r['gen_bound'] else ''}")
    return r


def dhcp_ladder(b, d, nmacs, seed, step=None, rates=None):
    """Steps the offered rate up until more than 1 % go unanswered (or the generator cannot
    offer more), then bisects (geometrically) between the last good and the first bad rate.
    `step` (default dhcp_step) measures one rate; `rates` replaces cfg dhcp_rates."""
    measure = step or dhcp_step
    steps = []
    for rate in rates or b.cfg["dhcp_rates"]:
        r = measure(b, d, rate, nmacs, seed)
        steps.append(r)
        if r.get("died") or r["loss"] > 0.01 or r["gen_bound"]:
            break
        time.sleep(0.3)
    for _ in range(b.cfg["dhcp_refine"]):
        ok = [s["rate"] for s in steps if s["loss"] <= 0.01 and not s["gen_bound"]]
        bad = [s["rate"] for s in steps if s["loss"] > 0.01]
        if not bad or any(s.get("died") for s in steps):
            break
        lo, hi = (max(ok) if ok else 0), min(bad)
        if lo and hi / lo < 1.25:
            break
        mid = (lo * hi) ** 0.5 if lo else hi / 2
        mid = int(float(f"{mid:.2g}"))
        if mid <= lo or mid >= hi:
            break
        time.sleep(0.3)
        steps.append(measure(b, d, mid, nmacs, seed))
    ok = [s for s in steps if s["loss"] <= 0.01]
    best = max(ok, key=lambda s: s["offered"]) if ok else None
    first_bad = min((s for s in steps if s["loss"] > 0.01), key=lambda s: s["rate"], default=None)
    return {
        "max": best["offered"] if best else 0.0,
        "gen_bound": bool(best and best["gen_bound"]),
        "steps": steps,
        "bad": first_bad,
        "died": any(s.get("died") for s in steps),
        "gen_max": max(s["offered"] for s in steps) if steps else 0,
    }


def common_cpu(p, q):
    """CPU per offer of both servers at the highest rate both answered (≤ 1 % lost)."""
    def good(x):
        return {s["rate"]: s for s in x["steps"] if s["loss"] <= 0.01 and s.get("cpu_us")}
    gp, gq = good(p), good(q)
    both = set(gp) & set(gq)
    if not both:
        return None, None, None
    r = max(both)
    return r, gp[r]["cpu_us"], gq[r]["cpu_us"]


def db_facts(data_dir):
    db = Path(data_dir) / "provision.db"
    size = sum((Path(str(db) + suf).stat().st_size if Path(str(db) + suf).exists() else 0)
               for suf in ("", "-wal"))
    return size


def db_counts(data_dir):
    c = sqlite3.connect(f"file:{Path(data_dir) / 'provision.db'}?mode=ro", uri=True)
    try:
        return (c.execute("select count(*) from machines").fetchone()[0],
                c.execute("select count(*) from events").fetchone()[0])
    finally:
        c.close()


def section_dhcp(b):
    for nmacs in b.cfg["dhcp_macs"]:
        res = {"provision": [], "dnsmasq": []}
        dbs = []
        for rnd in range(b.cfg["rounds"]):
            for server in ("provision", "dnsmasq"):
                log(f"dhcp: {nmacs} MACs, round {rnd + 1}, {server}")
                if server == "provision":
                    data = b.fresh("dhcp-data")
                    d = b.provision("provision-dhcp", data, http=f"{SRV_IP}:8080", tftp="off",
                                    dhcp="0.0.0.0", extra=["--dhcp-interface", VS])
                else:
                    wd = b.fresh("dnsmasq-dhcp")
                    d = Daemon("dnsmasq-dhcp", b.pin_s() + [
                        "dnsmasq", "-k", "--conf-file=/dev/null", "--port=0", "--pid-file=",
                        "--user=root", f"--log-facility={wd}/dnsmasq.log",
                        f"--dhcp-leasefile={wd}/leases", f"--interface={VS}",
                        "--dhcp-range=10.201.0.0,proxy,255.255.0.0",
                        '--pxe-service=x86PC,Network-boot,undionly',
                    ], b.work)
                    b.wait_udp(d, 67)
                try:
                    res[server].append(dhcp_ladder(b, d, nmacs, rnd + 1))
                    if server == "provision":
                        dbs.append(db_facts(data))
                finally:
                    d.stop()
                if server == "provision":
                    try:
                        machines, events = db_counts(data)
                    except sqlite3.Error as e:
                        machines = events = f"? ({e})"
                    dbs[-1] = (dbs[-1], machines, events)
        p, q = res["provision"], res["dnsmasq"]
        label = "1k" if nmacs == 1000 else f"{nmacs // 1000}k" if nmacs < 10**6 else f"{nmacs // 10**6}M"
        pm, qm = median([x["max"] for x in p]), median([x["max"] for x in q])
        notes = []
        gen = max(x["gen_max"] for x in p + q)
        if any(x["gen_bound"] for x in p) and any(x["gen_bound"] for x in q):
            notes.append(f"generator-bound (perfdhcp reached {gen:,.0f}/s)")
        elif any(x["gen_bound"] for x in q):
            notes.append(f"dnsmasq generator-bound at {gen:,.0f}/s")
        for name, xs in (("provision", p), ("dnsmasq", q)):
            bad = [x["bad"] for x in xs if x["bad"]]
            if bad:
                notes.append(f"{name} first >1% step (median): server RcvbufErrors "
                             f"{median([x['srv_drop'] for x in bad]):,.0f}, client "
                             f"{median([x['cli_drop'] for x in bad]):,.0f}")
            if any(x["died"] for x in xs):
                notes.append(f"{name} DIED during the test")
        if (pm or 0) >= 0.75 * nmacs * 4:
            notes.append(f"provision's per-MAC rate limit (40 packets/10 s) caps {label} MACs "
                         f"at {nmacs * 4:,}/s")
        b.row(f"ProxyDHCP max rate ≤1% unanswered, {label} MACs [offers/s] vs dnsmasq",
              pm, qm, notes="; ".join(notes))
        summary = []
        for name, xs in (("provision", p), ("dnsmasq", q)):
            bad = [x["bad"] for x in xs if x["bad"]]
            if any(x["gen_bound"] for x in xs):
                summary.append(f"{name} generator-bound in {sum(x['gen_bound'] for x in xs)} "
                               f"of {len(xs)} rounds")
            if bad:
                sd = sum(x["srv_drop"] for x in bad)
                cd = sum(x["cli_drop"] for x in bad)
                if sd == cd == 0:
                    summary.append(f"{name}'s unanswered DISCOVERs were not socket drops "
                                   "(RcvbufErrors 0 on both sides): answers came later than "
                                   "perfdhcp's 1 s drop time, or never")
                else:
                    side = "server" if sd > cd else "client"
                    summary.append(f"{name} lost DISCOVERs on the {side} side (RcvbufErrors "
                                   f"summed over its first failing step of each round: server "
                                   f"{sd:,}, client {cd:,})")
        b.notes.append(f"ProxyDHCP {label} MACs: perfdhcp offered at most {gen:,.0f}/s; "
                       + "; ".join(summary) + ".")
        cc = [common_cpu(x, y) for x, y in zip(p, q)]
        rates = sorted({c[0] for c in cc if c[0]})
        b.row(f"ProxyDHCP server CPU per offer, {label} MACs [µs] vs dnsmasq",
              median([c[1] for c in cc]), median([c[2] for c in cc]), fmt="{:,.1f}",
              notes=f"at the highest rate both answered in a round ({', '.join(f'{r:,}/s' for r in rates) or 'none'}); "
                    "all threads' CPU from /proc/PID/task/*/schedstat")
        sizes = [x[0] for x in dbs]
        b.row(f"provision DB after the {label}-MAC DHCP runs [MB] (provision.db + -wal)",
              median([mb(s) for s in sizes]), None, fmt="{:,.1f}",
              notes="machines / events in the last round's DB: "
                    f"{dbs[-1][1]:,} / {dbs[-1][2]:,}" if isinstance(dbs[-1][1], int)
                    else f"counts unavailable: {dbs[-1][1]}")


# =============================================================================================
# 2. Per-MAC /ipxe with an inventory, vs nginx serving a file of the same size.


def wrk(b, threads, conns, path, macs=None, d=None):
    env = dict(os.environ, BENCH_MACS=str(macs or ""))
    secs = b.cfg["wrk_s"]
    argv = b.pin_c() + ["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", "--timeout", "10s",
                        "--latency", "-s", HERE / "wrk.lua", f"http://127.0.0.1:8080{path}"]
    cpu0 = d.cpu() if d else None
    r = run(argv, timeout=secs + 60, env=env)
    cpu1 = d.cpu() if d else None
    m = re.search(r"BENCHJSON (\{.*\})", r.stdout)
    if not m:
        raise BenchError(f"wrk printed no BENCHJSON: {r.stdout[-400:]}")
    j = json.loads(m.group(1))
    j["rps"] = j["requests"] / (j["duration_us"] / 1e6)
    j["errors"] = j["connect"] + j["read"] + j["write"] + j["status"] + j["timeout"]
    if d:
        j["cpu_us"] = (cpu1 - cpu0) / max(1, j["requests"]) * 1e6
        j["alive"] = d.alive()
    log(f"  wrk -t{threads} -c{conns} {path}{' (MACs ' + Path(macs).name + ')' if macs else ''}: "
        f"{j['rps']:,.0f} req/s, p50 {j['p50_us'] / 1000:.2f} ms, p99 {j['p99_us'] / 1000:.2f} ms,"
        f" errors {j['errors']}")
    return j


# seed.py and wrk play every machine from 127.0.0.1, where nothing the daemon observes (no
# neighbour entry, no DHCP) vouches for the MAC a request claims: the install answers are
# measured as for relayed clients, whose claims an operator accepts with `--claims any`.
LOOPBACK_CLAIMS = ["--claims", "any"]


def host_key(b):
    """The ed25519 key pair (private key path; `.pub` beside it) machines phone home with,
    made once per run."""
    key = b.work / "hostkey"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-host-key", "-f", key], 30)
    return key


def seeded(b):
    """The data dir seeded through the API with cfg seed_installed installed and
    seed_enrolled enrolled machines, and the dir of their MAC files; seeded once per run and
    shared by the sections that need an inventory (copy it before serving it)."""
    if getattr(b, "seed", None):
        return b.seed
    cfg = b.cfg
    key = host_key(b)
    seed_dir = b.work / "ipxe-seed"
    out = b.fresh("ipxe-macs")
    log(f"seeding {cfg['seed_installed']:,} installed + {cfg['seed_enrolled']:,} "
        "enrolled machines through the API (enroll, /ipxe, phone-home)")
    d = b.provision("provision-seed", seed_dir, extra=LOOPBACK_CLAIMS)
    try:
        t0 = time.monotonic()
        r = run(b.pin_c() + [PY, HERE / "seed.py", "--url", "http://127.0.0.1:8080",
                             "--admin-url", f"http://{ADMIN}",
                             "--token-file", seed_dir / "admin-token",
                             "--installed", cfg["seed_installed"],
                             "--enrolled", cfg["seed_enrolled"], "--pubkey", f"{key}.pub",
                             "--out", out, "--workers", 32, "--max-failures",
                             (cfg["seed_installed"] + cfg["seed_enrolled"]) // 1000],
                timeout=cfg["seed_timeout"], check=False, show_stderr=True)
        seed_s = time.monotonic() - t0
        res = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
        if r.returncode != 0:
            raise BenchError(f"seeding failed ({res.get('failures')} failures): "
                             f"{res.get('first_failures') or r.stdout[-400:]}")
        b.seed_s = seed_s
        b.seed_failures = res.get("failures", 0)
        if b.seed_failures:
            b.notes.append(f"Seeding: {b.seed_failures} machines failed and were left out "
                           f"(at most 0.1 % allowed); first: {res.get('first_failures', [])[:2]}")
        log(f"seeded in {seed_s:.1f} s (not measured), {b.seed_failures} failures")
    finally:
        d.stop()
    b.seed = (seed_dir, out)
    return b.seed


GROUPS = 1000
RULES = 100


def admin_put(token, path, body):
    req = urllib.request.Request(
        f"http://{ADMIN}/api/v1{path}", data=json.dumps(body).encode(), method="PUT",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with NO_PROXY.open(req, timeout=10) as r:
        if r.status not in (200, 201):
            raise BenchError(f"PUT {path}: HTTP {r.status}")


def with_groups(b, seed_dir, enrolled):
    """A copy of the seeded data dir with GROUPS groups and RULES discovery rules made through
    the API. Half the groups select one enrolled machine each by MAC (a var), the rest select a
    rack label no machine has, and one is a default (a var); none gives a profile, so every
    answer stays what it was and only the cost of resolving a machine's groups is added. The
    rules match serial numbers no machine reports, so a discovered machine tries them all and
    gets the discovery answer."""
    data = b.work / "ipxe-groups-seed"
    if data.exists():
        return data
    shutil.copytree(seed_dir, data, symlinks=True)
    d = b.provision("provision-groups-seed", data, extra=LOOPBACK_CLAIMS)
    token = (data / "admin-token").read_text().strip()
    macs = enrolled.read_text().split()
    try:
        for i in range(GROUPS):
            if i == 0:
                g = {"vars": {"site_ntp": "ntp.example"}}
            elif i <= GROUPS // 2 and i <= len(macs):
                g = {"selector": {"mac": macs[i - 1]}, "vars": {"bench_slot": str(i)}}
            else:
                g = {"selector": {"rack": str(i)}, "vars": {"rack_gw": f"10.{i % 250}.0.1"}}
            admin_put(token, f"/groups/g{i:04}", g)
        for i in range(RULES):
            admin_put(token, f"/rules/r{i:03}", {
                "priority": i, "match": {"serial": f"NOSUCH-{i}-*", "platform": "pcbios"},
                "profile": "debian-12", "hostname": f"r{i}-{{index:03}}", "max": 10})
    finally:
        d.stop()
    return data


def section_ipxe(b):
    cfg = b.cfg
    seed_dir, out = seeded(b)
    installed = out / "macs-installed.txt"
    enrolled = out / "macs-enrolled.txt"
    d = b.provision("provision-seed", seed_dir, extra=LOOPBACK_CLAIMS)
    try:
        first = installed.read_text().split("\n", 1)[0]
        st, local = http_get(f"http://127.0.0.1:8080/ipxe?mac={first}&platform=pcbios")
        if st != 200 or b"sanboot" not in local:
            raise BenchError(f"an installed machine's /ipxe is not a local boot: {st} {local[:200]!r}")
        st, boot = http_get("http://127.0.0.1:8080/boot.ipxe")
        if st != 200:
            raise BenchError(f"/boot.ipxe: HTTP {st}")
    finally:
        d.stop()
    www = b.fresh("www")
    (www / "ipxe").write_bytes(local)
    (www / "boot.ipxe").write_bytes(boot)
    tests = [("c1", 1, 1, "/ipxe", installed), ("c50", 2, 50, "/ipxe", installed),
             ("boot", 2, 50, "/boot.ipxe", None)]
    res = {("p", t[0]): [] for t in tests}
    res.update({("n", t[0]): [] for t in tests})
    res[("p", "install")] = []
    res[("g", "c50")] = []
    res[("g", "install")] = []
    res[("p", "disc")] = []
    res[("g", "disc")] = []
    groups_dir = with_groups(b, seed_dir, enrolled)
    # MACs no machine has: their first request discovers them (a durable write, in the
    # unmeasured warm-up run), then each gets the discovery answer, after the rules.
    discovered = b.work / "macs-discovered.txt"
    discovered.write_text("".join(f"02:be:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}\n"
                                  for i in range(2000)))
    for rnd in range(cfg["rounds"]):
        log(f"ipxe: round {rnd + 1}, provision (fresh copy of the seeded data dir)")
        data = b.work / "ipxe-run"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(seed_dir, data, symlinks=True)
        d = b.provision("provision-ipxe", data, extra=LOOPBACK_CLAIMS)
        try:
            for name, t, c, path, macs in tests:
                res[("p", name)].append(wrk(b, t, c, path, macs, d))
            res[("p", "install")].append(wrk(b, 2, 50, "/ipxe", enrolled, d))
            wrk(b, 2, 50, "/ipxe", discovered, d)
            res[("p", "disc")].append(wrk(b, 2, 50, "/ipxe", discovered, d))
        finally:
            d.stop()
        log(f"ipxe: round {rnd + 1}, provision with {GROUPS:,} groups")
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(groups_dir, data, symlinks=True)
        d = b.provision("provision-ipxe-groups", data, extra=LOOPBACK_CLAIMS)
        try:
            # The run without groups measured -t1 -c1 first, which warmed its caches (boot
            # facts, SQLite pages) over the installed MACs; the same run here, not counted, so
            # the two -c50 figures start alike.
            wrk(b, 1, 1, "/ipxe", installed, d)
            res[("g", "c50")].append(wrk(b, 2, 50, "/ipxe", installed, d))
            res[("g", "install")].append(wrk(b, 2, 50, "/ipxe", enrolled, d))
            wrk(b, 2, 50, "/ipxe", discovered, d)
            res[("g", "disc")].append(wrk(b, 2, 50, "/ipxe", discovered, d))
        finally:
            d.stop()
        log(f"ipxe: round {rnd + 1}, nginx")
        d = b.nginx(www)
        try:
            for name, t, c, path, macs in tests:
                res[("n", name)].append(wrk(b, t, c, path, macs, d))
        finally:
            d.stop()

    def med(side, name, key):
        return median([j[key] for j in res[(side, name)]])

    def errs(side, name):
        e = sum(j["errors"] for j in res[(side, name)])
        dead = any(not j.get("alive", True) for j in res[(side, name)])
        return (f"{'provision' if side == 'p' else 'nginx'} errors: {e:,}" if e else "") + \
               (" DAEMON DIED" if dead else "")

    size = f"{len(local)} B answer"
    inventory = f"{cfg['seed_installed']:,} installed + {cfg['seed_enrolled']:,} enrolled machines"
    for name, label in (("c1", "-t1 -c1"), ("c50", "-t2 -c50")):
        notes = [n for n in (errs("p", name), errs("n", name)) if n]
        if name == "c1":
            notes.append(f"{inventory}; local-boot script, {size}; random MAC per request")
        else:
            notes.append(f"server CPU {med('p', name, 'cpu_us'):,.0f} µs/req vs "
                         f"{med('n', name, 'cpu_us'):,.0f}")
        b.row(f"/ipxe local boot {label} [req/s] vs nginx static file", med("p", name, "rps"),
              med("n", name, "rps"), notes="; ".join(notes))
        b.row(f"/ipxe local boot {label} p50 [ms] vs nginx", med("p", name, "p50_us") / 1000,
              med("n", name, "p50_us") / 1000, fmt="{:,.3f}")
        b.row(f"/ipxe local boot {label} p99 [ms] vs nginx", med("p", name, "p99_us") / 1000,
              med("n", name, "p99_us") / 1000, fmt="{:,.3f}")
    ins = med("p", "install", "rps")
    b.row("/ipxe install answer -t2 -c50 [req/s] (mints a token per answer)", ins, None,
          notes=f"goal ≥ 5,000/s: {'met' if ins >= 5000 else 'NOT met'}; p50 "
                f"{med('p', 'install', 'p50_us') / 1000:.2f} ms, p99 "
                f"{med('p', 'install', 'p99_us') / 1000:.2f} ms; over "
                f"{cfg['seed_enrolled']:,} enrolled MACs" +
                (f"; {errs('p', 'install')}" if errs("p", "install") else ""))
    for name, what in (("c50", "/ipxe local boot -t2 -c50"),
                       ("install", "/ipxe install answer -t2 -c50"),
                       ("disc", "/ipxe discovery answer (2,000 discovered MACs) -t2 -c50")):
        notes = [n for n in (errs("g", name),) if n]
        b.row(f"{what} [req/s] with {GROUPS:,} groups and {RULES} rules vs without (same run)",
              med("g", name, "rps"), med("p", name, "rps"),
              notes="; ".join(notes + [f"p99 {med('g', name, 'p99_us') / 1000:.2f} vs "
                                       f"{med('p', name, 'p99_us') / 1000:.2f} ms; "
                                       f"{GROUPS // 2:,} groups select an enrolled machine "
                                       "by MAC, one is a default"]))
    notes = [n for n in (errs("p", "boot"), errs("n", "boot")) if n]
    b.row("/boot.ipxe (static) -t2 -c50 [req/s] vs nginx (reference)", med("p", "boot", "rps"),
          med("n", "boot", "rps"),
          notes="; ".join(notes + [f"p50 {med('p', 'boot', 'p50_us') / 1000:.2f} vs "
                                   f"{med('n', 'boot', 'p50_us') / 1000:.2f} ms, p99 "
                                   f"{med('p', 'boot', 'p99_us') / 1000:.2f} vs "
                                   f"{med('n', 'boot', 'p99_us') / 1000:.2f} ms"]))
    b.notes.append(f"Seeding {inventory} through the API took {b.seed_s:.0f} s (not measured).")


# =============================================================================================
# 2b. The inventory on PostgreSQL next to SQLite (scale-out): one daemon, the same requests,
# the database the only difference; then ProxyDHCP with three daemons sharing one database.


def pg_bin():
    """The newest PostgreSQL server binaries Debian installed."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if not found:
        raise BenchError("no PostgreSQL server under /usr/lib/postgresql: apt-get install "
                         "postgresql (bench/peers.sh installs it)")
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def tree_cpu(pid):
    """CPU seconds of `pid` and its children (PostgreSQL: the postmaster and its backends)."""
    total = proc_cpu(pid)
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            try:
                total += proc_cpu(int(e))
            except (OSError, ValueError, IndexError):
                pass
    return total


class Postgres:
    """A PostgreSQL cluster of the bench's own: initdb'd into a directory under /var/tmp as
    the `postgres` user, on a Unix socket only (no TCP listener), with PostgreSQL's durable
    defaults (fsync, synchronous_commit and full_page_writes on), pinned to the server CPU:
    the database is part of the server under test, so it shares that CPU with the daemons."""

    def __init__(self, b):
        import pwd
        pw = pwd.getpwnam("postgres")
        self.bin = pg_bin()
        # Not under the bench's work dir, which only root may enter.
        self.dir = Path(tempfile.mkdtemp(prefix="provision-bench-pg-", dir="/var/tmp"))
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.as_pg = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
        self.dbs = 0
        try:
            run(self.as_pg + [self.bin / "initdb", "-D", self.dir / "data", "-U", "postgres",
                              "--auth=trust", "-E", "UTF8", "--locale=C"], 120)
            self.daemon = Daemon("postgres", b.pin_s() + self.as_pg + [
                self.bin / "postgres", "-D", self.dir / "data", "-c", "listen_addresses=",
                "-c", f"unix_socket_directories={self.dir}", "-c", "max_connections=200"],
                b.work)
            self.daemon.wait_ready(lambda: run(self.as_pg + [
                self.bin / "pg_isready", "-q", "-h", self.dir], 10, check=False).returncode == 0)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.version = run([self.bin / "postgres", "--version"], 10).stdout.strip()

    def new_db(self):
        """A new, empty database; returns the connection string provision is given."""
        self.dbs += 1
        name = f"bench{self.dbs}"
        run(self.as_pg + [self.bin / "psql", "-X", "-q", "-h", self.dir, "-U", "postgres",
                          "-d", "postgres", "-c", f"CREATE DATABASE {name}"], 60)
        return f"host={self.dir} user=postgres dbname={name}"

    def cpu(self):
        return tree_cpu(self.daemon.pid)

    def stop(self):
        # Fast shutdown (SIGINT): it does not wait for clients, and its checkpoint is quick.
        if self.daemon.alive():
            os.kill(self.daemon.pid, signal.SIGINT)
        self.daemon.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class WithDatabase:
    """A daemon and the database cluster it writes to, as one server for wrk's CPU figures."""

    def __init__(self, d, pg):
        self.d, self.pg = d, pg

    def cpu(self):
        return self.d.cpu() + (self.pg.cpu() if self.pg else 0)

    def alive(self):
        return self.d.alive()


def pg_provision(b, name, data, backend, pg, url, key, **kw):
    """provision on `backend` ("sqlite", or "postgres" at `url` with secret key file `key`)."""
    extra = list(kw.pop("extra", ()))
    if backend == "postgres":
        extra += ["--database", url, "--secret-key-file", key]
    return b.provision(name, data, extra=extra, **kw)


PG_DAEMONS = 3


def pg_links():
    """Two more veth pairs between the namespaces, for the second and third daemon's segments:
    10.203.N.1 (server) — 10.203.N.2 (client). Returns [(server if, client if, server ip)],
    the bench's own pair first."""
    links = [(VS, VC, SRV_IP)]
    for n in range(1, PG_DAEMONS):
        vs, vc = f"{VS[:-1]}{n}", f"{VC[:-1]}{n}"
        sh("ip", "-n", NS, "link", "add", vs, "type", "veth", "peer", "name", vc, "netns", NSC)
        sh("ip", "-n", NS, "addr", "add", f"10.203.{n}.1/24", "dev", vs)
        sh("ip", "-n", NSC, "addr", "add", f"10.203.{n}.2/24", "dev", vc)
        sh("ip", "-n", NS, "link", "set", vs, "up")
        sh("ip", "-n", NSC, "link", "set", vc, "up")
        links.append((vs, vc, f"10.203.{n}.1"))
    return links


def pg_dhcp_step(b, servers, rate, nmacs, seed):
    """One rate step against several daemons at once, each on its own segment with its own
    perfdhcp (its own MACs) at rate/N; counts and CPU summed (with the database's)."""
    ds, pg, links = servers
    secs = b.cfg["dhcp_step_s"]
    each = max(1, rate // len(ds))
    cpu0 = sum(task_cpu(d.pid) for d in ds) + (pg.cpu() if pg else 0)
    s0, c0 = udp_stats(), udp_stats(NSC)
    _, outs = run_many([perfdhcp_argv(b, each, secs, nmacs, seed * 10 + i, links[i][1])
                           for i in range(len(ds))], timeout=secs + 30)
    counts = [perfdhcp_counts(rc, out) for rc, out in outs]
    sent = sum(c["sent"] for c in counts)
    got = sum(c["received"] for c in counts)
    r = {"sent": sent, "received": got, "rate": each * len(ds), "offered": sent / secs,
         "loss": (1 - got / sent) if sent else 1.0, "gen_bound": sent / secs < 0.9 * each * len(ds)}
    if not all(d.alive() for d in ds):
        r.update(died=True, loss=1.0, srv_drop=0, cli_drop=0, cpu_us=None)
        return r
    cpu1 = sum(task_cpu(d.pid) for d in ds) + (pg.cpu() if pg else 0)
    s1, c1 = udp_stats(), udp_stats(NSC)
    r.update(cpu_us=((cpu1 - cpu0) / got * 1e6) if got else None,
             srv_drop=s1["RcvbufErrors"] - s0["RcvbufErrors"],
             cli_drop=c1["RcvbufErrors"] - c0["RcvbufErrors"])
    log(f"  {len(ds)} daemon(s) {nmacs} MACs @ {r['rate']}/s: sent {sent:.0f} "
        f"({r['offered']:.0f}/s), answered {got:.0f}, unanswered {r['loss']:.2%}, server "
        f"RcvbufErrors {r['srv_drop']}, {r['cpu_us'] or 0:.1f} µs CPU/offer (daemons + "
        f"database){' GENERATOR-BOUND' if r['gen_bound'] else ''}")
    return r


def section_pg(b):
    cfg = b.cfg
    pg = Postgres(b)
    key = b.work / "secret.key"
    key.write_text(os.urandom(32).hex())
    os.chmod(key, 0o600)
    hostkey = host_key(b)
    try:
        # --- the HTTP hot path and enrolment, one daemon, SQLite vs PostgreSQL -------------
        backends = ("sqlite", "postgres")
        res = {(k, be): [] for k in ("full", "enroll", "local", "install") for be in backends}
        for rnd in range(cfg["rounds"]):
            for be in backends:
                log(f"pg: round {rnd + 1}, one daemon on {be}")
                data, out = b.fresh("pg-data"), b.fresh("pg-macs")
                url = pg.new_db() if be == "postgres" else None
                d = pg_provision(b, f"provision-{be}", data, be, pg, url, key,
                                 extra=LOOPBACK_CLAIMS)
                server = WithDatabase(d, pg if be == "postgres" else None)
                try:
                    r = run(b.pin_c() + [
                        PY, HERE / "seed.py", "--url", "http://127.0.0.1:8080",
                        "--admin-url", f"http://{ADMIN}", "--token-file", data / "admin-token",
                        "--installed", cfg["pg_installed"], "--enrolled", cfg["pg_enrolled"],
                        "--pubkey", f"{hostkey}.pub", "--out", out, "--workers", 32],
                        timeout=cfg["seed_timeout"], show_stderr=True)
                    j = json.loads(r.stdout.strip().splitlines()[-1])
                    res[("full", be)].append(j["installed"] / j["seconds_installed"])
                    res[("enroll", be)].append(
                        j["enrolled"] / max(1e-9, j["seconds"] - j["seconds_installed"]))
                    installed, enrolled = out / "macs-installed.txt", out / "macs-enrolled.txt"
                    wrk(b, 1, 1, "/ipxe", installed, server)  # warm-up, not counted
                    res[("local", be)].append(wrk(b, 2, 50, "/ipxe", installed, server))
                    res[("install", be)].append(wrk(b, 2, 50, "/ipxe", enrolled, server))
                finally:
                    d.stop()
        sizes = f"{cfg['pg_installed']:,} installed + {cfg['pg_enrolled']:,} enrolled"
        b.row("[pg] enrol + install + phone-home through the API, 32 workers [machines/s] "
              "PostgreSQL vs SQLite", median(res[("full", "postgres")]),
              median(res[("full", "sqlite")]),
              notes=f"{sizes} machines seeded by bench/seed.py; per machine: POST "
                    "/api/v1/machines, GET /ipxe (mints a token), POST /phone-home")
        b.row("[pg] enrol through the API, 32 workers [machines/s] PostgreSQL vs SQLite",
              median(res[("enroll", "postgres")]), median(res[("enroll", "sqlite")]),
              notes=f"the {cfg['pg_enrolled']:,} enrolled-only machines of the same seeding")
        for k, what in (("local", "/ipxe local boot"), ("install", "/ipxe install answer")):
            p, q = res[(k, "postgres")], res[(k, "sqlite")]
            errors = sum(j["errors"] for j in p + q)
            b.row(f"[pg] {what} -t2 -c50 [req/s] PostgreSQL vs SQLite",
                  median([j["rps"] for j in p]), median([j["rps"] for j in q]),
                  notes=f"p99 {median([j['p99_us'] for j in p]) / 1000:.2f} vs "
                        f"{median([j['p99_us'] for j in q]) / 1000:.2f} ms; server CPU "
                        f"{median([j['cpu_us'] for j in p]):,.0f} vs "
                        f"{median([j['cpu_us'] for j in q]):,.0f} µs/req (daemon + "
                        "PostgreSQL's processes)" + (f"; errors {errors:,}" if errors else ""))

        # --- ProxyDHCP: one daemon on SQLite, one on PostgreSQL, three on one database -----
        links = pg_links()
        configs = (("sqlite", 1), ("postgres", 1), ("postgres", PG_DAEMONS))
        rates = [1000, 3000, 10000, 20000, 30000, 45000, 60000]
        for nmacs in cfg["pg_dhcp_macs"]:
            got = {c: [] for c in configs}
            for rnd in range(cfg["rounds"]):
                for be, n in configs:
                    log(f"pg: ProxyDHCP {nmacs} MACs, round {rnd + 1}, {n} daemon(s) on {be}")
                    url = pg.new_db() if be == "postgres" else None
                    ds = []
                    try:
                        for i in range(n):
                            vs, _, ip = links[i]
                            ds.append(pg_provision(
                                b, f"provision-dhcp-{be}-{i}", b.fresh("pg-dhcp-data"), be, pg,
                                url, key, http=f"{ip}:8080", dhcp="0.0.0.0",
                                admin=f"127.0.0.1:{8443 + i}",
                                extra=["--dhcp-interface", vs]))
                        got[(be, n)].append(dhcp_ladder(
                            b, (ds, pg if be == "postgres" else None, links), nmacs, rnd + 1,
                            step=pg_dhcp_step, rates=rates))
                    finally:
                        for d in ds:
                            d.stop()
            label = f"{nmacs // 1000}k" if nmacs < 10**6 else f"{nmacs // 10**6}M"
            base = median([x["max"] for x in got[("sqlite", 1)]])
            for be, n in configs[1:]:
                xs = got[(be, n)]
                notes = ([f"each daemon on its own segment with its own perfdhcp at 1/{n} "
                          "of the rate"] if n > 1 else [])
                if any(x["gen_bound"] for x in xs):
                    notes.append("generator-bound in "
                                 f"{sum(x['gen_bound'] for x in xs)} of {len(xs)} rounds")
                if any(x["died"] for x in xs):
                    notes.append("a daemon DIED during the test")
                cc = [max((s for s in x["steps"] if s["loss"] <= 0.01 and s.get("cpu_us")),
                          key=lambda s: s["offered"], default=None) for x in xs]
                cpu = median([c["cpu_us"] for c in cc if c])
                if cpu:
                    notes.append(f"{cpu:,.1f} µs CPU per offer at the best rate (daemons + "
                                 "database)")
                b.row(f"[pg] ProxyDHCP max rate ≤1% unanswered, {label} MACs, {n} "
                      f"daemon{'s' if n > 1 else ''} on PostgreSQL [offers/s] vs one on SQLite",
                      median([x["max"] for x in xs]), base, notes="; ".join(notes))
        b.notes.append(f"PostgreSQL section: {pg.version}, a cluster of the bench's own on a "
                       "Unix socket with durable defaults, pinned with the daemons to the "
                       "server CPU; a new database for each daemon start (three daemons share "
                       "one); ProxyDHCP rates "
                       f"{', '.join(f'{r:,}' for r in rates)}/s in all, split over the daemons.")
    finally:
        pg.stop()


# =============================================================================================
# 3. TFTP: one client, 64 MiB; 200 concurrent clients x 16 MiB.

BLK = 1468


def section_ui(b):
    """The web UI over the seeded inventory (100,000 installed + 10,000 enrolled machines in
    the full run): server time per page, measured from the client one request at a time."""
    cfg = b.cfg
    seed_dir, out = seeded(b)
    macs = out.joinpath("macs-installed.txt").read_text().split()
    mac = macs[len(macs) // 2].replace("-", ":")
    total = cfg["seed_installed"] + cfg["seed_enrolled"]
    data = b.work / "ui-run"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(seed_dir, data, symlinks=True)
    d = b.provision("provision-ui", data, extra=LOOPBACK_CLAIMS)
    host, port = ADMIN.split(":")
    mid = max(1, total // 100)
    pages = [
        ("machines, first page (by MAC)", "/ui/machines"),
        (f"machines, page {mid:,} (offset {(mid - 1) * 50:,})", f"/ui/machines?page={mid}"),
        ("machines, last seen first", "/ui/machines?sort=last_seen&dir=desc"),
        ("machines, state enrolled", "/ui/machines?state=enrolled"),
        ("search: a whole MAC (hyphen form)", f"/ui/machines?q={mac.replace(':', '-')}"),
        ("search: 6 hex digits of a MAC", f"/ui/machines?q={mac.replace(':', '')[6:]}"),
        ("search: an IP address", "/ui/machines?q=127.0.0.1"),
        ("search: a label key=value", "/ui/machines?q=rack%3Dr7"),
        ("search: hostname text", "/ui/machines?q=node-4242"),
        ("dashboard", "/ui/"),
        ("machine page", f"/ui/machines/{mac}"),
    ]
    saved = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {int(b.cli_cpu)})
        token = (data / "admin-token").read_text().strip()
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        c.request("POST", "/ui/login", body=f"token={token}",
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
        r = c.getresponse()
        r.read()
        cookie = (r.getheader("set-cookie") or "").split(";", 1)[0]
        if r.status != 303 or not cookie:
            raise BenchError(f"UI login: HTTP {r.status}")
        weights = {}
        for f in ["htmx.min.js", "ui.js", "ui.css"]:
            c.request("GET", f"/ui/static/{f}", headers={"Accept-Encoding": "gzip"})
            r = c.getresponse()
            weights[f] = len(r.read())
        n = cfg["ui_requests"]
        for label, path in pages:
            times, size = [], 0
            for i in range(n + 2):
                t0 = time.perf_counter()
                c.request("GET", path, headers={"Cookie": cookie})
                r = c.getresponse()
                body = r.read()
                dt = time.perf_counter() - t0
                if r.status != 200:
                    raise BenchError(f"UI {path}: HTTP {r.status}: {body[:200]!r}")
                if i >= 2:  # the first two warm the page cache and the statements
                    times.append(dt * 1000)
                size = len(body)
            times.sort()
            p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
            b.row(f"UI, {total:,} machines: {label} [ms]", median(times), None,
                  fmt="{:,.1f}", notes=f"p95 {p95:,.1f} ms; page {size / 1024:,.1f} KiB "
                  f"(HTML, uncompressed); {n} requests")
        c.close()
    finally:
        os.sched_setaffinity(0, saved)
        d.stop()
    b.notes.append("UI: one keep-alive connection, one request at a time, after login; time "
                   "from request to the last byte of the page. First-visit weight besides the "
                   f"page: htmx {weights['htmx.min.js'] / 1024:,.1f} KiB gzipped, ui.js "
                   f"{weights['ui.js'] / 1024:,.1f} KiB, ui.css {weights['ui.css'] / 1024:,.1f} "
                   "KiB (cached for a day, versioned URLs).")


def write_random(path, nbytes):
    with open(path, "wb") as f:
        left = nbytes
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
    os.chmod(path, 0o644)


def tftp_server(b, name, root, listen="127.0.0.1"):
    if name == "provision":
        d = b.provision("provision-tftp", b.fresh("tftp-data"), tftp=f"{listen}:69",
                        extra=["--tftp-root", root])
        return d
    if name == "atftpd":
        wd = b.fresh("atftpd")
        d = Daemon("atftpd", b.pin_s() + [
            "atftpd", "--daemon", "--no-fork", "--user", "root", "--group", "root", "-m", 256,
            "--logfile", wd / "atftpd.log", "--bind-address", listen, "--port", 69, root],
            b.work)
    elif name == "tftpd-hpa":
        d = Daemon("tftpd-hpa", b.pin_s() + [
            b.in_tftpd, "-L", "-a", f"{listen}:69", "-u", "root", "-s", root], b.work)
    elif name == "dnsmasq":
        wd = b.fresh("dnsmasq-tftp")
        d = Daemon("dnsmasq-tftp", b.pin_s() + [
            "dnsmasq", "-k", "--conf-file=/dev/null", "--port=0", "--pid-file=", "--user=root",
            f"--log-facility={wd}/dnsmasq.log", "--enable-tftp", f"--tftp-root={root}",
            "--tftp-max=256", f"--listen-address={listen}", "--bind-interfaces"], b.work)
    else:
        raise ValueError(name)
    return b.wait_udp(d, 69)


def atftp_argv(b, f, w, host="127.0.0.1"):
    opts = ["--option", f"blksize {BLK}"]
    if w > 1:
        opts += ["--option", f"windowsize {w}"]
    return b.pin_c() + ["atftp", *opts, "-g", "-r", f, "-l", "/dev/null", host]


def negotiated_window(b, w):
    """The windowsize the running server acknowledges (OACK) for a request of `w`."""
    r = run(["atftp", "--trace", "--option", f"blksize {BLK}", "--option", f"windowsize {w}",
             "-g", "-r", "probe", "-l", "/dev/null", "127.0.0.1"], timeout=30, check=False)
    m = re.search(r"received OACK <([^>]*)>", r.stdout + r.stderr)
    if not m:
        return None
    mw = re.search(r"windowsize:\s*(\d+)", m.group(1))
    return int(mw.group(1)) if mw else None


def section_tftp(b):
    cfg = b.cfg
    root = b.fresh("tftp-root")
    os.chmod(root, 0o755)
    single = cfg["tftp_single_mib"] << 20
    conc = cfg["tftp_conc_mib"] << 20
    write_random(root / "single", single)
    write_random(root / "conc", conc)
    write_random(root / "probe", 5000)
    servers = ["provision", "atftpd", "tftpd-hpa", "dnsmasq"]
    if not b.in_tftpd:
        servers.remove("tftpd-hpa")
        b.notes.append("tftpd-hpa: in.tftpd not found (bench/peers.sh fetches it); rows n/a.")
    wins = cfg["tftp_windows"]
    speed = {(s, w): [] for s in servers for w in wins}
    unsupported = {}
    failures = {}
    for rnd in range(cfg["rounds"]):
        for s in servers:
            log(f"tftp: single client, round {rnd + 1}, {s}")
            d = tftp_server(b, s, root)
            try:
                for w in wins:
                    if w > 1:
                        got = negotiated_window(b, w)
                        if got != w:
                            unsupported[(s, w)] = got
                            continue
                    t0 = time.monotonic()
                    r = run(atftp_argv(b, "single", w), timeout=300, check=False)
                    dt = time.monotonic() - t0
                    if r.returncode != 0:
                        failures.setdefault((s, w), []).append((r.stdout + r.stderr)[-200:])
                        log(f"  {s} w{w}: FAILED: {(r.stdout + r.stderr)[-200:]}")
                        continue
                    speed[(s, w)].append(mb(single) / dt)
                    log(f"  {s} w{w}: {mb(single) / dt:,.1f} MB/s")
            finally:
                d.stop()

    def fig(s, w):
        if (s, w) in unsupported:
            return "n/a"
        return median(speed[(s, w)])

    for w in wins:
        for peer in [p for p in servers if p != "provision"]:
            pv, qv = fig("provision", w), fig(peer, w)
            if w > 1 and qv == "n/a" and peer != "atftpd":
                if w == wins[1]:
                    b.row(f"TFTP 1 client {cfg['tftp_single_mib']} MiB blksize {BLK} w>1 "
                          f"[MB/s] vs {peer}", "—", "n/a", ratio="—",
                          notes=f"{peer} does not negotiate windowsize (no windowsize in its OACK)")
                continue
            notes = []
            for s in ("provision", peer):
                if failures.get((s, w)):
                    notes.append(f"{s}: {len(failures[(s, w)])} failed downloads: "
                                 f"{failures[(s, w)][0]!r}")
            b.row(f"TFTP 1 client {cfg['tftp_single_mib']} MiB blksize {BLK} windowsize {w} "
                  f"[MB/s] vs {peer}", pv, qv, fmt="{:,.1f}", notes="; ".join(notes))

    # Concurrent clients.
    n = cfg["tftp_conc_clients"]
    blocks = n * (conc // BLK + 1)
    conc_servers = [s for s in ("provision", "atftpd", "dnsmasq")]
    combos = [(s, w) for w in cfg["tftp_conc_windows"] for s in conc_servers
              if w == 1 or (s, w) not in unsupported]
    cres = {c: [] for c in combos}
    for rnd in range(cfg["rounds"]):
        for s, w in combos:
            log(f"tftp: {n} clients x {cfg['tftp_conc_mib']} MiB, round {rnd + 1}, {s} w{w}")
            d = tftp_server(b, s, root)
            try:
                cpu0 = d.cpu()
                _, outs = run_many([atftp_argv(b, "conc", w)] * n, timeout=600)
                cpu1 = d.cpu()
                hwm = d.kb("VmHWM")
                alive = d.alive()
            finally:
                d.stop()
            bad = [o for rc, o in outs if rc != 0]
            ok = n - len(bad)
            cres[(s, w)].append(dict(mbs=mb(ok * conc) / wall, hwm=hwm / 1024,
                                     cpu_blk=(cpu1 - cpu0) / blocks * 1e6, bad=len(bad),
                                     first=bad[0][-160:] if bad else "", alive=alive,
                                     busy=(cpu1 - cpu0) / wall))
            log(f"  {s} w{w}: {mb(ok * conc) / wall:,.1f} MB/s aggregate, {len(bad)} failed, "
                f"VmHWM {hwm / 1024:.1f} MiB, {(cpu1 - cpu0) / blocks * 1e6:.2f} µs CPU/block, "
                f"server busy {(cpu1 - cpu0) / wall:.0%}")
    for w in cfg["tftp_conc_windows"]:
        if ("provision", w) not in cres:
            continue
        p = cres[("provision", w)]
        for peer in ("atftpd", "dnsmasq"):
            q = cres.get((peer, w))
            if q is None:
                if w > 1:
                    b.row(f"TFTP {n} clients × {cfg['tftp_conc_mib']} MiB windowsize {w} "
                          f"aggregate [MB/s] vs {peer}", median([x["mbs"] for x in p]), "n/a",
                          fmt="{:,.1f}", ratio="—", notes=f"{peer} has no windowsize")
                continue

            def fails(xs, who):
                f = sum(x["bad"] for x in xs)
                died = any(not x["alive"] for x in xs)
                return (f"{who}: {f} failed transfers ({next(x['first'] for x in xs if x['bad'])!r})"
                        if f else "") + (f" {who} DIED" if died else "")
            notes = [x for x in (fails(p, "provision"), fails(q, peer)) if x]
            notes.append(f"server busy {median([x['busy'] for x in p]):.0%} vs "
                         f"{median([x['busy'] for x in q]):.0%}")
            b.row(f"TFTP {n} clients × {cfg['tftp_conc_mib']} MiB windowsize {w} aggregate "
                  f"[MB/s] vs {peer}", median([x["mbs"] for x in p]),
                  median([x["mbs"] for x in q]), fmt="{:,.1f}", notes="; ".join(notes))
            b.row(f"TFTP {n} clients windowsize {w} server peak RSS (VmHWM) [MiB] vs {peer}",
                  median([x["hwm"] for x in p]), median([x["hwm"] for x in q]), fmt="{:,.1f}")
            b.row(f"TFTP {n} clients windowsize {w} server CPU per {BLK}-byte block [µs] "
                  f"vs {peer}", median([x["cpu_blk"] for x in p]),
                  median([x["cpu_blk"] for x in q]), fmt="{:,.2f}")
    b.notes.append("TFTP runs on loopback (127.0.0.1) inside the bench namespace; all clients "
                   "share 127.0.0.1 and differ by port. Client: atftp (windowsize via "
                   "--option); w1 sends no windowsize option, as PXE firmware does.")


# =============================================================================================
# 4. HTTP boot storm from /assets/ vs nginx.


def section_storm(b):
    cfg = b.cfg
    assets = b.fresh("assets")
    (assets / "storm").mkdir()
    script = (b"#!ipxe\n# a small per-boot script, as an installer's first fetch\n"
              b"kernel ${base}/assets/storm/kernel console=ttyS0 ip=dhcp\n"
              b"initrd ${base}/assets/storm/initrd\nboot\n") * 4
    (assets / "storm" / "boot.ipxe").write_bytes(script)
    write_random(assets / "storm" / "kernel", cfg["storm_mib"][0] << 20)
    write_random(assets / "storm" / "initrd", cfg["storm_mib"][1] << 20)
    files = ["boot.ipxe", "kernel", "initrd"]
    sizes = [len(script), cfg["storm_mib"][0] << 20, cfg["storm_mib"][1] << 20]
    n = cfg["storm_clients"]
    total = n * sum(sizes)
    www = b.fresh("www-storm")
    argv = b.pin_c() + ["curl", "-sS", "--noproxy", "*", "--max-time", "300",
                        "-w", "%{http_code} %{size_download}\\n"]
    for f in files:
        argv += ["-o", "/dev/null", f"http://127.0.0.1:8080/assets/storm/{f}"]
    res = {"provision": [], "nginx": []}
    for rnd in range(cfg["rounds"]):
        for s in ("provision", "nginx"):
            log(f"storm: {n} clients x ({' + '.join(files)}), round {rnd + 1}, {s}")
            if s == "provision":
                d = b.provision("provision-storm", b.fresh("storm-data"),
                                extra=["--assets-dir", assets])
            else:
                d = b.nginx(www, assets=assets)
            try:
                time.sleep(1)
                idle = d.kb("VmRSS")
                if s == "provision":
                    b.idle_rss.append(idle)
                cpu0 = d.cpu()
                _, outs = run_many([argv] * n, timeout=600)
                cpu1 = d.cpu()
                rss, hwm, alive = d.kb("VmRSS"), d.kb("VmHWM"), d.alive()
            finally:
                d.stop()
            bad = []
            for rc, o in outs:
                lines = o.split("\n")
                got = [tuple(x.split()) for x in lines if re.match(r"^\d{3} \d+$", x.strip())]
                if rc != 0 or len(got) != 3 or any(c != "200" or int(z) != sz
                                                   for (c, z), sz in zip(got, sizes)):
                    bad.append(f"rc {rc}: {o.strip()[-120:]!r}")
            cpu = cpu1 - cpu0
            res[s].append(dict(wall=wall, cpu_gb=cpu / (total / 1e9), busy=cpu / wall, bad=bad,
                               rss=rss / 1024, hwm=hwm / 1024, idle=idle / 1024, alive=alive))
            log(f"  {s}: {wall:.2f} s wall, {cpu / (total / 1e9):.3f} CPU s/GB, busy "
                f"{cpu / wall:.0%}, {len(bad)} failed clients, RSS {rss / 1024:.1f} MiB "
                f"(peak {hwm / 1024:.1f})")
    p, q = res["provision"], res["nginx"]

    def fails():
        out = []
        for who, xs in (("provision", p), ("nginx", q)):
            nb = sum(len(x["bad"]) for x in xs)
            if nb:
                out.append(f"{who}: {nb} failed clients, e.g. {next(x['bad'][0] for x in xs if x['bad'])}")
            if any(not x["alive"] for x in xs):
                out.append(f"{who} DIED")
        return out
    desc = f"{n} clients × (script + {cfg['storm_mib'][0]} + {cfg['storm_mib'][1]} MiB)"
    b.row(f"HTTP boot storm {desc} wall time [s] vs nginx", median([x["wall"] for x in p]),
          median([x["wall"] for x in q]), fmt="{:,.2f}",
          notes="; ".join(fails() + [f"{total / 1e9:.1f} GB per run; curl, 1 keep-alive "
                                     "connection per client"]))
    b.row("HTTP boot storm server CPU [s/GB] vs nginx", median([x["cpu_gb"] for x in p]),
          median([x["cpu_gb"] for x in q]), fmt="{:,.3f}", notes="nginx: sendfile on")
    pb, qb = median([x["busy"] for x in p]), median([x["busy"] for x in q])
    b.row("HTTP boot storm server busy [%] vs nginx", pb * 100, qb * 100, fmt="{:,.0f}",
          notes="server CPU time / wall time; < 100 % on both means the client side "
                "(one CPU of curl) is the limit" if max(pb, qb) < 0.9 else "")
    b.row("RSS after the HTTP boot storm [MiB] (VmRSS; peak VmHWM in notes) vs nginx",
          median([x["rss"] for x in p]), median([x["rss"] for x in q]), fmt="{:,.1f}",
          notes=f"peak {median([x['hwm'] for x in p]):,.1f} vs {median([x['hwm'] for x in q]):,.1f} MiB;"
                f" idle before: {median([x['idle'] for x in p]):,.1f} vs "
                f"{median([x['idle'] for x in q]):,.1f} MiB")


# =============================================================================================
# 5. End-to-end storm: N enrolled machines DHCP -> TFTP -> iPXE -> config -> phone-home.


def section_e2e(b):
    cfg = b.cfg
    n = cfg["e2e_machines"]
    key = host_key(b)
    root = b.fresh("e2e-tftp")
    os.chmod(root, 0o755)
    src = Path("/usr/lib/ipxe/undionly.kpxe")
    shutil.copyfile(src, root / "undionly.kpxe")
    os.chmod(root / "undionly.kpxe", 0o644)
    size = (root / "undionly.kpxe").stat().st_size
    # One address per simulated machine on the client side (as the site's DHCP server would
    # have handed out): 10.202.1.0, 10.202.1.1, ... (see MACHINE_NET)
    addrs = [f"10.202.{1 + i // 256}.{i % 256}" for i in range(n)]
    new = [x for x in addrs if x not in ADDED_ADDRS]
    if new:
        batch = "".join(f"addr add {x}/32 dev {VC}\n" for x in new)
        r = subprocess.run(["ip", "-n", NSC, "-batch", "-"], input=batch, text=True,
                           capture_output=True, timeout=60)
        if r.returncode != 0:
            raise BenchError(f"adding client addresses: {r.stderr[-300:]}")
        ADDED_ADDRS.extend(new)
    addr_file = b.work / "e2e-addrs.txt"
    addr_file.write_text("".join(x + "\n" for x in addrs))
    results = []
    for rnd in range(cfg["rounds"]):
        log(f"e2e: {n} machines, round {rnd + 1}")
        data = b.fresh("e2e-data")
        d = b.provision("provision-e2e", data, http=f"{SRV_IP}:8080", tftp=f"{SRV_IP}:69",
                        dhcp="0.0.0.0", extra=["--dhcp-interface", VS, "--tftp-root", root])
        try:
            time.sleep(1)
            b.idle_rss.append(d.kb("VmRSS"))
            out = b.fresh("e2e-macs")
            run(b.pin_c() + [PY, HERE / "seed.py", "--url", f"http://{SRV_IP}:8080",
                             "--admin-url", f"http://{ADMIN}",
                             "--token-file", data / "admin-token", "--enrolled", n,
                             "--enrolled-prefix", "0x02", "--out", out], timeout=300)
            s0, c0, cpu0 = udp_stats(), udp_stats(NSC), d.cpu()
            r = run(in_client_ns(b.pin_c() + [
                PY, HERE / "storm.py", "--macs", out / "macs-enrolled.txt", "--pubkey",
                f"{key}.pub", "--iface", VC, "--addrs", addr_file, "--tftp-size", size,
                "--timeout", 240]), timeout=300, check=False)
            cpu1, s1, c1 = d.cpu(), udp_stats(), udp_stats(NSC)
            try:
                j = json.loads(r.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                raise BenchError(f"storm.py printed no result (rc {r.returncode}): "
                                 f"{(r.stdout + r.stderr)[-400:]}") from None
            token = (data / "admin-token").read_text().strip()
            st, body = http_get(f"http://{ADMIN}/api/v1/machines?state=installed",
                                timeout=30, headers={"Authorization": f"Bearer {token}"})
            j["installed_api"] = len(json.loads(body)) if st == 200 else f"HTTP {st}"
            j["rss"], j["hwm"], j["alive"] = d.kb("VmRSS"), d.kb("VmHWM"), d.alive()
            j["srv_drop"] = s1["RcvbufErrors"] - s0["RcvbufErrors"]
            j["cli_drop"] = c1["RcvbufErrors"] - c0["RcvbufErrors"]
            j["cpu"] = cpu1 - cpu0
            results.append(j)
        finally:
            d.stop()
        try:
            c = sqlite3.connect(f"file:{data / 'provision.db'}?mode=ro", uri=True)
            j["tftp_events"], j["tftp_macs"] = c.execute(
                "select count(*), count(distinct mac) from events where kind = 'tftp_served'"
            ).fetchone()
            c.close()
        except sqlite3.Error as e:
            j["tftp_events"], j["tftp_macs"] = f"? ({e})", "?"
        log(f"  {j['completed']}/{n} completed in {j['last_done_s']} s (wall {j['wall_s']} s),"
            f" {j['failed']} failed {j['failure_kinds']}, API says {j['installed_api']} "
            f"installed, DHCP retransmits {j['dhcp_retransmits']}, server RcvbufErrors "
            f"{j['srv_drop']}, first failures {j['first_failures'][:2]}, tftp_served events "
            f"{j['tftp_events']} on {j['tftp_macs']} distinct MACs")
    done_s = median([x["last_done_s"] for x in results])
    fails = sum(x["failed"] for x in results)
    first = next((x["first_failures"] for x in results if x["first_failures"]), [])
    kinds = {}
    for x in results:
        for k, v in x["failure_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    b.row(f"End-to-end storm, {n} machines: time until the last one phoned home [s]", done_s,
          None, fmt="{:,.2f}",
          notes=f"median of {len(results)}; per machine p50 {median([x['p50_s'] for x in results]):.2f} s, "
                f"p99 {median([x['p99_s'] for x in results]):.2f} s; DHCP retransmits "
                f"{median([x['dhcp_retransmits'] for x in results]):,.0f}, server RcvbufErrors "
                f"{median([x['srv_drop'] for x in results]):,.0f}; installed per API "
                f"{[x['installed_api'] for x in results]}; server CPU "
                f"{median([x['cpu'] for x in results]):.2f} s; tftp_served events tied to "
                f"{results[-1]['tftp_macs']} distinct MACs of {n} (last round)")
    b.row(f"End-to-end storm, {n} machines: failures [machines, all rounds]", fails, None,
          notes=(f"by kind {kinds}; first: {'; '.join(first[:3])}" if fails else "none") +
                ("; provision DIED" if any(not x["alive"] for x in results) else ""))
    b.row("RSS after the end-to-end storm [MiB] (VmRSS; peak VmHWM in notes)",
          median([x["rss"] / 1024 for x in results]), None, fmt="{:,.1f}",
          notes=f"peak {median([x['hwm'] / 1024 for x in results]):,.1f} MiB")
    b.notes.append(f"End-to-end storm: {n} simulated BIOS machines start at once in the client "
                   "namespace (veth to the server namespace): DISCOVER (PXE) -> TFTP "
                   "undionly.kpxe (blksize 1468, w1) -> DISCOVER (iPXE) -> /boot.ipxe -> /ipxe -> "
                   "config -> phone-home; each machine has its own client address and broadcasts the DHCPREQUEST "
                   "for it (ProxyDHCP learns IP -> MAC from it); DISCOVER retransmitted after 4, 8, "
                   "16, 32 s (±1 s), then the machine fails.")


FLEET_RACKS = 20


def fleet_files(work, n):
    """A YAML inventory of n machines in FLEET_RACKS racks (a group per rack gives the profile
    and a gateway; each machine has a hostname, serial, rack label and its own reservation)
    and a CSV of the same machines with every hostname changed: what an operator's
    spreadsheet of a delivery looks like, then a renaming."""
    y = ["groups:"]
    for r in range(FLEET_RACKS):
        y += [f"  - name: rack{r:02}", f"    selector: {{rack: '{r:02}'}}",
              "    profile: debian-12", f"    vars: {{gateway: 10.{r}.0.1}}"]
    y.append("machines:")
    rows = ["mac,hostname,serial,labels.rack,vars.ip"]
    per_rack = -(-n // FLEET_RACKS)
    for i in range(n):
        r = i // per_rack
        mac = f"52:54:01:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        ip = f"10.{100 + (i >> 8)}.{i & 255}.10"
        y += [f"  - mac: {mac}", f"    hostname: r{r:02}n{i % per_rack:04}",
              f"    serial: SN{i:06}", f"    labels: {{rack: '{r:02}'}}", f"    vars: {{ip: {ip}}}"]
        rows.append(f"{mac},rack{r:02}-{i % per_rack:04},SN{i:06},{r:02},{ip}")
    yaml_path, csv_path = work / "fleet.yaml", work / "fleet-renamed.csv"
    yaml_path.write_text("\n".join(y) + "\n")
    csv_path.write_text("\n".join(rows) + "\n")
    return yaml_path, csv_path


def measured(argv, env, timeout):
    """Runs argv; (wall seconds, stdout, stderr); a failure is a BenchError."""
    t0 = time.monotonic()
    p = subprocess.Popen([str(a) for a in argv], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise BenchError(f"{argv[2:]} took over {timeout} s")
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise BenchError(f"{argv[2:]} failed ({p.returncode}): {err.strip()[-300:]}")
    return wall, out, err


def section_fleet(b):
    """A 10,000-machine inventory file (point 5 of the fleet issue): `provision apply` of it
    (dry run, the apply itself in one transaction, again with nothing to change), a CSV that
    renames every machine, `export`, and `machines list` of all of them. Wall time of each
    CLI command; peak RSS of the CLI (GNU time), and the daemon's RSS before the command, its
    peak during it (VmHWM, reset just before through /proc/PID/clear_refs) and its RSS after.
    No peer has a declarative inventory to
    compare with: figures only."""
    n = b.cfg["fleet_machines"]
    yaml_path, csv_path = fleet_files(b.work, n)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISION_")}
    env["PROVISION_URL"] = f"http://{ADMIN}"
    steps = [
        (f"apply --dry-run, {n:,} machines to create [s]", ["apply", "-f", yaml_path, "--dry-run"]),
        (f"apply, {n:,} machines created in one transaction [s]", ["apply", "-f", yaml_path]),
        ("apply the same file again: no changes [s]", ["apply", "-f", yaml_path]),
        (f"apply a CSV renaming all {n:,} [s]", ["apply", "-f", csv_path]),
        ("export (YAML) [s]", ["export", "-o", b.work / "fleet-export.yaml"]),
        (f"machines list, all {n:,} [s]", ["machines", "list", "--limit", n * 2]),
    ]
    results = {name: [] for name, _ in steps}
    for rnd in range(b.cfg["rounds"]):
        data = b.fresh("fleet-data")
        d = b.provision("provision-fleet", data)
        try:
            env["PROVISION_TOKEN_FILE"] = str(data / "admin-token")
            for name, args in steps:
                with open(f"/proc/{d.pid}/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                before = d.kb("VmRSS")
                argv = b.pin_c() + ["/usr/bin/time", "-f", "maxrss_kib=%M", b.bin, *args]
                wall, out, err = measured(argv, env, timeout=600)
                cli_kib = int(re.findall(r"maxrss_kib=(\d+)", err)[-1])
                results[name].append((wall, before, d.kb("VmHWM"), d.kb("VmRSS"), cli_kib))
                log(f"fleet round {rnd + 1}: {name}: {wall:.2f} s, daemon RSS "
                    f"{before / 1024:.0f} → peak {d.kb('VmHWM') / 1024:.0f} MiB, CLI peak "
                    f"{cli_kib / 1024:.0f} MiB; {(out.strip().splitlines() or [''])[-1][:120]}")
        finally:
            d.stop()
    for name, _ in steps:
        rs = results[name]
        mib = [f"{median([r[i] for r in rs]) / 1024:,.0f}" for i in range(1, 5)]
        b.row(f"[fleet] {name}", median([r[0] for r in rs]), None, ratio=None, fmt="{:,.2f}",
              notes=f"daemon RSS {mib[0]} → peak {mib[1]} → after {mib[2]} MiB; CLI peak "
                    f"{mib[3]} MiB (medians of {len(rs)})")
    b.notes.append(f"Fleet: {yaml_path.stat().st_size / 1e6:.1f} MB YAML of {n:,} machines in "
                   f"{FLEET_RACKS} rack groups; the daemon starts each round on an empty data dir.")


def section_rss(b):
    if not b.idle_rss:
        d = b.provision("provision-idle", b.fresh("idle-data"), http=f"{SRV_IP}:8080",
                        tftp=f"{SRV_IP}:69", dhcp="0.0.0.0", extra=["--dhcp-interface", VS])
        try:
            time.sleep(1)
            b.idle_rss.append(d.kb("VmRSS"))
        finally:
            d.stop()
    b.row("provision RSS idle, 1 s after start [MiB] (VmRSS)", median(b.idle_rss) / 1024, None,
          fmt="{:,.1f}", notes=f"fresh data dir; median of {len(b.idle_rss)} starts")


# =============================================================================================
# Main.


def machine_info():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    return f"nproc {os.cpu_count()}, {model}, kernel {os.uname().release}, {mem:,} MiB RAM"


def git_commit():
    r = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"],
                       capture_output=True, text=True)
    c = r.stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no",
                            "--", ".", ":!bench/RESULTS.md"],
                           capture_output=True, text=True).stdout.strip()
    return c + ("+dirty" if dirty else "")


def versions(b):
    def first(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            line = ((r.stdout or "") + (r.stderr or "")).strip().splitlines()[0]
            return re.sub(r"\s+", " ", re.sub(r"(?i)copyright.*|\(x86_64.*", "", line)).strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    v = {
        "dnsmasq": first(["dnsmasq", "--version"]),
        "nginx": first(["nginx", "-v"]),
        "atftpd": first(["atftpd", "-V"]),
        "tftpd-hpa": first([b.in_tftpd, "-V"]) if b.in_tftpd else "not found",
        "perfdhcp": first(["perfdhcp", "-v"]),
        "wrk": first(["wrk", "-v"]),
        "atftp": first(["atftp", "--version"]),
        "curl": first(["curl", "--version"]),
    }
    return "; ".join(f"{k}: {x}" for k, x in v.items())


def find_in_tftpd():
    cands = [REPO / "target/bench-peers/tftpd-hpa/usr/sbin/in.tftpd", Path("/usr/sbin/in.tftpd")]
    for c in cands:
        if c.exists():
            r = subprocess.run([c, "-V"], capture_output=True, text=True)
            if "tftp-hpa" in (r.stdout + r.stderr):
                return str(c)
    return None


def table(rows):
    head = ("work", "provision", "peer", "ratio", "notes")
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 3 + ["---"]) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(x).replace("|", "/") for x in r) + " |")
    return "\n".join(out)


def command_line():
    """`make bench VAR=...` when make ran us (it exports its command-line variables), else
    this script's own command line."""
    own = " ".join(shlex.quote(x) for x in ["bench/run.py"] + sys.argv[1:])
    if os.environ.get("MAKELEVEL"):
        vs = [f"{k}={shlex.quote(os.environ[k])}" for k in
              ("BENCH_QUICK", "BENCH_ONLY", "PROVISION_BIN", "BENCH_NOTE") if os.environ.get(k)]
        return " ".join(["make bench"] + vs) + f" (ran {own})"
    return own


def on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, small sizes, 1 round")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--bin", default=os.environ.get("PROVISION_BIN") or "",
                    help="provision binary [PROVISION_BIN, else target/release/provision]")
    ap.add_argument("--rounds", type=int, help="A/B rounds (default 3, quick 1)")
    ap.add_argument("--machines", type=int, help="installed machines for /ipxe (default 100000)")
    ap.add_argument("--e2e-machines", type=int, help="machines in the end-to-end storm (500)")
    ap.add_argument("--tftp-conc-clients", type=int, help="concurrent TFTP clients (200)")
    ap.add_argument("--tftp-conc-mib", type=int, help="MiB per concurrent TFTP client (4)")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--no-append", action="store_true", help="print the table only")
    ap.add_argument("--note", action="append", default=[],
                    help="a note for RESULTS.md [also BENCH_NOTE]")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    if os.environ.get("BENCH_NOTE"):
        a.note.insert(0, os.environ["BENCH_NOTE"])

    if os.geteuid() != 0:
        sys.exit("bench/run.py needs root: namespaces, veth pairs, ports 67 and 69.")
    if len(os.sched_getaffinity(0) | {a.server_cpu, a.client_cpu}) < 2 or a.server_cpu == a.client_cpu:
        sys.exit("bench/run.py needs two CPUs (--server-cpu and --client-cpu differ).")
    if os.cpu_count() < 2:
        sys.exit("bench/run.py needs at least 2 CPUs.")
    only = [s for s in a.only.replace(" ", "").split(",") if s] or SECTIONS
    unknown = set(only) - set(SECTIONS)
    if unknown:
        sys.exit(f"--only: unknown section(s) {sorted(unknown)}; known: {','.join(SECTIONS)}")
    cfg = dict(QUICK if a.quick else FULL)
    for k, v in (("rounds", a.rounds), ("seed_installed", a.machines),
                 ("e2e_machines", a.e2e_machines), ("tftp_conc_clients", a.tftp_conc_clients),
                 ("tftp_conc_mib", a.tftp_conc_mib)):
        if v:
            cfg[k] = v
    a.bin = str(Path(a.bin or REPO / "target/release/provision").resolve())
    if not os.access(a.bin, os.X_OK):
        sys.exit(f"no provision binary at {a.bin}: cargo build --release --locked, or --bin PATH")
    missing = [t for t in ("dnsmasq", "atftpd", "nginx", "perfdhcp", "wrk", "atftp", "curl",
                           "ip", "taskset", "ssh-keygen") if not shutil.which(t)]
    if missing:
        sys.exit(f"missing tools {missing}: run `make bench` (it installs them) or bash bench/peers.sh")
    for p in (Path("/usr/lib/ipxe/undionly.kpxe"),):
        if not p.exists():
            sys.exit(f"missing {p}: apt-get install ipxe")

    # The orchestrator itself runs on the client CPU, away from the server's.
    os.sched_setaffinity(0, {a.client_cpu})
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    work = Path(tempfile.mkdtemp(prefix="provision-bench-", dir="/var/tmp"))
    b = Bench(a, cfg, work)
    b.in_tftpd = find_in_tftpd()
    started = datetime.datetime.now(datetime.timezone.utc)
    commit = git_commit()
    load0 = open("/proc/loadavg").read().split()[:3]
    interrupted = False
    log(f"work dir {work}; binary {a.bin}; sections {','.join(only)}; "
        f"{'quick' if a.quick else 'full'} mode, {cfg['rounds']} round(s)")
    try:
        make_namespaces()
        for s in SECTIONS:
            if s not in only:
                continue
            t = time.monotonic()
            try:
                globals()[f"section_{s}"](b)
            except BenchError as e:
                b.errors.append(f"{s}: {e}")
                b.row(f"[{s}] section failed", "FAILED", None, notes=str(e)[:300])
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a broken section must not hide the others
                traceback.print_exc()
                b.errors.append(f"{s}: {type(e).__name__}: {e}")
                b.row(f"[{s}] section failed", "FAILED", None, notes=f"{type(e).__name__}: {e}"[:300])
            finally:
                for pid, (p, name) in list(LIVE.items()):
                    log(f"stopping leftover {name} (pid {pid})")
                    stop(p)
            log(f"section {s} took {time.monotonic() - t:.0f} s")
    except KeyboardInterrupt as e:
        interrupted = True
        log(f"interrupted ({e or 'Ctrl-C'}); cleaning up")
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        for pid, (p, name) in list(LIVE.items()):
            log(f"stopping {name} (pid {pid})")
            try:
                stop(p, grace=5)
            except Exception as e:  # noqa: BLE001
                log(f"could not stop pid {pid}: {e}")
        delete_namespaces()
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130

    elapsed = time.monotonic() - T0
    load1 = open("/proc/loadavg").read().split()[:3]
    tab = table(b.rows)
    print(tab)
    cmd = command_line()
    binfo = a.bin
    if Path(a.bin) != (REPO / "target/release/provision").resolve():
        binfo += f" (sha256 {hashlib.sha256(Path(a.bin).read_bytes()).hexdigest()[:16]})"
    notes = list(a.note) + [
        f"Mode: {'quick' if a.quick else 'full'}, {cfg['rounds']} round(s) per A/B pair, "
        f"sections {','.join(only)}; took {elapsed / 60:.1f} min. Load average at start "
        f"{' '.join(load0)}, at end {' '.join(load1)}.",
        f"Binary: {binfo}. Server pinned to CPU {a.server_cpu}, clients to CPU {a.client_cpu}; "
        "figures are medians over rounds; ratio = provision / peer.",
    ] + b.notes + [f"Peers: {versions(b)}."]
    if b.errors:
        notes.append("Section failures: " + " | ".join(b.errors))
    if not a.no_append:
        with open(a.results, "a") as f:
            f.write(f"\n## {started:%Y-%m-%d %H:%M} UTC — commit {commit} — "
                    f"{machine_info()}\n\n")
            f.write(f"Command: `{cmd}`\n\n{tab}\n\n")
            for n in notes:
                f.write(f"- {n}\n")
        log(f"appended to {a.results}")
    else:
        print("\n".join("- " + n for n in notes))
    return 1 if b.errors else 0


if __name__ == "__main__":
    sys.exit(main())
