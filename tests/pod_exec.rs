//! `kubectl exec` (non-interactive) end to end on a lab, with each kubectl release the machine
//! has: 1.27 over SPDY/3.1, 1.31 and 1.33 over WebSocket. A command's output, `-c`, its exit
//! code and stderr kept apart, stdin piped through `-i`, and that the command runs where the
//! container does (the pod's network, the container's cgroup, environment and hostname).
//! Kubernetes' refusals: an unknown container, a completed pod, a missing pod. Then, once: a
//! client that goes away ends its command (over either protocol), and the node's exec server
//! refuses anyone but the API server. One lab serves every case.

mod support;

use std::time::Duration;

use support::lab::{TestLab, assert_route_stays_in_lab, eventually, pod_ip};

/// 1.27 speaks SPDY/3.1 (`v4.channel.k8s.io`), 1.31 and 1.33 WebSocket (`v5.channel.k8s.io`).
const RELEASES: [&str; 3] = ["1.27", "1.31", "1.33"];

fn kubectl_path(release: &str) -> Option<String> {
    let path = format!("/usr/lib/google-cloud-sdk/bin/kubectl.{release}");
    std::path::Path::new(&path).exists().then_some(path)
}

/// A kubectl killed when dropped, also when the test fails.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(lab: &TestLab, kubectl: &str, args: &[&str], input: Option<&str>) -> Ran {
    let output = lab.kubectl_binary_with_input(kubectl, args, input);
    Ran {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `kubectl exec <args>` that must succeed; its stdout.
fn exec_ok(lab: &TestLab, kubectl: &str, args: &[&str], input: Option<&str>) -> String {
    let mut all = vec!["exec"];
    all.extend_from_slice(args);
    let ran = run(lab, kubectl, &all, input);
    assert_eq!(ran.code, Some(0), "{kubectl} {all:?}: {}\n{}", ran.stderr, lab.logs());
    ran.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_runs_commands_inside_the_pod() {
    if !support::privileged("kubectl_exec_runs_commands_inside_the_pod") {
        return;
    }
    let releases: Vec<(&str, String)> =
        RELEASES.iter().filter_map(|release| Some((*release, kubectl_path(release)?))).collect();
    assert!(!releases.is_empty(), "no kubectl of {RELEASES:?} on this machine");
    let lab = TestLab::up("exec", 1).await;

    // `duo`: two idle containers with an environment of their own. `finished`: a pod whose
    // only container has run to completion.
    let manifest = r#"apiVersion: v1
kind: Pod
metadata: {name: duo}
spec:
  containers:
  - name: main
    image: none
    command: [sleep, '100000']
    env: [{name: ROLE, value: main-role}]
  - name: side
    image: none
    command: [sleep, '100000']
    env: [{name: ROLE, value: side-role}]
---
apiVersion: v1
kind: Pod
metadata: {name: finished}
spec:
  restartPolicy: Never
  containers:
  - name: once
    image: none
    command: ['true']
"#;
    let created = lab.kubectl_with_input(&["create", "-f", "-"], Some(manifest));
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let duo = lab.wait_running("duo").await;
    let duo_ip = pod_ip(&duo).to_string();
    let duo_uid = duo.metadata.uid.clone().expect("uid");
    eventually("finished has Succeeded", Duration::from_secs(30), || {
        let phase = lab.kubectl_ok(&["get", "pod", "finished", "-o", "jsonpath={.status.phase}"]);
        if phase == "Succeeded" { Ok(()) } else { Err(phase) }
    })
    .await;

    for (release, kubectl) in &releases {
        let kubectl = kubectl.as_str();
        // The protocol each release gets (so that a broken WebSocket path cannot hide behind
        // the newer releases' fallback to SPDY): kubectl -v=8 logs the upgrade's answer.
        let verbose = ["exec", "-v=8", "duo", "-c", "main", "--", "true"];
        let upgraded = run(&lab, kubectl, &verbose, None);
        assert_eq!(upgraded.code, Some(0), "{release}: {}", upgraded.stderr);
        let expected = if *release == "1.27" {
            "Upgrade: SPDY/3.1"
        } else {
            "The subprotocol is v5.channel.k8s.io"
        };
        assert!(upgraded.stderr.contains(expected), "{release}: {}", upgraded.stderr);

        // Output, and arguments that the shell must receive whole.
        let echoed =
            exec_ok(&lab, kubectl, &["duo", "-c", "main", "--", "echo", "a  b", "c"], None);
        assert_eq!(echoed, "a  b c\n", "{release}");

        // -c picks the container: its environment; the pod's name as hostname.
        let side = exec_ok(
            &lab,
            kubectl,
            &["duo", "-c", "side", "--", "sh", "-c", "echo $ROLE; hostname"],
            None,
        );
        assert_eq!(side, "side-role\nduo\n", "{release}");
        let main =
            exec_ok(&lab, kubectl, &["duo", "-c", "main", "--", "sh", "-c", "echo $ROLE"], None);
        assert_eq!(main, "main-role\n", "{release}");

        // The container's cgroup, and the pod's network namespace (its address).
        let cgroup =
            exec_ok(&lab, kubectl, &["duo", "-c", "side", "--", "cat", "/proc/self/cgroup"], None);
        assert!(cgroup.trim_end().ends_with(&format!("/{duo_uid}/side")), "{release}: {cgroup}");
        let addresses =
            exec_ok(&lab, kubectl, &["duo", "-c", "main", "--", "ip", "-br", "addr"], None);
        assert!(
            addresses.split_whitespace().any(|word| word.starts_with(&format!("{duo_ip}/"))),
            "{release}: {duo_ip} not in {addresses}"
        );

        // The exit code becomes kubectl's; stdout and stderr stay apart.
        let failing =
            ["exec", "duo", "-c", "main", "--", "sh", "-c", "echo out; echo err >&2; exit 3"];
        let ran = run(&lab, kubectl, &failing, None);
        assert_eq!(ran.code, Some(3), "{release}: {}", ran.stderr);
        assert_eq!(ran.stdout, "out\n", "{release}");
        assert!(ran.stderr.starts_with("err\n"), "{release}: {:?}", ran.stderr);
        assert!(!ran.stdout.contains("err"), "{release}");

        // stdin through -i, to its end: cat ends when kubectl's input does.
        let input = "first line\nsecond line\n".repeat(2000);
        let copied =
            exec_ok(&lab, kubectl, &["-i", "duo", "-c", "main", "--", "cat"], Some(&input));
        assert_eq!(copied.len(), input.len(), "{release}");
        assert!(copied == input, "{release}: stdin came back altered");
        // Without -i the command's stdin is empty.
        let empty = exec_ok(&lab, kubectl, &["duo", "-c", "main", "--", "wc", "-c"], None);
        assert_eq!(empty.trim(), "0", "{release}");

        // Kubernetes' refusals.
        for (args, expected) in [
            (
                vec!["exec", "duo", "-c", "nope", "--", "true"],
                "container nope is not valid for pod duo",
            ),
            (
                vec!["exec", "finished", "--", "true"],
                "cannot exec into a container in a completed pod",
            ),
            (vec!["exec", "missing", "--", "true"], "pods \"missing\" not found"),
            // Reported on the error channel once the stream is open.
            (
                vec!["exec", "duo", "-c", "main", "--", "no-such-command-strait"],
                "\"no-such-command-strait\": executable file not found in $PATH",
            ),
        ] {
            let ran = run(&lab, kubectl, &args, None);
            assert_ne!(ran.code, Some(0), "{release} {args:?}: {}", ran.stdout);
            assert!(ran.stderr.contains(expected), "{release} {args:?}: {}", ran.stderr);
        }
    }

    // The API server itself refuses a container that is not running (kubectl checks a
    // completed pod before asking, so this goes around it).
    let raw = lab.kubectl(&[
        "create",
        "--raw",
        "/api/v1/namespaces/default/pods/finished/exec?command=true&container=once&stdout=true",
        "-f",
        "/dev/null",
    ]);
    assert!(!raw.status.success());
    let stderr = String::from_utf8_lossy(&raw.stderr);
    assert!(stderr.contains("cannot exec into a container in a completed pod"), "{stderr}");

    // A client that goes away ends its command: nothing is left in the container's cgroup.
    let cgroup = exec_ok(
        &lab,
        &releases[0].1,
        &["duo", "-c", "main", "--", "cat", "/proc/self/cgroup"],
        None,
    );
    let cgroup_dir = cgroup.lines().find_map(|l| l.strip_prefix("0::")).expect("cgroup v2 path");
    let procs = strait_dataplane::cgroup::cgroup2_mount()
        .expect("the cgroup v2 mount")
        .join(cgroup_dir.trim_start_matches('/'))
        .join("cgroup.procs");
    let count = || std::fs::read_to_string(&procs).map(|t| t.lines().count()).unwrap_or(0);
    assert_eq!(count(), 1, "only the container's process in {}", procs.display());
    // Over SPDY (the first release) and WebSocket (the last).
    for (release, kubectl) in [releases.first(), releases.last()].into_iter().flatten() {
        let mut waiting = KilledOnDrop(
            lab.kubectl_command(kubectl)
                .args(["exec", "duo", "-c", "main", "--", "sleep", "100000"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("kubectl exec sleep"),
        );
        eventually("the exec'd sleep in the container's cgroup", Duration::from_secs(20), || {
            if count() == 2 { Ok(()) } else { Err(format!("{release}: {} processes", count())) }
        })
        .await;
        waiting.0.kill().expect("killing kubectl");
        waiting.0.wait().expect("reaping kubectl");
        eventually("the exec'd sleep gone with its client", Duration::from_secs(20), || {
            if count() == 1 { Ok(()) } else { Err(format!("{release}: {} processes", count())) }
        })
        .await;
    }

    // The node's exec server answers the API server alone: a pod of the node reaches it,
    // and is refused without a certificate and with the admin's too.
    let node = &lab.state.nodes[0];
    let pod_netns = lab.pod_netns(&duo);
    assert_route_stays_in_lab(&pod_netns, node.address);
    let url = format!("https://{}:10250/exec/default/duo/main?command=true", node.address);
    let pki = strait::lab::pki_dir(lab.name());
    let admin = [pki.join("admin.crt"), pki.join("admin.key")];
    let admin_args =
        ["--cert".as_ref(), admin[0].as_os_str(), "--key".as_ref(), admin[1].as_os_str()];
    for (who, extra, expected) in
        [("anonymous", &admin_args[..0], "401"), ("the admin", &admin_args[..], "403")]
    {
        // -k: the agent presents its node identity, not a serving certificate.
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", pod_netns.name(), "curl", "-sk", "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "--max-time", "10", "-X", "POST"])
            .args(extra)
            .arg(&url)
            .output()
            .expect("curl");
        let code = String::from_utf8_lossy(&output.stdout);
        assert_eq!(code, expected, "{who} asking the node's exec server directly");
    }
}
