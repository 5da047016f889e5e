//! `kubectl logs` end to end on a lab, with every kubectl release from 1.27 to 1.33 (all
//! are installed here): a container's output, `-c`, `--tail`, `--limit-bytes`, `--since`,
//! `--since-time`, `--timestamps`, `--previous` after a restart, `-f` receiving a line
//! written after it opened, and Kubernetes' refusals (no container named in a pod of several, an unknown
//! container, no previous incarnation, a container that has not started, a missing pod).
//! Then, once: `-f` ends with its container, the node's log server refuses anyone but the
//! API server, and a log goes on being written across an agent restart. One lab serves
//! every case.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use strait::lab::{self, LabProcess};
use support::lab::{TestLab, assert_node_server_refuses_all_but_the_api, eventually};

const RELEASES: [&str; 7] = ["1.27", "1.28", "1.29", "1.30", "1.31", "1.32", "1.33"];

fn kubectl_releases() -> Vec<(&'static str, String)> {
    RELEASES
        .iter()
        .map(|release| (*release, format!("/usr/lib/google-cloud-sdk/bin/kubectl.{release}")))
        .filter(|(_, path)| std::path::Path::new(path).exists())
        .collect()
}

/// Runs one kubectl release; (success, stdout, stderr).
fn run(lab: &TestLab, kubectl: &str, args: &[&str]) -> (bool, String, String) {
    let output = lab.kubectl_binary_with_input(kubectl, args, None);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn logs_ok(lab: &TestLab, kubectl: &str, args: &[&str]) -> String {
    let mut all = vec!["logs"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = run(lab, kubectl, &all);
    assert!(ok, "{kubectl} {all:?} failed: {stderr}\n{}", lab.logs());
    stdout
}

/// The error kubectl prints for a request the server refused.
fn logs_refused(lab: &TestLab, kubectl: &str, args: &[&str]) -> String {
    let mut all = vec!["logs"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = run(lab, kubectl, &all);
    assert!(!ok, "{kubectl} {all:?} succeeded: {stdout}");
    stderr
}

/// A `kubectl logs -f` killed when dropped, also when the test fails.
struct Follower(Child);

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tick_number(line: &str) -> Option<u64> {
    line.trim().strip_prefix("tick ")?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_reads_follows_and_refuses_as_kubernetes() {
    if !support::privileged("kubectl_logs_reads_follows_and_refuses_as_kubernetes") {
        return;
    }
    let releases = kubectl_releases();
    assert_eq!(releases.len(), RELEASES.len(), "kubectl {RELEASES:?} expected on this machine");
    let tag = std::process::id();
    let lab = TestLab::up_with_agent_args("logs", 1, &["--restart-backoff", "0.5"]).await;

    // `duo`: a talker that says a few lines (one on stderr) and stays, and a ticker.
    // `phoenix`: fails on its first run and stays up on its second (an emptyDir remembers),
    // so that `--previous` has a fixed incarnation to show. `stranded`: bound to a node that
    // does not exist, so it never starts.
    let manifest = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: duo}}
spec:
  containers:
  - name: talker
    image: none
    command: [bash, -c, 'for i in 1 2 3 4 5; do echo "line $i"; done; echo "on stderr" >&2; exec sleep 100000']
  - name: ticker
    image: none
    command: [bash, -c, 'i=0; while sleep 0.2; do i=$((i+1)); echo "tick $i"; done']
---
apiVersion: v1
kind: Pod
metadata: {{name: phoenix}}
spec:
  volumes:
  - {{name: state, emptyDir: {{}}}}
  containers:
  - name: bird
    image: none
    command: [bash, -c, 'if [ -e /state-{tag}/ran ]; then echo "second life"; exec sleep 100000; fi; touch /state-{tag}/ran; echo "first life"; exit 3']
    volumeMounts:
    - {{name: state, mountPath: /state-{tag}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: stranded}}
spec:
  nodeName: nowhere
  containers:
  - name: lost
    image: none
    command: [bash, -c, 'exec sleep 100000']
"#
    );
    let created = lab.kubectl_with_input(&["create", "-f", "-"], Some(&manifest));
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    lab.wait_running("duo").await;
    eventually("phoenix running its second life", Duration::from_secs(30), || {
        let (_, stdout, _) = run(&lab, &releases[0].1, &["get", "pod", "phoenix", "-o", "json"]);
        let pod: Pod = serde_json::from_str(&stdout).map_err(|e| e.to_string())?;
        let status = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|s| s.first())
            .cloned()
            .ok_or("no status")?;
        let running = status.state.as_ref().is_some_and(|s| s.running.is_some());
        if status.restart_count == 1 && running { Ok(()) } else { Err(format!("{status:?}")) }
    })
    .await;
    let duo = lab.api.get::<Pod>(Some("default"), "duo").await.expect("duo").expect("duo");
    eventually("the talker's output on the node", Duration::from_secs(20), || {
        let text = lab.container_output("node-1", &duo, "talker");
        if text.contains("on stderr") { Ok(()) } else { Err(text) }
    })
    .await;

    for (release, kubectl) in &releases {
        let kubectl = kubectl.as_str();
        // A container's output, stderr included, in order per stream.
        let talker = logs_ok(&lab, kubectl, &["duo", "-c", "talker"]);
        let lines: Vec<&str> = talker.lines().collect();
        let stdout_lines: Vec<&str> =
            lines.iter().copied().filter(|l| l.starts_with("line ")).collect();
        assert_eq!(stdout_lines, ["line 1", "line 2", "line 3", "line 4", "line 5"], "{release}");
        assert!(lines.contains(&"on stderr"), "{release}: {talker}");
        assert_eq!(lines.len(), 6, "{release}: {talker}");

        // --tail: the last lines only.
        let tail = logs_ok(&lab, kubectl, &["duo", "-c", "talker", "--tail=2"]);
        assert_eq!(tail.lines().count(), 2, "{release}: {tail}");
        assert!(talker.ends_with(&tail), "{release}: {tail:?} is not the end of {talker:?}");

        // --limit-bytes cuts the output; --since and --since-time filter by write time.
        let limited = logs_ok(&lab, kubectl, &["duo", "-c", "talker", "--limit-bytes=8"]);
        assert_eq!(limited, talker[..8], "{release}");
        assert_eq!(logs_ok(&lab, kubectl, &["duo", "-c", "talker", "--since=1h"]), talker);
        let future = ["duo", "-c", "talker", "--since-time=2100-01-01T00:00:00Z"];
        assert_eq!(logs_ok(&lab, kubectl, &future), "", "{release}");

        // --timestamps: each line carries the RFC 3339 time it was written.
        let stamped = logs_ok(&lab, kubectl, &["duo", "-c", "talker", "--timestamps"]);
        for line in stamped.lines() {
            let (time, text) = line.split_once(' ').expect("a timestamp and the text");
            let time: k8s_openapi::jiff::Timestamp =
                time.parse().unwrap_or_else(|e| panic!("{release}: {line:?}: {e}"));
            let age = k8s_openapi::jiff::Timestamp::now().duration_since(time);
            assert!(
                age.as_secs() >= 0 && age.as_secs() < 600,
                "{release}: {line:?} is not a recent time"
            );
            assert!(lines.contains(&text), "{release}: {line:?}");
        }

        // --previous: the run before the restart; without it, the current run.
        assert_eq!(logs_ok(&lab, kubectl, &["phoenix"]), "second life\n", "{release}");
        assert_eq!(logs_ok(&lab, kubectl, &["phoenix", "--previous"]), "first life\n", "{release}");

        // -f: a line written after the stream opened arrives on it.
        let mut child = lab
            .kubectl_command(kubectl)
            .args(["logs", "-f", "duo", "-c", "ticker", "--tail=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl logs -f");
        let stdout = child.stdout.take().expect("stdout");
        let follower = Follower(child);
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        let first = receiver
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{release}: nothing followed: {e}\n{}", lab.logs()));
        let first = tick_number(&first).unwrap_or_else(|| panic!("{release}: {first:?}"));
        let later = receiver
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{release}: no new line while following: {e}"));
        assert_eq!(tick_number(&later), Some(first + 1), "{release}: {later:?} after tick {first}");
        drop(follower);

        // Refusals, worded as Kubernetes words them.
        let unknown = logs_refused(&lab, kubectl, &["duo", "-c", "nope"]);
        assert!(
            unknown.contains("container nope is not valid for pod duo"),
            "{release}: {unknown}"
        );
        let no_previous = logs_refused(&lab, kubectl, &["duo", "-c", "talker", "--previous"]);
        assert!(
            no_previous
                .contains(r#"previous terminated container "talker" in pod "duo" not found"#),
            "{release}: {no_previous}"
        );
        let waiting = logs_refused(&lab, kubectl, &["stranded"]);
        assert!(
            waiting.contains(
                r#"container "lost" in pod "stranded" is waiting to start: ContainerCreating"#
            ),
            "{release}: {waiting}"
        );
        let missing = logs_refused(&lab, kubectl, &["nosuch"]);
        assert!(missing.contains(r#"pods "nosuch" not found"#), "{release}: {missing}");
        // kubectl picks a pod's first container itself; the API's own answer when none is
        // named is read raw.
        let (ok, _, unnamed) =
            run(&lab, kubectl, &["get", "--raw", "/api/v1/namespaces/default/pods/duo/log"]);
        assert!(!ok);
        assert!(
            unnamed.contains(
                "a container name must be specified for pod duo, choose one of: [talker ticker]"
            ),
            "{release}: {unnamed}"
        );
        eprintln!(
            "kubectl {release}: logs, -c, --tail, --timestamps, --previous, -f and refusals as expected"
        );
    }

    // The agent's log server answers the API server alone: a pod of the node reaches it,
    // and is refused without a certificate and with the admin's too.
    assert_node_server_refuses_all_but_the_api(
        &lab,
        &duo,
        "GET",
        "/containerLogs/default/duo/talker",
    );

    // -f ends when the container does.
    let brief = r#"apiVersion: v1
kind: Pod
metadata: {name: brief}
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: none
    command: [bash, -c, 'echo hello; sleep 4; echo bye']
"#;
    let created = lab.kubectl_with_input(&["create", "-f", "-"], Some(brief));
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    lab.wait_running("brief").await;
    let newest = releases[releases.len() - 1].1.as_str();
    let child = lab
        .kubectl_command(newest)
        .args(["logs", "-f", "brief"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl logs -f");
    let mut follower = Follower(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = follower.0.try_wait().expect("kubectl") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "-f still open after the container ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut followed = String::new();
    std::io::Read::read_to_string(&mut follower.0.stdout.take().expect("stdout"), &mut followed)
        .expect("reading kubectl's output");
    assert!(status.success(), "kubectl logs -f brief: {status}");
    assert_eq!(followed, "hello\nbye\n");

    // The log outlives an agent restart: the shim goes on writing while the agent is away
    // (the ticker is never blocked or cut off), and the new agent serves all of it.
    let kubectl = releases[releases.len() - 1].1.as_str();
    let ticks = |text: &str| -> Vec<u64> { text.lines().filter_map(tick_number).collect() };
    let before = ticks(&logs_ok(&lab, kubectl, &["duo", "-c", "ticker"]));
    let last_before = *before.last().expect("ticks before the restart");
    let agent = LabProcess::Agent("node-1".into());
    lab::kill(lab.name(), &agent).expect("killing the agent");
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab::restart(lab.name(), &agent).expect("restarting the agent");
    let after =
        eventually("the ticks written while the agent was away", Duration::from_secs(30), || {
            let (ok, stdout, stderr) = run(&lab, kubectl, &["logs", "duo", "-c", "ticker"]);
            let after = ticks(&stdout);
            match after.last() {
                Some(last) if ok && *last > last_before + 10 => Ok(after),
                _ => Err(format!("{stderr}{:?}", after.last())),
            }
        })
        .await;
    let expected: Vec<u64> = (1..=after.len() as u64).collect();
    assert_eq!(after, expected, "every tick, in order, across the agent's restart");

    // Discovery names the subresource.
    let (_, discovery, _) = run(&lab, &releases[0].1, &["get", "--raw", "/api/v1"]);
    assert!(discovery.contains(r#""name":"pods/log""#), "{discovery}");
}
