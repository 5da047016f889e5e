//! Stock kubectl 1.27, 1.31 and 1.33 driven through every command strait's API serves, on one
//! 3-node lab with real pods: each release tours a namespace of its own (`tour-127`, …) with
//! `create` (namespace, deployment, service, configmap, `-f`), `get` (Kubernetes' columns,
//! `-o wide|yaml|json|jsonpath`, `-l`, `--field-selector`, `-A`, `-w`), `describe` with its
//! events, `apply` (client-side and server-side), `replace`, `edit`, `patch` (strategic, merge,
//! JSON), `label`, `annotate`, `scale`, `rollout status|history|restart|undo`, `logs` (`-c`,
//! `-f`, `--previous`), `exec`, `delete --cascade=background|orphan|foreground`, `cordon`,
//! `uncordon` and `drain`. Each result is checked against the stored object (through the
//! API) or the lab itself (which node a pod runs on, that it runs). The depth of `logs` and
//! `exec` is in pod_logs.rs and pod_exec.rs, which run every release from 1.27 to 1.33 (`exec
//! -it` from a terminal included).

mod support;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{ConfigMap, Namespace, Node, Pod, Service},
};
use serde_json::{Value, json};
use support::{
    DirGuard,
    lab::{TestLab, eventually, until},
};

const RELEASES: [&str; 3] = ["1.27", "1.31", "1.33"];

/// How long a rollout, a drain or a namespace's deletion may take on a loaded machine.
const SLOW: Duration = Duration::from_secs(90);

/// What one kubectl run gave.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// One release's tour of its own namespace.
struct Tour<'a> {
    lab: &'a TestLab,
    release: &'a str,
    kubectl: String,
    namespace: String,
    files: &'a DirGuard,
}

/// A kubectl that keeps running (`get -w`, `logs -f`), its output lines arriving on a
/// channel; killed when dropped, also when the test fails.
struct Streaming {
    child: Child,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Streaming {
    /// Waits for a line that `wanted` accepts and returns it; fails the test after 30 s.
    fn line(&self, description: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return line,
                Ok(line) => seen.push(line),
                Err(e) => panic!("{}: no {description} ({e}); lines seen: {seen:#?}", self.what),
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whitespace-separated cells of each line of a table.
fn rows(table: &str) -> Vec<Vec<&str>> {
    table.lines().map(|line| line.split_whitespace().collect()).collect()
}

/// The cells of the row whose first cell is `name`.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    rows(table)
        .into_iter()
        .find(|cells| cells.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{table}"))
}

fn header(table: &str) -> Vec<&str> {
    table.lines().next().unwrap_or_default().split_whitespace().collect()
}

fn name_of(object: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    object.name.clone().unwrap_or_default()
}

fn ready(pod: &Pod) -> bool {
    let status = pod.status.clone().unwrap_or_default();
    status.phase.as_deref() == Some("Running")
        && status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
        && pod.metadata.deletion_timestamp.is_none()
}

fn node_of(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
}

fn image_of(template: Option<&k8s_openapi::api::core::v1::PodSpec>) -> String {
    template.and_then(|s| s.containers.first()).and_then(|c| c.image.clone()).unwrap_or_default()
}

fn data(map: &ConfigMap) -> Value {
    json!(map.data.clone().unwrap_or_default())
}

impl Tour<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = self.lab.kubectl_command(&self.kubectl);
        command.args(["-n", &self.namespace]).args(args);
        command
    }

    fn run(&self, args: &[&str]) -> Ran {
        let output = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.kubectl));
        Ran {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs kubectl and returns its output, failing the test on a non-zero exit.
    fn ok(&self, args: &[&str]) -> String {
        let ran = self.run(args);
        assert_eq!(
            ran.code,
            Some(0),
            "kubectl {} {args:?} failed: {}{}",
            self.release,
            ran.stdout,
            ran.stderr
        );
        ran.stdout
    }

    /// `get … -o json`, parsed.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let text = self.ok(&all);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: {all:?}: {e}: {text}", self.release))
    }

    /// A file of this tour, its path.
    fn file(&self, name: &str, text: &str) -> String {
        let path = self.files.path().join(format!("{}-{name}", self.release));
        std::fs::write(&path, text).expect("writing a manifest");
        path.to_string_lossy().into_owned()
    }

