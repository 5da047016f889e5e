//! A highly available control plane: three `strait controller` replicas on one etcd (a real
//! etcd started on loopback). Every replica serves the API; one leads. Killing the leader with
//! SIGKILL under write load hands leadership to another replica within a few seconds, loses no
//! acknowledged write, schedules a pod created after the failover, and a NodeSync follower that
//! was connected to the dead replica goes on receiving its node's state from a live one.
//! Allocations made through three API servers at once never collide. Needs no root.

mod support;

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Pod, Service, ServicePort, ServiceSpec};
use strait_controlplane::{
    store::Store,
    testing::{LocalEtcd, TempDataDir, meta, node, pod, pod_on},
};
use support::controller::{ControllerProcess, client_of};

const ROOT: &str = "/strait/ha";

async fn replicas(etcd: &LocalEtcd, dir: &TempDataDir, count: usize) -> Vec<ControllerProcess> {
    let mut replicas = Vec::new();
    for index in 0..count {
        let data = dir.path().join(format!("replica-{index}"));
        // One CA for the cluster: any replica accepts any client.
        let pki = dir.path().join("pki");
        let pki = pki.to_str().expect("a UTF-8 path");
        let started = ControllerProcess::start(
            &data,
            &etcd.url(ROOT),
            &["--cluster", "ha", "--leader-lease-seconds", "3", "--pki-dir", pki],
        )
        .await;
        replicas.push(started);
    }
    replicas
}

/// The pid in the leader record (`host/pid`), once there is one.
async fn leader_pid(store: &dyn Store) -> Option<u32> {
    let record = store.get("/meta/leader").await.ok()??;
    let text = String::from_utf8_lossy(&record.value).into_owned();
    text.rsplit('/').next()?.parse().ok()
}

