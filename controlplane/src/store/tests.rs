//! Behaviour every [`Store`] backend must have: the same test functions run against the
//! embedded redb store and against etcd (a real etcd server this suite starts on loopback).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;

use super::{
    Compare, EventKind, Op, RedbStore, RedbStoreOptions, SharedStore, StoreError, TxnOutcome,
    WatchBatch, WatchStream,
};
use crate::testing::{LocalEtcd, TempDataDir};

fn put(key: &str, value: &str) -> Op {
    Op::Put { key: key.to_owned(), value: Bytes::from(value.to_owned()) }
}

fn delete(key: &str) -> Op {
    Op::Delete { key: key.to_owned() }
}

async fn commit(store: &SharedStore, ops: Vec<Op>) -> u64 {
    match store.txn(vec![], ops).await.expect("the transaction runs") {
        TxnOutcome::Committed { revision } => revision,
        other => panic!("a transaction without compares failed: {other:?}"),
    }
}

fn open(dir: &TempDataDir, history_revisions: u64) -> SharedStore {
    open_with(dir, RedbStoreOptions { history_revisions, ..RedbStoreOptions::default() })
}

fn open_with(dir: &TempDataDir, options: RedbStoreOptions) -> SharedStore {
    let store = RedbStore::open(&dir.path().join("store.redb"), options).expect("the store opens");
    Arc::new(store)
}

async fn next_batch(stream: &mut WatchStream) -> WatchBatch {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a change arrives within 5s")
        .expect("the stream is still open")
        .expect("the change is delivered without error")
}

/// A store backend the shared tests run against, and how to reopen it.
enum Backend {
    Redb(TempDataDir),
    /// One etcd per test (compaction is etcd-wide, so tests must not share one).
    Etcd(LocalEtcd),
}

impl Backend {
    async fn redb(label: &str) -> Self {
        Self::Redb(TempDataDir::new(label))
    }

    async fn etcd(label: &str) -> Self {
        match LocalEtcd::start(label).await {
            Ok(etcd) => Self::Etcd(etcd),
            Err(error) => panic!("starting etcd for the store suite: {error}"),
        }
    }

    /// Opens the store (again: a new handle on the same file, or a new etcd client).
    async fn open(&self) -> SharedStore {
        match self {
            Self::Redb(dir) => open(dir, 10_000),
            Self::Etcd(etcd) => match etcd.store("/strait/suite").await {
                Ok(store) => Arc::new(store),
                Err(error) => panic!("connecting to etcd: {error}"),
            },
        }
    }

    /// Kills the process holding the data, as hard as it can die, and starts it again: for
    /// etcd, the etcd server (SIGKILL); the redb file has no process of its own beyond the
    /// handle the test already dropped.
    async fn crash_and_restart(&mut self) {
        if let Self::Etcd(etcd) = self
            && let Err(error) = etcd.start_again().await
        {
            panic!("restarting etcd after SIGKILL: {error}");
        }
    }
}

/// Runs every shared test against one backend.
macro_rules! store_suite {
    ($backend:ident) => {
        mod $backend {
            store_suite!(@tests $backend;
                reopen_keeps_values_and_revision,
                revisions_only_grow_and_no_op_transactions_keep_them,
                failed_compare_changes_nothing,
                concurrent_creates_of_one_key_have_one_winner,
                writing_one_key_twice_in_a_transaction_is_refused,
                snapshot_reads_several_prefixes_at_one_revision,
                every_watcher_sees_every_change_once_in_order,
                watch_resumes_from_an_old_revision_after_reopen,
                compacted_resume_is_reported,
            );
        }
    };
    (@tests $backend:ident; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let backend = super::Backend::$backend(stringify!($test)).await;
                super::$test(backend).await;
            }
        )*
    };
}

store_suite!(redb);
store_suite!(etcd);

async fn reopen_keeps_values_and_revision(mut backend: Backend) {
    let store = backend.open().await;
    commit(&store, vec![put("/a", "1")]).await;
    let last = commit(&store, vec![put("/b", "2"), delete("/a")]).await;
    drop(store);
    backend.crash_and_restart().await;

    let store = backend.open().await;
    assert_eq!(store.revision().await.unwrap(), last);
    assert!(store.get("/a").await.unwrap().is_none());
    let b = store.get("/b").await.unwrap().expect("/b survived the reopen");
    assert_eq!(b.value, Bytes::from("2"));
    assert_eq!(b.mod_revision, last);
    let next = commit(&store, vec![put("/c", "3")]).await;
    assert_eq!(next, last + 1, "revisions continue from where the file left off");
}

