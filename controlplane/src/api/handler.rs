//! The kind-independent face of a [`TypedKind`]: request bodies in, JSON (or Table) out. The
//! HTTP layer routes every resource request to a `dyn KindHandler`, so registering a kind is
//! all it takes to serve it.

use std::sync::Arc;

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::{
    Metadata,
    api::autoscaling::v1::{Scale, ScaleSpec, ScaleStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

use super::{
    error::ApiError,
    json_patch::{self, JsonPatchError},
    kind::{DeleteRequest, KindInfo, Strategy},
    managed_fields::{Manager, OPERATION_APPLY},
    merge_patch,
    metadata::MetadataAccess,
    patch_schema::kind_schema,
    selectors::FieldSelector,
    server_side_apply::{self, Applied, Conflict},
    strategic_merge,
    table::{self, ResponseFormat, Row},
    typed::{
        FieldOwnership, ListFilter, TypedKind, UpdateMode, WatchItem, WatchStart, WriteContext,
        current_time,
    },
};
use crate::store::Revision;

/// The annotation of the bookmark that ends the initial events of a streaming list.
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// What `fieldValidation` asks of unknown and duplicate fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    /// Dropped silently.
    Ignore,
    /// Dropped, with a `Warning` header each (Kubernetes' default).
    #[default]
    Warn,
    /// The request fails with 400.
    Strict,
}

/// Options of a write request (query parameters).
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub field_validation: FieldValidation,
    /// `dryRun=All`: validate and answer, store nothing.
    pub dry_run: bool,
    /// `fieldValidation=Strict`: unknown fields are an error rather than dropped.
    pub strict_fields: bool,
    /// The field manager of the write (`fieldManager`, else the client's `User-Agent` up to
    /// its first `/`); `None` records no ownership.
    pub field_manager: Option<String>,
    /// Whether `fieldManager` was given explicitly (server-side apply requires it).
    pub field_manager_given: bool,
    /// `force=true`: a server-side apply takes conflicting fields from their owners.
    pub force: bool,
}

impl WriteOptions {
    fn context(&self, ownership: FieldOwnership) -> WriteContext {
        WriteContext { dry_run: self.dry_run, ownership }
    }

    /// The context of a client's create, replace or patch: its changes are its manager's.
    fn update_context(&self) -> WriteContext {
        self.context(match &self.field_manager {
            Some(manager) => FieldOwnership::Update(manager.clone()),
            None => FieldOwnership::Untracked,
        })
    }
}

