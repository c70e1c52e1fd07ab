//! DHCP for network boot, in one of two modes. Proxy (the default; PXE 2.1 specification,
//! section 2.2.5): answers network-boot clients on UDP 67 and 4011 with a boot file, beside
//! the site's DHCP server, which hands out the addresses. Full (isolated labs): a DHCP server
//! (RFC 2131) handing out addresses from a pool, with reservations from the inventory and
//! leases in SQLite, plus the same boot instructions.
//!
//! One task per port (and interface, when limited to some). Each datagram is received with its arrival interface (IP_PKTINFO), so
//! the reply names the address of that interface as the boot server (unless `--advertise`
//! says otherwise) and leaves through it. A malformed packet is logged and dropped; a panic
//! while handling one packet is caught and logged; neither ends the loop.

mod ifaddrs;
mod leases;
pub mod packet;

pub use ifaddrs::InterfaceAddrs;
pub use leases::LeaseBook;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dhcproto::v4::MessageType;
use nix::sys::socket::{self, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::attribution::Learned;
use crate::boot::BootService;
use crate::metrics::{DhcpClient, DhcpPort, DhcpReply, DhcpResult, DhcpType, Metrics};
use crate::policy::EventKind;
use crate::store::{DhcpSeen, Inventory, Sighting};
use packet::{BootFiles, ClientKind, Drop};

/// The DHCP client port (RFC 2131 section 4.1).
const CLIENT_PORT: u16 = 68;
/// The DHCP server port.
const SERVER_PORT: u16 = 67;

/// Which ProxyDHCP port a socket serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// 67: broadcast DISCOVERs; answered with offers.
    Dhcp,
    /// 4011: PXE boot server requests (ProxyDHCPREQUEST); answered with acks.
    Pxe,
}

/// Proxy (beside the site's DHCP server) or full (the only DHCP server, for isolated labs).
#[derive(Clone, Debug)]
pub enum Mode {
    /// ProxyDHCP: boot instructions only, never an address.
    Proxy,
    /// A DHCP server handing out addresses from a pool, plus boot instructions.
    Full(AddressMode),
}

/// The address pool and parameters of address mode.
#[derive(Clone, Debug)]
pub struct AddressMode {
    /// First pool address.
    pub start: Ipv4Addr,
    /// Last pool address (inclusive).
    pub end: Ipv4Addr,
    /// Subnet mask.
    pub netmask: Ipv4Addr,
    /// Default router, if any.
    pub router: Option<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// Lease time.
    pub lease_time: Duration,
}

/// What the DHCP tasks need.
pub struct Context {
    /// Address mode's leases; `None` in proxy mode.
    pub leases: Option<LeaseBook>,
    /// The boot service (policy, observations, attribution).
    pub boot: Arc<BootService>,
    /// Boot file names.
    pub files: BootFiles,
    /// A fixed boot server address from `--advertise`, if it names an IPv4 address.
    pub advertise_ip: Option<Ipv4Addr>,
    /// The HTTP base URL from `--advertise`, if set.
    pub advertise_url: Option<String>,
    /// The HTTP port, for the base URL when it is derived from the interface address.
    pub http_port: u16,
    /// Interface addresses, cached (see [`InterfaceAddrs::watch`]).
    pub ifaddrs: Arc<InterfaceAddrs>,
    limiter: Mutex<RateLimit>,
}

impl Context {
    /// A context for the DHCP tasks.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        boot: Arc<BootService>,
        inv: Arc<dyn Inventory>,
        mode: Mode,
        files: BootFiles,
        advertise_url: Option<String>,
        dhcp_addr: Option<Ipv4Addr>,
        http_port: u16,
    ) -> Self {
        let advertise_ip = advertise_url
            .as_deref()
            .and_then(|u| {
                let host = u.split("://").nth(1)?.split(['/', ':']).next()?;
                host.parse().ok()
            })
            .or(dhcp_addr.filter(|a| !a.is_unspecified()));
        let leases = match mode {
            Mode::Proxy => None,
            Mode::Full(a) => Some(LeaseBook::new(inv, boot.attribution_handle(), a)),
        };
        Context {
            leases,
            boot,
            files,
            advertise_ip,
            advertise_url,
            http_port,
            ifaddrs: Arc::new(InterfaceAddrs::default()),
            limiter: Mutex::new(RateLimit::new(Instant::now())),
        }
    }
}

