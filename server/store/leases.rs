//! DHCP leases (address mode). Allocation reads and writes in one `BEGIN IMMEDIATE`
//! transaction, so two DISCOVERs can never be offered the same address.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{Result, Store};
use crate::mac::Mac;

/// A lease row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lease {
    /// The address.
    pub ip: Ipv4Addr,
    /// Who holds it.
    pub mac: String,
    /// offered, bound or declined.
    pub state: String,
    /// Unix ms.
    pub expires_at: i64,
}

/// The pool and rules an allocation follows.
#[derive(Clone, Debug)]
pub struct Pool {
    /// First address of the range.
    pub start: Ipv4Addr,
    /// Last address of the range (inclusive).
    pub end: Ipv4Addr,
    /// Addresses reserved for other machines: never given to this one.
    pub reserved_for_others: HashSet<Ipv4Addr>,
}

impl Pool {
    fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.start)..=u32::from(self.end)).contains(&u32::from(ip))
    }
}

impl Store {
    /// Chooses an address for `mac` and holds it as `offered` until `hold_until`: its
    /// reservation if it has one, else the address it already holds, else the one it asked
    /// for if free, else the lowest free address of the pool. `None` if the pool is exhausted.
    pub fn lease_offer(
        &self,
        mac: Mac,
        reservation: Option<Ipv4Addr>,
        requested: Option<Ipv4Addr>,
        pool: &Pool,
        hold_until: i64,
        now: i64,
    ) -> Result<Option<Ipv4Addr>> {
        let mac_s = mac.to_string();
        self.write(|tx| {
            let held: Vec<(String, String)> = tx
                .prepare_cached("SELECT ip, mac FROM leases WHERE expires_at > ?1")?
                .query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut taken = HashSet::new();
            let mut mine = None;
            for (ip, m) in held {
                let Ok(ip) = ip.parse::<Ipv4Addr>() else { continue };
                if m == mac_s {
                    mine = Some(ip);
                } else {
                    taken.insert(ip);
                }
            }
            let free = |ip: &Ipv4Addr| !taken.contains(ip) && !pool.reserved_for_others.contains(ip);
            let choice = match reservation {
                // A reservation wins even outside the pool, unless someone else holds it now.
                Some(r) => free(&r).then_some(r),
                None => mine
                    .filter(|ip| pool.contains(*ip) && free(ip))
                    .or(requested.filter(|ip| pool.contains(*ip) && free(ip)))
                    .or_else(|| {
                        (u32::from(pool.start)..=u32::from(pool.end))
                            .map(Ipv4Addr::from)
                            .find(|ip| free(ip))
                    }),
            };
            let Some(ip) = choice else { return Ok(None) };
            // Anything else this MAC held is released: one address per client.
            tx.execute("DELETE FROM leases WHERE mac = ?1 AND ip != ?2 AND state != 'declined'", params![mac_s, ip.to_string()])?;
            tx.execute(
                "INSERT INTO leases (ip, mac, state, expires_at, updated_at) VALUES (?1, ?2, 'offered', ?3, ?4)
                 ON CONFLICT (ip) DO UPDATE SET mac = ?2,
                   state = CASE WHEN leases.mac = ?2 AND leases.state = 'bound' AND leases.expires_at > ?4
                                THEN 'bound' ELSE 'offered' END,
                   expires_at = MAX(?3, CASE WHEN leases.mac = ?2 THEN leases.expires_at ELSE 0 END),
                   updated_at = ?4",
                params![ip.to_string(), mac_s, hold_until, now],
            )?;
            Ok(Some(ip))
        })
    }

