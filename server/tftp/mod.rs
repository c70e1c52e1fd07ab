//! TFTP (RFC 1350, with the RFC 2347 option extension: blksize RFC 2348, timeout and tsize
//! RFC 2349, windowsize RFC 7440), read-only, for the iPXE binaries PXE firmware loads.
//!
//! The protocol engine is async-tftp; this module supplies its `Handler`. We do not use its
//! `DirHandler` because it follows symlinks out of its root and gives every transfer an 8 MiB
//! read-ahead buffer (1.65 GB of memory at 200 concurrent transfers). Files here are resolved
//! beneath the configured roots without leaving them (`crate::files`) and read through a
//! buffer of [`READ_BUFFER`] bytes, so memory stays a few blocks per transfer.
//!
//! async-tftp runs on the smol/async-io stack. It runs here on a thread of its own under
//! `async_io::block_on`, which drives async-io's reactor on that same thread: a block read
//! from the file, sent, and its ACK received never cross threads (as a task on the tokio
//! runtime, each block hopped between async-io's reactor thread, a tokio worker and a
//! blocking-pool reader, several context switches per block). File reads are synchronous on
//! this thread: boot files are small and stay in the page cache, so a read is a memory copy.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_tftp::packet;
use async_tftp::server::{Handler, TftpServerBuilder};
use futures_lite::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use crate::files::{resolve, Refusal};

/// Largest block size we agree to (RFC 2348 allows 65464). 1468 bytes of data fill a
/// 1500-byte Ethernet frame (minus IP, UDP and TFTP headers); anything larger is IP-fragmented,
/// and many PXE stacks drop fragments. EDK2 asks for exactly 1468.
pub const BLOCK_SIZE_LIMIT: u16 = 1468;
/// Largest RFC 7440 window we agree to. A window is sent as one burst, and a burst bigger than
/// the client's socket buffer is partly dropped (measured with atftp on loopback: 64 blocks
/// of 8 KiB lost packets and stalled); 16 × 1468 bytes is 23 KiB, which fits any buffer.
pub const WINDOW_SIZE_LIMIT: u16 = 16;
/// Read buffer per transfer: about a window of the largest blocks, so one read(2) serves many
/// blocks and memory stays bounded whatever the file size.
pub const READ_BUFFER: usize = 16 * 1024;

/// The TFTP error packet for a refusal (RFC 1350 error codes 1 and 2).
fn refusal_packet(r: &Refusal) -> packet::Error {
    match r {
        Refusal::NotFound(_) => packet::Error::FileNotFound,
        _ => packet::Error::PermissionDenied,
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
    /// Bytes handed to the protocol engine.
    pub bytes: u64,
    /// File size.
    pub size: u64,
    /// Served to the end, or why not.
    pub outcome: Result<(), String>,
}

/// The read side of one transfer: counts bytes and reports the outcome when async-tftp drops
/// it at the end of the transfer (success or failure).
pub struct Tracked {
    inner: std::io::BufReader<File>,
    info: Transfer,
    eof: bool,
    report: Report,
    active: Arc<AtomicUsize>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let _ = cx;
        let this = &mut *self;
        // A page-cache read: done now, never Pending (see the module comment).
        let r = io::Read::read(&mut this.inner, buf);
        if let Ok(n) = r {
            this.info.bytes += n as u64;
            if n == 0 {
                this.eof = true;
            }
        }
        Poll::Ready(r)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        let mut info = self.info.clone();
        if !self.eof {
            info.outcome = Err(if info.bytes <= u64::from(BLOCK_SIZE_LIMIT) {
                // EDK2 first sends an RRQ with tsize only to learn the size, and stops after
                // the OACK; the download follows as a second transfer.
                "the client stopped after the option acknowledgement (a size probe, as UEFI firmware does before downloading, or a client that gave up)".to_string()
            } else {
                format!("transfer ended after {} of {} bytes", info.bytes, info.size)
            });
        }
        (self.report)(info);
    }
}

