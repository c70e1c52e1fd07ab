//! TFTP (RFC 1350, with the RFC 2347 option extension: blksize RFC 2348, timeout and tsize
//! RFC 2349, windowsize RFC 7440), read-only, for the iPXE binaries PXE firmware loads.
//!
//! The protocol engine is our own ([`packet`], [`transfer`]), on tokio. It replaced the
//! async-tftp crate after profiling showed the limit was in that crate's stack, not in our
//! handler: with async-tftp on a thread of its own under `async_io::block_on` (no block
//! crossing threads, blocks read directly), a 64 MiB windowsize-1 download still cost about
//! 26 µs of server CPU per 1468-byte block, and `strace -c` of the TFTP thread showed, per
//! block, beside the sendto/recvfrom pair: an eventfd write (async-tftp arms a fresh
//! `async_io::Timer` for every ACK it waits for, and each new timer notifies the reactor), a
//! `timerfd_settime`, and an `epoll_ctl` re-arm (async-io registers sources oneshot). perf
//! put `do_epoll_ctl`, the reactor lock and the timerfd at about a fifth of the thread's time.
//! One-client windowsize-1 throughput stayed below atftpd's and 200 concurrent clients below
//! dnsmasq's. On tokio a socket is registered once (edge-triggered) and a timeout is an entry
//! in the runtime's timer wheel, so a block costs its sendto and its recvfrom, plus an
//! epoll_wait when the ACK has not arrived yet.
//!
//! The engine runs on a thread of its own with a current-thread tokio runtime: a request, its
//! file reads, its blocks and their ACKs never cross threads, and a boot storm of TFTP cannot
//! delay the HTTP and DHCP work on the main runtime. Each transfer is a task with its own
//! socket (a new port, RFC 1350's transfer identifier) connected to the client. Files are
//! resolved beneath the configured roots without leaving them (`crate::files`) and read
//! through a cache of a few blocks, so memory stays a few KiB per transfer whatever the file
//! size. Refusals and malformed requests are answered with an ERROR packet from a fresh
//! socket; packets that are not requests are ignored.

mod packet;
mod transfer;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::files::{resolve, Refusal};
use crate::metrics::{Metrics, TftpResult};
use packet::ErrorCode;
use transfer::{Ended, Plan, Sender};

/// Largest block size we agree to (RFC 2348 allows 65464). 1468 bytes of data fill a
/// 1500-byte Ethernet frame (minus IP, UDP and TFTP headers); anything larger is IP-fragmented,
/// and many PXE stacks drop fragments. EDK2 asks for exactly 1468.
pub const BLOCK_SIZE_LIMIT: u16 = 1468;
/// Largest RFC 7440 window we agree to. A window is sent as one burst, and a burst bigger than
/// the client's socket buffer is partly dropped (measured with atftp on loopback: 64 blocks
/// of 8 KiB lost packets and stalled); 16 × 1468 bytes is 23 KiB, which fits any buffer.
pub const WINDOW_SIZE_LIMIT: u16 = 16;
/// Read cache per transfer: about a window of the largest blocks, so one pread(2) serves many
/// blocks and memory stays bounded whatever the file size.
pub const READ_BUFFER: usize = 16 * 1024;
/// How long a transfer waits for an ACK before sending again, unless the client asked for
/// another timeout (RFC 2349).
const TIMEOUT: Duration = Duration::from_secs(3);
/// Sends of one window before a transfer gives up on its client.
const MAX_TRIES: u32 = 8;
/// Sends of the first packet (OACK or block 1) before the client has acknowledged anything:
/// the request may have come from a forged address, and each resend is traffic aimed at it.
const FIRST_TRIES: u32 = 3;
/// The longest per-packet timeout a client may ask for (RFC 2349 allows 255 s); a longer one
/// is declined and [`TIMEOUT`] used.
const MAX_CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most transfers at once whose client has not acknowledged anything yet. Past it (or when
/// every slot is taken), a new request ends the oldest of them that has waited at least
/// [`UNPROVEN_GRACE`]: a flood of requests from forged addresses (which never acknowledge)
/// churns among its own transfers, while a real client acknowledges its first packet within
/// a round trip and is then never evicted.
const MAX_UNPROVEN: usize = 128;
/// How long an unacknowledged transfer is safe from eviction: far longer than a round trip,
/// so a burst of real clients (a boot storm, all asking at once) is never evicted while its
/// first packets are on their way.
const UNPROVEN_GRACE: Duration = Duration::from_secs(1);
/// Most transfers at once to one IP address (a PXE client runs one or two; this leaves room
/// for many clients behind one address, and one host can hold at most a quarter of the
/// slots).
const MAX_PER_ADDRESS: usize = MAX_TRANSFERS / 4;
/// Most TFTP transfers at once (each holds a socket and an open file: the daemon raises its
/// file limit at start to fit them). A refused client retries its request.
pub const MAX_TRANSFERS: usize = 1024;

/// The TFTP error for a refusal (RFC 1350 error codes 1 and 2).
fn refusal_code(r: &Refusal) -> ErrorCode {
    match r {
        Refusal::NotFound(_) => ErrorCode::FileNotFound,
        _ => ErrorCode::AccessViolation,
    }
}

/// Where transfers are reported (the boot service observes them on the machine's timeline).
/// Called on the TFTP thread: it must not block.
pub type Report = Arc<dyn Fn(Transfer) + Send + Sync>;

/// What happened to one transfer, for the event log.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The client.
    pub peer: SocketAddr,
    /// The requested name.
    pub file: String,
    /// Bytes the client acknowledged.
    pub bytes: u64,
    /// File size.
    pub size: u64,
    /// Served to the end, or why not.
    pub outcome: Result<(), String>,
}

