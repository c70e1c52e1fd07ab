//! The lease book of address mode: RFC 2131 address decisions over the inventory's leases,
//! with reservations (a machine's `ip` variable). Every decision is one durable inventory
//! operation; the events that change no lease (a NAK, an exhausted pool) are observations.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::attribution::{Attribution, Learned};
use crate::mac::Mac;
use crate::policy::EventKind;
use crate::store::{self, BindRequest, Inventory, Observation, OfferRequest, Pool};

use super::AddressMode;

/// RFC 2131 section 4.3.1: the server may reserve the offered address for the REQUEST that
/// follows; a minute is plenty.
const OFFER_HOLD_MS: i64 = 60_000;
/// How long a declined address is quarantined.
const DECLINE_QUARANTINE_MS: i64 = 600_000;

/// Address mode's leases.
pub struct LeaseBook {
    inv: Arc<dyn Inventory>,
    attribution: Arc<Attribution>,
    mode: AddressMode,
}

impl LeaseBook {
    /// Leases from `mode`'s pool in `inv`; bound addresses are taught to `attribution`.
    pub fn new(inv: Arc<dyn Inventory>, attribution: Arc<Attribution>, mode: AddressMode) -> Self {
        LeaseBook {
            inv,
            attribution,
            mode,
        }
    }

    /// The pool parameters.
    pub fn mode(&self) -> &AddressMode {
        &self.mode
    }

    fn observe(&self, mac: Mac, kind: EventKind, detail: String) {
        self.inv.observe(Observation::Event {
            mac: Some(mac),
            kind,
            detail,
            at: store::now_ms(),
        });
    }

    /// The address reserved for `mac` and the pool with every other machine's reservation.
    async fn pool(&self, mac: Mac) -> Option<(Option<Ipv4Addr>, Pool)> {
        let all = match self.inv.reservations().await {
            Ok(all) => all,
            Err(e) => {
                tracing::error!("reading DHCP reservations: {e}");
                return None;
            }
        };
        let mut mine = None;
        let mut others = HashSet::new();
        for (m, ip) in all {
            if m == mac {
                mine = Some(ip);
            } else {
                others.insert(ip);
            }
        }
        Some((
            mine,
            Pool {
                start: self.mode.start,
                end: self.mode.end,
                reserved_for_others: others,
            },
        ))
    }

    /// DHCPDISCOVER: the address to offer `mac`, held briefly until its REQUEST.
    pub async fn offer(&self, mac: Mac, requested: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        let (reservation, pool) = self.pool(mac).await?;
        let now = store::now_ms();
        let req = OfferRequest {
            mac,
            reservation,
            requested,
            pool,
            hold_until: now + OFFER_HOLD_MS,
            now,
        };
        match self.inv.lease_offer(req).await {
            Ok(Some(ip)) => Some(ip),
            Ok(None) => {
                self.observe(
                    mac,
                    EventKind::DhcpPoolExhausted,
                    format!("no free address in {}-{}", self.mode.start, self.mode.end),
                );
                None
            }
            Err(e) => {
                tracing::error!(%mac, "lease offer: {e}");
                None
            }
        }
    }

    /// DHCPREQUEST: binds `ip` to `mac`; false means NAK.
    pub async fn bind(&self, mac: Mac, ip: Ipv4Addr) -> bool {
        let Some((reservation, pool)) = self.pool(mac).await else {
            return false;
        };
        let now = store::now_ms();
        let req = BindRequest {
            mac,
            ip,
            pool,
            reservation,
            until: now + self.mode.lease_time.as_millis() as i64,
            now,
        };
        match self.inv.lease_bind(req).await {
            Ok(true) => {
                self.attribution.learn(ip, mac, Learned::Lease);
                true
            }
            Ok(false) => {
                self.observe(
                    mac,
                    EventKind::DhcpNak,
                    format!("{ip} is not this machine's to use"),
                );
                false
            }
            Err(e) => {
                tracing::error!(%mac, "lease bind: {e}");
                false
            }
        }
    }

    /// DHCPRELEASE (or, with `ip` None, a client that chose another server's offer).
    pub async fn release(&self, mac: Mac, ip: Option<Ipv4Addr>) {
        if let Err(e) = self.inv.lease_release(mac, ip).await {
            tracing::error!(%mac, "lease release: {e}");
        }
    }

    /// DHCPDECLINE: the client found its address in use; quarantine it.
    pub async fn decline(&self, mac: Mac, ip: Ipv4Addr) {
        let now = store::now_ms();
        match self
            .inv
            .lease_decline(mac, ip, now + DECLINE_QUARANTINE_MS, now)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%mac, %ip, "ignored a DHCPDECLINE for an address this MAC does not hold")
            }
            Err(e) => tracing::error!(%mac, "lease decline: {e}"),
        }
    }
}
