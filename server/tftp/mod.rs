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

use std::collections::HashSet;
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::files::{resolve, Refusal};
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
/// Sends of one window (or of the OACK) before a transfer gives up on its client.
const MAX_TRIES: u32 = 8;
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
                .and_then(|rt| rt.block_on(serve(socket, roots, report, shutdown)));
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
    /// The address requests arrive on; transfers and refusals are sent from new sockets on
    /// its IP.
    local: SocketAddr,
    /// Clients with a transfer in progress. A client that retransmits its request (its first
    /// answer was lost or slow) must not start a second transfer, and the size of the set is
    /// the cap: without one, a host could open thousands of transfers (each a socket and an
    /// open file) and exhaust the daemon's file descriptors.
    active: Mutex<HashSet<SocketAddr>>,
}

async fn serve(
    socket: UdpSocket,
    roots: Vec<PathBuf>,
    report: Report,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    socket.set_nonblocking(true)?;
    let sock = tokio::net::UdpSocket::from_std(socket)?;
    let server = Arc::new(Server {
        roots,
        report,
        local: sock.local_addr()?,
        active: Mutex::new(HashSet::new()),
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
        server.request(&buf[..n], peer);
    }
}

impl Server {
    /// Answers one packet received on the server port.
    fn request(self: &Arc<Self>, p: &[u8], peer: SocketAddr) {
        let req = match packet::parse_request(p) {
            None => return, // not a request: stray or garbage, ignored
            Some(Err(bad)) => {
                tracing::debug!(%peer, "malformed TFTP request: {bad}");
                return self.refuse(peer, ErrorCode::IllegalOperation, &bad.to_string());
            }
            Some(Ok(r)) => r,
        };
        if req.write {
            tracing::warn!(%peer, file = %req.filename, "refused a TFTP write request: the server is read-only");
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
        // Checked here and inserted below without an await in between: the request loop and
        // every transfer run on this one thread, so nothing else changes the set meanwhile.
        let (running, busy) = {
            let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            (active.contains(&peer), active.len() >= MAX_TRANSFERS)
        };
        if running {
            return; // a retransmitted request: its transfer is already answering
        }
        if busy {
            (self.report)(failed(format!(
                "refused: {MAX_TRANSFERS} transfers already in progress"
            )));
            return self.refuse(peer, ErrorCode::Undefined, "server busy, try again");
        }
        // A few file system calls on the TFTP thread (resolving a name, opening it).
        let opened = resolve(&self.roots, &req.filename).and_then(|p| {
            let f = File::open(&p).map_err(|_| Refusal::NotFound(req.filename.clone()))?;
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            Ok((f, size))
        });
        let (file, size) = match opened {
            Ok(o) => o,
            Err(refusal) => {
                (self.report)(failed(refusal.to_string()));
                return self.refuse(peer, refusal_code(&refusal), &refusal.to_string());
            }
        };
        let sock = match self.transfer_socket(peer) {
            Ok(s) => s,
            Err(e) => {
                (self.report)(failed(format!("no socket for the transfer: {e}")));
                return;
            }
        };
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer);
        let plan = Plan::negotiate(&req.options, size);
        let server = self.clone();
        let file_name = req.filename;
        tokio::spawn(async move {
            // Gives the slot back however the task ends (also when the runtime stops).
            let _slot = Slot(&server, peer);
            let mut info = Transfer {
                peer,
                file: file_name,
                bytes: 0,
                size,
                outcome: Ok(()),
            };
            match Sender::new(sock, file, plan).run(peer).await {
                Ok(bytes) => info.bytes = bytes,
                Err(Ended::AfterOack(why)) => {
                    info.outcome = Err(format!(
                        "the client stopped after the option acknowledgement (a size probe, as UEFI firmware does before downloading, or a client that gave up): {why}"
                    ))
                }
                Err(Ended::Midway(bytes, why)) => {
                    info.bytes = bytes;
                    info.outcome = Err(format!(
                        "transfer ended after {bytes} of {size} bytes: {why}"
                    ))
                }
            }
            (server.report)(info);
        });
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

/// A transfer's place in `Server::active`, given back on drop.
struct Slot<'a>(&'a Server, SocketAddr);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut active = self.0.active.lock().unwrap_or_else(|p| p.into_inner());
        active.remove(&self.1);
    }
}