/// The page a list asks for (`limit`, `continue`).
#[derive(Clone, Debug, Default)]
pub struct PageRequest {
    /// At most this many objects; `None` for all.
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

/// What a write answers: the object, whether it was created (201) rather than changed, and
/// warnings for the client (`Warning` headers).
#[derive(Debug)]
pub struct Written {
    pub object: Value,
    pub created: bool,
    pub warnings: Vec<String>,
}

/// A PATCH body, by its media type.
#[derive(Clone, Debug)]
pub enum PatchBody {
    /// `application/merge-patch+json` (RFC 7386).
    Merge(Value),
    /// `application/strategic-merge-patch+json`.
    Strategic(Value),
    /// `application/json-patch+json` (RFC 6902).
    Json(Value),
    /// `application/apply-patch+yaml`: server-side apply of this configuration.
    Apply(Value),
}

impl PatchBody {
    /// Applies the patch to `document`, the stored object as JSON.
    pub fn apply_to(&self, document: &mut Value, kind: &str) -> Result<(), ApiError> {
        match self {
            Self::Merge(patch) => {
                if !patch.is_object() {
                    return Err(ApiError::BadRequest(
                        "a merge patch of an object must be a JSON object".to_owned(),
                    ));
                }
                merge_patch::apply(document, patch);
            }
            Self::Strategic(patch) => {
                *document = strategic_merge::apply(document, patch, kind_schema(kind))
                    .map_err(|e| ApiError::BadRequest(format!("the strategic merge patch: {e}")))?;
            }
            Self::Json(patch) => json_patch::apply(document, patch).map_err(|e| match e {
                JsonPatchError::Malformed(_) => ApiError::BadRequest(e.to_string()),
                JsonPatchError::NotApplicable { .. } => ApiError::PatchNotApplicable(e.to_string()),
            })?,
            Self::Apply(_) => {
                return Err(ApiError::internal(
                    "applying a configuration as a patch",
                    std::io::Error::other("server-side apply is not a patch of a document"),
                ));
            }
        }
        Ok(())
    }
}

/// One watch event, ready to encode.
#[derive(Debug)]
pub struct WatchEventOut {
    pub event_type: &'static str,
    pub object: Value,
    /// The revision of the object, for bookmarks (None for errors).
    pub revision: Option<Revision>,
}

#[async_trait]
pub trait KindHandler: Send + Sync {
    fn info(&self) -> &KindInfo;
    fn check_field_selector(&self, fields: &FieldSelector) -> Result<(), ApiError>;
    async fn create(
        &self,
        namespace: Option<&str>,
        body: &[u8],
        options: WriteOptions,
    ) -> Result<Written, ApiError>;
    async fn get(
        &self,
        namespace: Option<&str>,
        name: &str,
        format: ResponseFormat,
    ) -> Result<Value, ApiError>;
    async fn list(
        &self,
        namespace: Option<&str>,
        filter: &ListFilter,
        page: &PageRequest,
        format: ResponseFormat,
    ) -> Result<Value, ApiError>;
    async fn watch(
        &self,
        namespace: Option<&str>,
        filter: ListFilter,
        start: WatchStart,
        format: ResponseFormat,
    ) -> Result<(Revision, BoxStream<'static, WatchEventOut>), ApiError>;
    async fn replace(
        &self,
        namespace: Option<&str>,
        name: &str,
        body: &[u8],
        status: bool,
        options: WriteOptions,
    ) -> Result<Written, ApiError>;
    /// A PATCH; a server-side apply may create the object.
    async fn patch(
        &self,
        namespace: Option<&str>,
        name: &str,
        patch: &PatchBody,
        status: bool,
        options: WriteOptions,
    ) -> Result<Written, ApiError>;
    async fn delete(
        &self,
        namespace: Option<&str>,
        name: &str,
        request: &DeleteRequest,
        options: WriteOptions,
    ) -> Result<Value, ApiError>;
    async fn post_subresource(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: &[u8],
    ) -> Result<Value, ApiError>;
    /// A BOOKMARK event's object at `revision`.
    fn bookmark(&self, revision: Revision, format: ResponseFormat) -> Value;
    /// The kind's objects through their metadata (garbage collection, namespace deletion).
    fn metadata_access(&self) -> &dyn MetadataAccess;
    /// The `/scale` subresource of an object (`autoscaling/v1` `Scale`); a kind without one
    /// answers 404.
    async fn get_scale(&self, _namespace: Option<&str>, _name: &str) -> Result<Value, ApiError> {
        Err(ApiError::UnknownPath)
    }
    /// Writes the `/scale` subresource: only `spec.replicas` changes.
    async fn write_scale(
        &self,
        _namespace: Option<&str>,
        _name: &str,
        _write: ScaleWrite<'_>,
        _options: WriteOptions,
    ) -> Result<Value, ApiError> {
        Err(ApiError::UnknownPath)
    }
}

/// A write of a `/scale` subresource.
#[derive(Clone, Copy, Debug)]
pub enum ScaleWrite<'a> {
    /// PUT: the body is a whole `Scale`.
    Replace(&'a [u8]),
    /// PATCH: a patch of the current `Scale`.
    Patch(&'a PatchBody),
}

/// Decodes a request body into `K`: malformed JSON and type mismatches are BadRequest,
/// unknown fields are dropped (or, with `strict`, a BadRequest naming them).
pub fn decode_body<K: DeserializeOwned + Serialize>(
    body: &[u8],
    kind: &str,
    strict: bool,
) -> Result<K, ApiError> {
    let (object, unknown) = decode_reporting::<K>(body, kind, strict)?;
    if strict && !unknown.is_empty() {
        let listed: Vec<String> = unknown.iter().map(|f| unknown_field_message(f)).collect();
        return Err(ApiError::BadRequest(format!("strict decoding error: {}", listed.join(", "))));
    }
    Ok(object)
}

fn unknown_field_message(field: &str) -> String {
    format!("unknown field \"{field}\"")
}

/// Decodes a body into `K` as `options.field_validation` asks: unknown fields are an error
/// (Strict), a warning added to `warnings` (Warn), or dropped (Ignore).
fn decode_validated<K: DeserializeOwned + Serialize>(
    body: &[u8],
    kind: &str,
    options: &WriteOptions,
    warnings: &mut Vec<String>,
) -> Result<K, ApiError> {
    match options.field_validation {
        FieldValidation::Strict => decode_body(body, kind, true),
        FieldValidation::Ignore => decode_body(body, kind, false),
        FieldValidation::Warn => {
            let (object, unknown) = decode_reporting::<K>(body, kind, true)?;
            warnings.extend(unknown.iter().map(|f| unknown_field_message(f)));
            Ok(object)
        }
    }
}

/// Decodes a body into `K`, with the paths of the fields decoding dropped when `report`.
fn decode_reporting<K: DeserializeOwned + Serialize>(
    body: &[u8],
    kind: &str,
    report: bool,
) -> Result<(K, Vec<String>), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(format!(
            "the request body must be a JSON object ({kind})"
        )));
    }
    let object: K = serde_json::from_value(value.clone()).map_err(|e| {
        ApiError::BadRequest(format!("the request body is not a valid {kind}: {e}"))
    })?;
    let mut unknown = Vec::new();
    if report {
        let normalized = serde_json::to_value(&object)
            .map_err(|e| ApiError::internal(format!("encoding a {kind}"), e))?;
        unknown_fields(&value, &normalized, "", &mut unknown);
    }
    Ok((object, unknown))
}

