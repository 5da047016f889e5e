//! `GET /api/v1/namespaces/{ns}/pods/{name}/log` (`kubectl logs`): the pod and its container
//! are checked here, as Kubernetes' API server and kubelet check them, then the log is
//! streamed from the log server of the pod's node agent (`dataplane/src/agent/log_server.rs`).
//!
//! The API server authenticates to agents as [`crate::auth::NODE_LOG_READER_USER`], a certificate each
//! controller issues itself in memory at start, and accepts an agent by its node identity.
//! Where the nodes' addresses are in another network namespace than the controller (a lab:
//! nodes on a fabric inside the lab, the controller in the host's namespace), connections are
//! made from that namespace (`ControllerConfig::node_netns`), so the host itself never gets
//! a route to them.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ContainerStatus, Node, Pod};
use serde::Deserialize;

use super::{
    Registry,
    error::{ApiError, FieldError},
    http::flag,
};
use crate::auth::{ClientCredentials, tls::node_client_config};

/// What an agent listens on when its Node announces no `daemonEndpoints` (kubelet's port).
const DEFAULT_NODE_LOG_PORT: u16 = 10250;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From the connection to the response's headers (the body may stream for as long as it
/// follows).
pub(super) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// How much of an agent's error answer is relayed.
const MAX_ERROR_BYTES: usize = 16 * 1024;

/// How the API server reaches node agents' log servers.
#[derive(Clone, Debug)]
pub struct NodeLogClient {
    /// The cluster CA and the [`crate::auth::NODE_LOG_READER_USER`] certificate.
    pub credentials: ClientCredentials,
    /// The network namespace (a file such as `/run/netns/NAME`) connections to nodes are
    /// made from; `None`: the controller's own.
    pub netns: Option<PathBuf>,
}

#[derive(Clone)]
struct PodLogState {
    registry: Arc<Registry>,
    nodes: Arc<NodeLogClient>,
}

/// The route of `pods/log`, to be merged in front of the API's catch-all.
pub fn router(registry: Arc<Registry>, nodes: NodeLogClient) -> Router {
    Router::new()
        .route("/api/v1/namespaces/{namespace}/pods/{name}/log", get(pod_log))
        .with_state(PodLogState { registry, nodes: Arc::new(nodes) })
}

/// `PodLogOptions` as a query (core/v1 field names).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodLogQuery {
    container: Option<String>,
    follow: Option<String>,
    previous: Option<String>,
    timestamps: Option<String>,
    tail_lines: Option<String>,
    limit_bytes: Option<String>,
    since_seconds: Option<String>,
    since_time: Option<String>,
}

/// The numbers of the query, checked as Kubernetes' `ValidatePodLogOptions` does.
fn numbers(query: &PodLogQuery, name: &str) -> Result<Vec<(&'static str, String)>, ApiError> {
    let mut forwarded = Vec::new();
    let mut causes = Vec::new();
    for (field, value, minimum) in [
        ("tailLines", &query.tail_lines, 0),
        ("limitBytes", &query.limit_bytes, 1),
        ("sinceSeconds", &query.since_seconds, 1),
    ] {
        let Some(value) = value else { continue };
        match value.parse::<i64>() {
            Ok(number) if number >= minimum => forwarded.push((field, number.to_string())),
            Ok(number) => causes.push(FieldError::invalid(
                field,
                number,
                format!("must be greater than or equal to {minimum}"),
            )),
            Err(_) => causes.push(FieldError::invalid(field, value.as_str(), "must be an integer")),
        }
    }
    if query.since_seconds.is_some() && query.since_time.is_some() {
        causes.push(FieldError::forbidden(
            "",
            "at most one of `sinceTime` or `sinceSeconds` may be specified",
        ));
    }
    if let Some(time) = &query.since_time {
        if time.parse::<k8s_openapi::jiff::Timestamp>().is_err() {
            causes.push(FieldError::invalid(
                "sinceTime",
                time.as_str(),
                "must be an RFC 3339 time",
            ));
        }
        forwarded.push(("sinceTime", time.clone()));
    }
    if !causes.is_empty() {
        return Err(ApiError::Invalid {
            kind: "PodLogOptions".to_owned(),
            name: name.to_owned(),
            causes,
        });
    }
    Ok(forwarded)
}

