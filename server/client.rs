//! The CLI's client for the daemon's REST API, on the admin listener.
//!
//! HTTP/1.1 by hyper over rustls (not ureq, which the rest of the code never needed for a
//! server: ureq can check a certificate only against roots, and the CLI must also be able to
//! check the daemon's self-signed certificate by its pinned fingerprint; see [`crate::tls`]).
//! One connection per call: the CLI makes a handful of calls per run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::dto;
use crate::mac::Mac;
use crate::policy::State;
use crate::tls::Verify;

/// How long one API call may take, connection and TLS handshake included.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the daemon is and how to authenticate.
pub struct Client {
    base: String,
    /// `host:port` to connect to.
    authority: String,
    host: String,
    /// The path prefix of `base` (usually empty).
    prefix: String,
    token: String,
    /// The file the token came from, if it came from one.
    token_file: Option<PathBuf>,
    tls: Option<tokio_rustls::TlsConnector>,
    rt: tokio::runtime::Runtime,
}

/// How the CLI reaches the daemon: its URL, its token, how to trust its certificate.
#[derive(Default)]
pub struct Connect {
    /// The admin listener's URL, e.g. `https://127.0.0.1:8443`.
    pub server: String,
    /// The admin token itself.
    pub token: Option<String>,
    /// The file holding the admin token [default: DATA_DIR/admin-token].
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) the daemon's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// The daemon certificate's SHA-256 fingerprint [default: read from `admin-cert.sha256`
    /// beside the token file].
    pub fingerprint: Option<String>,
    /// Allow plain `http://` to a non-loopback address.
    pub insecure: bool,
}

/// A failed API call: the server's message, and whether it was the caller's input.
#[derive(Debug)]
pub struct ClientError {
    /// What to print.
    pub message: String,
    /// The server refused the input (4xx other than auth): exit code 2.
    pub bad_input: bool,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn setup(message: String) -> ClientError {
    ClientError {
        message,
        bad_input: false,
    }
}

impl Client {
    /// A client for `c.server`, verifying the daemon as `c` says.
    pub fn new(c: Connect) -> Result<Client, ClientError> {
        let base = c.server.trim_end_matches('/').to_string();
        let uri: Uri = base.parse().map_err(|e| {
            setup(format!(
                "--server {base:?} is not a URL ({e}); e.g. https://127.0.0.1:8443"
            ))
        })?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(setup(format!(
                    "--server {base:?} must start with https:// (or http:// for a plain loopback admin listener)"
                )))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| setup(format!("--server {base:?} has no host")))?
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let loopback = bare == "localhost"
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !https && !loopback && !c.insecure {
            return Err(setup(format!(
                "refusing to send the admin token in clear to {host}; use the https:// URL of the admin listener, or pass --insecure if the daemon runs with --insecure-admin"
            )));
        }
        let (token, token_file) = match c.token.filter(|t| !t.trim().is_empty()) {
            Some(t) => (t.trim().to_string(), None),
            None => {
                let path = c
                    .token_file
                    .unwrap_or_else(|| crate::config::default_data_dir().join("admin-token"));
                let t = std::fs::read_to_string(&path)
                    .map_err(|e| setup(format!(
                        "cannot read the admin token from {}: {e}; pass --token-file FILE or set PROVISION_TOKEN",
                        path.display()
                    )))?
                    .trim()
                    .to_string();
                (t, Some(path))
            }
        };
        let tls = if https {
            let verify = match (c.ca_file, c.fingerprint) {
                (Some(f), _) => Verify::Roots(f),
                (None, Some(fp)) => Verify::Pin(
                    crate::tls::parse_fingerprint(&fp)
                        .map_err(|e| setup(format!("--fingerprint: {e}")))?,
                ),
                (None, None) => Verify::Pin(pinned_beside(token_file.as_deref(), &base)?),
            };
            let config = crate::tls::client_config(&verify).map_err(|e| setup(format!("{e:#}")))?;
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| setup(format!("starting the client runtime: {e}")))?;
        Ok(Client {
            prefix: uri.path().trim_end_matches('/').to_string(),
            authority: format!("{host}:{port}"),
            host: bare,
            base,
            token,
            token_file,
            tls,
            rt,
        })
    }

    /// The file the token came from, if any.
    pub fn token_file(&self) -> Option<&Path> {
        self.token_file.as_deref()
    }