/// A per-client-MAC limit: at most `MAX` packets in a fixed `WINDOW` (100 a second on
/// average). PXE firmware retries a handful of times a minute; a flood from one MAC (a loop, a
/// broken NIC) is dropped, not processed. O(1) per packet: the counts are forgotten together when a window ends, and past
/// `MAX_TRACKED` MACs in one window new ones are not tracked (a flood of random MACs cannot be
/// limited by MAC anyway, and must not grow the map).
struct RateLimit {
    window_start: Instant,
    seen: HashMap<[u8; 6], u32>,
}

impl RateLimit {
    const WINDOW: Duration = Duration::from_secs(10);
    const MAX: u32 = 1000;
    const MAX_TRACKED: usize = 65_536;

    fn new(now: Instant) -> Self {
        RateLimit {
            window_start: now,
            seen: HashMap::new(),
        }
    }

    /// Whether a packet from `mac` may be handled now; the second value is true for the
    /// first refused packet of a window, so the log says it once, not per packet.
    fn allow(&mut self, mac: [u8; 6], now: Instant) -> (bool, bool) {
        if now.duration_since(self.window_start) >= Self::WINDOW {
            self.seen.clear();
            self.window_start = now;
        }
        if self.seen.len() >= Self::MAX_TRACKED && !self.seen.contains_key(&mac) {
            return (true, false);
        }
        let n = self.seen.entry(mac).or_insert(0);
        *n = n.saturating_add(1);
        (*n <= Self::MAX, *n == Self::MAX + 1)
    }
}

/// Binds a DHCP socket: broadcast allowed (offers to clients without an address go to
/// 255.255.255.255), IP_PKTINFO on (to learn the arrival interface), SO_REUSEADDR so a
/// restart does not wait and so one socket per interface can share the port. With `device`,
/// the socket is tied to that interface (SO_BINDTODEVICE): a socket bound to an interface
/// *address* would never see the broadcast DISCOVERs, so this is how DHCP is limited to
/// some interfaces.
pub fn bind(addr: SocketAddrV4, device: Option<&str>) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    if let Some(d) = device {
        s.bind_device(Some(d.as_bytes())).map_err(|e| {
            std::io::Error::new(e.kind(), format!("binding to interface {d:?}: {e}"))
        })?;
    }
    s.bind(&SocketAddr::V4(addr).into())?;
    socket::setsockopt(&s, sockopt::Ipv4PacketInfo, &true).map_err(std::io::Error::from)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The interface that holds `ip`, if any.
pub fn interface_with(ip: Ipv4Addr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        let sin = a.address.as_ref()?.as_sockaddr_in()?;
        (sin.ip() == ip).then(|| a.interface_name.clone())
    })
}

#[derive(Clone, Copy)]
struct Received {
    len: usize,
    from: SocketAddrV4,
    ifindex: u32,
    local: Ipv4Addr,
}

async fn recv(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Received> {
    sock.async_io(Interest::READABLE, || {
        let mut iov = [IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(nix::libc::in_pktinfo);
        let msg = socket::recvmsg::<SockaddrIn>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .map_err(std::io::Error::from)?;
        let mut ifindex = 0;
        let mut local = Ipv4Addr::UNSPECIFIED;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::Ipv4PacketInfo(pi) = c {
                ifindex = pi.ipi_ifindex as u32;
                local = Ipv4Addr::from(u32::from_be(pi.ipi_spec_dst.s_addr));
            }
        }
        let from = msg
            .address
            .map(|a| SocketAddrV4::new(a.ip(), a.port()))
            .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        Ok(Received {
            len: msg.bytes,
            from,
            ifindex,
            local,
        })
    })
    .await
}

/// Sends `data` to `to`, out of interface `ifindex` when it is known (a broadcast would
/// otherwise leave by the default route's interface).
async fn send(
    sock: &UdpSocket,
    data: &[u8],
    to: SocketAddrV4,
    ifindex: u32,
) -> std::io::Result<()> {
    sock.async_io(Interest::WRITABLE, || {
        let iov = [IoSlice::new(data)];
        let dst = SockaddrIn::from(to);
        let pi = nix::libc::in_pktinfo {
            ipi_ifindex: ifindex as i32,
            ipi_spec_dst: nix::libc::in_addr { s_addr: 0 },
            ipi_addr: nix::libc::in_addr { s_addr: 0 },
        };
        let cmsgs = [ControlMessage::Ipv4PacketInfo(&pi)];
        let c: &[ControlMessage] = if ifindex == 0 { &[] } else { &cmsgs };
        socket::sendmsg(sock.as_raw_fd(), &iov, c, MsgFlags::empty(), Some(&dst))
            .map(|_| ())
            .map_err(std::io::Error::from)
    })
    .await
}

/// Where the reply goes (RFC 2131 section 4.1): to the relay if relayed; on port 4011 back
/// to the sender; to a client that has an address at that address; otherwise broadcast.
fn destination(port: Port, req: &packet::PxeRequest, from: SocketAddrV4) -> SocketAddrV4 {
    if !req.giaddr.is_unspecified() {
        return SocketAddrV4::new(req.giaddr, SERVER_PORT);
    }
    match port {
        Port::Pxe => from,
        Port::Dhcp if !req.ciaddr.is_unspecified() => SocketAddrV4::new(req.ciaddr, CLIENT_PORT),
        Port::Dhcp => SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT),
    }
}

