//! The HTTP face of the API server (axum): discovery, and the Kubernetes REST layout
//! (`/api/v1/namespaces/{ns}/{resource}/{name}/{subresource}`, `/apis/{group}/{version}/…`)
//! routed to the registered kinds.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, Query, State, rejection::QueryRejection},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::{StreamExt, stream::BoxStream};
use rand::Rng;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{
    Registry,
    deletion::PropagationPolicy,
    error::ApiError,
    handler::{
        FieldValidation, KindHandler, PageRequest, PatchBody, ScaleWrite, WatchEventOut,
        WriteOptions, Written, duplicate_fields,
    },
    kind::{DeleteRequest, KindInfo},
    openapi, protobuf,
    selectors::{FieldSelector, LabelSelector},
    table::{self, ResponseFormat},
    typed::{ListFilter, WatchStart, parse_resource_version},
};
use crate::store::Revision;

/// Kubernetes' default request size limit (`--max-request-bytes` is 3 MiB in etcd-backed
/// clusters; objects beyond that cannot be stored anyway).
pub(crate) const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Watches without `timeoutSeconds` end after 30 to 60 minutes, as Kubernetes' default
/// `--min-request-timeout` does, so that clients spread their re-watches.
const DEFAULT_WATCH_SECONDS: u64 = 1800;
/// The Kubernetes release whose API (and k8s-openapi feature) strait serves.
const SERVED_MINOR: &str = "33";

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub registry: Arc<Registry>,
    /// Becomes true when the server shuts down: open watches end.
    pub shutdown: watch::Receiver<bool>,
    /// How often a watch that allowed bookmarks receives one.
    pub bookmark_interval: Duration,
}

/// The router of the REST API.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/api", get(core_versions))
        .route("/apis", get(group_list))
        .route("/openapi/v2", get(openapi_v2))
        .route("/openapi/v3", get(openapi_v3_index))
        .route("/openapi/v3/{*group_version}", get(openapi_v3_group_version))
        .route("/healthz", get(healthy))
        .route("/livez", get(healthy))
        .route("/readyz", get(healthy))
        .fallback(dispatch)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn healthy() -> &'static str {
    "ok"
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "major": "1",
            "minor": SERVED_MINOR,
            "gitVersion": format!("v1.{SERVED_MINOR}.0+strait-{}", env!("CARGO_PKG_VERSION")),
            "gitCommit": "",
            "gitTreeState": "",
            "buildDate": "",
            "goVersion": "",
            "compiler": "rustc",
            "platform": format!("{}/{}", std::env::consts::OS, go_arch()),
        }),
    )
}

/// The architecture as Go (and so kubectl) names it.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

async fn core_versions(headers: HeaderMap) -> Response {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
        }),
    )
}

async fn group_list(State(state): State<ApiState>) -> Response {
    // Groups by name, each with its versions in registration order: the first registered is
    // the preferred one (autoscaling serves v2, preferred, and v1).
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for info in state.registry.handlers().iter().map(|h| h.info()) {
        if info.group.is_empty() {
            continue;
        }
        match groups.iter_mut().find(|(group, _)| *group == info.group) {
            Some((_, versions)) if !versions.contains(&info.version) => versions.push(info.version),
            Some(_) => {}
            None => groups.push((info.group, vec![info.version])),
        }
    }
    groups.sort_by(|a, b| a.0.cmp(b.0));
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                .collect();
            json!({"name": group, "preferredVersion": versions[0].clone(), "versions": versions})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
    )
}

async fn openapi_v3_index(State(state): State<ApiState>) -> Response {
    json_response(StatusCode::OK, &openapi::v3_index(&state.registry))
}

async fn openapi_v3_group_version(
    State(state): State<ApiState>,
    axum::extract::Path(group_version): axum::extract::Path<String>,
) -> Response {
    let segments: Vec<&str> = group_version.split('/').collect();
    let document = match segments.as_slice() {
        ["api", version] => openapi::v3_document(&state.registry, "", version),
        ["apis", group, version] => openapi::v3_document(&state.registry, group, version),
        _ => None,
    };
    match document {
        Some(document) => json_response(StatusCode::OK, &document),
        None => ApiError::UnknownPath.into_response(),
    }
}

