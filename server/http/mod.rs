//! HTTP: the machine-facing boot chain on one listener, the admin REST API on another.
//!
//! Machine-facing routes are unauthenticated (a MAC is a claim, not a credential) except for
//! the install token in config and phone-home URLs; they stay plain HTTP because iPXE and
//! installers fetch them. `/api/v1` lives only on the admin listener (TLS by default) and
//! needs the admin bearer token.

mod admin_listener;
mod api;
pub mod auth;
mod boot;
mod front;
mod metered;
pub mod ui;

pub use admin_listener::{serve_admin, MAX_CONNECTIONS as MAX_ADMIN_CONNECTIONS};
pub use front::{serve, Statics, MAX_CONNECTIONS, MAX_PER_ADDRESS};
pub use metered::{ADMIN_ROUTES, MACHINE_ROUTES};

#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tower_http::services::ServeDir;

use crate::admin::AdminService;
use crate::boot::BootService;
use crate::error::Error;
use crate::store::{StoreError, TokenProblem};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The machine-facing service.
    pub boot: Arc<BootService>,
    /// The operator-facing service.
    pub admin: Arc<AdminService>,
    /// The admin API bearer token and its guessing limit.
    pub auth: Arc<auth::AdminAuth>,
    /// The configured base URL, if any; otherwise derived from each request's Host.
    pub advertise: Option<Arc<String>>,
    /// The node CA: its certificate and revocation list are public.
    pub ca: Arc<crate::pki::Ca>,
    /// The machine listener's port: previews rendered through the admin API point at it.
    pub machine_port: u16,
    /// Where iPXE binaries live (the TFTP roots), served at `/boot/` for UEFI HTTP Boot.
    pub boot_roots: Arc<Vec<std::path::PathBuf>>,
    /// The web UI's pages and settings.
    pub ui: Arc<ui::Ui>,
}

/// The machine listener's routes; `/metrics` among them with `metrics`.
pub fn router(state: AppState, assets_dir: &std::path::Path, metrics: bool) -> Router {
    let mut r = Router::new();
    if metrics {
        r = r.route("/metrics", get(scrape));
    }
    let counted = (
        state.boot.metrics().clone(),
        crate::metrics::Listener::Machine,
    );
    r.route("/boot.ipxe", get(boot::boot_ipxe))
        .route("/ipxe", get(boot::ipxe))
        .route("/config/{token}/{artifact}", get(boot::config))
        .route("/phone-home/{token}", post(boot::phone_home))
        .route("/boot/{*file}", get(boot::boot_file))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/pki/ca.pem", get(boot::ca_cert))
        .route("/pki/crl.pem", get(boot::crl))
        .nest_service("/assets", ServeDir::new(assets_dir))
        .route("/api/{*rest}", axum::routing::any(api::elsewhere))
        .route_layer(axum::middleware::from_fn(metered::tag))
        .layer(axum::middleware::from_fn_with_state(
            counted,
            metered::count,
        ))
        .with_state(state)
}

/// A router serving only `/metrics` (its own listener: `--metrics ADDR:PORT`).
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(state)
}

/// `GET /metrics`: the Prometheus text exposition.
async fn scrape(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<Response, AppError> {
    let body = state.boot.scrape().await?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response())
}

/// The largest inventory file `POST /api/v1/inventory` takes: about 130,000 machines. An
/// apply holds some 8 KB per machine while it runs (bench/RESULTS.md), so this also bounds
/// what one request can make the daemon allocate.
pub const INVENTORY_FILE_MAX: usize = 16 << 20;

/// The admin listener's routes: the API under `/api/v1`, the web UI under `/ui/`.
pub fn admin_router(state: AppState) -> Router {
    let api = Router::new()
        .route("/machines", get(api::list_machines).post(api::enroll))
        .route(
            "/machines/{mac}",
            get(api::get_machine)
                .patch(api::update_machine)
                .delete(api::delete_machine),
        )
        .route("/machines/{mac}/reprovision", post(api::reprovision))
        .route("/machines/{mac}/register", post(api::register))
        .route("/machines/{mac}/token", get(api::machine_token))
        // An inventory file of 10,000 machines is over 1 MB; the default limit is 2 MB.
        .route(
            "/inventory",
            get(api::export)
                .post(api::apply)
                .layer(axum::extract::DefaultBodyLimit::max(INVENTORY_FILE_MAX)),
        )
        .route("/inventory/ansible", get(api::inventory_ansible))
        .route("/inventory/known_hosts", get(api::inventory_known_hosts))
        .route("/machines/{mac}/events", get(api::machine_events))
        .route("/machines/{mac}/render/{artifact}", get(api::render))
        .route("/events", get(api::events))
        .route("/groups", get(api::groups).post(api::create_group))
        .route(
            "/groups/{name}",
            get(api::group)
                .put(api::put_group)
                .delete(api::delete_group),
        )
        .route("/rules", get(api::rules).post(api::create_rule))
        .route(
            "/rules/{name}",
            get(api::rule).put(api::put_rule).delete(api::delete_rule),
        )
        .route("/machines/{mac}/confirm", post(api::confirm))
        .route("/profiles", get(api::profiles))
        .route("/profiles/{name}", get(api::profile))
        .route("/reload", post(api::reload))
        .route("/status", get(api::status))
        .route("/token/rotate", post(api::rotate_token))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::auth,
        ))
        .route_layer(axum::middleware::from_fn(metered::tag));
    let counted = (
        state.boot.metrics().clone(),
        crate::metrics::Listener::Admin,
    );
    Router::new()
        .nest("/api/v1", api)
        .merge(ui::routes())
        .route("/", get(|| async { axum::response::Redirect::to("/ui/") }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route_layer(axum::middleware::from_fn(metered::tag))
        .layer(axum::middleware::from_fn_with_state(
            counted,
            metered::count,
        ))
        .with_state(state)
}

/// The address a request came from: both listeners put the peer in every request, router
/// tests a `MockConnectInfo`.
fn peer_ip(ext: &axum::http::Extensions) -> std::net::IpAddr {
    use axum::extract::connect_info::MockConnectInfo;
    use axum::extract::ConnectInfo;
    use std::net::SocketAddr;
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .or_else(|| ext.get::<MockConnectInfo<SocketAddr>>().map(|c| c.0))
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip())
}

