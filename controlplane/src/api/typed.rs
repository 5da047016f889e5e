//! Storage of one kind, generic over its [`Strategy`]: create, read, list, update, delete and
//! watch with the Kubernetes semantics (server-set metadata, optimistic concurrency, defaults
//! and validation on every write). Every write is one store transaction: nothing is half
//! written on any error. The HTTP handlers and the in-process controllers both go through here.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::{
    Metadata,
    api::core::v1::Namespace,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use rand::Rng;

use super::{
    deletion,
    error::{ApiError, FieldError},
    kind::{DeletePlan, DeleteRequest, Strategy, TxnExtras},
    kinds::namespace::{NAMESPACE_TERMINATING, namespace_key},
    managed_fields::{self, Manager, OPERATION_UPDATE},
    pagination::{self, ContinueToken},
    patch_schema::kind_schema,
    selectors::{FieldSelector, LabelSelector},
    validation,
};
use crate::store::{
    Compare, EventKind, KeyValue, Op, Revision, SharedStore, StoreError, TxnOutcome, WatchBatch,
};

/// How often a write is retried when something it depends on (not the object itself, or the
/// object for unconditional writes) changed between its read and its commit.
const MAX_ATTEMPTS: usize = 16;

/// How often a create is retried when an allocation it claims (a pod CIDR, a cluster IP) went
/// to a racing create first. Every round has a winner, so this bounds the creates that can race
/// one another for the same free block; a jittered pause between rounds spreads them out.
const CLAIM_ATTEMPTS: usize = 64;

/// Characters of `generateName` suffixes: no vowels (no accidental words), no look-alikes.
const NAME_SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
const NAME_SUFFIX_LEN: usize = 5;

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateMode {
    /// PUT/PATCH of the object: spec and metadata; status is kept.
    Main,
    /// PUT/PATCH of `/status`: status only.
    Status,
    /// A server-side change made by the API server itself (binding): every field, with
    /// object validation but without the immutability rules meant for clients.
    Internal,
}

/// Who owns the fields a write sets (`metadata.managedFields`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FieldOwnership {
    /// The server's own writes (controllers, defaults): managed fields are carried over
    /// as the new version has them, or kept from the stored one.
    #[default]
    Untracked,
    /// A client's write: the fields it changes become this manager's (`Update` operation).
    Update(String),
    /// The new version carries its managed fields, computed already (server-side apply).
    Given,
}

/// How a write is carried out.
#[derive(Clone, Debug, Default)]
pub struct WriteContext {
    /// `dryRun=All`: everything but the commit.
    pub dry_run: bool,
    pub ownership: FieldOwnership,
}

impl WriteContext {
    pub fn dry_run(dry_run: bool) -> Self {
        Self { dry_run, ownership: FieldOwnership::Untracked }
    }
}

/// One page of a list.
#[derive(Debug)]
pub struct ListPage<K> {
    pub items: Vec<K>,
    /// The revision the list shows (that of its first page).
    pub revision: Revision,
    /// Where the next page starts, when there is one.
    pub continue_token: Option<String>,
    /// How many objects the next pages hold (only for lists without selectors).
    pub remaining: Option<i64>,
}

/// Label and field selectors of a list or watch.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchStart {
    /// Send the current objects as ADDED, then changes (`resourceVersion` unset or "0").
    Now,
    /// As `Now`, with [`WatchItem::InitialEventsEnd`] after the current objects
    /// (`sendInitialEvents=true`).
    NowThenBookmark,
    /// Send the changes after this revision.
    After(Revision),
}

/// One watch notification.
#[derive(Debug)]
pub enum WatchItem<K> {
    Added(K),
    Modified(K),
    Deleted(K),
    /// Every current object has been sent; the watch is at this revision.
    InitialEventsEnd(Revision),
    /// The watch cannot continue (history compacted, store failure); the stream ends.
    Error(ApiError),
}

impl<K> WatchItem<K> {
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Added(_) => "ADDED",
            Self::Modified(_) => "MODIFIED",
            Self::Deleted(_) => "DELETED",
            Self::InitialEventsEnd(_) => "BOOKMARK",
            Self::Error(_) => "ERROR",
        }
    }
}

/// What a conditional write found.
pub enum WriteOutcome<K> {
    Written(K),
    /// The stored object is no longer the version the write was based on.
    Stale,
}

