//! The API's guarantees on both store backends: the same test functions, run against a
//! controller on the embedded store and against one on etcd (a real etcd this test starts on
//! loopback): every watcher sees each change once and in order while several clients write,
//! resourceVersions only grow across restarts, and compacted history answers 410 Expired.

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{Status, WatchEvent},
};
use serde_json::json;
use strait_controlplane::{
    store::{RedbStore, RedbStoreOptions, Store},
    testing::{LocalEtcd, TestController, pod_on},
};

/// The etcd root the controllers of these tests keep their keys under.
const ROOT: &str = "/strait/api-suite";

enum Backend {
    Embedded,
    Etcd(LocalEtcd),
}

impl Backend {
    async fn embedded(_label: &str) -> Self {
        Self::Embedded
    }

    async fn etcd(label: &str) -> Self {
        match LocalEtcd::start(label).await {
            Ok(etcd) => Self::Etcd(etcd),
            Err(error) => panic!("starting etcd: {error}"),
        }
    }

    async fn controller(&self, label: &str) -> TestController {
        TestController::start_with(label, |config| {
            if let Self::Etcd(etcd) = self {
                config.store = etcd.location(ROOT);
            }
        })
        .await
    }

    /// Discards the history at and before `revision`, as each backend does it: the embedded
    /// file is compacted while its controller is stopped (one process owns it), etcd while
    /// the controller runs.
    async fn compact(&self, server: &mut TestController, revision: u64) {
        match self {
            Self::Embedded => {
                server.stop().await;
                let path = server.data_dir().join(strait_controlplane::server::STORE_FILE);
                let store = RedbStore::open_async(path, RedbStoreOptions::default())
                    .await
                    .expect("the store file opens");
                store.compact(revision).await.expect("compacting");
                let closed = store.closed();
                drop(store);
                closed.wait().await;
                server.restart().await;
            }
            Self::Etcd(etcd) => {
                let store = etcd.store(ROOT).await.expect("connecting to etcd");
                store.compact(revision).await.expect("compacting");
            }
        }
    }
}

macro_rules! api_suite {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = super::Backend::embedded(stringify!($test)).await;
                    super::$test(backend).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = super::Backend::etcd(stringify!($test)).await;
                    super::$test(backend).await;
                }
            )*
        }
    };
}

api_suite!(
    every_api_watcher_sees_each_change_once_in_order,
    resource_versions_only_grow_across_restarts,
    compacted_history_answers_410_expired,
);

fn revision_of(pod: &Pod) -> u64 {
    pod.metadata.resource_version.as_deref().and_then(|rv| rv.parse().ok()).expect("a numeric RV")
}

async fn every_api_watcher_sees_each_change_once_in_order(backend: Backend) {
    let server = backend.controller("api-suite-watch").await;
    let client = server.client();
    let (_, start) = client.list::<Pod>(Some("default"), "").await.unwrap();
    let mut watches = Vec::new();
    for _ in 0..4 {
        watches.push(
            client
                .watch::<Pod>(Some("default"), &format!("resourceVersion={start}"))
                .await
                .unwrap(),
        );
    }

    // Four clients each create 15 pods and relabel every one: 120 changes, concurrent.
    let mut writers = Vec::new();
    for writer in 0..4 {
        let client = server.client();
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..15 {
                let name = format!("w{writer}-{i}");
                let created: Pod =
                    client.create(Some("default"), &pod_on(&name, "node-1")).await.unwrap();
                acknowledged.push((revision_of(&created), (name.clone(), "ADDED")));
                let patch = json!({"metadata": {"labels": {"seen": "yes"}}});
                let patched: Pod =
                    client.merge_patch(Some("default"), &name, &patch, false).await.unwrap();
                acknowledged.push((revision_of(&patched), (name, "MODIFIED")));
            }
            acknowledged
        }));
    }
    let mut expected = BTreeMap::new();
    for writer in writers {
        for (revision, change) in writer.await.unwrap() {
            assert!(
                expected.insert(revision, change).is_none(),
                "two writes shared revision {revision}"
            );
        }
    }
    let expected: Vec<(u64, (String, &str))> = expected.into_iter().collect();
    assert_eq!(expected.len(), 120);

    for watch in &mut watches {
        let mut seen = Vec::new();
        while seen.len() < expected.len() {
            let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .expect("every change arrives within 10s")
                .expect("the watch is open")
                .expect("the event decodes");
            let (kind, pod) = match event {
                WatchEvent::Added(pod) => ("ADDED", pod),
                WatchEvent::Modified(pod) => ("MODIFIED", pod),
                other => panic!("unexpected event {other:?}"),
            };
            seen.push((revision_of(&pod), (pod.metadata.name.clone().unwrap_or_default(), kind)));
        }
        assert_eq!(seen, expected, "each change once, in order, at the revision acknowledged");
        let quiet = tokio::time::timeout(Duration::from_millis(300), watch.next()).await;
        assert!(quiet.is_err(), "nothing else arrives: {quiet:?}");
    }
}

async fn resource_versions_only_grow_across_restarts(backend: Backend) {
    let mut server = backend.controller("api-suite-grow").await;
    let mut last = 0;
    for round in 0..3 {
        let client = server.client();
        for i in 0..5 {
            let pod: Pod = client
                .create(Some("default"), &pod_on(&format!("r{round}-{i}"), "node-1"))
                .await
                .unwrap();
            let revision = revision_of(&pod);
            assert!(revision > last, "{revision} after {last}");
            last = revision;
        }
        let (pods, list_revision) = client.list::<Pod>(Some("default"), "").await.unwrap();
        assert_eq!(pods.len(), 5 * (round + 1), "every pod written so far is listed");
        assert!(list_revision.parse::<u64>().unwrap() >= last);
        server.restart().await;
    }
}

async fn compacted_history_answers_410_expired(backend: Backend) {
    let mut server = backend.controller("api-suite-410").await;
    let client = server.client();
    let first: Pod = client.create(Some("default"), &pod_on("a", "node-1")).await.unwrap();
    let patch = json!({"metadata": {"labels": {"v": "2"}}});
    let second: Pod = client.merge_patch(Some("default"), "a", &patch, false).await.unwrap();
    backend.compact(&mut server, revision_of(&second)).await;

    let client = server.client();
    let old = revision_of(&first);
    let mut expired =
        client.watch::<Pod>(Some("default"), &format!("resourceVersion={old}")).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), expired.next())
        .await
        .expect("an answer within 5s")
        .expect("an event")
        .expect("it decodes");
    let WatchEvent::ErrorStatus(Status { code, reason, .. }) = event else {
        panic!("expected 410 Expired, got {event:?}");
    };
    assert_eq!((code, reason.as_deref()), (Some(410), Some("Expired")));

    // From the compacted revision itself nothing is missing: the next change arrives.
    let from = revision_of(&second);
    let mut watch =
        client.watch::<Pod>(Some("default"), &format!("resourceVersion={from}")).await.unwrap();
    let patch = json!({"metadata": {"labels": {"v": "3"}}});
    let third: Pod = client.merge_patch(Some("default"), "a", &patch, false).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an answer within 5s")
        .expect("an event")
        .expect("it decodes");
    let WatchEvent::Modified(pod) = event else { panic!("expected the change, got {event:?}") };
    assert_eq!(revision_of(&pod), revision_of(&third));
    // Values are kept: the pod reads back as last written.
    let read: Option<Pod> = client.get(Some("default"), "a").await.unwrap();
    assert_eq!(read.map(|p| revision_of(&p)), Some(revision_of(&third)));
}