/// The paths of object members a JSON document has more than once (`metadata.name`), which
/// a decoder would silently collapse to the last one.
pub fn duplicate_fields(body: &[u8]) -> Vec<String> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};

    struct Scan<'a> {
        path: String,
        found: &'a mut Vec<String>,
    }

    impl<'de> DeserializeSeed<'de> for Scan<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Scan<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let Scan { path, found } = self;
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                if !seen.insert(key) {
                    found.push(child.clone());
                }
                map.next_value_seed(Scan { path: child, found: &mut *found })?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let Scan { path, found } = self;
            let mut index = 0;
            while seq
                .next_element_seed(Scan { path: format!("{path}[{index}]"), found: &mut *found })?
                .is_some()
            {
                index += 1;
            }
            Ok(())
        }
    }

    let mut found = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    // A malformed body is reported by the decoder itself.
    let _ = Scan { path: String::new(), found: &mut found }.deserialize(&mut deserializer);
    found
}

/// Paths of `input` that decoding dropped (present in the input, absent once normalized).
fn unknown_fields(input: &Value, normalized: &Value, path: &str, out: &mut Vec<String>) {
    match (input, normalized) {
        (Value::Object(input), Value::Object(normalized)) => {
            for (key, value) in input {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match normalized.get(key) {
                    Some(inner) => unknown_fields(value, inner, &child, out),
                    None if value.is_null() => {}
                    None => out.push(child),
                }
            }
        }
        (Value::Array(input), Value::Array(normalized)) => {
            for (index, (value, inner)) in input.iter().zip(normalized).enumerate() {
                unknown_fields(value, inner, &format!("{path}[{index}]"), out);
            }
        }
        _ => {}
    }
}

