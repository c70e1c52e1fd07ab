//! The service manager's notification protocol (`sd_notify(3)`): READY once every listener is
//! bound and the database migrated, STATUS with what the daemon listens on, WATCHDOG from a
//! task that proves the inventory's writer still answers, RELOADING/READY around a SIGHUP
//! reload, STOPPING at shutdown. Without `NOTIFY_SOCKET` (not started by systemd) every call
//! does nothing. The `sd-notify` crate writes the datagrams.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        // The service manager will notice what it did not hear (a start timeout, a missed
        // watchdog); the daemon goes on serving.
        tracing::warn!("telling the service manager ({states:?}): {e}");
    }
}

/// Startup is done: the daemon answers on every listener in `status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins (SIGHUP). systemd 253 and later want the monotonic time with it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The daemon is alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to tell the watchdog, if the service has one: half its timeout, as
/// `sd_watchdog_enabled(3)` advises.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|t| t / 2)
}
