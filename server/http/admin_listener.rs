//! The admin listener: the REST API and the web UI on a port of its own, over TLS unless the
//! operator chose plain HTTP on loopback (or said `--insecure-admin`). The TLS configuration
//! is read anew for each connection from a [`crate::tls::CurrentTls`], so a SIGHUP that
//! reloads the certificate applies to the next connection without a restart.
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
    tls: Option<Arc<crate::tls::CurrentTls>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    super::front::accept_loop(
        listener,
        "admin",
        shutdown.clone(),
        |open, _| {
            if open >= MAX_CONNECTIONS {
                Err(format!(
                    "the admin listener is full ({MAX_CONNECTIONS} connections)"
                ))
            } else {
                Ok(())
            }
        },
        move |stream, peer, ()| {
            let acceptor = tls.as_ref().map(|t| TlsAcceptor::from(t.get()));
            let (app, sd) = (app.clone(), shutdown.clone());
            async move {
                let r = match acceptor {
                    None => super::front::with_hyper(stream, peer, app, sd).await,
                    Some(a) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(stream)).await {
                            Ok(Ok(tls)) => super::front::with_hyper(tls, peer, app, sd).await,
                            Ok(Err(e)) => Err(e),
                            Err(_) => Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "TLS handshake took too long",
                            )),
                        }
                    }
                };
                if let Err(e) = r {
                    tracing::debug!(%peer, "admin connection: {e}");
                }
            }
        },
    )
    .await;
    Ok(())
}