async fn openapi_v2(State(state): State<ApiState>) -> Response {
    let body = openapi::v2_protobuf(&state.registry);
    (StatusCode::OK, [(header::CONTENT_TYPE, openapi::OPENAPI_V2_PROTOBUF)], body).into_response()
}

/// `APIResourceList` of one group version: resources and their subresources.
fn resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for handler in registry.handlers() {
        let info = handler.info();
        if info.group != group || info.version != version {
            continue;
        }
        let mut resource = json!({
            "name": info.plural,
            "singularName": info.singular,
            "namespaced": info.namespaced,
            "kind": info.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        });
        if !info.short_names.is_empty() {
            resource["shortNames"] = json!(info.short_names);
        }
        if !info.categories.is_empty() {
            resource["categories"] = json!(info.categories);
        }
        resources.push(resource);
        if info.has_status {
            resources.push(json!({
                "name": format!("{}/status", info.plural),
                "singularName": "",
                "namespaced": info.namespaced,
                "kind": info.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        // `kubectl logs` (served by `pod_log.rs`).
        if group.is_empty() && info.plural == "pods" {
            resources.push(json!({
                "name": "pods/log",
                "singularName": "",
                "namespaced": true,
                "kind": "Pod",
                "verbs": ["get"],
            }));
            // `kubectl exec` (served by `pod_exec.rs`).
            resources.push(json!({
                "name": "pods/exec",
                "singularName": "",
                "namespaced": true,
                "kind": "PodExecOptions",
                "verbs": ["create", "get"],
            }));
        }
        if info.has_scale {
            resources.push(json!({
                "name": format!("{}/scale", info.plural),
                "singularName": "",
                "namespaced": info.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        for (subresource, kind) in info.post_subresources {
            let mut entry = json!({
                "name": format!("{}/{subresource}", info.plural),
                "singularName": "",
                "namespaced": info.namespaced,
                "kind": kind,
                "verbs": ["create"],
            });
            // kubectl drain evicts only where discovery names the Eviction's group version
            // (and falls back to plain deletes otherwise).
            if *kind == "Eviction" {
                entry["group"] = json!("policy");
                entry["version"] = json!("v1");
            }
            resources.push(entry);
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version =
        if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// A request path resolved the way Kubernetes' request-info resolver does.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ResourcePath {
    pub(crate) group: String,
    pub(crate) version: String,
    pub(crate) namespace: Option<String>,
    pub(crate) resource: String,
    pub(crate) name: Option<String>,
    pub(crate) subresource: Option<String>,
}

/// Subresources of namespaces themselves, which `/namespaces/{ns}/…` must not mistake for a
/// namespaced resource.
const NAMESPACE_SUBRESOURCES: [&str; 2] = ["status", "finalize"];

pub(crate) enum PathKind {
    /// `/api/v1` or `/apis/{group}/{version}`: the resource list.
    GroupVersion {
        group: String,
        version: String,
    },
    Resource(ResourcePath),
}

pub(crate) fn parse_path(path: &str) -> Option<PathKind> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (String::new(), (*version).to_owned(), rest),
        ["apis", group, version, rest @ ..] => ((*group).to_owned(), (*version).to_owned(), rest),
        _ => return None,
    };
    let mut rest = rest.to_vec();
    if rest.is_empty() {
        return Some(PathKind::GroupVersion { group, version });
    }
    let mut namespace = None;
    if rest[0] == "namespaces" && rest.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&rest[2]) {
        namespace = Some(rest[1].to_owned());
        rest.drain(..2);
    }
    if rest.len() > 3 {
        return None;
    }
    Some(PathKind::Resource(ResourcePath {
        group,
        version,
        namespace,
        resource: rest[0].to_owned(),
        name: rest.get(1).map(|s| (*s).to_owned()),
        subresource: rest.get(2).map(|s| (*s).to_owned()),
    }))
}

/// The query parameters the API understands (others are ignored, as Kubernetes does for
/// unknown ones).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    label_selector: Option<String>,
    field_selector: Option<String>,
    watch: Option<String>,
    resource_version: Option<String>,
    timeout_seconds: Option<String>,
    allow_watch_bookmarks: Option<String>,
    include_object: Option<String>,
    send_initial_events: Option<String>,
    dry_run: Option<String>,
    field_validation: Option<String>,
    field_manager: Option<String>,
    force: Option<String>,
    limit: Option<String>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
    grace_period_seconds: Option<String>,
    propagation_policy: Option<String>,
    orphan_dependents: Option<String>,
}

/// A boolean of a query string as Kubernetes reads one (`?watch=true`, `=1`, `=True`); the
/// API server and the node's log and exec servers read their flags so.
pub fn flag(value: Option<&str>) -> bool {
    matches!(value, Some("true" | "1" | "True"))
}

/// Kubernetes' limit on a field manager's name.
const MAX_FIELD_MANAGER_LEN: usize = 128;

impl Params {
    fn write_options(&self, headers: &HeaderMap) -> Result<WriteOptions, ApiError> {
        let dry_run = match self.dry_run.as_deref() {
            None | Some("") => false,
            Some("All") => true,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "dryRun: unsupported value {other:?}; supported values: \"All\""
                )));
            }
        };
        let field_validation = match self.field_validation.as_deref() {
            None | Some("" | "Warn") => FieldValidation::Warn,
            Some("Ignore") => FieldValidation::Ignore,
            Some("Strict") => FieldValidation::Strict,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "fieldValidation: unsupported value {other:?}; supported values: \"Ignore\", \"Warn\", \"Strict\""
                )));
            }
        };
        let given = self.field_manager.as_deref().filter(|m| !m.is_empty());
        if let Some(manager) = given
            && (manager.len() > MAX_FIELD_MANAGER_LEN || manager.chars().any(char::is_control))
        {
            return Err(ApiError::BadRequest(format!(
                "fieldManager must be at most {MAX_FIELD_MANAGER_LEN} printable characters"
            )));
        }
        // Without `fieldManager`, the client's name (`kubectl/v1.33.0 (…)` → `kubectl`), as
        // Kubernetes names the manager.
        let from_agent = || {
            headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .and_then(|agent| agent.split('/').next())
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(|name| name.chars().take(MAX_FIELD_MANAGER_LEN).collect::<String>())
        };
        Ok(WriteOptions {
            dry_run,
            field_validation,
            strict_fields: field_validation == FieldValidation::Strict,
            field_manager: given.map(str::to_owned).or_else(from_agent),
            field_manager_given: given.is_some(),
            force: flag(self.force.as_deref()),
        })
    }

    fn page(&self) -> Result<PageRequest, ApiError> {
        let limit = match self.limit.as_deref() {
            None | Some("") => None,
            Some(text) => match text.parse::<usize>() {
                // `limit=0` is no limit, as in Kubernetes.
                Ok(0) => None,
                Ok(limit) => Some(limit),
                Err(_) => {
                    return Err(ApiError::BadRequest(format!(
                        "limit {text:?} is not a non-negative integer"
                    )));
                }
            },
        };
        let continue_token = self.continue_token.clone().filter(|t| !t.is_empty());
        Ok(PageRequest { limit, continue_token })
    }

    fn filter(&self, handler: &dyn KindHandler) -> Result<ListFilter, ApiError> {
        let labels = LabelSelector::parse(self.label_selector.as_deref().unwrap_or_default())
            .map_err(|why| ApiError::BadRequest(format!("unable to parse requirement: {why}")))?;
        let fields = FieldSelector::parse(self.field_selector.as_deref().unwrap_or_default())
            .map_err(ApiError::BadRequest)?;
        handler.check_field_selector(&fields)?;
        Ok(ListFilter { labels, fields })
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Bodies of create and replace: JSON (an absent content type is taken as JSON).
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match content_type(headers).as_str() {
        "" | "application/json" => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType {
            accepted: format!("application/json, {}", protobuf::MEDIA_TYPE),
        }),
    }
}

