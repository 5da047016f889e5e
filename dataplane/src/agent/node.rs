//! The node's own Node object: registration, addresses, capacity, and the Ready heartbeat.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use k8s_openapi::{
    api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo},
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, Time},
    },
    jiff::Timestamp,
};
use strait_controlplane::client::{ApiClient, ClientError};

/// What the agent says about its node.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub name: String,
    pub address: Ipv4Addr,
}

/// The agent's version, shown as the node's runtime and kubelet version.
pub const AGENT_VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"), "-strait");

fn system_info() -> NodeSystemInfo {
    let uname = nix::sys::utsname::uname().ok();
    let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uname.as_ref().map(|u| f(u).to_string_lossy().into_owned()).unwrap_or_default()
    };
    let os_image = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|release| {
            release.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_owned())
            })
        })
        .unwrap_or_else(|| "Linux".to_owned());
    let machine_id =
        std::fs::read_to_string("/etc/machine-id").unwrap_or_default().trim().to_owned();
    NodeSystemInfo {
        architecture: match std::env::consts::ARCH {
            "x86_64" => "amd64".to_owned(),
            "aarch64" => "arm64".to_owned(),
            other => other.to_owned(),
        },
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        container_runtime_version: format!("strait://{}", env!("CARGO_PKG_VERSION")),
        kernel_version: field(nix::sys::utsname::UtsName::release),
        kube_proxy_version: String::new(),
        kubelet_version: AGENT_VERSION.to_owned(),
        machine_id,
        operating_system: "linux".to_owned(),
        os_image,
        system_uuid: String::new(),
        ..Default::default()
    }
}

fn capacity() -> BTreeMap<String, Quantity> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    [
        ("cpu".to_owned(), Quantity(cpus.to_string())),
        ("memory".to_owned(), Quantity(format!("{memory_kib}Ki"))),
        ("pods".to_owned(), Quantity("110".to_owned())),
    ]
    .into()
}

/// Merges the agent's own view (addresses, capacity, system info, Ready) into a status,
/// keeping conditions that others own and transition times that did not change.
fn merge_status(
    identity: &NodeIdentity,
    current: Option<NodeStatus>,
    ready: bool,
    message: &str,
) -> NodeStatus {
    let now = Time(Timestamp::now());
    let mut status = current.unwrap_or_default();
    status.addresses = Some(vec![
        NodeAddress { type_: "InternalIP".to_owned(), address: identity.address.to_string() },
        NodeAddress { type_: "Hostname".to_owned(), address: identity.name.clone() },
    ]);
    status.capacity = Some(capacity());
    status.allocatable = Some(capacity());
    status.node_info = Some(system_info());
    let wanted = if ready { "True" } else { "False" };
    let mut conditions = status.conditions.take().unwrap_or_default();
    let previous = conditions.iter().find(|c| c.type_ == "Ready").cloned();
    conditions.retain(|c| c.type_ != "Ready");
    let transition = previous
        .filter(|c| c.status == wanted)
        .and_then(|c| c.last_transition_time)
        .unwrap_or_else(|| now.clone());
    conditions.push(NodeCondition {
        type_: "Ready".to_owned(),
        status: wanted.to_owned(),
        reason: Some(if ready { "StraitAgentReady" } else { "StraitAgentStarting" }.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(now),
        last_transition_time: Some(transition),
    });
    status.conditions = Some(conditions);
    status
}

/// Creates the Node if it does not exist. An existing Node (an agent restart, or a node
/// re-joining) is kept with its podCIDR.
pub async fn register(api: &ApiClient, identity: &NodeIdentity) -> Result<Node, ClientError> {
    if let Some(node) = api.get::<Node>(None, &identity.name).await? {
        return Ok(node);
    }
    let node = Node {
        metadata: ObjectMeta {
            name: Some(identity.name.clone()),
            labels: Some(
                [
                    ("kubernetes.io/hostname".to_owned(), identity.name.clone()),
                    ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                    ("kubernetes.io/arch".to_owned(), system_info().architecture),
                ]
                .into(),
            ),
            ..Default::default()
        },
        status: Some(merge_status(identity, None, false, "the node agent is starting")),
        ..Default::default()
    };
    match api.create(None, &node).await {
        Ok(created) => Ok(created),
        // Registered concurrently (a restart racing the previous instance): take that one.
        Err(error) if error.code() == Some(409) => {
            api.get::<Node>(None, &identity.name).await?.ok_or(error)
        }
        Err(error) => Err(error),
    }
}

/// Writes the node's status with the Ready condition, read-modify-write with optimistic
/// concurrency so conditions written by the controller are kept.
pub async fn report_status(
    api: &ApiClient,
    identity: &NodeIdentity,
    ready: bool,
    message: &str,
) -> Result<(), ClientError> {
    for _attempt in 0..5 {
        let Some(mut node) = api.get::<Node>(None, &identity.name).await? else {
            register(api, identity).await?;
            continue;
        };
        node.status = Some(merge_status(identity, node.status.take(), ready, message));
        match api.replace_status(None, &identity.name, &node).await {
            Ok(_) => return Ok(()),
            Err(error) if error.code() == Some(409) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => return Err(error),
        }
    }
    Err(ClientError::Status {
        method: http::Method::PUT,
        path: ApiClient::object_path::<Node>(None, &identity.name),
        code: 409,
        reason: "Conflict".to_owned(),
        message: "the node status kept changing under five attempts".to_owned(),
    })
}
