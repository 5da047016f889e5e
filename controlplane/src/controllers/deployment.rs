//! The deployment controller: each Deployment runs its pod template through ReplicaSets, one
//! per template version, named `<deployment>-<pod-template-hash>` and controlled by the
//! deployment (a controller ownerReference with its uid). The replica set whose template is
//! the deployment's is the new one; it carries the highest `deployment.kubernetes.io/revision`
//! (a rollback to an old template makes that old set new again, under a new revision), which
//! is what `kubectl rollout history|undo` read.
//!
//! - `RollingUpdate` grows the new set and shrinks the old ones so that at most `replicas +
//!   maxSurge` pods exist and at least `replicas - maxUnavailable` are available (ready for
//!   `minReadySeconds`, as the replica set controller counts them).
//! - `Recreate` scales every old set to zero, waits until none of their pods is left
//!   (terminating ones included), then brings the new set up.
//! - A paused deployment only scales (proportionally across its sets, as for any change of
//!   `replicas` during a rollout) and starts no rollout.
//! - Old sets scaled to zero beyond `revisionHistoryLimit` are deleted, oldest revision first.
//! - Status counts replicas, updated, ready, available and unavailable pods; the `Available`
//!   condition says whether enough are available, `Progressing` whether the rollout moves
//!   (`ProgressDeadlineExceeded` when it has not for `progressDeadlineSeconds`).
//!
//! The counts a decision rests on are the cautious ones: a set counts as many pods as the
//! larger of its desired replicas and the pods seen active, and as many available as the
//! smallest of its reported, desired and seen-available pods, so that a cache behind the
//! store never lets a bound be exceeded.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec},
        core::v1::PodTemplateSpec,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    jiff::{SignedDuration, Timestamp},
};

use super::{
    CacheChanges, ObjectCache, Reconciler,
    replica_set::{is_available, precise_now},
};
use crate::{
    api::{
        Registry,
        error::ApiError,
        kind::{DeleteRequest, Strategy},
        kinds::{
            deployment::{DeploymentStrategy, is_recreate, rolling_bounds},
            pod::{PodStrategy, is_terminated},
            replica_set::{ReplicaSetStrategy, selects},
        },
        typed::{UpdateMode, current_time},
    },
    events::EventRecorder,
};

/// The revision of a replica set, and of the deployment (its new set's).
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
/// Earlier revisions of a replica set that became new again (rollbacks), comma-separated.
pub const REVISION_HISTORY_ANNOTATION: &str = "deployment.kubernetes.io/revision-history";
/// The deployment's `replicas` when it last sized the set.
pub const DESIRED_REPLICAS_ANNOTATION: &str = "deployment.kubernetes.io/desired-replicas";
/// `replicas + maxSurge` when it last sized the set.
pub const MAX_REPLICAS_ANNOTATION: &str = "deployment.kubernetes.io/max-replicas";
/// The label that tells the pods of one template version from another's.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// Deployment annotations that describe the deployment itself, not its template: they are
/// not copied onto its replica sets.
const NOT_COPIED: [&str; 6] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION_ANNOTATION,
    REVISION_HISTORY_ANNOTATION,
    DESIRED_REPLICAS_ANNOTATION,
    MAX_REPLICAS_ANNOTATION,
    "deprecated.deployment.rollback.to",
];

const CONDITION_AVAILABLE: &str = "Available";
const CONDITION_PROGRESSING: &str = "Progressing";
const REASON_NEW_SET_CREATED: &str = "NewReplicaSetCreated";
const REASON_FOUND_NEW_SET: &str = "FoundNewReplicaSet";
const REASON_SET_UPDATED: &str = "ReplicaSetUpdated";
const REASON_NEW_SET_AVAILABLE: &str = "NewReplicaSetAvailable";
pub const REASON_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
const REASON_PAUSED: &str = "DeploymentPaused";
const REASON_RESUMED: &str = "DeploymentResumed";

/// Characters of template hashes: those of generated name suffixes (no vowels, no
/// look-alikes), so a hash is never a word.
const HASH_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

type DeploymentKey = (String, String);

pub struct DeploymentController {
    registry: Arc<Registry>,
    deployments: ObjectCache<DeploymentStrategy>,
    sets: ObjectCache<ReplicaSetStrategy>,
    pods: ObjectCache<PodStrategy>,
    /// Deployments whose pass is due because something of theirs changed (or failed).
    dirty: BTreeSet<DeploymentKey>,
    /// Whether a change arrived since the last pass (a pass without one covers everything).
    changed: bool,
    /// Deployments that want a pass at a moment even if nothing changes (progress deadlines).
    due: BTreeMap<DeploymentKey, Timestamp>,
    events: EventRecorder,
}

impl DeploymentController {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            deployments: ObjectCache::logging_changes(Arc::clone(&registry.deployments)),
            sets: ObjectCache::logging_changes(Arc::clone(&registry.replica_sets)),
            pods: ObjectCache::logging_changes(Arc::clone(&registry.pods)),
            events: EventRecorder::spawn(Arc::clone(&registry.events), "deployment-controller"),
            registry,
            dirty: BTreeSet::new(),
            changed: false,
            due: BTreeMap::new(),
        }
    }
}

/// A template's hash: FNV-1a (32 bits) of its JSON, and of the collision count when there is
/// one, written in [`HASH_ALPHABET`]. Stable across restarts: JSON of the typed template has
/// a fixed field order and sorted maps.
pub fn template_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    let mut feed = |byte: u8| {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    };
    serde_json::to_vec(template).unwrap_or_default().into_iter().for_each(&mut feed);
    if let Some(count) = collision_count {
        count.to_le_bytes().into_iter().for_each(&mut feed);
    }
    let base = HASH_ALPHABET.len() as u32;
    let mut digits = Vec::new();
    loop {
        digits.push(HASH_ALPHABET[(hash % base) as usize]);
        hash /= base;
        if hash == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8_lossy(&digits).into_owned()
}

/// A template without its `pod-template-hash` label, for comparing versions.
fn without_hash(template: &PodTemplateSpec) -> PodTemplateSpec {
    let mut template = template.clone();
    if let Some(meta) = template.metadata.as_mut() {
        if let Some(labels) = meta.labels.as_mut() {
            labels.remove(POD_TEMPLATE_HASH_LABEL);
            if labels.is_empty() {
                meta.labels = None;
            }
        }
        if *meta == ObjectMeta::default() {
            template.metadata = None;
        }
    }
    template
}