/// The body of a create or replace as JSON: JSON as sent, or a protobuf body (kubectl 1.32+
/// `create` generators) decoded into JSON.
fn object_body<'a>(
    headers: &HeaderMap,
    body: &'a [u8],
    info: &KindInfo,
) -> Result<std::borrow::Cow<'a, [u8]>, ApiError> {
    if content_type(headers) != protobuf::MEDIA_TYPE {
        require_json(headers)?;
        return Ok(std::borrow::Cow::Borrowed(body));
    }
    let object = protobuf::decode(body, &info.api_version(), info.kind)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    serde_json::to_vec(&object)
        .map(std::borrow::Cow::Owned)
        .map_err(|e| ApiError::internal("encoding a decoded protobuf body", e))
}

fn delete_request(params: &Params, body: &[u8]) -> Result<DeleteRequest, ApiError> {
    #[derive(Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Preconditions {
        uid: Option<String>,
        resource_version: Option<String>,
    }
    #[derive(Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct DeleteOptionsBody {
        grace_period_seconds: Option<i64>,
        preconditions: Option<Preconditions>,
        propagation_policy: Option<String>,
        orphan_dependents: Option<bool>,
    }
    let options: DeleteOptionsBody = if body.iter().all(u8::is_ascii_whitespace) {
        DeleteOptionsBody::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("the DeleteOptions are not valid: {e}")))?
    };
    let query_grace = match params.grace_period_seconds.as_deref() {
        Some(text) => Some(text.parse::<i64>().map_err(|_| {
            ApiError::BadRequest(format!("gracePeriodSeconds {text:?} is not an integer"))
        })?),
        None => None,
    };
    let query_orphan = match params.orphan_dependents.as_deref() {
        Some(text) => Some(text.parse::<bool>().map_err(|_| {
            ApiError::BadRequest(format!("orphanDependents {text:?} is not a boolean"))
        })?),
        None => None,
    };
    let propagation_policy = PropagationPolicy::of_request(
        options.propagation_policy.as_deref().or(params.propagation_policy.as_deref()),
        options.orphan_dependents.or(query_orphan),
    )?;
    let preconditions = options.preconditions.unwrap_or_default();
    Ok(DeleteRequest {
        grace_period_seconds: options.grace_period_seconds.or(query_grace),
        precondition_uid: preconditions.uid,
        precondition_resource_version: preconditions.resource_version,
        propagation_policy,
    })
}

