//! The garbage collector: objects whose owners are gone go too, as Kubernetes' garbage
//! collector has it, for every registered kind alike (ownerReferences are matched by uid; no
//! kind is special).
//!
//! Each pass looks at the whole graph of ownerReferences, kept from one store watch over every
//! kind's objects (their metadata only):
//!
//! - a dependent whose owners are all gone is deleted (its own finalizers decide how); one
//!   with a live owner left only loses its references to the gone ones. An owner missing
//!   from the graph is looked up in the store before it counts as gone, so a graph that lags
//!   behind never deletes anything;
//! - the dependents of an owner deleted in the foreground (`foregroundDeletion` finalizer) are
//!   deleted, themselves in the foreground when they have dependents (so a chain goes from
//!   the leaves up), unless another live owner keeps them (then only the reference goes); the
//!   owner's finalizer is removed once no dependent with `blockOwnerDeletion` is left;
//! - the dependents of an owner deleted with `orphan` lose their reference to it, then its
//!   finalizer is removed.
//!
//! Removing the last finalizer removes the owner (see [`crate::api::deletion`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Deserialize;

use super::Reconciler;
use crate::{
    api::{
        Registry,
        deletion::{FOREGROUND_FINALIZER, ORPHAN_FINALIZER, PropagationPolicy, has_finalizer},
        error::ApiError,
        handler::KindHandler,
        kind::DeleteRequest,
    },
    store::{EventKind, SharedStore, StoreError, WatchBatch, WatchStream},
};

/// Where every kind's objects live in the store.
const REGISTRY_PREFIX: &str = "/registry/";

/// What the graph keeps of an object.
#[derive(Clone, Debug)]
struct Tracked {
    /// Index into the handlers.
    kind: usize,
    meta: ObjectMeta,
}

#[derive(Deserialize)]
struct PartialObject {
    metadata: ObjectMeta,
}

fn decode_metadata(value: &[u8], key: &str) -> Result<ObjectMeta, ApiError> {
    serde_json::from_slice::<PartialObject>(value)
        .map(|o| o.metadata)
        .map_err(|e| ApiError::internal(format!("decoding the metadata of {key}"), e))
}

/// An owner as one dependent's reference sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OwnerState {
    /// Exists and is not waiting for its dependents.
    Live,
    /// Deleted in the foreground: waits for its dependents to go.
    WaitingForDependents,
    /// No longer exists (no object of that kind, name and uid).
    Gone,
}

/// What becomes of a dependent, from the states of its owners.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    /// Keep it, without its references to these owner uids.
    DropReferences(Vec<String>),
    Delete(Option<PropagationPolicy>),
}

/// Kubernetes' rule (`attemptToDeleteItem`): a live owner keeps a dependent; owners that are
/// gone or waiting are then only dropped from its references. Without a live owner it goes:
/// in the foreground, when an owner waits for it and it has dependents of its own.
fn verdict(owners: &[(String, OwnerState)], has_dependents: bool) -> Verdict {
    if owners.is_empty() {
        return Verdict::Keep;
    }
    let not_live: Vec<String> = owners
        .iter()
        .filter(|(_, state)| *state != OwnerState::Live)
        .map(|(uid, _)| uid.clone())
        .collect();
    if not_live.len() < owners.len() {
        return if not_live.is_empty() { Verdict::Keep } else { Verdict::DropReferences(not_live) };
    }
    let waited_for = owners.iter().any(|(_, s)| *s == OwnerState::WaitingForDependents);
    if waited_for && has_dependents {
        Verdict::Delete(Some(PropagationPolicy::Foreground))
    } else if waited_for {
        Verdict::Delete(Some(PropagationPolicy::Background))
    } else {
        // Its own finalizers (orphan, foregroundDeletion) say how.
        Verdict::Delete(None)
    }
}

