//! Event expiry: an event is removed once it has not happened again for the configured time
//! to live (Kubernetes keeps events for `--event-ttl`, one hour by default). The next expiry is
//! one of the things a pass waits for, so events go on time, not at the next resync.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use k8s_openapi::{api::core::v1::Event, jiff::Timestamp};

use super::{ObjectCache, Reconciler};
use crate::api::{
    error::ApiError,
    kinds::event::{EventStrategy, last_seen},
    typed::TypedKind,
};

/// Kubernetes' default `--event-ttl`.
pub const DEFAULT_EVENT_TTL: Duration = Duration::from_secs(3600);

/// The current time to the nanosecond (a wait computed from whole seconds would wake early and
/// spin until the second turns).
fn precise_now() -> Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    Timestamp::from_nanosecond(i128::try_from(since.as_nanos()).unwrap_or(i128::MAX))
        .unwrap_or(Timestamp::MAX)
}

pub struct EventExpiry {
    events: ObjectCache<EventStrategy>,
    ttl: Duration,
}

impl EventExpiry {
    pub fn new(events: Arc<TypedKind<EventStrategy>>, ttl: Duration) -> Self {
        Self { events: ObjectCache::new(events), ttl }
    }

    /// When `event` expires.
    fn expiry(&self, event: &Event) -> Timestamp {
        let ttl = k8s_openapi::jiff::SignedDuration::try_from(self.ttl)
            .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
        // An event without any timestamp is as old as can be: it goes at the first pass.
        last_seen(event)
            .unwrap_or(Timestamp::UNIX_EPOCH)
            .saturating_add(ttl)
            .unwrap_or(Timestamp::MAX)
    }

    /// How long until the next cached event expires (`None` without events).
    fn until_next_expiry(&self) -> Option<Duration> {
        let next = self.events.objects().map(|e| self.expiry(e)).min()?;
        let now = precise_now();
        Some(Duration::try_from(next.duration_since(now)).unwrap_or(Duration::ZERO))
    }
}

#[async_trait]
impl Reconciler for EventExpiry {
    fn name(&self) -> &'static str {
        "event-expiry"
    }

    async fn resync(&mut self) -> Result<(), ApiError> {
        self.events.resync().await
    }

    async fn next_change(&mut self) -> Result<(), ApiError> {
        match self.until_next_expiry() {
            // Sleeping is cancel-safe, and so is the cache's next change: whichever comes
            // first ends the wait, and the pass that follows removes what expired.
            Some(wait) => tokio::select! {
                changed = self.events.next_change() => changed,
                () = tokio::time::sleep(wait) => Ok(()),
            },
            None => self.events.next_change().await,
        }
    }

    async fn drain_ready(&mut self) -> Result<(), ApiError> {
        self.events.drain_ready().await
    }

    async fn reconcile(&mut self) -> Result<(), ApiError> {
        let now = precise_now();
        let expired: Vec<Event> =
            self.events.objects().filter(|e| self.expiry(e) <= now).cloned().collect();
        for event in &expired {
            // False when the event was bumped meanwhile: it lives on, and the cache brings
            // its new version.
            if self.events.kind().remove(event).await? {
                self.events.record_removal(event);
            }
        }
        Ok(())
    }
}
