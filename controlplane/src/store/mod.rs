//! The durable key-value store under the API server.
//!
//! The model is etcd's, so that an etcd backend can sit behind the same trait with identical
//! behaviour: string keys, byte values, and one global revision that grows by one with every
//! transaction that changes something. A key's `mod_revision` is the revision of its last
//! write; the API server publishes it as the object's `metadata.resourceVersion`.
//!
//! Watches deliver every change after a revision exactly once and in order, grouped by the
//! revision (transaction) that made them. History is bounded: once a revision is compacted,
//! a watch that would need it fails with [`StoreError::Compacted`] and the caller relists.

use std::{pin::Pin, sync::Arc};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub mod etcd;
pub mod redb;

#[cfg(test)]
mod tests;

pub use self::{
    etcd::{EtcdStore, EtcdStoreOptions},
    redb::{RedbStore, RedbStoreOptions, StoreClosed},
};

/// A store revision. Revision 1 is the empty store; every committed change adds one.
pub type Revision = u64;

/// One stored key with its value and the revisions that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the transaction that created the key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last transaction that wrote the key.
    pub mod_revision: Revision,
}

/// The result of reading one or more key prefixes in a single consistent view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// One list per requested prefix, in the order requested, each sorted by key.
    pub lists: Vec<Vec<KeyValue>>,
    /// The store revision the read observed.
    pub revision: Revision,
}

/// A list of one prefix and the revision it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListResult {
    pub items: Vec<KeyValue>,
    pub revision: Revision,
}

/// A condition a transaction checks before applying its operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent { key: String },
    /// The key exists and was last written at exactly this revision.
    ModRevision { key: String, revision: Revision },
}

impl Compare {
    pub fn key(&self) -> &str {
        match self {
            Self::Absent { key } | Self::ModRevision { key, .. } => key,
        }
    }
}

/// A write inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Bytes,
    },
    /// Deleting an absent key is not an error and changes nothing.
    Delete {
        key: String,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Delete { key } => key,
        }
    }
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every compare held and the operations were applied atomically. `revision` is the new
    /// store revision (unchanged when the operations changed nothing).
    Committed { revision: Revision },
    /// The compare at this index (into the `compares` given) did not hold; nothing changed.
    CompareFailed { index: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub key: String,
    /// The new value (empty for deletes).
    pub value: Bytes,
    /// The value before this change: always present for deletes, present for puts that
    /// overwrote an existing key.
    pub prev_value: Option<Bytes>,
    /// The revision of the transaction that made the change.
    pub revision: Revision,
}

/// All changes of one transaction under the watched prefix. Never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: Revision,
    pub events: Vec<WatchEvent>,
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The history a watch needs (changes after `requested`) was compacted away.
    #[error(
        "the changes after revision {requested} are no longer kept (history was compacted up to revision {compacted})"
    )]
    Compacted { requested: Revision, compacted: Revision },
    #[error("revision {requested} is newer than the store's revision {current}")]
    FutureRevision { requested: Revision, current: Revision },
    #[error("{action}")]
    Backend {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The transaction itself is malformed (a key written twice, a value too large).
    #[error("invalid transaction: {detail}")]
    InvalidTxn { detail: String },
    #[error("{action}: the stored record is corrupt: {detail}")]
    Corrupt { action: String, detail: String },
    #[error("{action}: the store's worker task failed")]
    Task {
        action: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("{action}: the store's writer lock was poisoned by a panic")]
    Poisoned { action: String },
}

/// The store every control-plane component reads and writes through.
#[async_trait]
pub trait Store: Send + Sync {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Reads every key under each prefix, all in one consistent view.
    async fn snapshot(&self, prefixes: &[String]) -> Result<Snapshot, StoreError>;

    /// Reads every key under `prefix` and the revision of the read.
    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        let mut snapshot = self.snapshot(&[prefix.to_owned()]).await?;
        let items = snapshot.lists.pop().unwrap_or_default();
        Ok(ListResult { items, revision: snapshot.revision })
    }

    /// The current revision.
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// Checks every compare and, only if all hold, applies every op, atomically and durably.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError>;

    /// Streams every change under `prefix` made after `after_revision`, each exactly once and
    /// in revision order, then live changes as they are committed. Fails with
    /// [`StoreError::Compacted`] (at once or later in the stream, if the watcher falls too far
    /// behind) when the needed history is gone.
    async fn watch(
        &self,
        prefix: &str,
        after_revision: Revision,
    ) -> Result<WatchStream, StoreError>;

    /// Discards the history of changes at and before `revision`; watches that would need it
    /// fail with [`StoreError::Compacted`] afterwards. Current values are kept.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// The revision up to which history has been compacted (0 when nothing was).
    async fn compacted_revision(&self) -> Result<Revision, StoreError>;
}

/// How the rest of the control plane holds the store.
pub type SharedStore = Arc<dyn Store>;

/// Where a controller keeps its store: `embedded` (the redb file in its data directory, the
/// default) or `etcd://host:port[,host:port…][/root]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreLocation {
    #[default]
    Embedded,
    Etcd {
        endpoints: Vec<String>,
        /// The root of the cluster's keys; `None`: `/strait/<cluster>`.
        root: Option<String>,
    },
}

impl std::str::FromStr for StoreLocation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "embedded" || text == "redb" {
            return Ok(Self::Embedded);
        }
        let Some(rest) = text.strip_prefix("etcd://") else {
            return Err(format!(
                "{text:?} is neither `embedded` nor an etcd URL like etcd://127.0.0.1:2379"
            ));
        };
        let (hosts, root) = match rest.find('/') {
            Some(slash) => (&rest[..slash], Some(rest[slash..].trim_end_matches('/'))),
            None => (rest, None),
        };
        let endpoints: Vec<String> = hosts.split(',').map(str::to_owned).collect();
        for endpoint in &endpoints {
            let valid = endpoint
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(format!("{endpoint:?} in {text:?} is not host:port"));
            }
        }
        let root = match root {
            Some("") | None => None,
            Some(root) => Some(root.to_owned()),
        };
        Ok(Self::Etcd { endpoints, root })
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded => f.write_str("embedded"),
            Self::Etcd { endpoints, root } => {
                write!(f, "etcd://{}{}", endpoints.join(","), root.as_deref().unwrap_or(""))
            }
        }
    }
}

#[cfg(test)]
mod location_tests {
    use super::StoreLocation;

    #[test]
    fn store_locations_parse_from_the_command_line_forms() {
        assert_eq!("embedded".parse::<StoreLocation>(), Ok(StoreLocation::Embedded));
        assert_eq!(
            "etcd://127.0.0.1:2379,10.0.0.2:2379".parse::<StoreLocation>(),
            Ok(StoreLocation::Etcd {
                endpoints: vec!["127.0.0.1:2379".to_owned(), "10.0.0.2:2379".to_owned()],
                root: None
            })
        );
        let with_root: StoreLocation = "etcd://h:1/clusters/prod/".parse().unwrap();
        assert_eq!(
            with_root,
            StoreLocation::Etcd {
                endpoints: vec!["h:1".to_owned()],
                root: Some("/clusters/prod".to_owned())
            }
        );
        assert_eq!(with_root.to_string(), "etcd://h:1/clusters/prod");
        for bad in ["etcd://", "etcd://host", "etcd://h:notaport", "http://h:1", "etcd://:1"] {
            assert!(bad.parse::<StoreLocation>().is_err(), "{bad}");
        }
    }
}
