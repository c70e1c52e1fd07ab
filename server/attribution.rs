//! Which machine is behind a client IP address: TFTP and UEFI HTTP Boot requests carry only
//! an address, yet their events belong on a machine's timeline; and an install claim
//! (`/ipxe?mac=M`) needs evidence that the address asking is M's.
//!
//! DHCP tells us first (the address a client requests from the site's server, or the source of
//! its port-4011 request, or the lease we bound); the kernel's neighbour table is the fallback.
//! An observation cache, not machine state: losing it on restart loses nothing, and it is
//! bounded.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::mac::Mac;

/// Most addresses remembered; past this the map starts over (a flood of spoofed requests
/// cannot grow it).
const MAX_ENTRIES: usize = 65_536;

/// How long a DHCP sighting counts as evidence for an install claim. A PXE boot goes from the
/// firmware's DHCP through TFTP to iPXE's own DHCP and its `/ipxe` request in seconds; ten
/// minutes covers a slow firmware without letting an address seen long ago vouch for whoever
/// holds it now.
pub const EVIDENCE_MAX_AGE: Duration = Duration::from_secs(600);

/// How DHCP learned that a MAC uses an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// The client's DHCPREQUEST to the site's server (broadcast: ProxyDHCP sees it).
    Requested,
    /// The source (or ciaddr) of its request to our port 4011.
    PxeRequest,
    /// The lease provision bound to it (full DHCP mode).
    Lease,
}

impl Learned {
    fn describe(self) -> &'static str {
        match self {
            Learned::Requested => "its DHCP request for that address",
            Learned::PxeRequest => "its PXE request from that address",
            Learned::Lease => "provision's lease of that address to it",
        }
    }
}

/// What the daemon itself observed about who uses an address, for an install claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// The claim matches what was observed; says what.
    Matches(String),
    /// What was observed names another machine; says what.
    Contradicts(String),
    /// Nothing was observed about the address (a relayed or routed client, IPv6, loopback).
    None,
}

/// Client IP → MAC.
#[derive(Default)]
pub struct Attribution {
    seen: Mutex<HashMap<Ipv4Addr, (Mac, Instant, Learned)>>,
}

impl Attribution {
    /// Remembers that `mac` uses (or is taking) `ip`, as DHCP showed by `how`.
    pub fn learn(&self, ip: Ipv4Addr, mac: Mac, how: Learned) {
        let mut map = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES && !map.contains_key(&ip) {
            map.clear();
        }
        map.insert(ip, (mac, Instant::now(), how));
    }

    fn learned(&self, ip: IpAddr) -> Option<(Mac, Instant, Learned)> {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&v4)
                .copied(),
            IpAddr::V6(_) => None,
        }
    }

    /// The machine behind `ip`, if DHCP or the neighbour table knows it.
    pub fn mac_of(&self, ip: IpAddr) -> Option<Mac> {
        self.learned(ip)
            .map(|(mac, _, _)| mac)
            .or_else(|| crate::neighbors::mac_of(ip))
    }

    /// Whether what the daemon observed backs the claim that `ip` is `mac`. The kernel's
    /// neighbour table comes first: it holds the link-layer source of the very packets that
    /// came from `ip`, where a DHCP sighting is only what some packet said. Then a DHCP
    /// sighting of at most [`EVIDENCE_MAX_AGE`].
    pub fn evidence(&self, ip: IpAddr, mac: Mac) -> Evidence {
        self.evidence_with(ip, mac, crate::neighbors::mac_of(ip), Instant::now())
    }

    fn evidence_with(
        &self,
        ip: IpAddr,
        mac: Mac,
        neighbour: Option<Mac>,
        now: Instant,
    ) -> Evidence {
        let ip = ip.to_canonical();
        match neighbour {
            Some(m) if m == mac => {
                return Evidence::Matches(format!("the neighbour table has {ip} at {mac}"))
            }
            Some(other) => {
                return Evidence::Contradicts(format!("the neighbour table has {ip} at {other}"))
            }
            None => {}
        }
        match self.learned(ip) {
            Some((m, at, how)) if now.saturating_duration_since(at) <= EVIDENCE_MAX_AGE => {
                // No age in the text: a refused machine that retries repeats the same event,
                // which is then counted on one row instead of written as a row per retry.
                let what = format!(
                    "DHCP saw {m} take {ip} within the last {} minutes ({})",
                    EVIDENCE_MAX_AGE.as_secs() / 60,
                    how.describe()
                );
                if m == mac {
                    Evidence::Matches(what)
                } else {
                    Evidence::Contradicts(what)
                }
            }
            _ => Evidence::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(s: &str) -> Mac {
        s.parse().unwrap()
    }

    #[test]
    fn the_neighbour_table_outranks_dhcp_and_stale_sightings_count_for_nothing() {
        let a = Attribution::default();
        let (m, other) = (mac("52:54:00:00:00:01"), mac("52:54:00:00:00:02"));
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let now = Instant::now();
        let ev = |ip, claimed, neighbour| a.evidence_with(ip, claimed, neighbour, now);
        assert_eq!(ev(ip, m, None), Evidence::None);
        assert!(matches!(ev(ip, m, Some(m)), Evidence::Matches(_)));
        assert!(matches!(ev(ip, m, Some(other)), Evidence::Contradicts(_)));
        a.learn(Ipv4Addr::new(10, 0, 0, 5), m, Learned::Requested);
        assert!(matches!(ev(ip, m, None), Evidence::Matches(_)));
        // The neighbour table saw the packets themselves: it wins over what DHCP said.
        assert!(matches!(ev(ip, m, Some(other)), Evidence::Contradicts(_)));
        assert!(matches!(ev(ip, other, None), Evidence::Contradicts(_)));
        // IPv4-mapped IPv6 is the same address; IPv6 and loopback have no evidence.
        assert!(matches!(
            ev("::ffff:10.0.0.5".parse().unwrap(), m, None),
            Evidence::Matches(_)
        ));
        assert_eq!(ev("::1".parse().unwrap(), m, None), Evidence::None);
        assert_eq!(ev("127.0.0.1".parse().unwrap(), m, None), Evidence::None);
        // A sighting older than the evidence window is no evidence.
        let later = Instant::now() + EVIDENCE_MAX_AGE + Duration::from_secs(1);
        assert_eq!(a.evidence_with(ip, m, None, later), Evidence::None);
    }
}