    /// Confirms a REQUEST: `ip` becomes `bound` to `mac` until `until` if it is held by this
    /// MAC (offered or bound), or free and allowed. Returns false for a NAK.
    pub fn lease_bind(
        &self,
        mac: Mac,
        ip: Ipv4Addr,
        pool: &Pool,
        reservation: Option<Ipv4Addr>,
        until: i64,
        now: i64,
    ) -> Result<bool> {
        let mac_s = mac.to_string();
        self.write(|tx| {
            let holder: Option<(String, String, i64)> = tx
                .query_row("SELECT mac, state, expires_at FROM leases WHERE ip = ?1", [ip.to_string()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let held_by_other = matches!(&holder, Some((m, _, exp)) if *m != mac_s && *exp > now);
            let allowed = match reservation {
                Some(r) => r == ip,
                None => pool.contains(ip) && !pool.reserved_for_others.contains(&ip),
            };
            if held_by_other || !allowed {
                return Ok(false);
            }
            tx.execute("DELETE FROM leases WHERE mac = ?1 AND ip != ?2 AND state != 'declined'", params![mac_s, ip.to_string()])?;
            tx.execute(
                "INSERT INTO leases (ip, mac, state, expires_at, updated_at) VALUES (?1, ?2, 'bound', ?3, ?4)
                 ON CONFLICT (ip) DO UPDATE SET mac = ?2, state = 'bound', expires_at = ?3, updated_at = ?4",
                params![ip.to_string(), mac_s, until, now],
            )?;
            Ok(true)
        })
    }

    /// A DHCPRELEASE, or a client that chose another server: the MAC's lease on `ip` ends.
    pub fn lease_release(&self, mac: Mac, ip: Option<Ipv4Addr>) -> Result<()> {
        let mac_s = mac.to_string();
        self.write(|tx| {
            match ip {
                Some(ip) => tx.execute(
                    "DELETE FROM leases WHERE mac = ?1 AND ip = ?2 AND state != 'declined'",
                    params![mac_s, ip.to_string()],
                )?,
                None => tx.execute(
                    "DELETE FROM leases WHERE mac = ?1 AND state = 'offered'",
                    [mac_s],
                )?,
            };
            Ok(())
        })
    }

    /// A DHCPDECLINE from `mac`: it found `ip`, which we gave it, in use by someone else;
    /// quarantine the address until `until`. A DECLINE for an address the MAC does not hold
    /// changes nothing (any client could otherwise take addresses out of the pool).
    pub fn lease_decline(&self, mac: Mac, ip: Ipv4Addr, until: i64, now: i64) -> Result<bool> {
        self.write(|tx| {
            let holder: Option<String> = tx
                .query_row("SELECT mac FROM leases WHERE ip = ?1 AND expires_at > ?2", params![ip.to_string(), now], |r| r.get(0))
                .optional()?;
            if holder.as_deref() != Some(mac.to_string().as_str()) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO leases (ip, mac, state, expires_at, updated_at) VALUES (?1, '', 'declined', ?2, ?3)
                 ON CONFLICT (ip) DO UPDATE SET mac = '', state = 'declined', expires_at = ?2, updated_at = ?3",
                params![ip.to_string(), until, now],
            )?;
            Ok(true)
        })
    }

    /// Every DHCP reservation in the inventory: machines whose `ip` variable is set, as
    /// (MAC, address): one query, instead of loading every machine (with its host keys) for
    /// each DHCP packet.
    pub fn reservations(&self) -> Result<Vec<(Mac, Ipv4Addr)>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT mac, json_extract(vars, '$.ip') FROM machines WHERE json_extract(vars, '$.ip') IS NOT NULL",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(mac, ip)| Some((mac.parse().ok()?, ip.parse().ok()?)))
            .collect())
    }

    /// Live leases, by address.
    pub fn leases(&self, now: i64) -> Result<Vec<Lease>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT ip, mac, state, expires_at FROM leases WHERE expires_at > ?1 ORDER BY ip",
        )?;
        let rows = stmt
            .query_map([now], |r| {
                Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(ip, mac, state, expires_at)| {
                Some(Lease {
                    ip: ip.parse().ok()?,
                    mac,
                    state,
                    expires_at,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool {
            start: "10.0.0.10".parse().unwrap(),
            end: "10.0.0.12".parse().unwrap(),
            reserved_for_others: HashSet::new(),
        }
    }

    fn mac(n: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, n])
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn offers_are_stable_unique_and_exhaust() {
        let s = Store::open_in_memory().unwrap();
        let p = pool();
        assert_eq!(
            s.lease_offer(mac(1), None, None, &p, 100, 0).unwrap(),
            Some(ip("10.0.0.10"))
        );
        // The same client gets the same address again.
        assert_eq!(
            s.lease_offer(mac(1), None, Some(ip("10.0.0.12")), &p, 100, 1)
                .unwrap(),
            Some(ip("10.0.0.10"))
        );
        // Another client asking for a taken address gets a free one.
        assert_eq!(
            s.lease_offer(mac(2), None, Some(ip("10.0.0.10")), &p, 100, 1)
                .unwrap(),
            Some(ip("10.0.0.11"))
        );
        assert_eq!(
            s.lease_offer(mac(3), None, Some(ip("10.0.0.12")), &p, 100, 1)
                .unwrap(),
            Some(ip("10.0.0.12"))
        );
        assert_eq!(
            s.lease_offer(mac(4), None, None, &p, 100, 1).unwrap(),
            None,
            "pool exhausted"
        );
        // Offers expire.
        assert_eq!(
            s.lease_offer(mac(4), None, None, &p, 300, 200).unwrap(),
            Some(ip("10.0.0.10"))
        );
    }

    #[test]
    fn bind_nak_release_decline_and_reservations() {
        let s = Store::open_in_memory().unwrap();
        let mut p = pool();
        let a = s
            .lease_offer(mac(1), None, None, &p, 100, 0)
            .unwrap()
            .unwrap();
        assert!(s.lease_bind(mac(1), a, &p, None, 10_000, 1).unwrap());
        assert!(
            !s.lease_bind(mac(2), a, &p, None, 10_000, 2).unwrap(),
            "held by another: NAK"
        );
        assert!(
            !s.lease_bind(mac(2), ip("10.0.0.99"), &p, None, 10_000, 2)
                .unwrap(),
            "outside the pool: NAK"
        );
        // A bound lease survives a later offer to the same client (renewal).
        assert_eq!(
            s.lease_offer(mac(1), None, None, &p, 50, 3).unwrap(),
            Some(a)
        );
        assert_eq!(s.leases(4).unwrap()[0].state, "bound");
        s.lease_release(mac(1), Some(a)).unwrap();
        assert!(s.leases(5).unwrap().is_empty());
        assert!(
            !s.lease_decline(mac(9), ip("10.0.0.11"), 1000, 6).unwrap(),
            "not its lease: ignored"
        );
        let held = s
            .lease_offer(mac(8), None, None, &p, 100, 6)
            .unwrap()
            .unwrap();
        assert_eq!(held, ip("10.0.0.10"));
        assert!(s.lease_decline(mac(8), held, 1000, 6).unwrap());
        assert_eq!(
            s.lease_offer(mac(3), None, None, &p, 100, 7).unwrap(),
            Some(ip("10.0.0.11")),
            "declined address skipped"
        );
        // Reservations: a reserved address goes only to its machine, even outside the pool.
        p.reserved_for_others.insert(ip("10.0.0.12"));
        assert_eq!(
            s.lease_offer(mac(4), None, None, &p, 100, 8).unwrap(),
            None,
            "10.0.0.12 is someone's reservation"
        );
        assert_eq!(
            s.lease_offer(mac(5), Some(ip("10.0.0.50")), None, &p, 100, 8)
                .unwrap(),
            Some(ip("10.0.0.50"))
        );
        assert!(s
            .lease_bind(
                mac(5),
                ip("10.0.0.50"),
                &p,
                Some(ip("10.0.0.50")),
                10_000,
                9
            )
            .unwrap());
    }

    #[test]
    fn leases_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.db");
        {
            let s = Store::open(&path).unwrap();
            let a = s
                .lease_offer(mac(1), None, None, &pool(), 100, 0)
                .unwrap()
                .unwrap();
            s.lease_bind(mac(1), a, &pool(), None, 10_000, 1).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.leases(2).unwrap().len(), 1);
        assert_eq!(
            s.lease_offer(mac(2), None, None, &pool(), 100, 3).unwrap(),
            Some(ip("10.0.0.11"))
        );
    }
}