/// How much of an oversized body is read (and dropped) before answering 413: a client that
/// is still sending when the answer comes would see its connection reset instead of the
/// answer. Past this, the connection is given up.
const MAX_DRAINED_BYTES: usize = 64 * 1024 * 1024;

/// Reads a request body of at most [`MAX_BODY_BYTES`].
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut kept = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        total = total.saturating_add(chunk.len());
        if total <= MAX_BODY_BYTES {
            kept.extend_from_slice(&chunk);
        } else if total > MAX_DRAINED_BYTES {
            break;
        }
    }
    if total > MAX_BODY_BYTES {
        return Err(ApiError::RequestEntityTooLarge { limit: MAX_BODY_BYTES });
    }
    Ok(Bytes::from(kept))
}

/// Every request under `/api` and `/apis` that is not a fixed route. Malformed query strings
/// and oversized bodies are answered as Status objects too.
async fn dispatch(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    params: Result<Query<Params>, QueryRejection>,
    body: Body,
) -> Response {
    let params = match params {
        Ok(Query(params)) => params,
        Err(rejection) => return ApiError::BadRequest(rejection.body_text()).into_response(),
    };
    let body = match read_body(body).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    match route(&state, &method, &uri, &headers, &params, &body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn route(
    state: &ApiState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    params: &Params,
    body: &[u8],
) -> Result<Response, ApiError> {
    let path = match parse_path(uri.path()) {
        Some(PathKind::GroupVersion { group, version }) => {
            if method != Method::GET {
                return Err(ApiError::MethodNotAllowed);
            }
            return resource_list(&state.registry, &group, &version)
                .map(|list| json_response(StatusCode::OK, &list))
                .ok_or(ApiError::UnknownPath);
        }
        Some(PathKind::Resource(path)) => path,
        None => return Err(ApiError::UnknownPath),
    };
    let handler = state
        .registry
        .handler(&path.group, &path.version, &path.resource)
        .ok_or(ApiError::UnknownPath)?
        .clone();
    let info = handler.info();
    if path.namespace.is_some() && !info.namespaced {
        return Err(ApiError::UnknownPath);
    }
    let namespace = path.namespace.as_deref();
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());

    let Some(name) = path.name.as_deref() else {
        // The collection.
        return match *method {
            Method::GET => {
                let format = table::negotiate(accept, params.include_object.as_deref())?;
                let filter = params.filter(handler.as_ref())?;
                if flag(params.watch.as_deref()) {
                    return watch(state, handler, namespace, filter, params, format).await;
                }
                let list = handler.list(namespace, &filter, &params.page()?, format).await?;
                Ok(json_response(StatusCode::OK, &list))
            }
            Method::POST => {
                if info.namespaced && namespace.is_none() {
                    return Err(ApiError::UnknownPath);
                }
                let options = params.write_options(headers)?;
                let duplicates = check_duplicates(headers, body, &options)?;
                let body = object_body(headers, body, info)?;
                let created = handler.create(namespace, &body, options).await?;
                Ok(written_response(&created, duplicates))
            }
            _ => Err(ApiError::MethodNotAllowed),
        };
    };
    if info.namespaced && namespace.is_none() {
        return Err(ApiError::UnknownPath);
    }
    // The object and its `/status` subresource are read and written alike; `status` says which
    // half of the object a write may change. Only the object itself can be deleted.
    let status = match path.subresource.as_deref() {
        None => Some(false),
        Some("status") if info.has_status => Some(true),
        _ => None,
    };
    if let Some(status) = status {
        return match *method {
            Method::GET => {
                let format = table::negotiate(accept, params.include_object.as_deref())?;
                Ok(json_response(StatusCode::OK, &handler.get(namespace, name, format).await?))
            }
            Method::PUT => {
                let options = params.write_options(headers)?;
                let duplicates = check_duplicates(headers, body, &options)?;
                let body = object_body(headers, body, info)?;
                let updated = handler.replace(namespace, name, &body, status, options).await?;
                Ok(written_response(&updated, duplicates))
            }
            Method::PATCH => {
                let options = params.write_options(headers)?;
                let duplicates = check_duplicates(headers, body, &options)?;
                let patch = patch_body(headers, body)?;
                let patched = handler.patch(namespace, name, &patch, status, options).await?;
                Ok(written_response(&patched, duplicates))
            }
            Method::DELETE if !status => {
                let request = delete_request(params, body)?;
                let deleted = handler
                    .delete(namespace, name, &request, params.write_options(headers)?)
                    .await?;
                Ok(json_response(StatusCode::OK, &deleted))
            }
            _ => Err(ApiError::MethodNotAllowed),
        };
    }
    if path.subresource.as_deref() == Some("scale") && info.has_scale {
        return match *method {
            Method::GET => {
                Ok(json_response(StatusCode::OK, &handler.get_scale(namespace, name).await?))
            }
            Method::PUT => {
                require_json(headers)?;
                let write = ScaleWrite::Replace(body);
                let scale = handler
                    .write_scale(namespace, name, write, params.write_options(headers)?)
                    .await?;
                Ok(json_response(StatusCode::OK, &scale))
            }
            Method::PATCH => {
                let patch = patch_body(headers, body)?;
                let write = ScaleWrite::Patch(&patch);
                let scale = handler
                    .write_scale(namespace, name, write, params.write_options(headers)?)
                    .await?;
                Ok(json_response(StatusCode::OK, &scale))
            }
            _ => Err(ApiError::MethodNotAllowed),
        };
    }
    match path.subresource.as_deref() {
        Some(subresource) if info.post_subresources.iter().any(|(s, _)| *s == subresource) => {
            if *method != Method::POST {
                return Err(ApiError::MethodNotAllowed);
            }
            require_json(headers)?;
            let answer = handler.post_subresource(namespace, name, subresource, body).await?;
            Ok(json_response(StatusCode::CREATED, &answer))
        }
        // `None` and `status` were answered above.
        _ => Err(ApiError::UnknownPath),
    }
}

/// The PATCH media types, as the 415 answer lists them.
const PATCH_MEDIA_TYPES: &str = "application/json-patch+json, application/merge-patch+json, \
                                 application/strategic-merge-patch+json, \
                                 application/apply-patch+yaml";

/// A write's answer: 201 when it created the object, with a `Warning` header (RFC 7234
/// section 5.5, code 299 as Kubernetes sends them) for each warning.
fn written_response(written: &Written, mut warnings: Vec<String>) -> Response {
    let code = if written.created { StatusCode::CREATED } else { StatusCode::OK };
    warnings.extend(written.warnings.iter().cloned());
    let mut response = json_response(code, &written.object);
    for warning in warnings {
        let text = warning.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(value) = header::HeaderValue::from_str(&format!("299 - \"{text}\"")) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

/// `fieldValidation` of a JSON body's duplicated members: an error when Strict, warnings
/// when Warn. The decoders themselves would silently keep the last.
fn check_duplicates(
    headers: &HeaderMap,
    body: &[u8],
    options: &WriteOptions,
) -> Result<Vec<String>, ApiError> {
    let json = matches!(
        content_type(headers).as_str(),
        "" | "application/json"
            | "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/json-patch+json"
    );
    if !json || options.field_validation == FieldValidation::Ignore {
        return Ok(Vec::new());
    }
    let duplicates: Vec<String> =
        duplicate_fields(body).iter().map(|f| format!("duplicate field \"{f}\"")).collect();
    if options.field_validation == FieldValidation::Strict && !duplicates.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "strict decoding error: {}",
            duplicates.join(", ")
        )));
    }
    Ok(duplicates)
}

