//! Machine-facing routes: the iPXE chain, configs by install token, phone-home.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{base_url, base_url_for, AppError, AppState};
use crate::boot::Script;
use crate::mac::Mac;
use crate::policy::{BootRequest, Platform};
use crate::store::Sighting;

fn ipxe_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// `GET /boot.ipxe`: the static script that chains to `/ipxe` with the machine's details.
pub async fn boot_ipxe(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    Ok(ipxe_response(boot_ipxe_answer(&st, host)?))
}

/// The body of `/boot.ipxe` (also answered by the connection loop, `front.rs`).
pub(super) fn boot_ipxe_answer(st: &AppState, host: Option<&str>) -> Result<String, AppError> {
    let base = base_url_for(st, host).map_err(AppError::text)?;
    st.boot
        .boot_ipxe(&base)
        .map_err(|e| AppError::from(e).text())
}

/// The query iPXE sends from `boot.ipxe`.
#[derive(Deserialize)]
pub struct IpxeQuery {
    mac: Option<String>,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    arch: Option<String>,
    #[serde(default)]
    platform: Option<String>,
    /// `${serial}`: the SMBIOS serial number (empty when the firmware has none).
    #[serde(default)]
    serial: Option<String>,
}

/// Keeps a firmware-reported field only if it is short printable ASCII: these are claims from
/// the network, stored for the operator, never trusted.
fn claim(v: Option<String>, max: usize) -> Option<String> {
    v.filter(|s| !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic()))
}

/// `GET /ipxe?mac=..&uuid=..&arch=..&platform=..`: this machine's script.
pub async fn ipxe(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<IpxeQuery>,
) -> Result<Response, AppError> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let script = ipxe_answer(&st, peer, host, q).await?;
    let install = script.install;
    let mut r = ipxe_response(script.body);
    if install {
        // An install script's next requests are big downloads. The connection loop answers
        // `/ipxe` itself and keeps the connection, so this route only sees a connection that
        // hyper already owns: closing it makes iPXE open fresh ones, which the connection
        // loop answers with sendfile (http/front.rs) instead of through hyper.
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    Ok(r)
}

/// The answer to `GET /ipxe` (also answered by the connection loop, `front.rs`).
pub(super) async fn ipxe_answer(
    st: &AppState,
    peer: SocketAddr,
    host: Option<&str>,
    q: IpxeQuery,
) -> Result<Script, AppError> {
    let base = base_url_for(st, host).map_err(AppError::text)?;
    let Some(mac) = q.mac.as_deref() else {
        return Err(AppError::new(
            StatusCode::BAD_REQUEST,
            "missing mac parameter; chain to /boot.ipxe, which sends mac=${mac:hexhyp}",
        )
        .text());
    };
    let mac: Mac = mac.parse().map_err(|e: crate::mac::MacError| {
        AppError::new(StatusCode::BAD_REQUEST, e.to_string()).text()
    })?;
    let platform_claim = claim(q.platform, 16);
    let uuid = claim(q.uuid, 64)
        .filter(|u| crate::validate::uuid(u).is_ok())
        .map(|u| u.to_lowercase());
    let req = BootRequest {
        platform: Platform::from_ipxe(platform_claim.as_deref().unwrap_or("")),
        arch: claim(q.arch.clone(), 16),
    };
    let sighting = Sighting {
        uuid,
        serial: claim(q.serial, 64),
        dhcp: Default::default(),
        arch: claim(q.arch, 16),
        platform: platform_claim,
        ip: Some(peer.ip().to_canonical().to_string()),
    };
    match st.boot.boot(mac, req, sighting, peer.ip(), &base).await {
        Ok(Some(script)) => Ok(script),
        // "Ignore" over HTTP: iPXE is already running, so hand control back to the firmware.
        Ok(None) => Ok(Script {
            body: crate::boot::IGNORE_SCRIPT.into(),
            install: false,
        }),
        Err(e) => Err(AppError::from(e).text()),
    }
}

/// `GET /config/{token}/{artifact}`: a rendered config, only with a live install token.
pub async fn config(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((token, artifact)): Path<(String, String)>,
) -> Result<Response, AppError> {
    let base = base_url(&st, &headers).map_err(AppError::text)?;
    let (kind, body) = st
        .boot
        .config(&token, &artifact, peer.ip(), &base)
        .await
        .map_err(|e| AppError::from(e).text())?;
    Ok(([(header::CONTENT_TYPE, kind.content_type())], body).into_response())
}