/// Most packets being handled at once on one port (waiting for a lease write or an inventory
/// read); past this, packets are dropped and counted, never queued without bound.
const MAX_IN_FLIGHT: usize = 1024;

/// Runs one ProxyDHCP port until `shutdown`.
///
/// A packet is handled on the receive loop itself when its answer needs no waiting (the
/// ProxyDHCP offer: a classification and an observation); one that must wait (an address-mode
/// lease, the `ignore` answer's inventory read) continues as its own task, so a slow disk
/// never delays the packets behind it.
pub async fn run(
    sock: std::net::UdpSocket,
    port: Port,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sock = Arc::new(UdpSocket::from_std(sock)?);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 1500];
    let mut dropped: u64 = 0;
    loop {
        let r = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = recv(&sock, &mut buf) => r,
        };
        while tasks.try_join_next().is_some() {}
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                // A receive error (e.g. an ICMP error queued on the socket) is about one
                // packet, not the server.
                tracing::warn!("DHCP receive error: {e}");
                continue;
            }
        };
        let data = buf[..r.len].to_vec();
        let c = ctx.clone();
        let handled = AssertUnwindSafe(async move {
            let mut tally = Tally::default();
            let out = handle(&c, port, &data, &r, &mut tally).await;
            (out, tally)
        });
        let mut fut = Box::pin(futures_lite::FutureExt::catch_unwind(handled));
        let metrics = ctx.boot.metrics();
        match futures_lite::future::poll_once(&mut fut).await {
            Some(out) => answer(&sock, out, &r, port, metrics).await,
            None => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let (sock, metrics) = (sock.clone(), metrics.clone());
                    tasks.spawn(async move {
                        let out = fut.await;
                        answer(&sock, out, &r, port, &metrics).await;
                        drop(slot);
                    });
                }
                Err(_) => {
                    metrics.dhcp_received(port.label(), DhcpType::Unknown, DhcpResult::Overloaded);
                    dropped += 1;
                    if dropped.is_power_of_two() {
                        tracing::warn!(
                            dropped,
                            "DHCP: {MAX_IN_FLIGHT} packets already waiting; dropping"
                        );
                    }
                }
            },
        }
    }
    tasks.shutdown().await;
    Ok(())
}

/// A datagram's reply and where it goes (or none), and what handling it came to.
type Handled = (Option<(Vec<u8>, SocketAddrV4)>, Tally);

/// What handling one datagram came to, for the metrics.
struct Tally {
    msg: DhcpType,
    result: DhcpResult,
    reply: DhcpReply,
    client: DhcpClient,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            msg: DhcpType::Unknown,
            result: DhcpResult::NoAnswer,
            reply: DhcpReply::Ack,
            client: DhcpClient::Other,
        }
    }
}

impl Port {
    fn label(self) -> DhcpPort {
        match self {
            Port::Dhcp => DhcpPort::Dhcp,
            Port::Pxe => DhcpPort::Pxe,
        }
    }
}

/// Sends what handling a packet came to, and counts it.
async fn answer(
    sock: &UdpSocket,
    out: std::thread::Result<Handled>,
    r: &Received,
    port: Port,
    metrics: &Metrics,
) {
    match out {
        Ok((Some((reply, to)), t)) => {
            metrics.dhcp_received(port.label(), t.msg, DhcpResult::Answered);
            match send(sock, &reply, to, r.ifindex).await {
                Ok(_) => metrics.dhcp_reply(t.reply, t.client),
                Err(e) => tracing::warn!(%to, "DHCP send failed: {e}"),
            }
        }
        Ok((None, t)) => metrics.dhcp_received(port.label(), t.msg, t.result),
        Err(_) => {
            metrics.dhcp_received(port.label(), DhcpType::Unknown, DhcpResult::Panicked);
            tracing::error!(from = %r.from, "panic while handling a DHCP packet; dropped it")
        }
    }
}

