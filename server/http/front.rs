//! The HTTP listener's connection loop: static boot files zero-copy, everything else through
//! hyper and the axum route table.
//!
//! hyper writes every response body through user space (a read into a buffer, a write out of
//! it), and offers no way to hand a file to the kernel. Kernels, initrds and iPXE binaries are
//! most of the bytes a boot storm moves, so a connection whose request is `GET`/`HEAD` of
//! `/assets/...` or `/boot/...` is answered here, with sendfile(2) from the page cache to the
//! socket (Range requests included), and stays here for as long as it keeps asking for files.
//! The first request that is anything else hands the connection — with the bytes already read
//! — to hyper, which keeps it. Request heads are parsed by httparse (the parser hyper itself
//! uses); a file request that carries a body (`Content-Length`, `Transfer-Encoding`) is not a
//! plain file request and goes to hyper too, so no request framing is interpreted twice.
//!
//! The per-boot scripts, `GET /boot.ipxe` and `GET /ipxe?mac=...`, are answered here too
//! (by the same functions as their axum routes, `boot.rs`). They are the requests every
//! machine makes on every boot, and iPXE reuses one connection for several requests: after an
//! install script, the next requests on it are the kernel and initrds. Answered here, the
//! connection stays in this loop, so those downloads go out by sendfile on the same
//! connection, and the scripts skip hyper's and axum's per-request work (about a tenth of the
//! CPU of a per-MAC `/ipxe` answer, measured with perf at 50 concurrent clients).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{boot, AppError, AppState};
use crate::files::{self, Refusal};
use crate::metrics::Listener;
use axum::http::StatusCode;

/// Longest request head read before the connection is refused.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send a request head (slow-loris guard), and how long an idle
/// keep-alive connection waiting here is kept.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Most headers in a request head.
const MAX_HEADERS: usize = 64;
/// Connections served at once; more are closed at accept. Each costs a file descriptor and a
/// task, and without a cap a flood of idle connections would take every descriptor the TFTP
/// transfers and the database need. A boot storm of thousands of machines holds one
/// connection per machine at a time (iPXE, installers), and an idle one goes after
/// [`HEAD_TIMEOUT`].
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections from one address at once: one host cannot take the whole listener. iPXE and
/// installers use one or two; a benchmark from one address uses tens.
pub const MAX_PER_ADDRESS: u32 = 128;

/// What the connection loop answers from.
pub struct Statics {
    /// Served at `/assets/`: the operator's kernels, initrds, images.
    pub assets: PathBuf,
    /// The handlers' state: the boot service (scripts; `/boot/` downloads recorded on the
    /// machine's timeline), the TFTP roots served at `/boot/` (UEFI HTTP Boot) with their
    /// confinement, the advertised URL.
    pub state: AppState,
}

/// Accepts connections until `shutdown`, then lets each finish its current response.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    statics: Arc<Statics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let per_ip: PerAddress = Arc::default();
    accept_loop(
        listener,
        "HTTP",
        shutdown.clone(),
        |open, peer| {
            if open >= MAX_CONNECTIONS {
                Err(format!("{MAX_CONNECTIONS} connections open"))
            } else {
                Slot::take(&per_ip, peer.ip())
            }
        },
        move |stream, peer, slot| {
            let (app, statics, sd) = (app.clone(), statics.clone(), shutdown.clone());
            async move {
                let _slot = slot;
                if let Err(e) = connection(stream, peer, app, &statics, sd).await {
                    tracing::debug!(%peer, "HTTP connection: {e}");
                }
            }
        },
    )
    .await;
    Ok(())
}

/// The accept loop both listeners share. It reaps finished connections, outlives accept
/// errors (EMFILE and friends: the listener is fine, that connection is not), closes
/// unanswered what `admit` refuses (under a flood, answering costs what a cap saves; logged at
/// the first refusal and every 1000th, so the log cannot be flooded either), and runs `serve`
/// for the rest — given how many connections are open — until `shutdown`, then lets each
/// finish its current response.
pub(super) async fn accept_loop<S, Fut>(
    listener: TcpListener,
    what: &str,
    shutdown: CancellationToken,
    mut admit: impl FnMut(usize, SocketAddr) -> Result<S, String>,
    serve: impl Fn(TcpStream, SocketAddr, S) -> Fut,
) where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("{what} accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match admit(conns.len(), peer) {
            Ok(s) => {
                let _ = stream.set_nodelay(true);
                conns.spawn(serve(stream, peer, s));
            }
            Err(why) => {
                if refused % 1000 == 0 {
                    tracing::warn!(%peer, refused = refused + 1, "{what} connection closed at accept: {why}");
                }
                refused += 1;
            }
        }
    }
    while conns.join_next().await.is_some() {}
}

