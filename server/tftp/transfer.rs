//! One read transfer: option acknowledgement, then DATA blocks in windows until the last block
//! is acknowledged (RFC 1350 §6 with RFC 2347's OACK and RFC 7440's windows).

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::packet::{self, Options, Reply};
use super::{
    BLOCK_SIZE_LIMIT, FIRST_TRIES, MAX_CLIENT_TIMEOUT, MAX_TRIES, READ_BUFFER, TIMEOUT,
    WINDOW_SIZE_LIMIT,
};

/// Why a transfer ended early (for the event log).
#[derive(Debug)]
pub enum Ended {
    /// No ACK of the OACK: a size probe (EDK2 sends an RRQ with tsize only to learn the size
    /// and stops after the OACK; the download follows as a second transfer) or a client that
    /// gave up before the first block.
    AfterOack(String),
    /// Ended with this many bytes acknowledged.
    Midway(u64, String),
}

/// What the client answered a window with.
enum Ack {
    /// The ACK of this block of the window.
    Block(u64),
    /// The ACK of the block before the window.
    Behind,
    Timeout,
}

/// What was negotiated for one transfer.
pub struct Plan {
    pub blksize: usize,
    pub window: u64,
    pub timeout: Duration,
    /// The OACK to send first, if the client asked for any option we acknowledge.
    pub oack: Option<Vec<u8>>,
}

impl Plan {
    /// The answer to a request's options for a file of `size` bytes: block size and window
    /// capped at our limits (RFC 2348 and RFC 7440 let the server answer with a smaller
    /// value), tsize the file size, and the timeout as asked if it is at most
    /// [`MAX_CLIENT_TIMEOUT`] — RFC 2349 lets the server not change it but decline it (leave it
    /// out of the OACK), which we do for a longer one: a request with `timeout 255` would
    /// otherwise hold its transfer slot for half an hour of retries.
    pub fn negotiate(o: &Options, size: u64) -> Plan {
        let mut acked = Vec::new();
        let blksize = o.blksize.map(|b| b.min(BLOCK_SIZE_LIMIT));
        if let Some(b) = blksize {
            acked.push(("blksize", b.to_string()));
        }
        let timeout = o
            .timeout
            .map(|t| Duration::from_secs(t.into()))
            .filter(|t| *t <= MAX_CLIENT_TIMEOUT);
        if let Some(t) = timeout {
            acked.push(("timeout", t.as_secs().to_string()));
        }
        if o.tsize {
            acked.push(("tsize", size.to_string()));
        }
        let window = o.windowsize.map(|w| w.min(WINDOW_SIZE_LIMIT));
        if let Some(w) = window {
            acked.push(("windowsize", w.to_string()));
        }
        Plan {
            blksize: usize::from(blksize.unwrap_or(512)),
            window: u64::from(window.unwrap_or(1)),
            timeout: timeout.unwrap_or(TIMEOUT),
            oack: (!acked.is_empty()).then(|| packet::oack(&acked)),
        }
    }
}

/// The sending side: a socket connected to the client (so the kernel drops packets from any
/// other address and port, RFC 1350's "wrong TID", and reports an ICMP port unreachable as an
/// error instead of a silent timeout) and a read cache of whole blocks.
pub struct Sender {
    sock: UdpSocket,
    file: File,
    plan: Plan,
    /// Blocks read ahead: one pread(2) serves a window (or READ_BUFFER bytes of blocks), and a
    /// retransmission re-reads only when it goes back before the cache.
    cache: Vec<u8>,
    /// Bytes the cache holds when full (whole blocks).
    cap: usize,
    /// File offset of `cache[0]`.
    cache_at: u64,
    /// The cache reaches the end of the file.
    eof: bool,
    /// The packet being sent (one allocation for the whole transfer).
    out: Vec<u8>,
    /// Receive buffer: ACK and ERROR packets are small; anything longer is not one of them.
    inbuf: [u8; 516],
}

impl Sender {
    pub fn new(sock: UdpSocket, file: File, plan: Plan) -> Sender {
        let blocks = (READ_BUFFER / plan.blksize)
            .max(plan.window as usize)
            .max(1);
        Sender {
            cache: Vec::with_capacity(blocks * plan.blksize),
            cap: blocks * plan.blksize,
            cache_at: 0,
            eof: false,
            out: Vec::with_capacity(4 + plan.blksize),
            sock,
            file,
            plan,
            inbuf: [0; 516],
        }
    }