/// The confined, read-only handler.
pub struct ConfinedHandler {
    roots: Arc<Vec<PathBuf>>,
    report: Report,
    /// Transfers in progress. async-tftp only refuses a second request from the same IP and
    /// port, so without a cap one host could open thousands (each an open file, a socket and
    /// a buffer) and exhaust the daemon's file descriptors.
    active: Arc<AtomicUsize>,
}

/// Most TFTP transfers at once (each holds a socket and an open file: the daemon raises its
/// file limit at start to fit them). A refused client retries its request.
pub const MAX_TRANSFERS: usize = 1024;

impl ConfinedHandler {
    /// Serves files from `roots` (first match wins), reporting transfers to `report`.
    pub fn new(roots: Vec<PathBuf>, report: Report) -> Self {
        ConfinedHandler {
            roots: Arc::new(roots),
            report,
            active: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Handler for ConfinedHandler {
    type Reader = Tracked;
    type Writer = futures_lite::io::Sink;

    async fn read_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
    ) -> Result<(Self::Reader, Option<u64>), packet::Error> {
        let name = path.to_string_lossy().into_owned();
        if self.active.load(Ordering::SeqCst) >= MAX_TRANSFERS {
            (self.report)(Transfer {
                peer: *client,
                file: name,
                bytes: 0,
                size: 0,
                outcome: Err(format!(
                    "refused: {MAX_TRANSFERS} transfers already in progress"
                )),
            });
            return Err(packet::Error::Msg("server busy, try again".into()));
        }
        // A few file system calls on the TFTP thread (resolving a name, opening it).
        let opened = resolve(&self.roots, &name).and_then(|p| {
            let f = File::open(&p).map_err(|_| Refusal::NotFound(name.clone()))?;
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            Ok((f, size))
        });
        match opened {
            Ok((file, size)) => Ok((
                {
                    // Counted from here; Tracked's drop gives the slot back.
                    self.active.fetch_add(1, Ordering::SeqCst);
                    Tracked {
                        inner: std::io::BufReader::with_capacity(READ_BUFFER, file),
                        info: Transfer {
                            peer: *client,
                            file: name,
                            bytes: 0,
                            size,
                            outcome: Ok(()),
                        },
                        eof: false,
                        report: self.report.clone(),
                        active: self.active.clone(),
                    }
                },
                Some(size),
            )),
            Err(refusal) => {
                (self.report)(Transfer {
                    peer: *client,
                    file: name,
                    bytes: 0,
                    size: 0,
                    outcome: Err(refusal.to_string()),
                });
                Err(refusal_packet(&refusal))
            }
        }
    }

    async fn write_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
        _size: Option<u64>,
    ) -> Result<Self::Writer, packet::Error> {
        tracing::warn!(%client, path = %path.display(), "refused a TFTP write request: the server is read-only");
        Err(packet::Error::IllegalOperation)
    }
}

/// Runs the TFTP server on an already-bound socket until `shutdown`, on a thread of its own
/// (see the module comment); returns when that thread has stopped. If the protocol loop ever
/// fails (a socket error), it is logged and the loop starts again on the same socket: a bad
/// packet or a transient error never ends the server.
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
            let r = async_io::block_on(serve(socket, roots, report, shutdown));
            let _ = done_tx.send(r);
        })?;
    done_rx
        .await
        .map_err(|_| anyhow::anyhow!("the TFTP thread panicked"))?
}

async fn serve(
    socket: UdpSocket,
    roots: Vec<PathBuf>,
    report: Report,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use futures_lite::FutureExt;
    loop {
        let sock = socket.try_clone()?;
        let server =
            TftpServerBuilder::with_handler(ConfinedHandler::new(roots.clone(), report.clone()))
                .std_socket(sock)?
                .block_size_limit(BLOCK_SIZE_LIMIT)
                .window_size_limit(WINDOW_SIZE_LIMIT)
                .timeout(Duration::from_secs(3))
                .max_send_retries(8)
                .build()
                .await?;
        let stopped = async {
            shutdown.cancelled().await;
            None
        };
        let served = async { Some(server.serve().await) };
        match served.or(stopped).await {
            None => return Ok(()),
            Some(r) => {
                tracing::error!("TFTP server loop ended ({r:?}); restarting it");
                async_io::Timer::after(Duration::from_millis(200)).await;
            }
        }
    }
}