/// A PATCH body by its content type.
fn patch_body(headers: &HeaderMap, body: &[u8]) -> Result<PatchBody, ApiError> {
    let kind: fn(Value) -> PatchBody = match content_type(headers).as_str() {
        "application/merge-patch+json" => PatchBody::Merge,
        "application/strategic-merge-patch+json" => PatchBody::Strategic,
        "application/json-patch+json" => PatchBody::Json,
        "application/apply-patch+yaml" => PatchBody::Apply,
        _ => {
            return Err(ApiError::UnsupportedMediaType { accepted: PATCH_MEDIA_TYPES.to_owned() });
        }
    };
    let patch = if matches!(kind(Value::Null), PatchBody::Apply(_)) {
        yaml_or_json(body)?
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("the patch is not valid JSON: {e}")))?
    };
    Ok(kind(patch))
}

/// An apply configuration: YAML, of which JSON (what kubectl sends) is a subset.
fn yaml_or_json(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::BadRequest("the applied configuration is not UTF-8".to_owned()))?;
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text).map_err(|e| {
            ApiError::BadRequest(format!("the applied configuration is not valid JSON: {e}"))
        });
    }
    serde_saphyr::from_str(text).map_err(|e| {
        ApiError::BadRequest(format!("the applied configuration is not valid YAML: {e}"))
    })
}

