//! The replicated store: the same [`Store`] on etcd (v3 API, tested against etcd 3.4).
//!
//! Every key lives under a root prefix (`/strait/<cluster>` by default), so one etcd can hold
//! several clusters: store key `/registry/pods/a/b` is etcd key `<root>/registry/pods/a/b`.
//! Store keys begin with `/`; the keys under `/meta/` are the backend's own.
//!
//! Revisions are etcd's: one counter for the whole etcd, not per root. On an etcd that holds
//! one cluster, they behave exactly as the embedded store's (each committed change adds one).
//! When several clusters share an etcd, a cluster's revisions still only grow and still order
//! its changes, but they skip the revisions of the other clusters' writes, and compaction,
//! which etcd applies to its whole history, discards every cluster's history up to that point.
//!
//! Mapping onto etcd:
//! - a transaction is one etcd `Txn`; `Absent` compares `version == 0`, `ModRevision` compares
//!   `mod_revision`. When a compare fails, the failure branch reads every compared key in the
//!   same atomic step, so the index of the first compare that did not hold is exact;
//! - a snapshot of several prefixes is one read-only `Txn` of ranges (one revision);
//! - a watch after revision `r` is an etcd watch from `r + 1` with previous values, its events
//!   grouped by their modification revision (etcd never splits a revision across responses);
//! - `compact(r)` discards the changes at and before `r`: etcd's compaction at `r + 1` (etcd
//!   keeps the changes at its compaction revision). When `r` is the current revision, the store
//!   first writes `/meta/compaction` so that `r + 1` exists.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, CompactionOptions, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType,
    GetOptions, KvClient, TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};

use super::{
    Compare, EventKind, KeyValue, Op, Revision, Snapshot, Store, StoreError, TxnOutcome,
    WatchBatch, WatchEvent, WatchStream,
};

/// The store key written to make room for a compaction at the current revision.
const COMPACTION_MARKER: &str = "/meta/compaction";
/// Keys under this prefix belong to the backend, not to the store's users.
pub const RESERVED_PREFIX: &str = "/meta/";
/// The largest message accepted from etcd: a list of every object of a big cluster.
const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// How to reach etcd and where the cluster's keys live in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdStoreOptions {
    /// `host:port` of each etcd member (clients fail over between them).
    pub endpoints: Vec<String>,
    /// The root every key is stored under, e.g. `/strait/default` (no trailing `/`).
    pub root: String,
    /// How long one request may take before it fails.
    pub request_timeout: Duration,
}

impl EtcdStoreOptions {
    pub fn new(endpoints: Vec<String>, root: impl Into<String>) -> Self {
        let root = root.into();
        let root = root.trim_end_matches('/').to_owned();
        Self { endpoints, root, request_timeout: Duration::from_secs(15) }
    }

    /// The root of a cluster's keys when none is given: `/strait/<cluster>`.
    pub fn default_root(cluster: &str) -> String {
        format!("/strait/{cluster}")
    }
}

/// The etcd-backed [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    kv: KvClient,
    watch: WatchClient,
    options: EtcdStoreOptions,
}

