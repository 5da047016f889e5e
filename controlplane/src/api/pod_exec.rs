//! `GET|POST /api/v1/namespaces/{ns}/pods/{name}/exec` (`kubectl exec`): the pod and its
//! container are checked here, then the upgrade is handed to the node agent's exec server
//! (`dataplane/src/agent/exec_server.rs`) and, once the agent has switched protocols, the
//! two connections are joined byte for byte. The API server speaks none of the streaming
//! protocols itself: what the agent accepts (WebSocket `v5.channel.k8s.io`/`v4`, SPDY/3.1
//! `v4`) is what kubectl gets, and the agent's refusals (no common stream protocol, say) are
//! relayed as the client's error.
//!
//! The agent is reached as for `pods/log` (`pod_log.rs`): same client certificate, same
//! network namespace.

use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    extract::{Path, RawQuery, Request, State},
    http::{HeaderName, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;

use super::{
    Registry,
    error::ApiError,
    pod_log::{
        BoxError, NodeLogClient, RESPONSE_TIMEOUT, choose_container, node_connection,
        node_log_address, read_error_text,
    },
};

#[derive(Clone)]
struct PodExecState {
    registry: Arc<Registry>,
    nodes: Arc<NodeLogClient>,
}

/// The route of `pods/exec`, to be merged in front of the API's catch-all.
pub fn router(registry: Arc<Registry>, nodes: NodeLogClient) -> Router {
    Router::new()
        .route("/api/v1/namespaces/{namespace}/pods/{name}/exec", get(pod_exec).post(pod_exec))
        .with_state(PodExecState { registry, nodes: Arc::new(nodes) })
}

/// What the client's upgrade request carries to the agent, and the agent's 101 back.
const UPGRADE_REQUEST_HEADERS: [HeaderName; 5] = [
    header::UPGRADE,
    header::CONNECTION,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_PROTOCOL,
];
const UPGRADE_RESPONSE_HEADERS: [HeaderName; 4] = [
    header::UPGRADE,
    header::CONNECTION,
    header::SEC_WEBSOCKET_ACCEPT,
    header::SEC_WEBSOCKET_PROTOCOL,
];
/// SPDY's protocol negotiation (kubectl 1.29 and older), relayed both ways.
const STREAM_PROTOCOL_VERSION: &str = "x-stream-protocol-version";

async fn pod_exec(
    State(state): State<PodExecState>,
    Path((namespace, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    match proxy(&state, &namespace, &name, query.unwrap_or_default(), request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// Kubernetes' checks of the container before a stream is opened: it must be the pod's, and
/// running.
fn check_running(pod: &Pod, container: &str) -> Result<(), ApiError> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.as_ref();
    if let Some(phase @ ("Succeeded" | "Failed")) = status.and_then(|s| s.phase.as_deref()) {
        return Err(ApiError::BadRequest(format!(
            "cannot exec into a container in a completed pod; current phase is {phase}"
        )));
    }
    let running = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses.iter().flatten().chain(s.init_container_statuses.iter().flatten())
        })
        .find(|s| s.name == container)
        .and_then(|s| s.state.as_ref())
        .is_some_and(|s| s.running.is_some());
    if running {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!("container {container:?} in pod {name:?} is not running")))
    }
}