fn watch_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": event_type, "object": object}).to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

/// A watch response: a chunked stream of `{"type":…,"object":…}` lines until the timeout,
/// an error, or server shutdown.
async fn watch(
    state: &ApiState,
    handler: Arc<dyn KindHandler>,
    namespace: Option<&str>,
    filter: ListFilter,
    params: &Params,
    format: ResponseFormat,
) -> Result<Response, ApiError> {
    let start = match params.resource_version.as_deref() {
        // Streaming lists (KEP-3157): the current state, then a bookmark marking its end.
        _ if flag(params.send_initial_events.as_deref()) => WatchStart::NowThenBookmark,
        None | Some("" | "0") => WatchStart::Now,
        Some(text) => WatchStart::After(parse_resource_version(text)?),
    };
    let timeout = match params.timeout_seconds.as_deref() {
        Some(text) => Duration::from_secs(text.parse().map_err(|_| {
            ApiError::BadRequest(format!("timeoutSeconds {text:?} is not a number of seconds"))
        })?),
        None => Duration::from_secs(
            DEFAULT_WATCH_SECONDS + rand::rng().random_range(0..DEFAULT_WATCH_SECONDS),
        ),
    };
    let bookmarks = flag(params.allow_watch_bookmarks.as_deref());
    let (start_revision, events) = handler.watch(namespace, filter, start, format).await?;
    let stream = WatchBody {
        events,
        handler,
        format,
        last_revision: start_revision,
        deadline: tokio::time::Instant::now() + timeout,
        bookmark_interval: bookmarks.then_some(state.bookmark_interval),
        shutdown: state.shutdown.clone(),
    }
    .into_stream();
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream.map(Ok::<_, Infallible>)),
    )
        .into_response())
}

