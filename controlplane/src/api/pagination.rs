//! List pagination (`limit` and `continue`): every page of a list shows the collection as it
//! was at the revision of the first page, as Kubernetes serves pages from etcd at that
//! revision.
//!
//! The continue token carries that revision and the last key served. A later page reads the
//! collection now and undoes, from the store's history, what changed since: a key changed
//! after the list's revision takes the value it had then (the previous value of its first
//! later change), with the revision of its last write up to then. When the history needed is
//! compacted, the token has expired (410), and the client lists again.

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt;

use super::error::ApiError;
use crate::store::{EventKind, KeyValue, Revision, Store, StoreError};

/// How long replaying history may take before the token is given up as expired.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a continued list resumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContinueToken {
    /// The revision of the list's first page.
    pub revision: Revision,
    /// The last key served; the next page starts after it.
    pub after_key: String,
}

impl ContinueToken {
    /// The opaque text form: `<revision>-<key as hex>` (URL-safe as it is).
    pub fn encode(&self) -> String {
        let hex: String = self.after_key.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{}-{hex}", self.revision)
    }

    pub fn decode(text: &str) -> Result<Self, ApiError> {
        let invalid = || ApiError::BadRequest(format!("continue token {text:?} is not valid"));
        let (revision, hex) = text.split_once('-').ok_or_else(invalid)?;
        let revision = revision.parse().map_err(|_| invalid())?;
        if hex.len() % 2 != 0 {
            return Err(invalid());
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| invalid())?;
        let after_key = String::from_utf8(bytes).map_err(|_| invalid())?;
        Ok(Self { revision, after_key })
    }
}

fn expired(requested: Revision, compacted: Revision) -> ApiError {
    ApiError::Expired { requested, compacted }
}

/// The keys under `prefix` as they were at `revision`, sorted by key, given `live` (the keys
/// under `prefix` now, read at `now`).
pub async fn list_at(
    store: &dyn Store,
    prefix: &str,
    revision: Revision,
    live: Vec<KeyValue>,
    now: Revision,
) -> Result<Vec<KeyValue>, ApiError> {
    let mut state: BTreeMap<String, KeyValue> =
        live.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
    if revision >= now {
        return Ok(state.into_values().collect());
    }
    // The first change after `revision` of every key under the prefix: its previous value is
    // the key's value at `revision`.
    let mut first_change: BTreeMap<String, Option<bytes::Bytes>> = BTreeMap::new();
    replay(store, revision, now, |event| {
        if event.key.starts_with(prefix) && !first_change.contains_key(&event.key) {
            first_change.insert(event.key.clone(), event.prev_value.clone());
        }
    })
    .await?;
    if first_change.is_empty() {
        return Ok(state.into_values().collect());
    }
    // The revision of each restored value is that of its key's last write up to `revision`,
    // which the history before `revision` tells.
    let compacted = store
        .compacted_revision()
        .await
        .map_err(ApiError::store("reading the compacted revision"))?;
    let mut last_write: BTreeMap<String, (Revision, Revision)> = BTreeMap::new();
    let restored: Vec<&String> =
        first_change.iter().filter(|(_, prev)| prev.is_some()).map(|(key, _)| key).collect();
    if !restored.is_empty() {
        replay(store, compacted, revision, |event| {
            if restored.contains(&&event.key) {
                let created = match (event.kind, event.prev_value.is_some()) {
                    (EventKind::Put, false) => event.revision,
                    _ => last_write.get(&event.key).map_or(0, |(created, _)| *created),
                };
                last_write.insert(event.key.clone(), (created, event.revision));
            }
        })
        .await?;
    }
    for (key, previous) in first_change {
        match previous {
            None => {
                state.remove(&key);
            }
            Some(value) => {
                let Some(&(create_revision, mod_revision)) = last_write.get(&key) else {
                    // Written before the kept history: its revision then is unknown.
                    return Err(expired(revision, compacted));
                };
                state.insert(key.clone(), KeyValue { key, value, create_revision, mod_revision });
            }
        }
    }
    Ok(state.into_values().collect())
}

/// Feeds `visit` every change with a revision in `(after, until]`, in order.
async fn replay(
    store: &dyn Store,
    after: Revision,
    until: Revision,
    mut visit: impl FnMut(&crate::store::WatchEvent),
) -> Result<(), ApiError> {
    if after >= until {
        return Ok(());
    }
    // The whole key space: every revision has at least one change somewhere, so the stream
    // reaches `until` even when nothing under the list's prefix changed.
    let mut changes = match store.watch("", after).await {
        Ok(changes) => changes,
        Err(StoreError::Compacted { requested, compacted }) => {
            return Err(expired(requested, compacted));
        }
        Err(error) => return Err(ApiError::store("reading the history of the list")(error)),
    };
    let read = async {
        while let Some(batch) = changes.next().await {
            let batch = match batch {
                Ok(batch) => batch,
                Err(StoreError::Compacted { requested, compacted }) => {
                    return Err(expired(requested, compacted));
                }
                Err(error) => {
                    return Err(ApiError::store("reading the history of the list")(error));
                }
            };
            if batch.revision > until {
                return Ok(());
            }
            for event in &batch.events {
                visit(event);
            }
            if batch.revision == until {
                return Ok(());
            }
        }
        Ok(())
    };
    // A store shared with writers outside it (an etcd cluster used by others) may have
    // revisions without a change of its own; the history then never reaches `until`. The
    // token is then treated as expired: clients (client-go's pager) list again in full.
    match tokio::time::timeout(HISTORY_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(expired(after, after)),
    }
}

#[cfg(test)]
mod tests {
    use super::ContinueToken;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let token =
            ContinueToken { revision: 42, after_key: "/registry/pods/default/web-1".to_owned() };
        assert_eq!(ContinueToken::decode(&token.encode()).unwrap(), token);
        for bad in ["", "42", "x-00", "42-0", "42-zz", "42-ff"] {
            assert!(ContinueToken::decode(bad).is_err(), "{bad:?}");
        }
    }
}