async fn pod_log(
    State(state): State<PodLogState>,
    Path((namespace, name)): Path<(String, String)>,
    query: Result<Query<PodLogQuery>, QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => return ApiError::BadRequest(rejection.body_text()).into_response(),
    };
    match serve_log(&state, &namespace, &name, &query).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn serve_log(
    state: &PodLogState,
    namespace: &str,
    name: &str,
    query: &PodLogQuery,
) -> Result<Response, ApiError> {
    let forwarded = numbers(query, name)?;
    let pod = state.registry.pods.get(Some(namespace), name).await?;
    let previous = flag(query.previous.as_deref());
    let container = choose_container(&pod, query.container.as_deref())?;
    check_container_state(&pod, &container, previous)?;
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
    let node = state.registry.nodes.get(None, &node_name).await?;
    let address = node_log_address(&node).ok_or_else(|| {
        ApiError::BadRequest(format!("node {node_name:?} of pod {name:?} has no InternalIP"))
    })?;

    let mut path = format!(
        "/containerLogs/{namespace}/{name}/{container}?podUID={}",
        pod.metadata.uid.as_deref().unwrap_or_default()
    );
    for (key, on) in [
        ("follow", flag(query.follow.as_deref())),
        ("previous", previous),
        ("timestamps", flag(query.timestamps.as_deref())),
    ] {
        if on {
            path.push_str(&format!("&{key}=true"));
        }
    }
    for (key, value) in forwarded {
        path.push_str(&format!("&{key}={}", percent_encode(&value)));
    }
    let action =
        format!("reading the log of {namespace}/{name} {container:?} from node {node_name}");
    let internal = |source: Box<dyn std::error::Error + Send + Sync>| ApiError::Internal {
        action: action.clone(),
        source,
    };
    let response = tokio::time::timeout(
        RESPONSE_TIMEOUT,
        request_node(&state.nodes, &node_name, address, &path),
    )
    .await
    .map_err(|_| internal("the node did not answer in time".into()))?
    .map_err(internal)?;
    let status = response.status();
    if status == StatusCode::OK {
        let body = Body::new(response.into_body());
        return Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], body).into_response());
    }
    // The agent's refusals (no previous incarnation, no log yet) are the client's to read.
    let text = read_error_text(response.into_body()).await;
    if status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND {
        return Err(ApiError::BadRequest(text));
    }
    Err(internal(format!("the node answered {status}: {text}").into()))
}

/// The named container, or the only one; Kubernetes' messages otherwise.
pub(super) fn choose_container(pod: &Pod, asked: Option<&str>) -> Result<String, ApiError> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let containers: Vec<&str> =
        spec.map(|s| s.containers.iter().map(|c| c.name.as_str()).collect()).unwrap_or_default();
    let init: Vec<&str> = spec
        .and_then(|s| s.init_containers.as_ref())
        .map(|list| list.iter().map(|c| c.name.as_str()).collect())
        .unwrap_or_default();
    match asked.filter(|c| !c.is_empty()) {
        Some(container) if containers.contains(&container) || init.contains(&container) => {
            Ok(container.to_owned())
        }
        Some(container) => {
            Err(ApiError::BadRequest(format!("container {container} is not valid for pod {name}")))
        }
        None if containers.len() == 1 => Ok(containers[0].to_owned()),
        None => {
            let mut message = format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            );
            if !init.is_empty() {
                message.push_str(&format!(" or one of the init containers: [{}]", init.join(" ")));
            }
            Err(ApiError::BadRequest(message))
        }
    }
}

/// Whether the container has a log to show, as kubelet's `validateContainerLogStatus`
/// decides from its status: a container that never started is waiting, `previous` needs a
/// terminated earlier incarnation.
fn check_container_state(pod: &Pod, container: &str, previous: bool) -> Result<(), ApiError> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.as_ref();
    let found: Option<&ContainerStatus> = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses.iter().flatten().chain(s.init_container_statuses.iter().flatten())
        })
        .find(|s| s.name == container);
    let state = found.and_then(|s| s.state.as_ref());
    let last_terminated =
        found.and_then(|s| s.last_state.as_ref()).and_then(|s| s.terminated.as_ref());
    if previous {
        return match last_terminated {
            Some(_) => Ok(()),
            None => Err(ApiError::BadRequest(format!(
                "previous terminated container {container:?} in pod {name:?} not found"
            ))),
        };
    }
    let started = state.is_some_and(|s| s.running.is_some() || s.terminated.is_some())
        || last_terminated.is_some();
    if started {
        return Ok(());
    }
    let reason = state
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.reason.clone())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "ContainerCreating".to_owned());
    Err(ApiError::BadRequest(format!(
        "container {container:?} in pod {name:?} is waiting to start: {reason}"
    )))
}

/// The node's InternalIP and its log server's port.
pub(super) fn node_log_address(node: &Node) -> Option<SocketAddr> {
    let status = node.status.as_ref()?;
    let ip: IpAddr = status
        .addresses
        .iter()
        .flatten()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())?;
    let port = status
        .daemon_endpoints
        .as_ref()
        .and_then(|d| d.kubelet_endpoint.as_ref())
        .and_then(|e| u16::try_from(e.port).ok())
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_NODE_LOG_PORT);
    Some(SocketAddr::new(ip, port))
}

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One request to a node's log server, on a connection of its own.
async fn request_node(
    client: &NodeLogClient,
    node: &str,
    address: SocketAddr,
    path: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, BoxError> {
    let mut sender = node_connection(client, node, address).await?;
    let request =
        hyper::Request::get(path).header(header::HOST, address.to_string()).body(Body::empty())?;
    Ok(sender.send_request(request).await?)
}

/// An HTTP/1.1 connection of its own to the node's TLS server at `address` (which must present
/// `node`'s identity), with this API server's certificate; it may switch protocols
/// (`pods/exec`).
pub(super) async fn node_connection(
    client: &NodeLogClient,
    node: &str,
    address: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, BoxError> {
    let tls = node_client_config(&client.credentials, node)?;
    let stream = connect(client.netns.clone(), address).await?;
    let server_name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, stream)
        .await
        .map_err(|e| format!("TLS with node {node} at {address}: {e}"))?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, node = %address, "a node connection ended with an error");
        }
    });
    Ok(sender)
}