/// Runs the TFTP server on an already-bound socket until `shutdown`, on a thread of its own
/// (see the module comment); returns when that thread has stopped.
pub async fn run(
    socket: UdpSocket,
    roots: Vec<PathBuf>,
    report: Report,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("tftp".into())
        .spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(serve(socket, roots, report, metrics, shutdown)));
            let _ = done_tx.send(r);
        })?;
    done_rx
        .await
        .map_err(|_| anyhow::anyhow!("the TFTP thread panicked"))?
}

/// The server: state shared by the request loop and its transfers.
struct Server {
    roots: Vec<PathBuf>,
    report: Report,
    metrics: Arc<Metrics>,
    /// The address requests arrive on; transfers and refusals are sent from new sockets on
    /// its IP.
    local: SocketAddr,
    /// The transfers in progress.
    active: Mutex<Active>,
}

/// The transfers in progress, by client. A client that retransmits its request (its first
/// answer was lost or slow) must not start a second transfer, and the caps bound what one
/// host or a flood can hold: without them, requests could open thousands of transfers (each
/// a socket and an open file) and exhaust the daemon's file descriptors.
#[derive(Default)]
struct Active {
    /// Client → (its transfer's number, acknowledged anything yet, how to end it).
    peers: HashMap<SocketAddr, (u64, bool, CancellationToken)>,
    /// Transfers per client IP.
    per_ip: HashMap<IpAddr, usize>,
    /// Unproven transfers, oldest first, with when they began (entries of transfers since
    /// proven or ended are skipped when met).
    unproven: VecDeque<(u64, SocketAddr, Instant)>,
    /// Unproven transfers in `peers`.
    n_unproven: usize,
    next: u64,
}

