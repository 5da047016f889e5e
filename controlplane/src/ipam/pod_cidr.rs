//! Per-node pod CIDRs: the cluster CIDR is cut into equal blocks, one per node.
//!
//! An allocation is a store key (`/registry/ipam/podcidrs/<block>` → the node's name) written
//! in the same transaction as the node that receives it, guarded by an "absent" compare. Two
//! concurrent node creates that pick the same block therefore cannot both commit: the loser's
//! transaction fails on that compare and it plans again. A block is released in the
//! transaction that deletes its node.

use std::collections::HashSet;

use bytes::Bytes;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::store::{Compare, KeyValue, Op, Store, StoreError};

/// Where allocations live in the store.
pub const POD_CIDR_KEY_PREFIX: &str = "/registry/ipam/podcidrs/";

/// The most blocks a cluster CIDR may be cut into: it bounds the scan for a free block.
const MAX_BLOCKS: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "a /{node_prefix} block per node does not fit the cluster CIDR {cluster_cidr} (the prefix must be between /{} and /{max})",
        cluster_cidr.prefix_len(),
        max = cluster_cidr.max_prefix_len()
    )]
    PrefixOutOfRange { cluster_cidr: IpNet, node_prefix: u8 },
    #[error(
        "cutting {cluster_cidr} into /{node_prefix} blocks gives more than {MAX_BLOCKS} blocks"
    )]
    TooManyBlocks { cluster_cidr: IpNet, node_prefix: u8 },
}

/// The stored value of an allocation.
#[derive(Debug, Serialize, Deserialize)]
struct AllocationRecord {
    node: String,
}

/// A planned allocation: apply `compare` and `op` in the transaction that writes the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrClaim {
    pub cidr: IpNet,
    pub compare: Compare,
    pub op: Op,
}

/// Hands out one block of the cluster CIDR per node, through the store.
#[derive(Clone, Debug)]
pub struct PodCidrAllocator {
    cluster_cidr: IpNet,
    node_prefix: u8,
}

impl PodCidrAllocator {
    pub fn new(cluster_cidr: IpNet, node_prefix: u8) -> Result<Self, IpamError> {
        let cluster_cidr = cluster_cidr.trunc();
        if node_prefix < cluster_cidr.prefix_len() || node_prefix > cluster_cidr.max_prefix_len() {
            return Err(IpamError::PrefixOutOfRange { cluster_cidr, node_prefix });
        }
        if u32::from(node_prefix - cluster_cidr.prefix_len()) > MAX_BLOCKS.trailing_zeros() {
            return Err(IpamError::TooManyBlocks { cluster_cidr, node_prefix });
        }
        Ok(Self { cluster_cidr, node_prefix })
    }

    pub fn cluster_cidr(&self) -> IpNet {
        self.cluster_cidr
    }

    pub fn node_prefix(&self) -> u8 {
        self.node_prefix
    }

    /// How many blocks the cluster CIDR holds.
    pub fn capacity(&self) -> u32 {
        1 << (self.node_prefix - self.cluster_cidr.prefix_len())
    }

    /// The store key of a block; `/` becomes `-` so that the key has no extra path level.
    pub fn key(cidr: &IpNet) -> String {
        format!("{POD_CIDR_KEY_PREFIX}{}-{}", cidr.addr(), cidr.prefix_len())
    }

    /// Why `cidr` cannot be a node's block here, if it cannot.
    pub fn check_block(&self, cidr: &IpNet) -> Result<(), String> {
        if cidr.prefix_len() != self.node_prefix {
            return Err(format!("node blocks are /{} in this cluster", self.node_prefix));
        }
        if cidr.trunc() != *cidr {
            return Err("the address has host bits set".to_owned());
        }
        if !self.cluster_cidr.contains(cidr) {
            return Err(format!("outside the cluster CIDR {}", self.cluster_cidr));
        }
        Ok(())
    }

