//! `strait lab exec` and `strait lab node-exec`: run a command inside a pod's or a node's
//! network namespace (and, for a pod, its cgroup and its `/etc/resolv.conf`), the way
//! `kubectl exec` and `ssh node` would.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Pod;
use strait_dataplane::{
    cgroup::Cgroup,
    netns,
    runtime::{process::ChildSetup, record::pod_resolv_conf_path},
};

use super::{LabState, lab_cgroup, lab_dir, netns_prefix, node_netns};

/// Runs `command` in the pod `namespace/name` of `lab` and returns its exit code.
pub async fn exec_in_pod(lab: &str, pod: &str, command: &[String]) -> anyhow::Result<i32> {
    let state = LabState::load(lab)?;
    let (namespace, name) = pod.split_once('/').unwrap_or(("default", pod));
    let api = state.api_client()?;
    let Some(object) = api.get::<Pod>(Some(namespace), name).await? else {
        bail!("pod {namespace}/{name} not found in lab {lab}");
    };
    let uid = object.metadata.uid.clone().context("the pod has no uid")?;
    let node = object.spec.as_ref().and_then(|s| s.node_name.clone());
    let Some(node) = node else {
        bail!("pod {namespace}/{name} is not scheduled to a node yet");
    };
    let netns_name = format!("{}pod-{uid}", netns_prefix(lab));
    if !netns::NetNs::exists(&netns_name) {
        bail!("pod {namespace}/{name} has no network namespace yet (is it running?)");
    }
    // Under whichever parent the agent put it (socket load balancing or not).
    let node_cgroup = lab_cgroup(lab).join(&node);
    let opted_out = Cgroup::new(
        &node_cgroup.join(strait_dataplane::agent::POD_CGROUP_WITHOUT_SOCKET_LB).join(&uid),
    )?;
    let pod_cgroup = if opted_out.exists() {
        opted_out
    } else {
        Cgroup::new(&node_cgroup.join(strait_dataplane::agent::POD_CGROUP).join(&uid))?
    };
    // A leaf of its own beside the containers': a cgroup v2 whose controllers are enabled for
    // its children holds no process itself. No container can be named so (not a DNS label).
    let cgroup = pod_cgroup.child("_lab-exec");
    cgroup.create()?;
    // The node's agent keeps its state in `<lab dir>/nodes/<node>` (see `up.rs`); a pod with
    // a resolv.conf of its own has it there, and the command sees it as the containers do.
    let resolv_conf = pod_resolv_conf_path(&lab_dir(lab).join("nodes").join(&node), &uid);
    let resolv_conf = resolv_conf.is_file().then_some(resolv_conf);
    run_inside(&netns::named_path(&netns_name), Some(&cgroup), resolv_conf.as_deref(), command)
}

/// Runs `command` in the network namespace of `node` of `lab` and returns its exit code.
pub fn exec_in_node(lab: &str, node: &str, command: &[String]) -> anyhow::Result<i32> {
    let state = LabState::load(lab)?;
    if !state.nodes.iter().any(|n| n.name == node) {
        let names: Vec<_> = state.nodes.iter().map(|n| n.name.as_str()).collect();
        bail!("lab {lab} has no node {node:?}; its nodes are {}", names.join(", "));
    }
    // The agent's host cgroup: node processes there reach services through the socket hooks.
    let cgroup =
        Cgroup::new(&lab_cgroup(lab).join(node).join(strait_dataplane::agent::HOST_CGROUP))?;
    cgroup.create()?;
    run_inside(&netns::named_path(&node_netns(lab, node)), Some(&cgroup), None, command)
}

fn run_inside(
    netns_path: &Path,
    cgroup: Option<&Cgroup>,
    resolv_conf: Option<&Path>,
    command: &[String],
) -> anyhow::Result<i32> {
    let Some((program, args)) = command.split_first() else {
        bail!("give a command to run after --");
    };
    let mut setup = ChildSetup::new();
    if let Some(cgroup) = cgroup {
        setup = setup.join_cgroup(&cgroup.procs_file())?;
    }
    let mut setup = setup.enter_netns(netns_path)?;
    if let Some(resolv_conf) = resolv_conf {
        setup = setup.bind_resolv_conf(resolv_conf)?;
    }
    let mut child = Command::new(program);
    child.args(args);
    setup.install(&mut child);
    let status = child.status().with_context(|| format!("running {program}"))?;
    Ok(status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    }))
}