/// Open connections per client address.
type PerAddress = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>>;

/// One connection's place in [`PerAddress`], given back when the connection's task ends
/// (however it ends: a panic unwinds through the drop too).
struct Slot {
    map: PerAddress,
    ip: std::net::IpAddr,
}

impl Slot {
    fn take(map: &PerAddress, ip: std::net::IpAddr) -> Result<Slot, String> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= MAX_PER_ADDRESS {
            return Err(format!("{MAX_PER_ADDRESS} connections from {ip} open"));
        }
        *n += 1;
        Ok(Slot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A request head this loop answers itself.
struct FileRequest {
    head_only: bool,
    /// The request target, query included.
    path: String,
    range: Option<String>,
    if_modified_since: Option<String>,
    host: Option<String>,
    close: bool,
}

/// `/boot.ipxe` or `/ipxe` (with or without a query).
fn is_script(target: &str) -> bool {
    matches!(target.split('?').next(), Some("/ipxe" | "/boot.ipxe"))
}

enum Head {
    /// A plain GET/HEAD of a static path or a boot script.
    File(FileRequest),
    /// Anything else: hyper's.
    Other,
    /// Not yet a whole head.
    Partial,
    /// Not HTTP.
    Bad,
}

fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => return Head::Partial,
        Ok(httparse::Status::Complete(_)) => {}
        // Too many headers, or garbage: hyper answers it (400) in its own words.
        Err(httparse::Error::TooManyHeaders) => return Head::Other,
        Err(_) => return Head::Bad,
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Head::Bad;
    };
    if !matches!(method, "GET" | "HEAD")
        || !(path.starts_with("/assets/") || path.starts_with("/boot/") || is_script(path))
    {
        return Head::Other;
    }
    let mut f = FileRequest {
        head_only: method == "HEAD",
        path: path.to_string(),
        range: None,
        if_modified_since: None,
        host: None,
        close: version == 0,
    };
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value).trim().to_string();
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" | "transfer-encoding" | "expect" | "upgrade" => return Head::Other,
            "range" => f.range = Some(value),
            "if-modified-since" => f.if_modified_since = Some(value),
            "host" => f.host = Some(value),
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    f.close = true;
                } else if v.contains("keep-alive") {
                    f.close = false;
                }
            }
            _ => {}
        }
    }
    Head::File(f)
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    statics: &Statics,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // Read until a whole head is here (or hand over what we have), within one deadline
        // for the whole head: a client trickling bytes cannot hold the connection.
        let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
        let head = loop {
            match parse_head(&buf) {
                Head::Partial if buf.len() < MAX_HEAD => {}
                Head::Partial => {
                    return respond_error(&mut stream, 431, "request head too large").await
                }
                other => break other,
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = tokio::time::timeout_at(deadline, stream.read(&mut chunk)) => match r {
                    Ok(r) => r?,
                    Err(_) => return Ok(()),
                },
            };
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        match head {
            Head::File(req) => {
                let end = head_len(&buf);
                buf.drain(..end);
                let began = std::time::Instant::now();
                let (route, status, keep) = if is_script(&req.path) {
                    let status = serve_script(&mut stream, peer, statics, &req).await?;
                    let script = req.path.split('?').next().unwrap_or_default();
                    let route = if script == "/ipxe" {
                        "/ipxe"
                    } else {
                        "/boot.ipxe"
                    };
                    (route, status, true)
                } else {
                    let (status, keep) = serve_file(&mut stream, peer, statics, &req).await?;
                    let route = if req.path.starts_with("/boot/") {
                        "/boot/{*file}"
                    } else {
                        super::metered::ASSETS
                    };
                    (route, status, keep)
                };
                statics.state.boot.metrics().http_request(
                    Listener::Machine,
                    route,
                    status,
                    began.elapsed(),
                );
                if !keep || req.close {
                    return Ok(());
                }
            }
            Head::Bad => return respond_error(&mut stream, 400, "not an HTTP/1 request").await,
            Head::Other | Head::Partial => {
                return hand_over(stream, buf, peer, app, shutdown).await
            }
        }
    }
}

