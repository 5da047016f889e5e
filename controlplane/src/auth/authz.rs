//! Authentication and authorization of every request, in front of the router.
//!
//! - No client certificate: only `/healthz`, `/livez`, `/readyz` and `/version` are served
//!   (what Kubernetes leaves open to anonymous clients); everything else is 401 Unauthorized.
//! - `system:masters` may do everything.
//! - Nodes (`system:node:<name>` in `system:nodes`) get what Kubernetes' node authorizer,
//!   `system:node` role and NodeRestriction admission give a kubelet, cut to the kinds strait
//!   serves: see [`node_decision`].
//! - Every authenticated user may read discovery (`/api`, `/apis`, `/openapi`, …), as
//!   Kubernetes' `system:discovery` role allows; strait has no RBAC, so nothing else.
//!
//! Anything refused is a 403 Forbidden `Status` naming the user, the verb and the resource.

use std::sync::Arc;

use async_trait::async_trait;
use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::Method;

use super::{MASTERS_GROUP, UserInfo, https::ConnectionIdentity};
use crate::api::{
    Registry,
    error::ApiError,
    http::{MAX_BODY_BYTES, PathKind, parse_path},
};

/// The namespace of node heartbeat leases, and their group.
const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
const COORDINATION_GROUP: &str = "coordination.k8s.io";
/// The NodeSync gRPC method agents follow their desired state with.
const NODE_SYNC_WATCH: &str = "/strait.nodesync.v1.NodeSync/Watch";
/// Paths served to clients without a certificate.
const PUBLIC_PATHS: [&str; 4] = ["/healthz", "/livez", "/readyz", "/version"];

/// What a request asks to do, in the terms authorization speaks (Kubernetes'
/// `authorizer.Attributes`): a verb and either a resource or a plain path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestAttributes {
    pub verb: String,
    pub path: String,
    pub resource: Option<ResourceAttributes>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceAttributes {
    pub group: String,
    pub namespace: Option<String>,
    pub resource: String,
    pub subresource: Option<String>,
    pub name: Option<String>,
}