fn now() -> Time {
    Time(now_timestamp())
}

/// The current time, to the second (Kubernetes timestamps carry whole seconds).
pub fn now_timestamp() -> Timestamp {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_secs()).unwrap_or(i64::MAX));
    Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// The revision of an object's `metadata.resourceVersion`, if it has a valid one.
pub fn parse_resource_version(text: &str) -> Result<Revision, ApiError> {
    text.parse().map_err(|_| {
        ApiError::BadRequest(format!("resourceVersion {text:?} is not a valid resource version"))
    })
}

/// One kind's objects in the store.
pub struct TypedKind<S: Strategy> {
    store: SharedStore,
    strategy: Arc<S>,
}

impl<S: Strategy> TypedKind<S> {
    pub fn new(store: SharedStore, strategy: S) -> Self {
        Self { store, strategy: Arc::new(strategy) }
    }

    pub fn strategy(&self) -> &S {
        &self.strategy
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    fn plural(&self) -> &'static str {
        self.strategy.info().plural
    }

    fn namespace_of<'a>(&self, namespace: Option<&'a str>) -> Option<&'a str> {
        namespace.filter(|_| self.strategy.info().namespaced)
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        self.strategy.info().key(self.namespace_of(namespace), name)
    }

    fn not_found(&self, name: &str) -> ApiError {
        ApiError::NotFound { resource: self.plural().to_owned(), name: name.to_owned() }
    }

    fn conflict(&self, name: &str) -> ApiError {
        ApiError::Conflict {
            resource: self.plural().to_owned(),
            name: name.to_owned(),
            message: "the object has been modified; please apply your changes to the latest \
                      version and try again"
                .to_owned(),
        }
    }

    /// Reads a stored object; its resourceVersion is the key's last write.
    pub fn decode(&self, kv: &KeyValue) -> Result<S::Object, ApiError> {
        decode_object::<S::Object>(&kv.value, kv.mod_revision, &kv.key)
    }

    fn encode(&self, object: &S::Object) -> Result<Bytes, ApiError> {
        let mut object = object.clone();
        // The revision of the write is the resourceVersion: it is filled in on every read.
        object.metadata_mut().resource_version = None;
        serde_json::to_vec(&object)
            .map(Bytes::from)
            .map_err(|e| ApiError::internal(format!("encoding {} for the store", self.plural()), e))
    }

    fn invalid(&self, object: &S::Object, causes: Vec<FieldError>) -> ApiError {
        ApiError::Invalid {
            kind: self.strategy.info().kind.to_owned(),
            name: object.metadata().name.clone().unwrap_or_default(),
            causes,
        }
    }

    fn validate(&self, object: &S::Object, extra: Vec<FieldError>) -> Result<(), ApiError> {
        let mut causes = Vec::new();
        validation::object_meta(object.metadata(), self.strategy.info().name_rule, &mut causes);
        causes.extend(self.strategy.validate(object));
        causes.extend(extra);
        if causes.is_empty() { Ok(()) } else { Err(self.invalid(object, causes)) }
    }

    /// Checks that a namespaced object may be created in `namespace`, and returns the compare
    /// that keeps the namespace unchanged (existing, not terminating) until the commit.
    async fn namespace_guard(&self, namespace: &str, name: &str) -> Result<Compare, ApiError> {
        let key = namespace_key(namespace);
        let kv = self
            .store
            .get(&key)
            .await
            .map_err(ApiError::store(format!("reading namespace {namespace}")))?
            .ok_or_else(|| ApiError::NotFound {
                resource: "namespaces".to_owned(),
                name: namespace.to_owned(),
            })?;
        let stored: Namespace = decode_object(&kv.value, kv.mod_revision, &key)?;
        let phase = stored.status.as_ref().and_then(|s| s.phase.as_deref());
        if phase == Some(NAMESPACE_TERMINATING) || stored.metadata.deletion_timestamp.is_some() {
            return Err(ApiError::Forbidden {
                resource: self.plural().to_owned(),
                name: name.to_owned(),
                message: format!(
                    "unable to create new content in namespace {namespace} because it is being terminated"
                ),
                cause: Some((
                    "NamespaceTerminating".to_owned(),
                    format!("namespace {namespace} is being terminated"),
                )),
            });
        }
        Ok(Compare::ModRevision { key, revision: kv.mod_revision })
    }

    /// Creates an object. `namespace` is the request's namespace (ignored for cluster-scoped
    /// kinds). With `dry_run`, everything but the commit happens.
    pub async fn create(
        &self,
        namespace: Option<&str>,
        object: S::Object,
        dry_run: bool,
    ) -> Result<S::Object, ApiError> {
        self.create_with(namespace, object, &WriteContext::dry_run(dry_run)).await
    }

    /// The part of an object field managers own for a write in `mode`.
    fn trackable(
        &self,
        object: &S::Object,
        mode: UpdateMode,
    ) -> Result<serde_json::Value, ApiError> {
        let document = serde_json::to_value(object)
            .map_err(|e| ApiError::internal(format!("encoding {}", self.plural()), e))?;
        let status = self.strategy.info().has_status.then_some(mode == UpdateMode::Status);
        Ok(managed_fields::trackable(&document, status))
    }

    /// Records in `new` the fields `manager` changed from `old` (`None`: created).
    fn record_update(
        &self,
        manager: &str,
        mode: UpdateMode,
        old: Option<&S::Object>,
        new: &mut S::Object,
    ) -> Result<(), ApiError> {
        let info = self.strategy.info();
        let api_version = info.api_version();
        let before = match old {
            Some(old) => self.trackable(old, mode)?,
            None => serde_json::Value::Object(serde_json::Map::new()),
        };
        let after = self.trackable(new, mode)?;
        let manager = Manager {
            name: manager,
            operation: OPERATION_UPDATE,
            api_version: &api_version,
            subresource: (mode == UpdateMode::Status).then_some("status"),
        };
        let managed = managed_fields::record_update(
            new.metadata().managed_fields.as_deref(),
            &before,
            &after,
            Some(kind_schema(info.kind)),
            &manager,
            now(),
        );
        new.metadata_mut().managed_fields = managed;
        Ok(())
    }

    /// Creates an object as [`TypedKind::create`] does, recording field ownership as `context`
    /// says.
    pub async fn create_with(
        &self,
        namespace: Option<&str>,
        mut object: S::Object,
        context: &WriteContext,
    ) -> Result<S::Object, ApiError> {
        let dry_run = context.dry_run;
        let given_fields = match context.ownership {
            FieldOwnership::Given => object.metadata_mut().managed_fields.take(),
            _ => None,
        };
        let info = self.strategy.info();
        let namespace = self.namespace_of(namespace);
        // A generated name that is taken is generated again, as Kubernetes does.
        let mut generated_from: Option<String> = None;
        {
            let meta = object.metadata_mut();
            if info.namespaced {
                let Some(namespace) = namespace else {
                    return Err(ApiError::BadRequest(
                        "a namespace is required to create this kind".to_owned(),
                    ));
                };
                match meta.namespace.as_deref() {
                    None | Some("") => meta.namespace = Some(namespace.to_owned()),
                    Some(given) if given == namespace => {}
                    Some(_) => {
                        return Err(ApiError::BadRequest(
                            "the namespace of the provided object does not match the namespace \
                             sent on the request"
                                .to_owned(),
                        ));
                    }
                }
            } else {
                meta.namespace = None;
            }
            if meta.name.as_deref().unwrap_or_default().is_empty()
                && let Some(prefix) = meta.generate_name.as_deref().filter(|p| !p.is_empty())
            {
                meta.name = Some(format!("{prefix}{}", random_suffix()));
                generated_from = Some(prefix.to_owned());
            }
            reset_server_metadata(meta);
            // `Some(_)` from spec_changed marks a kind whose generation counts spec changes.
            if self.strategy.spec_changed(&object, &object).is_some() {
                object.metadata_mut().generation = Some(1);
            }
        }
        self.strategy.prepare_for_create(&mut object);
        self.strategy.default(&mut object);
        self.validate(&object, deletion::finalizer_errors(object.metadata(), None))?;
        match &context.ownership {
            FieldOwnership::Untracked => {}
            FieldOwnership::Given => object.metadata_mut().managed_fields = given_fields,
            FieldOwnership::Update(manager) => {
                self.record_update(manager, UpdateMode::Main, None, &mut object)?;
            }
        }
        let mut name = object.metadata().name.clone().unwrap_or_default();
        let mut key = self.key(namespace, &name);

        for attempt in 0..CLAIM_ATTEMPTS {
            let mut compares = vec![Compare::Absent { key: key.clone() }];
            if let Some(namespace) = namespace {
                compares.push(self.namespace_guard(namespace, &name).await?);
            }
            let mut candidate = object.clone();
            let extras = self.strategy.before_create(self.store.as_ref(), &mut candidate).await?;
            if dry_run {
                if self.store.get(&key).await.map_err(ApiError::store("reading"))?.is_some() {
                    return Err(ApiError::AlreadyExists {
                        resource: self.plural().to_owned(),
                        name,
                    });
                }
                return Ok(candidate);
            }
            compares.extend(extras.compares);
            let mut ops = vec![Op::Put { key: key.clone(), value: self.encode(&candidate)? }];
            ops.extend(extras.ops);
            match self.txn(compares, ops, &name).await? {
                TxnOutcome::Committed { revision } => {
                    candidate.metadata_mut().resource_version = Some(revision.to_string());
                    return Ok(candidate);
                }
                TxnOutcome::CompareFailed { index: 0 } => {
                    let Some(prefix) = &generated_from else {
                        return Err(ApiError::AlreadyExists {
                            resource: self.plural().to_owned(),
                            name,
                        });
                    };
                    name = format!("{prefix}{}", random_suffix());
                    key = self.key(namespace, &name);
                    object.metadata_mut().name = Some(name.clone());
                }
                // The namespace or a claim changed meanwhile: look again, after a pause that
                // keeps the creates that lost this round from meeting again in the next.
                TxnOutcome::CompareFailed { .. } => claim_backoff(attempt).await,
            }
        }
        Err(self.conflict(&name))
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        ops: Vec<Op>,
        name: &str,
    ) -> Result<TxnOutcome, ApiError> {
        self.store
            .txn(compares, ops)
            .await
            .map_err(ApiError::store(format!("writing {} {name:?}", self.plural())))
    }

    /// Reads one object; `None` when absent.
    pub async fn get_opt(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<S::Object>, ApiError> {
        let key = self.key(namespace, name);
        let kv = self
            .store
            .get(&key)
            .await
            .map_err(ApiError::store(format!("reading {} {name:?}", self.plural())))?;
        kv.map(|kv| self.decode(&kv)).transpose()
    }

    /// Reads one object; NotFound when absent.
    pub async fn get(&self, namespace: Option<&str>, name: &str) -> Result<S::Object, ApiError> {
        self.get_opt(namespace, name).await?.ok_or_else(|| self.not_found(name))
    }

    /// Whether `object` passes `filter`.
    pub fn matches(&self, filter: &ListFilter, object: &S::Object) -> bool {
        let meta = object.metadata();
        filter.labels.matches(meta.labels.as_ref())
            && filter.fields.matches(|field| match field {
                "metadata.name" => meta.name.clone().unwrap_or_default(),
                "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
                other => self.strategy.field_value(object, other),
            })
    }

    /// Checks that a field selector only uses fields this kind supports.
    pub fn check_field_selector(&self, fields: &FieldSelector) -> Result<(), ApiError> {
        for field in fields.fields() {
            let supported = matches!(field, "metadata.name" | "metadata.namespace")
                || self.strategy.selectable_fields().contains(&field);
            if !supported {
                return Err(ApiError::BadRequest(format!(
                    "\"{field}\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\"{}",
                    self.strategy
                        .selectable_fields()
                        .iter()
                        .map(|f| format!(", \"{f}\""))
                        .collect::<String>()
                )));
            }
        }
        Ok(())
    }

    /// Lists the objects of one namespace (or all) that pass `filter`, with the revision of
    /// the read.
    pub async fn list(
        &self,
        namespace: Option<&str>,
        filter: &ListFilter,
    ) -> Result<(Vec<S::Object>, Revision), ApiError> {
        let prefix = self.strategy.info().collection_prefix(self.namespace_of(namespace));
        let list = self
            .store
            .list(&prefix)
            .await
            .map_err(ApiError::store(format!("listing {}", self.plural())))?;
        let mut items = Vec::with_capacity(list.items.len());
        for kv in &list.items {
            let object = self.decode(kv)?;
            if self.matches(filter, &object) {
                items.push(object);
            }
        }
        Ok((items, list.revision))
    }

    /// One page of a list: at most `limit` objects passing `filter`, after the continue token's
    /// key and as of its revision (see [`pagination`](super::pagination)).
    pub async fn list_page(
        &self,
        namespace: Option<&str>,
        filter: &ListFilter,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<ListPage<S::Object>, ApiError> {
        let prefix = self.strategy.info().collection_prefix(self.namespace_of(namespace));
        let live = self
            .store
            .list(&prefix)
            .await
            .map_err(ApiError::store(format!("listing {}", self.plural())))?;
        let (kvs, revision, after_key) = match continue_token {
            None => (live.items, live.revision, None),
            Some(text) => {
                let token = ContinueToken::decode(text)?;
                if !token.after_key.starts_with(&prefix) {
                    return Err(ApiError::BadRequest(
                        "the continue token belongs to another list".to_owned(),
                    ));
                }
                let kvs = pagination::list_at(
                    self.store.as_ref(),
                    &prefix,
                    token.revision,
                    live.items,
                    live.revision,
                )
                .await?;
                (kvs, token.revision, Some(token.after_key))
            }
        };
        let unfiltered = filter.labels.is_empty() && filter.fields.is_empty();
        let mut items = Vec::new();
        let mut continue_token = None;
        let mut remaining = None;
        let mut rest = kvs
            .iter()
            .filter(|kv| after_key.as_deref().is_none_or(|after| kv.key.as_str() > after));
        for kv in rest.by_ref() {
            let object = self.decode(kv)?;
            if !self.matches(filter, &object) {
                continue;
            }
            if limit.is_some_and(|limit| items.len() >= limit) {
                // One more passes: the page is full and the list goes on.
                let last = items.last().map(|o: &S::Object| {
                    self.key(
                        o.metadata().namespace.as_deref(),
                        o.metadata().name.as_deref().unwrap_or_default(),
                    )
                });
                continue_token =
                    last.map(|after_key| ContinueToken { revision, after_key }.encode());
                if unfiltered {
                    remaining = Some(1 + rest.count() as i64);
                }
                break;
            }
            items.push(object);
        }
        Ok(ListPage { items, revision, continue_token, remaining })
    }

    /// Turns a proposed new version into what is stored: server-owned metadata comes from the
    /// stored object, the strategy keeps what `mode` may not change, defaults are applied and
    /// everything is validated.
    fn prepare_update(
        &self,
        mode: UpdateMode,
        old: &S::Object,
        mut new: S::Object,
        context: &WriteContext,
    ) -> Result<S::Object, ApiError> {
        let old_meta = old.metadata();
        let name = old_meta.name.clone().unwrap_or_default();
        if let Some(uid) = new.metadata().uid.as_deref().filter(|u| !u.is_empty())
            && Some(uid) != old_meta.uid.as_deref()
        {
            return Err(ApiError::Conflict {
                resource: self.plural().to_owned(),
                name,
                message: format!(
                    "Precondition failed: UID in object meta: {uid}, UID of the stored object: {}",
                    old_meta.uid.as_deref().unwrap_or_default()
                ),
            });
        }
        {
            let meta = new.metadata_mut();
            meta.name = old_meta.name.clone();
            meta.namespace = old_meta.namespace.clone();
            meta.uid = old_meta.uid.clone();
            meta.creation_timestamp = old_meta.creation_timestamp.clone();
            // A write that leaves managed fields out keeps them; one that sets them (a JSON
            // patch of `/metadata/managedFields`, an apply) replaces them.
            if context.ownership != FieldOwnership::Given && meta.managed_fields.is_none() {
                meta.managed_fields = old_meta.managed_fields.clone();
            }
            meta.self_link = None;
            meta.resource_version = old_meta.resource_version.clone();
            // Deletion state and generation belong to the server; only its own (internal)
            // changes, such as a graceful delete, may set them.
            if mode != UpdateMode::Internal {
                meta.deletion_timestamp = old_meta.deletion_timestamp.clone();
                meta.deletion_grace_period_seconds = old_meta.deletion_grace_period_seconds;
                meta.generation = old_meta.generation;
                meta.generate_name = old_meta.generate_name.clone();
            }
        }
        match mode {
            UpdateMode::Main => self.strategy.prepare_for_update(&mut new, old),
            UpdateMode::Status => self.strategy.prepare_for_status_update(&mut new, old),
            UpdateMode::Internal => {}
        }
        self.strategy.default(&mut new);
        // Generation counts the spec changes clients make; the server's own changes (binding)
        // do not count, as in Kubernetes.
        if mode == UpdateMode::Main && self.strategy.spec_changed(&new, old) == Some(true) {
            new.metadata_mut().generation = Some(old_meta.generation.unwrap_or(1) + 1);
        }
        let mut transition = match mode {
            UpdateMode::Main => self.strategy.validate_update(&new, old),
            UpdateMode::Status | UpdateMode::Internal => Vec::new(),
        };
        // The server's own deletion writes may add the garbage collector's finalizers.
        let before = (mode != UpdateMode::Internal).then_some(old.metadata());
        transition.extend(deletion::finalizer_errors(new.metadata(), before));
        self.validate(&new, transition)?;
        if let FieldOwnership::Update(manager) = &context.ownership {
            self.record_update(manager, mode, Some(old), &mut new)?;
        }
        Ok(new)
    }

    /// Writes `new` in place of `old` if the stored object is still `old` (same
    /// resourceVersion), with `extras` in the same transaction. A new version equal to the old
    /// one is not written.
    pub async fn write_update(
        &self,
        mode: UpdateMode,
        old: &S::Object,
        new: S::Object,
        extras: TxnExtras,
        dry_run: bool,
    ) -> Result<WriteOutcome<S::Object>, ApiError> {
        self.write_update_with(mode, old, new, extras, &WriteContext::dry_run(dry_run)).await
    }

    async fn write_update_with(
        &self,
        mode: UpdateMode,
        old: &S::Object,
        new: S::Object,
        extras: TxnExtras,
        context: &WriteContext,
    ) -> Result<WriteOutcome<S::Object>, ApiError> {
        let dry_run = context.dry_run;
        let new = self.prepare_update(mode, old, new, context)?;
        if (new == *old && extras.ops.is_empty()) || dry_run {
            return Ok(WriteOutcome::Written(new));
        }
        if let Some(removal) =
            deletion::removal_on_update(self.strategy.as_ref(), self.store.as_ref(), &new).await?
        {
            return self.remove_instead_of_update(old, new, removal, extras).await;
        }
        let meta = old.metadata();
        let name = meta.name.clone().unwrap_or_default();
        let revision = parse_resource_version(meta.resource_version.as_deref().unwrap_or("0"))?;
        let key = self.key(meta.namespace.as_deref(), &name);
        let mut compares = vec![Compare::ModRevision { key: key.clone(), revision }];
        compares.extend(extras.compares);
        let mut ops = vec![Op::Put { key, value: self.encode(&new)? }];
        ops.extend(extras.ops);
        match self.txn(compares, ops, &name).await? {
            TxnOutcome::Committed { revision } => {
                let mut new = new;
                new.metadata_mut().resource_version = Some(revision.to_string());
                Ok(WriteOutcome::Written(new))
            }
            TxnOutcome::CompareFailed { .. } => Ok(WriteOutcome::Stale),
        }
    }

    /// The update that empties a deleted object's finalizers removes it (see [`deletion`]),
    /// provided `old` is still the stored version.
    async fn remove_instead_of_update(
        &self,
        old: &S::Object,
        last: S::Object,
        mut removal: TxnExtras,
        extras: TxnExtras,
    ) -> Result<WriteOutcome<S::Object>, ApiError> {
        removal.compares.extend(extras.compares);
        removal.ops.extend(extras.ops);
        if self.remove_with(old, removal).await? {
            Ok(WriteOutcome::Written(last))
        } else {
            Ok(WriteOutcome::Stale)
        }
    }

    /// Reads the object, lets `mutate` produce the new version, and writes it if nothing
    /// changed meanwhile; otherwise reads again. A new version that carries a resourceVersion
    /// must carry the current one (optimistic concurrency): a stale one is a Conflict.
    pub async fn update(
        &self,
        namespace: Option<&str>,
        name: &str,
        mode: UpdateMode,
        dry_run: bool,
        mutate: impl FnMut(&S::Object) -> Result<S::Object, ApiError> + Send,
    ) -> Result<S::Object, ApiError> {
        self.update_with(namespace, name, mode, &WriteContext::dry_run(dry_run), mutate).await
    }

    /// Updates an object as [`TypedKind::update`] does, recording field ownership as
    /// `context` says.
    pub async fn update_with(
        &self,
        namespace: Option<&str>,
        name: &str,
        mode: UpdateMode,
        context: &WriteContext,
        mut mutate: impl FnMut(&S::Object) -> Result<S::Object, ApiError> + Send,
    ) -> Result<S::Object, ApiError> {
        for _ in 0..MAX_ATTEMPTS {
            let old = self.get(namespace, name).await?;
            let new = mutate(&old)?;
            if let Some(wanted) =
                new.metadata().resource_version.as_deref().filter(|v| !v.is_empty())
                && Some(wanted) != old.metadata().resource_version.as_deref()
            {
                return Err(self.conflict(name));
            }
            match self.write_update_with(mode, &old, new, TxnExtras::default(), context).await? {
                WriteOutcome::Written(object) => return Ok(object),
                WriteOutcome::Stale => continue,
            }
        }
        Err(self.conflict(name))
    }

    /// Deletes an object the way its kind deletes (at once, or gracefully).
    pub async fn delete(
        &self,
        namespace: Option<&str>,
        name: &str,
        request: &DeleteRequest,
        dry_run: bool,
    ) -> Result<S::Object, ApiError> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.get(namespace, name).await?;
            let meta = current.metadata();
            if let Some(uid) = request.precondition_uid.as_deref()
                && meta.uid.as_deref() != Some(uid)
            {
                return Err(ApiError::Conflict {
                    resource: self.plural().to_owned(),
                    name: name.to_owned(),
                    message: format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta.uid.as_deref().unwrap_or_default()
                    ),
                });
            }
            if let Some(version) = request.precondition_resource_version.as_deref()
                && meta.resource_version.as_deref() != Some(version)
            {
                return Err(ApiError::Conflict {
                    resource: self.plural().to_owned(),
                    name: name.to_owned(),
                    message: format!(
                        "Precondition failed: ResourceVersion in precondition: {version}, ResourceVersion in object meta: {}",
                        meta.resource_version.as_deref().unwrap_or_default()
                    ),
                });
            }
            match deletion::plan(self.strategy.as_ref(), self.store.as_ref(), &current, request)
                .await?
            {
                DeletePlan::Unchanged => return Ok(current),
                DeletePlan::Update(new) => {
                    match self
                        .write_update(
                            UpdateMode::Internal,
                            &current,
                            new,
                            TxnExtras::default(),
                            dry_run,
                        )
                        .await?
                    {
                        WriteOutcome::Written(object) => return Ok(object),
                        WriteOutcome::Stale => continue,
                    }
                }
                DeletePlan::Remove(extras) => {
                    if dry_run || self.remove_with(&current, extras).await? {
                        return Ok(current);
                    }
                }
            }
        }
        Err(self.conflict(name))
    }

    /// Removes `object` from the store if it is still the stored version. False when it
    /// changed (or vanished) meanwhile. For controllers that finish a deletion.
    pub async fn remove(&self, object: &S::Object) -> Result<bool, ApiError> {
        self.remove_with(object, TxnExtras::default()).await
    }

    async fn remove_with(&self, object: &S::Object, extras: TxnExtras) -> Result<bool, ApiError> {
        let meta = object.metadata();
        let name = meta.name.clone().unwrap_or_default();
        let revision = parse_resource_version(meta.resource_version.as_deref().unwrap_or("0"))?;
        let key = self.key(meta.namespace.as_deref(), &name);
        let mut compares = vec![Compare::ModRevision { key: key.clone(), revision }];
        compares.extend(extras.compares);
        let mut ops = vec![Op::Delete { key }];
        ops.extend(extras.ops);
        Ok(matches!(self.txn(compares, ops, &name).await?, TxnOutcome::Committed { .. }))
    }

    /// Watches the objects of one namespace (or all) that pass `filter`. Objects that start
    /// or stop passing the filter are reported as ADDED or DELETED, as Kubernetes does.
    /// Returns the revision the stream starts after.
    pub async fn watch(
        self: &Arc<Self>,
        namespace: Option<&str>,
        filter: ListFilter,
        start: WatchStart,
    ) -> Result<(Revision, BoxStream<'static, WatchItem<S::Object>>), ApiError> {
        let prefix = self.strategy.info().collection_prefix(self.namespace_of(namespace));
        let (initial, after) = match start {
            WatchStart::Now | WatchStart::NowThenBookmark => {
                let (items, revision) = self.list(namespace, &filter).await?;
                let mut initial: Vec<_> = items.into_iter().map(WatchItem::Added).collect();
                if start == WatchStart::NowThenBookmark {
                    initial.push(WatchItem::InitialEventsEnd(revision));
                }
                (initial, revision)
            }
            WatchStart::After(revision) => (Vec::new(), revision),
        };
        let initial = futures::stream::iter(initial);
        let changes = match self.store.watch(&prefix, after).await {
            Ok(stream) => stream,
            Err(StoreError::Compacted { requested, compacted }) => {
                let expired = WatchItem::Error(ApiError::Expired { requested, compacted });
                return Ok((after, initial.chain(futures::stream::iter([expired])).boxed()));
            }
            Err(error) => {
                return Err(ApiError::store(format!("watching {}", self.plural()))(error));
            }
        };
        let kind = Arc::clone(self);
        let changes = changes
            .flat_map(move |batch| futures::stream::iter(kind.watch_items(batch, &filter)))
            // An error ends the watch: the client starts a new one from its last revision.
            .scan(false, |failed, item| {
                if *failed {
                    return futures::future::ready(None);
                }
                *failed = matches!(item, WatchItem::Error(_));
                futures::future::ready(Some(item))
            });
        Ok((after, initial.chain(changes).boxed()))
    }

    fn watch_items(
        &self,
        batch: Result<WatchBatch, StoreError>,
        filter: &ListFilter,
    ) -> Vec<WatchItem<S::Object>> {
        let batch = match batch {
            Ok(batch) => batch,
            Err(StoreError::Compacted { requested, compacted }) => {
                return vec![WatchItem::Error(ApiError::Expired { requested, compacted })];
            }
            Err(error) => {
                return vec![WatchItem::Error(ApiError::store(format!(
                    "watching {}",
                    self.plural()
                ))(error))];
            }
        };
        let mut items = Vec::new();
        for event in batch.events {
            let decode =
                |value: &[u8]| decode_object::<S::Object>(value, event.revision, &event.key);
            let previous = match event.prev_value.as_deref().map(decode).transpose() {
                Ok(previous) => previous,
                Err(error) => return vec![WatchItem::Error(error)],
            };
            let was_in = previous.as_ref().is_some_and(|p| self.matches(filter, p));
            match event.kind {
                EventKind::Put => {
                    let current = match decode(&event.value) {
                        Ok(current) => current,
                        Err(error) => return vec![WatchItem::Error(error)],
                    };
                    match (was_in, self.matches(filter, &current)) {
                        (false, true) => items.push(WatchItem::Added(current)),
                        (true, true) => items.push(WatchItem::Modified(current)),
                        (true, false) => items.push(WatchItem::Deleted(current)),
                        (false, false) => {}
                    }
                }
                EventKind::Delete => {
                    if let (true, Some(previous)) = (was_in, previous) {
                        items.push(WatchItem::Deleted(previous));
                    }
                }
            }
        }
        items
    }
}