async fn revisions_only_grow_and_no_op_transactions_keep_them(backend: Backend) {
    let store = backend.open().await;
    let start = store.revision().await.unwrap();
    let mut previous = start;
    for i in 0..20 {
        let revision = commit(&store, vec![put(&format!("/k{}", i % 3), &i.to_string())]).await;
        assert_eq!(revision, previous + 1);
        previous = revision;
    }
    let unchanged = commit(&store, vec![delete("/never-written")]).await;
    assert_eq!(unchanged, previous, "deleting an absent key changes nothing");
    let kv = store.get("/k1").await.unwrap().unwrap();
    assert!(kv.create_revision < kv.mod_revision, "an overwrite keeps the create revision");
}

async fn failed_compare_changes_nothing(backend: Backend) {
    let store = backend.open().await;
    let written = commit(&store, vec![put("/x", "old")]).await;

    let outcome = store
        .txn(
            vec![
                Compare::ModRevision { key: "/x".to_owned(), revision: written },
                Compare::Absent { key: "/x".to_owned() },
            ],
            vec![put("/x", "new"), put("/y", "new")],
        )
        .await
        .unwrap();
    assert_eq!(outcome, TxnOutcome::CompareFailed { index: 1 });
    assert_eq!(store.revision().await.unwrap(), written);
    assert_eq!(store.get("/x").await.unwrap().unwrap().value, Bytes::from("old"));
    assert!(store.get("/y").await.unwrap().is_none());

    let stale = store
        .txn(
            vec![Compare::ModRevision { key: "/x".to_owned(), revision: written - 1 }],
            vec![put("/x", "new")],
        )
        .await
        .unwrap();
    assert_eq!(stale, TxnOutcome::CompareFailed { index: 0 });

    let ok = store
        .txn(
            vec![
                Compare::ModRevision { key: "/x".to_owned(), revision: written },
                Compare::Absent { key: "/y".to_owned() },
            ],
            vec![put("/x", "new"), put("/y", "new")],
        )
        .await
        .unwrap();
    assert_eq!(ok, TxnOutcome::Committed { revision: written + 1 });
    let x = store.get("/x").await.unwrap().unwrap();
    let y = store.get("/y").await.unwrap().unwrap();
    assert_eq!((x.mod_revision, y.mod_revision), (written + 1, written + 1));
}

/// Writers racing for one key, as API servers creating one object do (the embedded store
/// commits concurrent transactions together: each still sees the ones before it).
async fn concurrent_creates_of_one_key_have_one_winner(backend: Backend) {
    let store = backend.open().await;
    let start = store.revision().await.unwrap();
    let racers: Vec<_> = (0..16)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let ops =
                    vec![put("/race/k", &format!("racer {i}")), put(&format!("/race/{i}"), "x")];
                store.txn(vec![Compare::Absent { key: "/race/k".to_owned() }], ops).await.unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for racer in racers {
        outcomes.push(racer.await.unwrap());
    }
    let won: Vec<usize> =
        (0..16).filter(|i| matches!(outcomes[*i], TxnOutcome::Committed { .. })).collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes[won[0]], TxnOutcome::Committed { revision: start + 1 });
    assert!(
        outcomes.iter().filter(|o| **o == TxnOutcome::CompareFailed { index: 0 }).count() == 15
    );
    assert_eq!(store.revision().await.unwrap(), start + 1);
    let winner = format!("racer {}", won[0]);
    assert_eq!(store.get("/race/k").await.unwrap().unwrap().value, Bytes::from(winner));
    for racer in (0..16).filter(|i| *i != won[0]) {
        let written = store.get(&format!("/race/{racer}")).await.unwrap();
        assert!(written.is_none(), "a failed compare writes nothing of its transaction");
    }
}