impl RequestAttributes {
    /// The attributes of `method` on `uri`, as Kubernetes' request-info resolver names them:
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection` for
    /// resources; the lower-case method for other paths.
    pub fn of(method: &Method, uri: &http::Uri) -> Self {
        let path = uri.path().to_owned();
        let resource = match parse_path(&path) {
            Some(PathKind::Resource(resource)) => resource,
            _ => {
                let verb = method.as_str().to_ascii_lowercase();
                return Self { verb, path, resource: None };
            }
        };
        let named = resource.name.is_some();
        let verb = match *method {
            Method::GET | Method::HEAD if named => "get",
            Method::GET | Method::HEAD if watch_requested(uri.query()) => "watch",
            Method::GET | Method::HEAD => "list",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE if named => "delete",
            Method::DELETE => "deletecollection",
            _ => return Self { verb: method.as_str().to_ascii_lowercase(), path, resource: None },
        };
        Self {
            verb: verb.to_owned(),
            path,
            resource: Some(ResourceAttributes {
                group: resource.group,
                namespace: resource.namespace,
                resource: resource.resource,
                subresource: resource.subresource,
                name: resource.name,
            }),
        }
    }

    fn is(&self, group: &str, resource: &str, subresource: Option<&str>) -> bool {
        self.resource.as_ref().is_some_and(|r| {
            r.group == group && r.resource == resource && r.subresource.as_deref() == subresource
        })
    }

    fn verb_in(&self, verbs: &[&str]) -> bool {
        verbs.contains(&self.verb.as_str())
    }

    fn name(&self) -> Option<&str> {
        self.resource.as_ref()?.name.as_deref()
    }

    fn namespace(&self) -> Option<&str> {
        self.resource.as_ref()?.namespace.as_deref()
    }
}

fn watch_requested(query: Option<&str>) -> bool {
    query
        .unwrap_or_default()
        .split('&')
        .any(|pair| matches!(pair.split_once('='), Some(("watch", "true" | "1" | "True"))))
}

/// Discovery and health: what every authenticated user may read.
fn is_discovery(request: &RequestAttributes) -> bool {
    let path = request.path.trim_end_matches('/');
    request.resource.is_none()
        && matches!(request.verb.as_str(), "get" | "head")
        && (PUBLIC_PATHS.contains(&path)
            || ["/api", "/apis", "/openapi"]
                .iter()
                .any(|root| path == *root || path.starts_with(&format!("{root}/"))))
}

/// Whether a request without credentials is served.
pub fn is_public(request: &RequestAttributes) -> bool {
    request.resource.is_none()
        && matches!(request.verb.as_str(), "get" | "head")
        && PUBLIC_PATHS.contains(&request.path.trim_end_matches('/'))
}

/// The outcome of the rules, before any object is looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused; the text says why, after Kubernetes' "User … cannot …".
    Deny(String),
    /// Allowed if the object the request creates is named `name` (its body is read).
    IfCreatesName(String),
    /// Allowed if the pod the request names is bound to `node` (or does not exist: the API
    /// answers 404 then). For a delete whose `preconditions.uid` is not the current pod's,
    /// also allowed: the API refuses it with 409 and deletes nothing.
    IfPodBoundTo {
        node: String,
        delete: bool,
    },
}

/// What the rules say about `user` doing `request`.
pub fn decide(user: &UserInfo, request: &RequestAttributes) -> Decision {
    if user.in_group(MASTERS_GROUP) {
        return Decision::Allow;
    }
    if is_discovery(request) {
        return Decision::Allow;
    }
    if let Some(node) = user.node_name() {
        return node_decision(node, request);
    }
    Decision::Deny(String::new())
}

/// A node agent's rights: the `system:node` role with NodeRestriction's limits, for the kinds
/// strait serves.
///
/// - reads (get, list, watch) of nodes, pods, services, endpoints and endpointslices (what
///   NodeSync and a kube-proxy read);
/// - its own Node: create, update, patch, and its `status`;
/// - the `status` of pods bound to it, and their delete (the agent's final grace-0 delete);
/// - its own Lease (`coordination.k8s.io` leases in `kube-node-lease` named after it): get,
///   create, update, patch, delete;
/// - events: create, update, patch;
/// - its own usage report (`metrics.k8s.io` nodes named after it, which carry its pods' usage
///   too): update;
/// - the NodeSync stream (which itself refuses another node's name).
pub fn node_decision(node: &str, request: &RequestAttributes) -> Decision {
    const READ: [&str; 3] = ["get", "list", "watch"];
    if request.resource.is_none() {
        return if request.path == NODE_SYNC_WATCH && request.verb == "post" {
            Decision::Allow
        } else {
            Decision::Deny(String::new())
        };
    }
    let own_name = request.name() == Some(node);
    if request.verb_in(&READ)
        && (request.is("", "nodes", None)
            || request.is("", "pods", None)
            || request.is("", "services", None)
            || request.is("", "endpoints", None)
            || request.is("discovery.k8s.io", "endpointslices", None))
    {
        return Decision::Allow;
    }
    if request.is("", "nodes", None) || request.is("", "nodes", Some("status")) {
        return match request.verb.as_str() {
            "create" if request.is("", "nodes", None) => Decision::IfCreatesName(node.to_owned()),
            "update" | "patch" if own_name => Decision::Allow,
            "update" | "patch" => {
                Decision::Deny(format!("node {node:?} may only change its own Node"))
            }
            _ => Decision::Deny(String::new()),
        };
    }
    if request.is("", "pods", Some("status")) && request.verb_in(&["update", "patch"]) {
        return Decision::IfPodBoundTo { node: node.to_owned(), delete: false };
    }
    if request.is("", "pods", None) && request.verb == "delete" {
        return Decision::IfPodBoundTo { node: node.to_owned(), delete: true };
    }
    if request.is(COORDINATION_GROUP, "leases", None) {
        if request.namespace() != Some(NODE_LEASE_NAMESPACE) {
            return Decision::Deny(format!(
                "node {node:?} may only use its own lease in {NODE_LEASE_NAMESPACE}"
            ));
        }
        return match request.verb.as_str() {
            "create" => Decision::IfCreatesName(node.to_owned()),
            "get" | "update" | "patch" | "delete" if own_name => Decision::Allow,
            _ => Decision::Deny(format!("node {node:?} may only use its own lease")),
        };
    }
    if (request.is("", "events", None) || request.is("events.k8s.io", "events", None))
        && request.verb_in(&["create", "update", "patch"])
    {
        return Decision::Allow;
    }
    if request.is("metrics.k8s.io", "nodes", None) && request.verb == "update" {
        return if own_name {
            Decision::Allow
        } else {
            Decision::Deny(format!("node {node:?} may only report its own usage"))
        };
    }
    Decision::Deny(String::new())
}

/// Whether `user` may follow the NodeSync stream of `node`: the admin may follow any, a node
/// only its own.
pub fn may_follow_node(user: &UserInfo, node: &str) -> Result<(), String> {
    if user.in_group(MASTERS_GROUP) || user.node_name() == Some(node) {
        return Ok(());
    }
    Err(format!("User {:?} cannot follow the NodeSync stream of node {node:?}", user.name))
}

/// What a pod is bound to, for [`Decision::IfPodBoundTo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodBinding {
    pub uid: Option<String>,
    pub node_name: Option<String>,
}

/// Where [`Decision::IfPodBoundTo`] looks pods up (the registry; a table in unit tests).
#[async_trait]
pub trait PodBindings: Send + Sync {
    async fn binding(&self, namespace: &str, name: &str) -> Result<Option<PodBinding>, ApiError>;
}

#[async_trait]
impl PodBindings for Registry {
    async fn binding(&self, namespace: &str, name: &str) -> Result<Option<PodBinding>, ApiError> {
        let pod = self.pods.get_opt(Some(namespace), name).await?;
        Ok(pod.map(|pod| PodBinding {
            uid: pod.metadata.uid,
            node_name: pod.spec.and_then(|spec| spec.node_name),
        }))
    }
}

impl Decision {
    /// Whether resolving this decision reads the request body.
    pub fn needs_body(&self) -> bool {
        matches!(self, Self::IfCreatesName(_) | Self::IfPodBoundTo { delete: true, .. })
    }

