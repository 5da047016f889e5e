//! Each node agent of a real lab works with its own identity (`system:node:<name>`, issued by
//! the cluster CA when the node came up) and nothing more: it registers and heartbeats its
//! Node, reports its pods' status and removes them, and is refused another node's objects.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use strait::lab;
use strait_controlplane::{
    auth::{ClientCredentials, UserInfo},
    client::ApiClient,
};
use support::lab::TestLab;

#[tokio::test(flavor = "multi_thread")]
async fn each_agent_works_with_its_own_identity_and_may_not_touch_another_node() {
    if !support::privileged("each_agent_works_with_its_own_identity_and_may_not_touch_another_node")
    {
        return;
    }
    let lab = TestLab::up("ident", 2).await;
    let credentials = |node: &str| {
        ClientCredentials::read_dir(&lab::node_credentials_dir(lab.name(), node))
            .expect("the node's credentials")
    };
    // Each agent has a certificate of its own node and no other credential.
    for node in ["node-1", "node-2"] {
        assert_eq!(credentials(node).user(), Some(UserInfo::node(node)));
    }

    // node-2's agent runs the pod and reports its status with its own identity.
    lab.create_netexec_pod("web", Some("node-2"));
    let running = lab.wait_running("web").await;

    // node-1's identity, through the same loopback listener kubectl uses.
    let node_1 = ApiClient::new(&lab.state.api_server, &credentials("node-1")).unwrap();
    let failed = json!({"status": {"phase": "Failed"}});
    let error = node_1.merge_patch::<Pod>(Some("default"), "web", &failed, true).await.unwrap_err();
    assert_eq!(error.code(), Some(403), "{error}");
    let other = lab.api.get::<Node>(None, "node-2").await.unwrap().unwrap();
    let error = node_1.replace_status(None, "node-2", &other).await.unwrap_err();
    assert_eq!(error.code(), Some(403), "{error}");
    let error = node_1.delete::<Pod>(Some("default"), "web", Some(0)).await.unwrap_err();
    assert_eq!(error.code(), Some(403), "{error}");
    assert!(node_1.get::<Node>(None, "node-1").await.unwrap().is_some());
    let still = lab.api.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(still.metadata.uid, running.metadata.uid);
    assert_eq!(still.status.and_then(|s| s.phase).as_deref(), Some("Running"));

    // A graceful delete: node-2's agent stops the pod and removes the object (grace 0).
    lab.kubectl_ok(&["delete", "pod", "web", "--wait=false"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while lab.api.get::<Pod>(Some("default"), "web").await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent of node-2 did not remove the pod object within 60s\n{}",
            lab.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Heartbeats kept coming with the nodes' own identities, and nothing an agent did was
    // refused.
    let (nodes, _) = lab.api.list::<Node>(None, "").await.unwrap();
    assert!(nodes.iter().all(lab::is_node_ready), "every node is Ready");
    let logs = lab::log_tails(lab.name(), 400);
    // As the API client and tonic print a refusal.
    let refusals = [
        "403 Forbidden",
        "401 Unauthorized",
        "does not have permission",
        "does not have valid authentication credentials",
    ];
    for refusal in refusals {
        assert!(!logs.contains(refusal), "an agent was refused ({refusal}):\n{logs}");
    }
}