    /// Every allocation in the store: block and node.
    pub async fn allocations(&self, store: &dyn Store) -> Result<Vec<(IpNet, String)>, StoreError> {
        let list = store.list(POD_CIDR_KEY_PREFIX).await?;
        list.items.iter().map(decode_allocation).collect()
    }

    /// Plans claiming the first free block for `node`; `None` when every block is taken.
    /// The claim only holds if its compare passes in the transaction that applies it.
    pub async fn plan(
        &self,
        store: &dyn Store,
        node: &str,
    ) -> Result<Option<CidrClaim>, StoreError> {
        let taken: HashSet<IpNet> =
            self.allocations(store).await?.into_iter().map(|(cidr, _)| cidr).collect();
        let Ok(blocks) = self.cluster_cidr.subnets(self.node_prefix) else {
            // `new` checked the prefix, so there is always a way to cut the range.
            return Ok(None);
        };
        for block in blocks {
            if !taken.contains(&block) {
                return Ok(Some(self.claim(block, node)));
            }
        }
        Ok(None)
    }

    /// The claim of a given block (already checked with [`Self::check_block`]).
    pub fn claim(&self, cidr: IpNet, node: &str) -> CidrClaim {
        let key = Self::key(&cidr);
        let record = AllocationRecord { node: node.to_owned() };
        // Serializing a struct of one string cannot fail.
        let value = serde_json::to_vec(&record).unwrap_or_default();
        CidrClaim {
            cidr,
            compare: Compare::Absent { key: key.clone() },
            op: Op::Put { key, value: Bytes::from(value) },
        }
    }

    /// Plans releasing `cidr` if the store says it belongs to `node` (a block that was
    /// re-assigned meanwhile is left alone).
    pub async fn plan_release(
        &self,
        store: &dyn Store,
        cidr: &IpNet,
        node: &str,
    ) -> Result<Option<(Compare, Op)>, StoreError> {
        let key = Self::key(cidr);
        let Some(kv) = store.get(&key).await? else {
            return Ok(None);
        };
        let (_, owner) = decode_allocation(&kv)?;
        if owner != node {
            return Ok(None);
        }
        Ok(Some((
            Compare::ModRevision { key: key.clone(), revision: kv.mod_revision },
            Op::Delete { key },
        )))
    }
}