    /// One request; the status and the body.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<(u16, String), String> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let url = format!("{}/api/v1{path}", self.prefix);
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header(header::HOST, &self.authority)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if let Some((content_type, _)) = &body {
            req = req.header(header::CONTENT_TYPE, *content_type);
        }
        let req = req
            .body(Full::new(Bytes::from(
                body.map(|(_, b)| b).unwrap_or_default(),
            )))
            .map_err(|e| e.to_string())?;
        let res = match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("{}: {e}", self.host))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                exchange(TokioIo::new(stream), req).await?
            }
            None => exchange(TokioIo::new(tcp), req).await?,
        };
        Ok(res)
    }

    /// Calls the API; returns the response body (JSON or text) on 2xx.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<String, ClientError> {
        let body = body.map(|b| {
            (
                "application/json",
                serde_json::to_vec(b).expect("a request body serializes"),
            )
        });
        self.call_with(method, path, body)
    }

    /// Calls the API with a body of `content_type` (an inventory file); returns the response
    /// body on 2xx.
    pub fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<String, ClientError> {
        let method = Method::from_bytes(method.as_bytes()).expect("a method name");
        let r = self.rt.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, self.request(method, path, body))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {} s", CALL_TIMEOUT.as_secs())))
        });
        let (status, text) = r.map_err(|e| {
            setup(format!(
                "cannot reach provision at {}: {e}; is `provision serve` running? (--server URL / PROVISION_URL)",
                self.base
            ))
        })?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string());
        Err(ClientError {
            message: if status == 401 {
                format!("{message} (check --token-file / PROVISION_TOKEN)")
            } else {
                message
            },
            bad_input: matches!(status, 400 | 404 | 409 | 410 | 413 | 422),
        })
    }

    /// Calls the API and parses its JSON answer as `T`.
    pub fn send<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let text = self.call(method, path, body)?;
        serde_json::from_str(&text).map_err(|e| ClientError {
            message: format!("the server's answer to {method} {path} is not what this client expects ({e}); are the daemon and the CLI the same version?"),
            bad_input: false,
        })
    }

    /// `GET` a JSON answer.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send("GET", path, None::<&()>)
    }

    /// One machine.
    pub fn machine(&self, mac: Mac) -> Result<dto::Machine, ClientError> {
        self.get(&format!("/machines/{mac}"))
    }

    /// Every machine (in one state), walking the API's pages in MAC order; with `limit`, the
    /// first that many (and no more pages than they need).
    pub fn machines(
        &self,
        state: Option<State>,
        limit: Option<usize>,
    ) -> Result<Vec<dto::Machine>, ClientError> {
        let filter = state.map(|s| format!("state={s}&")).unwrap_or_default();
        let mut all: Vec<dto::Machine> = Vec::new();
        loop {
            let want = page_size(limit, all.len());
            if want == 0 {
                return Ok(all);
            }
            let after = all
                .last()
                .map(|m| format!("&after={}", m.mac))
                .unwrap_or_default();
            let page: Vec<dto::Machine> =
                self.get(&format!("/machines?{filter}limit={want}{after}"))?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// Every machine a search finds (any MAC notation, an IP, `key=value` for a label, or
    /// text), optionally in one state, walking the API's pages by offset.
    pub fn search(
        &self,
        q: &str,
        state: Option<State>,
        limit: Option<usize>,
    ) -> Result<Vec<dto::Machine>, ClientError> {
        let mut params: Vec<(&str, String)> = vec![("q", q.to_string())];
        if let Some(s) = state {
            params.push(("state", s.to_string()));
        }
        let mut all: Vec<dto::Machine> = Vec::new();
        loop {
            let want = page_size(limit, all.len());
            if want == 0 {
                return Ok(all);
            }
            let mut p = params.clone();
            p.push(("offset", all.len().to_string()));
            p.push(("limit", want.to_string()));
            let query = serde_urlencoded::to_string(&p).unwrap_or_default();
            let page: Vec<dto::Machine> = self.get(&format!("/machines?{query}"))?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// The newest `n` events (of one machine, or all), oldest first.
    pub fn events(&self, mac: Option<Mac>, n: usize) -> Result<Vec<dto::Event>, ClientError> {
        let n = n.clamp(1, crate::store::MAX_PAGE);
        self.get(&match mac {
            Some(m) => format!("/machines/{m}/events?tail=true&limit={n}"),
            None => format!("/events?tail=true&limit={n}"),
        })
    }

    /// Enrolls a machine.
    pub fn enroll(&self, req: &dto::EnrollRequest) -> Result<dto::Machine, ClientError> {
        self.send("POST", "/machines", Some(req))
    }

    /// Changes a machine.
    pub fn update(&self, mac: Mac, req: &dto::UpdateRequest) -> Result<dto::Machine, ClientError> {
        self.send("PATCH", &format!("/machines/{mac}"), Some(req))
    }

    /// Deletes a machine.
    pub fn delete(&self, mac: Mac) -> Result<(), ClientError> {
        self.call("DELETE", &format!("/machines/{mac}"), None::<&()>)
            .map(drop)
    }

    /// Sends a machine round again.
    pub fn reprovision(&self, mac: Mac) -> Result<dto::Machine, ClientError> {
        self.send("POST", &format!("/machines/{mac}/reprovision"), None::<&()>)
    }

    /// Starts a registration run.
    pub fn register(&self, mac: Mac) -> Result<dto::Machine, ClientError> {
        self.send("POST", &format!("/machines/{mac}/register"), None::<&()>)
    }

    /// One profile.
    pub fn profile(&self, name: &str) -> Result<dto::Profile, ClientError> {
        self.get(&format!("/profiles/{name}"))
    }
}

/// Sends `req` on `io` and reads the whole answer.
async fn exchange<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<(u16, String), String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The fingerprint `serve` wrote beside the token file (or in the default data directory).
fn pinned_beside(token_file: Option<&Path>, base: &str) -> Result<[u8; 32], ClientError> {
    let dir = token_file
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(crate::config::default_data_dir);
    let path = dir.join(crate::tls::FINGERPRINT_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        setup(format!(
            "cannot verify the daemon at {base}: reading {}: {e}; pass --fingerprint with the SHA-256 `provision serve` logged (or --ca-file for a certificate from your CA)",
            path.display()
        ))
    })?;
    crate::tls::parse_fingerprint(&text).map_err(|e| setup(format!("{}: {e}", path.display())))
}

/// How many to ask for in the next page, `have` already read: a whole page, or what is left
/// of `limit`.
fn page_size(limit: Option<usize>, have: usize) -> usize {
    limit.map_or(crate::store::MAX_PAGE, |l| {
        l.saturating_sub(have).min(crate::store::MAX_PAGE)
    })
}
