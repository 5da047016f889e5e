//! `strait/netexec`, the built-in test workload: small network services that answer with what
//! they see, so tests can tell which pod answered and from which address it was reached.
//!
//! - HTTP (default port 8080): `/hostname` → the pod's name, `/clientip` → the peer address as
//!   seen (`ip:port`), `/echo?msg=…` → `msg`, `POST /echo` → the request body (up to 1 MiB),
//!   `/port` → the HTTP port it listens on (which of a multi-port service's target ports was
//!   reached), `/healthz` → `ok`.
//! - UDP (default port 8081): `hostname` → the pod's name, `clientip` → the peer address as seen
//!   (`ip:port`), anything else is echoed back unchanged.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use axum::{
    Router,
    extract::{ConnectInfo, Query},
    routing::get,
};
use serde::Deserialize;

#[derive(Clone, Copy, Debug)]
pub struct NetexecPorts {
    pub http: u16,
    pub udp: u16,
}

/// Largest body `POST /echo` sends back.
const ECHO_BODY_LIMIT: usize = 1 << 20;

/// The pod's name: the hostname of its UTS namespace, which the runtime sets to the pod name.
fn hostname() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
}

#[derive(Deserialize)]
struct EchoQuery {
    #[serde(default)]
    msg: String,
}

/// Serves HTTP and UDP until the process is stopped. With a `shutdown_delay`, SIGTERM does not
/// stop it at once: it keeps serving that long first, the way a workload drains while its
/// endpoint is terminating.
pub async fn run(
    ports: NetexecPorts,
    shutdown_delay: Option<std::time::Duration>,
    release: String,
) -> anyhow::Result<()> {
    let http = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, ports.http))
        .await
        .with_context(|| format!("binding HTTP port {}", ports.http))?;
    let udp = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, ports.udp))
        .await
        .with_context(|| format!("binding UDP port {}", ports.udp))?;
    let app = Router::new()
        .route("/hostname", get(|| async { hostname() }))
        .route(
            "/clientip",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        )
        .route(
            "/echo",
            get(|Query(query): Query<EchoQuery>| async move { query.msg })
                .post(|body: axum::body::Bytes| async move { body })
                .layer(axum::extract::DefaultBodyLimit::max(ECHO_BODY_LIMIT)),
        )
        .route("/port", get(move || async move { ports.http.to_string() }))
        .route("/release", get(move || std::future::ready(release.clone())))
        .route("/healthz", get(|| async { "ok" }));
    // With a delay, SIGTERM is followed by that much more serving; then the server stops
    // accepting and finishes the requests it has before exiting, so that no request that
    // reached it is cut off.
    let mut term = match shutdown_delay {
        Some(_) => Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?,
        ),
        None => None,
    };
    let drained = async move {
        match (shutdown_delay, term.as_mut()) {
            (Some(delay), Some(term)) => {
                term.recv().await;
                eprintln!("netexec: SIGTERM; serving {delay:?} more before exiting");
                tokio::time::sleep(delay).await;
            }
            _ => std::future::pending().await,
        }
    };
    let http_server = axum::serve(http, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(drained);
    let udp_server = async move {
        let mut buffer = vec![0u8; 65_536];
        loop {
            let (len, peer) = udp.recv_from(&mut buffer).await.context("receiving UDP")?;
            let request = &buffer[..len];
            let reply = match std::str::from_utf8(request).map(str::trim) {
                Ok("hostname") => hostname().into_bytes(),
                Ok("clientip") => peer.to_string().into_bytes(),
                _ => request.to_vec(),
            };
            // A peer that went away is its problem, not the server's.
            if let Err(error) = udp.send_to(&reply, peer).await {
                eprintln!("netexec: replying to {peer}: {error}");
            }
        }
        #[expect(unreachable_code, reason = "gives the async block its Result type")]
        anyhow::Ok(())
    };
    tokio::select! {
        served = http_server => served.context("serving HTTP"),
        served = udp_server => served,
    }
}
