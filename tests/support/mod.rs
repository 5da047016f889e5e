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
        std::fs::read_to_string("/proc/self/mounts")
            .is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))),
        "{test}: no bpf filesystem at /sys/fs/bpf; the test command mounts it"
    );
    assert!(
        std::process::Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success()),
        "{test}: the ip tool (iproute2) is missing; the test command installs it"
    );
    assert!(
        std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| m.contains(" - cgroup2 ")),
        "{test}: no cgroup v2 hierarchy is mounted"
    );
    true
}

/// A name no other test, process or parallel run uses: `strait-t-<tag>-<pid>-<n>`.
pub fn unique_name(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("strait-t-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A network namespace the test made, deleted when the guard drops (also on panic). Links
/// inside go with it; a veth whose other end lives elsewhere takes that end along.
pub struct NamespaceGuard {
    ns: Option<strait_dataplane::netns::NetNs>,
    name: String,
}

impl NamespaceGuard {
    /// Creates `strait-t-<tag>-…` with its loopback up.
    pub fn new(tag: &str) -> Self {
        let name = unique_name(tag);
        let ns = strait_dataplane::netns::NetNs::create(&name)
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        let guard = Self { ns: Some(ns), name };
        guard.ip(&["link", "set", "lo", "up"]);
        guard
    }

    pub fn ns(&self) -> &strait_dataplane::netns::NetNs {
        self.ns.as_ref().expect("the namespace is open until the guard drops")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> std::path::PathBuf {
        strait_dataplane::netns::named_path(&self.name)
    }

    /// Runs `ip -n <this namespace> <args>` and returns stdout; panics if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("running ip");
        assert!(
            output.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `ip -j -n <ns> <args>` parsed as JSON.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let text = self.ip(&all);
        if text.trim().is_empty() {
            return serde_json::Value::Array(Vec::new());
        }
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {text}"))
    }

    /// Names of the links in this namespace.
    pub fn link_names(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .map(|links| {
                links.iter().filter_map(|link| link["ifname"].as_str().map(str::to_owned)).collect()
            })
            .unwrap_or_default()
    }

    /// A command that runs inside this namespace: the child joins it with setns(2) between
    /// fork and exec, so nothing but that child ever enters it.
    /// Runs the strait-cni plugin in this (node) namespace the way a container runtime does:
    /// `verb` for container `id` whose namespace is `netns`, interface `eth0`, the
    /// configuration on stdin.
    pub fn run_cni(
        &self,
        verb: &str,
        id: &str,
        netns: &std::path::Path,
        config: &serde_json::Value,
    ) -> std::process::Output {
        use std::{io::Write as _, process::Stdio};
        let mut child = self
            .command(env!("CARGO_BIN_EXE_strait-cni"))
            .env_clear()
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting strait-cni");
        let mut stdin = child.stdin.take().expect("the plugin's stdin");
        stdin.write_all(config.to_string().as_bytes()).expect("writing the CNI configuration");
        drop(stdin);
        child.wait_with_output().expect("waiting for strait-cni")
    }

    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        let fd = self.ns().fd().as_raw_fd();
        let mut command = std::process::Command::new(program);
        // SAFETY: setns is async-signal-safe; the descriptor stays open in the child until
        // exec (it is close-on-exec), which is all the child needs.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }

    /// Aborts the test unless traffic from this namespace to `destination` leaves through
    /// `expected_device`, a link the test made. Call it before sending anything.
    pub fn assert_route_stays_inside(&self, destination: &str, expected_device: &str) {
        assert_not_root_namespace(&self.path());
        let routes = self.ip_json(&["route", "get", destination]);
        let device = routes[0]["dev"].as_str().unwrap_or_default();
        assert_eq!(
            device, expected_device,
            "traffic from {} to {destination} would leave through {device:?}: aborting",
            self.name
        );
    }

    /// Deletes the namespace now, dropping this guard's handle so the kernel tears it down.
    pub fn destroy(mut self) {
        self.ns.take();
        let _ = strait_dataplane::netns::NetNs::delete(&self.name);
    }
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        self.ns.take();
        if let Err(e) = strait_dataplane::netns::NetNs::delete(&self.name) {
            eprintln!("cleaning up namespace {}: {e}", self.name);
        }
    }
}

/// Panics if `path` is the root network namespace: the one pid 1 lives in, or where pid 1 is
/// out of sight (a sandbox), the one the test process started in.
pub fn assert_not_root_namespace(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/1/ns/net")
        .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
        .expect("reading the root namespace");
    let this = std::fs::metadata(path).expect("reading the namespace");
    assert!(
        (root.dev(), root.ino()) != (this.dev(), this.ino()),
        "{} is the root network namespace: refusing to go on",
        path.display()
    );
}

/// A directory removed with its contents when dropped: temp dirs, data dirs, and pin
/// directories under `/sys/fs/bpf/strait/` (bpffs allows unlink and rmdir of pins).
pub struct DirGuard(std::path::PathBuf);

impl DirGuard {
    /// `<system temp>/strait-t-<tag>-…`.
    pub fn temp(tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        Self(path)
    }

    /// `/sys/fs/bpf/strait/t-<unique>/node`, a test-owned pin directory. The whole
    /// `t-<unique>` directory goes on drop.
    pub fn pins(tag: &str) -> (Self, std::path::PathBuf) {
        let cluster = std::path::Path::new(strait_dataplane::ebpf::BPFFS_ROOT)
            .join(unique_name(tag).trim_start_matches("strait-"));
        let node = cluster.join("node");
        std::fs::create_dir_all(&node).expect("creating the pin directory");
        (Self(cluster), node)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleaning up {}: {e}", self.0.display());
        }
    }
}

pub mod controller;
pub mod lab;