/// `POST /phone-home/{token}`: the installed OS reports its SSH host public keys, either as
/// the text of `/etc/ssh/ssh_host_*_key.pub` or as cloud-init's phone_home module form
/// (`pub_key_rsa`, `pub_key_ecdsa`, `pub_key_ed25519`, ...).
pub async fn phone_home(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let text = std::str::from_utf8(&body).map_err(|_| {
        AppError::new(StatusCode::BAD_REQUEST, "phone-home body is not UTF-8").text()
    })?;
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let lines: Vec<String> = if form {
        let fields: BTreeMap<String, String> = serde_urlencoded::from_str(text).map_err(|e| {
            AppError::new(
                StatusCode::BAD_REQUEST,
                format!("phone-home form does not parse: {e}"),
            )
            .text()
        })?;
        fields
            .into_iter()
            .filter(|(k, v)| k.starts_with("pub_key_") && !v.trim().is_empty() && v.trim() != "N/A")
            .map(|(_, v)| v)
            .collect()
    } else {
        text.lines().map(str::to_string).collect()
    };
    let m = st
        .boot
        .phone_home(&token, lines, peer.ip())
        .await
        .map_err(|e| AppError::from(e).text())?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!(
            "provision: {} is {}; {} host key(s) pinned\n",
            m.mac,
            m.state,
            m.host_keys.len()
        ),
    )
        .into_response())
}

/// `GET /boot/{file}`: an iPXE binary from the TFTP roots, for UEFI HTTP Boot clients (which
/// fetch their first binary over HTTP instead of TFTP), with the same confinement as TFTP.
pub async fn boot_file(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(file): Path<String>,
) -> Result<Response, AppError> {
    let roots = st.boot_roots.clone();
    let f = file.clone();
    let resolved = tokio::task::spawn_blocking(move || crate::files::resolve(&roots, &f))
        .await
        .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).text())?;
    let path = match resolved {
        Ok(p) => p,
        Err(crate::files::Refusal::NotFound(_)) => {
            return Err(AppError::new(StatusCode::NOT_FOUND, format!("{file:?} not found")).text())
        }
        Err(e) => return Err(AppError::new(StatusCode::FORBIDDEN, e.to_string()).text()),
    };
    // Streamed from the file, never read whole: an iPXE binary is a few hundred KiB, but
    // nothing bounds what an operator puts in a root, and many clients at once would each
    // hold a copy.
    let opened = tokio::fs::File::open(&path).await;
    let (f, len) = match opened {
        Ok(f) => {
            let len = f.metadata().await.map(|m| m.len());
            (f, len)
        }
        Err(e) => {
            return Err(AppError::new(StatusCode::NOT_FOUND, format!("{file:?}: {e}")).text())
        }
    };
    let len =
        len.map_err(|e| AppError::new(StatusCode::NOT_FOUND, format!("{file:?}: {e}")).text())?;
    st.boot.record_http_boot(peer.ip(), &file, len);
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok((
        [
            (header::CONTENT_TYPE, "application/efi".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

/// `GET /pki/ca.pem`: the node CA's certificate, what nodes and managers trust.
pub async fn ca_cert(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        st.ca.cert_pem().to_string(),
    )
        .into_response()
}

/// `GET /pki/crl.pem`: the node CA's revocation list, signed now: the certificates of
/// machines reprovisioned or deleted, and of keys a node replaced. Public, as CRLs are
/// (RFC 5280 §5): a manager fetches it to refuse those nodes.
pub async fn crl(State(st): State<AppState>) -> Result<Response, AppError> {
    let revoked: Vec<crate::pki::Revoked> = st
        .admin
        .revoked_certs()
        .await
        .map_err(|e| AppError::from(e).text())?
        .into_iter()
        .map(|r| crate::pki::Revoked {
            cert_pem: r.cert_pem,
            at_ms: r.revoked_at,
        })
        .collect();
    let pem = st
        .ca
        .crl(&revoked)
        .map_err(|e| AppError::from(crate::error::Error::Internal(format!("{e:#}"))).text())?;
    Ok(([(header::CONTENT_TYPE, "application/pkix-crl")], pem).into_response())
}