/// One write of a pass, on the object `key`.
#[derive(Debug)]
enum Action {
    Delete { policy: Option<PropagationPolicy> },
    DropReferences { owners: Vec<String> },
    RemoveFinalizer { finalizer: &'static str },
}

pub struct GarbageCollector {
    store: SharedStore,
    graph: Graph,
    changes: Option<WatchStream>,
}

/// Every object of every kind, by store key. Apart from the watch, so that a pass (which
/// holds it across its writes) can be sent between threads.
struct Graph {
    handlers: Vec<Arc<dyn KindHandler>>,
    objects: BTreeMap<String, Tracked>,
}

impl GarbageCollector {
    pub fn new(registry: Arc<Registry>) -> Self {
        let graph = Graph { handlers: registry.handlers().to_vec(), objects: BTreeMap::new() };
        Self { store: Arc::clone(registry.store()), graph, changes: None }
    }

    fn take(&mut self, batch: Option<Result<WatchBatch, StoreError>>) -> Result<bool, ApiError> {
        match batch {
            Some(Ok(batch)) => self.graph.apply(batch).map(|()| true),
            // History compacted or the stream ended: relist next time.
            Some(Err(StoreError::Compacted { .. })) | None => {
                self.changes = None;
                Ok(false)
            }
            Some(Err(error)) => {
                self.changes = None;
                Err(ApiError::store("watching objects for the garbage collector")(error))
            }
        }
    }
}

impl Graph {
    fn kind_of_key(&self, key: &str) -> Option<usize> {
        self.handlers.iter().position(|h| key.starts_with(&h.info().key_prefix()))
    }

    fn kind_of_reference(&self, owner: &OwnerReference) -> Option<usize> {
        self.handlers.iter().position(|h| {
            let info = h.info();
            info.kind == owner.kind && info.api_version() == owner.api_version
        })
    }

    fn apply(&mut self, batch: WatchBatch) -> Result<(), ApiError> {
        for event in batch.events {
            let Some(kind) = self.kind_of_key(&event.key) else { continue };
            match event.kind {
                EventKind::Put => {
                    let meta = decode_metadata(&event.value, &event.key)?;
                    self.objects.insert(event.key, Tracked { kind, meta });
                }
                EventKind::Delete => {
                    self.objects.remove(&event.key);
                }
            }
        }
        Ok(())
    }

    /// The state of the owner `reference` names, for a dependent in `namespace`. An owner
    /// absent from the graph is read from the store; one of a kind not served is taken as live
    /// (it cannot be checked, and nothing is deleted on a guess).
    async fn owner_state(
        &self,
        by_uid: &HashMap<&str, &Tracked>,
        reference: &OwnerReference,
        namespace: Option<&str>,
    ) -> Result<OwnerState, ApiError> {
        let Some(kind) = self.kind_of_reference(reference) else {
            return Ok(OwnerState::Live);
        };
        let handler = &self.handlers[kind];
        // A cluster-scoped object cannot be owned by a namespaced one: Kubernetes takes such a
        // reference as unresolvable and never collects the dependent over it.
        if namespace.is_none() && handler.info().namespaced {
            return Ok(OwnerState::Live);
        }
        // An owner is in its dependent's namespace (one elsewhere counts as absent), or
        // cluster-scoped.
        let owner_namespace = namespace.filter(|_| handler.info().namespaced);
        let meta = match by_uid.get(reference.uid.as_str()) {
            Some(owner)
                if owner.kind == kind && owner.meta.namespace.as_deref() == owner_namespace =>
            {
                Some(owner.meta.clone())
            }
            _ => handler
                .metadata_access()
                .get_metadata(owner_namespace, &reference.name)
                .await?
                .filter(|m| m.uid.as_deref() == Some(reference.uid.as_str())),
        };
        Ok(match meta {
            None => OwnerState::Gone,
            Some(meta)
                if meta.deletion_timestamp.is_some()
                    && has_finalizer(&meta, FOREGROUND_FINALIZER) =>
            {
                OwnerState::WaitingForDependents
            }
            Some(_) => OwnerState::Live,
        })
    }