/// The length of the complete head at the start of `buf`.
fn head_len(buf: &[u8]) -> usize {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::Request::new(&mut headers).parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => buf.len(),
    }
}

/// Gives the connection to hyper, with `read` (what this loop already read) in front of it.
async fn hand_over(
    stream: TcpStream,
    read: Vec<u8>,
    peer: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let io = Prefixed {
        prefix: read,
        pos: 0,
        inner: stream,
    };
    with_hyper(io, peer, app, shutdown).await
}

/// Serves HTTP/1.1 on `io` through hyper and `app` (the peer's address in each request's
/// `ConnectInfo`) until the client closes, a head takes longer than [`HEAD_TIMEOUT`] (hyper
/// applies it to idle keep-alive connections too), or `shutdown` (the current response is
/// finished first).
pub(super) async fn with_hyper<IO>(
    io: IO,
    peer: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = app.map_request(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(HEAD_TIMEOUT)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r.map_err(io::Error::other),
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await.map_err(io::Error::other)
        }
    }
}

/// A stream with bytes already read put back in front.
struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Answers `/boot.ipxe` or `/ipxe` (see the module comment).
async fn serve_script(
    stream: &mut TcpStream,
    peer: SocketAddr,
    statics: &Statics,
    req: &FileRequest,
) -> io::Result<u16> {
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let host = req.host.as_deref();
    let answer = if path == "/boot.ipxe" {
        boot::boot_ipxe_answer(&statics.state, host)
    } else {
        match serde_urlencoded::from_str::<boot::IpxeQuery>(query) {
            Ok(q) => boot::ipxe_answer(&statics.state, peer, host, q)
                .await
                .map(|s| s.body),
            // What the axum route's query extractor says.
            Err(e) => Err(AppError::new(
                StatusCode::BAD_REQUEST,
                format!("Failed to deserialize query string: {e}"),
            )),
        }
    };
    let (status, body) = match answer {
        Ok(body) => (200, body),
        Err(e) => (e.status.as_u16(), format!("provision: {}\n", e.message)),
    };
    // One write for head and body: a script is a few hundred bytes.
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{}\r\n",
        reason(status),
        body.len(),
        if req.close { "Connection: close\r\n" } else { "" }
    );
    if !req.head_only {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes()).await?;
    Ok(status)
}

/// A status with a short plain-text body, then the connection closes.
async fn respond_error(stream: &mut TcpStream, status: u16, why: &str) -> io::Result<()> {
    let body = format!("provision: {why}\n");
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        410 => "Gone",
        416 => "Range Not Satisfiable",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Resolves a request path to a file: `/assets/NAME` beneath the assets directory (as the
/// hyper route serves it: any plain relative name), `/boot/NAME` beneath the TFTP roots with
/// their confinement.
fn locate(statics: &Statics, path: &str) -> Result<(PathBuf, bool), Refusal> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| Refusal::BadPath(path.to_string()))?;
    if let Some(name) = decoded.strip_prefix("/boot/") {
        return files::resolve(&statics.state.boot_roots, name).map(|p| (p, true));
    }
    let name = decoded.strip_prefix("/assets/").unwrap_or_default();
    files::check_name(name)?;
    let p = statics.assets.join(name);
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() => Ok((p, false)),
        Ok(_) => Err(Refusal::NotAFile(name.to_string())),
        Err(_) => Err(Refusal::NotFound(name.to_string())),
    }
}

