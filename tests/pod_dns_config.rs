//! A pod's `/etc/resolv.conf`: a process started through `ChildSetup` with the pod's file sees
//! that file, in a mount namespace of its own, and the node sees nothing of it.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use strait_dataplane::runtime::{
    process::{ChildSetup, RESOLV_CONF},
    record::RecordStore,
};
use support::{DirGuard, NamespaceGuard};

const POD_RESOLV_CONF: &str = concat!(
    "search shop.svc.cluster.local svc.cluster.local cluster.local\n",
    "nameserver 10.96.0.10\n",
    "options ndots:5\n",
);

/// A tmpfs the test mounts with shared propagation (mount_namespaces(7)), so that a mount made
/// under it in a copy of this namespace would come back here unless the copy is private.
/// Unmounted when dropped.
struct SharedMount(PathBuf);

impl SharedMount {
    fn new(dir: &Path) -> Self {
        mount(Some("strait-t-shared"), dir, Some("tmpfs"), MsFlags::empty(), None::<&str>)
            .expect("mounting a test tmpfs");
        let guard = Self(dir.to_owned());
        mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
            .expect("making the test tmpfs shared");
        std::fs::create_dir(dir.join("inner")).expect("a mount point inside");
        guard
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.0, MntFlags::MNT_DETACH) {
            eprintln!("unmounting {}: {e}", self.0.display());
        }
    }
}

fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo")
}

fn mount_namespace(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .expect("reading a mount namespace")
        .display()
        .to_string()
}

/// Runs `sh -c script` with `setup` and returns its stdout; panics unless it succeeds.
fn run(setup: ChildSetup, script: &str) -> String {
    let mut command = Command::new("sh");
    command.args(["-c", script]);
    setup.install(&mut command);
    let output = command.output().expect("starting sh");
    assert!(
        output.status.success(),
        "sh -c {script:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[test]
fn container_reads_the_pods_resolv_conf_and_the_node_keeps_its_own() {
    if !support::privileged("container_reads_the_pods_resolv_conf_and_the_node_keeps_its_own") {
        return;
    }
    let state = DirGuard::temp("dns-state");
    let records = RecordStore::open(&state.path().join("pods")).expect("opening the records");
    let pod_file = records.write_resolv_conf("uid-1", POD_RESOLV_CONF).expect("writing");
    // A pod's network namespace, so the child is set up the way a container is.
    let pod_netns = NamespaceGuard::new("dns");
    // A shared mount point of the node: a mount the child makes under it must stay in the
    // child's namespace, which is what making its mounts private first is for.
    let scratch = DirGuard::temp("dns-scratch");
    let shared = SharedMount::new(scratch.path());

    let host_file_before = std::fs::read(RESOLV_CONF).expect("reading the node's resolv.conf");
    let mounts_before = mountinfo();

    let setup = || {
        ChildSetup::new()
            .new_session()
            .enter_netns(&pod_netns.path())
            .expect("opening the pod namespace")
            .bind_resolv_conf(&pod_file)
            .expect("preparing the bind")
    };
    assert_eq!(run(setup(), "cat /etc/resolv.conf"), POD_RESOLV_CONF);
    let child_namespace = run(setup(), "readlink /proc/self/ns/mnt");
    assert_ne!(
        child_namespace.trim(),
        mount_namespace("self"),
        "the bind lives in a mount namespace of the child's own"
    );
    let refused = {
        let mut command = Command::new("sh");
        command.args(["-c", "echo 'nameserver 192.0.2.1' >> /etc/resolv.conf"]);
        setup().install(&mut command);
        command.output().expect("starting sh")
    };
    assert!(!refused.status.success(), "the pod cannot write the agent's copy");
    assert_eq!(std::fs::read_to_string(&pod_file).unwrap(), POD_RESOLV_CONF);

    let script = format!(
        "mount -t tmpfs strait-child-tmpfs {} && cat /etc/resolv.conf",
        shared.0.join("inner").display()
    );
    assert_eq!(run(setup(), &script), POD_RESOLV_CONF);

    assert_eq!(
        std::fs::read(RESOLV_CONF).expect("reading the node's resolv.conf"),
        host_file_before,
        "the node's resolv.conf is unchanged"
    );
    assert_eq!(mountinfo(), mounts_before, "no mount propagated to the node");
    assert!(
        !mountinfo().contains("strait-child-tmpfs")
            && !mountinfo().contains(&*pod_file.to_string_lossy()),
        "neither the bind nor the child's own mount shows on the node"
    );
}

#[test]
fn a_missing_pod_file_fails_before_anything_starts() {
    // No privilege needed: the paths are checked before the fork.
    let error = ChildSetup::new()
        .bind_resolv_conf(Path::new("/nonexistent/strait/resolv.conf"))
        .expect_err("a missing file is refused");
    assert!(error.to_string().contains("/nonexistent/strait/resolv.conf"), "{error}");
}
