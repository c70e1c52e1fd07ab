//! DHCP leases (address mode). One row per address (`ip` is the primary key); a lease is
//! live while `expires_at` is in the future.
//!
//! Correct without a serialising writer: an allocation chooses a candidate address from a
//! read, then takes it with an upsert whose own `WHERE` clause only lets it through if the
//! row is free (expired) or already this MAC's. If another daemon took the address in
//! between, the upsert changes nothing and the next candidate is tried.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use super::db::{args, Db, Dialect};
use serde::{Deserialize, Serialize};

use super::{EventKind, Result};
use crate::mac::Mac;

/// A lease's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Held between OFFER and REQUEST.
    Offered,
    /// Bound after ACK.
    Bound,
    /// Quarantined: a client found the address in use.
    Declined,
}

impl LeaseState {
    fn parse(s: &str) -> Option<LeaseState> {
        match s {
            "offered" => Some(LeaseState::Offered),
            "bound" => Some(LeaseState::Bound),
            "declined" => Some(LeaseState::Declined),
            _ => None,
        }
    }
}

/// A lease row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The address.
    pub ip: Ipv4Addr,
    /// Who holds it (none for a declined address).
    pub mac: Option<Mac>,
    /// Offered, bound or declined.
    pub state: LeaseState,
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

/// An offer to make (DHCPDISCOVER).
#[derive(Clone, Debug)]
pub struct OfferRequest {
    /// The client.
    pub mac: Mac,
    /// Its reservation (`ip` var), if any.
    pub reservation: Option<Ipv4Addr>,
    /// The address it asked for (option 50), if any.
    pub requested: Option<Ipv4Addr>,
    /// The pool.
    pub pool: Pool,
    /// How long the offered address is held for the REQUEST.
    pub hold_until: i64,
    /// Now, Unix ms.
    pub now: i64,
}

/// A binding to confirm (DHCPREQUEST).
#[derive(Clone, Debug)]
pub struct BindRequest {
    /// The client.
    pub mac: Mac,
    /// The address it asks to bind.
    pub ip: Ipv4Addr,
    /// The pool.
    pub pool: Pool,
    /// Its reservation, if any.
    pub reservation: Option<Ipv4Addr>,
    /// The lease's end.
    pub until: i64,
    /// Now, Unix ms.
    pub now: i64,
}

/// Takes `ip` for `mac` in `state` until `until`, unless someone else holds it live. A bound
/// lease of the same MAC stays bound (an OFFER during renewal). Returns whether it took it.
fn take(
    c: &dyn Db,
    ip: Ipv4Addr,
    mac: &str,
    state: LeaseState,
    until: i64,
    now: i64,
) -> Result<bool> {
    let n = c.exec(
        "INSERT INTO leases (ip, mac, state, expires_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (ip) DO UPDATE SET mac = ?2,
           state = CASE WHEN ?3 = 'offered' AND leases.mac = ?2 AND leases.state = 'bound'
                             AND leases.expires_at > ?5
                        THEN 'bound' ELSE ?3 END,
           expires_at = CASE WHEN ?3 = 'offered' AND leases.mac = ?2
                                  AND leases.expires_at > ?4
                             THEN leases.expires_at ELSE ?4 END,
           updated_at = ?5
         WHERE leases.mac = ?2 OR leases.expires_at <= ?5",
        args![ip.to_string(), mac, state_str(state), until, now],
    )?;
    Ok(n == 1)
}

fn state_str(s: LeaseState) -> &'static str {
    match s {
        LeaseState::Offered => "offered",
        LeaseState::Bound => "bound",
        LeaseState::Declined => "declined",
    }
}