/// Decodes a stored object and sets its resourceVersion to `revision`.
pub fn decode_object<K: serde::de::DeserializeOwned + Metadata<Ty = ObjectMeta>>(
    value: &[u8],
    revision: Revision,
    key: &str,
) -> Result<K, ApiError> {
    let mut object: K = serde_json::from_slice(value)
        .map_err(|e| ApiError::internal(format!("decoding the stored object {key}"), e))?;
    object.metadata_mut().resource_version = Some(revision.to_string());
    Ok(object)
}

/// Clears what only the server sets on create, and sets uid and creationTimestamp.
fn reset_server_metadata(meta: &mut ObjectMeta) {
    meta.uid = Some(uuid::Uuid::new_v4().to_string());
    meta.creation_timestamp = Some(now());
    meta.resource_version = None;
    meta.generation = None;
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.managed_fields = None;
    meta.self_link = None;
}

/// A random pause of up to 2 ms per lost round so far (at most 20 ms).
async fn claim_backoff(attempt: usize) {
    let most = 2 * (attempt.min(9) as u64 + 1);
    let pause = rand::rng().random_range(0..=most * 1000);
    tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
}

fn random_suffix() -> String {
    let mut rng = rand::rng();
    (0..NAME_SUFFIX_LEN)
        .map(|_| {
            let index = rng.random_range(0..NAME_SUFFIX_ALPHABET.len());
            char::from(NAME_SUFFIX_ALPHABET[index])
        })
        .collect()
}

/// The current time as Kubernetes stores it.
pub fn current_time() -> Time {
    now()
}