fn to_json<T: Serialize>(object: &T, what: &str) -> Result<Value, ApiError> {
    serde_json::to_value(object).map_err(|e| ApiError::internal(format!("encoding {what}"), e))
}

/// The [`KindHandler`] of a typed kind.
pub struct Handler<S: Strategy> {
    kind: Arc<TypedKind<S>>,
}

impl<S: Strategy> Handler<S> {
    pub fn new(kind: Arc<TypedKind<S>>) -> Self {
        Self { kind }
    }

    /// Server-side apply of `config` by the request's field manager: merged into the stored
    /// object, or creating it when there is none.
    async fn apply(
        &self,
        namespace: Option<&str>,
        name: &str,
        config: &Value,
        status: bool,
        options: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let info = self.info();
        let manager_name = match &options.field_manager {
            Some(manager) if options.field_manager_given => manager.clone(),
            _ => {
                return Err(ApiError::BadRequest(
                    "fieldManager is required for apply requests (application/apply-patch+yaml)"
                        .to_owned(),
                ));
            }
        };
        check_apply_config(config, info, namespace, name)?;
        let api_version = info.api_version();
        let manager = Manager {
            name: &manager_name,
            operation: OPERATION_APPLY,
            api_version: &api_version,
            subresource: status.then_some("status"),
        };
        let tracked = info.has_status.then_some(status);
        let schema = kind_schema(info.kind);
        let warnings = std::sync::Mutex::new(Vec::new());
        let decode = |document: &Value| -> Result<S::Object, ApiError> {
            let body = serde_json::to_vec(document)
                .map_err(|e| ApiError::internal("encoding the applied object", e))?;
            let mut found = Vec::new();
            let object: S::Object = decode_validated(&body, info.kind, options, &mut found)?;
            check_identity(&object, namespace, name, info.namespaced)?;
            if let Ok(mut warnings) = warnings.lock() {
                *warnings = found;
            }
            Ok(object)
        };
        let warnings_of = || warnings.lock().map(|w| w.clone()).unwrap_or_default();
        let context = options.context(FieldOwnership::Given);
        let mode = if status { UpdateMode::Status } else { UpdateMode::Main };
        for _ in 0..APPLY_ATTEMPTS {
            if self.kind.get_opt(namespace, name).await?.is_none() {
                if status {
                    return Err(ApiError::NotFound {
                        resource: info.plural.to_owned(),
                        name: name.to_owned(),
                    });
                }
                let mut document = match server_side_apply::apply(
                    &json!({}),
                    config,
                    schema,
                    &manager,
                    options.force,
                    tracked,
                    current_time(),
                ) {
                    Applied::Object(document) => document,
                    Applied::Conflicts(conflicts) => {
                        return Err(self.apply_conflict(name, conflicts));
                    }
                };
                document["metadata"]["name"] = json!(name);
                match self.kind.create_with(namespace, decode(&document)?, &context).await {
                    Ok(created) => {
                        return Ok(Written {
                            object: to_json(&created, self.plural())?,
                            created: true,
                            warnings: warnings_of(),
                        });
                    }
                    // Created meanwhile: apply to it.
                    Err(ApiError::AlreadyExists { .. }) => continue,
                    Err(error) => return Err(error),
                }
            }
            let result = self
                .kind
                .update_with(namespace, name, mode, &context, |current| {
                    let live = to_json(current, info.kind)?;
                    match server_side_apply::apply(
                        &live,
                        config,
                        schema,
                        &manager,
                        options.force,
                        tracked,
                        current_time(),
                    ) {
                        Applied::Object(document) => decode(&document),
                        Applied::Conflicts(conflicts) => Err(self.apply_conflict(name, conflicts)),
                    }
                })
                .await;
            match result {
                Ok(updated) => {
                    return Ok(Written {
                        object: to_json(&updated, self.plural())?,
                        created: false,
                        warnings: warnings_of(),
                    });
                }
                // Deleted meanwhile: create it.
                Err(ApiError::NotFound { .. }) if !status => continue,
                Err(error) => return Err(error),
            }
        }
        Err(ApiError::Conflict {
            resource: info.plural.to_owned(),
            name: name.to_owned(),
            message: "the object kept being created and deleted while it was applied".to_owned(),
        })
    }

