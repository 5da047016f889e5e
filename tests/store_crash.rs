//! Acknowledged writes survive SIGKILL, on both store backends: a `strait controller`
//! process takes writes from several clients and is killed mid-stream (on etcd, etcd is
//! killed first, with requests in flight); after a restart on the same data every write a
//! client was told succeeded is there, and resourceVersions go on growing from the highest
//! acknowledged one. Needs no root.

mod support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use strait_controlplane::testing::{LocalEtcd, TempDataDir, pod_on};
use support::controller::ControllerProcess;

enum Backend {
    Embedded,
    Etcd(LocalEtcd),
}

impl Backend {
    fn store(&self) -> String {
        match self {
            Self::Embedded => "embedded".to_owned(),
            Self::Etcd(etcd) => etcd.url("/strait/crash"),
        }
    }

    /// Kills what holds the data with SIGKILL before the controller goes (etcd), and
    /// starts it again on the same data once everything is down.
    fn kill_store(&mut self) {
        if let Self::Etcd(etcd) = self {
            etcd.kill();
        }
    }

    async fn restart_store(&mut self) {
        if let Self::Etcd(etcd) = self {
            etcd.start_again().await.expect("etcd starts again on its data");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_keeps_acknowledged_writes_through_kill_9() {
    acknowledged_writes_survive_kill_9(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_keeps_acknowledged_writes_through_kill_9() {
    let etcd = LocalEtcd::start("crash").await.expect("etcd starts");
    acknowledged_writes_survive_kill_9(Backend::Etcd(etcd)).await;
}

fn revision_of(pod: &Pod) -> u64 {
    pod.metadata.resource_version.as_deref().and_then(|rv| rv.parse().ok()).expect("a numeric RV")
}

async fn acknowledged_writes_survive_kill_9(mut backend: Backend) {
    let dir = TempDataDir::new("store-crash");
    let mut controller = ControllerProcess::start(dir.path(), &backend.store(), &[]).await;

    // name → the highest resourceVersion a client was told it has.
    let acknowledged: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut writers = Vec::new();
    for writer in 0..4 {
        let client = controller.client();
        let acknowledged = Arc::clone(&acknowledged);
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("w{writer}-{i}");
                let Ok(created) =
                    client.create::<Pod>(Some("default"), &pod_on(&name, "node-1")).await
                else {
                    return;
                };
                acknowledged.lock().unwrap().insert(name.clone(), revision_of(&created));
                let patch = json!({"metadata": {"labels": {"round": i.to_string()}}});
                let Ok(patched) =
                    client.merge_patch::<Pod>(Some("default"), &name, &patch, false).await
                else {
                    return;
                };
                acknowledged.lock().unwrap().insert(name, revision_of(&patched));
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acknowledged.lock().unwrap().len() < 150 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "writes too slow:\n{}",
            controller.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Writes are in flight from every writer at this moment.
    backend.kill_store();
    controller.kill9();
    for writer in writers {
        tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .expect("every writer sees the controller gone")
            .expect("a writer task");
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let highest = acknowledged.values().copied().max().unwrap_or(0);

    backend.restart_store().await;
    let controller = ControllerProcess::start(dir.path(), &backend.store(), &[]).await;
    let client = controller.client();
    let (pods, _) = client.list::<Pod>(Some("default"), "").await.expect("listing after the crash");
    let stored: BTreeMap<String, u64> = pods
        .iter()
        .map(|pod| (pod.metadata.name.clone().unwrap_or_default(), revision_of(pod)))
        .collect();
    for (name, revision) in &acknowledged {
        let Some(now) = stored.get(name) else {
            panic!("{name} was acknowledged at revision {revision} and is gone after kill -9");
        };
        assert!(now >= revision, "{name} went back from {revision} to {now}");
    }
    assert!(stored.len() <= acknowledged.len() + 4, "at most one unacknowledged create per writer");

    let after: Pod =
        client.create(Some("default"), &pod_on("after-crash", "node-1")).await.expect("a write");
    assert!(
        revision_of(&after) > highest,
        "resourceVersions go on growing: {} after {highest}",
        revision_of(&after)
    );
}
