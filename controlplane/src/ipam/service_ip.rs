//! Service VIPs (cluster IPs): single addresses of the service CIDR, one per Service.
//!
//! An allocation is a store key (`/registry/ipam/serviceips/<ip>` → the service's
//! `namespace/name` and uid) written in the same transaction as the Service that receives it,
//! guarded by an "absent" compare, and deleted in the transaction that deletes the Service. An
//! address is therefore never handed out twice, not even across controller restarts: the
//! store, not the process, knows what is taken.
//!
//! Dynamic allocation walks the range from a rolling cursor, so an address just released is
//! handed out again only after the rest of the range has been offered (clients and node caches
//! that still know the old service have time to forget it). The cluster DNS address is never
//! given dynamically: it belongs to `kube-system/kube-dns`, which claims it explicitly.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
};

use bytes::Bytes;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::store::{Compare, KeyValue, Op, Store, StoreError};

/// Where allocations live in the store.
pub const SERVICE_IP_KEY_PREFIX: &str = "/registry/ipam/serviceips/";

/// The smallest service CIDR accepted: a /30 leaves two usable addresses (one for DNS).
const MIN_PREFIX_ROOM: u8 = 2;
/// The largest: 2^20 addresses bounds the scan for a free one.
const MAX_PREFIX_ROOM: u8 = 20;

#[derive(Debug, thiserror::Error)]
pub enum ServiceIpError {
    #[error(
        "the service CIDR {cidr} must be between /{} and /{} (IPv4)",
        32 - MAX_PREFIX_ROOM,
        32 - MIN_PREFIX_ROOM
    )]
    CidrSize { cidr: Ipv4Net },
    #[error("the cluster DNS address {dns} is not a usable address of the service CIDR {cidr}")]
    DnsOutsideRange { dns: Ipv4Addr, cidr: Ipv4Net },
    #[error("every address of the service CIDR {cidr} is allocated")]
    RangeFull { cidr: Ipv4Net },
}

/// Why an explicitly requested cluster IP cannot be given.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestedIpError {
    /// Outside the range, or its network or broadcast address.
    NotInRange,
    AlreadyAllocated,
}

/// The stored value of an allocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceIpOwner {
    /// `namespace/name` of the service.
    pub service: String,
    pub uid: String,
}

/// A planned allocation: apply `compare` and `op` in the transaction that writes the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIpClaim {
    pub ip: Ipv4Addr,
    pub compare: Compare,
    pub op: Op,
}

/// Hands out addresses of the service CIDR, through the store.
#[derive(Debug)]
pub struct ServiceIpAllocator {
    cidr: Ipv4Net,
    dns: Ipv4Addr,
    /// Offset (from the network address) where the next dynamic search starts.
    cursor: AtomicU32,
}

impl ServiceIpAllocator {
    pub fn new(cidr: Ipv4Net, dns: Ipv4Addr) -> Result<Self, ServiceIpError> {
        let cidr = cidr.trunc();
        let room = 32 - cidr.prefix_len();
        if !(MIN_PREFIX_ROOM..=MAX_PREFIX_ROOM).contains(&room) {
            return Err(ServiceIpError::CidrSize { cidr });
        }
        let allocator = Self { cidr, dns, cursor: AtomicU32::new(0) };
        if !allocator.is_usable(dns) {
            return Err(ServiceIpError::DnsOutsideRange { dns, cidr });
        }
        // Start somewhere in the range so that a restarted controller does not reuse, first
        // thing, the lowest address released before the restart.
        let start = rand::random_range(1..allocator.size() - 1);
        allocator.cursor.store(start, Ordering::Relaxed);
        Ok(allocator)
    }

    /// The default range, `10.96.0.0/16`, with the cluster DNS service at `10.96.0.10` (the
    /// addresses kubeadm clusters use, so that existing manifests and habits carry over).
    pub fn default_range() -> Self {
        let cidr = Ipv4Net::new_assert(Ipv4Addr::new(10, 96, 0, 0), 16);
        let dns = Ipv4Addr::new(10, 96, 0, 10);
        let start = rand::random_range(1..(1u32 << 16) - 1);
        Self { cidr, dns, cursor: AtomicU32::new(start) }
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    pub fn cluster_dns_ip(&self) -> Ipv4Addr {
        self.dns
    }

    fn size(&self) -> u32 {
        1 << (32 - self.cidr.prefix_len())
    }

    fn at(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + offset)
    }

    /// Whether `ip` may be a cluster IP: inside the range, neither its network nor its
    /// broadcast address.
    pub fn is_usable(&self, ip: Ipv4Addr) -> bool {
        self.cidr.contains(&ip) && ip != self.cidr.network() && ip != self.cidr.broadcast()
    }