    /// The final answer: `Ok` to serve the request, `Err(reason)` to refuse it.
    pub async fn resolve(
        self,
        request: &RequestAttributes,
        body: &[u8],
        pods: &dyn PodBindings,
    ) -> Result<Result<(), String>, ApiError> {
        match self {
            Self::Allow => Ok(Ok(())),
            Self::Deny(reason) => Ok(Err(reason)),
            Self::IfCreatesName(name) => {
                let created = serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|object| object["metadata"]["name"].as_str().map(str::to_owned));
                Ok(match created {
                    Some(created) if created == name => Ok(()),
                    Some(created) => Err(format!("node {name:?} may not create {created:?}")),
                    None => Err(format!(
                        "node {name:?} may only create an object named {name:?}, given as JSON"
                    )),
                })
            }
            Self::IfPodBoundTo { node, delete } => {
                let (Some(namespace), Some(name)) = (request.namespace(), request.name()) else {
                    return Ok(Err(String::new()));
                };
                let Some(pod) = pods.binding(namespace, name).await? else {
                    return Ok(Ok(()));
                };
                if pod.node_name.as_deref() == Some(node.as_str()) {
                    return Ok(Ok(()));
                }
                if delete && precondition_uid(body).is_some_and(|uid| Some(uid) != pod.uid) {
                    return Ok(Ok(()));
                }
                Ok(Err(format!("node {node:?} may only change pods bound to it")))
            }
        }
    }
}

fn precondition_uid(body: &[u8]) -> Option<String> {
    let options: serde_json::Value = serde_json::from_slice(body).ok()?;
    options["preconditions"]["uid"].as_str().map(str::to_owned)
}

/// The 403 for `user` refused `request`, worded as Kubernetes' authorizer words it.
pub fn forbidden(user: &UserInfo, request: &RequestAttributes, reason: &str) -> ApiError {
    let reason = if reason.is_empty() { String::new() } else { format!(": {reason}") };
    let Some(target) = &request.resource else {
        return ApiError::Forbidden {
            resource: String::new(),
            name: String::new(),
            message: format!(
                "User {:?} cannot {} path {:?}{reason}",
                user.name, request.verb, request.path
            ),
            cause: None,
        };
    };
    let resource = match &target.subresource {
        Some(subresource) => format!("{}/{subresource}", target.resource),
        None => target.resource.clone(),
    };
    let scope = match &target.namespace {
        Some(namespace) => format!("in the namespace {namespace:?}"),
        None => "at the cluster scope".to_owned(),
    };
    let qualified = if target.group.is_empty() {
        target.resource.clone()
    } else {
        format!("{}.{}", target.resource, target.group)
    };
    ApiError::Forbidden {
        resource: qualified,
        name: target.name.clone().unwrap_or_default(),
        message: format!(
            "User {:?} cannot {} resource {resource:?} in API group {:?} {scope}{reason}",
            user.name, request.verb, target.group
        ),
        cause: None,
    }
}

