//! HTTP requests counted by route *pattern* (`provision_http_requests_total`,
//! `provision_http_request_duration_seconds`). The raw path is never a label: install tokens
//! and MACs travel in it, and a scanner could make a series per path it invents.
//!
//! Two layers, because axum knows the matched route only after routing: `tag`, a route
//! layer on each router, reads the `MatchedPath` and puts the pattern on the response; `count`,
//! the outermost layer of a listener's router, times the request and counts it under that
//! pattern, or [`UNMATCHED`] when no route took it (the fallbacks).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::metrics::{Listener, Metrics, UNMATCHED};

/// The machine listener's route patterns: every route of [`super::router`], with the
/// connection loop's own (`/assets/…`, `/boot/…`, the scripts) under the same names.
pub const MACHINE_ROUTES: &[&str] = &[
    "/boot.ipxe",
    "/ipxe",
    "/config/{token}/{artifact}",
    "/phone-home/{token}",
    "/boot/{*file}",
    "/healthz",
    "/pki/ca.pem",
    "/pki/crl.pem",
    ASSETS,
    "/api/{*rest}",
    "/metrics",
];

/// The admin listener's route patterns: every route of [`super::admin_router`].
pub const ADMIN_ROUTES: &[&str] = &[
    "/",
    "/healthz",
    "/api/v1/machines",
    "/api/v1/machines/{mac}",
    "/api/v1/machines/{mac}/reprovision",
    "/api/v1/machines/{mac}/register",
    "/api/v1/machines/{mac}/token",
    "/api/v1/machines/{mac}/events",
    "/api/v1/machines/{mac}/render/{artifact}",
    "/api/v1/inventory/ansible",
    "/api/v1/inventory/known_hosts",
    "/api/v1/events",
    "/api/v1/groups",
    "/api/v1/groups/{name}",
    "/api/v1/inventory",
    "/api/v1/rules",
    "/api/v1/rules/{name}",
    "/api/v1/machines/{mac}/confirm",
    "/api/v1/profiles",
    "/api/v1/profiles/{name}",
    "/api/v1/reload",
    "/api/v1/status",
    "/api/v1/token/rotate",
    "/ui",
    "/ui/",
    "/ui/login",
    "/ui/logout",
    "/ui/static/{file}",
    "/ui/stream",
    "/ui/machines",
    "/ui/machines/bulk",
    "/ui/machines/{mac}",
    "/ui/machines/{mac}/edit",
    "/ui/machines/{mac}/{action}",
    "/ui/machines/{mac}/preview/{artifact}",
    "/ui/discovered",
    "/ui/discovered/enroll",
    "/ui/enroll",
    "/ui/groups",
    "/ui/rules",
    "/ui/profiles",
    "/ui/profiles/{name}",
    "/ui/profiles/{name}/preview",
    "/ui/reload",
    "/ui/{*rest}",
];

/// `/assets/`, however it was reached (the static file service is nested, so axum's pattern
/// for it carries a private tail parameter).
pub const ASSETS: &str = "/assets/{*path}";

/// The pattern a response was answered by.
#[derive(Clone, Copy, Debug)]
struct Route(&'static str);

/// The label for axum's matched pattern `matched`: one of the lists above. A pattern of a
/// nesting (the request then went to the nested router's fallback) is unmatched.
pub(super) fn label(matched: &str) -> &'static str {
    if matched == "/assets" || matched.starts_with("/assets/") {
        return ASSETS;
    }
    MACHINE_ROUTES
        .iter()
        .chain(ADMIN_ROUTES)
        .find(|r| **r == matched)
        .copied()
        .unwrap_or(UNMATCHED)
}

/// Route layer: the matched route's pattern onto the response (the innermost router's, which
/// is the first to set it).
pub(super) async fn tag(req: Request, next: Next) -> Response {
    let route = match req.extensions().get::<MatchedPath>() {
        Some(p) => Some(label(p.as_str())),
        // axum 0.8 gives a nested service (the static files) no MatchedPath; this layer runs
        // only for a matched route, so a path under `/assets/` is that one.
        None if req.uri().path().starts_with("/assets/") => Some(ASSETS),
        None => None,
    };
    let mut res = next.run(req).await;
    if let Some(r) = route {
        if r != UNMATCHED && res.extensions().get::<Route>().is_none() {
            res.extensions_mut().insert(Route(r));
        }
    }
    res
}

/// Outermost layer: counts and times every request by the pattern `tag` left.
pub(super) async fn count(
    State((metrics, listener)): State<(Arc<Metrics>, Listener)>,
    req: Request,
    next: Next,
) -> Response {
    let began = Instant::now();
    let res = next.run(req).await;
    let route = res.extensions().get::<Route>().map_or(UNMATCHED, |r| r.0);
    metrics.http_request(listener, route, res.status().as_u16(), began.elapsed());
    res
}