struct WatchBody {
    events: BoxStream<'static, WatchEventOut>,
    handler: Arc<dyn KindHandler>,
    format: ResponseFormat,
    last_revision: Revision,
    deadline: tokio::time::Instant,
    bookmark_interval: Option<Duration>,
    shutdown: watch::Receiver<bool>,
}

impl WatchBody {
    fn into_stream(self) -> BoxStream<'static, Bytes> {
        futures::stream::unfold(Some(self), |state| async move {
            let mut state = state?;
            let bookmark = async {
                match state.bookmark_interval {
                    Some(interval) => tokio::time::sleep(interval).await,
                    None => std::future::pending().await,
                }
            };
            if *state.shutdown.borrow() {
                return None;
            }
            tokio::select! {
                event = state.events.next() => {
                    let event = event?;
                    if let Some(revision) = event.revision {
                        state.last_revision = state.last_revision.max(revision);
                    }
                    let line = watch_line(event.event_type, &event.object);
                    // An error is the last event of a watch.
                    let next = (event.event_type != "ERROR").then_some(state);
                    Some((line, next))
                }
                () = bookmark => {
                    let object = state.handler.bookmark(state.last_revision, state.format);
                    Some((watch_line("BOOKMARK", &object), Some(state)))
                }
                () = tokio::time::sleep_until(state.deadline) => None,
                _ = state.shutdown.changed() => None,
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::{PathKind, ResourcePath, parse_path};

    fn resource(path: &str) -> ResourcePath {
        match parse_path(path) {
            Some(PathKind::Resource(resource)) => resource,
            _ => panic!("{path} is not a resource path"),
        }
    }

    #[test]
    fn paths_resolve_like_kubernetes() {
        let pods = resource("/api/v1/namespaces/default/pods/web/status");
        assert_eq!(pods.namespace.as_deref(), Some("default"));
        assert_eq!(pods.resource, "pods");
        assert_eq!(pods.name.as_deref(), Some("web"));
        assert_eq!(pods.subresource.as_deref(), Some("status"));

        let namespace_status = resource("/api/v1/namespaces/team/status");
        assert_eq!(namespace_status.namespace, None);
        assert_eq!(namespace_status.resource, "namespaces");
        assert_eq!(namespace_status.name.as_deref(), Some("team"));
        assert_eq!(namespace_status.subresource.as_deref(), Some("status"));

        let namespace = resource("/api/v1/namespaces/team");
        assert_eq!(
            (namespace.resource.as_str(), namespace.name.as_deref()),
            ("namespaces", Some("team"))
        );

        let all_pods = resource("/api/v1/pods");
        assert_eq!((all_pods.namespace, all_pods.name), (None, None));

        let deployments = resource("/apis/apps/v1/namespaces/web/deployments");
        assert_eq!((deployments.group.as_str(), deployments.version.as_str()), ("apps", "v1"));
        assert_eq!(deployments.namespace.as_deref(), Some("web"));

        assert!(matches!(parse_path("/api/v1"), Some(PathKind::GroupVersion { .. })));
        assert!(parse_path("/metrics").is_none());
        assert!(parse_path("/api/v1/namespaces/a/pods/b/c/d").is_none());
    }
}