async fn proxy(
    state: &PodExecState,
    namespace: &str,
    name: &str,
    query: String,
    mut request: Request,
) -> Result<Response, ApiError> {
    let asked = form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "container")
        .map(|(_, value)| value.into_owned());
    let pod = state.registry.pods.get(Some(namespace), name).await?;
    let container = choose_container(&pod, asked.as_deref())?;
    check_running(&pod, &container)?;
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
    let node = state.registry.nodes.get(None, &node_name).await?;
    let address = node_log_address(&node).ok_or_else(|| {
        ApiError::BadRequest(format!("node {node_name:?} of pod {name:?} has no InternalIP"))
    })?;
    // The command and stream flags go as they came; the container is in the path. (The
    // serializer is not Send: it lives in this block only.)
    let path = {
        let mut forwarded = form_urlencoded::Serializer::new(String::new());
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if key != "container" && key != "podUID" {
                forwarded.append_pair(&key, &value);
            }
        }
        forwarded.append_pair("podUID", pod.metadata.uid.as_deref().unwrap_or_default());
        format!("/exec/{namespace}/{name}/{container}?{}", forwarded.finish())
    };

    let mut upstream = hyper::Request::builder()
        .method(request.method().clone())
        .uri(path)
        .header(header::HOST, address.to_string());
    for name in
        UPGRADE_REQUEST_HEADERS.iter().chain([&HeaderName::from_static(STREAM_PROTOCOL_VERSION)])
    {
        for value in request.headers().get_all(name) {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = upstream.body(Body::empty()).map_err(|e| ApiError::BadRequest(e.to_string()))?;

    let action = format!("exec in {namespace}/{name} {container:?} on node {node_name}");
    let internal = |source: BoxError| ApiError::Internal { action: action.clone(), source };
    let response = tokio::time::timeout(RESPONSE_TIMEOUT, async {
        let mut sender = node_connection(&state.nodes, &node_name, address).await?;
        Ok::<_, BoxError>(sender.send_request(upstream).await?)
    })
    .await
    .map_err(|_| internal("the node did not answer in time".into()))?
    .map_err(internal)?;
    let status = response.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let text = read_error_text(response.into_body()).await;
        return Err(match status {
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND => ApiError::BadRequest(text),
            // No stream protocol both sides speak (kubelet answers so too).
            StatusCode::FORBIDDEN => ApiError::Forbidden {
                resource: String::new(),
                name: String::new(),
                message: text,
                cause: None,
            },
            _ => internal(format!("the node answered {status}: {text}").into()),
        });
    }
    let mut reply = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for name in
        UPGRADE_RESPONSE_HEADERS.iter().chain([&HeaderName::from_static(STREAM_PROTOCOL_VERSION)])
    {
        for value in response.headers().get_all(name) {
            reply = reply.header(name, value);
        }
    }
    let client = hyper::upgrade::on(&mut request);
    let node = hyper::upgrade::on(response);
    tokio::spawn(async move {
        match tokio::try_join!(client, node) {
            Ok((client, node)) => {
                let (mut client, mut node) = (TokioIo::new(client), TokioIo::new(node));
                if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut node).await {
                    tracing::debug!(%error, "an exec stream ended with an error");
                }
            }
            Err(error) => tracing::debug!(%error, "an exec upgrade did not complete"),
        }
    });
    reply.body(Body::empty()).map_err(|e| internal(e.into()))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, PodStatus,
    };

    use super::*;

    fn pod(phase: &str, state: ContainerState) -> Pod {
        Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("web".to_owned()),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some(phase.to_owned()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "app".to_owned(),
                    state: Some(state),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn message(result: Result<(), ApiError>) -> String {
        match result {
            Err(ApiError::BadRequest(message)) => message,
            other => panic!("not a 400: {other:?}"),
        }
    }

    #[test]
    fn only_a_running_container_of_a_pod_that_has_not_completed_is_entered() {
        let running = ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..Default::default()
        };
        let terminated = ContainerState {
            terminated: Some(ContainerStateTerminated::default()),
            ..Default::default()
        };
        check_running(&pod("Running", running.clone()), "app").expect("running");
        assert_eq!(
            message(check_running(&pod("Running", terminated), "app")),
            "container \"app\" in pod \"web\" is not running"
        );
        assert_eq!(
            message(check_running(&pod("Pending", running.clone()), "other")),
            "container \"other\" in pod \"web\" is not running"
        );
        assert_eq!(
            message(check_running(&pod("Succeeded", running), "app")),
            "cannot exec into a container in a completed pod; current phase is Succeeded"
        );
    }
}