    /// The store key of an address.
    pub fn key(ip: Ipv4Addr) -> String {
        format!("{SERVICE_IP_KEY_PREFIX}{ip}")
    }

    /// Every allocation in the store: address and owner.
    pub async fn allocations(
        &self,
        store: &dyn Store,
    ) -> Result<Vec<(Ipv4Addr, ServiceIpOwner)>, StoreError> {
        let list = store.list(SERVICE_IP_KEY_PREFIX).await?;
        list.items.iter().map(decode_allocation).collect()
    }

    fn claim(ip: Ipv4Addr, owner: &ServiceIpOwner) -> ServiceIpClaim {
        let key = Self::key(ip);
        // Serializing a struct of two strings cannot fail.
        let value = serde_json::to_vec(owner).unwrap_or_default();
        ServiceIpClaim {
            ip,
            compare: Compare::Absent { key: key.clone() },
            op: Op::Put { key, value: Bytes::from(value) },
        }
    }

    /// Plans claiming `ip` for `owner`. The claim only holds if its compare passes in the
    /// transaction that applies it.
    pub async fn plan_requested(
        &self,
        store: &dyn Store,
        ip: Ipv4Addr,
        owner: &ServiceIpOwner,
    ) -> Result<Result<ServiceIpClaim, RequestedIpError>, StoreError> {
        if !self.is_usable(ip) {
            return Ok(Err(RequestedIpError::NotInRange));
        }
        if store.get(&Self::key(ip)).await?.is_some() {
            return Ok(Err(RequestedIpError::AlreadyAllocated));
        }
        Ok(Ok(Self::claim(ip, owner)))
    }

    /// Plans claiming a free address for `owner`, searching from the rolling cursor; `None`
    /// when the range is full.
    pub async fn plan_next(
        &self,
        store: &dyn Store,
        owner: &ServiceIpOwner,
    ) -> Result<Option<ServiceIpClaim>, StoreError> {
        let taken: HashSet<Ipv4Addr> =
            self.allocations(store).await?.into_iter().map(|(ip, _)| ip).collect();
        let size = self.size();
        let start = self.cursor.load(Ordering::Relaxed);
        for step in 0..size {
            let offset = (start + step) % size;
            let ip = self.at(offset);
            if !self.is_usable(ip) || ip == self.dns || taken.contains(&ip) {
                continue;
            }
            self.cursor.store((offset + 1) % size, Ordering::Relaxed);
            return Ok(Some(Self::claim(ip, owner)));
        }
        Ok(None)
    }

    /// Plans releasing `ip` if the store says it belongs to the service with `uid` (an address
    /// that was re-assigned meanwhile is left alone).
    pub async fn plan_release(
        &self,
        store: &dyn Store,
        ip: Ipv4Addr,
        uid: &str,
    ) -> Result<Option<(Compare, Op)>, StoreError> {
        let key = Self::key(ip);
        let Some(kv) = store.get(&key).await? else {
            return Ok(None);
        };
        let (_, owner) = decode_allocation(&kv)?;
        if owner.uid != uid {
            return Ok(None);
        }
        Ok(Some((
            Compare::ModRevision { key: key.clone(), revision: kv.mod_revision },
            Op::Delete { key },
        )))
    }

    /// How many addresses dynamic allocation can hand out in total.
    pub fn capacity(&self) -> u32 {
        // Network, broadcast and the DNS address are never handed out dynamically.
        self.size() - 3
    }

    #[cfg(test)]
    fn set_cursor(&self, ip: Ipv4Addr) {
        let offset = u32::from(ip) - u32::from(self.cidr.network());
        self.cursor.store(offset, Ordering::Relaxed);
    }
}

