//! `strait/netexec`, the built-in test workload: small network services that answer with what
//! they see, so tests can tell which pod answered and from which address it was reached.
//!
//! - HTTP (default port 8080): `/hostname` → the pod's name, `/clientip` → the peer address as
//!   seen (`ip:port`), `/echo?msg=…` → `msg`, `POST /echo` → the request body (up to 1 MiB),
//!   `/port` → the HTTP port it listens on (which of a multi-port service's target ports was
//!   reached), `/healthz` → `ok`, `/consume-cpu?millis=N` → the pod's name after using N ms
//!   of CPU (at most 1 s), a unit of CPU load for autoscaling tests.
//! - UDP (default port 8081): `hostname` → the pod's name, `clientip` → the peer address as seen
//!   (`ip:port`), anything else is echoed back unchanged.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

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

/// The longest one `/consume-cpu` request spins.
const CONSUME_CPU_LIMIT: Duration = Duration::from_secs(1);

/// The pod's name: the hostname of its UTS namespace, which the runtime sets to the pod name.
fn hostname() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
}

#[derive(Deserialize)]
struct EchoQuery {
    #[serde(default)]
    msg: String,
}

#[derive(Deserialize)]
struct ConsumeCpuQuery {
    millis: u64,
}

/// Keeps one thread busy until it has used `time` of CPU: the same load per request however
/// busy the machine is (a spin on the wall clock would use less when it is preempted). A
/// thread starved of CPU gives up after ten times `time`.
fn consume_cpu(time: Duration) {
    let give_up = Instant::now() + time * 10;
    let until = crate::bench::worker::thread_cpu_seconds() + time.as_secs_f64();
    let mut spins = 0u64;
    while crate::bench::worker::thread_cpu_seconds() < until && Instant::now() < give_up {
        spins = std::hint::black_box(spins.wrapping_add(1));
    }
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
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/consume-cpu",
            get(|Query(query): Query<ConsumeCpuQuery>| async move {
                let time = Duration::from_millis(query.millis).min(CONSUME_CPU_LIMIT);
                // On a blocking thread, so that other requests are served meanwhile.
                match tokio::task::spawn_blocking(move || consume_cpu(time)).await {
                    Ok(()) => Ok(hostname()),
                    Err(_) => Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
                }
            }),
        );
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
