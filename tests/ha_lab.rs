//! A lab whose three controllers share one etcd (a real etcd started on loopback): killing the
//! leader's process (and the first replica, which the agents follow) with SIGKILL leaves the
//! nodes Ready, and a pod created afterwards through a surviving API server is scheduled,
//! started by its node's agent (which moved to a live replica's NodeSync) and reported
//! Running and Ready through a live API server.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec};
use strait::lab::{self, ControlPlaneOptions, LabProcess};
use strait_controlplane::{
    store::{Store, StoreLocation},
    testing::{LocalEtcd, meta},
};
use support::lab::TestLab;

fn netexec_pod(name: &str) -> Pod {
    Pod {
        metadata: meta(name),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "netexec".to_owned(),
                image: Some("strait/netexec".to_owned()),
                ports: Some(vec![ContainerPort { container_port: 8080, ..Default::default() }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lab_on_etcd_survives_the_death_of_its_leading_controller() {
    if !support::privileged("a_lab_on_etcd_survives_the_death_of_its_leading_controller") {
        return;
    }
    // Declared first, dropped last: the lab goes down while its etcd still runs.
    let etcd = LocalEtcd::start("ha-lab").await.expect("etcd starts");
    // No root in the URL: the controllers keep the lab's keys under /strait/<lab>.
    let store = StoreLocation::Etcd { endpoints: vec![etcd.endpoint()], root: None };
    let control = ControlPlaneOptions { store, controllers: 3 };
    let lab = TestLab::up_with("ha", 2, &control).await;
    lab.api.create::<Pod>(Some("default"), &netexec_pod("before")).await.expect("a pod");
    lab.wait_running("before").await;

    // The leader record names `host/pid`; find the lab process with that pid.
    let store = etcd.store(&format!("/strait/{}", lab.name())).await.expect("a store client");
    let record = store.get("/meta/leader").await.expect("reading").expect("a leader");
    let leader: u32 = String::from_utf8_lossy(&record.value)
        .rsplit('/')
        .next()
        .and_then(|pid| pid.parse().ok())
        .expect("a pid in the leader record");
    let process = if lab.state.controller_pid == leader {
        LabProcess::Controller
    } else {
        let replica = lab.state.replicas.iter().find(|r| r.pid == leader).expect("a lab replica");
        LabProcess::ControllerReplica(replica.index)
    };
    let killed = Instant::now();
    lab::kill(lab.name(), &process).expect("killing the leader");
    // Agents follow the first replica while it answers: kill it too, so that every run makes
    // them move to a live one.
    if process != LabProcess::Controller {
        lab::kill(lab.name(), &LabProcess::Controller).expect("killing the first replica");
    }

    lab.api.create::<Pod>(Some("default"), &netexec_pod("after")).await.expect("a pod after it");
    let after = lab.wait_running("after").await;
    assert!(after.spec.and_then(|s| s.node_name).is_some(), "scheduled by the new leader");
    println!(
        "leader {process:?} killed; a pod created after it was Running in {:?}",
        killed.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (nodes, _) = lab.api.list::<Node>(None, "").await.expect("listing nodes");
        if nodes.iter().filter(|n| lab::is_node_ready(n)).count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "nodes not Ready after the failover\n{}", lab.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
