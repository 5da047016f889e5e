//! A loopback HTTP relay in front of a controller that records the method, path and content
//! type of every request, to check what a client really sent (kubectl 1.32+ sends protobuf).

use std::sync::{Arc, Mutex};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use strait_controlplane::client::ApiClient;

/// One relayed request: method, path and query, content type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

#[derive(Clone)]
struct Relay {
    target: ApiClient,
    seen: Arc<Mutex<Vec<Recorded>>>,
}

pub struct Recorder {
    url: String,
    seen: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Starts relaying to `target` on a fresh loopback port.
    pub async fn start(target: ApiClient) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let relay = Relay { target, seen: Arc::clone(&seen) };
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the relay");
        let url = format!("http://{}", listener.local_addr().expect("the relay's address"));
        let app = Router::new().fallback(forward).with_state(relay);
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                panic!("the relay stopped: {error}");
            }
        });
        Self { url, seen, task }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every request relayed so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().map(|seen| seen.clone()).unwrap_or_default()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    State(relay): State<Relay>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let path = uri.path_and_query().map(ToString::to_string).unwrap_or_default();
    if let Ok(mut seen) = relay.seen.lock() {
        seen.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            content_type: content_type.clone(),
            body: body.to_vec(),
        });
    }
    let body = (!body.is_empty()).then(|| body.to_vec());
    match relay.target.send(method, &path, &content_type, body).await {
        Ok((status, answer)) => {
            (status, [(header::CONTENT_TYPE, "application/json")], answer).into_response()
        }
        Err(error) => (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}