/// Chooses an address for the client and holds it as `offered`: its reservation if it has
/// one, else the address it already holds, else the one it asked for if free, else the lowest
/// free address of the pool. `None` if the pool is exhausted.
pub(super) fn offer(c: &dyn Db, r: &OfferRequest) -> Result<Option<Ipv4Addr>> {
    let mac_s = r.mac.to_string();
    let held: Vec<(String, String)> = c
        .query(
            "SELECT ip, mac FROM leases WHERE expires_at > ?1",
            args![r.now],
        )?
        .iter()
        .map(|row| Ok((row.get(0)?, row.get(1)?)))
        .collect::<Result<_>>()?;
    let mut taken = HashSet::new();
    let mut mine = None;
    for (ip, m) in held {
        let Ok(ip) = ip.parse::<Ipv4Addr>() else {
            continue;
        };
        if m == mac_s {
            mine = Some(ip);
        } else {
            taken.insert(ip);
        }
    }
    let pool = &r.pool;
    let free = |ip: &Ipv4Addr| !taken.contains(ip) && !pool.reserved_for_others.contains(ip);
    let candidates: Box<dyn Iterator<Item = Ipv4Addr>> = match r.reservation {
        // A reservation wins even outside the pool, unless someone else holds it now.
        Some(res) => Box::new(std::iter::once(res).filter(free)),
        None => Box::new(
            mine.filter(|ip| pool.contains(*ip) && free(ip))
                .into_iter()
                .chain(r.requested.filter(|ip| pool.contains(*ip) && free(ip)))
                .chain(
                    (u32::from(pool.start)..=u32::from(pool.end))
                        .map(Ipv4Addr::from)
                        .filter(free),
                ),
        ),
    };
    for ip in candidates {
        if take(c, ip, &mac_s, LeaseState::Offered, r.hold_until, r.now)? {
            // Anything else this MAC held is released: one address per client.
            c.exec(
                "DELETE FROM leases WHERE mac = ?1 AND ip != ?2 AND state != 'declined'",
                args![mac_s, ip.to_string()],
            )?;
            return Ok(Some(ip));
        }
    }
    Ok(None)
}

/// Confirms a REQUEST: `ip` becomes `bound` to the MAC if it is held by it (offered or
/// bound), or free and allowed. Returns false for a NAK.
pub(super) fn bind(c: &dyn Db, r: &BindRequest) -> Result<bool> {
    let allowed = match r.reservation {
        Some(res) => res == r.ip,
        None => r.pool.contains(r.ip) && !r.pool.reserved_for_others.contains(&r.ip),
    };
    let mac_s = r.mac.to_string();
    if !allowed || !take(c, r.ip, &mac_s, LeaseState::Bound, r.until, r.now)? {
        return Ok(false);
    }
    c.exec(
        "DELETE FROM leases WHERE mac = ?1 AND ip != ?2 AND state != 'declined'",
        args![mac_s, r.ip.to_string()],
    )?;
    super::engine::insert_event(
        c,
        r.now,
        Some(r.mac),
        EventKind::DhcpLease,
        &format!("{} until {}", r.ip, super::fmt_time(r.until)),
        1,
    )?;
    Ok(true)
}

/// A DHCPRELEASE, or a client that chose another server: the MAC's lease on `ip` ends (with
/// `ip` None: its offers end).
pub(super) fn release(c: &dyn Db, mac: Mac, ip: Option<Ipv4Addr>) -> Result<()> {
    let mac_s = mac.to_string();
    match ip {
        Some(ip) => c.exec(
            "DELETE FROM leases WHERE mac = ?1 AND ip = ?2 AND state != 'declined'",
            args![mac_s, ip.to_string()],
        )?,
        None => c.exec(
            "DELETE FROM leases WHERE mac = ?1 AND state = 'offered'",
            args![mac_s],
        )?,
    };
    Ok(())
}

/// A DHCPDECLINE from `mac`: it found `ip`, which we gave it, in use by someone else;
/// quarantine the address until `until`. A DECLINE for an address the MAC does not hold
/// changes nothing (any client could otherwise take addresses out of the pool).
pub(super) fn decline(c: &dyn Db, mac: Mac, ip: Ipv4Addr, until: i64, now: i64) -> Result<bool> {
    let n = c.exec(
        "UPDATE leases SET mac = '', state = 'declined', expires_at = ?3, updated_at = ?4
         WHERE ip = ?1 AND mac = ?2 AND expires_at > ?4",
        args![ip.to_string(), mac.to_string(), until, now],
    )?;
    if n == 1 {
        super::engine::insert_event(
            c,
            now,
            Some(mac),
            EventKind::DhcpDecline,
            &format!(
                "{ip} is in use by someone else; quarantined until {}",
                super::fmt_time(until)
            ),
            1,
        )?;
    }
    Ok(n == 1)
}

