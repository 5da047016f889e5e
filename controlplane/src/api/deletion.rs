//! Deletion as Kubernetes defines it for every kind, around each kind's own
//! [`Strategy::plan_delete`]:
//!
//! - an object with `metadata.finalizers` is not removed by a DELETE: it gets a
//!   `deletionTimestamp` (and `deletionGracePeriodSeconds: 0`) and stays, readable and
//!   updatable, until updates have emptied its finalizers; the update that removes the last one
//!   removes the object (with the writes the kind's deletion makes, such as releasing a cluster
//!   IP). Once deleting, finalizers may only be removed, never added;
//! - `propagationPolicy` (or the legacy `orphanDependents`) of the DELETE adds the garbage
//!   collector's finalizers: `Orphan` the `orphan` finalizer (its dependents' ownerReferences
//!   to it are removed first), `Foreground` the `foregroundDeletion` finalizer (it goes after
//!   its blocking dependents). `Background` adds none: it goes at once and the garbage
//!   collector deletes its dependents afterwards.
//!
//! Graceful deletion (a pod with a grace period) composes with this: such an object is
//! removed once its grace is over (`deletionGracePeriodSeconds: 0`) and no finalizer is left.

use k8s_openapi::{Metadata, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use super::{
    error::{ApiError, FieldError},
    kind::{DeletePlan, DeleteRequest, Strategy, TxnExtras},
    typed::current_time,
    validation,
};
use crate::store::Store;

/// The garbage collector's finalizer of an object whose dependents are orphaned.
pub const ORPHAN_FINALIZER: &str = "orphan";
/// The garbage collector's finalizer of an object deleted in the foreground.
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// How a DELETE treats the object's dependents (`DeleteOptions.propagationPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropagationPolicy {
    Orphan,
    Background,
    Foreground,
}

impl PropagationPolicy {
    pub const NAMES: [&str; 3] = ["Foreground", "Background", "Orphan"];

    pub fn parse(text: &str) -> Result<Self, ApiError> {
        match text {
            "Orphan" => Ok(Self::Orphan),
            "Background" => Ok(Self::Background),
            "Foreground" => Ok(Self::Foreground),
            other => Err(ApiError::Invalid {
                kind: "DeleteOptions".to_owned(),
                name: String::new(),
                causes: vec![FieldError::not_supported("propagationPolicy", other, &Self::NAMES)],
            }),
        }
    }

    /// The policy of a DELETE: `propagationPolicy`, else the legacy `orphanDependents`.
    pub fn of_request(
        policy: Option<&str>,
        orphan_dependents: Option<bool>,
    ) -> Result<Option<Self>, ApiError> {
        match (policy, orphan_dependents) {
            (Some(_), Some(_)) => Err(ApiError::Invalid {
                kind: "DeleteOptions".to_owned(),
                name: String::new(),
                causes: vec![FieldError::invalid(
                    "propagationPolicy",
                    policy.unwrap_or_default(),
                    "orphanDependents and deletionPropagation cannot be both set",
                )],
            }),
            (Some(text), None) => Self::parse(text).map(Some),
            (None, Some(true)) => Ok(Some(Self::Orphan)),
            (None, Some(false)) => Ok(Some(Self::Background)),
            (None, None) => Ok(None),
        }
    }
}

fn finalizers(meta: &ObjectMeta) -> &[String] {
    meta.finalizers.as_deref().unwrap_or_default()
}

pub fn has_finalizer(meta: &ObjectMeta, finalizer: &str) -> bool {
    finalizers(meta).iter().any(|f| f == finalizer)
}

/// The finalizers an object has after a DELETE with `policy`: a policy replaces the other
/// policies' finalizers with its own; no policy leaves them as they are.
fn finalizers_for(meta: &ObjectMeta, policy: Option<PropagationPolicy>) -> Vec<String> {
    let mut wanted = finalizers(meta).to_vec();
    let Some(policy) = policy else { return wanted };
    wanted.retain(|f| f != ORPHAN_FINALIZER && f != FOREGROUND_FINALIZER);
    match policy {
        PropagationPolicy::Orphan => wanted.push(ORPHAN_FINALIZER.to_owned()),
        PropagationPolicy::Foreground => wanted.push(FOREGROUND_FINALIZER.to_owned()),
        PropagationPolicy::Background => {}
    }
    wanted
}

fn set_finalizers(meta: &mut ObjectMeta, wanted: Vec<String>) {
    meta.finalizers = if wanted.is_empty() { None } else { Some(wanted) };
}

