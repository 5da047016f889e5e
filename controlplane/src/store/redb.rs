//! The embedded store: one redb file holding the current values, a bounded log of past changes
//! (so watches can resume from an older revision), and the revision counters.
//!
//! Every commit is durable when it returns (redb's `Durability::Immediate` fsyncs). Writers
//! that arrive while a commit is in progress queue up, and the next one to get the writer's
//! lock commits the whole queue in one redb transaction (group commit): each transaction
//! keeps its own revision and its own outcome, as if they had run one after the other, but
//! they share one fsync. Live watchers are fed from an in-memory broadcast of each committed
//! transaction; a watcher subscribes before it replays the log, then skips what it already
//! replayed, so no change falls between replay and live delivery.

use std::{
    collections::{HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::{
    Compare, EventKind, KeyValue, Op, Revision, Snapshot, Store, StoreError, TxnOutcome,
    WatchBatch, WatchEvent, WatchStream,
};

/// Current values: key → `mod_revision (u64 BE) ‖ create_revision (u64 BE) ‖ value`.
const VALUES: TableDefinition<&str, &[u8]> = TableDefinition::new("values");
/// The change log: revision → every change of that revision, encoded by [`encode_events`].
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// Counters: [`META_REVISION`] and [`META_COMPACTED`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// The revision of a store nobody has written to yet (as etcd: the first write is revision 2).
const EMPTY_STORE_REVISION: Revision = 1;
/// The largest value a key may hold (etcd's default request limit is 1.5 MiB; objects this
/// large are a mistake, and the log format stores lengths as u32).
pub const MAX_VALUE_BYTES: usize = 8 * 1024 * 1024;
/// How many revisions a watcher replays from the log per read transaction.
const REPLAY_PAGE: usize = 256;

#[derive(Clone, Debug)]
pub struct RedbStoreOptions {
    /// How many past revisions the change log keeps for watch resume.
    pub history_revisions: u64,
    /// How many committed transactions a live watcher may fall behind before it goes back to
    /// the log to catch up.
    pub watch_buffer: usize,
}

impl Default for RedbStoreOptions {
    fn default() -> Self {
        Self { history_revisions: 10_000, watch_buffer: 1024 }
    }
}

/// The redb-backed [`Store`]. Cheap to clone; the file closes when the last clone and the
/// last watch stream are dropped.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    history_revisions: u64,
    /// Held across commit and broadcast so that watchers receive transactions in revision
    /// order (redb serializes writers, but two writers could otherwise broadcast out of order).
    /// Whoever holds it commits every transaction queued in `queued`.
    writer: Mutex<broadcast::Sender<Arc<WatchBatch>>>,
    /// Transactions waiting for the next group commit, in arrival order.
    queued: Mutex<Vec<QueuedTxn>>,
    /// A clone of the sender, to subscribe without waiting for a commit in progress.
    subscriptions: broadcast::Sender<Arc<WatchBatch>>,
    /// Dropped with the file: its receivers learn that the file is closed.
    open_signal: tokio::sync::watch::Sender<()>,
}

/// Resolves once a store's file is closed: every clone, every watch and every blocking
/// operation still running is gone, so the file can be opened again.
pub struct StoreClosed {
    open: tokio::sync::watch::Receiver<()>,
}

impl StoreClosed {
    pub async fn wait(mut self) {
        while self.open.changed().await.is_ok() {}
    }
}

/// A transaction waiting for a group commit, and where its outcome goes.
struct QueuedTxn {
    compares: Vec<Compare>,
    ops: Vec<Op>,
    outcome: std::sync::mpsc::SyncSender<Result<TxnOutcome, StoreError>>,
}

/// Most transactions committed together: bounds one commit's size and latency.
const MAX_GROUP: usize = 256;

struct Record {
    mod_revision: Revision,
    create_revision: Revision,
    value: Bytes,
}

/// One transaction of a group inside the group's write transaction, `revision` being the
/// store's revision before it: its compares against what the group has written so far, then
/// (if they hold) its writes at the next revision and its log entry. `None` for the batch of a
/// failed compare, or of deletes of absent keys only (the revision does not move, as in etcd).
fn apply_txn(
    values: &mut redb::Table<&str, &[u8]>,
    changes: &mut redb::Table<u64, &[u8]>,
    revision: Revision,
    compares: &[Compare],
    ops: Vec<Op>,
    action: &str,
) -> Result<(TxnOutcome, Option<Arc<WatchBatch>>), StoreError> {
    for (index, compare) in compares.iter().enumerate() {
        let current = match values.get(compare.key()).map_err(backend(action))? {
            Some(guard) => Some(decode_record(guard.value(), action)?.mod_revision),
            None => None,
        };
        let holds = match compare {
            Compare::Absent { .. } => current.is_none(),
            Compare::ModRevision { revision, .. } => current == Some(*revision),
        };
        if !holds {
            // Nothing of this transaction was written.
            return Ok((TxnOutcome::CompareFailed { index }, None));
        }
    }
    let next = revision + 1;
    let mut events = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Put { key, value } => {
                let previous = match values.get(key.as_str()).map_err(backend(action))? {
                    Some(guard) => Some(decode_record(guard.value(), action)?),
                    None => None,
                };
                let create_revision =
                    previous.as_ref().map_or(next, |record| record.create_revision);
                values
                    .insert(key.as_str(), encode_record(next, create_revision, &value).as_slice())
                    .map_err(backend(action))?;
                events.push(WatchEvent {
                    kind: EventKind::Put,
                    key,
                    value,
                    prev_value: previous.map(|record| record.value),
                    revision: next,
                });
            }
            Op::Delete { key } => {
                let removed = match values.remove(key.as_str()).map_err(backend(action))? {
                    Some(guard) => Some(decode_record(guard.value(), action)?),
                    None => None,
                };
                if let Some(record) = removed {
                    events.push(WatchEvent {
                        kind: EventKind::Delete,
                        key,
                        value: Bytes::new(),
                        prev_value: Some(record.value),
                        revision: next,
                    });
                }
            }
        }
    }
    if events.is_empty() {
        // Only deletes of absent keys: like etcd, the revision does not move.
        return Ok((TxnOutcome::Committed { revision }, None));
    }
    changes.insert(next, encode_events(&events).as_slice()).map_err(backend(action))?;
    Ok((
        TxnOutcome::Committed { revision: next },
        Some(Arc::new(WatchBatch { revision: next, events })),
    ))
}