    fn apply_conflict(&self, name: &str, conflicts: Vec<Conflict>) -> ApiError {
        ApiError::ApplyConflict {
            resource: self.plural().to_owned(),
            name: name.to_owned(),
            conflicts: conflicts
                .into_iter()
                .map(|c| {
                    (format!("conflict with \"{}\" using {}", c.manager, c.api_version), c.field)
                })
                .collect(),
        }
    }

    fn plural(&self) -> &'static str {
        self.kind.strategy().info().plural
    }

    fn render(
        &self,
        objects: &[S::Object],
        format: ResponseFormat,
        revision: Option<Revision>,
        as_list: bool,
    ) -> Result<Value, ApiError> {
        let info = self.kind.strategy().info();
        match format {
            ResponseFormat::Json if as_list => {
                let items = objects
                    .iter()
                    .map(|o| to_json(o, self.plural()))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut metadata = json!({});
                if let Some(revision) = revision {
                    metadata["resourceVersion"] = revision.to_string().into();
                }
                Ok(json!({
                    "kind": info.list_kind(),
                    "apiVersion": info.api_version(),
                    "metadata": metadata,
                    "items": items,
                }))
            }
            ResponseFormat::Json => match objects.first() {
                Some(object) => to_json(object, self.plural()),
                None => Ok(Value::Null),
            },
            ResponseFormat::Table { api_version, include_object } => {
                let rows = objects
                    .iter()
                    .map(|object| {
                        Ok(Row {
                            cells: self.kind.strategy().row(object),
                            object: to_json(object, self.plural())?,
                        })
                    })
                    .collect::<Result<Vec<_>, ApiError>>()?;
                let revision = match revision {
                    Some(revision) => Some(revision.to_string()),
                    None => objects.first().and_then(|o| o.metadata().resource_version.clone()),
                };
                Ok(table::build(
                    api_version,
                    self.kind.strategy().columns(),
                    rows,
                    revision.as_deref(),
                    include_object,
                ))
            }
        }
    }

    /// The `Scale` of an object, with the object's identity and resourceVersion.
    fn scale_of(&self, object: &S::Object) -> Result<Scale, ApiError> {
        let state = self.kind.strategy().scale(object).ok_or(ApiError::UnknownPath)?;
        let meta = object.metadata();
        Ok(Scale {
            metadata: ObjectMeta {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                uid: meta.uid.clone(),
                resource_version: meta.resource_version.clone(),
                creation_timestamp: meta.creation_timestamp.clone(),
                ..ObjectMeta::default()
            },
            spec: Some(ScaleSpec { replicas: Some(state.spec_replicas) }),
            status: Some(ScaleStatus {
                replicas: state.status_replicas,
                selector: Some(state.selector).filter(|s| !s.is_empty()),
            }),
        })
    }

    fn scale_json(&self, object: &S::Object) -> Result<Value, ApiError> {
        let mut value = to_json(&self.scale_of(object)?, "scale")?;
        value["kind"] = "Scale".into();
        value["apiVersion"] = "autoscaling/v1".into();
        Ok(value)
    }

    fn watch_event(&self, item: WatchItem<S::Object>, format: ResponseFormat) -> WatchEventOut {
        let event_type = item.event_type();
        let object = match item {
            WatchItem::Added(object) | WatchItem::Modified(object) | WatchItem::Deleted(object) => {
                object
            }
            WatchItem::Error(error) => {
                return WatchEventOut { event_type, object: error.to_status(), revision: None };
            }
            WatchItem::InitialEventsEnd(revision) => {
                let mut object = self.bookmark(revision, format);
                object["metadata"]["annotations"] = json!({INITIAL_EVENTS_END: "true"});
                return WatchEventOut { event_type, object, revision: Some(revision) };
            }
        };
        let revision =
            object.metadata().resource_version.as_deref().and_then(|v| v.parse::<Revision>().ok());
        match self.render(std::slice::from_ref(&object), format, None, false) {
            Ok(object) => WatchEventOut { event_type, object, revision },
            Err(error) => {
                WatchEventOut { event_type: "ERROR", object: error.to_status(), revision: None }
            }
        }
    }
}