fn decode_allocation(kv: &KeyValue) -> Result<(Ipv4Addr, ServiceIpOwner), StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        action: format!("reading the cluster IP allocation {}", kv.key),
        detail,
    };
    let name = kv.key.strip_prefix(SERVICE_IP_KEY_PREFIX).unwrap_or(&kv.key);
    let ip: Ipv4Addr =
        name.parse().map_err(|_| corrupt("the key does not name an IPv4 address".to_owned()))?;
    let owner: ServiceIpOwner =
        serde_json::from_slice(&kv.value).map_err(|e| corrupt(e.to_string()))?;
    Ok((ip, owner))
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, net::Ipv4Addr, sync::Arc};

    use super::{RequestedIpError, ServiceIpAllocator, ServiceIpOwner};
    use crate::{
        store::{SharedStore, TxnOutcome},
        testing::TempDataDir,
    };

    fn owner(name: &str) -> ServiceIpOwner {
        ServiceIpOwner { service: format!("default/{name}"), uid: format!("uid-{name}") }
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    async fn claim_next(
        allocator: &ServiceIpAllocator,
        store: &SharedStore,
        name: &str,
    ) -> Option<Ipv4Addr> {
        loop {
            let claim = allocator.plan_next(store.as_ref(), &owner(name)).await.unwrap()?;
            match store.txn(vec![claim.compare], vec![claim.op]).await.unwrap() {
                TxnOutcome::Committed { .. } => return Some(claim.ip),
                TxnOutcome::CompareFailed { .. } => continue,
            }
        }
    }

    #[test]
    fn the_range_and_dns_address_are_checked() {
        assert!(ServiceIpAllocator::new("10.96.0.0/31".parse().unwrap(), ip("10.96.0.1")).is_err());
        assert!(ServiceIpAllocator::new("10.0.0.0/8".parse().unwrap(), ip("10.0.0.10")).is_err());
        assert!(
            ServiceIpAllocator::new("10.96.0.0/16".parse().unwrap(), ip("10.97.0.10")).is_err()
        );
        assert!(ServiceIpAllocator::new("10.96.0.0/16".parse().unwrap(), ip("10.96.0.0")).is_err());
        let allocator =
            ServiceIpAllocator::new("10.96.0.0/16".parse().unwrap(), ip("10.96.0.10")).unwrap();
        assert!(allocator.is_usable(ip("10.96.0.1")));
        assert!(!allocator.is_usable(ip("10.96.255.255")), "broadcast");
        assert!(!allocator.is_usable(ip("10.96.0.0")), "network");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_fill_the_range_without_duplicates_or_reserved_addresses() {
        let dir = TempDataDir::new("serviceip-concurrent");
        let store = dir.open_store();
        // A /28: 16 addresses, 13 of them dynamic (network, broadcast and DNS excluded).
        let allocator = Arc::new(
            ServiceIpAllocator::new("10.96.0.0/28".parse().unwrap(), ip("10.96.0.10")).unwrap(),
        );
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (allocator, store) = (Arc::clone(&allocator), Arc::clone(&store));
            tasks.push(tokio::spawn(async move {
                claim_next(&allocator, &store, &format!("svc-{i}")).await
            }));
        }
        let mut granted = Vec::new();
        for task in tasks {
            granted.extend(task.await.unwrap());
        }
        assert_eq!(granted.len() as u32, allocator.capacity());
        let unique: HashSet<Ipv4Addr> = granted.iter().copied().collect();
        assert_eq!(unique.len(), granted.len(), "no address is handed out twice: {granted:?}");
        for reserved in ["10.96.0.0", "10.96.0.15", "10.96.0.10"] {
            assert!(!unique.contains(&ip(reserved)), "{reserved} must never be handed out");
        }
        assert_eq!(claim_next(&allocator, &store, "late").await, None, "the range is full");
    }

    #[tokio::test]
    async fn a_released_address_is_not_handed_out_again_at_once() {
        let dir = TempDataDir::new("serviceip-cursor");
        let store = dir.open_store();
        let allocator =
            ServiceIpAllocator::new("10.96.0.0/24".parse().unwrap(), ip("10.96.0.10")).unwrap();
        allocator.set_cursor(ip("10.96.0.20"));
        let first = claim_next(&allocator, &store, "a").await.unwrap();
        assert_eq!(first, ip("10.96.0.20"));
        let (compare, op) =
            allocator.plan_release(store.as_ref(), first, "uid-a").await.unwrap().unwrap();
        store.txn(vec![compare], vec![op]).await.unwrap();
        let second = claim_next(&allocator, &store, "b").await.unwrap();
        assert_eq!(second, ip("10.96.0.21"), "the cursor moved on past the released address");
        assert_eq!(
            allocator.plan_release(store.as_ref(), second, "uid-a").await.unwrap(),
            None,
            "only the owner releases an address"
        );
    }

    #[tokio::test]
    async fn requested_addresses_must_be_free_and_in_range() {
        let dir = TempDataDir::new("serviceip-requested");
        let store = dir.open_store();
        let allocator =
            ServiceIpAllocator::new("10.96.0.0/24".parse().unwrap(), ip("10.96.0.10")).unwrap();
        let claim = allocator.plan_requested(store.as_ref(), ip("10.96.0.10"), &owner("dns")).await;
        let claim = claim.unwrap().expect("the DNS address may be requested explicitly");
        store.txn(vec![claim.compare], vec![claim.op]).await.unwrap();
        let again = allocator.plan_requested(store.as_ref(), ip("10.96.0.10"), &owner("x")).await;
        assert_eq!(again.unwrap().unwrap_err(), RequestedIpError::AlreadyAllocated);
        for outside in ["10.97.0.1", "10.96.0.0", "10.96.0.255"] {
            let refused = allocator.plan_requested(store.as_ref(), ip(outside), &owner("x")).await;
            assert_eq!(refused.unwrap().unwrap_err(), RequestedIpError::NotInRange, "{outside}");
        }
    }
}
