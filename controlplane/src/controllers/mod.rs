//! Controllers: level-triggered loops that compare the stored state with what it should be
//! and converge, writing through the same typed API the HTTP handlers use. Each keeps a cache
//! of the kinds it reads, filled by a list and kept current by a store watch (relisted when
//! the watch's history is compacted).

pub mod deployment;
pub mod endpoint_slice;
pub mod event_expiry;
pub mod garbage_collector;
pub mod horizontal_pod_autoscaler;
pub mod namespace;
pub mod node_ipam;
pub mod node_lifecycle;
pub mod replica_set;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use crate::{
    api::{
        error::ApiError,
        kind::Strategy,
        typed::{TypedKind, decode_object},
    },
    store::{EventKind, Revision, StoreError, WatchStream},
};

/// One change a cache applied: the object before and after it (`None` when absent).
#[derive(Debug)]
pub struct CacheChange<K> {
    pub before: Option<K>,
    pub after: Option<K>,
}

/// What changed in a cache since the last [`ObjectCache::take_changes`].
#[derive(Debug)]
pub struct CacheChanges<K> {
    /// The cache was relisted: anything may have changed.
    pub relisted: bool,
    pub changes: Vec<CacheChange<K>>,
}

/// The objects of one kind, kept current from a store watch.
pub struct ObjectCache<S: Strategy> {
    kind: Arc<TypedKind<S>>,
    objects: BTreeMap<String, S::Object>,
    revision: Revision,
    changes: Option<WatchStream>,
    /// For controllers that reconcile only what changed: the changes since the last take.
    log: Option<CacheChanges<S::Object>>,
}

impl<S: Strategy> ObjectCache<S> {
    pub fn new(kind: Arc<TypedKind<S>>) -> Self {
        Self { kind, objects: BTreeMap::new(), revision: 0, changes: None, log: None }
    }

    /// A cache that records what each change did, for [`ObjectCache::take_changes`].
    pub fn logging_changes(kind: Arc<TypedKind<S>>) -> Self {
        let log = CacheChanges { relisted: false, changes: Vec::new() };
        Self { log: Some(log), ..Self::new(kind) }
    }

    /// The changes applied since the last call (none for a cache that does not log them).
    pub fn take_changes(&mut self) -> CacheChanges<S::Object> {
        let empty = || CacheChanges { relisted: false, changes: Vec::new() };
        match self.log.as_mut() {
            Some(log) => std::mem::replace(log, empty()),
            None => empty(),
        }
    }

    fn record(&mut self, before: Option<S::Object>, after: Option<S::Object>) {
        if let Some(log) = self.log.as_mut()
            && before != after
        {
            log.changes.push(CacheChange { before, after });
        }
    }

    /// The cached object of a store key.
    pub fn get(&self, key: &str) -> Option<&S::Object> {
        self.objects.get(key)
    }

    /// The cached objects whose store key starts with `prefix` (one namespace's objects with
    /// [`crate::api::kind::KindInfo::collection_prefix`]), in key order.
    pub fn under(&self, prefix: String) -> impl Iterator<Item = &S::Object> + '_ {
        self.objects
            .range(prefix.clone()..)
            .take_while(move |(key, _)| key.starts_with(&prefix))
            .map(|(_, object)| object)
    }

    /// Puts an object the controller itself just wrote, so that its next pass sees the write
    /// even before the watch delivers it (the watch then brings the same version).
    pub fn record_write(&mut self, object: S::Object) {
        let meta = k8s_openapi::Metadata::metadata(&object);
        let key =
            self.kind.key(meta.namespace.as_deref(), meta.name.as_deref().unwrap_or_default());
        self.objects.insert(key, object);
    }

    /// Drops an object the controller itself just removed.
    pub fn record_removal(&mut self, object: &S::Object) {
        let meta = k8s_openapi::Metadata::metadata(object);
        let key =
            self.kind.key(meta.namespace.as_deref(), meta.name.as_deref().unwrap_or_default());
        self.objects.remove(&key);
    }

    pub fn kind(&self) -> &Arc<TypedKind<S>> {
        &self.kind
    }

    /// Every cached object, in key order (namespace, then name).
    pub fn objects(&self) -> impl Iterator<Item = &S::Object> {
        self.objects.values()
    }

    /// The store revision the cache reflects.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Replaces the cache with a fresh list and watches from there.
    pub async fn resync(&mut self) -> Result<(), ApiError> {
        let prefix = self.kind.strategy().info().key_prefix();
        let plural = self.kind.strategy().info().plural;
        let list = self
            .kind
            .store()
            .list(&prefix)
            .await
            .map_err(ApiError::store(format!("listing {plural} for a controller")))?;
        let mut objects = BTreeMap::new();
        for kv in &list.items {
            objects.insert(kv.key.clone(), self.kind.decode(kv)?);
        }
        let changes = self
            .kind
            .store()
            .watch(&prefix, list.revision)
            .await
            .map_err(ApiError::store(format!("watching {plural} for a controller")))?;
        self.objects = objects;
        self.revision = list.revision;
        self.changes = Some(changes);
        if let Some(log) = self.log.as_mut() {
            log.relisted = true;
            log.changes.clear();
        }
        Ok(())
    }

    /// Waits for the next change and applies it (relisting when history was compacted).
    /// Cancel-safe: a change is either fully applied or still waiting in the stream.
    pub async fn next_change(&mut self) -> Result<(), ApiError> {
        let Some(changes) = self.changes.as_mut() else {
            return self.resync().await;
        };
        let batch = changes.next().await;
        self.apply(batch).await
    }

    /// Applies every change that is already available, without waiting.
    pub async fn drain_ready(&mut self) -> Result<(), ApiError> {
        loop {
            let Some(changes) = self.changes.as_mut() else {
                return Ok(());
            };
            match changes.next().now_or_never() {
                Some(batch) => self.apply(batch).await?,
                None => return Ok(()),
            }
        }
    }

    async fn apply(
        &mut self,
        batch: Option<Result<crate::store::WatchBatch, StoreError>>,
    ) -> Result<(), ApiError> {
        let plural = self.kind.strategy().info().plural;
        match batch {
            None => {
                // The store closed the stream (shutting down): start over next time.
                self.changes = None;
                Ok(())
            }
            Some(Err(StoreError::Compacted { .. })) => self.resync().await,
            Some(Err(error)) => {
                self.changes = None;
                Err(ApiError::store(format!("watching {plural} for a controller"))(error))
            }
            Some(Ok(batch)) => {
                for event in batch.events {
                    match event.kind {
                        EventKind::Put => {
                            let object = decode_object::<S::Object>(
                                &event.value,
                                event.revision,
                                &event.key,
                            )?;
                            if self.log.is_some() {
                                let before = self.objects.insert(event.key, object.clone());
                                self.record(before, Some(object));
                            } else {
                                self.objects.insert(event.key, object);
                            }
                        }
                        EventKind::Delete => {
                            let before = self.objects.remove(&event.key);
                            self.record(before, None);
                        }
                    }
                }
                self.revision = batch.revision;
                Ok(())
            }
        }
    }
}

