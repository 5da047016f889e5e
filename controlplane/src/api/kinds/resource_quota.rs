//! ResourceQuotas (core/v1) and the admission that enforces them on pod creation.
//!
//! Enforced resources: `pods` (also `count/pods`), `requests.cpu` (also `cpu`) and
//! `requests.memory` (also `memory`). A pod create that would take a namespace past any quota
//! is refused with 403 and Kubernetes' message (`exceeded quota: q, requested: pods=1, used:
//! pods=2, limited: pods=2`). Usage is counted from the namespace's live pods in the store at
//! admission time, and the create transaction also rewrites every quota of the namespace
//! (its `status.used`) under a compare on the quota's revision: two creates that race for
//! the last unit cannot both pass, one retries and sees the other's pod.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use k8s_openapi::{
    api::core::v1::{Pod, ResourceQuota, ResourceQuotaStatus},
    apimachinery::pkg::api::resource::Quantity,
};
use serde_json::Value;

use crate::{
    api::{
        error::{ApiError, FieldError},
        kind::{KindInfo, Strategy, TxnExtras},
        kinds::pod::{is_terminated, key_prefix as pod_key_prefix},
        table::{self, Column},
        typed::decode_object,
        validation::NameRule,
    },
    scheduler::fit::pod_requests,
    store::{Compare, Op, Store},
};

const INFO: KindInfo =
    KindInfo::of::<ResourceQuota>("resourcequota", true, &["quota"], NameRule::Subdomain);

/// The resources enforced, each with the names that mean it (the first is canonical).
const ENFORCED: [&[&str]; 3] =
    [&["pods", "count/pods"], &["requests.cpu", "cpu"], &["requests.memory", "memory"]];

pub fn key_prefix() -> String {
    INFO.key_prefix()
}

#[derive(Debug, Default)]
pub struct ResourceQuotaStrategy;

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("Age", "Time since the quota was created"),
    Column::new("Request", "Used and hard limits of requests"),
    Column::new("Limit", "Used and hard limits of limits"),
];

/// A quota resource's amount in the unit admission counts in (pods, millicores, bytes).
fn amount(resource: &str, quantity: &str) -> Option<u64> {
    let scale = if resource.ends_with("cpu") { 1000.0 } else { 1.0 };
    crate::api::quantity::scaled(quantity, scale)
}

fn format_amount(resource: &str, amount: u64) -> String {
    if resource.ends_with("cpu") {
        if amount.is_multiple_of(1000) { (amount / 1000).to_string() } else { format!("{amount}m") }
    } else {
        amount.to_string()
    }
}

/// What the namespace's pods use, per canonical resource, plus what `new_pod` would add.
fn usage(pods: &[Pod]) -> BTreeMap<&'static str, u64> {
    let mut used = BTreeMap::from([("pods", 0), ("requests.cpu", 0), ("requests.memory", 0)]);
    for pod in pods.iter().filter(|p| !is_terminated(p)) {
        let requests = pod_requests(pod);
        *used.entry("pods").or_default() += 1;
        *used.entry("requests.cpu").or_default() += requests.cpu_milli;
        *used.entry("requests.memory").or_default() += requests.memory;
    }
    used
}

#[async_trait]
impl Strategy for ResourceQuotaStrategy {
    type Object = ResourceQuota;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn prepare_for_create(&self, quota: &mut ResourceQuota) {
        let hard = quota.spec.as_ref().and_then(|s| s.hard.clone());
        quota.status = Some(ResourceQuotaStatus { hard, used: None });
    }

    fn prepare_for_update(&self, new: &mut ResourceQuota, old: &ResourceQuota) {
        let mut status = old.status.clone().unwrap_or_default();
        status.hard = new.spec.as_ref().and_then(|s| s.hard.clone());
        new.status = Some(status);
    }

    fn prepare_for_status_update(&self, new: &mut ResourceQuota, old: &ResourceQuota) {
        new.metadata = old.metadata.clone();
        new.spec = old.spec.clone();
    }