#[async_trait]
impl<S: Strategy> KindHandler for Handler<S> {
    fn info(&self) -> &KindInfo {
        self.kind.strategy().info()
    }

    fn check_field_selector(&self, fields: &FieldSelector) -> Result<(), ApiError> {
        self.kind.check_field_selector(fields)
    }

    async fn create(
        &self,
        namespace: Option<&str>,
        body: &[u8],
        options: WriteOptions,
    ) -> Result<Written, ApiError> {
        let mut warnings = Vec::new();
        let object: S::Object = decode_validated(body, self.info().kind, &options, &mut warnings)?;
        let created = self.kind.create_with(namespace, object, &options.update_context()).await?;
        Ok(Written { object: to_json(&created, self.plural())?, created: true, warnings })
    }

    async fn get(
        &self,
        namespace: Option<&str>,
        name: &str,
        format: ResponseFormat,
    ) -> Result<Value, ApiError> {
        let object = self.kind.get(namespace, name).await?;
        self.render(&[object], format, None, false)
    }

    async fn list(
        &self,
        namespace: Option<&str>,
        filter: &ListFilter,
        page: &PageRequest,
        format: ResponseFormat,
    ) -> Result<Value, ApiError> {
        let page = self
            .kind
            .list_page(namespace, filter, page.limit, page.continue_token.as_deref())
            .await?;
        let mut list = self.render(&page.items, format, Some(page.revision), true)?;
        if let Some(token) = page.continue_token {
            list["metadata"]["continue"] = Value::String(token);
        }
        if let Some(remaining) = page.remaining {
            list["metadata"]["remainingItemCount"] = Value::from(remaining);
        }
        Ok(list)
    }

    async fn watch(
        &self,
        namespace: Option<&str>,
        filter: ListFilter,
        start: WatchStart,
        format: ResponseFormat,
    ) -> Result<(Revision, BoxStream<'static, WatchEventOut>), ApiError> {
        let (revision, items) = self.kind.watch(namespace, filter, start).await?;
        let handler = Handler { kind: Arc::clone(&self.kind) };
        let events = items.map(move |item| handler.watch_event(item, format)).boxed();
        Ok((revision, events))
    }

    async fn replace(
        &self,
        namespace: Option<&str>,
        name: &str,
        body: &[u8],
        status: bool,
        options: WriteOptions,
    ) -> Result<Written, ApiError> {
        let mut warnings = Vec::new();
        let object: S::Object = decode_validated(body, self.info().kind, &options, &mut warnings)?;
        check_identity(&object, namespace, name, self.info().namespaced)?;
        let mode = if status { UpdateMode::Status } else { UpdateMode::Main };
        let updated = self
            .kind
            .update_with(namespace, name, mode, &options.update_context(), |_| Ok(object.clone()))
            .await?;
        Ok(Written { object: to_json(&updated, self.plural())?, created: false, warnings })
    }