fn backend<E>(action: impl Into<String>) -> impl FnOnce(E) -> StoreError
where
    E: Into<redb::Error>,
{
    let action = action.into();
    move |source| StoreError::Backend { action, source: Box::new(source.into()) }
}

impl RedbStore {
    /// Opens (or creates) the store file at `path`. Blocking: call it from a blocking context
    /// or through [`RedbStore::open_async`].
    pub fn open(path: &Path, options: RedbStoreOptions) -> Result<Self, StoreError> {
        let action = format!("opening the store at {}", path.display());
        let db = Database::create(path).map_err(backend(action.clone()))?;
        let (sender, _) = broadcast::channel(options.watch_buffer.max(1));
        let (open, _) = tokio::sync::watch::channel(());
        let inner = Inner {
            open_signal: open,
            db,
            path: path.to_owned(),
            history_revisions: options.history_revisions.max(1),
            subscriptions: sender.clone(),
            writer: Mutex::new(sender),
            queued: Mutex::new(Vec::new()),
        };
        inner.initialize().map_err(|e| match e {
            StoreError::Backend { action: inner_action, source } => {
                StoreError::Backend { action: format!("{action}: {inner_action}"), source }
            }
            other => other,
        })?;
        Ok(Self { inner: Arc::new(inner) })
    }

    pub async fn open_async(path: PathBuf, options: RedbStoreOptions) -> Result<Self, StoreError> {
        let action = format!("opening the store at {}", path.display());
        tokio::task::spawn_blocking(move || Self::open(&path, options))
            .await
            .map_err(|source| StoreError::Task { action, source })?
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A signal that resolves when the file is closed (operations still running in blocking
    /// threads hold it open after the last clone is dropped).
    pub fn closed(&self) -> StoreClosed {
        StoreClosed { open: self.inner.open_signal.subscribe() }
    }

    async fn blocking<T, F>(&self, action: &str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|source| StoreError::Task { action: action.to_owned(), source })?
    }
}

impl Inner {
    /// Creates the tables and counters of a new file, and trims a log longer than the
    /// configured history (the limit may have been lowered since the last run).
    fn initialize(&self) -> Result<(), StoreError> {
        let action = "initializing the tables";
        let mut tx = self.db.begin_write().map_err(backend(action))?;
        tx.set_durability(Durability::Immediate).map_err(|source| StoreError::Backend {
            action: action.to_owned(),
            source: Box::new(source),
        })?;
        {
            tx.open_table(VALUES).map_err(backend(action))?;
            let mut changes = tx.open_table(CHANGES).map_err(backend(action))?;
            let mut meta = tx.open_table(META).map_err(backend(action))?;
            let revision = read_counter(&meta, META_REVISION, action)?;
            if revision.is_none() {
                meta.insert(META_REVISION, EMPTY_STORE_REVISION).map_err(backend(action))?;
                meta.insert(META_COMPACTED, 0).map_err(backend(action))?;
            }
            let revision = revision.unwrap_or(EMPTY_STORE_REVISION);
            let compacted = read_counter(&meta, META_COMPACTED, action)?.unwrap_or(0);
            self.trim_history(&mut changes, &mut meta, revision, compacted, action)?;
        }
        tx.commit().map_err(backend(action))
    }