    fn spawn(&self, args: &[&str]) -> Streaming {
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.kubectl));
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Streaming { child, lines, what: format!("kubectl {} {args:?}", self.release) }
    }

    fn ns(&self) -> Option<&str> {
        Some(&self.namespace)
    }

    async fn config_map(&self, name: &str) -> ConfigMap {
        self.lab.api.get::<ConfigMap>(self.ns(), name).await.expect("API").expect(name)
    }

    async fn deployment(&self, name: &str) -> Deployment {
        self.lab.api.get::<Deployment>(self.ns(), name).await.expect("API").expect(name)
    }

    async fn service(&self, name: &str) -> Service {
        self.lab.api.get::<Service>(self.ns(), name).await.expect("API").expect(name)
    }

    async fn pods(&self, selector: &str) -> Vec<Pod> {
        let query = format!("labelSelector={}", selector.replace('=', "%3D"));
        self.lab.api.list::<Pod>(self.ns(), &query).await.expect("listing pods").0
    }

    async fn replica_sets(&self, selector: &str) -> Vec<ReplicaSet> {
        let query = format!("labelSelector={}", selector.replace('=', "%3D"));
        self.lab.api.list::<ReplicaSet>(self.ns(), &query).await.expect("listing sets").0
    }

    /// Waits until the pods of `selector` are exactly `count`, all Running and Ready, and
    /// `check` accepts each; returns them.
    async fn settled(
        &self,
        selector: &str,
        count: usize,
        check: impl Fn(&Pod) -> bool,
    ) -> Vec<Pod> {
        let what = format!("{}: {count} ready pods of {selector}", self.release);
        until(&what, SLOW, || async {
            let pods = self.pods(selector).await;
            (pods.len() == count && pods.iter().all(|p| ready(p) && check(p))).then_some(pods)
        })
        .await
    }

    /// `kubectl rollout status` of web until it reports the rollout done.
    fn rollout_done(&self) {
        let status = self.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
        assert!(
            status.contains(r#"deployment "web" successfully rolled out"#),
            "{}: {status}",
            self.release
        );
    }

    async fn tour(&self) {
        let started = Instant::now();
        let release = self.release;
        let ns = self.namespace.as_str();
        self.creates().await;
        self.gets().await;
        self.describes().await;
        self.writes().await;
        self.rollouts().await;
        self.logs_and_exec().await;
        self.drain().await;
        self.deletes().await;

        // The namespace goes with everything in it; kubectl waits until it is gone.
        let deleted = self.ok(&["delete", "namespace", ns, "--timeout=90s"]);
        assert!(deleted.contains(&format!(r#"namespace "{ns}" deleted"#)), "{release}: {deleted}");
        assert!(self.lab.api.get::<Namespace>(None, ns).await.expect("API").is_none());
        eprintln!("kubectl {release}: the tour took {:?}", started.elapsed());
    }

    /// `create namespace|configmap|deployment|service clusterip` and `create -f`.
    async fn creates(&self) {
        let release = self.release;
        let ns = self.namespace.as_str();
        assert_eq!(self.ok(&["create", "namespace", ns]).trim(), format!("namespace/{ns} created"));
        let namespace = self.lab.api.get::<Namespace>(None, ns).await.expect("API").expect(ns);
        assert_eq!(namespace.status.and_then(|s| s.phase).as_deref(), Some("Active"), "{release}");

        let created = self.ok(&[
            "create",
            "configmap",
            "settings",
            "--from-literal=mode=tour",
            "--from-literal=level=3",
        ]);
        assert_eq!(created.trim(), "configmap/settings created", "{release}");
        assert_eq!(data(&self.config_map("settings").await), json!({"mode": "tour", "level": "3"}));

        let created = self.ok(&[
            "create",
            "deployment",
            "web",
            "--image=strait/netexec",
            "--replicas=2",
            "--port=8080",
        ]);
        assert_eq!(created.trim(), "deployment.apps/web created", "{release}");
        let web = self.deployment("web").await;
        let spec = web.spec.clone().expect("spec");
        assert_eq!(spec.replicas, Some(2), "{release}");
        let container = &spec.template.spec.as_ref().expect("template").containers[0];
        assert_eq!(container.name, "netexec", "{release}");
        assert_eq!(container.image.as_deref(), Some("strait/netexec"), "{release}");
        let ports: Vec<i32> = container.ports.iter().flatten().map(|p| p.container_port).collect();
        assert_eq!(ports, [8080], "{release}");

        let created = self.ok(&["create", "service", "clusterip", "web", "--tcp=80:8080"]);
        assert_eq!(created.trim(), "service/web created", "{release}");
        let service = self.service("web").await.spec.expect("spec");
        assert_eq!(service.type_.as_deref(), Some("ClusterIP"), "{release}");
        assert_eq!(service.selector, Some([("app".to_owned(), "web".to_owned())].into()));
        let port = &service.ports.as_ref().expect("ports")[0];
        assert_eq!((port.port, json!(port.target_port)), (80, json!(8080)), "{release}");
        assert!(service.cluster_ip.is_some_and(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok()));

        // `solo`: three containers (a server, a ticker with an environment, and one that
        // fails on its first run and stays up on its second, an emptyDir remembering);
        // `finished`: a pod that has run to completion; `batch`: a second deployment.
        let tag = format!("{}-{}", std::process::id(), release.replace('.', ""));
        let manifest = format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: solo, labels: {{app: solo}}}}
spec:
  volumes:
  - {{name: state, emptyDir: {{}}}}
  containers:
  - name: main
    image: strait/netexec
  - name: side
    image: none
    env: [{{name: TOUR, value: "{release}"}}]
    command: [bash, -c, 'i=0; while sleep 0.2; do i=$((i+1)); echo "tick $i"; done']
  - name: bird
    image: none
    command: [bash, -c, 'if [ -e /state-{tag}/ran ]; then echo "second life"; exec sleep 100000; fi; touch /state-{tag}/ran; echo "first life"; exit 3']
    volumeMounts:
    - {{name: state, mountPath: /state-{tag}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: finished}}
spec:
  restartPolicy: Never
  containers:
  - {{name: once, image: none, command: [bash, -c, 'echo done']}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: batch}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: batch}}}}
  template:
    metadata: {{labels: {{app: batch}}}}
    spec:
      containers: [{{name: batch, image: strait/netexec}}]