/// Whether two templates are the same version (equal but for the hash label).
pub fn same_template(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    without_hash(a) == without_hash(b)
}

/// The revision a replica set carries (0 without one).
pub fn revision(set: &ReplicaSet) -> i64 {
    set.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION_ANNOTATION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn replicas_of(deployment: &Deployment) -> i32 {
    deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn spec_replicas(set: &ReplicaSet) -> i32 {
    set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references.iter().flatten().find(|o| o.controller == Some(true))
}

fn uid_of(meta: &ObjectMeta) -> &str {
    meta.uid.as_deref().unwrap_or_default()
}

fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

/// What the pod cache shows of one replica set's pods.
#[derive(Clone, Copy, Debug, Default)]
struct SeenPods {
    /// Not being deleted, not finished.
    active: i32,
    /// Active and available now.
    available: i32,
    /// Not finished, terminating ones included: what Recreate waits for.
    present: i32,
}

/// One deployment's replica sets: the new one (if any) and the old ones, oldest first.
#[derive(Debug)]
struct Family {
    new: Option<ReplicaSet>,
    old: Vec<ReplicaSet>,
    pods: HashMap<String, SeenPods>,
}

impl Family {
    fn all(&self) -> impl Iterator<Item = &ReplicaSet> {
        self.new.iter().chain(&self.old)
    }

    fn seen(&self, set: &ReplicaSet) -> SeenPods {
        self.pods.get(uid_of(&set.metadata)).copied().unwrap_or_default()
    }

    /// Pods a set may have: its desired count, or more while surplus ones are still active.
    fn counted(&self, set: &ReplicaSet) -> i32 {
        spec_replicas(set).max(self.seen(set).active)
    }

    /// Pods of a set that are available for sure: what its status, its desired count and the
    /// pod cache all agree on.
    fn available(&self, set: &ReplicaSet) -> i32 {
        let reported = set.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
        reported.min(spec_replicas(set)).min(self.seen(set).available).max(0)
    }

    fn replace(&mut self, updated: ReplicaSet) {
        let uid = uid_of(&updated.metadata).to_owned();
        if self.new.as_ref().is_some_and(|n| uid_of(&n.metadata) == uid) {
            self.new = Some(updated);
        } else if let Some(slot) = self.old.iter_mut().find(|s| uid_of(&s.metadata) == uid) {
            *slot = updated;
        }
    }

    fn max_old_revision(&self) -> i64 {
        self.old.iter().map(revision).max().unwrap_or(0)
    }
}

/// Orders replica sets oldest first (creation time, then name).
fn by_age(a: &ReplicaSet, b: &ReplicaSet) -> std::cmp::Ordering {
    let key = |s: &ReplicaSet| (s.metadata.creation_timestamp.clone(), s.metadata.name.clone());
    key(a).cmp(&key(b))
}

fn condition<'a>(status: &'a DeploymentStatus, kind: &str) -> Option<&'a DeploymentCondition> {
    status.conditions.iter().flatten().find(|c| c.type_ == kind)
}

fn new_condition(kind: &str, status: &str, reason: &str, message: String) -> DeploymentCondition {
    let now = current_time();
    DeploymentCondition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// Sets a condition as Kubernetes does: one with the same status and reason changes nothing;
/// one with the same status keeps its transition time.
fn set_condition(status: &mut DeploymentStatus, mut new: DeploymentCondition) {
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == new.type_) {
        if existing.status == new.status && existing.reason == new.reason {
            return;
        }
        if existing.status == new.status {
            new.last_transition_time = existing.last_transition_time.clone();
        }
        *existing = new;
    } else {
        conditions.push(new);
    }
}

/// Whether the rollout is done: every desired pod updated and available, nothing else left,
/// and the current generation observed (Kubernetes' `DeploymentComplete`).
fn is_complete(deployment: &Deployment, status: &DeploymentStatus) -> bool {
    let replicas = replicas_of(deployment);
    status.updated_replicas.unwrap_or(0) == replicas
        && status.replicas.unwrap_or(0) == replicas
        && status.available_replicas.unwrap_or(0) == replicas
        && status.observed_generation >= deployment.metadata.generation
}

/// Whether the new status shows progress over the stored one: more updated, ready or
/// available pods, or fewer old ones.
fn made_progress(old: &DeploymentStatus, new: &DeploymentStatus) -> bool {
    let count = |v: Option<i32>| v.unwrap_or(0);
    let old_pods = |s: &DeploymentStatus| count(s.replicas) - count(s.updated_replicas);
    count(new.updated_replicas) > count(old.updated_replicas)
        || old_pods(new) < old_pods(old)
        || count(new.ready_replicas) > count(old.ready_replicas)
        || count(new.available_replicas) > count(old.available_replicas)
}

fn has_progress_deadline(deployment: &Deployment) -> bool {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.progress_deadline_seconds)
        .is_some_and(|d| d != i32::MAX)
}

/// When the rollout runs out of time if it makes no progress meanwhile: a second past the
/// deadline, since condition times are whole seconds.
fn deadline_of(deployment: &Deployment, status: &DeploymentStatus) -> Option<Timestamp> {
    let seconds = deployment.spec.as_ref()?.progress_deadline_seconds?;
    let since = condition(status, CONDITION_PROGRESSING)?.last_update_time.as_ref()?.0;
    since.checked_add(SignedDuration::from_secs(i64::from(seconds) + 1)).ok()
}

fn timed_out(deployment: &Deployment, status: &DeploymentStatus, now: Timestamp) -> bool {
    if !has_progress_deadline(deployment) {
        return false;
    }
    let Some(progressing) = condition(status, CONDITION_PROGRESSING) else { return false };
    match progressing.reason.as_deref() {
        Some(REASON_NEW_SET_AVAILABLE) => false,
        Some(REASON_DEADLINE_EXCEEDED) => true,
        _ => deadline_of(deployment, status).is_some_and(|at| at <= now),
    }
}

/// What one pass learned that goes into the deployment's status.
#[derive(Debug, Default)]
struct PassNotes {
    /// A Progressing condition for a new set created or found.
    progressing: Option<DeploymentCondition>,
    /// A hash collision: the count to store, so that the next pass hashes differently.
    collision_count: Option<i32>,
}

impl DeploymentController {
    fn every_deployment(&self) -> Vec<DeploymentKey> {
        self.deployments.objects().map(|d| key_of(&d.metadata)).collect()
    }

