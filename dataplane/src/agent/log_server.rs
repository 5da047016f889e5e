//! The node's log server: `GET /containerLogs/{namespace}/{pod}/{container}` (kubelet's path
//! and query) over TLS on the node's address, for the API server's `pods/log` alone.
//!
//! The agent has no serving certificate: it presents its node identity, which the API server
//! checks as the cluster CA's certificate of this node. The client must present the API
//! server's [`NODE_LOG_READER_USER`] certificate; anything else is 401 or 403, so that pods
//! and other nodes, which can reach this address, read nothing.

use std::{path::PathBuf, sync::Arc};

use axum::{
    Extension, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::StreamExt as _;
use jiff::Timestamp;
use serde::Deserialize;
use strait_controlplane::{
    api::http::flag,
    auth::{
        ClientCredentials, NODE_LOG_READER_USER, https::ConnectionIdentity, tls::server_config,
    },
};
use tokio::sync::watch;

use crate::runtime::logs::{self, LogError, LogOptions};

/// Where kubelet serves it; what the agent announces as its `daemonEndpoints` port.
pub const DEFAULT_PORT: u16 = 10250;

/// Chunks of log output in flight per stream.
const STREAM_CHUNKS: usize = 16;

#[derive(Clone)]
struct LogState {
    /// The runtime's `log_dir`: one directory per pod, `<namespace>_<name>_<uid>`.
    log_dir: Arc<PathBuf>,
}

/// kubelet's query of `containerLogs` (what the API server forwards of `pods/log`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    #[serde(rename = "podUID")]
    pod_uid: Option<String>,
    follow: Option<String>,
    previous: Option<String>,
    timestamps: Option<String>,
    tail_lines: Option<u64>,
    limit_bytes: Option<u64>,
    since_seconds: Option<u64>,
    since_time: Option<String>,
}

/// Serves the node's container logs on `listener` with the node's `credentials` until the
/// agent exits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    credentials: &ClientCredentials,
    log_dir: PathBuf,
    exec: super::exec_server::ExecState,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let identity = credentials.identity.as_ref().context("the node has no certificate")?;
    let tls = server_config(&credentials.ca, identity).context("the log server's TLS")?;
    let app = Router::new()
        .route("/containerLogs/{namespace}/{pod}/{container}", get(container_log))
        .with_state(LogState { log_dir: Arc::new(log_dir) })
        .merge(super::exec_server::router(exec));
    // Never stopped: the server ends with the agent.
    let (_running, stopped) = watch::channel(false);
    strait_controlplane::auth::https::serve(listener, tls, app, stopped).await;
    Ok(())
}

/// A refusal, answered as plain text (small, unlike a `Response`, to be an `Err`).
#[derive(Debug)]
pub(super) struct Refusal(pub StatusCode, pub String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        text(self.0, self.1)
    }
}

/// Only the API server's [`NODE_LOG_READER_USER`] certificate is served (logs and exec).
pub(super) fn check_client(identity: Option<Extension<ConnectionIdentity>>) -> Result<(), Refusal> {
    match identity.and_then(|Extension(identity)| identity.user) {
        None => Err(Refusal(StatusCode::UNAUTHORIZED, "a client certificate is required".into())),
        Some(user) if user.name != NODE_LOG_READER_USER => Err(Refusal(
            StatusCode::FORBIDDEN,
            format!("user {:?} may not read this node's logs", user.name),
        )),
        Some(_) => Ok(()),
    }
}

pub(super) fn text(code: StatusCode, message: String) -> Response {
    (code, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response()
}

async fn container_log(
    State(state): State<LogState>,
    identity: Option<Extension<ConnectionIdentity>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refusal) = check_client(identity) {
        return refusal.into_response();
    }
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => return text(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let since = match (&query.since_time, query.since_seconds) {
        (Some(time), _) => match time.parse::<Timestamp>() {
            Ok(time) => Some(time),
            Err(error) => {
                return text(StatusCode::BAD_REQUEST, format!("sinceTime {time:?}: {error}"));
            }
        },
        (None, Some(seconds)) => {
            Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(seconds as i64)).ok()
        }
        (None, None) => None,
    };
    let options = LogOptions {
        previous: flag(query.previous.as_deref()),
        follow: flag(query.follow.as_deref()),
        tail_lines: query.tail_lines,
        timestamps: flag(query.timestamps.as_deref()),
        limit_bytes: query.limit_bytes,
        since,
    };
    let Some(pod_dir) = find_pod_dir(&state.log_dir, &namespace, &pod, query.pod_uid.as_deref())
    else {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod} has no logs on this node"),
        );
    };
    if container.contains('/') || container.starts_with('.') {
        return text(StatusCode::BAD_REQUEST, format!("invalid container name {container:?}"));
    }
    let container_dir = logs::container_dir(&pod_dir, &container);
    // The choice of incarnation is answered before the stream starts, so that it can be an
    // error status rather than an empty body.
    let found = logs::incarnations(&container_dir);
    if found.is_empty() {
        return text(
            StatusCode::NOT_FOUND,
            format!("container {container:?} in pod {pod:?} has no log on this node"),
        );
    }
    if options.previous && found.len() < 2 {
        return text(
            StatusCode::BAD_REQUEST,
            format!("previous terminated container {container:?} in pod {pod:?} not found"),
        );
    }
    let (sender, receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(STREAM_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let mut sink = sender;
        match logs::stream_log(&container_dir, &options, &mut sink) {
            Ok(()) => {}
            // Removed meanwhile (the pod went away): the stream just ends.
            Err(LogError::NoLog | LogError::NoPrevious) => {}
            Err(error) => tracing::warn!(%error, "reading a container log"),
        }
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(receiver)
        .map(|chunk| Ok::<_, std::convert::Infallible>(bytes::Bytes::from(chunk)));
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(body))
        .into_response()
}

/// The pod's directory, `<namespace>_<name>_<uid>`: the given uid's, or the only one of that
/// name.
fn find_pod_dir(
    log_dir: &std::path::Path,
    namespace: &str,
    pod: &str,
    uid: Option<&str>,
) -> Option<PathBuf> {
    // Names and namespaces are DNS labels/subdomains: no '_' and no '/', so the prefix is
    // unambiguous and stays inside the log directory.
    if [namespace, pod].iter().any(|part| part.contains(['_', '/']) || part.starts_with('.')) {
        return None;
    }
    let prefix = format!("{namespace}_{pod}_");
    if let Some(uid) = uid {
        if uid.contains(['/', '.']) {
            return None;
        }
        let dir = log_dir.join(format!("{prefix}{uid}"));
        return dir.is_dir().then_some(dir);
    }
    let mut found = std::fs::read_dir(log_dir)
        .ok()?
        .flatten()
        .filter(|entry| entry.file_name().to_str().is_some_and(|name| name.starts_with(&prefix)));
    let first = found.next()?;
    found.next().is_none().then(|| first.path())
}