/// Errors mapped to status codes in one place. Machine-facing routes answer in plain text
/// (iPXE and installers show it); the API answers JSON `{"error": "..."}`.
pub struct AppError {
    status: StatusCode,
    message: String,
    json: bool,
}

impl AppError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        AppError {
            status,
            message: message.into(),
            json: true,
        }
    }

    fn text(mut self) -> Self {
        self.json = false;
        self
    }
}

/// The status code of a service error.
fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::At { error, .. } => status_of(error),
        Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::Forbidden(_) | Error::Store(StoreError::TokenHeld { .. }) => StatusCode::FORBIDDEN,
        Error::Store(StoreError::NotFound(_))
        | Error::Store(StoreError::NoGroup(_))
        | Error::Store(StoreError::NoRule(_)) => StatusCode::NOT_FOUND,
        Error::Store(StoreError::RuleRefused(_)) => StatusCode::CONFLICT,
        Error::Store(StoreError::NoProfile(_)) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::Store(StoreError::GroupConflict(_) | StoreError::Changed(_)) => StatusCode::CONFLICT,
        Error::Store(StoreError::AlreadyEnrolled(..))
        | Error::Store(StoreError::Illegal(_))
        | Error::Store(StoreError::Conflict(_)) => StatusCode::CONFLICT,
        Error::Store(StoreError::Token(TokenProblem::Unknown | TokenProblem::OtherAddress, _)) => {
            StatusCode::FORBIDDEN
        }
        Error::Store(StoreError::Token(_, _)) => StatusCode::GONE,
        Error::Store(StoreError::Closed | StoreError::Unavailable(_)) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Error::Store(StoreError::Contended(_)) => StatusCode::CONFLICT,
        Error::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Error::Render(crate::render::RenderError::NoProfile(_))
        | Error::Render(crate::render::RenderError::NoArtifact { .. }) => StatusCode::NOT_FOUND,
        Error::Render(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        let status = status_of(&e);
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("{e}");
        }
        AppError::new(status, e.to_string())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if self.json {
            (
                self.status,
                Json(serde_json::json!({ "error": self.message })),
            )
                .into_response()
        } else {
            (
                self.status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("provision: {}\n", self.message),
            )
                .into_response()
        }
    }
}

/// The base URL to put in scripts: the advertised one, or `http://` + the request's Host
/// header.
fn base_url(state: &AppState, headers: &HeaderMap) -> Result<String, AppError> {
    base_url_for(
        state,
        headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    )
}

/// [`base_url`] from the Host header's value. The Host header comes from the client, so it
/// must be a plain host[:port] (letters, digits, `.`, `-`, `:`, brackets for IPv6) before it
/// is placed in any script.
fn base_url_for(state: &AppState, host: Option<&str>) -> Result<String, AppError> {
    if let Some(a) = &state.advertise {
        return Ok(a.to_string());
    }
    let host = host.ok_or_else(|| {
        AppError::new(
            StatusCode::BAD_REQUEST,
            "request has no Host header; set --advertise so provision knows its own URL",
        )
    })?;
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !ok {
        return Err(AppError::new(
            StatusCode::BAD_REQUEST,
            format!("Host header {host:?} is not a plain host[:port]"),
        ));
    }
    Ok(format!("http://{host}"))
}

/// The base URL for a preview rendered through the admin API: the advertised one, or the
/// host the operator reached the admin listener by with the machine listener's port (the
/// admin port serves no machine route).
fn machine_base_url(state: &AppState, headers: &HeaderMap) -> Result<String, AppError> {
    let base = base_url(state, headers)?;
    if state.advertise.is_some() {
        return Ok(base);
    }
    let authority = &base["http://".len()..];
    let host = match authority.rfind(':') {
        // host:port, or [v6]:port; a bare IPv6 literal always comes in brackets.
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    };
    Ok(format!("http://{host}:{}", state.machine_port))
}