fn backend(action: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> StoreError {
    let action = action.into();
    move |source| classify(action, source)
}

/// What an etcd error means for the store: a compacted or future revision, a request etcd
/// refuses as malformed, or a failure of the backend.
fn classify(action: String, source: etcd_client::Error) -> StoreError {
    if let etcd_client::Error::GRpcStatus(status) = &source {
        let message = status.message();
        // etcd's `mvcc.ErrCompacted` and `ErrFutureRev`, and the request checks of
        // `etcdserver/api/v3rpc/key.go` and `rpctypes`.
        if message.contains("required revision has been compacted") {
            return StoreError::Compacted { requested: 0, compacted: 0 };
        }
        if message.contains("required revision is a future revision") {
            return StoreError::FutureRevision { requested: 0, current: 0 };
        }
        if message.contains("request is too large")
            || message.contains("too many operations in txn request")
            || message.contains("duplicate key given in txn request")
        {
            return StoreError::InvalidTxn {
                detail: format!("{action}: etcd refused it: {message}"),
            };
        }
    }
    StoreError::Backend { action, source: Box::new(source) }
}

fn revision_of(value: i64) -> Revision {
    u64::try_from(value).unwrap_or(0)
}

fn etcd_revision(value: Revision) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range runs to the end of the keyspace.
    vec![0]
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers.
    pub async fn connect(options: EtcdStoreOptions) -> Result<Self, StoreError> {
        let action = format!("connecting to etcd at {}", options.endpoints.join(","));
        if options.endpoints.is_empty() {
            return Err(StoreError::Backend {
                action,
                source: "no etcd endpoint was given".into(),
            });
        }
        if !options.root.starts_with('/') {
            return Err(StoreError::Backend {
                action,
                source: format!("the key root {:?} must begin with /", options.root).into(),
            });
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            // Notice an etcd member that vanished without closing the connection.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(backend(action.clone()))?;
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE_BYTES);
        let store = Self { inner: Arc::new(Inner { client, kv, watch, options }) };
        store.inner.current_revision(&action).await?;
        Ok(store)
    }

    /// The client, for what shares the store's etcd (leader election).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn options(&self) -> &EtcdStoreOptions {
        &self.inner.options
    }

    /// The etcd key of a store key.
    pub fn etcd_key(&self, key: &str) -> String {
        self.inner.etcd_key(key)
    }

    /// Deletes every key under the root, the backend's own included: the cluster is gone
    /// from this etcd. Returns how many keys there were.
    pub async fn remove_everything(&self) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let action = format!("removing every key under {} from etcd", inner.options.root);
        let start = format!("{}/", inner.options.root).into_bytes();
        let end = prefix_end(&start);
        let mut kv = inner.kv.clone();
        let options = etcd_client::DeleteOptions::new().with_range(end);
        let response = inner.timed(&action, kv.delete(start, Some(options))).await?;
        Ok(u64::try_from(response.deleted()).unwrap_or(0))
    }
}

impl Inner {
    fn etcd_key(&self, key: &str) -> String {
        format!("{}{key}", self.options.root)
    }

    /// The etcd range of a store prefix, `None` when no store key can have it (store keys
    /// begin with `/`; an empty prefix means every store key, not every key under the root
    /// string, which would reach into a sibling root such as `/strait/default2`).
    fn range_of(&self, prefix: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let prefix = if prefix.is_empty() { "/" } else { prefix };
        if !prefix.starts_with('/') {
            return None;
        }
        let start = self.etcd_key(prefix).into_bytes();
        let end = prefix_end(&start);
        Some((start, end))
    }

    fn store_key(&self, etcd_key: &[u8], action: &str) -> Result<String, StoreError> {
        let key = std::str::from_utf8(etcd_key).map_err(|_| StoreError::Corrupt {
            action: action.to_owned(),
            detail: "a key is not UTF-8".to_owned(),
        })?;
        key.strip_prefix(self.options.root.as_str()).map(str::to_owned).ok_or_else(|| {
            StoreError::Corrupt {
                action: action.to_owned(),
                detail: format!("etcd returned {key}, outside {}", self.options.root),
            }
        })
    }

    fn key_value(&self, kv: &etcd_client::KeyValue, action: &str) -> Result<KeyValue, StoreError> {
        Ok(KeyValue {
            key: self.store_key(kv.key(), action)?,
            value: Bytes::copy_from_slice(kv.value()),
            create_revision: revision_of(kv.create_revision()),
            mod_revision: revision_of(kv.mod_revision()),
        })
    }