/// Handles one datagram: the reply and where to send it, or nothing (`tally` says why).
async fn handle(
    ctx: &Context,
    port: Port,
    data: &[u8],
    r: &Received,
    tally: &mut Tally,
) -> Option<(Vec<u8>, SocketAddrV4)> {
    // The hardware address (RFC 2131 `chaddr`, at offset 28) a test sends to make this panic.
    #[cfg(test)]
    if data.get(28..34) == Some(&tests::PANIC_MAC[..]) {
        panic!("a test asked for a panic");
    }
    let full = match (&ctx.leases, port) {
        (Some(book), Port::Dhcp) => Some(book),
        _ => None,
    };
    // Address mode answers every client on port 67; ProxyDHCP only boot clients.
    let parsed = if full.is_some() {
        packet::parse(data)
    } else {
        packet::classify(data)
    };
    let req = match parsed {
        Ok(req) => req,
        Err(Drop::Malformed(why)) => {
            tracing::warn!(from = %r.from, "dropped a malformed DHCP packet: {why}");
            tally.result = DhcpResult::Malformed;
            return None;
        }
        Err(e) => {
            tracing::debug!(from = %r.from, "{e}");
            tally.result = match e {
                Drop::Unsupported(_) => DhcpResult::Unsupported,
                _ => DhcpResult::NotForUs,
            };
            return None;
        }
    };
    tally.msg = match req.msg_type {
        MessageType::Discover => DhcpType::Discover,
        MessageType::Request => DhcpType::Request,
        MessageType::Inform => DhcpType::Inform,
        MessageType::Release => DhcpType::Release,
        MessageType::Decline => DhcpType::Decline,
        _ => DhcpType::Other,
    };
    tally.client = match req.kind {
        ClientKind::Pxe => DhcpClient::Pxe,
        ClientKind::Http => DhcpClient::HttpBoot,
        ClientKind::Ipxe => DhcpClient::Ipxe,
        ClientKind::Other => DhcpClient::Other,
    };
    let mac = req.mac;
    let (allowed, first_refusal) = ctx
        .limiter
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow(mac.0, Instant::now());
    if !allowed {
        if first_refusal {
            tracing::warn!(%mac, "DHCP rate limit: more than {} packets in {:?}; dropping this MAC's packets for the rest of the window", RateLimit::MAX, RateLimit::WINDOW);
        }
        tally.result = DhcpResult::RateLimited;
        return None;
    }
    // ProxyDHCP answers DISCOVERs only on port 67: a REQUEST there is addressed to the site's
    // server. It still tells us which address the client is taking, for TFTP attribution.
    if full.is_none() && port == Port::Dhcp && req.msg_type != MessageType::Discover {
        if let Some(ip) = req
            .requested_ip
            .or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr))
        {
            ctx.boot.attribution().learn(ip, mac, Learned::Requested);
        }
        tally.result = DhcpResult::NotForUs;
        return None;
    }
    if port == Port::Pxe {
        let ip = if req.ciaddr.is_unspecified() {
            *r.from.ip()
        } else {
            req.ciaddr
        };
        ctx.boot.attribution().learn(ip, mac, Learned::PxeRequest);
    }
    let server = ctx
        .advertise_ip
        .or_else(|| ctx.ifaddrs.get(r.ifindex))
        .or((!r.local.is_unspecified()).then_some(r.local))?;
    let base_url = ctx
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{server}:{}", ctx.http_port));
    let what = describe(&req);
    let via = match (port, full.is_some()) {
        (Port::Dhcp, false) => "proxy offer",
        (Port::Dhcp, true) => "DHCP offer/ack",
        (Port::Pxe, _) => "PXE boot server ack (port 4011)",
    };
    // RELEASE and DECLINE are about addresses, not booting: handled whatever policy says
    // about the machine, and never answered.
    if let (Some(book), MessageType::Release | MessageType::Decline) = (full, req.msg_type) {
        if req.msg_type == MessageType::Release {
            book.release(mac, Some(req.ciaddr)).await;
        } else if let Some(ip) = req.requested_ip {
            book.decline(mac, ip).await;
        }
        return None;
    }
    // Boot instructions, for boot clients that policy answers.
    let target = if req.kind == ClientKind::Other {
        None
    } else {
        match packet::boot_target(&req, &ctx.files, &base_url) {
            Ok(t) => {
                // What it said, for the operator and discovery rules: the classes, and the
                // interface it arrived on or the relay it came through.
                let said = Sighting {
                    uuid: req.uuid(),
                    dhcp: DhcpSeen {
                        vendor_class: req.vendor_class.clone(),
                        user_class: req.user_class.clone(),
                        interface: req
                            .giaddr
                            .is_unspecified()
                            .then(|| ctx.ifaddrs.name(r.ifindex).map(|n| n.to_string()))
                            .flatten(),
                        relay: (!req.giaddr.is_unspecified()).then(|| req.giaddr.to_string()),
                    },
                    ..Default::default()
                };
                if !ctx.boot.dhcp_answer(mac, said, &what).await {
                    // "Ignore" is no reply at all, in either mode.
                    tally.result = DhcpResult::Ignored;
                    return None;
                }
                Some(t)
            }
            Err(e) => {
                ctx.boot
                    .dhcp_event(mac, EventKind::DhcpIgnored, format!("{what}: {e}"));
                tally.result = DhcpResult::Unsupported;
                // Address mode still gives the client an address.
                full?;
                None
            }
        }
    };
    let (reply, nak) = match full {
        None => (packet::reply(&req, server, target.as_ref()?), false),
        Some(book) => address_mode(book, &req, server, target.as_ref()).await?,
    };
    if let Some(t) = &target {
        if matches!(req.msg_type, MessageType::Discover) || port == Port::Pxe {
            ctx.boot.dhcp_event(
                mac,
                EventKind::DhcpOffered,
                format!("{} via {via} from {server} ({what})", t.file()),
            );
        }
    }
    // RFC 2131 section 4.1: without a relay, a DHCPNAK is broadcast (the client's address is
    // what is in question).
    tally.reply = if nak {
        DhcpReply::Nak
    } else if req.msg_type == MessageType::Discover {
        DhcpReply::Offer
    } else {
        DhcpReply::Ack
    };
    let to = if nak && req.giaddr.is_unspecified() {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
    } else {
        destination(port, &req, r.from)
    };
    Some((reply, to))
}

