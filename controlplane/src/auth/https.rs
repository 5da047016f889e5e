//! The API listener: TLS, then HTTP/1.1 or HTTP/2 on the same port as the client chose by
//! ALPN (kubectl offers both, the agents' gRPC offers `h2`), each request carrying what the
//! handshake established about the client.

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use rustls::ServerConfig;
use tokio::{sync::watch, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use super::{UserInfo, tls::user_from_certificate};
use crate::controllers::shutdown_signalled;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the TLS handshake established about the client, put on every request of the
/// connection: the user its verified client certificate names, or `None` (anonymous).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionIdentity {
    pub user: Option<UserInfo>,
}

/// Serves `app` over TLS on `listener` until `stopped` turns true, then lets open connections
/// finish (HTTP/2 GOAWAY, HTTP/1.1 after the current response). Dropping the future closes
/// every connection at once.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    mut stopped: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // What `axum::serve` enables, so that HTTP/2 upgrades (extended CONNECT) keep working.
    builder.http2().enable_connect_protocol();
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown_signalled(&mut stopped) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Per-connection failures (a reset before accept) need no pause; running
                    // out of descriptors does, or the loop would spin.
                    if !matches!(
                        error.kind(),
                        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                    ) {
                        tracing::warn!(%error, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "setting TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        connections.spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let identity = ConnectionIdentity {
                user: stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(user_from_certificate),
            };
            let service = hyper::service::service_fn(move |mut request| {
                request.extensions_mut().insert(identity.clone());
                app.clone().oneshot(request)
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    // Handshakes that were still running are watched as they finish, and told to stop at once.
    while connections.join_next().await.is_some() {}
}
