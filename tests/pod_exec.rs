//! `kubectl exec` end to end on a lab, with each kubectl release from 1.27 to 1.33: up to 1.29
//! over SPDY/3.1, from 1.30 over WebSocket. A command's output, `-c`, its exit code and stderr
//! kept apart, stdin piped through `-i`, and that the command runs where the container does
//! (the pod's network, the container's cgroup, environment and hostname). `-it` from a
//! terminal: a shell on a terminal of its own, of the client's size and following its
//! resizes, ^C reaching the foreground job, the shell's exit code. Kubernetes' refusals: an
//! unknown container, a completed pod, a missing pod. Then, once: a client that goes away ends
//! its command (over either protocol), a stream protocol nobody speaks is refused with 403,
//! and the node's exec server refuses anyone but the API server. One lab serves every case.

mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use strait_dataplane::{
    runtime::process::ChildSetup,
    streaming::terminal::{Terminal, TerminalSize},
};
use support::lab::{TestLab, assert_node_server_refuses_all_but_the_api, eventually, pod_ip};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Every release the issue names: 1.27 to 1.29 speak SPDY/3.1 (`v4.channel.k8s.io`), 1.30 and
/// later WebSocket (`v5.channel.k8s.io`).
const RELEASES: [&str; 7] = ["1.27", "1.28", "1.29", "1.30", "1.31", "1.32", "1.33"];
const SPDY_RELEASES: [&str; 3] = ["1.27", "1.28", "1.29"];

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

/// kubectl run as a user at a terminal runs it: on a pseudo-terminal of the test's, its
/// controlling terminal, whose output is collected as it comes.
struct AtTerminal {
    terminal: Arc<Terminal>,
    output: Arc<Mutex<Vec<u8>>>,
    kubectl: KilledOnDrop,
}

impl AtTerminal {
    fn start(lab: &TestLab, kubectl: &str, args: &[&str], size: TerminalSize) -> Self {
        let (terminal, side) = Terminal::open().expect("a pseudo-terminal");
        terminal.resize(size).expect("the terminal's size");
        let mut command = lab.kubectl_command(kubectl);
        command
            .args(args)
            .stdin(side.try_clone().expect("dup"))
            .stdout(side.try_clone().expect("dup"))
            .stderr(side);
        ChildSetup::new().new_session().controlling_terminal().install(&mut command);
        let kubectl = KilledOnDrop(command.spawn().expect("kubectl on a terminal"));
        // `command`'s copies of the terminal go here: the end of kubectl ends the output.
        drop(command);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = terminal.reader();
        let collected = Arc::clone(&output);
        tokio::spawn(async move {
            let mut buffer = [0u8; 4096];
            while let Ok(read @ 1..) = reader.read(&mut buffer).await {
                collected.lock().expect("output").extend_from_slice(&buffer[..read]);
            }
        });
        Self { terminal, output, kubectl }
    }

    async fn type_line(&self, line: &str) {
        let mut writer = self.terminal.writer();
        writer.write_all(line.as_bytes()).await.expect("typing");
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("output")).into_owned()
    }

    /// Waits until the terminal shows `text`; `line` is typed again each second (a prompt
    /// or a resize may not have arrived yet).
    async fn shows(&self, text: &str, line: &str) {
        for tick in 0..200 {
            if tick % 10 == 0 {
                self.type_line(line).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if self.output().contains(text) {
                return;
            }
        }
        panic!("the terminal never showed {text:?} in 20 s: {:?}", self.output());
    }
}

/// `kubectl exec -it` into a shell, as a user at a terminal.
async fn exec_at_a_terminal(lab: &TestLab, release: &str, kubectl: &str) {
    let size = TerminalSize { width: 100, height: 30 };
    let mut at =
        AtTerminal::start(lab, kubectl, &["exec", "-it", "duo", "-c", "main", "--", "sh"], size);
    // The shell's terminal gets the client's size (kubectl sends it as the stream opens,
    // beside what was typed: it may come after the first line), and is a terminal, not a
    // pipe. The arithmetic tells the answers apart from the echo of the lines typed.
    at.shows("S30x100", "echo S$(stty size | tr ' ' x)\n").await;
    at.shows("R42", "tty; echo R$((40+2))\n").await;
    let output = at.output();
    assert!(output.contains("/dev/pts/"), "{release}: {output:?}");
    // A resize reaches the shell's terminal (kubectl sends it on SIGWINCH).
    at.terminal.resize(TerminalSize { width: 120, height: 40 }).expect("resize");
    at.shows("S40x120", "echo S$(stty size | tr ' ' x)\n").await;
    // ^C interrupts the foreground job only: the shell goes on.
    at.type_line("sleep 1000\n").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    at.type_line("\x03").await;
    at.shows("C2", "echo C$((1+1))\n").await;
    // The shell's exit code is kubectl's.
    at.type_line("exit 3\n").await;
    let mut waited = Duration::ZERO;
    let status = loop {
        if let Some(status) = at.kubectl.0.try_wait().expect("kubectl") {
            break status;
        }
        assert!(
            waited < Duration::from_secs(20),
            "{release}: kubectl did not end: {:?}",
            at.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    };
    assert_eq!(status.code(), Some(3), "{release}: {:?}", at.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_runs_commands_inside_the_pod() {
    if !support::privileged("kubectl_exec_runs_commands_inside_the_pod") {
        return;
    }
    let releases: Vec<(&str, String)> =
        RELEASES.iter().filter_map(|release| Some((*release, kubectl_path(release)?))).collect();
    assert_eq!(releases.len(), RELEASES.len(), "kubectl {RELEASES:?} expected on this machine");
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
        let expected = if SPDY_RELEASES.contains(release) {
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

        exec_at_a_terminal(&lab, release, kubectl).await;

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

    // A stream protocol that neither side speaks: the node's 403 comes through the API.
    let pki = strait::lab::pki_dir(lab.name());
    let admin = [pki.join("admin.crt"), pki.join("admin.key")];
    let output = std::process::Command::new("curl")
        .args(["-s", "--http1.1", "--max-time", "10", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(&admin[0])
        .arg("--key")
        .arg(&admin[1])
        .args(["-X", "POST", "-H", "Connection: Upgrade", "-H", "Upgrade: SPDY/3.1"])
        .args(["-H", "X-Stream-Protocol-Version: v1.unknown.example"])
        .arg(format!(
            "{}/api/v1/namespaces/default/pods/duo/exec?command=true&container=main&stdout=true",
            lab.state.api_server
        ))
        .output()
        .expect("curl");
    let answer = String::from_utf8_lossy(&output.stdout);
    assert!(answer.ends_with("\n403"), "{answer}");
    assert!(answer.contains("none of the offered stream protocols"), "{answer}");

    // The node's exec server answers the API server alone: a pod of the node reaches it,
    // and is refused without a certificate and with the admin's too.
    assert_node_server_refuses_all_but_the_api(
        &lab,
        &duo,
        "POST",
        "/exec/default/duo/main?command=true",
    );
}