/// What a DELETE does to `object`: the kind's plan, held back by finalizers and with the
/// finalizers of the request's propagation policy.
pub async fn plan<S: Strategy>(
    strategy: &S,
    store: &dyn Store,
    object: &S::Object,
    request: &DeleteRequest,
) -> Result<DeletePlan<S::Object>, ApiError> {
    let meta = object.metadata();
    let wanted = finalizers_for(meta, request.propagation_policy);
    let changed = wanted.as_slice() != finalizers(meta);
    Ok(match strategy.plan_delete(store, object, request).await? {
        DeletePlan::Remove(extras) if wanted.is_empty() => DeletePlan::Remove(extras),
        DeletePlan::Remove(_) => {
            let mut held = object.clone();
            let held_meta = held.metadata_mut();
            if held_meta.deletion_timestamp.is_none() {
                held_meta.deletion_timestamp = Some(current_time());
                held_meta.generation = held_meta.generation.map(|g| g + 1);
            }
            held_meta.deletion_grace_period_seconds = Some(0);
            set_finalizers(held_meta, wanted);
            if held == *object { DeletePlan::Unchanged } else { DeletePlan::Update(held) }
        }
        DeletePlan::Update(mut new) => {
            set_finalizers(new.metadata_mut(), wanted);
            DeletePlan::Update(new)
        }
        DeletePlan::Unchanged if changed => {
            let mut new = object.clone();
            set_finalizers(new.metadata_mut(), wanted);
            DeletePlan::Update(new)
        }
        DeletePlan::Unchanged => DeletePlan::Unchanged,
    })
}

/// When an update leaves a deleted object with nothing holding it (no finalizer, its grace
/// period over, and its kind agreeing to its removal), the writes that remove it.
pub async fn removal_on_update<S: Strategy>(
    strategy: &S,
    store: &dyn Store,
    new: &S::Object,
) -> Result<Option<TxnExtras>, ApiError> {
    let meta = new.metadata();
    if meta.deletion_timestamp.is_none()
        || !finalizers(meta).is_empty()
        || meta.deletion_grace_period_seconds.is_some_and(|g| g != 0)
    {
        return Ok(None);
    }
    let request = DeleteRequest { grace_period_seconds: Some(0), ..DeleteRequest::default() };
    Ok(match strategy.plan_delete(store, new, &request).await? {
        DeletePlan::Remove(extras) => Some(extras),
        // The kind still holds it (a namespace with content left): it stays.
        DeletePlan::Update(_) | DeletePlan::Unchanged => None,
    })
}

/// Checks of `metadata.finalizers` on every write: qualified names, not both garbage collector
/// policies, and, once deleting (`old` has a deletionTimestamp), none added.
pub fn finalizer_errors(new: &ObjectMeta, old: Option<&ObjectMeta>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let names = finalizers(new);
    for (index, name) in names.iter().enumerate() {
        if let Some(why) = validation::qualified_name(name) {
            errors.push(FieldError::invalid(
                format!("metadata.finalizers[{index}]"),
                name.as_str(),
                why,
            ));
        }
    }
    if has_finalizer(new, ORPHAN_FINALIZER) && has_finalizer(new, FOREGROUND_FINALIZER) {
        errors.push(FieldError::invalid(
            "metadata.finalizers",
            names.join(","),
            format!("finalizer {ORPHAN_FINALIZER} and {FOREGROUND_FINALIZER} cannot be both set"),
        ));
    }
    if let Some(old) = old.filter(|o| o.deletion_timestamp.is_some()) {
        let added: Vec<&str> =
            names.iter().filter(|f| !finalizers(old).contains(f)).map(String::as_str).collect();
        if !added.is_empty() {
            errors.push(FieldError::forbidden(
                "metadata.finalizers",
                format!(
                    "no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                ),
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::{PropagationPolicy, finalizer_errors, finalizers_for};

    fn meta(finalizers: &[&str], deleting: bool) -> ObjectMeta {
        ObjectMeta {
            finalizers: Some(finalizers.iter().map(|f| (*f).to_owned()).collect()),
            deletion_timestamp: deleting.then(crate::api::typed::current_time),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_policy_replaces_the_other_policies_finalizer_and_keeps_the_rest() {
        let with_orphan = meta(&["example.com/keep", "orphan"], false);
        assert_eq!(
            finalizers_for(&with_orphan, Some(PropagationPolicy::Foreground)),
            ["example.com/keep", "foregroundDeletion"]
        );
        assert_eq!(
            finalizers_for(&with_orphan, Some(PropagationPolicy::Background)),
            ["example.com/keep"]
        );
        assert_eq!(finalizers_for(&with_orphan, None), ["example.com/keep", "orphan"]);
        assert!(PropagationPolicy::parse("Sideways").is_err());
        assert_eq!(
            PropagationPolicy::of_request(None, Some(true)).unwrap(),
            Some(PropagationPolicy::Orphan)
        );
        assert!(PropagationPolicy::of_request(Some("Orphan"), Some(true)).is_err());
    }

    #[test]
    fn finalizers_only_shrink_once_deleting() {
        let old = meta(&["example.com/a", "example.com/b"], true);
        let errors = finalizer_errors(&meta(&["example.com/a"], true), Some(&old));
        assert!(errors.is_empty(), "{errors:?}");
        let errors = finalizer_errors(&meta(&["example.com/a", "example.com/c"], true), Some(&old));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "metadata.finalizers");
        assert!(errors[0].detail.contains("example.com/c"), "{errors:?}");

        let alive = meta(&["example.com/a"], false);
        let errors =
            finalizer_errors(&meta(&["example.com/a", "example.com/c"], false), Some(&alive));
        assert!(errors.is_empty(), "adding is fine before deletion: {errors:?}");
        let errors =
            finalizer_errors(&meta(&["orphan", "foregroundDeletion", "bad name!"], false), None);
        assert_eq!(errors.len(), 2, "{errors:?}");
    }
}