    async fn patch(
        &self,
        namespace: Option<&str>,
        name: &str,
        patch: &PatchBody,
        status: bool,
        options: WriteOptions,
    ) -> Result<Written, ApiError> {
        if let PatchBody::Apply(config) = patch {
            return self.apply(namespace, name, config, status, &options).await;
        }
        let kind = self.info().kind;
        let mode = if status { UpdateMode::Status } else { UpdateMode::Main };
        let mut warnings = Vec::new();
        let updated = self
            .kind
            .update_with(namespace, name, mode, &options.update_context(), |current| {
                let mut document = to_json(current, kind)?;
                patch.apply_to(&mut document, kind)?;
                let body = serde_json::to_vec(&document)
                    .map_err(|e| ApiError::internal("encoding the patched object", e))?;
                // Each attempt reports the warnings of its own result.
                warnings.clear();
                let patched: S::Object = decode_validated(&body, kind, &options, &mut warnings)?;
                check_identity(&patched, namespace, name, self.info().namespaced)?;
                Ok(patched)
            })
            .await?;
        Ok(Written { object: to_json(&updated, self.plural())?, created: false, warnings })
    }

    async fn delete(
        &self,
        namespace: Option<&str>,
        name: &str,
        request: &DeleteRequest,
        options: WriteOptions,
    ) -> Result<Value, ApiError> {
        let object = self.kind.delete(namespace, name, request, options.dry_run).await?;
        to_json(&object, self.plural())
    }

    async fn post_subresource(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        self.kind.strategy().post_subresource(&self.kind, namespace, name, subresource, body).await
    }

    fn metadata_access(&self) -> &dyn MetadataAccess {
        self.kind.as_ref()
    }

    async fn get_scale(&self, namespace: Option<&str>, name: &str) -> Result<Value, ApiError> {
        if !self.info().has_scale {
            return Err(ApiError::UnknownPath);
        }
        self.scale_json(&self.kind.get(namespace, name).await?)
    }

    async fn write_scale(
        &self,
        namespace: Option<&str>,
        name: &str,
        write: ScaleWrite<'_>,
        options: WriteOptions,
    ) -> Result<Value, ApiError> {
        if !self.info().has_scale {
            return Err(ApiError::UnknownPath);
        }
        let updated = self
            .kind
            .update_with(namespace, name, UpdateMode::Main, &options.update_context(), |current| {
                let scale: Scale = match write {
                    ScaleWrite::Replace(body) => decode_body(body, "Scale", options.strict_fields)?,
                    ScaleWrite::Patch(patch) => {
                        let mut document = self.scale_json(current)?;
                        patch.apply_to(&mut document, "Scale")?;
                        let body = serde_json::to_vec(&document)
                            .map_err(|e| ApiError::internal("encoding the patched scale", e))?;
                        decode_body(&body, "Scale", options.strict_fields)?
                    }
                };
                check_identity(&scale, namespace, name, self.info().namespaced)?;
                let mut new = current.clone();
                // A resourceVersion in the Scale is a precondition on the object's.
                if let Some(version) = scale.metadata.resource_version.filter(|v| !v.is_empty()) {
                    new.metadata_mut().resource_version = Some(version);
                }
                // An absent `spec.replicas` is zero, as Go's omitempty int32 decodes it.
                let replicas = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
                self.kind.strategy().set_replicas(&mut new, replicas);
                Ok(new)
            })
            .await?;
        self.scale_json(&updated)
    }

    fn bookmark(&self, revision: Revision, format: ResponseFormat) -> Value {
        let info = self.info();
        match format {
            ResponseFormat::Json => json!({
                "kind": info.kind,
                "apiVersion": info.api_version(),
                "metadata": {"resourceVersion": revision.to_string()},
            }),
            ResponseFormat::Table { api_version, include_object } => table::build(
                api_version,
                self.kind.strategy().columns(),
                Vec::new(),
                Some(&revision.to_string()),
                include_object,
            ),
        }
    }
}

/// How often an apply retries when the object is created or deleted between its read and its
/// write.
const APPLY_ATTEMPTS: usize = 4;