    /// The writes that converge the graph.
    async fn plan(&self) -> Result<Vec<(String, Action)>, ApiError> {
        let by_uid: HashMap<&str, &Tracked> =
            self.objects.values().filter_map(|t| Some((t.meta.uid.as_deref()?, t))).collect();
        // Owner uid → (dependent key, its reference to that owner).
        let mut dependents: HashMap<&str, Vec<(&str, &OwnerReference)>> = HashMap::new();
        for (key, tracked) in &self.objects {
            for reference in tracked.meta.owner_references.iter().flatten() {
                dependents.entry(reference.uid.as_str()).or_default().push((key, reference));
            }
        }
        let mut actions = Vec::new();
        for (key, tracked) in &self.objects {
            let meta = &tracked.meta;
            let uid = meta.uid.as_deref().unwrap_or_default();
            if meta.deletion_timestamp.is_some() {
                // An owner being deleted: orphan or wait for its dependents.
                let own = dependents.get(uid).map(Vec::as_slice).unwrap_or_default();
                if has_finalizer(meta, ORPHAN_FINALIZER) {
                    if own.is_empty() {
                        actions.push((
                            key.clone(),
                            Action::RemoveFinalizer { finalizer: ORPHAN_FINALIZER },
                        ));
                    }
                    for (dependent, _) in own {
                        let owners = vec![uid.to_owned()];
                        actions.push(((*dependent).to_owned(), Action::DropReferences { owners }));
                    }
                }
                if has_finalizer(meta, FOREGROUND_FINALIZER)
                    && !own.iter().any(|(_, r)| r.block_owner_deletion == Some(true))
                {
                    actions.push((
                        key.clone(),
                        Action::RemoveFinalizer { finalizer: FOREGROUND_FINALIZER },
                    ));
                }
                // Already going: nothing to decide about it as a dependent.
                continue;
            }
            let references = meta.owner_references.as_deref().unwrap_or_default();
            if references.is_empty() {
                continue;
            }
            let mut owners = Vec::with_capacity(references.len());
            for reference in references {
                let state = self.owner_state(&by_uid, reference, meta.namespace.as_deref()).await?;
                owners.push((reference.uid.clone(), state));
            }
            match verdict(&owners, dependents.contains_key(uid)) {
                Verdict::Keep => {}
                Verdict::DropReferences(owners) => {
                    actions.push((key.clone(), Action::DropReferences { owners }));
                }
                Verdict::Delete(policy) => actions.push((key.clone(), Action::Delete { policy })),
            }
        }
        Ok(actions)
    }

    async fn act(&self, key: &str, action: &Action) -> Result<(), ApiError> {
        let Some(tracked) = self.objects.get(key) else { return Ok(()) };
        let access = self.handlers[tracked.kind].metadata_access();
        let namespace = tracked.meta.namespace.as_deref();
        let name = tracked.meta.name.as_deref().unwrap_or_default();
        let uid = tracked.meta.uid.clone().unwrap_or_default();
        match action {
            Action::Delete { policy } => {
                let request = DeleteRequest {
                    precondition_uid: Some(uid),
                    propagation_policy: *policy,
                    ..DeleteRequest::default()
                };
                match access.delete_object(namespace, name, &request).await {
                    Ok(()) => {
                        tracing::info!(key, ?policy, "deleted an object whose owners are gone");
                        Ok(())
                    }
                    // Gone already, or the name belongs to another object now.
                    Err(ApiError::NotFound { .. } | ApiError::Conflict { .. }) => Ok(()),
                    Err(error) => Err(error),
                }
            }
            Action::DropReferences { owners } => {
                let drop = |meta: &mut ObjectMeta| {
                    if let Some(references) = meta.owner_references.as_mut() {
                        references.retain(|r| !owners.contains(&r.uid));
                    }
                    if meta.owner_references.as_ref().is_some_and(Vec::is_empty) {
                        meta.owner_references = None;
                    }
                };
                access.update_metadata(namespace, name, &uid, &drop).await.map(|_| ())
            }
            Action::RemoveFinalizer { finalizer } => {
                let remove = |meta: &mut ObjectMeta| {
                    if let Some(finalizers) = meta.finalizers.as_mut() {
                        finalizers.retain(|f| f != finalizer);
                    }
                    if meta.finalizers.as_ref().is_some_and(Vec::is_empty) {
                        meta.finalizers = None;
                    }
                };
                access.update_metadata(namespace, name, &uid, &remove).await.map(|_| ())
            }
        }
    }
}

#[async_trait]
impl Reconciler for GarbageCollector {
    fn name(&self) -> &'static str {
        "garbage-collector"
    }