/// A TCP connection to `address`, made from `netns` if given. The socket is created by a
/// thread of its own that enters the namespace and then ends (`setns` changes the calling
/// thread for good; a socket stays in the namespace it was made in).
pub(super) async fn connect(
    netns: Option<PathBuf>,
    address: SocketAddr,
) -> Result<tokio::net::TcpStream, BoxError> {
    let Some(netns) = netns else {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address))
            .await
            .map_err(|_| format!("connecting to {address}: timed out"))??;
        return Ok(stream);
    };
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("node-dial".into()).spawn(move || {
        let connected = (|| -> std::io::Result<std::net::TcpStream> {
            use std::os::fd::AsRawFd as _;
            let namespace = std::fs::File::open(&netns)?;
            // SAFETY: setns on a descriptor this closure owns; it moves only this thread.
            if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let stream = std::net::TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        })()
        .map_err(|e| format!("connecting to {address} from {}: {e}", netns.display()));
        let _ = sender.send(connected);
    })?;
    let stream = receiver.await.map_err(|_| "the connecting thread ended")??;
    Ok(tokio::net::TcpStream::from_std(stream)?)
}

pub(super) async fn read_error_text(body: hyper::body::Incoming) -> String {
    let limited = http_body_util::Limited::new(body, MAX_ERROR_BYTES);
    match limited.collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).trim().to_owned(),
        Err(error) => format!("(unreadable answer: {error})"),
    }
}

/// Enough of RFC 3986 for the values forwarded: numbers and RFC 3339 times (`+` and `:`).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
        ContainerStateWaiting, PodSpec, PodStatus,
    };

    use super::*;

    fn pod(containers: &[&str], statuses: Vec<ContainerStatus>) -> Pod {
        Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("web".to_owned()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: containers
                    .iter()
                    .map(|name| Container { name: (*name).to_owned(), ..Default::default() })
                    .collect(),
                ..Default::default()
            }),
            status: Some(PodStatus { container_statuses: Some(statuses), ..Default::default() }),
        }
    }

    fn message(error: ApiError) -> String {
        match error {
            ApiError::BadRequest(message) => message,
            other => panic!("not a 400: {other:?}"),
        }
    }

    #[test]
    fn a_pod_of_several_containers_needs_one_named() {
        let pod = pod(&["a", "b"], vec![]);
        assert_eq!(
            message(choose_container(&pod, None).expect_err("ambiguous")),
            "a container name must be specified for pod web, choose one of: [a b]"
        );
        assert_eq!(choose_container(&pod, Some("b")).expect("named"), "b");
        assert_eq!(
            message(choose_container(&pod, Some("c")).expect_err("unknown")),
            "container c is not valid for pod web"
        );
        assert_eq!(choose_container(&self::pod(&["only"], vec![]), None).expect("one"), "only");
    }

    #[test]
    fn a_container_that_never_ran_is_waiting_and_has_no_previous() {
        let unstarted = pod(&["a"], vec![]);
        assert_eq!(
            message(check_container_state(&unstarted, "a", false).expect_err("waiting")),
            "container \"a\" in pod \"web\" is waiting to start: ContainerCreating"
        );
        let running = pod(
            &["a"],
            vec![ContainerStatus {
                name: "a".to_owned(),
                state: Some(ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        );
        check_container_state(&running, "a", false).expect("a running container has a log");
        assert_eq!(
            message(check_container_state(&running, "a", true).expect_err("no previous")),
            "previous terminated container \"a\" in pod \"web\" not found"
        );
        let crash_looping = pod(
            &["a"],
            vec![ContainerStatus {
                name: "a".to_owned(),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("CrashLoopBackOff".to_owned()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                last_state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        );
        check_container_state(&crash_looping, "a", false).expect("its last run's log");
        check_container_state(&crash_looping, "a", true).expect("and the previous one");
    }

    #[test]
    fn negative_numbers_and_both_since_options_are_invalid() {
        let query = PodLogQuery {
            tail_lines: Some("-1".to_owned()),
            since_seconds: Some("5".to_owned()),
            since_time: Some("2026-01-01T00:00:00Z".to_owned()),
            ..Default::default()
        };
        match numbers(&query, "web") {
            Err(ApiError::Invalid { causes, .. }) => {
                let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
                assert_eq!(fields, ["tailLines", ""]);
            }
            other => panic!("expected 422: {other:?}"),
        }
        let fine = PodLogQuery { tail_lines: Some("0".to_owned()), ..Default::default() };
        assert_eq!(numbers(&fine, "web").expect("valid"), [("tailLines", "0".to_owned())]);
    }
}
