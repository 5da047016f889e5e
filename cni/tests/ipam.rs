//! The built-in allocator: no duplicates under concurrency, round-robin reuse, release, GC and
//! exhaustion.

mod common;

use std::{collections::HashSet, net::Ipv4Addr, sync::Arc};

use common::TempDir;
use strait_cni::{
    invocation::Attachment,
    ipam::{IpamError, PodIpAllocator},
};

fn owner(id: &str) -> Attachment {
    Attachment { container_id: id.to_owned(), ifname: "eth0".to_owned() }
}

fn allocator(dir: &TempDir, subnet: &str) -> PodIpAllocator {
    PodIpAllocator::new(dir.path(), "strait-test", subnet.parse().unwrap())
}

#[test]
fn fifty_threads_allocating_at_once_get_fifty_distinct_addresses() {
    let dir = TempDir::new("ipam-50");
    let allocator = Arc::new(allocator(&dir, "10.244.1.0/24"));
    let barrier = Arc::new(std::sync::Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|n| {
            let allocator = Arc::clone(&allocator);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                allocator.allocate(&owner(&format!("pod-{n}"))).expect("allocating")
            })
        })
        .collect();
    let ips: Vec<Ipv4Addr> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let distinct: HashSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), 50, "duplicates in {ips:?}");
    let stored = allocator.allocations().unwrap();
    assert_eq!(stored.len(), 50);
    for allocation in &stored {
        let n: usize = allocation.owner.container_id["pod-".len()..].parse().unwrap();
        assert_eq!(ips[n], allocation.ip, "the store and the caller agree on pod-{n}");
    }
}

#[test]
fn network_address_first_host_and_broadcast_are_never_handed_out() {
    let dir = TempDir::new("ipam-reserved");
    let allocator = allocator(&dir, "10.244.9.0/29");
    let ips: Vec<_> =
        (0..5).map(|n| allocator.allocate(&owner(&format!("p{n}"))).unwrap()).collect();
    let expected: Vec<Ipv4Addr> = (2..=6).map(|last| Ipv4Addr::new(10, 244, 9, last)).collect();
    assert_eq!(ips, expected);
    assert_eq!(allocator.capacity(), 5);
}

#[test]
fn a_released_address_is_not_reused_until_the_range_wraps() {
    let dir = TempDir::new("ipam-rr");
    let allocator = allocator(&dir, "10.244.9.0/29");
    let first = allocator.allocate(&owner("a")).unwrap();
    let second = allocator.allocate(&owner("b")).unwrap();
    assert_eq!(allocator.release(&owner("a")).unwrap(), Some(first));
    let third = allocator.allocate(&owner("c")).unwrap();
    assert_ne!(third, first, "round-robin resumes after the last allocation");
    assert_eq!(u32::from(third), u32::from(second) + 1);
    // Fill the rest; the search wraps around and finds the released address last.
    let rest: Vec<_> =
        (0..3).map(|n| allocator.allocate(&owner(&format!("r{n}"))).unwrap()).collect();
    assert_eq!(rest.last(), Some(&first), "got {rest:?}");
}

#[test]
fn allocating_twice_for_the_same_attachment_returns_the_same_address() {
    let dir = TempDir::new("ipam-idem");
    let allocator = allocator(&dir, "10.244.1.0/24");
    let first = allocator.allocate(&owner("a")).unwrap();
    assert_eq!(allocator.allocate(&owner("a")).unwrap(), first);
    let other_if = Attachment { container_id: "a".into(), ifname: "net1".into() };
    assert_ne!(allocator.allocate(&other_if).unwrap(), first, "another ifname is another key");
    assert_eq!(allocator.allocations().unwrap().len(), 2);
}

#[test]
fn release_frees_only_the_owner_and_is_idempotent() {
    let dir = TempDir::new("ipam-release");
    let allocator = allocator(&dir, "10.244.1.0/24");
    let a = allocator.allocate(&owner("a")).unwrap();
    let b = allocator.allocate(&owner("b")).unwrap();
    assert_eq!(allocator.release(&owner("a")).unwrap(), Some(a));
    assert_eq!(allocator.release(&owner("a")).unwrap(), None, "second release finds nothing");
    assert_eq!(allocator.allocation_of(&owner("a")).unwrap(), None);
    assert_eq!(allocator.allocation_of(&owner("b")).unwrap(), Some(b));
}

#[test]
fn gc_releases_everything_not_listed_and_keeps_what_is() {
    let dir = TempDir::new("ipam-gc");
    let allocator = allocator(&dir, "10.244.1.0/24");
    for id in ["keep-1", "keep-2", "gone-1", "gone-2"] {
        allocator.allocate(&owner(id)).unwrap();
    }
    let keep: HashSet<_> = [owner("keep-1"), owner("keep-2")].into_iter().collect();
    let released = allocator.release_all_except(&keep).unwrap();
    let released_ids: HashSet<_> = released.iter().map(|a| a.owner.container_id.as_str()).collect();
    assert_eq!(released_ids, HashSet::from(["gone-1", "gone-2"]));
    let left: HashSet<_> =
        allocator.allocations().unwrap().into_iter().map(|a| a.owner.container_id).collect();
    assert_eq!(left, HashSet::from(["keep-1".to_owned(), "keep-2".to_owned()]));
}

#[test]
fn an_exhausted_subnet_says_which_range_and_how_many_are_in_use() {
    let dir = TempDir::new("ipam-full");
    let allocator = allocator(&dir, "10.244.9.0/29");
    for n in 0..5 {
        allocator.allocate(&owner(&format!("p{n}"))).unwrap();
    }
    let error = allocator.allocate(&owner("one-too-many")).expect_err("the /29 is full");
    assert!(matches!(error, IpamError::Exhausted { in_use: 5, capacity: 5, .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("10.244.9.0/29"), "{message}");
    assert!(message.contains("5 of 5"), "{message}");
    assert!(message.contains("10.244.9.2-10.244.9.6"), "{message}");
    assert_eq!(allocator.usage().unwrap().in_use, 5);
}

#[test]
fn allocations_survive_a_new_allocator_on_the_same_store() {
    let dir = TempDir::new("ipam-persist");
    let first = allocator(&dir, "10.244.1.0/24").allocate(&owner("a")).unwrap();
    let reopened = allocator(&dir, "10.244.1.0/24");
    assert_eq!(reopened.allocation_of(&owner("a")).unwrap(), Some(first));
    assert_ne!(reopened.allocate(&owner("b")).unwrap(), first);
}