async fn writing_one_key_twice_in_a_transaction_is_refused(backend: Backend) {
    let store = backend.open().await;
    let before = store.revision().await.unwrap();
    let error = store.txn(vec![], vec![put("/a", "1"), delete("/a")]).await.unwrap_err();
    assert!(matches!(error, StoreError::InvalidTxn { .. }), "{error}");
    assert_eq!(store.revision().await.unwrap(), before);
}

async fn snapshot_reads_several_prefixes_at_one_revision(backend: Backend) {
    let store = backend.open().await;
    commit(&store, vec![put("/pods/a", "1"), put("/nodes/n", "2"), put("/podsx", "3")]).await;
    let last = commit(&store, vec![put("/pods/b", "4")]).await;
    let snapshot = store.snapshot(&["/pods/".to_owned(), "/nodes/".to_owned()]).await.unwrap();
    assert_eq!(snapshot.revision, last);
    let pods: Vec<&str> = snapshot.lists[0].iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(pods, ["/pods/a", "/pods/b"]);
    assert_eq!(snapshot.lists[1].len(), 1);
}

async fn every_watcher_sees_every_change_once_in_order(backend: Backend) {
    let store = backend.open().await;
    let start = store.revision().await.unwrap();
    // Three watchers from the same revision, each with its own stream.
    let mut watches = Vec::new();
    for _ in 0..3 {
        watches.push(store.watch("/w/", start).await.unwrap());
    }

    // Four concurrent writers; every watcher must see all of their changes, each once, in
    // revision order, and nothing of the other prefix written in the same transactions.
    let mut writers = Vec::new();
    for writer in 0..4 {
        let store = Arc::clone(&store);
        writers.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..50 {
                let key = format!("/w/{writer}-{i}");
                let revision =
                    commit(&store, vec![put(&key, "v"), put(&format!("/other/{writer}-{i}"), "v")])
                        .await;
                revisions.push((revision, key));
            }
            revisions
        }));
    }
    let mut written = std::collections::BTreeMap::new();
    for writer in writers {
        written.extend(writer.await.unwrap());
    }
    assert_eq!(written.len(), 200, "every transaction got a revision of its own");
    for watch in &mut watches {
        let mut seen = Vec::new();
        let mut last = start;
        while seen.len() < 200 {
            let batch = next_batch(watch).await;
            assert!(batch.revision > last, "revisions arrive in order");
            last = batch.revision;
            assert_eq!(batch.events.len(), 1, "changes outside the prefix are filtered out");
            for event in batch.events {
                assert_eq!(event.revision, batch.revision);
                seen.push((event.revision, event.key));
            }
        }
        let expected: Vec<(u64, String)> = written.clone().into_iter().collect();
        assert_eq!(seen, expected, "each change once, at the revision its writer was told");
        let quiet = tokio::time::timeout(Duration::from_millis(200), watch.next()).await;
        assert!(quiet.is_err(), "nothing beyond the 200 changes is delivered");
    }
}

async fn watch_resumes_from_an_old_revision_after_reopen(mut backend: Backend) {
    let store = backend.open().await;
    let first = commit(&store, vec![put("/r/a", "1")]).await;
    commit(&store, vec![put("/r/a", "2")]).await;
    commit(&store, vec![delete("/r/a")]).await;
    drop(store);
    backend.crash_and_restart().await;

    let store = backend.open().await;
    let mut watch = store.watch("/r/", first).await.unwrap();
    let update = next_batch(&mut watch).await;
    assert_eq!(update.revision, first + 1);
    assert_eq!(update.events[0].kind, EventKind::Put);
    assert_eq!(update.events[0].prev_value, Some(Bytes::from("1")));
    let removal = next_batch(&mut watch).await;
    assert_eq!(removal.events[0].kind, EventKind::Delete);
    assert_eq!(removal.events[0].prev_value, Some(Bytes::from("2")), "deletes carry the old value");

    // And live changes follow the replay without a gap.
    let live = commit(&store, vec![put("/r/b", "3")]).await;
    assert_eq!(next_batch(&mut watch).await.revision, live);
}

