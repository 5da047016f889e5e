//! Shared by strait's end-to-end tests: gating of privileged tests and RAII guards that undo
//! what a test made, also when it panics.
#![allow(dead_code, reason = "each test binary uses a different part of this module")]

use std::path::Path;

/// Set by the project's test command when it runs as root: from then on a privileged test that
/// cannot run is a failure, never a silent skip.
pub const REQUIRE_PRIVILEGED: &str = "STRAIT_REQUIRE_PRIVILEGED";

/// Whether a privileged test may go ahead. As root it checks what such tests need (bpffs,
/// cgroup v2, the `ip` tool) and panics if anything is missing. Not as root it skips with a
/// message, unless [`REQUIRE_PRIVILEGED`] is set, in which case it panics.
pub fn privileged(test: &str) -> bool {
    let required = std::env::var_os(REQUIRE_PRIVILEGED).is_some_and(|v| v == "1");
    if !nix::unistd::Uid::effective().is_root() {
        assert!(!required, "{test}: {REQUIRE_PRIVILEGED}=1 but not running as root");
        eprintln!("SKIPPED {test}: needs root (set {REQUIRE_PRIVILEGED}=1 to make this a failure)");
        return false;
    }
    assert!(
        Path::new("/sys/fs/bpf").exists(),
        "{test}: /sys/fs/bpf is missing; the test command mounts it"
    );
    assert!(
        std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| m.contains(" - cgroup2 ")),
        "{test}: no cgroup v2 hierarchy is mounted"
    );
    true
}