/// Every DHCP reservation in the inventory: machines whose `ip` variable is set.
pub(super) fn reservations(c: &dyn Db) -> Result<Vec<(Mac, Ipv4Addr)>> {
    let sql = match c.dialect() {
        Dialect::Sqlite => {
            "SELECT mac, json_extract(vars, '$.ip') FROM machines
             WHERE json_extract(vars, '$.ip') IS NOT NULL"
        }
        Dialect::Postgres => {
            "SELECT mac, vars::json->>'ip' FROM machines WHERE vars::json->>'ip' IS NOT NULL"
        }
    };
    let rows = c
        .query(sql, args![])?
        .iter()
        .map(|r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(mac, ip)| Some((mac.parse().ok()?, ip.parse().ok()?)))
        .collect())
}

/// Live leases, by address.
pub(super) fn live(c: &dyn Db, now: i64) -> Result<Vec<Lease>> {
    let rows = c
        .query(
            "SELECT ip, mac, state, expires_at FROM leases WHERE expires_at > ?1 ORDER BY ip",
            args![now],
        )?
        .iter()
        .map(|r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<String>(1)?,
                r.get::<String>(2)?,
                r.get::<i64>(3)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(ip, mac, state, expires_at)| {
            Some(Lease {
                ip: ip.parse().ok()?,
                mac: mac.parse().ok(),
                state: LeaseState::parse(&state)?,
                expires_at,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{on_both, Engine};
    use crate::store::{Inventory, Limits, SqlInventory};

    on_both!(
        offers_are_stable_unique_and_exhaust,
        bind_nak_release_decline_and_reservations,
        taking_an_address_never_overwrites_a_live_holder
    );

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

    fn offer(
        m: u8,
        reservation: Option<Ipv4Addr>,
        requested: Option<Ipv4Addr>,
        pool: &Pool,
        hold_until: i64,
        now: i64,
    ) -> OfferRequest {
        OfferRequest {
            mac: mac(m),
            reservation,
            requested,
            pool: pool.clone(),
            hold_until,
            now,
        }
    }

    fn bind(
        m: u8,
        a: Ipv4Addr,
        pool: &Pool,
        reservation: Option<Ipv4Addr>,
        now: i64,
    ) -> BindRequest {
        BindRequest {
            mac: mac(m),
            ip: a,
            pool: pool.clone(),
            reservation,
            until: 10_000,
            now,
        }
    }

    async fn offers_are_stable_unique_and_exhaust(engine: Engine) {
        let s = engine.store().await;
        let p = pool();
        assert_eq!(
            s.lease_offer(offer(1, None, None, &p, 100, 0))
                .await
                .unwrap(),
            Some(ip("10.0.0.10"))
        );
        // The same client gets the same address again.
        assert_eq!(
            s.lease_offer(offer(1, None, Some(ip("10.0.0.12")), &p, 100, 1))
                .await
                .unwrap(),
            Some(ip("10.0.0.10"))
        );
        // Another client asking for a taken address gets a free one.
        assert_eq!(
            s.lease_offer(offer(2, None, Some(ip("10.0.0.10")), &p, 100, 1))
                .await
                .unwrap(),
            Some(ip("10.0.0.11"))
        );
        assert_eq!(
            s.lease_offer(offer(3, None, Some(ip("10.0.0.12")), &p, 100, 1))
                .await
                .unwrap(),
            Some(ip("10.0.0.12"))
        );
        assert_eq!(
            s.lease_offer(offer(4, None, None, &p, 100, 1))
                .await
                .unwrap(),
            None,
            "pool exhausted"
        );
        // Offers expire.
        assert_eq!(
            s.lease_offer(offer(4, None, None, &p, 300, 200))
                .await
                .unwrap(),
            Some(ip("10.0.0.10"))
        );
    }

    async fn bind_nak_release_decline_and_reservations(engine: Engine) {
        let s = engine.store().await;
        let mut p = pool();
        let a = s
            .lease_offer(offer(1, None, None, &p, 100, 0))
            .await
            .unwrap()
            .unwrap();
        assert!(s.lease_bind(bind(1, a, &p, None, 1)).await.unwrap());
        assert!(
            !s.lease_bind(bind(2, a, &p, None, 2)).await.unwrap(),
            "held by another: NAK"
        );
        assert!(
            !s.lease_bind(bind(2, ip("10.0.0.99"), &p, None, 2))
                .await
                .unwrap(),
            "outside the pool: NAK"
        );
        // A bound lease survives a later offer to the same client (renewal).
        assert_eq!(
            s.lease_offer(offer(1, None, None, &p, 50, 3))
                .await
                .unwrap(),
            Some(a)
        );
        assert_eq!(s.leases(4).await.unwrap()[0].state, LeaseState::Bound);
        s.lease_release(mac(1), Some(a)).await.unwrap();
        assert!(s.leases(5).await.unwrap().is_empty());
        assert!(
            !s.lease_decline(mac(9), ip("10.0.0.11"), 1000, 6)
                .await
                .unwrap(),
            "not its lease: ignored"
        );
        let held = s
            .lease_offer(offer(8, None, None, &p, 100, 6))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(held, ip("10.0.0.10"));
        assert!(s.lease_decline(mac(8), held, 1000, 6).await.unwrap());
        assert_eq!(
            s.lease_offer(offer(3, None, None, &p, 100, 7))
                .await
                .unwrap(),
            Some(ip("10.0.0.11")),
            "declined address skipped"
        );
        // Reservations: a reserved address goes only to its machine, even outside the pool.
        p.reserved_for_others.insert(ip("10.0.0.12"));
        assert_eq!(
            s.lease_offer(offer(4, None, None, &p, 100, 8))
                .await
                .unwrap(),
            None,
            "10.0.0.12 is someone's reservation"
        );
        assert_eq!(
            s.lease_offer(offer(5, Some(ip("10.0.0.50")), None, &p, 100, 8))
                .await
                .unwrap(),
            Some(ip("10.0.0.50"))
        );
        assert!(s
            .lease_bind(bind(5, ip("10.0.0.50"), &p, Some(ip("10.0.0.50")), 9))
            .await
            .unwrap());
    }

    /// The upsert that takes an address checks the holder itself: a row another client holds
    /// live is never overwritten, even by an offer that chose the address from a stale read
    /// (as a second daemon on a shared database could).
    async fn taking_an_address_never_overwrites_a_live_holder(engine: Engine) {
        let s = engine.store().await;
        let p = pool();
        let a = s
            .lease_offer(offer(1, None, None, &p, 100, 0))
            .await
            .unwrap()
            .unwrap();
        let took = s
            .write(move |c| take(c, a, &mac(2).to_string(), LeaseState::Offered, 100, 1))
            .await
            .unwrap();
        assert!(!took);
        assert_eq!(s.leases(2).await.unwrap()[0].mac, Some(mac(1)));
    }

    #[tokio::test]
    async fn leases_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.db");
        {
            let s = SqlInventory::open(&path, Limits::default()).unwrap();
            let a = s
                .lease_offer(offer(1, None, None, &pool(), 100, 0))
                .await
                .unwrap()
                .unwrap();
            s.lease_bind(bind(1, a, &pool(), None, 1)).await.unwrap();
        }
        let s = SqlInventory::open(&path, Limits::default()).unwrap();
        assert_eq!(s.leases(2).await.unwrap().len(), 1);
        assert_eq!(
            s.lease_offer(offer(2, None, None, &pool(), 100, 3))
                .await
                .unwrap(),
            Some(ip("10.0.0.11"))
        );
    }
}
