//! TFTP interop with the real clients: tftp-hpa (`tftp`) and `atftp` with RFC 2347 options.

use std::os::unix::fs::symlink;
use std::process::Command;

use crate::support::{tool, Daemon};

struct Lab {
    d: Daemon,
    root: std::path::PathBuf,
    _outside: tempfile::TempDir,
    work: tempfile::TempDir,
}

fn lab() -> Lab {
    let outside = tempfile::tempdir().unwrap();
    let root = outside.path().join("tftproot");
    std::fs::create_dir_all(root.join("efi")).unwrap();
    // 1 MiB + 17 bytes of non-repeating data: many blocks, and a short last block.
    let mut x: u32 = 0x1234_5678;
    let data: Vec<u8> = (0..(1 << 20) + 17)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    std::fs::write(root.join("efi/ipxe.efi"), &data).unwrap();
    // The exact multiple of 512 needs a final empty block (RFC 1350).
    std::fs::write(root.join("undionly.kpxe"), vec![7u8; 512 * 40]).unwrap();
    std::fs::write(outside.path().join("secret"), b"do not serve").unwrap();
    symlink(outside.path().join("secret"), root.join("escape")).unwrap();
    let root_s = root.to_str().unwrap().to_string();
    let d = Daemon::start_in(tempfile::tempdir().unwrap(), &["--tftp-root", &root_s]);
    Lab {
        d,
        root,
        _outside: outside,
        work: tempfile::tempdir().unwrap(),
    }
}

impl Lab {
    fn port(&self) -> String {
        self.d.tftp_port.unwrap().to_string()
    }

    fn hpa_get(&self, remote: &str, local: &str) -> std::process::Output {
        Command::new(tool("tftp"))
            .args([
                "-m",
                "binary",
                "127.0.0.1",
                &self.port(),
                "-c",
                "get",
                remote,
            ])
            .arg(self.work.path().join(local))
            .output()
            .unwrap()
    }

    fn atftp_get(&self, remote: &str, local: &str, opts: &[&str]) -> std::process::Output {
        let mut c = Command::new(tool("atftp"));
        for o in opts {
            c.args(["--option", o]);
        }
        c.args(["-g", "-r", remote, "-l"])
            .arg(self.work.path().join(local))
            .args(["127.0.0.1", &self.port()])
            .output()
            .unwrap()
    }

    fn same(&self, remote: &str, local: &str) -> bool {
        std::fs::read(self.root.join(remote)).unwrap()
            == std::fs::read(self.work.path().join(local)).unwrap_or_default()
    }
}

#[test]
fn tftp_hpa_downloads_byte_identical() {
    let l = lab();
    for f in ["efi/ipxe.efi", "undionly.kpxe"] {
        let out = l.hpa_get(f, "got");
        assert!(out.status.success(), "{:?}", out);
        assert!(l.same(f, "got"), "{f} differs");
    }
}

#[test]
fn atftp_negotiates_blksize_tsize_windowsize() {
    let l = lab();
    for opts in [
        vec!["blksize 1468", "tsize 0", "windowsize 8"],
        vec!["blksize 1468"],
        vec!["tsize 0", "timeout 2"],
        vec!["blksize 65464", "windowsize 1000"],
    ] {
        let out = l.atftp_get("efi/ipxe.efi", "got", &opts);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{opts:?}: {err}");
        assert!(l.same("efi/ipxe.efi", "got"), "{opts:?}: file differs");
        std::fs::remove_file(l.work.path().join("got")).unwrap();
    }
    // atftp --trace prints the OACK it got: the caps apply, and tsize is the file size.
    let mut c = Command::new(tool("atftp"));
    c.args([
        "--trace",
        "--option",
        "blksize 65464",
        "--option",
        "windowsize 1000",
        "--option",
        "tsize 0",
    ])
    .args(["-g", "-r", "efi/ipxe.efi", "-l"])
    .arg(l.work.path().join("v"))
    .args(["127.0.0.1", &l.port()]);
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let oack = text
        .lines()
        .find(|l| l.starts_with("received OACK"))
        .unwrap_or_else(|| panic!("no OACK: {text}"));
    // The documented caps (docs/firmware.md), not the code's own constants.
    assert!(oack.contains("blksize: 1468"), "{oack}");
    assert!(oack.contains("windowsize: 16"), "{oack}");
    assert!(
        oack.contains(&format!("tsize: {}", (1u64 << 20) + 17)),
        "{oack}"
    );
    assert!(l.same("efi/ipxe.efi", "v"));
}