/// A `Range: bytes=...` header against a file of `len` bytes (RFC 9110 section 14): the one
/// range it asks for, `Err` if it cannot be satisfied, `Ok(None)` to send the whole file
/// (no header, another unit, or several ranges, which a server may answer whole).
fn byte_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 || len == 0 {
            return Err(());
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().map_err(|_| ())?.min(len.saturating_sub(1))
        };
        if start >= len || end < start {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

/// Answers one file request; returns the status and whether the connection may serve
/// another.
async fn serve_file(
    stream: &mut TcpStream,
    peer: SocketAddr,
    statics: &Statics,
    req: &FileRequest,
) -> io::Result<(u16, bool)> {
    let path = req.path.as_str();
    // A few metadata calls on paths the page cache holds: done inline.
    let (file_path, is_boot) = match locate(statics, path) {
        Ok(x) => x,
        Err(Refusal::NotFound(n)) => {
            respond_error(stream, 404, &format!("{n:?} not found")).await?;
            return Ok((404, false));
        }
        // `/boot/` says why (as its hyper route does); `/assets/` answers a path that would
        // leave its directory as not found, as the static file service does.
        Err(e) if path.starts_with("/boot/") => {
            respond_error(stream, 403, &e.to_string()).await?;
            return Ok((403, false));
        }
        Err(_) => {
            respond_error(stream, 404, "not found").await?;
            return Ok((404, false));
        }
    };
    let file = std::fs::File::open(&file_path)?;
    let meta = file.metadata()?;
    let len = meta.len();
    let modified = meta.modified().ok();
    let last_modified = modified.map(httpdate::fmt_http_date);
    if let (Some(lm), Some(ims)) = (&last_modified, &req.if_modified_since) {
        if lm == ims {
            let head = format!(
                "HTTP/1.1 304 Not Modified\r\nLast-Modified: {lm}\r\n{}\r\n",
                if req.close {
                    "Connection: close\r\n"
                } else {
                    ""
                }
            );
            stream.write_all(head.as_bytes()).await?;
            return Ok((304, true));
        }
    }
    let (status, start, count, range_header) = match byte_range(req.range.as_deref(), len) {
        Ok(None) => (200, 0, len, String::new()),
        Ok(Some((a, b))) => (
            206,
            a,
            b - a + 1,
            format!("Content-Range: bytes {a}-{b}/{len}\r\n"),
        ),
        Err(()) => {
            let head = format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await?;
            return Ok((416, true));
        }
    };
    let content_type = if is_boot {
        "application/efi".to_string()
    } else {
        mime_guess::from_path(&file_path)
            .first_or_octet_stream()
            .to_string()
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {count}\r\nAccept-Ranges: bytes\r\n{}{range_header}{}\r\n",
        reason(status),
        last_modified
            .map(|lm| format!("Last-Modified: {lm}\r\n"))
            .unwrap_or_default(),
        if req.close { "Connection: close\r\n" } else { "" }
    );
    stream.write_all(head.as_bytes()).await?;
    if !req.head_only {
        send_file(stream, &file, start, count).await?;
        if is_boot {
            let name = path.trim_start_matches("/boot/");
            statics.state.boot.record_http_boot(peer.ip(), name, count);
        }
    }
    Ok((status, true))
}

/// sendfile(2) `count` bytes from `offset`, waiting for the socket to drain as needed.
async fn send_file(
    stream: &TcpStream,
    file: &std::fs::File,
    offset: u64,
    count: u64,
) -> io::Result<()> {
    let mut off = offset as i64;
    let end = offset + count;
    while (off as u64) < end {
        stream.writable().await?;
        let left = (end - off as u64).min(1 << 30) as usize;
        let r = stream.try_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile(stream, file, Some(&mut off), left)
                .map_err(io::Error::from)
        });
        match r {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while it was sent",
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn connections_per_address_are_capped_and_given_back() {
        let map = PerAddress::default();
        let a: std::net::IpAddr = "10.0.0.5".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.6".parse().unwrap();
        let mut held: Vec<Slot> = (0..MAX_PER_ADDRESS)
            .map(|_| Slot::take(&map, a).unwrap())
            .collect();
        let e = Slot::take(&map, a).err().unwrap();
        assert!(e.contains("connections from 10.0.0.5"), "{e}");
        let other = Slot::take(&map, b).unwrap();
        held.pop();
        held.push(Slot::take(&map, a).unwrap());
        drop(held);
        drop(other);
        assert!(map.lock().unwrap().is_empty(), "every slot was given back");
    }

    #[test]
    fn heads_are_classified() {
        let file = |raw: &str| match parse_head(raw.as_bytes()) {
            Head::File(f) => Some((f.path, f.head_only, f.range, f.close)),
            _ => None,
        };
        assert_eq!(
            file("GET /assets/k HTTP/1.1\r\nHost: x\r\nRange: bytes=1-2\r\n\r\n"),
            Some(("/assets/k".into(), false, Some("bytes=1-2".into()), false))
        );
        assert_eq!(
            file("HEAD /boot/ipxe.efi HTTP/1.0\r\n\r\n"),
            Some(("/boot/ipxe.efi".into(), true, None, true))
        );
        assert!(matches!(
            parse_head(b"GET /ipxe?mac=1 HTTP/1.1\r\n\r\n"),
            Head::File(_)
        ));
        assert!(matches!(
            parse_head(b"GET /ipxe/x HTTP/1.1\r\n\r\n"),
            Head::Other
        ));
        assert!(matches!(
            parse_head(b"POST /ipxe?mac=1 HTTP/1.1\r\n\r\n"),
            Head::Other
        ));
        assert!(matches!(
            parse_head(b"POST /assets/k HTTP/1.1\r\n\r\n"),
            Head::Other
        ));
        // A body on a file request: hyper frames it, not this loop.
        assert!(matches!(
            parse_head(b"GET /assets/k HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
            Head::Other
        ));
        assert!(matches!(
            parse_head(b"GET /assets/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Head::Other
        ));
        assert!(matches!(parse_head(b"GET /assets/k HTT"), Head::Partial));
        assert!(matches!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Head::Bad
        ));
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(byte_range(None, 100), Ok(None));
        assert_eq!(byte_range(Some("bytes=0-9"), 100), Ok(Some((0, 9))));
        assert_eq!(byte_range(Some("bytes=90-"), 100), Ok(Some((90, 99))));
        assert_eq!(byte_range(Some("bytes=-10"), 100), Ok(Some((90, 99))));
        assert_eq!(byte_range(Some("bytes=-500"), 100), Ok(Some((0, 99))));
        assert_eq!(byte_range(Some("bytes=50-500"), 100), Ok(Some((50, 99))));
        assert_eq!(byte_range(Some("bytes=0-1,5-6"), 100), Ok(None));
        assert_eq!(byte_range(Some("items=0-1"), 100), Ok(None));
        assert_eq!(byte_range(Some("bytes=100-"), 100), Err(()));
        assert_eq!(byte_range(Some("bytes=9-1"), 100), Err(()));
        assert_eq!(byte_range(Some("bytes=-0"), 100), Err(()));
        assert_eq!(byte_range(Some("bytes=x-1"), 100), Err(()));
    }

    /// Reads one response (head + Content-Length body) from a keep-alive connection.
    fn response(s: &mut std::net::TcpStream, head_request: bool) -> (String, Vec<u8>) {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "connection closed mid-head");
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("Content-Length: ")
                    .or(l.strip_prefix("content-length: "))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0u8; if head_request { 0 } else { len }];
        s.read_exact(&mut body).unwrap();
        (head, body)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_by_sendfile_ranges_and_hand_over_to_hyper_on_one_connection() {
        let d = tempfile::tempdir().unwrap();
        let assets = d.path().join("assets");
        let boot_root = d.path().join("boot");
        std::fs::create_dir_all(assets.join("debian")).unwrap();
        std::fs::create_dir_all(&boot_root).unwrap();
        let kernel: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(assets.join("debian/linux"), &kernel).unwrap();
        std::fs::write(boot_root.join("ipxe.efi"), b"MZ-efi").unwrap();
        std::fs::write(d.path().join("secret"), b"secret").unwrap();
        let st = crate::testkit::stack(crate::policy::DiscoverAnswer::LocalBoot);
        let statics = Arc::new(Statics {
            assets: assets.clone(),
            state: AppState {
                boot: st.boot.clone(),
                admin: st.admin.clone(),
                auth: Arc::new(crate::http::auth::AdminAuth::for_tests("t")),
                advertise: None,
                machine_port: 8080,
                ca: Arc::new(crate::pki::Ca::load_or_create(&d.path().join("pki")).unwrap()),
                boot_roots: Arc::new(vec![boot_root]),
                ui: Arc::new(crate::http::ui::Ui::new(false, vec![], Default::default()).unwrap()),
            },
        });
        let app = Router::new().route(
            "/healthz",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                format!("ok from {}\n", peer.ip())
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, statics, shutdown.clone()));

        let client = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            // Whole file.
            s.write_all(b"GET /assets/debian/linux HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let (head, body) = response(&mut s, false);
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(head.contains("Accept-Ranges: bytes"), "{head}");
            assert_eq!(body, kernel);
            let lm = head
                .lines()
                .find_map(|l| l.strip_prefix("Last-Modified: "))
                .unwrap()
                .to_string();
            // A range, on the same connection.
            s.write_all(b"GET /assets/debian/linux HTTP/1.1\r\nRange: bytes=1000-1999\r\n\r\n")
                .unwrap();
            let (head, body) = response(&mut s, false);
            assert!(head.starts_with("HTTP/1.1 206 "), "{head}");
            assert!(
                head.contains("Content-Range: bytes 1000-1999/300000"),
                "{head}"
            );
            assert_eq!(body, &kernel[1000..2000]);
            // Not modified; HEAD; an unsatisfiable range.
            s.write_all(
                format!("GET /assets/debian/linux HTTP/1.1\r\nIf-Modified-Since: {lm}\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            assert!(response(&mut s, true).0.starts_with("HTTP/1.1 304 "));
            s.write_all(b"HEAD /assets/debian/linux HTTP/1.1\r\n\r\n")
                .unwrap();
            let (head, body) = response(&mut s, true);
            assert!(
                head.contains("Content-Length: 300000") && body.is_empty(),
                "{head}"
            );
            s.write_all(b"GET /assets/debian/linux HTTP/1.1\r\nRange: bytes=400000-\r\n\r\n")
                .unwrap();
            assert!(response(&mut s, false).0.starts_with("HTTP/1.1 416 "));
            // A UEFI HTTP Boot binary, confined to its roots.
            s.write_all(b"GET /boot/ipxe.efi HTTP/1.1\r\n\r\n").unwrap();
            let (head, body) = response(&mut s, false);
            assert!(head.contains("Content-Type: application/efi"), "{head}");
            assert_eq!(body, b"MZ-efi");
            // The boot scripts, answered here on the same connection.
            s.write_all(b"GET /boot.ipxe HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n\r\n")
                .unwrap();
            let (head, body) = response(&mut s, false);
            let body = String::from_utf8(body).unwrap();
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(
                body.starts_with("#!ipxe") && body.contains("http://10.0.0.1:8080/ipxe?"),
                "{body}"
            );
            s.write_all(
                b"GET /ipxe?mac=52-54-00-00-00-01&platform=pcbios HTTP/1.1\r\nHost: x\r\n\r\n",
            )
            .unwrap();
            let (head, body) = response(&mut s, false);
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(String::from_utf8(body).unwrap().contains("sanboot"));
            for (target, says) in [
                ("/ipxe", "missing mac parameter"),
                ("/ipxe?mac=zz", "MAC"),
                ("/ipxe?mac=1&mac=2", "Failed to deserialize query string"),
            ] {
                s.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                    .unwrap();
                let (head, body) = response(&mut s, false);
                let body = String::from_utf8(body).unwrap();
                assert!(
                    head.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                    "{target}: {head}"
                );
                assert!(
                    body.starts_with("provision: ") && body.contains(says),
                    "{target}: {body}"
                );
            }
            s.write_all(b"GET /boot.ipxe HTTP/1.1\r\nHost: a b\r\n\r\n")
                .unwrap();
            assert!(response(&mut s, false).0.starts_with("HTTP/1.1 400 "));
            // Anything else: the same connection goes on through hyper and the router, which
            // sees the client's address.
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let (head, body) = response(&mut s, false);
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
            assert_eq!(body, b"ok from 127.0.0.1\n");
            // Refusals close the connection after saying why.
            for (path, status) in [
                ("/assets/nope", "404"),
                ("/assets/../secret", "404"),
                ("/assets/%2e%2e/secret", "404"),
                ("/boot/../secret", "403"),
            ] {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
                    .unwrap();
                let mut all = String::new();
                s.read_to_string(&mut all).unwrap();
                assert!(
                    all.starts_with(&format!("HTTP/1.1 {status} ")),
                    "{path}: {all}"
                );
                assert!(!all.contains("secret\n") || status != "200", "{all}");
            }
        });
        client.await.unwrap();
        shutdown.cancel();
        server.await.unwrap().unwrap();
        // The /boot/ download is on the timeline (unattributed: 127.0.0.1 has no MAC).
        let ev = st
            .admin
            .events(crate::store::EventQuery {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            ev.iter()
                .any(|e| e.kind == crate::policy::EventKind::HttpBootServed
                    && e.detail.starts_with("ipxe.efi (6 bytes)")),
            "{ev:?}"
        );
    }
}