    fn validate(&self, quota: &ResourceQuota) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let hard = quota.spec.as_ref().and_then(|s| s.hard.as_ref());
        for (resource, quantity) in hard.into_iter().flatten() {
            let path = format!("spec.hard[{resource}]");
            if !ENFORCED.iter().any(|names| names.contains(&resource.as_str())) {
                let supported: Vec<&str> =
                    ENFORCED.iter().flat_map(|n| n.iter().copied()).collect();
                errors.push(FieldError::not_supported(path, resource.as_str(), &supported));
            } else if amount(resource, &quantity.0).is_none() {
                errors.push(FieldError::invalid(
                    path,
                    quantity.0.as_str(),
                    "must be a non-negative quantity",
                ));
            }
        }
        errors
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, quota: &ResourceQuota) -> Vec<Value> {
        let status = quota.status.clone().unwrap_or_default();
        let hard = status.hard.unwrap_or_default();
        let used = status.used.unwrap_or_default();
        let request = hard
            .iter()
            .map(|(resource, limit)| {
                let now = used.get(resource).map_or("0", |q| q.0.as_str());
                format!("{resource}: {now}/{}", limit.0)
            })
            .collect::<Vec<_>>()
            .join(", ");
        vec![
            quota.metadata.name.clone().unwrap_or_default().into(),
            table::age(quota.metadata.creation_timestamp.as_ref()).into(),
            request.into(),
            "".into(),
        ]
    }
}

/// Admission of a new pod against every quota of its namespace: refuses it with 403 when it
/// would exceed one, else returns the writes that record the new usage under a compare on
/// each quota's revision.
pub async fn admit_pod(store: &dyn Store, pod: &Pod) -> Result<TxnExtras, ApiError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let quotas = store
        .list(&format!("{}{namespace}/", key_prefix()))
        .await
        .map_err(ApiError::store("reading the namespace's resource quotas"))?;
    let mut extras = TxnExtras::default();
    if quotas.items.is_empty() {
        return Ok(extras);
    }
    let pods = store
        .list(&format!("{}{namespace}/", pod_key_prefix()))
        .await
        .map_err(ApiError::store("reading the namespace's pods"))?;
    let pods: Vec<Pod> = pods
        .items
        .iter()
        .map(|kv| decode_object::<Pod>(&kv.value, kv.mod_revision, &kv.key))
        .collect::<Result<_, _>>()?;
    let used = usage(&pods);
    let wanted = usage(std::slice::from_ref(pod));
    for kv in &quotas.items {
        let mut quota: ResourceQuota = decode_object(&kv.value, kv.mod_revision, &kv.key)?;
        let name = quota.metadata.name.clone().unwrap_or_default();
        let hard = quota.spec.as_ref().and_then(|s| s.hard.clone()).unwrap_or_default();
        let mut exceeded = Vec::new();
        let mut used_after: BTreeMap<String, Quantity> = BTreeMap::new();
        for (resource, limit) in &hard {
            let Some(canonical) =
                ENFORCED.iter().find(|n| n.contains(&resource.as_str())).map(|n| n[0])
            else {
                continue;
            };
            let Some(limit) = amount(resource, &limit.0) else { continue };
            let (now, more) = (used[canonical], wanted[canonical]);
            if more > 0 && now + more > limit {
                exceeded.push((resource.clone(), now, more, limit));
            }
            used_after.insert(resource.clone(), Quantity(format_amount(resource, now + more)));
        }
        if !exceeded.is_empty() {
            let list = |pick: fn(&(String, u64, u64, u64)) -> u64| {
                exceeded
                    .iter()
                    .map(|e| format!("{}={}", e.0, format_amount(&e.0, pick(e))))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let message = format!(
                "exceeded quota: {name}, requested: {}, used: {}, limited: {}",
                list(|e| e.2),
                list(|e| e.1),
                list(|e| e.3)
            );
            return Err(ApiError::Forbidden {
                resource: "pods".to_owned(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                message,
                cause: None,
            });
        }
        let mut status = quota.status.take().unwrap_or_default();
        status.hard = Some(hard);
        status.used = Some(used_after);
        quota.status = Some(status);
        quota.metadata.resource_version = None;
        let value = serde_json::to_vec(&quota)
            .map(Bytes::from)
            .map_err(|e| ApiError::internal("encoding a resource quota", e))?;
        extras
            .compares
            .push(Compare::ModRevision { key: kv.key.clone(), revision: kv.mod_revision });
        extras.ops.push(Op::Put { key: kv.key.clone(), value });
    }
    Ok(extras)
}

#[cfg(test)]
mod tests {
    use super::{amount, format_amount};

    #[test]
    fn cpu_counts_in_millicores_and_prints_back_as_given() {
        assert_eq!(amount("requests.cpu", "1"), Some(1000));
        assert_eq!(amount("cpu", "250m"), Some(250));
        assert_eq!(amount("pods", "3"), Some(3));
        assert_eq!(format_amount("requests.cpu", 1500), "1500m");
        assert_eq!(format_amount("requests.cpu", 2000), "2");
        assert_eq!(format_amount("requests.memory", 1024), "1024");
    }
}