#[test]
fn traversal_and_writes_are_refused() {
    let l = lab();
    for bad in [
        "../secret",
        "escape",
        "/etc/passwd",
        "efi/../../secret",
        "..\\secret",
        "missing.efi",
    ] {
        let out = l.atftp_get(bad, "bad", &[]);
        let got = std::fs::read(l.work.path().join("bad")).unwrap_or_default();
        assert!(!out.status.success(), "{bad} was served");
        assert!(got.is_empty(), "{bad}: got {} bytes", got.len());
    }
    // Writes: the server is read-only.
    std::fs::write(l.work.path().join("up"), b"x").unwrap();
    let out = Command::new(tool("atftp"))
        .args(["-p", "-l"])
        .arg(l.work.path().join("up"))
        .args(["-r", "up", "127.0.0.1", &l.port()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!l.root.join("up").exists());
    // Every transfer is an event, refusals included.
    let events = l.d.cli_ok(&["events"]);
    assert!(
        events.contains("tftp_failed: ../secret to 127.0.0.1"),
        "{events}"
    );
    assert!(
        events.contains("leads outside its boot file root"),
        "{events}"
    );
}

#[test]
fn transfers_are_events_and_garbage_does_not_stop_the_server() {
    let l = lab();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = format!("127.0.0.1:{}", l.port());
    for junk in [
        &b""[..],
        b"\x00",
        b"\x00\x01",
        b"\x00\x01no-terminator",
        b"\x00\x09x\x00octet\x00",
        b"\x00\x01a\x00octet\x00blksize\x00",
        &[0xff; 600][..],
    ] {
        sock.send_to(junk, &target).unwrap();
    }
    let out = l.hpa_get("undionly.kpxe", "after-junk");
    assert!(
        out.status.success() && l.same("undionly.kpxe", "after-junk"),
        "{out:?}"
    );
    // The transfer's event is recorded once the transfer ends.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let events = l.d.cli_ok(&["events"]);
        if events.contains(&format!(
            "tftp_served: undionly.kpxe ({} bytes) to 127.0.0.1",
            512 * 40
        )) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tftp_served event: {events}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A raw RFC 1350/7440 client, to drive what the real clients never do on loopback: lost
/// blocks, repeated ACKs, a silent client, a repeated request.
struct Raw {
    sock: std::net::UdpSocket,
    server: std::net::SocketAddr,
}

impl Raw {
    fn new(port: &str) -> Raw {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        Raw {
            sock,
            server: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    /// The next packet: (from, opcode, block or code, payload).
    fn recv(&self) -> (std::net::SocketAddr, u16, u16, Vec<u8>) {
        let mut b = [0u8; 2048];
        let (n, from) = self
            .sock
            .recv_from(&mut b)
            .expect("no packet from the server");
        assert!(n >= 4, "short packet {:?}", &b[..n]);
        (
            from,
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]]),
            b[4..n].to_vec(),
        )
    }

    fn ack(&self, to: std::net::SocketAddr, block: u16) {
        let mut p = vec![0, 4];
        p.extend_from_slice(&block.to_be_bytes());
        self.sock.send_to(&p, to).unwrap();
    }

    /// Expects DATA blocks `blocks` in order from `from`; returns their data.
    fn data(&self, from: std::net::SocketAddr, blocks: std::ops::RangeInclusive<u16>) -> Vec<u8> {
        let mut got = Vec::new();
        for want in blocks {
            let (f, op, block, data) = self.recv();
            assert_eq!((f, op, block), (from, 3, want), "expected DATA {want}");
            got.extend(data);
        }
        got
    }
}

#[test]
fn lost_blocks_repeated_acks_and_repeated_requests() {
    let l = lab();
    let raw = Raw::new(&l.port());
    // Sent twice, as a client does when its first answer is slow: one transfer answers.
    let rrq = b"\x00\x01undionly.kpxe\x00octet\x00blksize\x00512\x00windowsize\x004\x00timeout\x001\x00tsize\x000\x00";
    raw.sock.send_to(rrq, raw.server).unwrap();
    raw.sock.send_to(rrq, raw.server).unwrap();
    let (tid, op, first, rest) = raw.recv();
    assert_eq!(op, 6, "an OACK first");
    let opts = [&first.to_be_bytes()[..], &rest].concat();
    assert_eq!(
        String::from_utf8_lossy(&opts),
        "blksize\x00512\x00timeout\x001\x00tsize\x0020480\x00windowsize\x004\x00"
    );
    raw.ack(tid, 0);
    let mut file = raw.data(tid, 1..=4);
    // Block 3 "lost": the ACK of 2 makes the server send from 3 on.
    file.truncate(2 * 512);
    raw.ack(tid, 2);
    file.extend(raw.data(tid, 3..=6));
    // The ACK of the block before the window (2 again: nothing of 3..=6 arrived) sends the
    // window again at once, not after the timeout.
    raw.ack(tid, 2);
    assert_eq!(raw.data(tid, 3..=6), file[2 * 512..].to_vec());
    // Silence: after the 1 s timeout the window comes again.
    let t = std::time::Instant::now();
    assert_eq!(raw.data(tid, 3..=6), file[2 * 512..].to_vec());
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // Then to the end: 40 blocks of 512 bytes exactly, so block 41 is empty (RFC 1350).
    let mut next = 7u16;
    raw.ack(tid, 6);
    while next <= 41 {
        let end = (next + 3).min(41);
        file.extend(raw.data(tid, next..=end));
        raw.ack(tid, end);
        next = end + 1;
    }
    assert_eq!(file, std::fs::read(l.root.join("undionly.kpxe")).unwrap());
    // One transfer, one event: the repeated request started nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let events = l.d.cli_ok(&["events"]);
        let served = events.matches("tftp_served: undionly.kpxe").count();
        if served == 1 {
            assert!(!events.contains("tftp_failed"), "{events}");
            break;
        }
        assert!(
            served == 0 && std::time::Instant::now() < deadline,
            "{events}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_file_past_65535_blocks_rolls_block_numbers_over() {
    // 65,536 blocks of 512 bytes and a short one: block numbers wrap to 0 (tftp-hpa, atftp
    // and iPXE all expect that).
    let l = lab();
    let data: Vec<u8> = (0..(65536u32 * 512 + 100))
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(l.root.join("big.bin"), &data).unwrap();
    let out = l.hpa_get("big.bin", "big");
    assert!(out.status.success(), "{out:?}");
    assert!(l.same("big.bin", "big"));
}

#[test]
fn a_request_nobody_acknowledges_gets_three_sends_and_a_long_timeout_is_declined() {
    let l = lab();
    let raw = Raw::new(&l.port());
    // A forged request (its "client" never answers) with the longest timeout RFC 2349
    // allows: the OACK leaves the timeout out (declined), and comes three times, no more.
    let rrq = b"\x00\x01undionly.kpxe\x00octet\x00timeout\x00255\x00tsize\x000\x00";
    raw.sock.send_to(rrq, raw.server).unwrap();
    let (tid, op, first, rest) = raw.recv();
    assert_eq!(op, 6, "an OACK first");
    let opts = [&first.to_be_bytes()[..], &rest].concat();
    assert_eq!(String::from_utf8_lossy(&opts), "tsize\x0020480\x00");
    let mut sends = 1;
    raw.sock
        .set_read_timeout(Some(std::time::Duration::from_secs(8)))
        .unwrap();
    let mut b = [0u8; 2048];
    while let Ok((_, from)) = raw.sock.recv_from(&mut b) {
        assert_eq!(from, tid);
        sends += 1;
    }
    assert_eq!(sends, 3, "the OACK to a silent client");
    let events = l.d.cli_ok(&["events"]);
    assert!(
        events.contains("no acknowledgement of the options after 3 tries"),
        "{events}"
    );
}

#[test]
fn a_flood_of_unacknowledged_requests_does_not_lock_out_a_real_client() {
    let l = lab();
    // 1,024 requests (every transfer slot) from four other addresses, none ever
    // acknowledged, as from forged sources; a timeout of 5 s keeps each alive for 15 s.
    let rrq = b"\x00\x01undionly.kpxe\x00octet\x00timeout\x005\x00";
    let server: std::net::SocketAddr = format!("127.0.0.1:{}", l.port()).parse().unwrap();
    let mut flood = Vec::new();
    let mut b = [0u8; 2048];
    for i in 0..1024 {
        let s = std::net::UdpSocket::bind(format!("127.0.0.{}:0", 2 + i % 4)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.send_to(rrq, server).unwrap();
        // Each gets a transfer: its first OACK arrives (waiting for it also keeps the burst
        // within the server socket's receive buffer, so no request is dropped by the kernel).
        s.recv_from(&mut b).expect("an OACK for each flood request");
        assert_eq!(&b[..2], &[0, 6]);
        flood.push(s);
    }
    // ...and has waited out the second in which a transfer with no acknowledgement yet is
    // safe from eviction (so a burst of real clients is never evicted).
    std::thread::sleep(std::time::Duration::from_millis(1200));
    // A real client now: it gets its file (a forged transfer makes room for it).
    let out = l.hpa_get("efi/ipxe.efi", "after-flood.efi");
    assert!(
        out.status.success() && l.same("efi/ipxe.efi", "after-flood.efi"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(flood);
    // One host cannot take more than a quarter of the slots: with 256 transfers to 127.0.0.9
    // under way (each acknowledged its first block), its 257th request is refused.
    let mut held = Vec::new();
    for _ in 0..256 {
        let s = std::net::UdpSocket::bind("127.0.0.9:0").unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.send_to(rrq, server).unwrap();
        // The OACK (timeout 5), acknowledged, then block 1, acknowledged: a live transfer.
        let (_, tid) = s.recv_from(&mut b).unwrap();
        assert_eq!(&b[..2], &[0, 6]);
        s.send_to(&[0, 4, 0, 0], tid).unwrap();
        let (_, tid) = s.recv_from(&mut b).unwrap();
        assert_eq!(&b[..4], &[0, 3, 0, 1]);
        s.send_to(&[0, 4, 0, 1], tid).unwrap();
        held.push(s);
    }
    let s = std::net::UdpSocket::bind("127.0.0.9:0").unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.send_to(rrq, server).unwrap();
    let (n, _) = s.recv_from(&mut b).unwrap();
    assert_eq!(
        (&b[..2], String::from_utf8_lossy(&b[4..n]).as_ref()),
        (&[0u8, 5][..], "server busy, try again\0")
    );
    // Another host is still served.
    let out = l.hpa_get("undionly.kpxe", "other-host.kpxe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
