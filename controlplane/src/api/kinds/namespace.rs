//! Namespaces: cluster-scoped, RFC 1123 label names. Deleting one marks it Terminating; the
//! namespace controller deletes its content and then removes it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Namespace, NamespaceSpec, NamespaceStatus};
use serde_json::Value;

use crate::{
    api::{
        error::{ApiError, FieldError},
        kind::{DeletePlan, DeleteRequest, KindInfo, Strategy, TxnExtras},
        table::{self, Column},
        typed::current_time,
        validation::NameRule,
    },
    store::Store,
};

pub const NAMESPACE_ACTIVE: &str = "Active";
pub const NAMESPACE_TERMINATING: &str = "Terminating";
/// The finalizer Kubernetes puts in `spec.finalizers`: the namespace controller's.
pub const KUBERNETES_FINALIZER: &str = "kubernetes";
/// The label every namespace carries with its own name, so selectors can pick namespaces.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The namespaces that exist from the first start and cannot be deleted.
pub const SYSTEM_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

const INFO: KindInfo = KindInfo::of::<Namespace>("namespace", false, &["ns"], NameRule::Label);

/// The store key of a namespace.
pub fn namespace_key(name: &str) -> String {
    INFO.key(None, name)
}

pub fn is_terminating(namespace: &Namespace) -> bool {
    namespace.metadata.deletion_timestamp.is_some()
        || namespace.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(NAMESPACE_TERMINATING)
}

#[derive(Debug, Default)]
pub struct NamespaceStrategy;

const COLUMNS: &[Column] = &[
    Column::name_column(),
    Column::new("Status", "The status of the namespace"),
    Column::new("Age", "Time since the namespace was created"),
];

#[async_trait]
impl Strategy for NamespaceStrategy {
    type Object = Namespace;

    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn default(&self, namespace: &mut Namespace) {
        if let Some(name) = namespace.metadata.name.clone() {
            namespace
                .metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert(NAME_LABEL.to_owned(), name);
        }
        let status = namespace.status.get_or_insert_with(NamespaceStatus::default);
        if status.phase.as_deref().unwrap_or_default().is_empty() {
            status.phase = Some(NAMESPACE_ACTIVE.to_owned());
        }
    }

    fn prepare_for_create(&self, namespace: &mut Namespace) {
        namespace.status = Some(NamespaceStatus {
            phase: Some(NAMESPACE_ACTIVE.to_owned()),
            ..NamespaceStatus::default()
        });
        let spec = namespace.spec.get_or_insert_with(NamespaceSpec::default);
        let finalizers = spec.finalizers.get_or_insert_with(Vec::new);
        if !finalizers.iter().any(|f| f == KUBERNETES_FINALIZER) {
            finalizers.push(KUBERNETES_FINALIZER.to_owned());
        }
    }

    fn prepare_for_update(&self, new: &mut Namespace, old: &Namespace) {
        new.status = old.status.clone();
        // Finalizers change only through the namespace's own lifecycle.
        new.spec = old.spec.clone();
    }

    fn prepare_for_status_update(&self, new: &mut Namespace, old: &Namespace) {
        new.metadata = old.metadata.clone();
        new.spec = old.spec.clone();
    }

    fn validate(&self, namespace: &Namespace) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(phase) = namespace.status.as_ref().and_then(|s| s.phase.as_deref())
            && phase != NAMESPACE_ACTIVE
            && phase != NAMESPACE_TERMINATING
        {
            errors.push(FieldError::not_supported(
                "status.phase",
                phase,
                &[NAMESPACE_ACTIVE, NAMESPACE_TERMINATING],
            ));
        }
        errors
    }

    async fn plan_delete(
        &self,
        _store: &dyn Store,
        namespace: &Namespace,
        _request: &DeleteRequest,
    ) -> Result<DeletePlan<Namespace>, ApiError> {
        let name = namespace.metadata.name.clone().unwrap_or_default();
        if SYSTEM_NAMESPACES.contains(&name.as_str()) {
            return Err(ApiError::Forbidden {
                resource: "namespaces".to_owned(),
                name,
                message: "this namespace may not be deleted".to_owned(),
                cause: None,
            });
        }
        // Once the namespace controller has finalized it (emptied `spec.finalizers`), it goes.
        let finalized =
            namespace.spec.as_ref().and_then(|s| s.finalizers.as_ref()).is_none_or(Vec::is_empty);
        if is_terminating(namespace) {
            return Ok(if finalized {
                DeletePlan::Remove(TxnExtras::default())
            } else {
                DeletePlan::Unchanged
            });
        }
        let mut terminating = namespace.clone();
        terminating.metadata.deletion_timestamp = Some(current_time());
        terminating.metadata.deletion_grace_period_seconds = Some(0);
        terminating.status.get_or_insert_with(NamespaceStatus::default).phase =
            Some(NAMESPACE_TERMINATING.to_owned());
        Ok(DeletePlan::Update(terminating))
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn row(&self, namespace: &Namespace) -> Vec<Value> {
        vec![
            namespace.metadata.name.clone().unwrap_or_default().into(),
            namespace.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default().into(),
            table::age(namespace.metadata.creation_timestamp.as_ref()).into(),
        ]
    }

    fn selectable_fields(&self) -> &'static [&'static str] {
        &["status.phase"]
    }

    fn field_value(&self, namespace: &Namespace, field: &str) -> String {
        match field {
            "status.phase" => {
                namespace.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default()
            }
            _ => String::new(),
        }
    }
}