    async fn timed<T>(
        &self,
        action: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.options.request_timeout, call).await {
            Ok(result) => result.map_err(backend(action)),
            Err(_) => Err(StoreError::Backend {
                action: action.to_owned(),
                source: format!("etcd did not answer within {:?}", self.options.request_timeout)
                    .into(),
            }),
        }
    }

    /// The current revision (a linearizable read, so it is never behind a write another
    /// client saw acknowledged).
    async fn current_revision(&self, action: &str) -> Result<Revision, StoreError> {
        let mut kv = self.kv.clone();
        let key = self.etcd_key(COMPACTION_MARKER);
        let response =
            self.timed(action, kv.get(key, Some(GetOptions::new().with_count_only()))).await?;
        Ok(response.header().map_or(0, |h| revision_of(h.revision())))
    }

    /// Whether the history at `revision` is still kept: `Ok(false)` when it was compacted.
    async fn history_kept_at(&self, revision: Revision, action: &str) -> Result<bool, StoreError> {
        let mut kv = self.kv.clone();
        let key = self.etcd_key(COMPACTION_MARKER);
        let options = GetOptions::new().with_count_only().with_revision(etcd_revision(revision));
        match self.timed(action, kv.get(key, Some(options))).await {
            Ok(_) | Err(StoreError::FutureRevision { .. }) => Ok(true),
            Err(StoreError::Compacted { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The revision up to which history is gone, found from etcd itself (another client or
    /// another cluster on the same etcd may have compacted): one less than the oldest
    /// revision etcd can still read at, by bisection.
    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        let action = "finding etcd's compacted revision";
        let current = self.current_revision(action).await?;
        let (mut oldest_unknown, mut oldest_kept) = (1, current.max(1));
        while oldest_unknown < oldest_kept {
            let middle = oldest_unknown + (oldest_kept - oldest_unknown) / 2;
            if self.history_kept_at(middle, action).await? {
                oldest_kept = middle;
            } else {
                oldest_unknown = middle + 1;
            }
        }
        Ok(oldest_kept - 1)
    }

    async fn compacted_error(&self, requested: Revision) -> StoreError {
        match self.compacted_revision().await {
            Ok(compacted) => StoreError::Compacted { requested, compacted },
            Err(error) => error,
        }
    }
}

fn check_ops(ops: &[Op]) -> Result<(), StoreError> {
    let mut written = std::collections::HashSet::new();
    for op in ops {
        let key = op.key();
        if !written.insert(key) {
            return Err(StoreError::InvalidTxn { detail: format!("it writes {key} twice") });
        }
        if !key.starts_with('/') {
            return Err(StoreError::InvalidTxn {
                detail: format!("the key {key:?} does not begin with /"),
            });
        }
        if key.starts_with(RESERVED_PREFIX) {
            return Err(StoreError::InvalidTxn {
                detail: format!("the key {key} is under {RESERVED_PREFIX}, kept for the store"),
            });
        }
        if let Op::Put { value, .. } = op
            && value.len() > super::redb::MAX_VALUE_BYTES
        {
            return Err(StoreError::InvalidTxn {
                detail: format!(
                    "the value of {key} has {} bytes, more than the {} allowed",
                    value.len(),
                    super::redb::MAX_VALUE_BYTES
                ),
            });
        }
    }
    Ok(())
}

/// Whether `compare` holds for the key's current state (`None`: absent).
fn holds(compare: &Compare, current: Option<Revision>) -> bool {
    match compare {
        Compare::Absent { .. } => current.is_none(),
        Compare::ModRevision { revision, .. } => current == Some(*revision),
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let action = format!("reading {key} from etcd");
        if !key.starts_with('/') {
            return Ok(None);
        }
        let inner = &self.inner;
        let mut kv = inner.kv.clone();
        let mut response = inner.timed(&action, kv.get(inner.etcd_key(key), None)).await?;
        match response.take_kvs().first() {
            Some(found) => Ok(Some(inner.key_value(found, &action)?)),
            None => Ok(None),
        }
    }

    async fn snapshot(&self, prefixes: &[String]) -> Result<Snapshot, StoreError> {
        let action = format!("listing {prefixes:?} from etcd");
        let inner = &self.inner;
        let ranges: Vec<Option<(Vec<u8>, Vec<u8>)>> =
            prefixes.iter().map(|prefix| inner.range_of(prefix)).collect();
        let reads: Vec<TxnOp> = ranges
            .iter()
            .flatten()
            .map(|(start, end)| {
                TxnOp::get(start.clone(), Some(GetOptions::new().with_range(end.clone())))
            })
            .collect();
        let mut kv = inner.kv.clone();
        // One read-only transaction: every range is read at the same revision.
        let response =
            inner.timed(&action, kv.txn(etcd_client::Txn::new().and_then(reads))).await?;
        let revision = response.header().map_or(0, |h| revision_of(h.revision()));
        let mut results = response.op_responses().into_iter();
        let mut lists = Vec::with_capacity(prefixes.len());
        for range in &ranges {
            if range.is_none() {
                lists.push(Vec::new());
                continue;
            }
            let Some(TxnOpResponse::Get(mut read)) = results.next() else {
                return Err(StoreError::Corrupt {
                    action,
                    detail: "etcd answered a read transaction without its reads".to_owned(),
                });
            };
            let items = read
                .take_kvs()
                .iter()
                .map(|found| inner.key_value(found, &action))
                .collect::<Result<Vec<_>, _>>()?;
            lists.push(items);
        }
        Ok(Snapshot { lists, revision })
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.inner.current_revision("reading the etcd revision").await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let action = "committing a transaction to etcd";
        check_ops(&ops)?;
        let inner = &self.inner;
        let conditions: Vec<EtcdCompare> = compares
            .iter()
            .map(|compare| match compare {
                Compare::Absent { key } => {
                    EtcdCompare::version(inner.etcd_key(key), CompareOp::Equal, 0)
                }
                Compare::ModRevision { key, revision } => EtcdCompare::mod_revision(
                    inner.etcd_key(key),
                    CompareOp::Equal,
                    etcd_revision(*revision),
                ),
            })
            .collect();
        let writes: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(inner.etcd_key(&key), value.to_vec(), None),
                Op::Delete { key } => TxnOp::delete(inner.etcd_key(&key), None),
            })
            .collect();
        // When a compare fails, read every compared key in the same step to tell which.
        let reads: Vec<TxnOp> = compares
            .iter()
            .map(|compare| {
                TxnOp::get(inner.etcd_key(compare.key()), Some(GetOptions::new().with_keys_only()))
            })
            .collect();
        let txn = etcd_client::Txn::new().when(conditions).and_then(writes).or_else(reads);
        let mut kv = inner.kv.clone();
        let response = inner.timed(action, kv.txn(txn)).await?;
        let revision = response.header().map_or(0, |h| revision_of(h.revision()));
        if response.succeeded() {
            return Ok(TxnOutcome::Committed { revision });
        }
        for (index, (compare, read)) in compares.iter().zip(response.op_responses()).enumerate() {
            let current = match read {
                TxnOpResponse::Get(read) => {
                    read.kvs().first().map(|found| revision_of(found.mod_revision()))
                }
                _ => None,
            };
            if !holds(compare, current) {
                return Ok(TxnOutcome::CompareFailed { index });
            }
        }
        Err(StoreError::Corrupt {
            action: action.to_owned(),
            detail: "etcd refused the transaction, yet every compare holds".to_owned(),
        })
    }

    async fn watch(
        &self,
        prefix: &str,
        after_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        let action = format!("watching {prefix} in etcd after revision {after_revision}");
        let inner = Arc::clone(&self.inner);
        let Some((start, end)) = inner.range_of(prefix) else {
            // No store key can have this prefix: nothing will ever change under it.
            return Ok(Box::pin(futures::stream::pending()));
        };
        // etcd reports a compacted start revision asynchronously, on the stream; check first
        // so that the caller learns it at once, as from the embedded store.
        if !inner.history_kept_at(after_revision + 1, &action).await? {
            return Err(inner.compacted_error(after_revision).await);
        }
        let options = WatchOptions::new()
            .with_range(end)
            .with_start_revision(etcd_revision(after_revision + 1))
            .with_prev_key();
        let mut client = inner.watch.clone();
        let stream = inner.timed(&action, client.watch(start, Some(options))).await?;
        let watcher = EtcdWatcher {
            inner,
            stream,
            scanned: after_revision,
            pending: VecDeque::new(),
            finished: false,
        };
        Ok(Box::pin(futures::stream::unfold(watcher, |mut watcher| async move {
            let item = watcher.next().await?;
            Some((item, watcher))
        })))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let action = format!("compacting etcd's history up to revision {revision}");
        let inner = &self.inner;
        let current = inner.current_revision(&action).await?;
        if revision > current {
            return Err(StoreError::FutureRevision { requested: revision, current });
        }
        if revision == current {
            // etcd compacts at an existing revision only: make `revision + 1` exist.
            let mut kv = inner.kv.clone();
            let marker = inner.etcd_key(COMPACTION_MARKER);
            inner.timed(&action, kv.put(marker, revision.to_string(), None)).await?;
        }
        let mut kv = inner.kv.clone();
        let options = CompactionOptions::new().with_physical();
        match inner.timed(&action, kv.compact(etcd_revision(revision + 1), Some(options))).await {
            // Already compacted this far (by this store or anyone else on the same etcd).
            Ok(_) | Err(StoreError::Compacted { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        self.inner.compacted_revision().await
    }
}

/// How often the leader compacts etcd's history.
const COMPACTION_INTERVAL: Duration = Duration::from_secs(60);

/// Keeps about `keep` revisions of history, as the embedded store does, by compacting every
/// [`COMPACTION_INTERVAL`] until `stop` turns true. Run by the leader only. etcd compacts its
/// whole history, so on an etcd shared by several clusters the smallest `keep` wins.
pub async fn bound_history(
    store: super::SharedStore,
    keep: Revision,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = crate::controllers::shutdown_signalled(&mut stop) => return,
            () = tokio::time::sleep(COMPACTION_INTERVAL) => {}
        }
        let compacted = match store.revision().await {
            Ok(current) if current > keep => store.compact(current - keep).await,
            Ok(_) => Ok(()),
            Err(error) => Err(error),
        };
        if let Err(error) = compacted {
            tracing::warn!(%error, "cannot compact etcd's history; trying again later");
        }
    }
}

/// The state of one watch stream.
struct EtcdWatcher {
    inner: Arc<Inner>,
    stream: etcd_client::WatchStream,
    /// Every revision up to this one has been delivered (or did not touch the prefix).
    scanned: Revision,
    pending: VecDeque<WatchBatch>,
    finished: bool,
}

impl EtcdWatcher {
    fn fail(&mut self, error: StoreError) -> Option<Result<WatchBatch, StoreError>> {
        self.finished = true;
        self.pending.clear();
        Some(Err(error))
    }

    async fn next(&mut self) -> Option<Result<WatchBatch, StoreError>> {
        let action = "following an etcd watch";
        loop {
            if let Some(batch) = self.pending.pop_front() {
                return Some(Ok(batch));
            }
            if self.finished {
                return None;
            }
            let response = match self.stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => {
                    return self.fail(StoreError::Backend {
                        action: action.to_owned(),
                        source: "etcd ended the watch".into(),
                    });
                }
                Err(error) => return self.fail(backend(action)(error)),
            };
            if response.canceled() {
                let error = if response.compact_revision() > 0 {
                    // The watcher fell behind a compaction: etcd keeps its compaction revision,
                    // so what is gone is everything before it.
                    let compacted = revision_of(response.compact_revision()).saturating_sub(1);
                    StoreError::Compacted { requested: self.scanned, compacted }
                } else {
                    StoreError::Backend {
                        action: action.to_owned(),
                        source: format!("etcd cancelled the watch: {}", response.cancel_reason())
                            .into(),
                    }
                };
                return self.fail(error);
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let revision = revision_of(kv.mod_revision());
                if revision <= self.scanned {
                    continue;
                }
                let key = match self.inner.store_key(kv.key(), action) {
                    Ok(key) => key,
                    Err(error) => return self.fail(error),
                };
                let prev_value = event.prev_kv().map(|prev| Bytes::copy_from_slice(prev.value()));
                let (kind, value) = match event.event_type() {
                    EventType::Put => (EventKind::Put, Bytes::copy_from_slice(kv.value())),
                    EventType::Delete => (EventKind::Delete, Bytes::new()),
                };
                if kind == EventKind::Delete && prev_value.is_none() {
                    // etcd reads the previous value from history; it is gone only when the
                    // history before this delete was compacted meanwhile.
                    let error = self.inner.compacted_error(self.scanned).await;
                    return self.fail(error);
                }
                let change = WatchEvent { kind, key, value, prev_value, revision };
                match self.pending.back_mut() {
                    Some(batch) if batch.revision == revision => batch.events.push(change),
                    _ => self.pending.push_back(WatchBatch { revision, events: vec![change] }),
                }
            }
            if let Some(last) = self.pending.back() {
                self.scanned = last.revision;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}