/// The layer in front of the router: 401 without a certificate (but for [`is_public`]
/// paths), 403 for what the user may not do, otherwise the request goes on carrying its
/// [`UserInfo`] as an extension (NodeSync reads it).
pub async fn guard(
    State(registry): State<Arc<Registry>>,
    request: Request,
    next: Next,
) -> Response {
    let attributes = RequestAttributes::of(request.method(), request.uri());
    let user = request.extensions().get::<ConnectionIdentity>().and_then(|id| id.user.clone());
    let grpc = is_grpc(&request);
    let Some(user) = user else {
        if is_public(&attributes) {
            return next.run(request).await;
        }
        if grpc {
            return tonic::Status::unauthenticated("no client certificate").into_http();
        }
        return ApiError::Unauthorized.into_response();
    };
    let decision = decide(&user, &attributes);
    let (parts, body) = request.into_parts();
    // Only the requests whose answer depends on it are read ahead; a stream (NodeSync, a
    // watch) never is.
    let (body, read) = if decision.needs_body() {
        match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
            Ok(bytes) => (Body::from(bytes.clone()), bytes),
            Err(error) => return body_error(&error).into_response(),
        }
    } else {
        (body, Bytes::new())
    };
    match decision.resolve(&attributes, &read, registry.as_ref()).await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => {
            let refusal = forbidden(&user, &attributes, &reason);
            if grpc {
                return tonic::Status::permission_denied(refusal.to_string()).into_http();
            }
            return refusal.into_response();
        }
        Err(error) => return error.into_response(),
    }
    let mut request = Request::from_parts(parts, body);
    request.extensions_mut().insert(user);
    next.run(request).await
}

/// gRPC clients (the agents' NodeSync) get their refusals as gRPC statuses, which tonic
/// reports as such, rather than as an HTTP error with a JSON body.
fn is_grpc(request: &Request) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

