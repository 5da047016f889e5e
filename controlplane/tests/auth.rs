//! HTTPS, authentication and authorization as clients see them: a controller on loopback, its
//! cluster CA, the admin credential, node identities, anonymous and foreign clients.

mod support;

use std::{path::Path, sync::Arc, time::Duration};

use http::Method;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Event, Node, ObjectReference, Pod, Service},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status},
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use strait_controlplane::{
    auth::{ClientCredentials, pki},
    client::{ApiClient, ClientError},
    nodesync_proto::{WatchRequest, node_sync_client::NodeSyncClient},
    testing::{TestController, node, pod, pod_on},
};
use support::kubectl::Kubectl;
use tonic::{Code, transport::Channel};

/// Sends a request and decodes the Status it is answered with.
async fn status_of(client: &ApiClient, method: Method, path: &str, body: &str) -> (u16, Status) {
    let body = (!body.is_empty()).then(|| body.as_bytes().to_vec());
    let (code, bytes) =
        client.send(method, path, "application/json", body).await.expect("the server answers");
    let status: Status = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!("{code}: expected a Status, got {}: {e}", String::from_utf8_lossy(&bytes))
    });
    (code.as_u16(), status)
}

/// The status code of a request, whatever the body.
async fn code_of(client: &ApiClient, method: Method, path: &str, body: &str) -> u16 {
    let body = (!body.is_empty()).then(|| body.as_bytes().to_vec());
    let (code, _) =
        client.send(method, path, "application/json", body).await.expect("the server answers");
    code.as_u16()
}

fn forbidden(error: ClientError) -> String {
    assert_eq!(error.code(), Some(403), "expected 403 Forbidden, got {error}");
    assert_eq!(error.reason(), Some("Forbidden"));
    error.to_string()
}

async fn grpc(server: &TestController, credentials: &ClientCredentials) -> NodeSyncClient<Channel> {
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .tls_config(credentials.grpc_tls())
        .unwrap()
        .connect()
        .await
        .expect("h2 over TLS connects");
    NodeSyncClient::new(channel)
}

