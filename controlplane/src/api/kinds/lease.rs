//! Leases (`coordination.k8s.io/v1`): a holder and the time it last renewed its claim. Node
//! agents keep one per node in `kube-node-lease` (name = node name) and renew it every few
//! seconds: it is the node's heartbeat, far cheaper than a write of the whole Node status, and
//! what the node lifecycle controller watches. `kubectl describe node` reads it too.

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use serde_json::Value;

use crate::api::{
    error::FieldError,
    kind::{KindInfo, Strategy},
    table::{self, Column},
    validation::NameRule,
};

/// The namespace of the nodes' leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// The only coordinated leader election strategy Kubernetes defines (`spec.strategy`).
const STRATEGIES: [&str; 1] = ["OldestEmulationVersion"];

const INFO: KindInfo = KindInfo {
    // A lease has a spec only: what it says is written by its holder.
    has_status: false,
    ..KindInfo::of::<Lease>("lease", true, &[], NameRule::Subdomain)
};

/// Where leases live in the store.
pub fn key_prefix() -> String {
    INFO.key_prefix()
}

/// The store key of a node's lease.
pub fn node_lease_key(node: &str) -> String {
    INFO.key(Some(NODE_LEASE_NAMESPACE), node)
}

#[derive(Debug, Default)]
pub struct LeaseStrategy;

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("Holder", "The identity that holds the lease"),
    Column::new("Age", "Time since the lease was created"),
];

/// `ValidateLeaseSpec`: positive durations, non-negative transitions, a known strategy that a
/// preferred holder needs.
fn validate_spec(spec: &LeaseSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(duration) = spec.lease_duration_seconds.filter(|d| *d <= 0) {
        errors.push(FieldError::invalid(
            "spec.leaseDurationSeconds",
            duration,
            "must be greater than 0",
        ));
    }
    if let Some(transitions) = spec.lease_transitions.filter(|t| *t < 0) {
        errors.push(FieldError::invalid(
            "spec.leaseTransitions",
            transitions,
            "must be greater than or equal to 0",
        ));
    }
    match spec.strategy.as_deref() {
        Some(strategy) if !STRATEGIES.contains(&strategy) => {
            errors.push(FieldError::not_supported("spec.strategy", strategy, &STRATEGIES));
        }
        None if spec.preferred_holder.as_deref().is_some_and(|h| !h.is_empty()) => {
            errors.push(FieldError::required(
                "spec.strategy",
                "Strategy must be specified when preferredHolder is set",
            ));
        }
        _ => {}
    }
    errors
}

#[async_trait]
impl Strategy for LeaseStrategy {
    type Object = Lease;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn prepare_for_status_update(&self, _new: &mut Lease, _old: &Lease) {
        // No status subresource: never called.
    }

    fn validate(&self, lease: &Lease) -> Vec<FieldError> {
        lease.spec.as_ref().map(validate_spec).unwrap_or_default()
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, lease: &Lease) -> Vec<Value> {
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
        vec![
            lease.metadata.name.clone().unwrap_or_default().into(),
            holder.filter(|h| !h.is_empty()).unwrap_or_else(|| "<none>".to_owned()).into(),
            table::age(lease.metadata.creation_timestamp.as_ref()).into(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::Lease;
    use serde_json::json;

    use super::LeaseStrategy;
    use crate::api::kind::Strategy;

    fn fields(spec: serde_json::Value) -> Vec<String> {
        let lease: Lease = serde_json::from_value(json!({"spec": spec})).expect("a lease");
        LeaseStrategy.validate(&lease).into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn durations_must_be_positive_and_a_preferred_holder_needs_a_strategy() {
        assert!(fields(json!({"holderIdentity": "node-1", "leaseDurationSeconds": 40})).is_empty());
        assert_eq!(
            fields(json!({"leaseDurationSeconds": 0, "leaseTransitions": -1})),
            ["spec.leaseDurationSeconds", "spec.leaseTransitions"]
        );
        assert_eq!(fields(json!({"preferredHolder": "a"})), ["spec.strategy"]);
        assert_eq!(fields(json!({"strategy": "Newest"})), ["spec.strategy"]);
    }
}