    async fn resync(&mut self) -> Result<(), ApiError> {
        let prefixes: Vec<String> =
            self.graph.handlers.iter().map(|h| h.info().key_prefix()).collect();
        let snapshot = self
            .store
            .snapshot(&prefixes)
            .await
            .map_err(ApiError::store("listing objects for the garbage collector"))?;
        let mut objects = BTreeMap::new();
        for (kind, list) in snapshot.lists.iter().enumerate() {
            for kv in list {
                let meta = decode_metadata(&kv.value, &kv.key)?;
                objects.insert(kv.key.clone(), Tracked { kind, meta });
            }
        }
        let changes = self
            .store
            .watch(REGISTRY_PREFIX, snapshot.revision)
            .await
            .map_err(ApiError::store("watching objects for the garbage collector"))?;
        self.graph.objects = objects;
        self.changes = Some(changes);
        Ok(())
    }

    async fn next_change(&mut self) -> Result<(), ApiError> {
        let Some(changes) = self.changes.as_mut() else {
            return self.resync().await;
        };
        let batch = changes.next().await;
        if !self.take(batch)? {
            self.resync().await?;
        }
        Ok(())
    }

    async fn drain_ready(&mut self) -> Result<(), ApiError> {
        while let Some(changes) = self.changes.as_mut() {
            let Some(batch) = changes.next().now_or_never() else { return Ok(()) };
            if !self.take(batch)? {
                return self.resync().await;
            }
        }
        Ok(())
    }

    async fn reconcile(&mut self) -> Result<(), ApiError> {
        let actions = self.graph.plan().await?;
        let mut first_error = None;
        for (key, action) in &actions {
            if let Err(error) = self.graph.act(key, action).await {
                tracing::debug!(key, ?action, %error, "garbage collection step failed");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::{OwnerState, PropagationPolicy, Verdict, verdict};

    fn owners(states: &[OwnerState]) -> Vec<(String, OwnerState)> {
        states.iter().enumerate().map(|(i, s)| (format!("u{i}"), *s)).collect()
    }

    #[test]
    fn a_live_owner_keeps_a_dependent_and_the_others_are_dropped_from_it() {
        use OwnerState::*;
        assert_eq!(verdict(&owners(&[Live]), false), Verdict::Keep);
        assert_eq!(verdict(&[], false), Verdict::Keep);
        assert_eq!(
            verdict(&owners(&[Live, Gone, WaitingForDependents]), true),
            Verdict::DropReferences(vec!["u1".to_owned(), "u2".to_owned()])
        );
    }

    #[test]
    fn without_a_live_owner_a_dependent_goes_in_the_foreground_if_waited_for() {
        use OwnerState::*;
        assert_eq!(verdict(&owners(&[Gone]), true), Verdict::Delete(None));
        assert_eq!(
            verdict(&owners(&[Gone, WaitingForDependents]), true),
            Verdict::Delete(Some(PropagationPolicy::Foreground))
        );
        assert_eq!(
            verdict(&owners(&[WaitingForDependents]), false),
            Verdict::Delete(Some(PropagationPolicy::Background))
        );
    }
}