impl Active {
    /// Registers a transfer to `peer` at `now`, ending the oldest unproven one past its grace
    /// if there are [`MAX_UNPROVEN`] or no free slot (returns its client); `Err` with why if
    /// a cap refuses it.
    fn admit(
        &mut self,
        peer: SocketAddr,
        cancel: CancellationToken,
        now: Instant,
    ) -> Result<(u64, Option<SocketAddr>), String> {
        if self.per_ip.get(&peer.ip()).copied().unwrap_or(0) >= MAX_PER_ADDRESS {
            return Err(format!(
                "{MAX_PER_ADDRESS} transfers to {} already in progress",
                peer.ip()
            ));
        }
        self.tidy();
        let mut evicted = None;
        if self.n_unproven >= MAX_UNPROVEN || self.peers.len() >= MAX_TRANSFERS {
            if let Some(&(_, old, began)) = self.unproven.front() {
                if now.saturating_duration_since(began) >= UNPROVEN_GRACE {
                    self.unproven.pop_front();
                    if let Some((_, _, c)) = self.remove(old) {
                        c.cancel();
                        evicted = Some(old);
                    }
                }
            }
        }
        if self.peers.len() >= MAX_TRANSFERS {
            return Err(format!("{MAX_TRANSFERS} transfers already in progress"));
        }
        let id = self.next;
        self.next += 1;
        self.peers.insert(peer, (id, false, cancel));
        *self.per_ip.entry(peer.ip()).or_default() += 1;
        self.unproven.push_back((id, peer, now));
        self.n_unproven += 1;
        Ok((id, evicted))
    }

    /// The client of transfer `id` acknowledged its first packet.
    fn prove(&mut self, peer: SocketAddr, id: u64) {
        if let Some((i, proven, _)) = self.peers.get_mut(&peer) {
            if *i == id && !*proven {
                *proven = true;
                self.n_unproven -= 1;
            }
        }
        self.tidy();
    }

    /// Ends transfer `id` to `peer` (if it is still that one).
    fn end(&mut self, peer: SocketAddr, id: u64) {
        if matches!(self.peers.get(&peer), Some((i, _, _)) if *i == id) {
            self.remove(peer);
        }
        self.tidy();
    }

    /// Drops the queue's entries of transfers since proven or ended: from its front, and all
    /// of them once it holds many more entries than transfers can exist (so it stays about
    /// as long as the unproven transfers are many).
    fn tidy(&mut self) {
        let live = |peers: &HashMap<SocketAddr, (u64, bool, CancellationToken)>,
                    (i, p, _): &(u64, SocketAddr, Instant)| {
            matches!(peers.get(p), Some((j, false, _)) if j == i)
        };
        while self.unproven.front().is_some_and(|e| !live(&self.peers, e)) {
            self.unproven.pop_front();
        }
        if self.unproven.len() > 2 * MAX_TRANSFERS {
            let peers = &self.peers;
            self.unproven.retain(|e| live(peers, e));
        }
    }

    fn remove(&mut self, peer: SocketAddr) -> Option<(u64, bool, CancellationToken)> {
        let e = self.peers.remove(&peer)?;
        if !e.1 {
            self.n_unproven -= 1;
        }
        if let Some(n) = self.per_ip.get_mut(&peer.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&peer.ip());
            }
        }
        Some(e)
    }
}

async fn serve(
    socket: UdpSocket,
    roots: Vec<PathBuf>,
    report: Report,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    socket.set_nonblocking(true)?;
    let sock = tokio::net::UdpSocket::from_std(socket)?;
    let server = Arc::new(Server {
        roots,
        report,
        metrics,
        local: sock.local_addr()?,
        active: Mutex::new(Active::default()),
    });
    // Requests are short; one longer than this is cut and then fails to parse.
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // A receive error on an unconnected UDP socket is transient (e.g. out of
                    // memory for a buffer): never end the server for it.
                    tracing::warn!("TFTP receive failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // A bug that panics on some packet must cost that packet, not the server: the thread
        // ends on a panic, and with it TFTP for every machine (transfers are tasks, whose
        // panics tokio already contains).
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            server.request(&buf[..n], peer)
        }));
        if handled.is_err() {
            tracing::error!(%peer, "panic while handling a TFTP request; dropped it");
        }
    }
}