    fn trim_history(
        &self,
        changes: &mut redb::Table<u64, &[u8]>,
        meta: &mut redb::Table<&str, u64>,
        revision: Revision,
        compacted: Revision,
        action: &str,
    ) -> Result<(), StoreError> {
        if revision <= compacted.saturating_add(self.history_revisions) {
            return Ok(());
        }
        let keep_after = revision - self.history_revisions;
        changes.retain_in(..=keep_after, |_, _| false).map_err(backend(action))?;
        meta.insert(META_COMPACTED, keep_after).map_err(backend(action))?;
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let action = format!("reading {key}");
        let tx = self.db.begin_read().map_err(backend(action.as_str()))?;
        let values = tx.open_table(VALUES).map_err(backend(action.as_str()))?;
        let Some(guard) = values.get(key).map_err(backend(action.as_str()))? else {
            return Ok(None);
        };
        let record = decode_record(guard.value(), &action)?;
        Ok(Some(KeyValue {
            key: key.to_owned(),
            value: record.value,
            create_revision: record.create_revision,
            mod_revision: record.mod_revision,
        }))
    }

    fn snapshot(&self, prefixes: &[String]) -> Result<Snapshot, StoreError> {
        let action = format!("listing {prefixes:?}");
        let tx = self.db.begin_read().map_err(backend(action.as_str()))?;
        let values = tx.open_table(VALUES).map_err(backend(action.as_str()))?;
        let meta = tx.open_table(META).map_err(backend(action.as_str()))?;
        let revision = read_counter(&meta, META_REVISION, &action)?.unwrap_or(EMPTY_STORE_REVISION);
        let mut lists = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            let mut items = Vec::new();
            for entry in values.range(prefix.as_str()..).map_err(backend(action.as_str()))? {
                let (key, value) = entry.map_err(backend(action.as_str()))?;
                let key = key.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                let record = decode_record(value.value(), &action)?;
                items.push(KeyValue {
                    key: key.to_owned(),
                    value: record.value,
                    create_revision: record.create_revision,
                    mod_revision: record.mod_revision,
                });
            }
            lists.push(items);
        }
        Ok(Snapshot { lists, revision })
    }

    fn counters(&self) -> Result<(Revision, Revision), StoreError> {
        let action = "reading the store revision";
        let tx = self.db.begin_read().map_err(backend(action))?;
        let meta = tx.open_table(META).map_err(backend(action))?;
        let revision = read_counter(&meta, META_REVISION, action)?.unwrap_or(EMPTY_STORE_REVISION);
        let compacted = read_counter(&meta, META_COMPACTED, action)?.unwrap_or(0);
        Ok((revision, compacted))
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let action = "committing a transaction";
        let mut written = HashSet::new();
        for op in &ops {
            if !written.insert(op.key()) {
                return Err(StoreError::InvalidTxn {
                    detail: format!("it writes {} twice", op.key()),
                });
            }
            if let Op::Put { key, value } = op
                && value.len() > MAX_VALUE_BYTES
            {
                return Err(StoreError::InvalidTxn {
                    detail: format!(
                        "the value of {key} has {} bytes, more than the {MAX_VALUE_BYTES} allowed",
                        value.len()
                    ),
                });
            }
        }
        let poisoned = || StoreError::Poisoned { action: action.to_owned() };
        let (outcome, receiver) = std::sync::mpsc::sync_channel(1);
        self.queued.lock().map_err(|_| poisoned())?.push(QueuedTxn { compares, ops, outcome });
        loop {
            let sender = self.writer.lock().map_err(|_| poisoned())?;
            // The holder before us may have committed ours with its group: it answers before
            // it lets the lock go.
            if let Ok(result) = receiver.try_recv() {
                return result;
            }
            let group: Vec<QueuedTxn> = {
                let mut queued = self.queued.lock().map_err(|_| poisoned())?;
                let take = queued.len().min(MAX_GROUP);
                queued.drain(..take).collect()
            };
            self.commit_group(&sender, group);
            drop(sender);
            // Ours was in the group unless more than MAX_GROUP were ahead of it.
            if let Ok(result) = receiver.try_recv() {
                return result;
            }
        }
    }