/// The certificate the server presents in the TLS handshake.
async fn served_certificate(server: &TestController) -> CertificateDer<'static> {
    let config = server.admin_credentials().rustls_config(&[b"http/1.1"]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let address = server.url().trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("the handshake succeeds");
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_certificate_gets_401_unauthorized() {
    let server = TestController::start("auth-anonymous").await;
    let anonymous =
        server.client_with(&ClientCredentials::anonymous(server.admin_credentials().ca));
    for (method, path) in [
        (Method::GET, "/api/v1/namespaces/default/pods"),
        (Method::GET, "/api"),
        (Method::POST, "/api/v1/namespaces"),
        (Method::GET, "/api/v1/nodes?watch=true"),
    ] {
        let (code, status) = status_of(&anonymous, method.clone(), path, "").await;
        assert_eq!(code, 401, "{method} {path}");
        assert_eq!(status.reason.as_deref(), Some("Unauthorized"));
        assert_eq!(status.message.as_deref(), Some("Unauthorized"));
        assert_eq!(status.code, Some(401));
    }
    // What Kubernetes leaves open to anonymous clients.
    for path in ["/healthz", "/livez", "/readyz", "/version"] {
        assert_eq!(code_of(&anonymous, Method::GET, path, "").await, 200, "{path}");
    }
    // The stream agents follow is no exception.
    let mut agent =
        grpc(&server, &ClientCredentials::anonymous(server.admin_credentials().ca)).await;
    let refused = agent.watch(WatchRequest { node_name: "n1".to_owned() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_and_so_is_a_server_of_another_ca() {
    let server = TestController::start("auth-foreign").await;
    let other = TestController::start("auth-foreign-other").await;
    // Admin by name, but signed by the other cluster's CA: the handshake fails.
    let forged = ClientCredentials {
        ca: server.admin_credentials().ca,
        identity: other.admin_credentials().identity,
    };
    let error = server.client_with(&forged).list::<Pod>(None, "").await.unwrap_err();
    assert!(matches!(error, ClientError::Transport { .. }), "{error}");
    // A client of this cluster does not trust the other one's server.
    let error = ApiClient::new(&other.url(), &server.admin_credentials())
        .unwrap()
        .list::<Pod>(None, "")
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Transport { .. }), "{error}");
    // Plain HTTP is not served at all.
    let address = server.url().trim_start_matches("https://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tcp.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_a_role_reads_discovery_and_is_refused_the_rest() {
    let server = TestController::start("auth-other-user").await;
    let jane = server.client_with(&server.issue_credentials("jane", Some("developers")));
    assert_eq!(code_of(&jane, Method::GET, "/api/v1", "").await, 200);
    assert_eq!(code_of(&jane, Method::GET, "/apis", "").await, 200);
    let message = forbidden(jane.list::<Pod>(Some("default"), "").await.unwrap_err());
    assert!(
        message.contains(
            "pods is forbidden: User \"jane\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        ),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_does_what_its_agent_does_with_its_own_identity() {
    let server = TestController::start("auth-node-allowed").await;
    let admin = server.client();
    let agent = server.client_with(&server.node_credentials("node-1"));

    // Registration and heartbeats, as `agent::node` does them.
    assert!(agent.get::<Node>(None, "node-1").await.unwrap().is_none());
    agent.create(None, &node("node-1", "172.20.0.11", false)).await.unwrap();
    // The node controllers write the new node too (taints, its pod CIDR): a status written
    // over a version they replaced meanwhile is refused with 409 and written again on the
    // fresh one, as the agent does.
    let mut attempts = 0;
    loop {
        let mut registered: Node = agent.get(None, "node-1").await.unwrap().expect("registered");
        registered.status = Some(node("node-1", "172.20.0.11", true).status.unwrap());
        match agent.replace_status(None, "node-1", &registered).await {
            Ok(_) => break,
            Err(error) if error.code() == Some(409) && attempts < 10 => attempts += 1,
            Err(error) => panic!("the node's own status write: {error}"),
        }
    }
    let labels = json!({"metadata": {"labels": {"kubernetes.io/os": "linux"}}});
    agent.merge_patch::<Node>(None, "node-1", &labels, false).await.unwrap();
    let (nodes, _) = agent.list::<Node>(None, "").await.unwrap();
    assert_eq!(nodes.len(), 1);

    // Pods bound to it: status reports (patch and replace), then the final grace-0 delete.
    let mine: Pod = admin.create(Some("default"), &pod_on("mine", "node-1")).await.unwrap();
    let (pods, _) = agent.list::<Pod>(None, "fieldSelector=spec.nodeName%3Dnode-1").await.unwrap();
    assert_eq!(pods.len(), 1);
    let running = json!({"status": {"phase": "Running", "podIP": "10.244.0.5"}});
    let patched: Pod = agent.merge_patch(Some("default"), "mine", &running, true).await.unwrap();
    assert_eq!(patched.status.as_ref().unwrap().phase.as_deref(), Some("Running"));
    let mut replaced = patched.clone();
    replaced.status.as_mut().unwrap().host_ip = Some("172.20.0.11".to_owned());
    agent.replace_status(Some("default"), "mine", &replaced).await.unwrap();
    admin.delete::<Pod>(Some("default"), "mine", None).await.unwrap();
    let uid = mine.metadata.uid.as_deref();
    assert!(agent.delete_with_uid::<Pod>(Some("default"), "mine", Some(0), uid).await.unwrap());
    assert!(admin.get::<Pod>(Some("default"), "mine").await.unwrap().is_none());
    // Already gone: the API's 404, not a refusal.
    let gone = json!({"status": {"phase": "Failed"}});
    let error = agent.merge_patch::<Pod>(Some("default"), "mine", &gone, true).await.unwrap_err();
    assert_eq!(error.code(), Some(404), "{error}");

    // What NodeSync and a kube-proxy read, and events.
    agent.list::<Service>(None, "").await.unwrap();
    let slices = "/apis/discovery.k8s.io/v1/endpointslices";
    assert_eq!(code_of(&agent, Method::GET, slices, "").await, 200);
    let event = Event {
        metadata: ObjectMeta { name: Some("node-1.started".to_owned()), ..Default::default() },
        involved_object: ObjectReference {
            kind: Some("Node".to_owned()),
            name: Some("node-1".to_owned()),
            ..Default::default()
        },
        reason: Some("Starting".to_owned()),
        message: Some("the node agent is starting".to_owned()),
        type_: Some("Normal".to_owned()),
        ..Default::default()
    };
    agent.create(Some("default"), &event).await.unwrap();

    // Its own heartbeat lease in kube-node-lease: created, read, renewed.
    let lease_ns = Some("kube-node-lease");
    assert!(agent.get::<Lease>(lease_ns, "node-1").await.unwrap().is_none());
    let lease = Lease {
        metadata: ObjectMeta { name: Some("node-1".to_owned()), ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some("node-1".to_owned()),
            lease_duration_seconds: Some(40),
            ..Default::default()
        }),
    };
    let created = agent.create(lease_ns, &lease).await.unwrap();
    agent.replace(lease_ns, "node-1", &created).await.unwrap();
    let renew = json!({"spec": {"leaseDurationSeconds": 30}});
    agent.merge_patch::<Lease>(lease_ns, "node-1", &renew, false).await.unwrap();
    assert!(agent.get::<Lease>(lease_ns, "node-1").await.unwrap().is_some());

    // Its own NodeSync stream.
    let mut sync = grpc(&server, &server.node_credentials("node-1")).await;
    let mut stream =
        sync.watch(WatchRequest { node_name: "node-1".to_owned() }).await.unwrap().into_inner();
    let snapshot = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a snapshot within 5s")
        .unwrap()
        .unwrap();
    assert!(snapshot.snapshot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_refused_what_is_not_its_own_with_403() {
    let server = TestController::start("auth-node-forbidden").await;
    let admin = server.client();
    admin.create::<Node>(None, &node("node-1", "172.20.0.11", true)).await.unwrap();
    let other: Node = admin.create(None, &node("node-2", "172.20.0.12", true)).await.unwrap();
    admin.create::<Pod>(Some("default"), &pod_on("theirs", "node-2")).await.unwrap();
    // Unschedulable: no node has the label it asks for.
    let mut pending = pod("pending");
    pending.spec.as_mut().unwrap().node_selector =
        Some([("disk".to_owned(), "none".to_owned())].into());
    admin.create::<Pod>(Some("default"), &pending).await.unwrap();
    let agent = server.client_with(&server.node_credentials("node-1"));

    // Another node: neither created, changed, nor its status written.
    let message =
        forbidden(agent.create(None, &node("node-3", "172.20.0.13", true)).await.unwrap_err());
    assert!(
        message.contains("User \"system:node:node-1\" cannot create resource \"nodes\""),
        "{message}"
    );
    let message = forbidden(agent.replace_status(None, "node-2", &other).await.unwrap_err());
    assert!(
        message.contains(
            "nodes \"node-2\" is forbidden: User \"system:node:node-1\" cannot update resource \"nodes/status\" in API group \"\" at the cluster scope"
        ),
        "{message}"
    );
    let cordon = json!({"spec": {"unschedulable": true}});
    forbidden(agent.merge_patch::<Node>(None, "node-2", &cordon, false).await.unwrap_err());
    forbidden(agent.delete::<Node>(None, "node-1", None).await.unwrap_err());

    // Pods not bound to it: no status, no delete; no pod of its own making or changing.
    let running = json!({"status": {"phase": "Running"}});
    let message = forbidden(
        agent.merge_patch::<Pod>(Some("default"), "theirs", &running, true).await.unwrap_err(),
    );
    assert!(message.contains("cannot patch resource \"pods/status\""), "{message}");
    assert!(message.contains("in the namespace \"default\""), "{message}");
    forbidden(
        agent.merge_patch::<Pod>(Some("default"), "pending", &running, true).await.unwrap_err(),
    );
    forbidden(agent.delete::<Pod>(Some("default"), "theirs", Some(0)).await.unwrap_err());
    // Logs are the admin's to read (the API server reads them from the agents).
    let (code, status) =
        status_of(&agent, Method::GET, "/api/v1/namespaces/default/pods/theirs/log", "").await;
    assert_eq!(code, 403);
    assert!(
        status.message.as_deref().unwrap_or_default().contains("cannot get resource \"pods/log\""),
        "{status:?}"
    );
    // And so is exec.
    let exec = "/api/v1/namespaces/default/pods/theirs/exec?command=true&stdout=true";
    let (code, status) = status_of(&agent, Method::POST, exec, "").await;
    assert_eq!(code, 403);
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("cannot create resource \"pods/exec\""),
        "{status:?}"
    );
    forbidden(agent.create::<Pod>(Some("default"), &pod_on("made", "node-1")).await.unwrap_err());
    let relabel = json!({"metadata": {"labels": {"a": "b"}}});
    forbidden(
        agent.merge_patch::<Pod>(Some("default"), "theirs", &relabel, false).await.unwrap_err(),
    );
    let (code, status) =
        status_of(&agent, Method::DELETE, "/api/v1/namespaces/default/pods", "").await;
    assert_eq!((code, status.reason.as_deref()), (403, Some("Forbidden")));

    // Everything else.
    forbidden(agent.create::<Service>(Some("default"), &Service::default()).await.unwrap_err());
    forbidden(agent.list::<k8s_openapi::api::core::v1::Namespace>(None, "").await.unwrap_err());
    forbidden(agent.list::<k8s_openapi::api::apps::v1::ReplicaSet>(None, "").await.unwrap_err());
    let lease_ns = Some("kube-node-lease");
    let theirs_lease = Lease {
        metadata: ObjectMeta { name: Some("node-2".to_owned()), ..Default::default() },
        spec: Some(LeaseSpec { holder_identity: Some("node-2".to_owned()), ..Default::default() }),
    };
    let stored_lease = admin.create(lease_ns, &theirs_lease).await.unwrap();
    forbidden(agent.get::<Lease>(lease_ns, "node-2").await.unwrap_err());
    forbidden(agent.replace(lease_ns, "node-2", &stored_lease).await.unwrap_err());
    forbidden(agent.create(lease_ns, &theirs_lease).await.unwrap_err());
    forbidden(agent.list::<Lease>(lease_ns, "").await.unwrap_err());
    let mut misplaced = theirs_lease.clone();
    misplaced.metadata.name = Some("node-1".to_owned());
    forbidden(agent.create(Some("default"), &misplaced).await.unwrap_err());

    // Nothing was changed by any of it.
    let after = admin.get::<Node>(None, "node-2").await.unwrap().unwrap();
    assert_eq!(after.metadata.resource_version, other.metadata.resource_version);
    let theirs = admin.get::<Pod>(Some("default"), "theirs").await.unwrap().unwrap();
    assert_ne!(theirs.status.and_then(|s| s.phase).as_deref(), Some("Running"));

    // Another node's NodeSync stream.
    let mut sync = grpc(&server, &server.node_credentials("node-1")).await;
    let refused = sync.watch(WatchRequest { node_name: "node-2".to_owned() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("system:node:node-1"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_and_certificates_are_reused_across_a_restart() {
    let mut server = TestController::start("auth-restart").await;
    let pki_dir = server.data_dir().join(pki::PKI_DIR);
    let files = [pki::CA_CERT_FILE, pki::CA_KEY_FILE, pki::ADMIN_CERT_FILE, pki::SERVING_CERT_FILE];
    let read = |dir: &Path| files.map(|f| std::fs::read(dir.join(f)).unwrap());
    let before = read(&pki_dir);
    let served_before = served_certificate(&server).await;
    let node_credentials = server.node_credentials("node-1");
    let admin = server.admin_credentials();

    server.restart().await;

    assert!(read(&pki_dir) == before, "the PKI files changed across the restart");
    assert_eq!(served_certificate(&server).await, served_before);
    let on_disk = CertificateDer::pem_slice_iter(&before[3]).next().unwrap().unwrap();
    assert_eq!(served_before, on_disk, "the server presents the certificate it keeps");
    // Credentials issued before the restart still work.
    server.client_with(&admin).list::<Pod>(None, "").await.unwrap();
    let agent = server.client_with(&node_credentials);
    agent.create::<Node>(None, &node("node-1", "172.20.0.11", true)).await.unwrap();
}

async fn kubectl_authenticates_with_client_certificates(version: &str) {
    let server = TestController::start(&format!("auth-kubectl-{version}")).await;
    server.client().create::<Node>(None, &node("node-2", "172.20.0.12", true)).await.unwrap();

    let admin = Kubectl::new(version, &server);
    assert!(admin.ok(&["get", "nodes"]).await.contains("node-2"));
    admin.ok(&["label", "node", "node-2", "team=a"]).await;

    let node_1 = Kubectl::as_user(version, &server, "node-1", &server.node_credentials("node-1"));
    assert!(node_1.ok(&["get", "nodes"]).await.contains("node-2"), "a node reads nodes");
    // (kubectl cordon reports the refusal but exits 0 in some versions; label exits 1.)
    let cordon = node_1.run(&["cordon", "node-2"]).await;
    assert!(cordon.stderr.contains("nodes \"node-2\" is forbidden"), "{}", cordon.stderr);
    assert!(
        cordon.stderr.contains("User \"system:node:node-1\" cannot patch resource \"nodes\""),
        "{}",
        cordon.stderr
    );
    let refused = node_1.fails(&["label", "node", "node-2", "owner=node-1"]).await;
    assert!(refused.contains("forbidden"), "{refused}");
    let refused = node_1.fails(&["get", "namespaces"]).await;
    assert!(refused.contains("forbidden"), "{refused}");

    let anonymous = ClientCredentials::anonymous(server.admin_credentials().ca);
    let anonymous = Kubectl::as_user(version, &server, "anonymous", &anonymous);
    // A bearer token is a credential strait does not accept: the request is anonymous. (With
    // none at all kubectl would prompt for a password before sending anything.)
    let refused = anonymous.fails(&["get", "pods", "--token", "not-a-credential"]).await;
    assert!(refused.contains("You must be logged in to the server"), "{refused}");

    let node = server.client().get::<Node>(None, "node-2").await.unwrap().unwrap();
    assert_ne!(node.spec.and_then(|s| s.unschedulable), Some(true), "the cordon went through");
    let labels = node.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("team").map(String::as_str), Some("a"), "the admin's label");
    assert!(!labels.contains_key("owner"), "the node's label went through: {labels:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_27_authenticates_with_client_certificates() {
    kubectl_authenticates_with_client_certificates("1.27").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_31_authenticates_with_client_certificates() {
    kubectl_authenticates_with_client_certificates("1.31").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_33_authenticates_with_client_certificates() {
    kubectl_authenticates_with_client_certificates("1.33").await;
}