fn decode_allocation(kv: &KeyValue) -> Result<(IpNet, String), StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        action: format!("reading the pod CIDR allocation {}", kv.key),
        detail,
    };
    let name = kv.key.strip_prefix(POD_CIDR_KEY_PREFIX).unwrap_or(&kv.key);
    let cidr: IpNet = name
        .rsplit_once('-')
        .map(|(addr, len)| format!("{addr}/{len}"))
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| corrupt("the key does not name a CIDR".to_owned()))?;
    let record: AllocationRecord =
        serde_json::from_slice(&kv.value).map_err(|e| corrupt(e.to_string()))?;
    Ok((cidr, record.node))
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::Arc};

    use ipnet::IpNet;

    use super::{POD_CIDR_KEY_PREFIX, PodCidrAllocator};
    use crate::{
        store::{SharedStore, TxnOutcome},
        testing::TempDataDir,
    };

    fn net(text: &str) -> IpNet {
        text.parse().expect("a valid CIDR")
    }

    /// Claims a block for `node` the way node creation does: plan, commit, plan again when
    /// another claim won the race.
    async fn claim(allocator: &PodCidrAllocator, store: &SharedStore, node: &str) -> Option<IpNet> {
        loop {
            let claim = allocator.plan(store.as_ref(), node).await.expect("planning works")?;
            match store.txn(vec![claim.compare], vec![claim.op]).await.expect("txn runs") {
                TxnOutcome::Committed { .. } => return Some(claim.cidr),
                TxnOutcome::CompareFailed { .. } => continue,
            }
        }
    }

    #[test]
    fn node_prefix_must_fit_the_cluster_cidr() {
        assert!(PodCidrAllocator::new(net("10.244.0.0/16"), 15).is_err());
        assert!(PodCidrAllocator::new(net("10.244.0.0/16"), 33).is_err());
        assert!(PodCidrAllocator::new(net("10.0.0.0/8"), 32).is_err(), "2^24 blocks is too many");
        let allocator = PodCidrAllocator::new(net("10.244.0.0/16"), 24).unwrap();
        assert_eq!(allocator.capacity(), 256);
        assert!(allocator.check_block(&net("10.244.7.0/24")).is_ok());
        assert!(allocator.check_block(&net("10.245.7.0/24")).is_err());
        assert!(allocator.check_block(&net("10.244.7.0/25")).is_err());
        assert!(allocator.check_block(&net("10.244.7.1/24")).is_err());
    }

    #[tokio::test]
    async fn concurrent_claims_never_share_a_block() {
        let dir = TempDataDir::new("ipam-concurrent");
        let store = dir.open_store();
        let allocator = Arc::new(PodCidrAllocator::new(net("10.244.0.0/20"), 24).unwrap());
        let mut tasks = Vec::new();
        for i in 0..24 {
            let (allocator, store) = (Arc::clone(&allocator), Arc::clone(&store));
            tasks.push(tokio::spawn(async move {
                claim(&allocator, &store, &format!("node-{i}")).await
            }));
        }
        let mut granted = Vec::new();
        for task in tasks {
            granted.push(task.await.unwrap());
        }
        let blocks: Vec<IpNet> = granted.iter().flatten().copied().collect();
        assert_eq!(blocks.len(), 16, "a /20 holds sixteen /24s and all of them are handed out");
        assert_eq!(granted.iter().filter(|g| g.is_none()).count(), 8);
        let unique: HashSet<IpNet> = blocks.iter().copied().collect();
        assert_eq!(unique.len(), blocks.len(), "no block is handed out twice: {blocks:?}");
        let stored = allocator.allocations(store.as_ref()).await.unwrap();
        assert_eq!(stored.len(), 16);
    }

    #[tokio::test]
    async fn allocations_survive_reopen() {
        let dir = TempDataDir::new("ipam-reopen");
        let allocator = PodCidrAllocator::new(net("10.244.0.0/16"), 24).unwrap();
        let first = {
            let store = dir.open_store();
            let a = claim(&allocator, &store, "a").await.unwrap();
            let b = claim(&allocator, &store, "b").await.unwrap();
            vec![a, b]
        };
        let store = dir.open_store();
        let stored = allocator.allocations(store.as_ref()).await.unwrap();
        assert_eq!(stored, vec![(first[0], "a".to_owned()), (first[1], "b".to_owned())]);
        let c = claim(&allocator, &store, "c").await.unwrap();
        assert!(!first.contains(&c), "a new claim after reopen avoids the stored ones");
    }

    #[tokio::test]
    async fn released_blocks_can_be_claimed_again_and_only_by_their_owner() {
        let dir = TempDataDir::new("ipam-release");
        let store = dir.open_store();
        let allocator = PodCidrAllocator::new(net("10.244.0.0/23"), 24).unwrap();
        let a = claim(&allocator, &store, "a").await.unwrap();
        let b = claim(&allocator, &store, "b").await.unwrap();
        assert_eq!(claim(&allocator, &store, "c").await, None, "two blocks, both taken");

        assert_eq!(
            allocator.plan_release(store.as_ref(), &a, "b").await.unwrap(),
            None,
            "a node cannot release another node's block"
        );
        let (compare, op) = allocator.plan_release(store.as_ref(), &a, "a").await.unwrap().unwrap();
        store.txn(vec![compare], vec![op]).await.unwrap();
        let c = claim(&allocator, &store, "c").await;
        assert_eq!(c, Some(a), "the released block is free again");
        assert_ne!(c, Some(b));
        let keys = store.list(POD_CIDR_KEY_PREFIX).await.unwrap().items.len();
        assert_eq!(keys, 2);
    }
}