    /// Commits `group` in one write transaction, each in order with a revision of its own,
    /// then broadcasts what each changed and answers each. If the write transaction fails,
    /// none of them is committed and each is told so.
    fn commit_group(&self, sender: &broadcast::Sender<Arc<WatchBatch>>, group: Vec<QueuedTxn>) {
        let (txns, answers): (Vec<_>, Vec<_>) =
            group.into_iter().map(|q| ((q.compares, q.ops), q.outcome)).unzip();
        match self.write_group(txns) {
            Ok(results) => {
                for (outcome, batch) in &results {
                    if let (TxnOutcome::Committed { .. }, Some(batch)) = (outcome, batch) {
                        // An error only means nobody is watching right now.
                        let _ = sender.send(Arc::clone(batch));
                    }
                }
                for ((outcome, _), answer) in results.into_iter().zip(answers) {
                    let _ = answer.send(Ok(outcome));
                }
            }
            Err(error) => {
                let message = crate::error_chain(&error);
                for answer in answers {
                    let _ = answer.send(Err(StoreError::Backend {
                        action: "committing a transaction".to_owned(),
                        source: message.clone().into(),
                    }));
                }
            }
        }
    }

    /// The write transaction of a group: each transaction's outcome, and what it changed.
    #[expect(clippy::type_complexity, reason = "one outcome and its watch batch per transaction")]
    fn write_group(
        &self,
        txns: Vec<(Vec<Compare>, Vec<Op>)>,
    ) -> Result<Vec<(TxnOutcome, Option<Arc<WatchBatch>>)>, StoreError> {
        let action = "committing a transaction";
        let mut tx = self.db.begin_write().map_err(backend(action))?;
        tx.set_durability(Durability::Immediate).map_err(|source| StoreError::Backend {
            action: action.to_owned(),
            source: Box::new(source),
        })?;
        let mut results = Vec::with_capacity(txns.len());
        {
            let mut values = tx.open_table(VALUES).map_err(backend(action))?;
            let mut meta = tx.open_table(META).map_err(backend(action))?;
            let mut changes = tx.open_table(CHANGES).map_err(backend(action))?;
            let mut revision =
                read_counter(&meta, META_REVISION, action)?.unwrap_or(EMPTY_STORE_REVISION);
            let first_revision = revision;
            for (compares, ops) in txns {
                let outcome =
                    apply_txn(&mut values, &mut changes, revision, &compares, ops, action)?;
                if let (TxnOutcome::Committed { revision: committed }, Some(_)) = &outcome {
                    revision = *committed;
                }
                results.push(outcome);
            }
            if revision != first_revision {
                meta.insert(META_REVISION, revision).map_err(backend(action))?;
                let compacted = read_counter(&meta, META_COMPACTED, action)?.unwrap_or(0);
                self.trim_history(&mut changes, &mut meta, revision, compacted, action)?;
            }
        }
        tx.commit().map_err(backend(action))?;
        Ok(results)
    }

    fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let action = format!("compacting history up to revision {revision}");
        let _sender =
            self.writer.lock().map_err(|_| StoreError::Poisoned { action: action.clone() })?;
        let mut tx = self.db.begin_write().map_err(backend(action.as_str()))?;
        tx.set_durability(Durability::Immediate).map_err(|source| StoreError::Backend {
            action: action.clone(),
            source: Box::new(source),
        })?;
        {
            let mut changes = tx.open_table(CHANGES).map_err(backend(action.as_str()))?;
            let mut meta = tx.open_table(META).map_err(backend(action.as_str()))?;
            let current =
                read_counter(&meta, META_REVISION, &action)?.unwrap_or(EMPTY_STORE_REVISION);
            if revision > current {
                return Err(StoreError::FutureRevision { requested: revision, current });
            }
            let compacted = read_counter(&meta, META_COMPACTED, &action)?.unwrap_or(0);
            if revision <= compacted {
                return Ok(());
            }
            changes.retain_in(..=revision, |_, _| false).map_err(backend(action.as_str()))?;
            meta.insert(META_COMPACTED, revision).map_err(backend(action.as_str()))?;
        }
        tx.commit().map_err(backend(action.as_str()))
    }

    /// Reads up to [`REPLAY_PAGE`] logged revisions after `after`, keeping the changes under
    /// `prefix`. Returns the batches, the last revision scanned, and whether the end of the
    /// log was reached.
    fn replay_page(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<(Vec<WatchBatch>, Revision, bool), StoreError> {
        let action = format!("replaying changes under {prefix} after revision {after}");
        let tx = self.db.begin_read().map_err(backend(action.as_str()))?;
        let meta = tx.open_table(META).map_err(backend(action.as_str()))?;
        let compacted = read_counter(&meta, META_COMPACTED, &action)?.unwrap_or(0);
        if after < compacted {
            return Err(StoreError::Compacted { requested: after, compacted });
        }
        let changes = tx.open_table(CHANGES).map_err(backend(action.as_str()))?;
        let mut batches = Vec::new();
        let mut scanned = after;
        let mut read = 0;
        for entry in changes.range(after + 1..).map_err(backend(action.as_str()))? {
            let (revision, encoded) = entry.map_err(backend(action.as_str()))?;
            let revision = revision.value();
            let events = decode_events(encoded.value(), revision, &action)?;
            scanned = revision;
            read += 1;
            if let Some(batch) = filter_batch(prefix, revision, &events) {
                batches.push(batch);
            }
            if read == REPLAY_PAGE {
                return Ok((batches, scanned, false));
            }
        }
        Ok((batches, scanned, true))
    }
}

fn read_counter(
    meta: &impl ReadableTable<&'static str, u64>,
    name: &str,
    action: &str,
) -> Result<Option<u64>, StoreError> {
    Ok(meta.get(name).map_err(backend(action))?.map(|guard| guard.value()))
}

fn filter_batch(prefix: &str, revision: Revision, events: &[WatchEvent]) -> Option<WatchBatch> {
    let events: Vec<WatchEvent> =
        events.iter().filter(|event| event.key.starts_with(prefix)).cloned().collect();
    (!events.is_empty()).then_some(WatchBatch { revision, events })
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.blocking("reading a key", move |inner| inner.get(&key)).await
    }

    async fn snapshot(&self, prefixes: &[String]) -> Result<Snapshot, StoreError> {
        let prefixes = prefixes.to_vec();
        self.blocking("listing keys", move |inner| inner.snapshot(&prefixes)).await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.blocking("reading the revision", |inner| Ok(inner.counters()?.0)).await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        self.blocking("committing a transaction", move |inner| inner.txn(compares, ops)).await
    }

    async fn watch(
        &self,
        prefix: &str,
        after_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        // Subscribe first: every commit from now on reaches `live`, every earlier one is in
        // the log that the replay reads.
        let live = self.inner.subscriptions.subscribe();
        let (_, compacted) = self.blocking("starting a watch", |inner| inner.counters()).await?;
        if after_revision < compacted {
            return Err(StoreError::Compacted { requested: after_revision, compacted });
        }
        let watcher = Watcher {
            inner: Arc::downgrade(&self.inner),
            prefix: prefix.to_owned(),
            scanned: after_revision,
            pending: VecDeque::new(),
            live,
            replaying: true,
            finished: false,
        };
        Ok(Box::pin(futures::stream::unfold(watcher, |mut watcher| async move {
            let item = watcher.next().await?;
            Some((item, watcher))
        })))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.blocking("compacting", move |inner| inner.compact(revision)).await
    }

    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        self.blocking("reading the compacted revision", |inner| Ok(inner.counters()?.1)).await
    }
}

