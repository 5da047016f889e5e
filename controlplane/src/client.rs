//! A small typed client of strait's Kubernetes-style REST API, for node agents, the lab and
//! tests, over HTTPS with the cluster CA and a client certificate. Paths are built from the
//! `k8s_openapi::Resource` constants, so every served kind works.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::stream::BoxStream;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use k8s_openapi::{
    ListableResource, Resource,
    apimachinery::pkg::apis::meta::v1::{Status, WatchEvent},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::auth::{ClientCredentials, PkiError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{method} {path}: {message}")]
    Transport { method: Method, path: String, message: String },
    /// The server answered with a Kubernetes `Status` (or at least an error code).
    #[error("{method} {path}: {code} {reason}: {message}")]
    Status { method: Method, path: String, code: u16, reason: String, message: String },
    #[error("{method} {path}: decoding the answer: {source}")]
    Decode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("bad server address {server:?}: {message}")]
    Address { server: String, message: String },
    #[error("configuring TLS for the API client")]
    Tls(#[source] PkiError),
}

impl ClientError {
    /// The HTTP status the server answered with, when it answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The Kubernetes `Status.reason` (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`…).
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Status { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// A connection to an API server, or to any of several replicas of one control plane. Cheap
/// to clone.
#[derive(Clone, Debug)]
pub struct ApiClient {
    server: String,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    replicas: Arc<Replicas>,
}

/// The replicas a client may use, and the one it uses now. A request that cannot connect to
/// the current one moves to the next (the request never reached a server, so sending it
/// elsewhere cannot apply it twice).
#[derive(Debug)]
struct Replicas {
    servers: Vec<String>,
    current: AtomicUsize,
}

impl ApiClient {
    /// `server` is the base URL, e.g. `https://172.20.0.1:6443`, or several separated by
    /// commas: replicas of one control plane, used one at a time, the next when the current
    /// one cannot be reached. Every server must present a certificate of the CA in
    /// `credentials`; the client authenticates with its certificate (anonymous without one).
    pub fn new(server: &str, credentials: &ClientCredentials) -> Result<Self, ClientError> {
        let mut servers = Vec::new();
        for server in server.split(',').map(|s| s.trim().trim_end_matches('/')) {
            if !server.starts_with("https://") {
                return Err(ClientError::Address {
                    server: server.to_owned(),
                    message: "expected an https:// URL".to_owned(),
                });
            }
            servers.push(server.to_owned());
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(false);
        // HTTP/1.1 as before TLS: each watch on its own connection, requests pooled.
        // ALPN is set by the connector from the protocols enabled below.
        let tls = credentials.rustls_config(&[]).map_err(ClientError::Tls)?;
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(connector);
        let http = Client::builder(TokioExecutor::new()).build(connector);
        let server = servers[0].clone();
        let replicas = Arc::new(Replicas { servers, current: AtomicUsize::new(0) });
        Ok(Self { server, http, timeout: Duration::from_secs(30), replicas })
    }

    /// The server requests go to now.
    pub fn server(&self) -> &str {
        let current = self.replicas.current.load(Ordering::Relaxed);
        self.replicas.servers.get(current).unwrap_or(&self.server)
    }

    /// Sends the request `build` makes for a server's base URL to the current replica, or to
    /// the next ones in turn while a replica cannot be connected to. The timeout bounds the
    /// response head of each attempt.
    async fn request(
        &self,
        method: &Method,
        path: &str,
        build: impl Fn(&str) -> Result<Request<Full<Bytes>>, http::Error>,
    ) -> Result<Response<Incoming>, ClientError> {
        let transport = |message: String| ClientError::Transport {
            method: method.clone(),
            path: path.to_owned(),
            message,
        };
        let count = self.replicas.servers.len();
        let first = self.replicas.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for attempt in 0..count {
            let index = (first + attempt) % count;
            let server = &self.replicas.servers[index];
            let request = build(server).map_err(|e| transport(e.to_string()))?;
            match tokio::time::timeout(self.timeout, self.http.request(request)).await {
                Ok(Ok(response)) => {
                    self.replicas.current.store(index, Ordering::Relaxed);
                    return Ok(response);
                }
                Ok(Err(error)) if error.is_connect() && count > 1 => {
                    failures.push(format!("{server}: {error:#}"));
                }
                Ok(Err(error)) => {
                    // Sent, perhaps applied: not safe to repeat elsewhere. The next request
                    // starts at the next replica, in case this one is going away.
                    if count > 1 {
                        self.replicas.current.store((index + 1) % count, Ordering::Relaxed);
                    }
                    return Err(transport(format!("{error:#}")));
                }
                Err(_) => {
                    if count > 1 {
                        self.replicas.current.store((index + 1) % count, Ordering::Relaxed);
                    }
                    return Err(transport(format!("no answer within {:?}", self.timeout)));
                }
            }
        }
        Err(transport(format!("no replica could be reached: {}", failures.join("; "))))
    }

    /// The collection path of `K`, e.g. `/api/v1/namespaces/default/pods` or `/api/v1/nodes`.
    /// `namespace` is ignored for cluster-scoped kinds by passing `None`.
    pub fn collection_path<K: Resource>(namespace: Option<&str>) -> String {
        let prefix = if K::GROUP.is_empty() {
            format!("/api/{}", K::VERSION)
        } else {
            format!("/apis/{}/{}", K::GROUP, K::VERSION)
        };
        match namespace {
            Some(namespace) => format!("{prefix}/namespaces/{namespace}/{}", K::URL_PATH_SEGMENT),
            None => format!("{prefix}/{}", K::URL_PATH_SEGMENT),
        }
    }

    /// The path of one object of `K`.
    pub fn object_path<K: Resource>(namespace: Option<&str>, name: &str) -> String {
        format!("{}/{name}", Self::collection_path::<K>(namespace))
    }

    /// Sends a request and returns the status and body, whatever the status.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let transport = |message: String| ClientError::Transport {
            method: method.clone(),
            path: path.to_owned(),
            message,
        };
        let has_body = body.is_some();
        let body = Bytes::from(body.unwrap_or_default());
        let response = self
            .request(&method, path, |server| {
                let mut request = Request::builder()
                    .method(method.clone())
                    .uri(format!("{server}{path}"))
                    .header(header::ACCEPT, "application/json");
                if has_body {
                    request = request.header(header::CONTENT_TYPE, content_type);
                }
                request.body(Full::new(body.clone()))
            })
            .await?;
        let status = response.status();
        let body =
            response.into_body().collect().await.map_err(|e| transport(e.to_string()))?.to_bytes();
        Ok((status, body))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.send(method.clone(), path, content_type, body).await?;
        if !status.is_success() {
            return Err(status_error(method, path, status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method,
            path: path.to_owned(),
            source,
        })
    }

    fn encode<T: Serialize>(
        method: &Method,
        path: &str,
        object: &T,
    ) -> Result<Vec<u8>, ClientError> {
        serde_json::to_vec(object).map_err(|source| ClientError::Decode {
            method: method.clone(),
            path: path.to_owned(),
            source,
        })
    }

    /// Gets one object; `None` when the server says 404.
    pub async fn get<K: Resource + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<K>, ClientError> {
        let path = Self::object_path::<K>(namespace, name);
        match self.json(Method::GET, &path, "", None).await {
            Ok(object) => Ok(Some(object)),
            Err(e) if e.code() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Lists a collection (`namespace: None` on a namespaced kind lists every namespace).
    /// Returns the items and the list's resourceVersion.
    pub async fn list<K: ListableResource + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        query: &str,
    ) -> Result<(Vec<K>, String), ClientError> {
        let mut path = Self::collection_path::<K>(namespace);
        if !query.is_empty() {
            path = format!("{path}?{query}");
        }
        let list: k8s_openapi::List<K> = self.json(Method::GET, &path, "", None).await?;
        Ok((list.items, list.metadata.resource_version.unwrap_or_default()))
    }

    /// Creates an object in `namespace` (or cluster-wide with `None`).
    pub async fn create<K: Resource + Serialize + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        object: &K,
    ) -> Result<K, ClientError> {
        let path = Self::collection_path::<K>(namespace);
        let body = Self::encode(&Method::POST, &path, object)?;
        self.json(Method::POST, &path, "application/json", Some(body)).await
    }

    /// Replaces an object (PUT); the object's resourceVersion, if set, must be current.
    pub async fn replace<K: Resource + Serialize + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
        object: &K,
    ) -> Result<K, ClientError> {
        let path = Self::object_path::<K>(namespace, name);
        let body = Self::encode(&Method::PUT, &path, object)?;
        self.json(Method::PUT, &path, "application/json", Some(body)).await
    }

    /// Replaces an object's status through its `/status` subresource.
    pub async fn replace_status<K: Resource + Serialize + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
        object: &K,
    ) -> Result<K, ClientError> {
        let path = format!("{}/status", Self::object_path::<K>(namespace, name));
        let body = Self::encode(&Method::PUT, &path, object)?;
        self.json(Method::PUT, &path, "application/json", Some(body)).await
    }

