//! Leader election for a control plane of several replicas on one etcd.
//!
//! Every replica serves the API (active-active); the scheduler and the controllers run on one
//! replica at a time, the leader. A replica leads while it holds the key `/meta/leader` under
//! the cluster's root, written with "create if absent" and attached to an etcd lease that it
//! keeps alive. A replica that dies stops renewing; etcd expires the lease after its TTL,
//! deletes the key with it, and the replicas watching the key campaign again.
//!
//! A leader steps down, stopping its controllers at once, when it cannot prove its lease is
//! still alive: the renewal deadline is counted from the moment each keep-alive was *sent*,
//! which is no later than etcd's own count, so the old leader has stopped before etcd lets
//! anyone else in. It also steps down when the key changes under it. With the embedded store
//! there is one replica, which always leads.

use std::{collections::VecDeque, time::Duration};

use etcd_client::{
    Client, Compare, CompareOp, EventType, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use tokio::{
    sync::watch,
    task::JoinSet,
    time::{Instant, sleep, sleep_until, timeout},
};

use crate::{controllers::shutdown_signalled, store::EtcdStore};

/// The store key of the leader record (under the backend's reserved `/meta/`).
pub const LEADER_KEY: &str = "/meta/leader";
/// How long a single etcd call of the election may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long stopping controllers may take before their tasks are aborted.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("{action}")]
    Etcd {
        action: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{action}: etcd did not answer within {CALL_TIMEOUT:?}")]
    Timeout { action: &'static str },
}

async fn call<T>(
    action: &'static str,
    future: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ElectionError> {
    match timeout(CALL_TIMEOUT, future).await {
        Ok(result) => result.map_err(|source| ElectionError::Etcd { action, source }),
        Err(_) => Err(ElectionError::Timeout { action }),
    }
}

/// One replica's candidacy.
#[derive(Clone)]
pub struct LeaderElection {
    client: Client,
    /// The etcd key of the leader record.
    key: String,
    /// What this replica writes into the record: who leads.
    identity: String,
    lease_ttl: Duration,
}

/// Why a term ended.
#[derive(Debug)]
enum TermEnd {
    Shutdown,
    Lost(String),
}

/// A won election: the lease that holds the key, and its renewal stream.
struct Term {
    lease: i64,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Keep-alives sent and not yet answered, by the instant they were sent.
    sent: VecDeque<Instant>,
    /// The lease is alive at least until then.
    valid_until: Instant,
    /// The revision at which the key was written.
    elected_at: i64,
}

impl LeaderElection {
    /// A candidacy on the store's etcd; `lease_ttl` is rounded up to whole seconds, at least 2
    /// (etcd's smallest lease with its default timing).
    pub fn new(store: &EtcdStore, identity: impl Into<String>, lease_ttl: Duration) -> Self {
        Self {
            client: store.client().clone(),
            key: store.etcd_key(LEADER_KEY),
            identity: identity.into(),
            lease_ttl: Duration::from_secs(lease_ttl.as_secs_f64().ceil().max(2.0) as u64),
        }
    }

    /// Who holds the leader record now, if anyone: the identity it names.
    pub async fn current_leader(&self) -> Result<Option<String>, ElectionError> {
        let mut kv = self.client.kv_client();
        let response = call("reading the leader record", kv.get(self.key.clone(), None)).await?;
        Ok(response.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Waits until this replica holds the leader record (`None`: shutdown came first).
    async fn campaign(
        &self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Term>, ElectionError> {
        let mut kv = self.client.kv_client();
        let mut leases = self.client.lease_client();
        let ttl = i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        loop {
            if *shutdown.borrow() {
                return Ok(None);
            }
            let holder = call("reading the leader record", kv.get(self.key.clone(), None)).await?;
            if let Some(current) = holder.kvs().first() {
                let revision = holder.header().map_or(0, |h| h.revision());
                tracing::debug!(
                    leader = %String::from_utf8_lossy(current.value()),
                    "another replica leads; waiting for its record to go"
                );
                tokio::select! {
                    () = shutdown_signalled(shutdown) => return Ok(None),
                    gone = self.wait_for_deletion(revision + 1) => gone?,
                }
                continue;
            }
            let granted_at = Instant::now();
            let grant = call("granting a leader lease", leases.grant(ttl, None)).await?;
            let lease = grant.id();
            let claim = Txn::new()
                .when([Compare::version(self.key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    self.key.clone(),
                    self.identity.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let claimed = call("claiming the leader record", kv.txn(claim)).await?;
            if !claimed.succeeded() {
                // Someone else was faster; our lease holds nothing.
                let _ = call("revoking an unused lease", leases.revoke(lease)).await;
                continue;
            }
            let valid_until = granted_at + Duration::from_secs(grant.ttl().max(0).unsigned_abs());
            let elected_at = claimed.header().map_or(0, |h| h.revision());
            return Ok(Some(Term {
                lease,
                keeper: None,
                sent: VecDeque::new(),
                valid_until,
                elected_at,
            }));
        }
    }

    /// Resolves when the leader record is deleted at or after `from_revision`.
    async fn wait_for_deletion(&self, from_revision: i64) -> Result<(), ElectionError> {
        let mut watches = self.client.watch_client();
        let options = WatchOptions::new().with_start_revision(from_revision);
        let mut stream =
            call("watching the leader record", watches.watch(self.key.clone(), Some(options)))
                .await?;
        loop {
            let response = stream.message().await.map_err(|source| ElectionError::Etcd {
                action: "watching the leader record",
                source,
            })?;
            let Some(response) = response else { return Ok(()) };
            if response.canceled()
                || response.events().iter().any(|e| e.event_type() == EventType::Delete)
            {
                return Ok(());
            }
        }
    }

    /// Holds a won term until shutdown or until the lease can no longer be proven alive.
    async fn hold(&self, term: &mut Term, shutdown: &mut watch::Receiver<bool>) -> TermEnd {
        let beat = self.lease_ttl / 3;
        // Stop a little before the deadline, so the controllers are gone when it passes.
        let margin = Duration::from_millis(250);
        let mut next_beat = Instant::now();
        let mut watches = self.client.watch_client();
        let options = WatchOptions::new().with_start_revision(term.elected_at + 1);
        let mut record = match call(
            "watching the leader record",
            watches.watch(self.key.clone(), Some(options)),
        )
        .await
        {
            Ok(stream) => stream,
            Err(error) => return TermEnd::Lost(format!("cannot watch the leader record: {error}")),
        };
        loop {
            let deadline = term.valid_until.checked_sub(margin).unwrap_or(term.valid_until);
            tokio::select! {
                () = shutdown_signalled(shutdown) => return TermEnd::Shutdown,
                () = sleep_until(deadline) => {
                    return TermEnd::Lost("the leader lease was not renewed in time".to_owned());
                }
                () = sleep_until(next_beat) => {
                    next_beat = Instant::now() + beat;
                    if let Err(reason) = self.send_keep_alive(term).await {
                        return TermEnd::Lost(reason);
                    }
                }
                answer = next_keep_alive(&mut term.keeper) => match answer {
                    Ok(Some(ttl)) if ttl > 0 => {
                        if let Some(sent) = term.sent.pop_front() {
                            let until = sent + Duration::from_secs(ttl.unsigned_abs());
                            term.valid_until = term.valid_until.max(until);
                        }
                    }
                    Ok(Some(_)) => return TermEnd::Lost("etcd says the leader lease expired".to_owned()),
                    Ok(None) | Err(_) => {
                        // The renewal stream broke: open a new one at the next beat; the
                        // deadline above still bounds how long this replica may lead.
                        tracing::warn!("the leader lease's keep-alive stream broke; reopening it");
                        term.keeper = None;
                        term.sent.clear();
                    }
                },
                changed = record.message() => match changed {
                    Ok(Some(response)) => {
                        let taken = response.canceled() || response.events().iter().any(|event| {
                            event.event_type() == EventType::Delete
                                || event.kv().is_some_and(|kv| kv.lease() != term.lease)
                        });
                        if taken {
                            return TermEnd::Lost("the leader record was removed or replaced".to_owned());
                        }
                    }
                    Ok(None) | Err(_) => {
                        return TermEnd::Lost("the watch on the leader record broke".to_owned());
                    }
                },
            }
        }
    }

    async fn send_keep_alive(&self, term: &mut Term) -> Result<(), String> {
        if term.keeper.is_none() {
            let mut leases = self.client.lease_client();
            let sent_at = Instant::now();
            match call("renewing the leader lease", leases.keep_alive(term.lease)).await {
                // Opening the stream renews once and waits for the answer.
                Ok(keeper) => {
                    term.keeper = Some(keeper);
                    // etcd grants at least the TTL asked for.
                    term.valid_until = term.valid_until.max(sent_at + self.lease_ttl);
                }
                Err(ElectionError::Etcd {
                    source: etcd_client::Error::LeaseKeepAliveError(_),
                    ..
                }) => {
                    return Err("etcd no longer knows the leader lease".to_owned());
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot renew the leader lease yet");
                    return Ok(());
                }
            }
            return Ok(());
        }
        if let Some((keeper, _)) = term.keeper.as_mut() {
            let sent_at = Instant::now();
            if keeper.keep_alive().await.is_err() {
                term.keeper = None;
                term.sent.clear();
            } else {
                term.sent.push_back(sent_at);
            }
        }
        Ok(())
    }

    /// Gives the lease back so another replica can lead at once (best effort: an unreachable
    /// etcd expires it after its TTL anyway).
    async fn resign(&self, term: Term) {
        let mut leases = self.client.lease_client();
        if let Err(error) = call("revoking the leader lease", leases.revoke(term.lease)).await {
            tracing::warn!(%error, "cannot give the leader lease back; it expires on its own");
        }
    }
}

/// The TTL etcd answered the next keep-alive with; pending forever without a stream.
async fn next_keep_alive(
    keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Result<Option<i64>, etcd_client::Error> {
    match keeper {
        Some((_, stream)) => Ok(stream.message().await?.map(|answer| answer.ttl())),
        None => std::future::pending().await,
    }
}

/// Runs what only the leader runs: `start_term` starts it with a stop signal of its own,
/// which turns true when this replica stops leading or shuts down. Without an election (one
/// replica on the embedded store) the only term lasts until shutdown. Returns after shutdown,
/// once the last term's tasks have stopped.
pub async fn run_while_leading(
    election: Option<LeaderElection>,
    mut shutdown: watch::Receiver<bool>,
    mut start_term: impl FnMut(watch::Receiver<bool>) -> JoinSet<()>,
) {
    let Some(election) = election else {
        let mut tasks = start_term(shutdown.clone());
        while tasks.join_next().await.is_some() {}
        return;
    };
    let mut failures = 0u32;
    loop {
        let mut term = match election.campaign(&mut shutdown).await {
            Ok(Some(term)) => term,
            Ok(None) => return,
            Err(error) => {
                failures = failures.saturating_add(1);
                let wait = crate::controllers::backoff(failures).min(Duration::from_secs(2));
                tracing::warn!(%error, ?wait, "leader election failed; trying again");
                tokio::select! {
                    () = shutdown_signalled(&mut shutdown) => return,
                    () = sleep(wait) => continue,
                }
            }
        };
        failures = 0;
        tracing::info!(identity = %election.identity, "this replica is the leader; starting the controllers");
        let (stop_term, term_stopped) = watch::channel(false);
        let mut tasks = start_term(term_stopped);
        let end = election.hold(&mut term, &mut shutdown).await;
        let _ = stop_term.send(true);
        if matches!(end, TermEnd::Lost(_)) {
            // Another replica may lead soon: no pass of ours may go on writing meanwhile.
            tasks.abort_all();
        }
        let stopped =
            timeout(STOP_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
        if stopped.is_err() {
            tracing::warn!("controllers still running after shutdown began; aborting them");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        election.resign(term).await;
        match end {
            TermEnd::Shutdown => return,
            TermEnd::Lost(reason) => {
                tracing::warn!(%reason, "this replica stopped leading; its controllers are stopped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use tokio::{sync::watch, task::JoinSet, time::Instant};

    use super::{LEADER_KEY, LeaderElection, run_while_leading};
    use crate::testing::LocalEtcd;

    /// What the terms of one candidate did: `(name, term, started)` in order.
    type Log = Arc<Mutex<Vec<(&'static str, usize, bool)>>>;

    fn candidate(
        name: &'static str,
        election: LeaderElection,
        log: &Log,
    ) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let (shutdown, stopped) = watch::channel(false);
        let log = Arc::clone(log);
        let mut terms = 0;
        let task = tokio::spawn(run_while_leading(Some(election), stopped, move |mut term| {
            terms += 1;
            let (log, number) = (Arc::clone(&log), terms);
            log.lock().unwrap().push((name, number, true));
            // Logs when the term's task ends, whether it stopped on the signal or was aborted.
            struct Ended(Log, &'static str, usize);
            impl Drop for Ended {
                fn drop(&mut self) {
                    if let Ok(mut log) = self.0.lock() {
                        log.push((self.1, self.2, false));
                    }
                }
            }
            let mut tasks = JoinSet::new();
            tasks.spawn(async move {
                let _ended = Ended(log, name, number);
                crate::controllers::shutdown_signalled(&mut term).await;
            });
            tasks
        }));
        (shutdown, task)
    }

    async fn until(what: &str, log: &Log, check: impl Fn(&[(&'static str, usize, bool)]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check(&log.lock().unwrap()) {
            assert!(Instant::now() < deadline, "{what}: {:?}", log.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_whose_record_vanishes_stops_its_term_at_once() {
        let etcd = LocalEtcd::start("leader-vanish").await.expect("etcd starts");
        let store = etcd.store("/strait/leader").await.unwrap();
        let log: Log = Arc::default();
        let election = LeaderElection::new(&store, "a", Duration::from_secs(2));
        let (shutdown, task) = candidate("a", election.clone(), &log);
        until("a leads", &log, |log| log.len() == 1).await;
        assert_eq!(election.current_leader().await.unwrap().as_deref(), Some("a"));

        // The record goes (as when its lease is revoked or someone deletes it).
        let removed = Instant::now();
        let mut kv = store.client().kv_client();
        kv.delete(store.etcd_key(LEADER_KEY), None).await.unwrap();
        until("the term stops", &log, |log| log.contains(&("a", 1, false))).await;
        assert!(
            removed.elapsed() < Duration::from_secs(1),
            "stopped after {:?}",
            removed.elapsed()
        );
        // Alone, it campaigns again and wins a new term.
        until("a leads again", &log, |log| log.contains(&("a", 2, true))).await;

        shutdown.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(log.lock().unwrap().last(), Some(&("a", 2, false)));
        assert_eq!(election.current_leader().await.unwrap(), None, "shutdown gives the lease back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_candidate_leads_at_a_time_and_the_next_takes_over_on_shutdown() {
        let etcd = LocalEtcd::start("leader-two").await.expect("etcd starts");
        let store = etcd.store("/strait/leader").await.unwrap();
        let log: Log = Arc::default();
        let (stop_a, a) =
            candidate("a", LeaderElection::new(&store, "a", Duration::from_secs(2)), &log);
        until("a leads", &log, |log| log.len() == 1).await;
        let (stop_b, b) =
            candidate("b", LeaderElection::new(&store, "b", Duration::from_secs(2)), &log);
        // Several lease periods: b must not start while a holds the lease.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(*log.lock().unwrap(), [("a", 1, true)], "only a leads");

        let stopped = Instant::now();
        stop_a.send(true).unwrap();
        a.await.unwrap();
        until("b takes over", &log, |log| log.contains(&("b", 1, true))).await;
        assert!(stopped.elapsed() < Duration::from_secs(1), "took {:?}", stopped.elapsed());
        let entries = log.lock().unwrap().clone();
        let a_stopped = entries.iter().position(|e| *e == ("a", 1, false)).unwrap();
        let b_started = entries.iter().position(|e| *e == ("b", 1, true)).unwrap();
        assert!(a_stopped < b_started, "terms never overlap: {entries:?}");
        stop_b.send(true).unwrap();
        b.await.unwrap();
    }
}
