//! The IPv4 address of each interface, cached: every reply names the arrival interface's
//! address as the boot server, and asking the kernel (`getifaddrs`, a netlink dump) for every
//! packet would cost more than the rest of the reply.
//!
//! The cache is dropped whenever the kernel announces an address change (an rtnetlink socket
//! subscribed to `RTMGRP_IPV4_IFADDR`, rtnetlink(7)), and otherwise lives for at most
//! [`MAX_AGE`], which also covers a kernel where that socket cannot be opened.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

/// Longest a cached address is trusted without a change notification.
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// rtnetlink multicast group of IPv4 address changes (linux/rtnetlink.h).
const RTMGRP_IPV4_IFADDR: u32 = 0x10;

/// Interface index → first IPv4 address and the interface's name.
type ByIndex = HashMap<u32, (Ipv4Addr, Arc<str>)>;

/// Interface index → first IPv4 address, and the interface's name.
#[derive(Default)]
pub struct InterfaceAddrs {
    cache: Mutex<Option<(Instant, ByIndex)>>,
    stale: AtomicBool,
}

impl InterfaceAddrs {
    /// The first IPv4 address of the interface with index `ifindex`.
    pub fn get(&self, ifindex: u32) -> Option<Ipv4Addr> {
        self.with(ifindex, |(ip, _)| *ip)
    }

    /// The name of the interface with index `ifindex` (one with an IPv4 address).
    pub fn name(&self, ifindex: u32) -> Option<Arc<str>> {
        self.with(ifindex, |(_, name)| name.clone())
    }

    fn with<T>(&self, ifindex: u32, f: impl FnOnce(&(Ipv4Addr, Arc<str>)) -> T) -> Option<T> {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = matches!(&*c, Some((at, _)) if at.elapsed() < MAX_AGE)
            && !self.stale.swap(false, Ordering::Relaxed);
        if !fresh {
            *c = Some((Instant::now(), read_all()));
        }
        c.as_ref().and_then(|(_, m)| m.get(&ifindex)).map(f)
    }

    /// Forgets every cached address (an address changed).
    pub fn invalidate(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    /// Invalidates the cache on every kernel address notification until `shutdown`. Returns
    /// at once (leaving the age limit to refresh the cache) if the socket cannot be opened.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let fd = match socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .and_then(|fd| bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_IPV4_IFADDR)).map(|()| fd))
        {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!("no rtnetlink address notifications ({e}); interface addresses are re-read every {MAX_AGE:?}");
                return;
            }
        };
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for
        // the AsyncFd's whole life.
        let Ok(afd) =
            (unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) })
        else {
            return;
        };
        let mut buf = [0u8; 8192];
        loop {
            let ready = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = afd.readable() => r,
            };
            let Ok(mut guard) = ready else { return };
            // The content does not matter: any message means an address changed.
            loop {
                match nix::unistd::read(afd.get_ref(), &mut buf) {
                    Ok(0) => break,
                    Ok(_) => self.invalidate(),
                    Err(nix::errno::Errno::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    // ENOBUFS: notifications were lost; the cache may be stale.
                    Err(_) => {
                        self.invalidate();
                        guard.clear_ready();
                        break;
                    }
                }
            }
        }
    }
}

fn read_all() -> ByIndex {
    let mut out = HashMap::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    let mut index: HashMap<String, Option<u32>> = HashMap::new();
    for a in addrs {
        let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) else {
            continue;
        };
        let idx = *index
            .entry(a.interface_name.clone())
            .or_insert_with(|| nix::net::if_::if_nametoindex(a.interface_name.as_str()).ok());
        if let Some(i) = idx {
            out.entry(i)
                .or_insert_with(|| (sin.ip(), Arc::from(a.interface_name.as_str())));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_its_address_and_invalidation_rereads() {
        let c = InterfaceAddrs::default();
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        assert_eq!(c.get(lo), Some(Ipv4Addr::LOCALHOST));
        c.invalidate();
        assert_eq!(c.get(lo), Some(Ipv4Addr::LOCALHOST));
        assert_eq!(c.get(u32::MAX), None);
        assert_eq!(c.name(lo).as_deref(), Some("lo"));
    }
}
