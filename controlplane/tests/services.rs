//! Services through the REST API: defaults, validation with Kubernetes' field paths, and
//! cluster IPs that are allocated with the service, released with it, and never handed out
//! twice (across restarts too).

use std::{collections::HashSet, net::Ipv4Addr};

use http::{Method, StatusCode};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use serde_json::{Value, json};
use strait_controlplane::{client::ApiClient, testing::TestController};

const SERVICES: &str = "/api/v1/namespaces/default/services";

fn service(name: &str, cluster_ip: Option<&str>) -> Value {
    let mut spec = json!({"selector": {"app": name}, "ports": [{"port": 80}]});
    if let Some(ip) = cluster_ip {
        spec["clusterIP"] = ip.into();
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
}

async fn post(client: &ApiClient, body: &Value) -> (StatusCode, Value) {
    let (code, bytes) = client
        .send(Method::POST, SERVICES, "application/json", Some(body.to_string().into_bytes()))
        .await
        .expect("the server answers");
    (code, serde_json::from_slice(&bytes).expect("a JSON answer"))
}

async fn create(client: &ApiClient, body: &Value) -> Service {
    let (code, answer) = post(client, body).await;
    assert_eq!(code, StatusCode::CREATED, "{answer}");
    serde_json::from_value(answer).unwrap()
}

fn cluster_ip(service: &Service) -> Ipv4Addr {
    let spec = service.spec.as_ref().unwrap();
    let ip = spec.cluster_ip.as_deref().unwrap();
    assert_eq!(spec.cluster_ips.as_deref(), Some(&[ip.to_owned()][..]), "clusterIPs = [clusterIP]");
    ip.parse().unwrap()
}

/// The fields named by a 422 `Status`.
fn invalid_fields(code: StatusCode, status: &Value) -> Vec<String> {
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}");
    assert_eq!(status["reason"], "Invalid");
    status["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap().to_owned())
        .collect()
}

async fn absent(client: &ApiClient, name: &str) -> bool {
    client.get::<Service>(Some("default"), name).await.unwrap().is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_service_gets_a_cluster_ip_in_the_range_and_kubernetes_defaults() {
    let server = TestController::start("svc-create").await;
    let client = server.client();
    let created = create(&client, &service("web", None)).await;
    let ip = cluster_ip(&created);
    let range: Ipv4Net = "10.96.0.0/16".parse().unwrap();
    assert!(range.contains(&ip) && ip != range.network() && ip != range.broadcast(), "{ip}");
    assert_ne!(ip, Ipv4Addr::new(10, 96, 0, 10), "the DNS address is kube-dns's");

    let spec = created.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(spec.ip_families.as_deref(), Some(&["IPv4".to_owned()][..]));
    assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80)),
        "targetPort defaults to port"
    );

    let mut sticky = service("sticky", None);
    sticky["spec"]["sessionAffinity"] = "ClientIP".into();
    let sticky = create(&client, &sticky).await;
    let timeout = sticky
        .spec
        .and_then(|s| s.session_affinity_config)
        .and_then(|c| c.client_ip)
        .and_then(|c| c.timeout_seconds);
    assert_eq!(timeout, Some(10800));

    let headless = create(&client, &service("db", Some("None"))).await;
    assert_eq!(headless.spec.unwrap().cluster_ip.as_deref(), Some("None"), "no allocation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_cluster_ips_are_honoured_only_when_free_and_in_range() {
    let server = TestController::start("svc-requested").await;
    let client = server.client();
    let web = create(&client, &service("web", Some("10.96.7.7"))).await;
    assert_eq!(cluster_ip(&web), Ipv4Addr::new(10, 96, 7, 7));

    let (code, status) = post(&client, &service("copy", Some("10.96.7.7"))).await;
    assert_eq!(invalid_fields(code, &status), ["spec.clusterIP"]);
    assert!(
        status["message"].as_str().unwrap().contains("provided IP is already allocated"),
        "{status}"
    );
    assert!(absent(&client, "copy").await, "nothing is stored on error");

    for outside in ["10.97.0.1", "10.96.255.255", "10.96.0.0"] {
        let (code, status) = post(&client, &service("outside", Some(outside))).await;
        assert_eq!(invalid_fields(code, &status), ["spec.clusterIP"], "{outside}");
        assert!(
            status["message"].as_str().unwrap().contains("provided IP is not in the valid range"),
            "{status}"
        );
    }
    let (code, status) = post(&client, &service("garbage", Some("10.96.1"))).await;
    assert_eq!(invalid_fields(code, &status), ["spec.clusterIP"]);
    assert!(absent(&client, "outside").await && absent(&client, "garbage").await);

    // Delete releases the address in the same transaction: it can be requested again.
    assert!(client.delete::<Service>(Some("default"), "web", None).await.unwrap());
    let again = create(&client, &service("again", Some("10.96.7.7"))).await;
    assert_eq!(cluster_ip(&again), Ipv4Addr::new(10, 96, 7, 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_services_name_the_field_and_store_nothing() {
    let server = TestController::start("svc-invalid").await;
    let client = server.client();
    let with_ports = |ports: Value| json!({"metadata": {"name": "bad"}, "spec": {"selector": {"app": "x"}, "ports": ports}});
    let cases = [
        (with_ports(json!([{"port": 0}])), "spec.ports[0].port"),
        (
            with_ports(json!([{"name": "a", "port": 80}, {"name": "b", "port": 70000}])),
            "spec.ports[1].port",
        ),
        (
            with_ports(json!([{"name": "a", "port": 80}, {"name": "a", "port": 81}])),
            "spec.ports[1].name",
        ),
        (with_ports(json!([{"port": 80}, {"name": "b", "port": 81}])), "spec.ports[0].name"),
        (with_ports(json!([{"name": "Web", "port": 80}])), "spec.ports[0].name"),
        (with_ports(json!([{"port": 80, "protocol": "SCTP"}])), "spec.ports[0].protocol"),
        (
            with_ports(json!([{"name": "a", "port": 80}, {"name": "b", "port": 80}])),
            "spec.ports[1]",
        ),
        (with_ports(json!([{"port": 80, "targetPort": 0x10000}])), "spec.ports[0].targetPort"),
        (with_ports(json!([{"port": 80, "targetPort": "no_such"}])), "spec.ports[0].targetPort"),
        (
            json!({"metadata": {"name": "bad"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}}),
            "spec.type",
        ),
        (
            json!({"metadata": {"name": "bad"}, "spec": {"selector": {"app": "a b"}, "ports": [{"port": 80}]}}),
            "spec.selector[app]",
        ),
        (
            json!({"metadata": {"name": "bad"}, "spec": {"ports": [{"port": 80}], "sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}}}),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        ),
    ];
    for (body, field) in cases {
        let (code, status) = post(&client, &body).await;
        assert_eq!(invalid_fields(code, &status), [field], "{body}");
        assert!(absent(&client, "bad").await, "nothing stored for {body}");
    }
    let (code, status) = post(
        &client,
        &json!({"metadata": {"name": "bad"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}),
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(status["message"].as_str().unwrap().contains("not supported yet"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ip_cannot_change_but_other_fields_can() {
    let server = TestController::start("svc-update").await;
    let client = server.client();
    let created = create(&client, &service("web", None)).await;
    let ip = cluster_ip(&created);

    let error = client
        .merge_patch::<Service>(
            Some("default"),
            "web",
            &json!({"spec": {"clusterIP": "10.96.9.9", "clusterIPs": ["10.96.9.9"]}}),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(422), "{error}");
    assert!(error.to_string().contains("spec.clusterIP"), "{error}");

    // A replace without the cluster IP keeps it (the manifest never had one).
    let mut replacement: Service = serde_json::from_value(service("web", None)).unwrap();
    replacement.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 8080;
    let replaced = client.replace(Some("default"), "web", &replacement).await.unwrap();
    assert_eq!(cluster_ip(&replaced), ip);
    assert_eq!(replaced.spec.unwrap().ports.unwrap()[0].port, 8080);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_dns_is_created_once_at_the_configured_address() {
    let mut server = TestController::start("svc-dns").await;
    let dns: Service = server.client().get(Some("kube-system"), "kube-dns").await.unwrap().unwrap();
    assert_eq!(cluster_ip(&dns), Ipv4Addr::new(10, 96, 0, 10));
    let spec = dns.spec.clone().unwrap();
    assert_eq!(spec.selector, None, "node agents serve DNS: no endpoints");
    let ports: Vec<(String, String, i32)> = spec
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.protocol.unwrap(), p.port))
        .collect();
    assert_eq!(
        ports,
        [("dns".to_owned(), "UDP".to_owned(), 53), ("dns-tcp".to_owned(), "TCP".to_owned(), 53)]
    );
    assert_eq!(dns.metadata.labels.unwrap()["k8s-app"], "kube-dns");

    server.restart().await;
    let again: Service =
        server.client().get(Some("kube-system"), "kube-dns").await.unwrap().unwrap();
    assert_eq!(again.metadata.uid, dns.metadata.uid, "not created again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_never_hands_out_an_allocated_ip() {
    // A /28 holds 14 usable addresses; kube-dns has one, 13 are left for services.
    let mut server = TestController::start_with("svc-restart", |config| {
        config.service_cidr = "10.96.0.0/28".parse().unwrap();
        config.cluster_dns_ip = Ipv4Addr::new(10, 96, 0, 10);
    })
    .await;
    let mut given = HashSet::new();
    for i in 0..6 {
        let created = create(&server.client(), &service(&format!("before-{i}"), None)).await;
        assert!(given.insert(cluster_ip(&created)));
    }
    server.restart().await;
    let client = server.client();
    for i in 0..7 {
        let created = create(&client, &service(&format!("after-{i}"), None)).await;
        let ip = cluster_ip(&created);
        assert!(given.insert(ip), "{ip} was handed out twice");
    }
    assert!(!given.contains(&Ipv4Addr::new(10, 96, 0, 10)));

    // The range is full: a clear error, nothing stored.
    let (code, status) = post(&client, &service("one-too-many", None)).await;
    assert!(code.is_server_error(), "{code}: {status}");
    assert!(status["message"].as_str().unwrap().contains("is allocated"), "{status}");
    assert!(absent(&client, "one-too-many").await);
}