fn describe(req: &packet::PxeRequest) -> String {
    format!(
        "{} {}{}",
        packet::arch_name(req.arch),
        match req.kind {
            ClientKind::Pxe => "PXE",
            ClientKind::Http => "HTTP Boot",
            ClientKind::Ipxe => "iPXE",
            ClientKind::Other => "DHCP client",
        },
        if req.giaddr.is_unspecified() {
            String::new()
        } else {
            format!(", relayed by {}", req.giaddr)
        }
    )
}

/// RFC 2131 DORA for address mode: offers from the pool (or the machine's reservation),
/// binds on REQUEST or answers NAK, handles RELEASE, DECLINE and INFORM. Leases live in
/// SQLite, so they survive a restart.
async fn address_mode(
    book: &LeaseBook,
    req: &packet::PxeRequest,
    server: Ipv4Addr,
    target: Option<&packet::BootTarget>,
) -> Option<(Vec<u8>, bool)> {
    let mac = req.mac;
    let a = book.mode();
    let params = |yiaddr| packet::LeaseParams {
        yiaddr,
        netmask: a.netmask,
        router: a.router,
        dns: a.dns.clone(),
        lease_secs: a.lease_time.as_secs().min(u64::from(u32::MAX)) as u32,
    };
    match req.msg_type {
        MessageType::Discover => {
            let ip = book.offer(mac, req.requested_ip).await?;
            Some((
                packet::reply_with(req, server, target, Some(&params(ip))),
                false,
            ))
        }
        MessageType::Request => {
            if req.server_id.is_some_and(|s| s != server) {
                // The client took another server's offer: free ours now.
                book.release(mac, None).await;
                return None;
            }
            let ip = req
                .requested_ip
                .or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr))?;
            if book.bind(mac, ip).await {
                Some((
                    packet::reply_with(req, server, target, Some(&params(ip))),
                    false,
                ))
            } else {
                Some((packet::nak(req, server), true))
            }
        }
        MessageType::Inform => Some((
            packet::reply_with(req, server, target, Some(&params(Ipv4Addr::UNSPECIFIED))),
            false,
        )),
        // RELEASE and DECLINE are handled before policy, in `handle`.
        _ => None,
    }
}