    /// Turns the caches' changes into dirty deployments; false when a cache was relisted
    /// (then every deployment is).
    fn collect_dirty(&mut self) -> bool {
        let mut complete = true;
        let deployments = self.deployments.take_changes();
        complete &= !deployments.relisted;
        for change in deployments.changes {
            for deployment in change.before.iter().chain(&change.after) {
                self.dirty.insert(key_of(&deployment.metadata));
            }
        }
        let CacheChanges { relisted, changes } = self.sets.take_changes();
        complete &= !relisted;
        for change in changes {
            for set in change.before.iter().chain(&change.after) {
                let keys = self.owners_of_set(set);
                self.dirty.extend(keys);
            }
        }
        let CacheChanges { relisted, changes } = self.pods.take_changes();
        complete &= !relisted;
        for change in changes {
            for pod in change.before.iter().chain(&change.after) {
                let Some(owner) = controller_of(&pod.metadata).filter(|o| o.kind == "ReplicaSet")
                else {
                    continue;
                };
                let namespace = pod.metadata.namespace.as_deref();
                let key = self.sets.kind().key(namespace, &owner.name);
                let keys = self.sets.get(&key).map(|set| self.owners_of_set(set));
                self.dirty.extend(keys.into_iter().flatten());
            }
        }
        complete
    }

    /// The deployments a replica set concerns: its controller, or for an orphan every
    /// deployment of its namespace that selects it (it may be adopted).
    fn owners_of_set(&self, set: &ReplicaSet) -> Vec<DeploymentKey> {
        let namespace = set.metadata.namespace.clone().unwrap_or_default();
        match controller_of(&set.metadata) {
            Some(owner) if owner.kind == "Deployment" => vec![(namespace, owner.name.clone())],
            Some(_) => Vec::new(),
            None => {
                let prefix = self.deployments.kind().strategy().info();
                let prefix = prefix.collection_prefix(Some(&namespace));
                self.deployments
                    .under(prefix)
                    .filter(|d| {
                        d.spec
                            .as_ref()
                            .is_some_and(|s| selects(&s.selector, set.metadata.labels.as_ref()))
                    })
                    .map(|d| key_of(&d.metadata))
                    .collect()
            }
        }
    }

