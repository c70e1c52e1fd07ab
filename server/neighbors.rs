//! Which MAC is behind a client IP address, from the kernel's neighbour (ARP) table.
//!
//! TFTP and HTTP requests carry only an IP address. A PXE client on the same link has always
//! ARPed for us before it sends its first packet, so the kernel already holds its MAC; that is
//! enough to put a TFTP transfer on the right machine's timeline. Off-link (relayed) clients
//! have no entry and their transfers are recorded without a machine.

use std::net::{IpAddr, Ipv4Addr};

use crate::mac::Mac;

/// Looks `ip` up in the kernel's neighbour table. Read through `/proc/self/net/arp` (the
/// same file as `/proc/net/arp`, which is a link to it) because systemd's `ProcSubset=pid`,
/// which the unit uses, hides everything in `/proc` that is not a process.
pub fn mac_of(ip: IpAddr) -> Option<Mac> {
    let IpAddr::V4(v4) = ip else { return None };
    let table = std::fs::read_to_string("/proc/self/net/arp").ok()?;
    lookup(&table, v4)
}

/// Finds `ip` in the text of `/proc/net/arp` (columns: IP address, HW type, Flags, HW address,
/// Mask, Device). Incomplete entries (flags 0x0) and all-zero MACs are skipped.
pub fn lookup(table: &str, ip: Ipv4Addr) -> Option<Mac> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 4 || cols[0].parse::<Ipv4Addr>().ok()? != ip || cols[2] == "0x0" {
            return None;
        }
        let mac: Mac = cols[3].parse().ok()?;
        (mac.0 != [0; 6]).then_some(mac)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_arp() {
        let t = "IP address       HW type     Flags       HW address            Mask     Device\n\
                 10.0.0.5         0x1         0x2         52:54:00:12:34:56     *        br0\n\
                 10.0.0.6         0x1         0x0         00:00:00:00:00:00     *        br0\n";
        assert_eq!(
            lookup(t, "10.0.0.5".parse().unwrap()).unwrap().to_string(),
            "52:54:00:12:34:56"
        );
        assert_eq!(lookup(t, "10.0.0.6".parse().unwrap()), None);
        assert_eq!(lookup(t, "10.0.0.7".parse().unwrap()), None);
    }
}
