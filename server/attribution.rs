//! Which machine is behind a client IP address: TFTP and UEFI HTTP Boot requests carry only
//! an address, yet their events belong on a machine's timeline.
//!
//! DHCP tells us first (the address a client requests from the site's server, or the source of
//! its port-4011 request, or the lease we bound); the kernel's neighbour table is the fallback.
//! An observation cache, not machine state: losing it on restart loses nothing, and it is
//! bounded.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use crate::mac::Mac;

/// Most addresses remembered; past this the map starts over (a flood of spoofed requests
/// cannot grow it).
const MAX_ENTRIES: usize = 65_536;

/// Client IP → MAC.
#[derive(Default)]
pub struct Attribution {
    seen: Mutex<HashMap<Ipv4Addr, Mac>>,
}

impl Attribution {
    /// Remembers that `mac` uses (or is taking) `ip`.
    pub fn learn(&self, ip: Ipv4Addr, mac: Mac) {
        let mut map = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES && !map.contains_key(&ip) {
            map.clear();
        }
        map.insert(ip, mac);
    }

    /// The machine behind `ip`, if DHCP or the neighbour table knows it.
    pub fn mac_of(&self, ip: IpAddr) -> Option<Mac> {
        let learned = match ip.to_canonical() {
            IpAddr::V4(v4) => self
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&v4)
                .copied(),
            IpAddr::V6(_) => None,
        };
        learned.or_else(|| crate::neighbors::mac_of(ip))
    }
}
