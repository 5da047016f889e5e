//! What makes a kind servable: its names and scope ([`KindInfo`]) and its [`Strategy`] for
//! defaults, validation, the spec/status split, deletion and printing. Handlers, storage and
//! watch are written once, generically; a new kind (Service, EndpointSlice, Deployment…) is a
//! new strategy registered with the API server.

use async_trait::async_trait;
use k8s_openapi::{Metadata, Resource, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{
    error::{ApiError, FieldError},
    table::Column,
    typed::TypedKind,
    validation::NameRule,
};
use crate::store::{Compare, Op, Store};

/// The names and scope of a kind, as discovery publishes them.
#[derive(Clone, Debug)]
pub struct KindInfo {
    /// API group, empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// Plural resource name, the URL segment (`pods`).
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub name_rule: NameRule,
    /// Whether the kind has a `/status` subresource (then the main resource cannot change
    /// status and `/status` cannot change anything else).
    pub has_status: bool,
    /// Subresources that accept POST, with the kind of their body (`binding` → `Binding`).
    pub post_subresources: &'static [(&'static str, &'static str)],
    /// Whether the kind has a `/scale` subresource (`autoscaling/v1` `Scale`), served
    /// through [`Strategy::scale`] and [`Strategy::set_replicas`].
    pub has_scale: bool,
}

impl KindInfo {
    /// Builds the names from the k8s-openapi type's constants.
    pub const fn of<K: Resource>(
        singular: &'static str,
        namespaced: bool,
        short_names: &'static [&'static str],
        name_rule: NameRule,
    ) -> Self {
        Self {
            group: K::GROUP,
            version: K::VERSION,
            kind: K::KIND,
            plural: K::URL_PATH_SEGMENT,
            singular,
            namespaced,
            short_names,
            categories: &[],
            name_rule,
            has_status: true,
            post_subresources: &[],
            has_scale: false,
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Every object of the kind lives under this store prefix.
    pub fn key_prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/registry/{}/", self.plural)
        } else {
            format!("/registry/{}/{}/", self.group, self.plural)
        }
    }

    /// The prefix of one namespace's objects, or of all objects with `None`.
    pub fn collection_prefix(&self, namespace: Option<&str>) -> String {
        match namespace.filter(|_| self.namespaced) {
            Some(namespace) => format!("{}{namespace}/", self.key_prefix()),
            None => self.key_prefix(),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.collection_prefix(namespace))
    }
}

/// Extra conditions and writes a kind adds to a transaction (a pod CIDR claimed with its
/// node, released with it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnExtras {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

/// What a DELETE asked for (`DeleteOptions` and query parameters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteRequest {
    pub grace_period_seconds: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_resource_version: Option<String>,
    /// What happens to the object's dependents (none given: Background, or what the object's
    /// finalizers already say).
    pub propagation_policy: Option<super::deletion::PropagationPolicy>,
}

/// How a kind carries out a DELETE of one object.
pub enum DeletePlan<K> {
    /// Remove the object now, together with these extra writes.
    Remove(TxnExtras),
    /// Keep the object and store this version instead (graceful pod deletion, a namespace
    /// becoming Terminating).
    Update(K),
    /// Deletion is already under way and this request does not change it.
    Unchanged,
}

/// What the `/scale` subresource shows of a scalable object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleState {
    pub spec_replicas: i32,
    pub status_replicas: i32,
    /// The pods' label selector in `labelSelector=` text form.
    pub selector: String,
}

/// The per-kind behaviour behind the generic handlers.
#[async_trait]
pub trait Strategy: Send + Sync + Sized + 'static {
    type Object: Resource
        + Metadata<Ty = ObjectMeta>
        + Serialize
        + DeserializeOwned
        + Clone
        + PartialEq
        + std::fmt::Debug
        + Send
        + Sync
        + 'static;

    fn info(&self) -> &KindInfo;

    /// Fills defaulted fields. Runs on every write, so it must be idempotent.
    fn default(&self, _object: &mut Self::Object) {}

    /// Resets what a client may not set at creation (status, server-owned fields).
    fn prepare_for_create(&self, _object: &mut Self::Object) {}

    /// Carries over from the stored object what a write of the main resource may not change
    /// (status, for kinds with a status subresource).
    fn prepare_for_update(&self, _new: &mut Self::Object, _old: &Self::Object) {}

    /// Carries over everything but status for a write of `/status`.
    fn prepare_for_status_update(&self, new: &mut Self::Object, old: &Self::Object);

    /// Kind-specific checks of an object about to be stored (metadata syntax is checked by
    /// the caller).
    fn validate(&self, object: &Self::Object) -> Vec<FieldError>;

    /// Checks of a change to the main resource (immutable fields).
    fn validate_update(&self, _new: &Self::Object, _old: &Self::Object) -> Vec<FieldError> {
        Vec::new()
    }

    /// For kinds whose `metadata.generation` counts spec changes: whether the spec changed.
    /// `None` for kinds without a generation.
    fn spec_changed(&self, _new: &Self::Object, _old: &Self::Object) -> Option<bool> {
        None
    }

    /// Joins the create transaction (claims, guards). Called again on every retry, with a
    /// fresh copy of the object.
    async fn before_create(
        &self,
        _store: &dyn Store,
        _object: &mut Self::Object,
    ) -> Result<TxnExtras, ApiError> {
        Ok(TxnExtras::default())
    }

    /// Decides what a DELETE does; by default the object is removed at once.
    async fn plan_delete(
        &self,
        _store: &dyn Store,
        _object: &Self::Object,
        _request: &DeleteRequest,
    ) -> Result<DeletePlan<Self::Object>, ApiError> {
        Ok(DeletePlan::Remove(TxnExtras::default()))
    }

    /// The columns of `kubectl get`.
    fn columns(&self) -> &'static [Column];

    /// One table row, in the order of [`Strategy::columns`].
    fn row(&self, object: &Self::Object) -> Vec<Value>;

    /// Fields a field selector may use besides `metadata.name` and `metadata.namespace`.
    fn selectable_fields(&self) -> &'static [&'static str] {
        &[]
    }

    /// The value of a selectable field (empty when unset).
    fn field_value(&self, _object: &Self::Object, _field: &str) -> String {
        String::new()
    }

    /// For kinds with [`KindInfo::has_scale`]: the replica counts and selector of an object.
    fn scale(&self, _object: &Self::Object) -> Option<ScaleState> {
        None
    }

    /// For kinds with [`KindInfo::has_scale`]: sets the desired replica count.
    fn set_replicas(&self, _object: &mut Self::Object, _replicas: i32) {}

    /// Handles a POST to one of [`KindInfo::post_subresources`]; answers the created object.
    async fn post_subresource(
        &self,
        _kind: &TypedKind<Self>,
        _namespace: Option<&str>,
        _name: &str,
        _subresource: &str,
        _body: &[u8],
    ) -> Result<Value, ApiError> {
        Err(ApiError::UnknownPath)
    }
}