    /// The deployment's replica sets (adopting orphans it selects), split into new and old,
    /// with what the pod cache shows of each.
    async fn family(&mut self, deployment: &Deployment) -> Result<Family, ApiError> {
        let namespace = deployment.metadata.namespace.clone().unwrap_or_default();
        let uid = uid_of(&deployment.metadata).to_owned();
        let spec = deployment.spec.clone().unwrap_or_default();
        let prefix = self.sets.kind().strategy().info().collection_prefix(Some(&namespace));
        let mut owned = Vec::new();
        let mut orphans = Vec::new();
        for set in self.sets.under(prefix) {
            match controller_of(&set.metadata) {
                Some(owner) if owner.uid == uid => owned.push(set.clone()),
                None if set.metadata.deletion_timestamp.is_none()
                    && selects(&spec.selector, set.metadata.labels.as_ref()) =>
                {
                    orphans.push(set.clone());
                }
                _ => {}
            }
        }
        for orphan in orphans {
            if let Some(adopted) = self.adopt(deployment, &orphan).await? {
                owned.push(adopted);
            }
        }
        owned.sort_by(by_age);
        let mut new: Option<ReplicaSet> = None;
        let mut old = Vec::new();
        for set in owned {
            let matches = set
                .spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|template| same_template(template, &spec.template));
            // Of several sets with the template (a race long past), the oldest is new.
            if matches && new.is_none() {
                new = Some(set);
            } else {
                old.push(set);
            }
        }
        let uids: HashMap<&str, i32> = new
            .iter()
            .chain(&old)
            .map(|s| {
                (
                    uid_of(&s.metadata),
                    s.spec.as_ref().and_then(|s| s.min_ready_seconds).unwrap_or(0),
                )
            })
            .collect();
        let now = precise_now();
        let mut pods: HashMap<String, SeenPods> = HashMap::new();
        let pod_prefix = self.pods.kind().strategy().info().collection_prefix(Some(&namespace));
        for pod in self.pods.under(pod_prefix) {
            let Some(owner) = controller_of(&pod.metadata) else { continue };
            let Some(min_ready) = uids.get(owner.uid.as_str()) else { continue };
            let seen = pods.entry(owner.uid.clone()).or_default();
            if is_terminated(pod) {
                continue;
            }
            seen.present += 1;
            if pod.metadata.deletion_timestamp.is_none() {
                seen.active += 1;
                if is_available(pod, *min_ready, now) {
                    seen.available += 1;
                }
            }
        }
        Ok(Family { new, old, pods })
    }

    /// Makes the deployment the controller of an orphan replica set it selects. `None` when
    /// the set changed meanwhile (someone else took it).
    async fn adopt(
        &mut self,
        deployment: &Deployment,
        orphan: &ReplicaSet,
    ) -> Result<Option<ReplicaSet>, ApiError> {
        let reference = owner_reference(deployment);
        let result = self
            .registry
            .replica_sets
            .update(
                orphan.metadata.namespace.as_deref(),
                name_of(&orphan.metadata),
                UpdateMode::Main,
                false,
                |current| {
                    if controller_of(&current.metadata).is_some() {
                        return Err(ApiError::Conflict {
                            resource: "replicasets".to_owned(),
                            name: name_of(&current.metadata).to_owned(),
                            message: "already controlled".to_owned(),
                        });
                    }
                    let mut adopted = current.clone();
                    adopted
                        .metadata
                        .owner_references
                        .get_or_insert_with(Vec::new)
                        .push(reference.clone());
                    Ok(adopted)
                },
            )
            .await;
        match result {
            Ok(adopted) => {
                tracing::info!(
                    replica_set = name_of(&adopted.metadata),
                    deployment = name_of(&deployment.metadata),
                    "adopted a replica set"
                );
                self.sets.record_write(adopted.clone());
                Ok(Some(adopted))
            }
            Err(ApiError::Conflict { .. } | ApiError::NotFound { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Sizes a replica set, recording the deployment's replicas and surge beside.
    async fn scale_set(
        &mut self,
        deployment: &Deployment,
        family: &mut Family,
        set: &ReplicaSet,
        replicas: i32,
    ) -> Result<(), ApiError> {
        let desired = replicas_of(deployment);
        let surge = if is_recreate(deployment) { 0 } else { rolling_bounds(deployment).0 };
        let updated = self
            .registry
            .replica_sets
            .update(
                set.metadata.namespace.as_deref(),
                name_of(&set.metadata),
                UpdateMode::Main,
                false,
                |current| {
                    let mut scaled = current.clone();
                    scaled.spec.get_or_insert_with(ReplicaSetSpec::default).replicas =
                        Some(replicas);
                    let annotations = scaled.metadata.annotations.get_or_insert_with(BTreeMap::new);
                    annotations.insert(DESIRED_REPLICAS_ANNOTATION.to_owned(), desired.to_string());
                    annotations
                        .insert(MAX_REPLICAS_ANNOTATION.to_owned(), (desired + surge).to_string());
                    Ok(scaled)
                },
            )
            .await?;
        let from = spec_replicas(set);
        tracing::debug!(replica_set = name_of(&set.metadata), from, to = replicas, "scaled");
        let direction = if replicas > from { "up" } else { "down" };
        self.events.normal(
            deployment,
            "ScalingReplicaSet",
            format!(
                "Scaled {direction} replica set {} from {from} to {replicas}",
                name_of(&set.metadata)
            ),
        );
        self.sets.record_write(updated.clone());
        family.replace(updated);
        Ok(())
    }

    /// Finds the new replica set and brings its annotations up to date (revision, copied
    /// deployment annotations, minReadySeconds), or with `create` makes it when there is none.
    async fn sync_new_set(
        &mut self,
        deployment: &Deployment,
        family: &mut Family,
        create: bool,
        notes: &mut PassNotes,
    ) -> Result<(), ApiError> {
        let next_revision = family.max_old_revision() + 1;
        let min_ready = deployment.spec.as_ref().and_then(|s| s.min_ready_seconds);
        if let Some(existing) = family.new.clone() {
            let mut wanted = existing.clone();
            copy_annotations(deployment, &mut wanted);
            let current = revision(&existing);
            if current < next_revision {
                let annotations = wanted.metadata.annotations.get_or_insert_with(BTreeMap::new);
                if current > 0 {
                    let history = annotations
                        .get(REVISION_HISTORY_ANNOTATION)
                        .map(|h| format!("{h},{current}"))
                        .unwrap_or_else(|| current.to_string());
                    annotations.insert(REVISION_HISTORY_ANNOTATION.to_owned(), history);
                }
                annotations.insert(REVISION_ANNOTATION.to_owned(), next_revision.to_string());
            }
            if let Some(spec) = wanted.spec.as_mut() {
                spec.min_ready_seconds = min_ready;
            }
            if wanted.metadata.annotations != existing.metadata.annotations
                || wanted.spec != existing.spec
            {
                let updated = self
                    .registry
                    .replica_sets
                    .update(
                        existing.metadata.namespace.as_deref(),
                        name_of(&existing.metadata),
                        UpdateMode::Main,
                        false,
                        |current| {
                            let mut next = current.clone();
                            next.metadata.annotations = wanted.metadata.annotations.clone();
                            if let Some(spec) = next.spec.as_mut() {
                                spec.min_ready_seconds = min_ready;
                            }
                            Ok(next)
                        },
                    )
                    .await?;
                self.sets.record_write(updated.clone());
                family.new = Some(updated);
            }
            let has_progressing = deployment
                .status
                .as_ref()
                .and_then(|s| condition(s, CONDITION_PROGRESSING))
                .is_some();
            if has_progress_deadline(deployment) && !has_progressing {
                notes.progressing = Some(new_condition(
                    CONDITION_PROGRESSING,
                    "True",
                    REASON_FOUND_NEW_SET,
                    format!("Found new replica set {:?}", name_of(&existing.metadata)),
                ));
            }
            return Ok(());
        }
        if !create {
            return Ok(());
        }
        let collision_count = deployment.status.as_ref().and_then(|s| s.collision_count);
        let mut set = new_replica_set(deployment, collision_count, next_revision);
        let replicas = new_set_replicas(deployment, family, 0);
        set.spec.get_or_insert_with(ReplicaSetSpec::default).replicas = Some(replicas);
        let namespace = deployment.metadata.namespace.clone();
        match self.registry.replica_sets.create(namespace.as_deref(), set.clone(), false).await {
            Ok(created) => {
                tracing::info!(
                    replica_set = name_of(&created.metadata),
                    revision = next_revision,
                    replicas,
                    "created a new replica set"
                );
                self.events.normal(
                    deployment,
                    "ScalingReplicaSet",
                    format!(
                        "Scaled up replica set {} from 0 to {replicas}",
                        name_of(&created.metadata)
                    ),
                );
                notes.progressing = Some(new_condition(
                    CONDITION_PROGRESSING,
                    "True",
                    REASON_NEW_SET_CREATED,
                    format!("Created new replica set {:?}", name_of(&created.metadata)),
                ));
                self.sets.record_write(created.clone());
                family.new = Some(created);
                Ok(())
            }
            Err(ApiError::AlreadyExists { .. }) => {
                let existing = self
                    .registry
                    .replica_sets
                    .get(namespace.as_deref(), name_of(&set.metadata))
                    .await?;
                let ours = controller_of(&existing.metadata)
                    .is_some_and(|o| o.uid == uid_of(&deployment.metadata));
                let same =
                    existing.spec.as_ref().and_then(|s| s.template.as_ref()).is_some_and(|t| {
                        deployment.spec.as_ref().is_some_and(|d| same_template(t, &d.template))
                    });
                if ours && same {
                    // Ours, not yet in the cache: the next pass finds it.
                    self.sets.record_write(existing);
                    return Err(ApiError::Conflict {
                        resource: "replicasets".to_owned(),
                        name: name_of(&set.metadata).to_owned(),
                        message: "the new replica set was not in the cache yet".to_owned(),
                    });
                }
                // Another template (or another owner) has this hash: hash differently.
                notes.collision_count = Some(collision_count.unwrap_or(0) + 1);
                tracing::info!(replica_set = name_of(&set.metadata), "template hash collision");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// `RollingUpdate`: grow the new set within the surge, then shrink old sets within the
    /// unavailability. One kind of step per pass; the next comes with the changes it causes.
    async fn roll(
        &mut self,
        deployment: &Deployment,
        family: &mut Family,
        notes: &mut PassNotes,
    ) -> Result<(), ApiError> {
        self.sync_new_set(deployment, family, true, notes).await?;
        let Some(new) = family.new.clone() else { return Ok(()) };
        let replicas = replicas_of(deployment);
        let current = spec_replicas(&new);
        if current > replicas {
            return self.scale_set(deployment, family, &new, replicas).await;
        }
        if current < replicas {
            let wanted = new_set_replicas(deployment, family, current);
            if wanted > current {
                return self.scale_set(deployment, family, &new, wanted).await;
            }
        }
        self.shrink_old_sets(deployment, family).await
    }

    async fn shrink_old_sets(
        &mut self,
        deployment: &Deployment,
        family: &mut Family,
    ) -> Result<(), ApiError> {
        let old_total: i32 = family.old.iter().map(spec_replicas).sum();
        if old_total == 0 {
            return Ok(());
        }
        let replicas = replicas_of(deployment);
        let (_, unavailable) = rolling_bounds(deployment);
        let min_available = replicas - unavailable;
        let all_total: i32 = family.all().map(spec_replicas).sum();
        let new_unavailable =
            family.new.as_ref().map_or(0, |n| spec_replicas(n) - family.available(n));
        let max_scaled_down = all_total - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return Ok(());
        }
        // Unavailable old pods go first: removing them costs no availability.
        let mut cleaned = 0;
        for set in family.old.clone() {
            if cleaned >= max_scaled_down {
                break;
            }
            let spec = spec_replicas(&set);
            let unhealthy = spec - family.available(&set);
            if spec == 0 || unhealthy <= 0 {
                continue;
            }
            let down = unhealthy.min(max_scaled_down - cleaned);
            self.scale_set(deployment, family, &set, spec - down).await?;
            cleaned += down;
        }
        if cleaned > 0 {
            return Ok(());
        }
        // Then available ones, as far as availability allows, oldest sets first.
        let available: i32 = family.all().map(|s| family.available(s)).sum();
        let mut allowed = (available - min_available).min(max_scaled_down);
        for set in family.old.clone() {
            if allowed <= 0 {
                break;
            }
            let spec = spec_replicas(&set);
            if spec == 0 {
                continue;
            }
            let down = spec.min(allowed);
            self.scale_set(deployment, family, &set, spec - down).await?;
            allowed -= down;
        }
        Ok(())
    }

    /// `Recreate`: every old set to zero, wait for their pods to be gone, then the new set.
    async fn recreate(
        &mut self,
        deployment: &Deployment,
        family: &mut Family,
        notes: &mut PassNotes,
    ) -> Result<(), ApiError> {
        self.sync_new_set(deployment, family, false, notes).await?;
        let mut scaled_down = false;
        for set in family.old.clone() {
            if spec_replicas(&set) > 0 {
                self.scale_set(deployment, family, &set, 0).await?;
                scaled_down = true;
            }
        }
        if scaled_down {
            return Ok(());
        }
        let old_pods_left = family.old.iter().any(|set| {
            family.seen(set).present > 0 || set.status.as_ref().is_some_and(|s| s.replicas > 0)
        });
        if old_pods_left {
            return Ok(());
        }
        if family.new.is_none() {
            self.sync_new_set(deployment, family, true, notes).await?;
            return Ok(());
        }
        if let Some(new) = family.new.clone() {
            let replicas = replicas_of(deployment);
            if spec_replicas(&new) != replicas {
                self.scale_set(deployment, family, &new, replicas).await?;
            }
        }
        Ok(())
    }

    /// Whether `replicas` changed since the active sets were last sized.
    fn is_scaling_event(deployment: &Deployment, family: &Family) -> bool {
        let replicas = replicas_of(deployment).to_string();
        family.all().filter(|s| spec_replicas(s) > 0).any(|set| {
            set.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DESIRED_REPLICAS_ANNOTATION))
                .is_some_and(|desired| *desired != replicas)
        })
    }

    /// Brings the sets to the deployment's `replicas` without rolling: one active set takes
    /// them all; several share the change in proportion to their sizes.
    async fn scale(
        &mut self,
        deployment: &Deployment,
        family: &mut Family,
    ) -> Result<(), ApiError> {
        let replicas = replicas_of(deployment);
        let active: Vec<ReplicaSet> =
            family.all().filter(|s| spec_replicas(s) > 0).cloned().collect();
        if active.len() <= 1 {
            // The one active set, or the newest when none is.
            let target = active.into_iter().next().or_else(|| {
                family
                    .new
                    .clone()
                    .or_else(|| family.old.iter().max_by(|a, b| by_age(a, b)).cloned())
            });
            if let Some(set) = target.filter(|s| spec_replicas(s) != replicas) {
                self.scale_set(deployment, family, &set, replicas).await?;
            }
            return Ok(());
        }
        if let Some(new) = family.new.clone()
            && spec_replicas(&new) == replicas
            && family.available(&new) == replicas
        {
            for set in family.old.clone() {
                if spec_replicas(&set) > 0 {
                    self.scale_set(deployment, family, &set, 0).await?;
                }
            }
            return Ok(());
        }
        let surge = if is_recreate(deployment) { 0 } else { rolling_bounds(deployment).0 };
        let allowed = replicas + surge;
        let current: i32 = family.all().map(spec_replicas).sum();
        let to_add = allowed - current;
        if to_add == 0 {
            return Ok(());
        }
        let mut ordered = active;
        // Growth goes to the newest sets first, shrinking to the oldest.
        ordered.sort_by(|a, b| {
            let size = spec_replicas(b).cmp(&spec_replicas(a));
            if to_add > 0 { size.then(by_age(b, a)) } else { size.then(by_age(a, b)) }
        });
        let mut sizes: Vec<i32> = ordered.iter().map(spec_replicas).collect();
        let mut added = 0;
        for (set, size) in ordered.iter().zip(sizes.iter_mut()) {
            let annotated = set
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(MAX_REPLICAS_ANNOTATION))
                .and_then(|m| m.parse::<i32>().ok())
                .filter(|m| *m > 0)
                .unwrap_or(current.max(1));
            let share = if replicas == 0 {
                -*size
            } else {
                let scaled = f64::from(*size) * f64::from(allowed) / f64::from(annotated);
                scaled.round() as i32 - *size
            };
            let remaining = to_add - added;
            let share =
                if to_add > 0 { share.min(remaining).max(0) } else { share.max(remaining).min(0) };
            *size += share;
            added += share;
        }
        if let Some(first) = sizes.first_mut() {
            *first += to_add - added;
        }
        for (set, size) in ordered.iter().zip(sizes) {
            let size = size.max(0);
            if size != spec_replicas(set) {
                self.scale_set(deployment, family, set, size).await?;
            }
        }
        Ok(())
    }

    /// Deletes old sets scaled to zero beyond `revisionHistoryLimit`, oldest revision first.
    async fn prune_history(
        &mut self,
        deployment: &Deployment,
        family: &Family,
    ) -> Result<(), ApiError> {
        let Some(limit) = deployment.spec.as_ref().and_then(|s| s.revision_history_limit) else {
            return Ok(());
        };
        let mut cleanable: Vec<&ReplicaSet> = family
            .old
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter(|s| spec_replicas(s) == 0)
            .filter(|s| {
                s.status.as_ref().is_some_and(|st| {
                    st.replicas == 0 && st.observed_generation >= s.metadata.generation
                })
            })
            .filter(|s| family.seen(s).active == 0)
            .collect();
        let surplus = cleanable.len().saturating_sub(usize::try_from(limit).unwrap_or(0));
        cleanable.sort_by(|a, b| revision(a).cmp(&revision(b)).then(by_age(a, b)));
        for set in cleanable.into_iter().take(surplus) {
            let request = DeleteRequest {
                precondition_uid: set.metadata.uid.clone(),
                precondition_resource_version: set.metadata.resource_version.clone(),
                ..DeleteRequest::default()
            };
            match self
                .registry
                .replica_sets
                .delete(set.metadata.namespace.as_deref(), name_of(&set.metadata), &request, false)
                .await
            {
                Ok(deleted) => {
                    tracing::info!(
                        replica_set = name_of(&set.metadata),
                        revision = revision(set),
                        "pruned an old replica set"
                    );
                    self.sets.record_removal(&deleted);
                }
                // Changed meanwhile (scaled up again by a rollback): keep it.
                Err(ApiError::Conflict { .. } | ApiError::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// The status the family shows (counts and the Available condition; other conditions
    /// carried over).
    fn calculate_status(
        deployment: &Deployment,
        family: &Family,
        notes: &PassNotes,
    ) -> DeploymentStatus {
        let stored = deployment.status.clone().unwrap_or_default();
        let sum = |f: &dyn Fn(&ReplicaSet) -> i32| family.all().map(f).sum::<i32>();
        let status_of = |s: &ReplicaSet| s.status.clone().unwrap_or_default();
        let replicas = sum(&|s| status_of(s).replicas);
        let ready = sum(&|s| status_of(s).ready_replicas.unwrap_or(0));
        let available = sum(&|s| status_of(s).available_replicas.unwrap_or(0));
        let updated = family.new.as_ref().map_or(0, |n| status_of(n).replicas);
        let desired_total = sum(&spec_replicas);
        let mut status = DeploymentStatus {
            replicas: Some(replicas),
            updated_replicas: Some(updated),
            ready_replicas: Some(ready),
            available_replicas: Some(available),
            unavailable_replicas: Some((desired_total - available).max(0)),
            observed_generation: deployment.metadata.generation,
            collision_count: notes.collision_count.or(stored.collision_count),
            conditions: stored.conditions.clone(),
            terminating_replicas: None,
        };
        let unavailable = if is_recreate(deployment) { 0 } else { rolling_bounds(deployment).1 };
        let minimum = replicas_of(deployment) - unavailable;
        let condition = if available >= minimum {
            new_condition(
                CONDITION_AVAILABLE,
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".to_owned(),
            )
        } else {
            new_condition(
                CONDITION_AVAILABLE,
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".to_owned(),
            )
        };
        set_condition(&mut status, condition);
        if let Some(progressing) = notes.progressing.clone() {
            set_condition(&mut status, progressing);
        }
        status
    }

    /// The Progressing condition of a pass that may roll: complete, progressing, or out of
    /// time. Returns when the deadline falls if the rollout is still under way.
    fn rollout_conditions(
        deployment: &Deployment,
        family: &Family,
        status: &mut DeploymentStatus,
    ) -> Option<Timestamp> {
        let stored = deployment.status.clone().unwrap_or_default();
        if !has_progress_deadline(deployment) {
            if let Some(conditions) = status.conditions.as_mut() {
                conditions.retain(|c| c.type_ != CONDITION_PROGRESSING);
            }
            return None;
        }
        let set_name = family.new.as_ref().map(|n| name_of(&n.metadata).to_owned());
        let about = set_name.as_ref().map_or_else(
            || format!("Deployment {:?}", name_of(&deployment.metadata)),
            |n| format!("ReplicaSet {n:?}"),
        );
        let current = condition(status, CONDITION_PROGRESSING).cloned();
        let already_complete = status.replicas == status.updated_replicas
            && current
                .as_ref()
                .is_some_and(|c| c.reason.as_deref() == Some(REASON_NEW_SET_AVAILABLE));
        if !already_complete {
            if is_complete(deployment, status) {
                set_condition(
                    status,
                    new_condition(
                        CONDITION_PROGRESSING,
                        "True",
                        REASON_NEW_SET_AVAILABLE,
                        format!("{about} has successfully progressed."),
                    ),
                );
            } else if made_progress(&stored, status) {
                // Progress refreshes the condition's update time, which the deadline counts
                // from; a True condition keeps its transition time.
                let mut progressing = new_condition(
                    CONDITION_PROGRESSING,
                    "True",
                    REASON_SET_UPDATED,
                    format!("{about} is progressing."),
                );
                if let Some(current) = current.filter(|c| c.status == "True") {
                    progressing.last_transition_time = current.last_transition_time;
                }
                if let Some(conditions) = status.conditions.as_mut() {
                    conditions.retain(|c| c.type_ != CONDITION_PROGRESSING);
                }
                status.conditions.get_or_insert_with(Vec::new).push(progressing);
            } else if timed_out(deployment, status, precise_now()) {
                set_condition(
                    status,
                    new_condition(
                        CONDITION_PROGRESSING,
                        "False",
                        REASON_DEADLINE_EXCEEDED,
                        format!("{about} has timed out progressing."),
                    ),
                );
            }
        }
        if is_complete(deployment, status) {
            return None;
        }
        // Nothing is timed for a rollout already reported out of time, nor for a deployment
        // that only grew after completing (Kubernetes leaves that one complete).
        match condition(status, CONDITION_PROGRESSING)?.reason.as_deref() {
            Some(REASON_DEADLINE_EXCEEDED | REASON_NEW_SET_AVAILABLE) => None,
            _ => deadline_of(deployment, status).filter(|at| *at > precise_now()),
        }
    }

    /// Paused and resumed deployments say so in their Progressing condition (a reported
    /// timeout stays).
    fn paused_conditions(deployment: &Deployment, status: &mut DeploymentStatus) {
        if !has_progress_deadline(deployment) {
            return;
        }
        let reason = condition(status, CONDITION_PROGRESSING).and_then(|c| c.reason.clone());
        if reason.as_deref() == Some(REASON_DEADLINE_EXCEEDED) {
            return;
        }
        let paused = deployment.spec.as_ref().and_then(|s| s.paused) == Some(true);
        let shown = reason.as_deref() == Some(REASON_PAUSED);
        if paused && !shown {
            set_condition(
                status,
                new_condition(
                    CONDITION_PROGRESSING,
                    "Unknown",
                    REASON_PAUSED,
                    "Deployment is paused".to_owned(),
                ),
            );
        } else if !paused && shown {
            set_condition(
                status,
                new_condition(
                    CONDITION_PROGRESSING,
                    "Unknown",
                    REASON_RESUMED,
                    "Deployment is resumed".to_owned(),
                ),
            );
        }
    }

    /// Writes the deployment's revision annotation (its new set's) and its status, each only
    /// when it changed.
    async fn write_back(
        &mut self,
        deployment: &Deployment,
        family: &Family,
        status: DeploymentStatus,
    ) -> Result<(), ApiError> {
        let namespace = deployment.metadata.namespace.as_deref();
        let name = name_of(&deployment.metadata);
        let wanted_revision =
            family.new.as_ref().map(revision).filter(|r| *r > 0).map(|r| r.to_string());
        let stored_revision = deployment
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REVISION_ANNOTATION))
            .cloned();
        if wanted_revision.is_some() && wanted_revision != stored_revision {
            let revision = wanted_revision.unwrap_or_default();
            let updated = self
                .registry
                .deployments
                .update(namespace, name, UpdateMode::Main, false, |current| {
                    let mut next = current.clone();
                    next.metadata
                        .annotations
                        .get_or_insert_with(BTreeMap::new)
                        .insert(REVISION_ANNOTATION.to_owned(), revision.clone());
                    Ok(next)
                })
                .await?;
            self.deployments.record_write(updated);
        }
        if deployment.status.as_ref() != Some(&status) {
            let generation = deployment.metadata.generation;
            let updated = self
                .registry
                .deployments
                .update(namespace, name, UpdateMode::Status, false, |current| {
                    // Computed for this generation: a newer one gets its own pass.
                    if current.metadata.generation != generation {
                        return Err(ApiError::Conflict {
                            resource: "deployments".to_owned(),
                            name: name.to_owned(),
                            message: "the deployment changed during the pass".to_owned(),
                        });
                    }
                    let mut next = current.clone();
                    next.status = Some(status.clone());
                    Ok(next)
                })
                .await?;
            self.deployments.record_write(updated);
        }
        Ok(())
    }

    async fn reconcile_deployment(&mut self, key: &DeploymentKey) -> Result<(), ApiError> {
        self.due.remove(key);
        let cache_key = self.deployments.kind().key(Some(&key.0), &key.1);
        let Some(deployment) = self.deployments.get(&cache_key).cloned() else { return Ok(()) };
        // Being deleted: its sets go with it by garbage collection, not by this controller.
        if deployment.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let mut family = self.family(&deployment).await?;
        let mut notes = PassNotes::default();
        let paused = deployment.spec.as_ref().and_then(|s| s.paused) == Some(true);
        if paused || Self::is_scaling_event(&deployment, &family) {
            self.sync_new_set(&deployment, &mut family, false, &mut notes).await?;
            self.scale(&deployment, &mut family).await?;
            if paused {
                self.prune_history(&deployment, &family).await?;
            }
            let mut status = Self::calculate_status(&deployment, &family, &notes);
            Self::paused_conditions(&deployment, &mut status);
            return self.write_back(&deployment, &family, status).await;
        }
        if is_recreate(&deployment) {
            self.recreate(&deployment, &mut family, &mut notes).await?;
        } else {
            self.roll(&deployment, &mut family, &mut notes).await?;
        }
        let mut status = Self::calculate_status(&deployment, &family, &notes);
        if is_complete(&deployment, &status) {
            self.prune_history(&deployment, &family).await?;
        }
        if let Some(at) = Self::rollout_conditions(&deployment, &family, &mut status) {
            self.due.insert(key.clone(), at);
        }
        self.write_back(&deployment, &family, status).await
    }
}

fn key_of(meta: &ObjectMeta) -> DeploymentKey {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

fn owner_reference(deployment: &Deployment) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".to_owned(),
        kind: "Deployment".to_owned(),
        name: name_of(&deployment.metadata).to_owned(),
        uid: uid_of(&deployment.metadata).to_owned(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Copies the deployment's own annotations onto a replica set (change-cause among them).
fn copy_annotations(deployment: &Deployment, set: &mut ReplicaSet) {
    let annotations = set.metadata.annotations.get_or_insert_with(BTreeMap::new);
    for (key, value) in deployment.metadata.annotations.iter().flatten() {
        if !NOT_COPIED.contains(&key.as_str()) {
            annotations.insert(key.clone(), value.clone());
        }
    }
}

/// How many pods the new set may have now: up to the deployment's replicas, within the surge
/// over every pod the family may have (Recreate: all of them at once).
fn new_set_replicas(deployment: &Deployment, family: &Family, current: i32) -> i32 {
    let replicas = replicas_of(deployment);
    if is_recreate(deployment) {
        return replicas;
    }
    let (surge, _) = rolling_bounds(deployment);
    let counted: i32 = family.all().map(|s| family.counted(s)).sum();
    let room = replicas + surge - counted;
    if room <= 0 {
        return current;
    }
    current + room.min(replicas - current)
}

/// The replica set of the deployment's current template, with zero replicas.
fn new_replica_set(
    deployment: &Deployment,
    collision_count: Option<i32>,
    revision: i64,
) -> ReplicaSet {
    let spec = deployment.spec.clone().unwrap_or_default();
    let hash = template_hash(&spec.template, collision_count);
    let mut template = spec.template.clone();
    let template_meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    template_meta
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(POD_TEMPLATE_HASH_LABEL.to_owned(), hash.clone());
    let labels = template_meta.labels.clone();
    let mut selector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(POD_TEMPLATE_HASH_LABEL.to_owned(), hash.clone());
    let (surge, _) = if is_recreate(deployment) { (0, 0) } else { rolling_bounds(deployment) };
    let replicas = replicas_of(deployment);
    let mut set = ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{}-{hash}", name_of(&deployment.metadata))),
            namespace: deployment.metadata.namespace.clone(),
            labels,
            annotations: Some(BTreeMap::from([
                (REVISION_ANNOTATION.to_owned(), revision.to_string()),
                (DESIRED_REPLICAS_ANNOTATION.to_owned(), replicas.to_string()),
                (MAX_REPLICAS_ANNOTATION.to_owned(), (replicas + surge).to_string()),
            ])),
            owner_references: Some(vec![owner_reference(deployment)]),
            ..ObjectMeta::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(0),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        }),
        status: None,
    };
    copy_annotations(deployment, &mut set);
    set
}

#[async_trait]
impl Reconciler for DeploymentController {
    fn name(&self) -> &'static str {
        "deployment"
    }

    async fn resync(&mut self) -> Result<(), ApiError> {
        self.deployments.resync().await?;
        self.sets.resync().await?;
        self.pods.resync().await
    }

    async fn next_change(&mut self) -> Result<(), ApiError> {
        tokio::select! {
            changed = self.deployments.next_change() => changed?,
            changed = self.sets.next_change() => changed?,
            changed = self.pods.next_change() => changed?,
        }
        self.changed = true;
        Ok(())
    }

    async fn drain_ready(&mut self) -> Result<(), ApiError> {
        self.deployments.drain_ready().await?;
        self.sets.drain_ready().await?;
        self.pods.drain_ready().await
    }

    async fn reconcile(&mut self) -> Result<(), ApiError> {
        let complete = self.collect_dirty();
        if !complete || !std::mem::take(&mut self.changed) {
            let every = self.every_deployment();
            self.dirty.extend(every);
        }
        let now = precise_now();
        let come: Vec<DeploymentKey> =
            self.due.iter().filter(|(_, at)| **at <= now).map(|(k, _)| k.clone()).collect();
        self.dirty.extend(come);
        let targets = std::mem::take(&mut self.dirty);
        let mut first_error = None;
        for key in targets {
            if let Err(error) = self.reconcile_deployment(&key).await {
                tracing::debug!(namespace = key.0, deployment = key.1, %error, "deployment not converged");
                self.dirty.insert(key);
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn requeue_after(&self) -> Option<Duration> {
        let at = self.due.values().min()?;
        let wait = at.duration_since(precise_now());
        Some(Duration::try_from(wait).unwrap_or_default() + Duration::from_millis(10))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use serde_json::json;

    use std::collections::HashMap;

    use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};

    use super::{DeploymentController, Family, precise_now, same_template, template_hash};

    /// A 3-replica deployment (deadline 60 s) whose stored status has 2 pods, all updated and
    /// available, and a Progressing condition last updated at `updated` with `reason`.
    fn deployment_at(reason: &str, updated: &str) -> (Deployment, DeploymentStatus) {
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": 2},
            "spec": {"replicas": 3, "progressDeadlineSeconds": 60,
                     "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}}},
            "status": {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2,
                       "readyReplicas": 2, "availableReplicas": 2,
                       "conditions": [{"type": "Progressing", "status": "True", "reason": reason,
                                       "lastUpdateTime": updated, "lastTransitionTime": updated}]},
        }))
        .unwrap();
        let status = deployment.status.clone().unwrap();
        (deployment, status)
    }

    fn reason(status: &DeploymentStatus) -> String {
        let conditions = status.conditions.as_ref().unwrap();
        let progressing = conditions.iter().find(|c| c.type_ == "Progressing").unwrap();
        progressing.reason.clone().unwrap()
    }

    #[test]
    fn a_stalled_rollout_times_out_once_and_a_fresh_one_is_woken_at_its_deadline() {
        let family = Family { new: None, old: Vec::new(), pods: HashMap::new() };
        let long_ago = "2020-01-01T00:00:00Z";
        // No progress since long ago: out of time, and nothing more to wait for.
        let (deployment, mut status) = deployment_at("ReplicaSetUpdated", long_ago);
        let wake = DeploymentController::rollout_conditions(&deployment, &family, &mut status);
        assert_eq!((reason(&status), wake), ("ProgressDeadlineExceeded".to_owned(), None));
        // Grown after completing: stays complete, nothing timed (no pass every few ms).
        let (deployment, mut status) = deployment_at("NewReplicaSetAvailable", long_ago);
        let wake = DeploymentController::rollout_conditions(&deployment, &family, &mut status);
        assert_eq!((reason(&status), wake), ("NewReplicaSetAvailable".to_owned(), None));
        // Progress just now: woken a second past the deadline.
        let now = strait_time_now();
        let (deployment, mut status) = deployment_at("ReplicaSetUpdated", &now);
        let wake = DeploymentController::rollout_conditions(&deployment, &family, &mut status)
            .expect("a deadline to wake up at");
        assert_eq!(reason(&status), "ReplicaSetUpdated");
        let wait = wake.duration_since(precise_now()).as_secs_f64();
        assert!((58.0..=61.0).contains(&wait), "woken in {wait} s");
    }

    fn strait_time_now() -> String {
        serde_json::to_value(crate::api::typed::current_time())
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn template(image: &str) -> PodTemplateSpec {
        serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": image}]},
        }))
        .unwrap()
    }

    #[test]
    fn hashes_are_stable_differ_by_template_and_by_collision_count() {
        let one = template_hash(&template("a"), None);
        assert_eq!(one, template_hash(&template("a"), None));
        assert_ne!(one, template_hash(&template("b"), None));
        assert_ne!(one, template_hash(&template("a"), Some(1)));
        assert!(one.bytes().all(|b| super::HASH_ALPHABET.contains(&b)), "{one}");
    }

    #[test]
    fn templates_compare_without_their_hash_label() {
        let mut labelled = template("a");
        labelled
            .metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert("pod-template-hash".into(), "xyz".into());
        assert!(same_template(&labelled, &template("a")));
        assert!(!same_template(&labelled, &template("b")));
    }
}
