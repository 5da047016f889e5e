//! When a container that exited starts again: the kubelet's crash-loop back-off
//! (`pkg/kubelet/kuberuntime` `doBackOff` over client-go's `flowcontrol.Backoff`).
//!
//! The first exit of a container is restarted at once. Every restart after that waits, counted
//! from the exit: the initial delay (10 s), then twice the previous delay, up to the maximum
//! (5 min); meanwhile the container waits with reason `CrashLoopBackOff`. A container that ran
//! for longer than twice the maximum (10 min) since its last restart is stable again: its next
//! exit is restarted at once and the delays start over.

use std::time::Duration;

use tokio::time::Instant;

/// The delays of the crash-loop back-off (`--restart-backoff`, `--restart-backoff-max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for BackoffPolicy {
    /// Kubernetes' values (`backOffPeriod`, `MaxContainerBackOff`).
    fn default() -> Self {
        Self { initial: Duration::from_secs(10), max: Duration::from_secs(300) }
    }
}

impl BackoffPolicy {
    /// How long a container must have run since its last restart to count as stable.
    pub fn stable_after(&self) -> Duration {
        self.max * 2
    }
}

/// The back-off state of one container of a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestartBackoff {
    /// The delay the next restart waits for, and when the last restart happened; `None` until
    /// the first restart.
    entry: Option<(Duration, Instant)>,
}

impl RestartBackoff {
    fn expired(&self, policy: &BackoffPolicy, at: Instant) -> bool {
        self.entry
            .is_none_or(|(_, last)| at.saturating_duration_since(last) > policy.stable_after())
    }

    /// When a container that exited at `exited` may start again.
    pub fn restart_at(&self, policy: &BackoffPolicy, exited: Instant) -> Instant {
        match self.entry {
            Some((delay, _)) if !self.expired(policy, exited) => exited + delay,
            _ => exited,
        }
    }

    /// The delay that the restart of a container that exited at `exited` waits for (zero when
    /// it restarts at once), for messages and events.
    pub fn delay(&self, policy: &BackoffPolicy, exited: Instant) -> Duration {
        self.restart_at(policy, exited).saturating_duration_since(exited)
    }

    /// Records a restart, made at `now`, of a container that exited at `exited`: the next one
    /// waits longer, unless the container had become stable.
    pub fn restarted(&mut self, policy: &BackoffPolicy, exited: Instant, now: Instant) {
        let delay = match self.entry {
            Some((delay, _)) if !self.expired(policy, exited) => (delay * 2).min(policy.max),
            _ => policy.initial.min(policy.max),
        };
        self.entry = Some((delay, now));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{BackoffPolicy, RestartBackoff};

    /// The delays before each restart of a container that crashes `crashes` times, each time
    /// right after it started.
    fn delays(policy: &BackoffPolicy, crashes: usize, runs_for: Duration) -> Vec<u64> {
        let mut backoff = RestartBackoff::default();
        let mut now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..crashes {
            let exited = now + runs_for;
            let restart = backoff.restart_at(policy, exited);
            delays.push(restart.duration_since(exited).as_secs());
            backoff.restarted(policy, exited, restart);
            now = restart;
        }
        delays
    }

    #[test]
    fn a_crash_loop_restarts_at_once_then_waits_ten_seconds_doubling_to_five_minutes() {
        let policy = BackoffPolicy::default();
        assert_eq!(
            delays(&policy, 9, Duration::from_secs(1)),
            [0, 10, 20, 40, 80, 160, 300, 300, 300]
        );
    }

    #[test]
    fn a_container_that_ran_ten_minutes_is_stable_and_starts_over() {
        let policy = BackoffPolicy::default();
        let mut backoff = RestartBackoff::default();
        let start = Instant::now();
        backoff.restarted(&policy, start, start);
        backoff.restarted(&policy, start, start);
        assert_eq!(backoff.delay(&policy, start + Duration::from_secs(5)), Duration::from_secs(20));
        let stable = start + Duration::from_secs(601);
        assert_eq!(backoff.delay(&policy, stable), Duration::ZERO, "restarted at once");
        backoff.restarted(&policy, stable, stable);
        let again = stable + Duration::from_secs(1);
        assert_eq!(backoff.delay(&policy, again), Duration::from_secs(10), "delays start over");
    }

    #[test]
    fn short_delays_for_tests_follow_the_same_schedule() {
        let policy = BackoffPolicy { initial: Duration::from_secs(1), max: Duration::from_secs(4) };
        assert_eq!(delays(&policy, 6, Duration::ZERO), [0, 1, 2, 4, 4, 4]);
        assert_eq!(
            delays(&policy, 3, Duration::from_secs(9)),
            [0, 0, 0],
            "each run is longer than twice the maximum"
        );
    }
}