/// The state of one watch stream: replaying the log, then following the live broadcast.
struct Watcher {
    /// Weak, so that open watch streams do not keep the file open after the store is dropped.
    inner: Weak<Inner>,
    prefix: String,
    /// Every revision up to this one has been delivered (or did not touch `prefix`).
    scanned: Revision,
    pending: VecDeque<WatchBatch>,
    live: broadcast::Receiver<Arc<WatchBatch>>,
    replaying: bool,
    finished: bool,
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<WatchBatch, StoreError>> {
        loop {
            if self.finished {
                return None;
            }
            if let Some(batch) = self.pending.pop_front() {
                return Some(Ok(batch));
            }
            if self.replaying {
                let inner = self.inner.upgrade()?;
                let prefix = self.prefix.clone();
                let after = self.scanned;
                let page = tokio::task::spawn_blocking(move || inner.replay_page(&prefix, after))
                    .await
                    .map_err(|source| StoreError::Task {
                        action: "replaying the change log".to_owned(),
                        source,
                    })
                    .and_then(|page| page);
                match page {
                    Ok((batches, scanned, at_end)) => {
                        self.pending.extend(batches);
                        self.scanned = scanned;
                        self.replaying = !at_end;
                    }
                    Err(error) => {
                        self.finished = true;
                        return Some(Err(error));
                    }
                }
                continue;
            }
            match self.live.recv().await {
                Ok(batch) => {
                    if batch.revision <= self.scanned {
                        continue;
                    }
                    self.scanned = batch.revision;
                    if let Some(batch) = filter_batch(&self.prefix, batch.revision, &batch.events) {
                        return Some(Ok(batch));
                    }
                }
                // Too slow for the live buffer: catch up from the log, which still has what
                // was missed unless it was compacted (then the replay reports it).
                Err(broadcast::error::RecvError::Lagged(_)) => self.replaying = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

fn encode_record(mod_revision: Revision, create_revision: Revision, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&mod_revision.to_be_bytes());
    out.extend_from_slice(&create_revision.to_be_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_record(raw: &[u8], action: &str) -> Result<Record, StoreError> {
    let mut reader = Reader { raw, action };
    let mod_revision = reader.u64()?;
    let create_revision = reader.u64()?;
    Ok(Record { mod_revision, create_revision, value: Bytes::copy_from_slice(reader.raw) })
}

/// Log entry layout, per event: kind (u8: 0 put, 1 delete), key (u32 BE length ‖ bytes),
/// value (u32 BE length ‖ bytes), previous value present (u8), then (u32 BE length ‖ bytes).
fn encode_events(events: &[WatchEvent]) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, bytes: &[u8]) {
        // `txn` refuses values over MAX_VALUE_BYTES and keys are object paths, so every
        // length fits in a u32.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::new();
    for event in events {
        out.push(match event.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        chunk(&mut out, event.key.as_bytes());
        chunk(&mut out, &event.value);
        match &event.prev_value {
            Some(prev) => {
                out.push(1);
                chunk(&mut out, prev);
            }
            None => out.push(0),
        }
    }
    out
}

fn decode_events(
    raw: &[u8],
    revision: Revision,
    action: &str,
) -> Result<Vec<WatchEvent>, StoreError> {
    let mut reader = Reader { raw, action };
    let mut events = Vec::new();
    while !reader.raw.is_empty() {
        let kind = match reader.u8()? {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            other => return Err(reader.corrupt(format!("unknown change kind {other}"))),
        };
        let key = String::from_utf8(reader.chunk()?.to_vec())
            .map_err(|_| reader.corrupt("a key is not UTF-8".to_owned()))?;
        let value = Bytes::copy_from_slice(reader.chunk()?);
        let prev_value = match reader.u8()? {
            0 => None,
            _ => Some(Bytes::copy_from_slice(reader.chunk()?)),
        };
        events.push(WatchEvent { kind, key, value, prev_value, revision });
    }
    Ok(events)
}

struct Reader<'a> {
    raw: &'a [u8],
    action: &'a str,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, detail: String) -> StoreError {
        StoreError::Corrupt { action: self.action.to_owned(), detail }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.raw.len() < n {
            return Err(self.corrupt(format!("{} bytes left, {n} expected", self.raw.len())));
        }
        let (head, rest) = self.raw.split_at(n);
        self.raw = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let bytes = self.take(8)?;
        let mut array = [0; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_be_bytes(array))
    }

    fn chunk(&mut self) -> Result<&'a [u8], StoreError> {
        let bytes = self.take(4)?;
        let mut array = [0; 4];
        array.copy_from_slice(bytes);
        let len = u32::from_be_bytes(array) as usize;
        self.take(len)
    }
}