    /// Applies a JSON merge patch (RFC 7386) to an object, or to its `/status` when
    /// `status` is true.
    pub async fn merge_patch<K: Resource + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
        patch: &serde_json::Value,
        status: bool,
    ) -> Result<K, ClientError> {
        let mut path = Self::object_path::<K>(namespace, name);
        if status {
            path.push_str("/status");
        }
        let body = Self::encode(&Method::PATCH, &path, patch)?;
        self.json(Method::PATCH, &path, "application/merge-patch+json", Some(body)).await
    }

    /// Patches an object with a patch of media type `content_type`
    /// (`application/strategic-merge-patch+json`, `application/json-patch+json`,
    /// `application/merge-patch+json`).
    pub async fn patch<K: Resource + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
        content_type: &str,
        patch: &serde_json::Value,
    ) -> Result<K, ClientError> {
        let path = Self::object_path::<K>(namespace, name);
        let body = Self::encode(&Method::PATCH, &path, patch)?;
        self.json(Method::PATCH, &path, content_type, Some(body)).await
    }

    /// Deletes an object. `grace_period_seconds: Some(0)` asks for immediate removal. Returns
    /// false when it was already gone.
    pub async fn delete<K: Resource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        grace_period_seconds: Option<i64>,
    ) -> Result<bool, ClientError> {
        self.delete_with_uid::<K>(namespace, name, grace_period_seconds, None).await
    }

    /// Deletes an object only if it is still the incarnation with `uid` (DeleteOptions
    /// `preconditions.uid`; a different object of the same name gives 409 Conflict). A node
    /// agent finishing a graceful pod delete sends grace 0 with the pod's uid.
    pub async fn delete_with_uid<K: Resource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        grace_period_seconds: Option<i64>,
        uid: Option<&str>,
    ) -> Result<bool, ClientError> {
        let path = Self::object_path::<K>(namespace, name);
        let mut options = serde_json::json!({"kind": "DeleteOptions", "apiVersion": "v1"});
        if let Some(grace) = grace_period_seconds {
            options["gracePeriodSeconds"] = grace.into();
        }
        if let Some(uid) = uid {
            options["preconditions"] = serde_json::json!({ "uid": uid });
        }
        let body = Self::encode(&Method::DELETE, &path, &options)?;
        let (status, bytes) =
            self.send(Method::DELETE, &path, "application/json", Some(body)).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        if !status.is_success() {
            return Err(status_error(Method::DELETE, &path, status, &bytes));
        }
        Ok(true)
    }
}