/// An applied configuration must name the kind it is sent to and the object of the URL.
fn check_apply_config(
    config: &Value,
    info: &KindInfo,
    namespace: Option<&str>,
    name: &str,
) -> Result<(), ApiError> {
    if !config.is_object() {
        return Err(ApiError::BadRequest(format!(
            "an applied configuration must be an object ({})",
            info.kind
        )));
    }
    let api_version = info.api_version();
    match config.get("apiVersion").and_then(Value::as_str) {
        Some(given) if given == api_version => {}
        given => {
            return Err(ApiError::BadRequest(format!(
                "the API version in the applied configuration ({}) does not match the expected API version ({api_version})",
                given.unwrap_or("none")
            )));
        }
    }
    match config.get("kind").and_then(Value::as_str) {
        Some(given) if given == info.kind => {}
        given => {
            return Err(ApiError::BadRequest(format!(
                "the kind in the applied configuration ({}) does not match the expected kind ({})",
                given.unwrap_or("none"),
                info.kind
            )));
        }
    }
    let metadata = config.get("metadata");
    if let Some(given) = metadata.and_then(|m| m.get("name")).and_then(Value::as_str)
        && given != name
    {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    if info.namespaced
        && let (Some(given), Some(namespace)) =
            (metadata.and_then(|m| m.get("namespace")).and_then(Value::as_str), namespace)
        && !given.is_empty()
        && given != namespace
    {
        return Err(ApiError::BadRequest(
            "the namespace of the provided object does not match the namespace sent on the request"
                .to_owned(),
        ));
    }
    Ok(())
}

/// The name and namespace in a body must be those of the URL (or empty).
fn check_identity<K: Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
    object: &K,
    namespace: Option<&str>,
    name: &str,
    namespaced: bool,
) -> Result<(), ApiError> {
    let meta = object.metadata();
    if let Some(given) = meta.name.as_deref().filter(|n| !n.is_empty())
        && given != name
    {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    if namespaced
        && let (Some(given), Some(namespace)) =
            (meta.namespace.as_deref().filter(|n| !n.is_empty()), namespace)
        && given != namespace
    {
        return Err(ApiError::BadRequest(
            "the namespace of the provided object does not match the namespace sent on \
                     the request"
                .to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;

    use super::{decode_body, duplicate_fields};
    use crate::api::error::ApiError;

    #[test]
    fn malformed_json_is_a_bad_request() {
        let error = decode_body::<Pod>(b"{\"metadata\": ", "Pod", false).unwrap_err();
        assert!(matches!(error, ApiError::BadRequest(_)), "{error}");
    }

    #[test]
    fn unknown_fields_are_dropped_or_refused_when_strict() {
        let body = br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","colour":"red"},
                        "spec":{"containers":[{"name":"c","image":"i","flavour":1}]}}"#;
        let pod: Pod = decode_body(body, "Pod", false).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("a"));
        let error = decode_body::<Pod>(body, "Pod", true).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("unknown field \"metadata.colour\""), "{message}");
        assert!(message.contains("unknown field \"spec.containers[0].flavour\""), "{message}");
    }

    #[test]
    fn a_body_of_another_kind_is_a_bad_request() {
        let body = br#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"a"}}"#;
        assert!(matches!(decode_body::<Pod>(body, "Pod", false), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn duplicate_members_are_found_with_their_paths() {
        let body = br#"{"metadata":{"name":"a","labels":{"x":"1","x":"2"},"name":"b"},
                        "spec":{"containers":[{"name":"c"},{"name":"d","name":"e"}]}}"#;
        assert_eq!(
            duplicate_fields(body),
            ["metadata.labels.x", "metadata.name", "spec.containers[1].name"]
        );
        assert!(duplicate_fields(br#"{"a":{"b":1},"c":{"b":2}}"#).is_empty());
        assert!(duplicate_fields(b"{\"a\":").is_empty(), "malformed bodies are the decoder's");
    }
}