/// Retry delay after `failures` consecutive failed passes: 100 ms doubling to 30 s.
pub fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(9);
    Duration::from_millis(100u64 << exponent).min(Duration::from_secs(30))
}

/// Counts a controller's failures so that none is silently dropped.
#[derive(Debug, Default)]
pub struct FailureCount {
    consecutive: u32,
    total: u64,
}

impl FailureCount {
    pub fn record(&mut self, controller: &str, error: &ApiError) -> Duration {
        self.consecutive = self.consecutive.saturating_add(1);
        self.total = self.total.saturating_add(1);
        tracing::warn!(
            controller,
            %error,
            consecutive = self.consecutive,
            total = self.total,
            "reconcile pass failed; retrying"
        );
        backoff(self.consecutive)
    }

    pub fn reset(&mut self) {
        self.consecutive = 0;
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

/// Resolves when shutdown has been signalled (or its sender is gone).
pub async fn shutdown_signalled(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// How long a controller waits between passes when nothing changes: missed errors are caught
/// up at this pace (time-based conditions ask for their own pass, [`Reconciler::requeue_after`]).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// A level-triggered controller: caches that follow the store, and a pass that converges
/// everything they show.
#[async_trait::async_trait]
pub trait Reconciler: Send {
    fn name(&self) -> &'static str;
    /// Relists every cache.
    async fn resync(&mut self) -> Result<(), ApiError>;
    /// Waits for a change in any cache and applies it. Must be cancel-safe.
    async fn next_change(&mut self) -> Result<(), ApiError>;
    /// Applies the changes already available, so one pass covers a burst of them.
    async fn drain_ready(&mut self) -> Result<(), ApiError>;
    /// One pass over everything cached. Idempotent: a pass with nothing to do writes nothing.
    async fn reconcile(&mut self) -> Result<(), ApiError>;
    /// After a successful pass: how soon the next one is due even if nothing changes (a pod
    /// becoming available after `minReadySeconds`, a progress deadline). `None`: only changes
    /// and [`RESYNC_INTERVAL`] bring one.
    fn requeue_after(&self) -> Option<Duration> {
        None
    }
}

/// Runs a controller until shutdown: a pass after every burst of changes, after a backoff
/// when the last pass failed, and every [`RESYNC_INTERVAL`] regardless.
pub async fn run<R: Reconciler>(mut reconciler: R, mut shutdown: watch::Receiver<bool>) {
    let name = reconciler.name();
    let mut failures = FailureCount::default();
    let mut synced = false;
    loop {
        let wait = if synced {
            match reconciler.reconcile().await {
                Ok(()) => {
                    failures.reset();
                    reconciler.requeue_after().map_or(RESYNC_INTERVAL, |d| d.min(RESYNC_INTERVAL))
                }
                Err(error) => failures.record(name, &error),
            }
        } else {
            match reconciler.resync().await {
                Ok(()) => {
                    synced = true;
                    continue;
                }
                Err(error) => failures.record(name, &error),
            }
        };
        tokio::select! {
            () = shutdown_signalled(&mut shutdown) => return,
            changed = reconciler.next_change(), if synced => {
                let drained = match changed {
                    Ok(()) => reconciler.drain_ready().await,
                    Err(error) => Err(error),
                };
                if let Err(error) = drained {
                    let wait = failures.record(name, &error);
                    synced = false;
                    tokio::select! {
                        () = shutdown_signalled(&mut shutdown) => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::backoff;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(5), Duration::from_millis(1600));
        assert_eq!(backoff(9), Duration::from_millis(25_600));
        assert_eq!(backoff(10), Duration::from_secs(30), "capped");
        assert_eq!(backoff(u32::MAX), Duration::from_secs(30));
    }
}