"#
        );
        let created = self.ok(&["create", "-f", &self.file("objects.yaml", &manifest)]);
        for expected in
            ["pod/solo created", "pod/finished created", "deployment.apps/batch created"]
        {
            assert!(created.contains(expected), "{release}: {expected:?} in {created}");
        }
        let solo = self.lab.api.get::<Pod>(self.ns(), "solo").await.expect("API").expect("solo");
        let names: Vec<String> =
            solo.spec.expect("spec").containers.into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["main", "side", "bird"], "{release}");

        self.settled("app=web", 2, |_| true).await;
        self.settled("app=batch", 1, |_| true).await;
        // solo is ready once bird lives its second life.
        self.settled("app=solo", 1, |pod| {
            let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.clone());
            statuses.iter().flatten().any(|s| s.name == "bird" && s.restart_count == 1)
        })
        .await;
        until(&format!("{release}: finished Succeeded"), SLOW, || async {
            let pod = self.lab.api.get::<Pod>(self.ns(), "finished").await.ok().flatten()?;
            (pod.status?.phase.as_deref() == Some("Succeeded")).then_some(())
        })
        .await;
    }

    /// `get`: Kubernetes' columns, the output formats, selectors, `-A` and `-w`.
    async fn gets(&self) {
        let release = self.release;
        let ns = self.namespace.as_str();
        let web = self.pods("app=web").await;

        let pods = self.ok(&["get", "pods"]);
        assert_eq!(header(&pods), ["NAME", "READY", "STATUS", "RESTARTS", "AGE"], "{release}");
        let solo = row(&pods, "solo");
        assert_eq!(&solo[1..4], ["3/3", "Running", "1"], "{release}: {pods}");
        assert_eq!(&row(&pods, "finished")[1..4], ["0/1", "Completed", "0"], "{release}: {pods}");
        let deployments = self.ok(&["get", "deployments"]);
        assert_eq!(header(&deployments), ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]);
        assert_eq!(&row(&deployments, "web")[1..4], ["2/2", "2", "2"], "{release}");
        let services = self.ok(&["get", "services"]);
        assert_eq!(
            header(&services),
            ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"],
            "{release}"
        );
        let cluster_ip = self.service("web").await.spec.and_then(|s| s.cluster_ip).expect("IP");
        assert_eq!(
            &row(&services, "web")[1..5],
            ["ClusterIP", cluster_ip.as_str(), "<none>", "80/TCP"],
            "{release}"
        );

        // The other kinds' columns, their rows as stored.
        let sets = self.replica_sets("app=web").await;
        assert_eq!(sets.len(), 1, "{release}");
        let sets_table = self.ok(&["get", "replicasets"]);
        assert_eq!(header(&sets_table), ["NAME", "DESIRED", "CURRENT", "READY", "AGE"]);
        assert_eq!(&row(&sets_table, &name_of(&sets[0].metadata))[1..4], ["2", "2", "2"]);
        let web_ips: BTreeSet<String> =
            web.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).collect();
        let slice = eventually(&format!("{release}: web's slice"), SLOW, || {
            let slices =
                self.ok(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web"]);
            let cells: Vec<String> =
                rows(&slices).get(1).into_iter().flatten().map(|c| (*c).to_owned()).collect();
            let endpoints: BTreeSet<String> =
                cells.get(3).map(|e| e.split(',').map(str::to_owned).collect()).unwrap_or_default();
            if endpoints == web_ips {
                Ok((header(&slices).iter().map(|h| (*h).to_owned()).collect::<Vec<_>>(), cells))
            } else {
                Err(slices)
            }
        })
        .await;
        assert_eq!(slice.0, ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"], "{release}");
        assert!(slice.1[0].starts_with("web-"), "{release}: {:?}", slice.1);
        assert_eq!(&slice.1[1..3], ["IPv4", "8080"], "{release}");
        let maps = self.ok(&["get", "configmaps", "settings"]);
        assert_eq!(header(&maps), ["NAME", "DATA", "AGE"], "{release}");
        assert_eq!(row(&maps, "settings")[1], "2", "{release}");
        let namespaces = self.ok(&["get", "namespace", ns]);
        assert_eq!(header(&namespaces), ["NAME", "STATUS", "AGE"], "{release}");
        assert_eq!(row(&namespaces, ns)[1], "Active", "{release}");
        let (nodes, _) = self.lab.api.list::<Node>(None, "").await.expect("listing nodes");
        let nodes_table = self.ok(&["get", "nodes", "-o", "wide"]);
        assert_eq!(
            header(&nodes_table)[..7],
            ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP", "EXTERNAL-IP"],
            "{release}"
        );
        assert_eq!(nodes.len(), 3, "{release}");
        for node in &nodes {
            let cells = row(&nodes_table, &name_of(&node.metadata));
            let internal = node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .find(|a| a.type_ == "InternalIP")
                .map(|a| a.address.clone())
                .expect("an InternalIP");
            assert_eq!(cells[1], "Ready", "{release}: {nodes_table}");
            assert_eq!(cells[5], internal, "{release}: {nodes_table}");
        }
        let events = self.ok(&["get", "events"]);
        assert_eq!(header(&events), ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]);
        let scheduled = format!(
            "Successfully assigned {ns}/solo to {}",
            node_of(&self.lab.api.get::<Pod>(self.ns(), "solo").await.expect("API").expect("solo"))
        );
        assert!(
            events.lines().any(|l| l.contains(" Scheduled ")
                && l.contains(" pod/solo ")
                && l.ends_with(&scheduled)),
            "{release}: {scheduled:?} in\n{events}"
        );

        // -o wide: each pod's IP and node as stored.
        let wide = self.ok(&["get", "pods", "-o", "wide", "-l", "app=web"]);
        assert_eq!(
            header(&wide),
            [
                "NAME",
                "READY",
                "STATUS",
                "RESTARTS",
                "AGE",
                "IP",
                "NODE",
                "NOMINATED",
                "NODE",
                "READINESS",
                "GATES"
            ],
            "{release}"
        );
        for pod in &web {
            let cells = row(&wide, &name_of(&pod.metadata));
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("pod IP");
            assert_eq!(&cells[5..7], [ip.as_str(), node_of(pod).as_str()], "{release}: {wide}");
        }

        // -o yaml, -o json, -o jsonpath.
        let stored = self.service("web").await;
        let yaml = self.ok(&["get", "service", "web", "-o", "yaml"]);
        assert!(yaml.starts_with("apiVersion: v1\n"), "{release}: {yaml}");
        for line in [
            "kind: Service".to_owned(),
            format!("  clusterIP: {cluster_ip}"),
            format!("  uid: {}", stored.metadata.uid.clone().unwrap_or_default()),
            format!("  namespace: {ns}"),
        ] {
            assert!(yaml.lines().any(|l| l == line), "{release}: {line:?} in\n{yaml}");
        }
        let json = self.json(&["deployment", "web"]);
        let deployment = self.deployment("web").await;
        assert_eq!(json["metadata"]["uid"], json!(deployment.metadata.uid), "{release}");
        assert_eq!(
            json["metadata"]["resourceVersion"],
            json!(deployment.metadata.resource_version)
        );
        assert_eq!(json["spec"]["replicas"], 2, "{release}");
        let jsonpath = self.ok(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"]);
        assert_eq!(jsonpath, cluster_ip, "{release}");
        let names = self.ok(&[
            "get",
            "pods",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName}{"\n"}{end}"#,
            "-l",
            "app=web",
        ]);
        let expected: BTreeSet<String> =
            web.iter().map(|p| format!("{} {}", name_of(&p.metadata), node_of(p))).collect();
        assert_eq!(names.lines().map(str::to_owned).collect::<BTreeSet<_>>(), expected);

        // -l and --field-selector: the names as the API selects them.
        let names_of = |output: String| -> BTreeSet<String> {
            output.lines().map(|l| l.trim_start_matches("pod/").to_owned()).collect()
        };
        let labelled = names_of(self.ok(&["get", "pods", "-l", "app=web", "-o", "name"]));
        let expected: BTreeSet<String> = web.iter().map(|p| name_of(&p.metadata)).collect();
        assert_eq!(labelled, expected, "{release}");
        let all = self.pods("").await;
        assert_eq!(all.len(), 5, "{release}: web ×2, batch, solo, finished");
        for phase in ["Running", "Succeeded"] {
            let selected = names_of(self.ok(&[
                "get",
                "pods",
                "--field-selector",
                &format!("status.phase={phase}"),
                "-o",
                "name",
            ]));
            let expected: BTreeSet<String> = all
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase))
                .map(|p| name_of(&p.metadata))
                .collect();
            assert_eq!(selected, expected, "{release}: status.phase={phase}");
        }
        let by_name =
            self.ok(&["get", "pods", "--field-selector", "metadata.name=solo", "-o", "name"]);
        assert_eq!(by_name, "pod/solo\n", "{release}");

        // -A: every namespace, this one's pods under its name.
        let everywhere = self.ok(&["get", "pods", "-A"]);
        assert_eq!(header(&everywhere)[..2], ["NAMESPACE", "NAME"], "{release}");
        let listed: BTreeSet<&str> = rows(&everywhere)
            .into_iter()
            .filter(|cells| cells.first() == Some(&ns))
            .map(|cells| cells[1])
            .collect();
        let ours: BTreeSet<String> = all.iter().map(|p| name_of(&p.metadata)).collect();
        assert_eq!(listed, ours.iter().map(String::as_str).collect(), "{release}: {everywhere}");

        // -w: a watch that sees an object added, changed and deleted after it opened.
        let watch = self.spawn(&["get", "configmaps", "-w", "--output-watch-events"]);
        let cells = |line: &str, first: [&str; 2]| line.split_whitespace().take(2).eq(first);
        watch.line("the existing settings", |l| cells(l, ["ADDED", "settings"]));
        self.ok(&["create", "configmap", "watched", "--from-literal=a=b"]);
        watch.line("watched ADDED", |l| cells(l, ["ADDED", "watched"]));
        self.ok(&["label", "configmap", "watched", "seen=yes"]);
        watch.line("watched MODIFIED", |l| cells(l, ["MODIFIED", "watched"]));
        self.ok(&["delete", "configmap", "watched"]);
        watch.line("watched DELETED", |l| cells(l, ["DELETED", "watched"]));
        drop(watch);
        // Plain `get -w` of one object: its row again when it changes (DATA counts keys).
        let watch = self.spawn(&["get", "configmap", "settings", "-w"]);
        watch.line("settings with 2 keys", |l| cells(l, ["settings", "2"]));
        self.ok(&[
            "patch",
            "configmap",
            "settings",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"w":"1"}}"#,
        ]);
        watch.line("settings with 3 keys", |l| cells(l, ["settings", "3"]));
        self.ok(&[
            "patch",
            "configmap",
            "settings",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"w":null}}"#,
        ]);
        watch.line("settings with 2 keys again", |l| cells(l, ["settings", "2"]));
    }

    /// `describe` of a pod and a deployment, with the events strait recorded.
    async fn describes(&self) {
        let release = self.release;
        let solo = self.lab.api.get::<Pod>(self.ns(), "solo").await.expect("API").expect("solo");
        let node = node_of(&solo);
        let events_of = |args: &[&str], reasons: &[&str]| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let described = self.ok(args);
                let events = described.split("\nEvents:").nth(1).unwrap_or_default().to_owned();
                if reasons.iter().all(|r| events.contains(r)) {
                    return described;
                }
                assert!(Instant::now() < deadline, "{release}: {reasons:?} in\n{described}");
                std::thread::sleep(Duration::from_millis(500));
            }
        };
        let described =
            events_of(&["describe", "pod", "solo"], &["Scheduled", "Created", "Started"]);
        let node_line = described.lines().find(|l| l.starts_with("Node:")).unwrap_or_default();
        assert!(node_line.contains(&format!(" {node}/")), "{release}: {node_line}");
        assert!(
            described.contains(&format!("Successfully assigned {}/solo to {node}", self.namespace))
        );
        let described = events_of(&["describe", "deployment", "web"], &["ScalingReplicaSet"]);
        assert!(
            described.contains("2 desired | 2 updated | 2 total | 2 available"),
            "{release}: {described}"
        );
    }

    /// `apply` client-side and server-side, `replace`, `edit`, `patch` of each type, `label`
    /// and `annotate`.
    async fn writes(&self) {
        let release = self.release;
        const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
        let applied = |data: &str| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: applied}}\ndata: {data}\n")
        };
        let first = self.file("applied-1.yaml", &applied("{a: '1', gone: x}"));
        assert_eq!(self.ok(&["apply", "-f", &first]).trim(), "configmap/applied created");
        let stored = self.config_map("applied").await;
        assert_eq!(data(&stored), json!({"a": "1", "gone": "x"}), "{release}");
        let annotation = stored.metadata.annotations.unwrap_or_default();
        let last: Value = serde_json::from_str(&annotation[LAST_APPLIED]).expect("last-applied");
        assert_eq!(last["data"], json!({"a": "1", "gone": "x"}), "{release}");
        // The changed file: a key it no longer has is removed (three-way merge).
        let second = self.file("applied-2.yaml", &applied("{a: '2'}"));
        assert_eq!(self.ok(&["apply", "-f", &second]).trim(), "configmap/applied configured");
        let stored = self.config_map("applied").await;
        assert_eq!(data(&stored), json!({"a": "2"}), "{release}");
        let annotation = stored.metadata.annotations.unwrap_or_default();
        let last: Value = serde_json::from_str(&annotation[LAST_APPLIED]).expect("last-applied");
        assert_eq!(last["data"], json!({"a": "2"}), "{release}");

        let ssa = self.file(
            "ssa.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa}\ndata: {owner: tour}\n",
        );
        let server_side = self.ok(&["apply", "--server-side", "-f", &ssa]);
        assert_eq!(server_side.trim(), "configmap/ssa serverside-applied", "{release}");
        let stored = self.config_map("ssa").await;
        assert_eq!(data(&stored), json!({"owner": "tour"}), "{release}");
        let managers: Vec<(String, String)> = stored
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .map(|f| {
                (f.manager.clone().unwrap_or_default(), f.operation.clone().unwrap_or_default())
            })
            .collect();
        assert!(managers.contains(&("kubectl".into(), "Apply".into())), "{release}: {managers:?}");

        // replace: the whole object as the file has it.
        let replacement = self.file("replace.yaml", &applied("{a: '3', replaced: 'yes'}"));
        assert_eq!(self.ok(&["replace", "-f", &replacement]).trim(), "configmap/applied replaced");
        assert_eq!(data(&self.config_map("applied").await), json!({"a": "3", "replaced": "yes"}));

        // edit: the editor changes the object kubectl wrote out.
        let editor =
            self.file("editor.sh", "#!/bin/sh\nsed -i 's/mode: tour/mode: edited/' \"$1\"\n");
        std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("making the editor executable");
        let mut edit = self.command(&["edit", "configmap", "settings"]);
        let output = edit.env("KUBE_EDITOR", &editor).stdin(Stdio::null()).output().expect("edit");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{release}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout.trim(), "configmap/settings edited", "{release}");
        assert_eq!(
            data(&self.config_map("settings").await),
            json!({"mode": "edited", "level": "3"})
        );

        // merge patch: null removes a key.
        let patched = self.ok(&[
            "patch",
            "configmap",
            "settings",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"level":null,"extra":"x"}}"#,
        ]);
        assert_eq!(patched.trim(), "configmap/settings patched", "{release}");
        assert_eq!(
            data(&self.config_map("settings").await),
            json!({"mode": "edited", "extra": "x"})
        );

        // strategic merge patch (the default): service ports merge by port, so a new one is
        // added beside 80 where a merge patch would have replaced the list.
        let patched = self.ok(&[
            "patch",
            "service",
            "web",
            "-p",
            r#"{"spec":{"ports":[{"name":"alt","port":81,"targetPort":8080}]}}"#,
        ]);
        assert_eq!(patched.trim(), "service/web patched", "{release}");
        let ports = self.service("web").await.spec.and_then(|s| s.ports).unwrap_or_default();
        let numbers: BTreeSet<i32> = ports.iter().map(|p| p.port).collect();
        assert_eq!(numbers, [80, 81].into(), "{release}");
        let alt = ports.iter().position(|p| p.port == 81).expect("port 81");

        // JSON patch: a test that holds, then the removal of that port.
        let operations = format!(
            r#"[{{"op":"test","path":"/spec/ports/{alt}/port","value":81}},{{"op":"remove","path":"/spec/ports/{alt}"}}]"#
        );
        let patched = self.ok(&["patch", "service", "web", "--type", "json", "-p", &operations]);
        assert_eq!(patched.trim(), "service/web patched", "{release}");
        let ports = self.service("web").await.spec.and_then(|s| s.ports).unwrap_or_default();
        assert_eq!(ports.iter().map(|p| p.port).collect::<Vec<_>>(), [80], "{release}");
        // A test that fails changes nothing.
        let refused = self.run(&[
            "patch",
            "service",
            "web",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/spec/selector"},{"op":"test","path":"/spec/ports/0/port","value":81}]"#,
        ]);
        assert_ne!(refused.code, Some(0), "{release}: {}", refused.stdout);
        assert!(self.service("web").await.spec.and_then(|s| s.selector).is_some(), "{release}");

        // label and annotate, and their removal with `key-`.
        assert_eq!(self.ok(&["label", "pod", "solo", "tier=front"]).trim(), "pod/solo labeled");
        let labels = |pod: Pod| pod.metadata.labels.unwrap_or_default();
        let solo = || async { self.lab.api.get::<Pod>(self.ns(), "solo").await.unwrap().unwrap() };
        assert_eq!(labels(solo().await).get("tier").map(String::as_str), Some("front"));
        assert_eq!(self.ok(&["label", "pod", "solo", "tier-"]).trim(), "pod/solo unlabeled");
        assert_eq!(labels(solo().await).get("tier"), None, "{release}");
        let annotated = self.ok(&["annotate", "deployment", "web", "note=toured"]);
        // The verb is kubectl's own wording (1.27 prints "annotate").
        assert!(annotated.starts_with("deployment.apps/web annotate"), "{release}: {annotated}");
        let notes = |d: Deployment| d.metadata.annotations.unwrap_or_default().get("note").cloned();
        assert_eq!(notes(self.deployment("web").await).as_deref(), Some("toured"));
        self.ok(&["annotate", "deployment", "web", "note-"]);
        assert_eq!(notes(self.deployment("web").await), None, "{release}");
    }

    /// `rollout restart`, a new image by strategic patch, `rollout status`, `history` and
    /// `undo`, then `scale`.
    async fn rollouts(&self) {
        let release = self.release;
        const RESTARTED: &str = "kubectl.kubernetes.io/restartedAt";
        let template_annotations = |d: &Deployment| {
            d.spec
                .as_ref()
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.annotations.clone())
                .unwrap_or_default()
        };
        assert_eq!(
            self.ok(&["rollout", "restart", "deployment/web"]).trim(),
            "deployment.apps/web restarted"
        );
        let restarted_at = template_annotations(&self.deployment("web").await)
            .get(RESTARTED)
            .cloned()
            .unwrap_or_else(|| panic!("{release}: no {RESTARTED} on the template"));
        self.rollout_done();
        self.settled("app=web", 2, |pod| {
            pod.metadata.annotations.as_ref().and_then(|a| a.get(RESTARTED)) == Some(&restarted_at)
        })
        .await;

        // Strategic merge of the template's containers by name: the image changes, the port
        // stays.
        let patch = r#"{"spec":{"template":{"spec":{"containers":[{"name":"netexec","image":"strait/netexec:v2"}]}}}}"#;
        assert_eq!(
            self.ok(&["patch", "deployment", "web", "-p", patch]).trim(),
            "deployment.apps/web patched"
        );
        let template = self.deployment("web").await.spec.expect("spec").template.spec;
        assert_eq!(image_of(template.as_ref()), "strait/netexec:v2", "{release}");
        let ports: Vec<i32> = template
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [8080], "{release}");
        self.rollout_done();
        self.settled("app=web", 2, |pod| image_of(pod.spec.as_ref()) == "strait/netexec:v2").await;

        // history: one revision per replica set, as the sets are annotated.
        let revisions = |history: &str| -> BTreeSet<String> {
            rows(history)
                .into_iter()
                .filter(|c| c.first().is_some_and(|n| n.parse::<u32>().is_ok()))
                .map(|c| c[0].to_owned())
                .collect()
        };
        let stored_revisions = || async {
            self.replica_sets("app=web")
                .await
                .iter()
                .filter_map(|set| {
                    set.metadata
                        .annotations
                        .as_ref()?
                        .get("deployment.kubernetes.io/revision")
                        .cloned()
                })
                .collect::<BTreeSet<String>>()
        };
        let history = self.ok(&["rollout", "history", "deployment/web"]);
        assert!(history.contains("REVISION  CHANGE-CAUSE"), "{release}: {history}");
        assert_eq!(
            revisions(&history),
            ["1", "2", "3"].map(String::from).into(),
            "{release}: {history}"
        );
        assert_eq!(stored_revisions().await, revisions(&history), "{release}");
        let revision_2 = self.ok(&["rollout", "history", "deployment/web", "--revision=2"]);
        assert!(
            revision_2.contains(&format!("{RESTARTED}: {restarted_at}")),
            "{release}: {revision_2}"
        );
        assert!(revision_2.contains("Image:\tstrait/netexec\n"), "{release}: {revision_2}");

        // undo: back to revision 2 (the restart), its image again; it becomes revision 4.
        assert_eq!(
            self.ok(&["rollout", "undo", "deployment/web"]).trim(),
            "deployment.apps/web rolled back"
        );
        let web = self.deployment("web").await;
        assert_eq!(
            image_of(web.spec.as_ref().and_then(|s| s.template.spec.as_ref())),
            "strait/netexec"
        );
        assert_eq!(template_annotations(&web).get(RESTARTED), Some(&restarted_at), "{release}");
        self.rollout_done();
        self.settled("app=web", 2, |pod| image_of(pod.spec.as_ref()) == "strait/netexec").await;
        let history = self.ok(&["rollout", "history", "deployment/web"]);
        assert_eq!(
            revisions(&history),
            ["1", "3", "4"].map(String::from).into(),
            "{release}: {history}"
        );

        // scale: three pods really running on the lab.
        assert_eq!(
            self.ok(&["scale", "deployment", "web", "--replicas=3"]).trim(),
            "deployment.apps/web scaled"
        );
        assert_eq!(self.deployment("web").await.spec.and_then(|s| s.replicas), Some(3));
        self.settled("app=web", 3, |_| true).await;
        self.rollout_done();
    }

    /// `logs` (`-c`, `-f`, `--previous`) and `exec`, shortly (pod_logs.rs and pod_exec.rs go
    /// deeper).
    async fn logs_and_exec(&self) {
        let release = self.release;
        let ticks = self.ok(&["logs", "solo", "-c", "side"]);
        let numbers: Vec<u64> =
            ticks.lines().filter_map(|l| l.strip_prefix("tick ")?.parse().ok()).collect();
        assert!(!numbers.is_empty(), "{release}: {ticks}");
        assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>(), "{release}");
        assert_eq!(self.ok(&["logs", "solo", "-c", "bird"]), "second life\n", "{release}");
        assert_eq!(self.ok(&["logs", "solo", "-c", "bird", "--previous"]), "first life\n");

        let follow = self.spawn(&["logs", "-f", "solo", "-c", "side", "--tail=1"]);
        let tick = |line: &str| line.strip_prefix("tick ").and_then(|n| n.parse::<u64>().ok());
        let first = tick(&follow.line("a tick", |l| tick(l).is_some())).expect("a tick");
        let later = follow.line("a tick written after -f opened", |l| tick(l).is_some());
        assert_eq!(tick(&later), Some(first + 1), "{release}: {later:?} after tick {first}");
        drop(follow);

        // exec: the named container's environment, its output and its exit code.
        let ran = self.run(&[
            "exec",
            "solo",
            "-c",
            "side",
            "--",
            "bash",
            "-c",
            "echo \"tour $TOUR\"; exit 3",
        ]);
        assert_eq!(ran.code, Some(3), "{release}: {}", ran.stderr);
        assert_eq!(ran.stdout, format!("tour {release}\n"), "{release}");
    }

    /// `cordon`, `uncordon`, then `drain` of the node of a web pod: its pods leave it and
    /// the deployments' pods come back Running elsewhere; the node is uncordoned at the end.
    async fn drain(&self) {
        let release = self.release;
        let web = self.pods("app=web").await;
        let node = node_of(&web[0]);
        let unschedulable = || async {
            let node = self.lab.api.get::<Node>(None, &node).await.expect("API").expect("node");
            node.spec.and_then(|s| s.unschedulable).unwrap_or(false)
        };
        assert_eq!(self.ok(&["cordon", &node]).trim(), format!("node/{node} cordoned"));
        assert!(unschedulable().await, "{release}");
        let nodes = self.ok(&["get", "nodes"]);
        assert_eq!(row(&nodes, &node)[1], "Ready,SchedulingDisabled", "{release}: {nodes}");
        assert_eq!(self.ok(&["uncordon", &node]).trim(), format!("node/{node} uncordoned"));
        assert!(!unschedulable().await, "{release}");
        assert_eq!(row(&self.ok(&["get", "nodes"]), &node)[1], "Ready", "{release}");

        let on_node: Vec<Pod> =
            self.pods("").await.into_iter().filter(|p| node_of(p) == node).collect();
        let drained = self.ok(&[
            "drain",
            &node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--force",
            "--timeout=90s",
        ]);
        assert!(drained.contains(&format!("node/{node} drained")), "{release}: {drained}");
        assert!(unschedulable().await, "{release}");
        for pod in &on_node {
            let name = name_of(&pod.metadata);
            assert!(
                drained.contains(&format!("pod/{name} evicted")),
                "{release}: {name} in {drained}"
            );
            let now = self.lab.api.get::<Pod>(self.ns(), &name).await.expect("API");
            assert!(
                now.is_none_or(|p| p.metadata.uid != pod.metadata.uid),
                "{release}: {name} still there"
            );
        }
        let elsewhere = |pod: &Pod| node_of(pod) != node;
        self.settled("app=web", 3, elsewhere).await;
        self.settled("app=batch", 1, elsewhere).await;
        assert_eq!(self.ok(&["uncordon", &node]).trim(), format!("node/{node} uncordoned"));
        assert!(!unschedulable().await, "{release}");
    }

    /// `delete` with each cascade: background (the dependents go after), orphan (they stay),
    /// foreground (they go first).
    async fn deletes(&self) {
        let release = self.release;
        let deleted = self.ok(&["delete", "deployment", "batch", "--cascade=background"]);
        assert_eq!(deleted.trim(), r#"deployment.apps "batch" deleted"#, "{release}");
        assert!(self.lab.api.get::<Deployment>(self.ns(), "batch").await.expect("API").is_none());
        until(&format!("{release}: batch's set and pod collected"), SLOW, || async {
            (self.replica_sets("app=batch").await.is_empty()
                && self.pods("app=batch").await.is_empty())
            .then_some(())
        })
        .await;

        // orphan: the deployment goes, its sets and pods stay, ownerless.
        let pods_before = self.settled("app=web", 3, |_| true).await;
        let deleted = self.ok(&["delete", "deployment", "web", "--cascade=orphan"]);
        assert_eq!(deleted.trim(), r#"deployment.apps "web" deleted"#, "{release}");
        assert!(self.lab.api.get::<Deployment>(self.ns(), "web").await.expect("API").is_none());
        let sets = self.replica_sets("app=web").await;
        assert_eq!(sets.len(), 3, "{release}: the sets of revisions 1, 3 and 4 stay");
        for set in &sets {
            assert!(set.metadata.owner_references.as_ref().is_none_or(Vec::is_empty), "{release}");
        }
        let uids =
            |pods: &[Pod]| pods.iter().map(|p| p.metadata.uid.clone()).collect::<BTreeSet<_>>();
        let pods_after = self.settled("app=web", 3, |_| true).await;
        assert_eq!(uids(&pods_after), uids(&pods_before), "{release}: the orphaned pods live on");

        // foreground: kubectl returns once the set is gone, and its pods went before it.
        let active = sets
            .iter()
            .find(|s| s.spec.as_ref().and_then(|s| s.replicas) == Some(3))
            .map(|s| name_of(&s.metadata))
            .unwrap_or_else(|| panic!("{release}: no set of 3 replicas"));
        let deleted =
            self.ok(&["delete", "replicaset", &active, "--cascade=foreground", "--timeout=90s"]);
        assert_eq!(deleted.trim(), format!(r#"replicaset.apps "{active}" deleted"#), "{release}");
        assert!(self.lab.api.get::<ReplicaSet>(self.ns(), &active).await.expect("API").is_none());
        let left = self.pods("app=web").await;
        assert!(
            left.is_empty(),
            "{release}: pods of a set deleted in the foreground: {:?}",
            uids(&left)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kubectl_release_tours_every_command_on_a_lab() {
    if !support::privileged("every_kubectl_release_tours_every_command_on_a_lab") {
        return;
    }
    let releases: Vec<(&str, String)> = RELEASES
        .iter()
        .map(|release| (*release, format!("/usr/lib/google-cloud-sdk/bin/kubectl.{release}")))
        .collect();
    for (release, path) in &releases {
        assert!(std::path::Path::new(path).exists(), "kubectl {release} is missing: {path}");
    }
    // A short restart back-off: solo's first container fails once, for `logs --previous`.
    let lab = TestLab::up_with_agent_args("kubectl", 3, &["--restart-backoff", "0.5"]).await;
    let files = DirGuard::temp("kubectl-lab");
    for (release, kubectl) in &releases {
        let tour = Tour {
            lab: &lab,
            release,
            kubectl: kubectl.clone(),
            namespace: format!("tour-{}", release.replace('.', "")),
            files: &files,
        };
        tour.tour().await;
    }
}