/// 413 for a body over the limit (as the router answers it), 400 for one that broke off.
fn body_error(error: &axum::Error) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return ApiError::RequestEntityTooLarge { limit: MAX_BODY_BYTES };
        }
        source = cause.source();
    }
    ApiError::BadRequest(format!("reading the request body: {error}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use async_trait::async_trait;
    use http::Method;

    use super::{Decision, PodBinding, PodBindings, RequestAttributes, decide, forbidden};
    use crate::{api::error::ApiError, auth::UserInfo};

    /// Pods by `namespace/name`: (uid, node).
    struct Pods(BTreeMap<String, (String, Option<String>)>);

    #[async_trait]
    impl PodBindings for Pods {
        async fn binding(&self, ns: &str, name: &str) -> Result<Option<PodBinding>, ApiError> {
            Ok(self
                .0
                .get(&format!("{ns}/{name}"))
                .map(|(uid, node)| PodBinding { uid: Some(uid.clone()), node_name: node.clone() }))
        }
    }

    fn pods() -> Pods {
        let mut pods = BTreeMap::new();
        pods.insert("default/mine".to_owned(), ("uid-mine".to_owned(), Some("node-1".to_owned())));
        pods.insert(
            "default/theirs".to_owned(),
            ("uid-theirs".to_owned(), Some("node-2".to_owned())),
        );
        pods.insert("default/pending".to_owned(), ("uid-pending".to_owned(), None));
        Pods(pods)
    }

    fn attributes(method: &str, uri: &str) -> RequestAttributes {
        RequestAttributes::of(&method.parse::<Method>().unwrap(), &uri.parse().unwrap())
    }

    /// Whether `user` may do `method uri` with `body`.
    async fn allowed(user: &UserInfo, method: &str, uri: &str, body: &str) -> Result<(), String> {
        let request = attributes(method, uri);
        decide(user, &request).resolve(&request, body.as_bytes(), &pods()).await.unwrap()
    }

    #[test]
    fn verbs_are_named_as_kubernetes_names_them() {
        let verb = |method, uri| attributes(method, uri).verb;
        assert_eq!(verb("GET", "/api/v1/namespaces/default/pods/web"), "get");
        assert_eq!(verb("GET", "/api/v1/pods?limit=500"), "list");
        assert_eq!(verb("GET", "/api/v1/pods?resourceVersion=3&watch=true"), "watch");
        assert_eq!(verb("POST", "/api/v1/nodes"), "create");
        assert_eq!(verb("PUT", "/api/v1/nodes/n/status"), "update");
        assert_eq!(verb("PATCH", "/api/v1/nodes/n"), "patch");
        assert_eq!(verb("DELETE", "/api/v1/namespaces/a/pods/p"), "delete");
        assert_eq!(verb("DELETE", "/api/v1/namespaces/a/pods"), "deletecollection");
        assert_eq!(verb("POST", "/strait.nodesync.v1.NodeSync/Watch"), "post");
        let lease =
            attributes("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n");
        let resource = lease.resource.unwrap();
        assert_eq!(resource.group, "coordination.k8s.io");
        assert_eq!(resource.namespace.as_deref(), Some("kube-node-lease"));
        assert_eq!(resource.name.as_deref(), Some("n"));
        assert!(attributes("GET", "/api/v1").resource.is_none(), "discovery is not a resource");
    }

    #[tokio::test]
    async fn the_admin_may_do_everything() {
        let admin = UserInfo::admin();
        for (method, uri) in [
            ("DELETE", "/api/v1/nodes/node-2"),
            ("POST", "/api/v1/namespaces/default/pods"),
            ("GET", "/api/v1/secrets"),
            ("POST", "/strait.nodesync.v1.NodeSync/Watch"),
        ] {
            assert_eq!(allowed(&admin, method, uri, "").await, Ok(()), "{method} {uri}");
        }
    }

    #[tokio::test]
    async fn a_user_without_a_role_may_read_discovery_and_nothing_else() {
        let jane = UserInfo::new("jane", &["developers"]);
        for uri in
            ["/api", "/api/v1", "/apis", "/apis/apps/v1", "/openapi/v3", "/version", "/healthz"]
        {
            assert_eq!(allowed(&jane, "GET", uri, "").await, Ok(()), "{uri}");
        }
        for (method, uri) in [
            ("GET", "/api/v1/pods"),
            ("GET", "/api/v1/nodes/node-1"),
            ("POST", "/strait.nodesync.v1.NodeSync/Watch"),
            ("POST", "/api"),
        ] {
            assert!(allowed(&jane, method, uri, "").await.is_err(), "{method} {uri}");
        }
    }

    #[tokio::test]
    async fn a_node_may_do_what_its_agent_does() {
        let node = UserInfo::node("node-1");
        let cases = [
            ("GET", "/api/v1/nodes/node-1", ""),
            ("POST", "/api/v1/nodes", r#"{"metadata":{"name":"node-1"}}"#),
            ("PUT", "/api/v1/nodes/node-1/status", ""),
            ("PATCH", "/api/v1/nodes/node-1", ""),
            ("GET", "/api/v1/nodes?watch=true", ""),
            ("GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1", ""),
            ("GET", "/api/v1/namespaces/default/pods/theirs", ""),
            ("PATCH", "/api/v1/namespaces/default/pods/mine/status", ""),
            ("PUT", "/api/v1/namespaces/default/pods/mine/status", ""),
            ("DELETE", "/api/v1/namespaces/default/pods/mine", r#"{"gracePeriodSeconds":0}"#),
            // Gone already: the API answers 404.
            ("PATCH", "/api/v1/namespaces/default/pods/gone/status", ""),
            ("GET", "/api/v1/services", ""),
            ("GET", "/apis/discovery.k8s.io/v1/endpointslices?watch=1", ""),
            ("POST", "/api/v1/namespaces/default/events", ""),
            ("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-1", ""),
            ("PUT", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-1", ""),
            (
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                r#"{"metadata":{"name":"node-1"}}"#,
            ),
            ("POST", "/strait.nodesync.v1.NodeSync/Watch", ""),
            ("PUT", "/apis/metrics.k8s.io/v1beta1/nodes/node-1", ""),
        ];
        for (method, uri, body) in cases {
            assert_eq!(allowed(&node, method, uri, body).await, Ok(()), "{method} {uri}");
        }
    }

    #[tokio::test]
    async fn a_node_may_not_touch_what_is_not_its_own() {
        let node = UserInfo::node("node-1");
        let cases = [
            ("POST", "/api/v1/nodes", r#"{"metadata":{"name":"node-2"}}"#),
            ("POST", "/api/v1/nodes", r#"{"metadata":{"generateName":"node-"}}"#),
            ("PUT", "/api/v1/nodes/node-2/status", ""),
            ("PATCH", "/api/v1/nodes/node-2", ""),
            ("DELETE", "/api/v1/nodes/node-1", ""),
            ("PATCH", "/api/v1/namespaces/default/pods/theirs/status", ""),
            ("PATCH", "/api/v1/namespaces/default/pods/pending/status", ""),
            ("PATCH", "/api/v1/namespaces/default/pods/mine", ""),
            ("PUT", "/api/v1/namespaces/default/pods/mine", ""),
            ("POST", "/api/v1/namespaces/default/pods", ""),
            ("DELETE", "/api/v1/namespaces/default/pods/theirs", r#"{"gracePeriodSeconds":0}"#),
            (
                "DELETE",
                "/api/v1/namespaces/default/pods/theirs",
                r#"{"preconditions":{"uid":"uid-theirs"}}"#,
            ),
            ("DELETE", "/api/v1/namespaces/default/pods", ""),
            ("POST", "/api/v1/namespaces/default/services", ""),
            ("GET", "/api/v1/namespaces", ""),
            ("GET", "/api/v1/namespaces/default/configmaps/settings", ""),
            ("GET", "/api/v1/secrets", ""),
            ("GET", "/apis/apps/v1/deployments", ""),
            ("PUT", "/apis/metrics.k8s.io/v1beta1/nodes/node-2", ""),
            ("GET", "/apis/metrics.k8s.io/v1beta1/pods", ""),
            ("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-2", ""),
            ("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", ""),
            ("GET", "/apis/coordination.k8s.io/v1/namespaces/default/leases/node-1", ""),
            (
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                r#"{"metadata":{"name":"node-2"}}"#,
            ),
            ("GET", "/metrics", ""),
        ];
        for (method, uri, body) in cases {
            assert!(allowed(&node, method, uri, body).await.is_err(), "{method} {uri} {body}");
        }
    }

    #[tokio::test]
    async fn a_delete_for_another_incarnation_is_left_to_the_api_to_refuse() {
        // The name now belongs to another node's pod; the precondition names the node's old
        // pod, so the API answers 409 and deletes nothing.
        let node = UserInfo::node("node-1");
        let body = r#"{"gracePeriodSeconds":0,"preconditions":{"uid":"uid-old"}}"#;
        let uri = "/api/v1/namespaces/default/pods/theirs";
        assert_eq!(allowed(&node, "DELETE", uri, body).await, Ok(()));
    }

    #[test]
    fn the_refusal_names_the_user_the_verb_and_the_resource() {
        let node = UserInfo::node("node-1");
        let request = attributes("PATCH", "/api/v1/nodes/node-2/status");
        let Decision::Deny(reason) = decide(&node, &request) else { panic!("not denied") };
        let status = forbidden(&node, &request, &reason).to_status();
        assert_eq!(status["code"], 403);
        assert_eq!(status["reason"], "Forbidden");
        assert_eq!(
            status["message"],
            "nodes \"node-2\" is forbidden: User \"system:node:node-1\" cannot patch resource \
             \"nodes/status\" in API group \"\" at the cluster scope: node \"node-1\" may only \
             change its own Node"
        );
        let list = attributes("GET", "/apis/apps/v1/namespaces/web/deployments");
        let status = forbidden(&node, &list, "").to_status();
        assert_eq!(
            status["message"],
            "deployments.apps is forbidden: User \"system:node:node-1\" cannot list resource \
             \"deployments\" in API group \"apps\" in the namespace \"web\""
        );
        let path = attributes("GET", "/metrics");
        assert_eq!(
            forbidden(&node, &path, "").to_status()["message"],
            "forbidden: User \"system:node:node-1\" cannot get path \"/metrics\""
        );
    }
}