impl ApiClient {
    /// Watches a collection (`namespace: None` on a namespaced kind watches every namespace).
    /// `query` is appended to `watch=true`, e.g. `resourceVersion=12&timeoutSeconds=30`. The
    /// stream ends when the server ends the watch; an `ERROR` event (such as 410 Expired)
    /// arrives as `WatchEvent::ErrorStatus`.
    pub async fn watch<K: ListableResource + DeserializeOwned + Send + 'static>(
        &self,
        namespace: Option<&str>,
        query: &str,
    ) -> Result<BoxStream<'static, Result<WatchEvent<K>, ClientError>>, ClientError> {
        let mut path = format!("{}?watch=true", Self::collection_path::<K>(namespace));
        if !query.is_empty() {
            path = format!("{path}&{query}");
        }
        let transport = |path: &str, message: String| ClientError::Transport {
            method: Method::GET,
            path: path.to_owned(),
            message,
        };
        // Only the response head is bounded by the timeout: the body lasts as long as the watch.
        let response = self
            .request(&Method::GET, &path, |server| {
                Request::builder()
                    .method(Method::GET)
                    .uri(format!("{server}{path}"))
                    .header(header::ACCEPT, "application/json")
                    .body(Full::new(Bytes::new()))
            })
            .await?;
        let status = response.status();
        if !status.is_success() {
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| transport(&path, e.to_string()))?
                .to_bytes();
            return Err(status_error(Method::GET, &path, status, &body));
        }
        struct Lines {
            body: hyper::body::Incoming,
            buffer: Vec<u8>,
            path: String,
            done: bool,
        }
        let lines = Lines { body: response.into_body(), buffer: Vec::new(), path, done: false };
        let stream = futures::stream::unfold(lines, |mut lines| async move {
            loop {
                if let Some(end) = lines.buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = lines.buffer.drain(..=end).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let event =
                        serde_json::from_slice(&line).map_err(|source| ClientError::Decode {
                            method: Method::GET,
                            path: lines.path.clone(),
                            source,
                        });
                    return Some((event, lines));
                }
                if lines.done {
                    return None;
                }
                match lines.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            lines.buffer.extend_from_slice(data);
                        }
                    }
                    Some(Err(e)) => {
                        lines.done = true;
                        let error = ClientError::Transport {
                            method: Method::GET,
                            path: lines.path.clone(),
                            message: e.to_string(),
                        };
                        return Some((Err(error), lines));
                    }
                    None => {
                        // A last event without its newline is still an event.
                        lines.done = true;
                        if !lines.buffer.iter().all(u8::is_ascii_whitespace) {
                            lines.buffer.push(b'\n');
                        }
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

fn status_error(method: Method, path: &str, status: StatusCode, body: &[u8]) -> ClientError {
    let (reason, message) = match serde_json::from_slice::<Status>(body) {
        Ok(s) => (s.reason.unwrap_or_default(), s.message.unwrap_or_default()),
        Err(_) => (String::new(), String::from_utf8_lossy(body).into_owned()),
    };
    ClientError::Status { method, path: path.to_owned(), code: status.as_u16(), reason, message }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Node, Pod};

    use super::ApiClient;

    #[test]
    fn paths_follow_the_kubernetes_layout() {
        assert_eq!(
            ApiClient::collection_path::<Pod>(Some("default")),
            "/api/v1/namespaces/default/pods"
        );
        assert_eq!(ApiClient::collection_path::<Pod>(None), "/api/v1/pods");
        assert_eq!(ApiClient::object_path::<Node>(None, "node-1"), "/api/v1/nodes/node-1");
        assert_eq!(
            ApiClient::collection_path::<k8s_openapi::api::apps::v1::Deployment>(Some("web")),
            "/apis/apps/v1/namespaces/web/deployments"
        );
        assert_eq!(
            ApiClient::object_path::<k8s_openapi::api::discovery::v1::EndpointSlice>(
                Some("web"),
                "web-abcde"
            ),
            "/apis/discovery.k8s.io/v1/namespaces/web/endpointslices/web-abcde"
        );
        assert_eq!(
            ApiClient::collection_path::<k8s_openapi::api::core::v1::Service>(None),
            "/api/v1/services"
        );
    }
}