fn revision_of(pod: &Pod) -> u64 {
    pod.metadata.resource_version.as_deref().and_then(|rv| rv.parse().ok()).expect("a numeric RV")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_hands_over_within_seconds_and_loses_nothing() {
    let etcd = LocalEtcd::start("ha").await.expect("etcd starts");
    let dir = TempDataDir::new("ha");
    let mut replicas = replicas(&etcd, &dir, 3).await;
    let store = etcd.store(ROOT).await.expect("a store client of the same etcd");

    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        if let Some(pid) = leader_pid(&store).await {
            break pid;
        }
        assert!(Instant::now() < deadline, "no replica became the leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let leader_index =
        replicas.iter().position(|r| r.pid() == leader).expect("the leader is one of the three");
    // Agents and clients are given every replica, the leader first: they start on it.
    let mut order: Vec<&str> = vec![replicas[leader_index].url()];
    order.extend(replicas.iter().filter(|r| r.pid() != leader).map(ControllerProcess::url));
    let urls = order.join(",");
    let admin = replicas[0].admin_credentials();
    let api = client_of(&urls, &admin);
    api.create::<Node>(None, &node("n1", "172.31.0.1", true)).await.expect("creating a node");

    // A NodeSync follower for n1, as an agent runs it.
    let synced: Arc<Mutex<(usize, HashSet<String>)>> = Arc::default();
    let follower = {
        let (urls, synced) = (urls.clone(), Arc::clone(&synced));
        let credentials = replicas[0].node_credentials("n1");
        tokio::spawn(async move {
            strait_dataplane::agent::sync::follow(
                &urls,
                &credentials,
                "n1",
                move |state, change| {
                    let mut synced = synced.lock().unwrap();
                    if change.snapshot {
                        synced.0 += 1;
                    }
                    synced.1 =
                        state.pods.values().filter_map(|p| p.metadata.name.clone()).collect();
                },
            )
            .await;
        })
    };

    // Write load through the replica list: creates of pods bound to n1.
    let acknowledged: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..3 {
        let (api, acknowledged, stop) =
            (client_of(&urls, &admin), Arc::clone(&acknowledged), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let mut failed = 0;
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let name = format!("load-{writer}-{i}");
                match api.create::<Pod>(Some("default"), &pod_on(&name, "n1")).await {
                    Ok(created) => {
                        acknowledged.lock().unwrap().insert(name, revision_of(&created));
                    }
                    Err(_) => failed += 1,
                }
            }
            failed
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().unwrap().len() < 60 || synced.lock().unwrap().0 == 0 {
        assert!(Instant::now() < deadline, "no load or no NodeSync snapshot before the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let killed_at = Instant::now();
    replicas[leader_index].kill9();
    let new_leader = loop {
        if let Some(pid) = leader_pid(&store).await
            && pid != leader
        {
            break pid;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(15), "no replica took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took_over = killed_at.elapsed();
    assert!(replicas.iter().any(|r| r.pid() == new_leader), "a live replica leads");
    assert!(took_over < Duration::from_secs(8), "takeover took {took_over:?}");

    // Work only the leader does: a pending pod gets scheduled.
    api.create::<Pod>(Some("default"), &pod("after-failover")).await.expect("a create after it");
    let scheduled = loop {
        let pod: Option<Pod> = api.get(Some("default"), "after-failover").await.ok().flatten();
        if pod.and_then(|p| p.spec?.node_name).as_deref() == Some("n1") {
            break killed_at.elapsed();
        }
        assert!(killed_at.elapsed() < Duration::from_secs(30), "the pod was never scheduled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The follower was on the dead replica: it reconnected and sees the new pod.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !synced.lock().unwrap().1.contains("after-failover") {
        assert!(Instant::now() < deadline, "the NodeSync follower never saw the new pod");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resynced = killed_at.elapsed();
    assert!(
        synced.lock().unwrap().0 >= 2,
        "the follower took a fresh snapshot from a live replica"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failed_writes = 0;
    for writer in writers {
        failed_writes += writer.await.expect("a writer task");
    }
    follower.abort();
    let acknowledged = acknowledged.lock().unwrap().clone();
    let (pods, _) = api.list::<Pod>(Some("default"), "").await.expect("listing");
    let stored: BTreeMap<String, u64> = pods
        .iter()
        .map(|p| (p.metadata.name.clone().unwrap_or_default(), revision_of(p)))
        .collect();
    for (name, revision) in &acknowledged {
        assert_eq!(stored.get(name), Some(revision), "{name} acknowledged at {revision}");
    }
    println!(
        "failover: leader pid {leader} killed; pid {new_leader} led after {:.2}s; a pod created \
         after the kill was scheduled at {:.2}s; the NodeSync follower had it at {:.2}s; {} \
         acknowledged writes all kept, {failed_writes} writes failed while the leader's replica went away",
        took_over.as_secs_f64(),
        scheduled.as_secs_f64(),
        resynced.as_secs_f64(),
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_stay_unique_with_three_api_servers_writing() {
    let etcd = LocalEtcd::start("ha-alloc").await.expect("etcd starts");
    let dir = TempDataDir::new("ha-alloc");
    let replicas = replicas(&etcd, &dir, 3).await;
    // Every create races the same create on the two other API servers.
    let mut tasks = Vec::new();
    for (index, replica) in replicas.iter().enumerate() {
        for i in 0..12 {
            let api = replica.client();
            tasks.push(tokio::spawn(async move {
                let node = node(&format!("node-{index}-{i}"), "172.31.0.9", true);
                let created_node = api.create::<Node>(None, &node).await;
                let service = Service {
                    metadata: meta(&format!("svc-{index}-{i}")),
                    spec: Some(ServiceSpec {
                        ports: Some(vec![ServicePort { port: 80, ..ServicePort::default() }]),
                        ..ServiceSpec::default()
                    }),
                    ..Service::default()
                };
                let created_service = api.create::<Service>(Some("default"), &service).await;
                (created_node.map(|_| ()), created_service.map(|_| ()))
            }));
        }
    }
    for task in tasks {
        let (node, service) = task.await.expect("a task");
        node.expect("every node create succeeds, claiming again when it lost a race");
        service.expect("every service create succeeds, claiming again when it lost a race");
    }
    let api = replicas[0].client();
    let (nodes, _) = api.list::<Node>(None, "").await.expect("listing nodes");
    let cidrs: Vec<String> =
        nodes.iter().filter_map(|n| n.spec.as_ref()?.pod_cidr.clone()).collect();
    assert_eq!(cidrs.len(), nodes.len(), "every node has a pod CIDR");
    assert_eq!(cidrs.iter().collect::<HashSet<_>>().len(), cidrs.len(), "no CIDR twice: {cidrs:?}");
    let (services, _) = api.list::<Service>(None, "").await.expect("listing services");
    let ips: Vec<String> =
        services.iter().filter_map(|s| s.spec.as_ref()?.cluster_ip.clone()).collect();
    assert_eq!(ips.len(), services.len(), "every service has a cluster IP");
    assert_eq!(ips.iter().collect::<HashSet<_>>().len(), ips.len(), "no cluster IP twice: {ips:?}");
    assert!(services.len() >= 36, "36 services and kube-dns: {}", services.len());
}