impl Server {
    /// Answers one packet received on the server port.
    fn request(self: &Arc<Self>, p: &[u8], peer: SocketAddr) {
        let req = match packet::parse_request(p) {
            None => return, // not a request: stray or garbage, ignored
            Some(Err(bad)) => {
                tracing::debug!(%peer, "malformed TFTP request: {bad}");
                self.metrics.tftp_refused(TftpResult::Refused);
                return self.refuse(peer, ErrorCode::IllegalOperation, &bad.to_string());
            }
            Some(Ok(r)) => r,
        };
        #[cfg(test)]
        if req.filename == tests::PANIC_NAME {
            panic!("a test request that panics");
        }
        if req.write {
            tracing::warn!(%peer, file = %req.filename, "refused a TFTP write request: the server is read-only");
            self.metrics.tftp_refused(TftpResult::Refused);
            return self.refuse(
                peer,
                ErrorCode::IllegalOperation,
                "this server is read-only",
            );
        }
        let failed = |why: String| Transfer {
            peer,
            file: req.filename.clone(),
            bytes: 0,
            size: 0,
            outcome: Err(why),
        };
        // Checked here and admitted below without an await in between: the request loop and
        // every transfer run on this one thread, so nothing else changes the set meanwhile.
        if self.lock().peers.contains_key(&peer) {
            return; // a retransmitted request: its transfer is already answering
        }
        // Admitted before any file or socket work: a request the caps refuse costs nothing
        // but its ERROR packet.
        let cancel = CancellationToken::new();
        let admitted = self.lock().admit(peer, cancel.clone(), Instant::now());
        let id = match admitted {
            Ok((id, evicted)) => {
                if let Some(old) = evicted {
                    tracing::debug!(%old, "ended the oldest unacknowledged TFTP transfer for a new request");
                }
                id
            }
            Err(why) => {
                self.metrics.tftp_refused(TftpResult::Busy);
                (self.report)(failed(format!("refused: {why}")));
                return self.refuse(peer, ErrorCode::Undefined, "server busy, try again");
            }
        };
        // A few file system calls on the TFTP thread (resolving a name, opening it).
        let opened = resolve(&self.roots, &req.filename).and_then(|p| {
            let f = File::open(&p).map_err(|_| Refusal::NotFound(req.filename.clone()))?;
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            Ok((f, size))
        });
        let (file, size) = match opened {
            Ok(o) => o,
            Err(refusal) => {
                self.lock().end(peer, id);
                self.metrics.tftp_refused(match refusal {
                    Refusal::NotFound(_) => TftpResult::NotFound,
                    _ => TftpResult::Denied,
                });
                (self.report)(failed(refusal.to_string()));
                return self.refuse(peer, refusal_code(&refusal), &refusal.to_string());
            }
        };
        let sock = match self.transfer_socket(peer) {
            Ok(s) => s,
            Err(e) => {
                self.lock().end(peer, id);
                self.metrics.tftp_refused(TftpResult::Error);
                (self.report)(failed(format!("no socket for the transfer: {e}")));
                return;
            }
        };
        let plan = Plan::negotiate(&req.options, size);
        let server = self.clone();
        let file_name = req.filename;
        let began = Instant::now();
        tokio::spawn(async move {
            // Gives the slot back however the task ends (also when the runtime stops).
            let _slot = Slot(&server, peer, id);
            let mut info = Transfer {
                peer,
                file: file_name,
                bytes: 0,
                size,
                outcome: Ok(()),
            };
            let proven = || server.lock().prove(peer, id);
            let sent = tokio::select! {
                r = Sender::new(sock, file, plan).run(peer, proven) => Some(r),
                _ = cancel.cancelled() => None,
            };
            let result = match &sent {
                None => TftpResult::Evicted,
                Some(Ok(_)) => TftpResult::Served,
                Some(Err(Ended::AfterOack(_))) => TftpResult::SizeProbe,
                Some(Err(Ended::Midway(..))) => TftpResult::Aborted,
            };
            match sent {
                None => {
                    info.outcome = Err(format!(
                        "ended before the client acknowledged anything: {MAX_UNPROVEN} such transfers were waiting when another request came (a flood of requests from addresses that never answer?)"
                    ))
                }
                Some(Ok(bytes)) => info.bytes = bytes,
                Some(Err(Ended::AfterOack(why))) => {
                    info.outcome = Err(format!(
                        "the client stopped after the option acknowledgement (a size probe, as UEFI firmware does before downloading, or a client that gave up): {why}"
                    ))
                }
                Some(Err(Ended::Midway(bytes, why))) => {
                    info.bytes = bytes;
                    info.outcome = Err(format!(
                        "transfer ended after {bytes} of {size} bytes: {why}"
                    ))
                }
            }
            server
                .metrics
                .tftp_transfer(result, info.bytes, began.elapsed());
            (server.report)(info);
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Active> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new socket on the server's IP, connected to the client (see `transfer::Sender`).
    fn transfer_socket(&self, peer: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
        let s = UdpSocket::bind(SocketAddr::new(self.local.ip(), 0))?;
        s.connect(peer)?;
        s.set_nonblocking(true)?;
        tokio::net::UdpSocket::from_std(s)
    }

    /// Answers a request with an ERROR packet from a fresh socket (RFC 1350: a reply comes
    /// from a new transfer identifier), never retransmitted. Best effort: a failure to send
    /// is only logged.
    fn refuse(&self, peer: SocketAddr, code: ErrorCode, msg: &str) {
        let sent = UdpSocket::bind(SocketAddr::new(self.local.ip(), 0))
            .and_then(|s| s.send_to(&packet::error(code, msg), peer));
        if let Err(e) = sent {
            tracing::debug!(%peer, "could not send a TFTP error: {e}");
        }
    }
}

/// The fuzz target's path through a request (`fuzz/fuzz_targets/tftp.rs`): parse, resolve
/// the name beneath `roots`, negotiate the options for the file found; asserts what must hold
/// for any input (a resolved path is beneath a root; the plan stays within our limits).
#[doc(hidden)]
pub fn fuzz_request(roots: &[PathBuf], data: &[u8]) {
    let Some(Ok(req)) = packet::parse_request(data) else {
        return;
    };
    let size = match resolve(roots, &req.filename) {
        Ok(p) => {
            assert!(
                roots.iter().any(|r| p.starts_with(r)),
                "{:?} resolved outside the roots to {}",
                req.filename,
                p.display()
            );
            std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0)
        }
        Err(_) => 0,
    };
    let plan = Plan::negotiate(&req.options, size);
    assert!(
        (8..=BLOCK_SIZE_LIMIT as usize).contains(&plan.blksize),
        "{}",
        plan.blksize
    );
    assert!(
        (1..=WINDOW_SIZE_LIMIT as u64).contains(&plan.window),
        "{}",
        plan.window
    );
    assert!(plan.timeout <= MAX_CLIENT_TIMEOUT, "{:?}", plan.timeout);
    if let Some(oack) = &plan.oack {
        assert!(
            oack.len() <= 512,
            "an OACK fits a minimal packet: {}",
            oack.len()
        );
    }
}

/// A transfer's place in `Server::active`, given back on drop.
struct Slot<'a>(&'a Server, SocketAddr, u64);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.lock().end(self.1, self.2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, ip], port))
    }

    // The limits as docs/firmware.md states them ("at most 1024 transfers … at most 256 of
    // them to one IP address … at most 128 whose client has not acknowledged"), written out
    // here rather than taken from the constants, so a change of either shows.
    const DOCUMENTED_TRANSFERS: usize = 1024;
    const DOCUMENTED_PER_ADDRESS: usize = 256;
    const DOCUMENTED_UNPROVEN: usize = 128;

    #[test]
    fn unproven_transfers_make_room_after_their_grace_and_proven_ones_stay() {
        let mut a = Active::default();
        let t0 = Instant::now();
        let new = CancellationToken::new;
        let (first, _) = a.admit(peer(1, 1), new(), t0).unwrap();
        a.prove(peer(1, 1), first);
        let mut tokens = Vec::new();
        for i in 0..DOCUMENTED_UNPROVEN as u16 {
            let t = new();
            let (_, evicted) = a.admit(peer(2, i), t.clone(), t0).unwrap();
            assert_eq!(evicted, None);
            tokens.push(t);
        }
        // Within the grace (a burst of real clients, all asking at once), nobody is ended.
        let (_, evicted) = a.admit(peer(3, 1), new(), t0).unwrap();
        assert_eq!(evicted, None);
        // Past it, a new request ends the oldest unproven transfer, never the proven one.
        let (_, evicted) = a.admit(peer(3, 2), new(), t0 + UNPROVEN_GRACE).unwrap();
        assert_eq!(evicted, Some(peer(2, 0)));
        assert!(tokens[0].is_cancelled() && !tokens[1].is_cancelled());
        assert!(a.peers.contains_key(&peer(1, 1)));
        assert_eq!(
            (a.peers.len(), a.n_unproven),
            (DOCUMENTED_UNPROVEN + 2, DOCUMENTED_UNPROVEN + 1)
        );
        // Ending frees the slot and the address's count; a stale id ends nothing.
        a.end(peer(1, 1), first + 1000);
        assert!(a.peers.contains_key(&peer(1, 1)));
        a.end(peer(1, 1), first);
        assert!(!a.peers.contains_key(&peer(1, 1)));
        assert!(!a.per_ip.contains_key(&"127.0.0.1".parse().unwrap()));
        assert!(a.unproven.len() <= DOCUMENTED_UNPROVEN + 1);
    }

    #[test]
    fn every_slot_taken_refuses_until_an_unproven_one_is_past_its_grace() {
        let mut a = Active::default();
        let t0 = Instant::now();
        for i in 0..DOCUMENTED_TRANSFERS {
            let p = SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 69));
            a.admit(p, CancellationToken::new(), t0).unwrap();
        }
        let refused = a
            .admit(peer(1, 1), CancellationToken::new(), t0)
            .unwrap_err();
        assert!(refused.contains("1024 transfers"), "{refused}");
        let (_, evicted) = a
            .admit(peer(1, 1), CancellationToken::new(), t0 + UNPROVEN_GRACE)
            .unwrap();
        assert!(evicted.is_some());
        assert_eq!(a.peers.len(), DOCUMENTED_TRANSFERS);
    }

    #[test]
    fn one_address_holds_at_most_a_quarter_of_the_slots() {
        let mut a = Active::default();
        let t0 = Instant::now();
        for i in 0..DOCUMENTED_PER_ADDRESS as u16 {
            let (id, _) = a.admit(peer(4, i), CancellationToken::new(), t0).unwrap();
            a.prove(peer(4, i), id);
        }
        let refused = a
            .admit(peer(4, 9999), CancellationToken::new(), t0)
            .unwrap_err();
        assert!(refused.contains("transfers to 127.0.0.4"), "{refused}");
        assert!(a.admit(peer(5, 1), CancellationToken::new(), t0).is_ok());
    }

    #[test]
    fn a_long_client_timeout_is_declined_and_a_short_one_kept() {
        let opts = |t| packet::Options {
            timeout: Some(t),
            ..Default::default()
        };
        let long = Plan::negotiate(&opts(255), 10);
        assert_eq!(long.timeout, TIMEOUT);
        assert!(long.oack.is_none(), "nothing left to acknowledge");
        let short = Plan::negotiate(&opts(2), 10);
        assert_eq!(short.timeout, Duration::from_secs(2));
        assert!(short.oack.is_some());
    }

    /// The name a test sends to make `request` panic.
    pub(super) const PANIC_NAME: &str = "provision-test-panic";

    #[tokio::test]
    async fn a_request_that_panics_costs_that_request_not_the_server() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("undionly.kpxe"), b"ipxe").unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let sd = CancellationToken::new();
        let report: Report = Arc::new(|_| {});
        let server = tokio::spawn(run(
            sock,
            vec![root.path().into()],
            report,
            Arc::new(crate::metrics::Metrics::new(&Default::default())),
            sd.clone(),
        ));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rrq = |name: &str| [&[0u8, 1][..], name.as_bytes(), b"\0octet\0"].concat();
        client.send_to(&rrq(PANIC_NAME), addr).await.unwrap();
        client.send_to(&rrq("undionly.kpxe"), addr).await.unwrap();
        let mut buf = [0u8; 600];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("the server still answers after a panic")
            .unwrap();
        assert_eq!(&buf[..n], b"\0\x03\0\x01ipxe", "block 1 of the file");
        assert!(!server.is_finished());
        sd.cancel();
        server.await.unwrap().unwrap();
    }
}