async fn compacted_resume_is_reported(backend: Backend) {
    let store = backend.open().await;
    let early = commit(&store, vec![put("/c/a", "1")]).await;
    let later = commit(&store, vec![put("/c/a", "2")]).await;
    store.compact(later).await.unwrap();
    assert_eq!(store.compacted_revision().await.unwrap(), later);

    match store.watch("/c/", early).await {
        Err(StoreError::Compacted { requested, compacted }) => {
            assert_eq!((requested, compacted), (early, later));
        }
        Err(other) => panic!("expected Compacted, got {other}"),
        Ok(_) => panic!("a watch from a compacted revision started"),
    }
    // Watching from the compacted revision itself needs nothing that was discarded.
    let mut watch = store.watch("/c/", later).await.unwrap();
    let next = commit(&store, vec![put("/c/a", "3")]).await;
    assert_eq!(next_batch(&mut watch).await.revision, next);
    // Values survive compaction.
    assert_eq!(store.get("/c/a").await.unwrap().unwrap().value, Bytes::from("3"));

    let future = store.compact(next + 10).await.unwrap_err();
    assert!(matches!(future, StoreError::FutureRevision { .. }), "{future}");
}

#[tokio::test]
async fn history_is_bounded_and_survives_reopen() {
    let dir = TempDataDir::new("store-history");
    let store = open(&dir, 5);
    let start = store.revision().await.unwrap();
    let mut last = start;
    for i in 0..20 {
        last = commit(&store, vec![put("/h/k", &i.to_string())]).await;
    }
    assert_eq!(store.compacted_revision().await.unwrap(), last - 5);
    assert!(matches!(store.watch("/h/", start).await, Err(StoreError::Compacted { .. })));
    drop(store);

    let store = open(&dir, 5);
    assert_eq!(store.compacted_revision().await.unwrap(), last - 5);
    let mut watch = store.watch("/h/", last - 5).await.unwrap();
    let mut revisions = Vec::new();
    for _ in 0..5 {
        revisions.push(next_batch(&mut watch).await.revision);
    }
    assert_eq!(revisions, ((last - 4)..=last).collect::<Vec<_>>());
}

#[tokio::test]
async fn watcher_that_falls_behind_catches_up_from_the_log() {
    let dir = TempDataDir::new("store-lag");
    let store = open_with(&dir, RedbStoreOptions { history_revisions: 10_000, watch_buffer: 8 });
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("/lag/", start).await.unwrap();
    // Read one change so that the watcher has switched to live delivery.
    commit(&store, vec![put("/lag/first", "v")]).await;
    next_batch(&mut watch).await;
    // More commits than the live buffer holds, none read meanwhile.
    let total = 40;
    for i in 0..total {
        commit(&store, vec![put(&format!("/lag/{i}"), "v")]).await;
    }
    let mut last = start + 1;
    for _ in 0..total {
        let batch = next_batch(&mut watch).await;
        assert_eq!(batch.revision, last + 1, "no revision is skipped or repeated");
        last = batch.revision;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_roots_keep_clusters_apart_on_one_etcd() {
    let etcd = LocalEtcd::start("store-roots").await.expect("etcd starts");
    let one: SharedStore = Arc::new(etcd.store("/strait/one").await.unwrap());
    // A root that begins with the other's name: a prefix match must not reach into it.
    let other: SharedStore = Arc::new(etcd.store("/strait/one-more").await.unwrap());
    let mut watch = one.watch("/registry/", one.revision().await.unwrap()).await.unwrap();
    let theirs = commit(&other, vec![put("/registry/pods/a", "theirs")]).await;
    let ours = commit(&one, vec![put("/registry/pods/a", "ours")]).await;
    assert!(ours > theirs, "one etcd, one revision counter for both roots");

    assert_eq!(one.get("/registry/pods/a").await.unwrap().unwrap().value, Bytes::from("ours"));
    let everything = one.list("").await.unwrap();
    assert_eq!(everything.items.len(), 1, "{:?}", everything.items);
    assert_eq!(everything.items[0].key, "/registry/pods/a", "keys come back without the root");
    let batch = next_batch(&mut watch).await;
    assert_eq!(batch.revision, ours, "the other root's change is not delivered");

    let reserved = one.txn(vec![], vec![put("/meta/compaction", "x")]).await.unwrap_err();
    assert!(matches!(reserved, StoreError::InvalidTxn { .. }), "{reserved}");
}
