//! The admin listener: the REST API (and the web UI when it comes) on a port of its own, over
//! TLS unless the operator chose plain HTTP on loopback (or said `--insecure-admin`).
//!
//! Machines never use this port, so it needs none of the machine listener's boot-storm
//! shortcuts; what it needs is limits: a TLS handshake and a request head each get a deadline,
//! and at most [`MAX_CONNECTIONS`] connections are served at once (more are closed at
//! accept), so a client that opens connections and sends nothing cannot hold the API.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts admin connections until `shutdown`, then lets each finish its current response.
pub async fn serve_admin(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let mut conns = tokio::task::JoinSet::new();
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("admin accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if conns.len() >= MAX_CONNECTIONS {
            // Closed unanswered: under a flood, answering costs what the cap saves. Logged at
            // the first and then every 1000th, so the log cannot be flooded either.
            if refused % 1000 == 0 {
                tracing::warn!(%peer, refused = refused + 1, "admin listener full ({MAX_CONNECTIONS} connections): connection closed");
            }
            refused += 1;
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (app, acceptor, sd) = (app.clone(), acceptor.clone(), shutdown.clone());
        conns.spawn(async move {
            let r = match acceptor {
                None => super::front::with_hyper(stream, peer, app, sd).await,
                Some(a) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(stream)).await {
                    Ok(Ok(tls)) => super::front::with_hyper(tls, peer, app, sd).await,
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "TLS handshake took too long",
                    )),
                },
            };
            if let Err(e) = r {
                tracing::debug!(%peer, "admin connection: {e}");
            }
        });
    }
    while conns.join_next().await.is_some() {}
    Ok(())
}
