//! kubectl's write commands (1.27, 1.31 and 1.33, unmodified) against a controller on
//! loopback, each checked by reading back what the server stored.

mod support;

use k8s_openapi::api::core::v1::{Node, Pod};
use strait_controlplane::testing::{TestController, node, pod};
use support::kubectl::Kubectl;

/// One test per kubectl version for each scenario.
macro_rules! for_each_kubectl {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kubectl_1_27() {
                super::$scenario("1.27").await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kubectl_1_31() {
                super::$scenario("1.31").await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kubectl_1_33() {
                super::$scenario("1.33").await;
            }
        }
    };
}

fn image_of(pod: &Pod, container: &str) -> Option<String> {
    pod.spec.as_ref()?.containers.iter().find(|c| c.name == container)?.image.clone()
}

async fn patch_of_each_type_and_label_annotate_cordon(version: &str) {
    let server = TestController::start(&format!("kubectl-patch-{version}")).await;
    let client = server.client();
    let kubectl = Kubectl::new(version, &server);
    client.create::<Pod>(Some("default"), &pod("web")).await.unwrap();

    kubectl
        .ok(&[
            "patch",
            "pod",
            "web",
            "--type",
            "strategic",
            "-p",
            r#"{"spec":{"containers":[{"name":"app","image":"registry.example/app:2.0"}]}}"#,
        ])
        .await;
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(image_of(&stored, "app").as_deref(), Some("registry.example/app:2.0"));

    kubectl
        .ok(&[
            "patch",
            "pod",
            "web",
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"labels":{"a":"1"}}}"#,
        ])
        .await;
    kubectl
        .ok(&[
            "patch",
            "pod",
            "web",
            "--type",
            "json",
            "-p",
            r#"[{"op":"test","path":"/metadata/labels/a","value":"1"},{"op":"replace","path":"/spec/containers/0/image","value":"registry.example/app:3.0"}]"#,
        ])
        .await;
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(image_of(&stored, "app").as_deref(), Some("registry.example/app:3.0"));
    assert_eq!(
        stored.metadata.labels.as_ref().and_then(|l| l.get("a")).map(String::as_str),
        Some("1")
    );

    // A failing JSON patch test: kubectl reports it and the pod is unchanged.
    let stderr = kubectl
        .fails(&[
            "patch",
            "pod",
            "web",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/containers/0/image","value":"x:4"},{"op":"test","path":"/metadata/labels/a","value":"2"}]"#,
        ])
        .await;
    assert!(stderr.contains("test failed"), "{stderr}");
    let unchanged = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(unchanged.spec, stored.spec);

    kubectl.ok(&["label", "pod", "web", "tier=front", "a-"]).await;
    kubectl.ok(&["annotate", "pod", "web", "note=hello"]).await;
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    let labels = stored.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("tier").map(String::as_str), Some("front"));
    assert!(!labels.contains_key("a"), "a- removed the label: {labels:?}");
    assert_eq!(
        stored.metadata.annotations.as_ref().and_then(|a| a.get("note")).map(String::as_str),
        Some("hello")
    );
    // Without --overwrite an existing label is refused by kubectl itself.
    kubectl.fails(&["label", "pod", "web", "tier=back"]).await;
    kubectl.ok(&["label", "pod", "web", "tier=back", "--overwrite"]).await;
    let stored = client.get::<Pod>(Some("default"), "web").await.unwrap().unwrap();
    assert_eq!(stored.metadata.labels.unwrap().get("tier").map(String::as_str), Some("back"));

    client.create::<Node>(None, &node("n1", "172.20.0.2", true)).await.unwrap();
    kubectl.ok(&["cordon", "n1"]).await;
    let cordoned = client.get::<Node>(None, "n1").await.unwrap().unwrap();
    assert_eq!(cordoned.spec.as_ref().and_then(|s| s.unschedulable), Some(true));
    kubectl.ok(&["uncordon", "n1"]).await;
    let uncordoned = client.get::<Node>(None, "n1").await.unwrap().unwrap();
    assert_ne!(uncordoned.spec.as_ref().and_then(|s| s.unschedulable), Some(true));
}
for_each_kubectl!(patch_of_each_type_and_label_annotate_cordon);