    /// Runs the transfer to its end: `Ok(bytes)` once the last block is acknowledged.
    /// `proven` is called once, at the client's first acknowledgement: until then the
    /// request may have come from a spoofed address, so the first packet is sent only
    /// [`FIRST_TRIES`] times (a forged request cannot turn the server into an amplifier aimed
    /// at someone else) and the transfer counts as unproven (see `Server::request`).
    pub async fn run(mut self, peer: SocketAddr, proven: impl FnOnce()) -> Result<u64, Ended> {
        let mut proven = Some(proven);
        if let Some(oack) = self.plan.oack.take() {
            // RFC 2347: the client acknowledges the OACK with ACK 0 (or refuses it with ERROR 8).
            // The OACK is "block 0" of a one-packet window.
            let mut tries = 0;
            loop {
                tries += 1;
                if let Err(e) = self.sock.send(&oack).await {
                    return Err(Ended::AfterOack(format!("sending to {peer}: {e}")));
                }
                match self.await_ack(0, 1, false).await {
                    Ok(Ack::Block(_)) => break,
                    Ok(_) if tries < FIRST_TRIES => {}
                    Ok(_) => {
                        return Err(Ended::AfterOack(format!(
                            "no acknowledgement of the options after {FIRST_TRIES} tries"
                        )))
                    }
                    Err(why) => return Err(Ended::AfterOack(why)),
                }
            }
            if let Some(p) = proven.take() {
                p();
            }
        }
        let blksize = self.plan.blksize as u64;
        // `base` is the first block not yet acknowledged; blocks are counted in u64 here and
        // their 16-bit wire numbers wrap to 0 after 65535 (what tftp-hpa, atftp and iPXE
        // expect of files over 32 MiB at 512-byte blocks).
        let mut base: u64 = 1;
        // The last block and its length, once read (a block shorter than blksize, RFC 1350).
        let mut last: Option<(u64, usize)> = None;
        let mut tries = 0;
        let windowed = self.plan.window > 1;
        loop {
            tries += 1;
            let mut end = base;
            while end < base + self.plan.window && last.is_none_or(|(l, _)| end <= l) {
                let n = match self.send_block(end).await {
                    Ok(n) => n,
                    Err(why) => return Err(Ended::Midway((base - 1) * blksize, why)),
                };
                if n < self.plan.blksize {
                    last = Some((end, n));
                }
                end += 1;
            }
            let limit = if proven.is_some() {
                FIRST_TRIES
            } else {
                MAX_TRIES
            };
            match self.await_ack(base, end, windowed).await {
                Ok(Ack::Block(i)) => {
                    if let Some(p) = proven.take() {
                        p();
                    }
                    if let Some((l, n)) = last.filter(|(l, _)| *l == i) {
                        return Ok((l - 1) * blksize + n as u64);
                    }
                    base = i + 1;
                    tries = 0;
                }
                // RFC 7440: the receiver repeats its last in-order ACK when a window's first
                // block is lost; send the window again now rather than after the timeout.
                Ok(Ack::Behind) => {}
                Ok(Ack::Timeout) if tries < limit => {} // send the window again
                Ok(Ack::Timeout) => {
                    return Err(Ended::Midway(
                        (base - 1) * blksize,
                        format!("no acknowledgement of block {base} after {limit} tries"),
                    ))
                }
                Err(why) => return Err(Ended::Midway((base - 1) * blksize, why)),
            }
        }
    }

    /// Waits up to the timeout for the ACK of a block in `base..end` (named by its 16-bit
    /// number). With `windowed`, the ACK of `base - 1` (the window's first block was lost)
    /// returns `Behind`; otherwise it and every other ACK are ignored without resending, so a
    /// delayed or duplicated ACK never doubles the traffic (the Sorcerer's Apprentice bug,
    /// RFC 1123 §4.2.3.1). `Err`: the client sent an ERROR or is unreachable.
    async fn await_ack(&mut self, base: u64, end: u64, windowed: bool) -> Result<Ack, String> {
        let deadline = Instant::now() + self.plan.timeout;
        loop {
            let n = match tokio::time::timeout_at(deadline, self.sock.recv(&mut self.inbuf)).await {
                Err(_) => return Ok(Ack::Timeout),
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err("the client went away (ICMP port unreachable)".into())
                }
                Ok(Err(e)) => return Err(format!("receiving: {e}")),
            };
            match packet::parse_reply(&self.inbuf[..n]) {
                Some(Reply::Ack(b)) => {
                    let i = base + u64::from(b.wrapping_sub(base as u16));
                    if i < end {
                        return Ok(Ack::Block(i));
                    }
                    if windowed && b == base.wrapping_sub(1) as u16 {
                        return Ok(Ack::Behind);
                    }
                }
                Some(Reply::Error(msg)) => return Err(format!("the client stopped: {msg}")),
                None => {}
            }
        }
    }

    /// Sends block `i`; returns its data length (< blksize: the last block).
    async fn send_block(&mut self, i: u64) -> Result<usize, String> {
        let blksize = self.plan.blksize;
        let at = (i - 1) * blksize as u64;
        let cache_end = self.cache_at + self.cache.len() as u64;
        let cached = at >= self.cache_at
            && (at + blksize as u64 <= cache_end || (self.eof && at <= cache_end));
        if !cached {
            self.fill(at)
                .map_err(|e| format!("reading the file: {e}"))?;
        }
        let from = ((at - self.cache_at) as usize).min(self.cache.len());
        let to = (from + blksize).min(self.cache.len());
        packet::data_header(&mut self.out, i as u16);
        self.out.extend_from_slice(&self.cache[from..to]);
        self.sock
            .send(&self.out)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        Ok(to - from)
    }

    /// Reads the cache full from `at` (short only at the end of the file). File reads are
    /// synchronous: boot files stay in the page cache, so a read is a memory copy, cheaper
    /// than a hop to another thread.
    fn fill(&mut self, at: u64) -> std::io::Result<()> {
        let cap = self.cap;
        self.cache.resize(cap, 0);
        let mut n = 0;
        while n < cap {
            match self.file.read_at(&mut self.cache[n..], at + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.cache.truncate(n);
        self.cache_at = at;
        self.eof = n < cap;
        Ok(())
    }
}
