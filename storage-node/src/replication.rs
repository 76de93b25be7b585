//! Replication to the redundancy factor.
//!
//! A node that receives a chunk from a client (any node of the chunk's replica set may; the
//! first is the primary) validates it, stores it durably, forwards it in parallel to the other
//! replicas of its partition, and acknowledges once R copies are durable — or at least the
//! write quorum W, with each missing copy recorded in a persisted repair queue. Below W nothing
//! is acknowledged. A background worker drains the repair queue with exponential back-off.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cairn_proto::chunk::chunk_store_client::ChunkStoreClient;
use cairn_proto::chunk::PutChunkRequest;
use cairn_proto::transport::NodeChannels;
use cairn_proto::types::Layout;
use cairn_proto::{ChunkId, ReplicaToken, MAX_BLOB_SIZE};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{watch, Notify};
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::chunkstore::{ChunkStore, PutItem, StoreError};
use crate::membership::Membership;

/// How long a forward to one replica may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);
/// Most repair entries tried per pass.
const REPAIR_BATCH: usize = 256;
/// Once every chunk of a write has W copies, how long the other replicas still get.
const QUORUM_GRACE: Duration = Duration::from_secs(2);
/// Upper bound of the repair back-off.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Replication errors (mapped to gRPC status in `service.rs`).
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// The request is malformed or fails verification; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// The chunk belongs to partitions this node does not serve.
    #[error("chunk {id} (partition {partition}) is not served by node {node} in layout version {version}")]
    WrongNode {
        /// Chunk.
        id: ChunkId,
        /// Its partition.
        partition: u32,
        /// This node.
        node: u64,
        /// The layout version checked.
        version: u64,
    },
    /// Fewer than W copies are durable; the write is not acknowledged.
    #[error("chunk {id}: only {copies} of the {needed} required copies are durable")]
    BelowQuorum {
        /// Chunk.
        id: ChunkId,
        /// Durable copies.
        copies: u32,
        /// The write quorum.
        needed: u32,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The id, size and hash length of a received chunk, checked.
fn parse(id: &[u8], blob: &Bytes, hash: &[u8]) -> Result<(ChunkId, [u8; 32]), ReplError> {
    let id = ChunkId::from_slice(id).map_err(|e| ReplError::Invalid(e.to_string()))?;
    if blob.len() > MAX_BLOB_SIZE {
        return Err(ReplError::Invalid(format!(
            "chunk {id}: blob of {} bytes exceeds the maximum of {MAX_BLOB_SIZE}",
            blob.len()
        )));
    }
    let hash: [u8; 32] = hash
        .try_into()
        .map_err(|_| ReplError::Invalid(format!("chunk {id}: blob hash must be 32 bytes")))?;
    Ok((id, hash))
}

/// Validates a received chunk without storing anything.
pub fn validate(id: &[u8], blob: &Bytes, hash: &[u8]) -> Result<PutItem, ReplError> {
    let (id, hash) = parse(id, blob, hash)?;
    if cairn_proto::blob_hash(blob) != hash {
        return Err(ReplError::Invalid(format!(
            "chunk {id}: blob does not match its blake3 hash"
        )));
    }
    Ok(PutItem {
        id,
        hash,
        blob: blob.clone(),
    })
}

/// Validates a chunk forwarded by a node that showed the cluster's token: the blob must match
/// the CRC-32 it came with; its hash, verified by that node, is taken as sent.
pub fn validate_forwarded(
    id: &[u8],
    blob: &Bytes,
    hash: &[u8],
    crc32: u32,
) -> Result<PutItem, ReplError> {
    let (id, hash) = parse(id, blob, hash)?;
    if crc32fast::hash(blob) != crc32 {
        return Err(ReplError::Invalid(format!(
            "chunk {id}: forwarded blob does not match its CRC-32"
        )));
    }
    Ok(PutItem {
        id,
        hash,
        blob: blob.clone(),
    })
}

/// One acknowledged chunk.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// Chunk.
    pub id: ChunkId,
    /// Durable copies.
    pub copies: u32,
    /// Whether this node held it already.
    pub existed: bool,
}

/// Forwards chunks to replicas and repairs missing copies.
pub struct Replicator {
    me: Arc<Membership>,
    store: ChunkStore,
    repair: fjall::PartitionHandle,
    wake: Notify,
    channels: NodeChannels,
    repairs_done: std::sync::atomic::AtomicU64,
    /// Shown to replicas on forwarded puts (see [`cairn_proto::ReplicaToken`]).
    token: Option<ReplicaToken>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn repair_key(id: &ChunkId, node: u64) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(&id.0);
    k[32..].copy_from_slice(&node.to_be_bytes());
    k
}

impl Replicator {
    /// Creates the replicator over `store`, with its repair queue in the same database.
    pub fn new(
        me: Arc<Membership>,
        store: ChunkStore,
        token: Option<ReplicaToken>,
    ) -> Result<Arc<Self>, StoreError> {
        let repair = store.open_tree("repair")?;
        Ok(Arc::new(Self {
            me,
            store,
            repair,
            wake: Notify::new(),
            channels: NodeChannels::default(),
            repairs_done: Default::default(),
            token,
        }))
    }

    /// Copies owed to other replicas.
    pub fn under_replicated(&self) -> u64 {
        self.repair.len().unwrap_or(0) as u64
    }

    /// Repairs completed since start.
    pub fn repairs_done(&self) -> u64 {
        self.repairs_done.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A client for the storage node at `addr` (channels are cached).
    pub fn client(&self, addr: &str) -> Result<ChunkStoreClient<Channel>, tonic::Status> {
        self.channels.client(addr)
    }

    async fn check_served(&self, items: &[PutItem], sender_layout: u64) -> Result<(), ReplError> {
        if sender_layout > self.me.layout().version {
            if let Err(e) = self.me.refresh_layout().await {
                warn!(error = %e, "layout refresh failed");
            }
        }
        for it in items {
            let p = it.id.partition();
            if !self.me.serves_fresh(p).await {
                return Err(ReplError::WrongNode {
                    id: it.id,
                    partition: p,
                    node: self.me.id(),
                    version: self.me.layout().version,
                });
            }
        }
        Ok(())
    }

    /// Stores chunks forwarded by another replica (no further forwarding).
    pub async fn put_replica(
        &self,
        items: Vec<PutItem>,
        sender_layout: u64,
    ) -> Result<Vec<Ack>, ReplError> {
        self.check_served(&items, sender_layout).await?;
        let existed = self.store.put(items.clone()).await?;
        Ok(items
            .iter()
            .zip(existed)
            .map(|(i, e)| Ack {
                id: i.id,
                copies: 1,
                existed: e,
            })
            .collect())
    }

    /// Stores chunks from a client and replicates them; acknowledges each at R, or at W with
    /// the missing copies queued for repair. The local write and the forwarding to replicas run
    /// at once, so a group waits for the slower of the local `fsync` and the replicas', not for
    /// their sum; nothing is acknowledged before the local copy is durable.
    pub async fn put_primary(
        &self,
        items: Vec<PutItem>,
        sender_layout: u64,
    ) -> Result<Vec<Ack>, ReplError> {
        self.check_served(&items, sender_layout).await?;
        let layout = self.me.layout();
        let (existed, (copies, missing)) = tokio::join!(
            self.store.put(items.clone()),
            self.replicate(&layout, &items)
        );
        let existed = existed?;
        if !missing.is_empty() {
            self.enqueue(&missing).await?;
        }
        let needed = layout.write_quorum.max(1);
        let mut acks = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            if copies[i] < needed {
                return Err(ReplError::BelowQuorum {
                    id: it.id,
                    copies: copies[i],
                    needed,
                });
            }
            acks.push(Ack {
                id: it.id,
                copies: copies[i],
                existed: existed[i],
            });
        }
        Ok(acks)
    }

    /// Forwards `items` to their partitions' other replicas. Returns each item's copies, counting
    /// the local one, and the copies to queue for repair.
    async fn replicate(
        &self,
        layout: &Layout,
        items: &[PutItem],
    ) -> (Vec<u32>, Vec<(ChunkId, u64)>) {
        let me = self.me.id();
        // Which peers need which items.
        let mut per_peer: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, it) in items.iter().enumerate() {
            for &n in layout.replicas(it.id.partition()) {
                if n != me {
                    per_peer.entry(n).or_default().push(i);
                }
            }
        }
        // Each blob's CRC-32 once, for every replica it goes to.
        let crcs: Vec<Option<u32>> = items
            .iter()
            .map(|it| self.token.is_some().then(|| crc32fast::hash(&it.blob)))
            .collect();
        let sends = per_peer.iter().map(|(&node, idxs)| {
            let addr = layout.address(node).map(str::to_string);
            let batch: Vec<PutChunkRequest> = idxs
                .iter()
                .map(|&i| PutChunkRequest {
                    id: Bytes::copy_from_slice(&items[i].id.0),
                    blob: items[i].blob.clone(),
                    hash: Bytes::copy_from_slice(&items[i].hash),
                    replica: true,
                    layout_version: layout.version,
                    crc32: crcs[i],
                })
                .collect();
            async move {
                let res = match addr {
                    Some(a) => self.forward(&a, batch).await,
                    None => Err(tonic::Status::not_found("no address for node")),
                };
                (node, res)
            }
        });
        // Wait for every replica, but once each chunk has W durable copies give the others only
        // a short grace: a stalled replica must not stall the write. Unanswered copies go to the
        // repair queue.
        let needed = layout.write_quorum.max(1);
        let mut pending: FuturesUnordered<_> = sends.collect();
        let mut copies = vec![1u32; items.len()];
        let mut missing: Vec<(ChunkId, u64)> = Vec::new();
        let mut answered = HashSet::new();
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let next = match grace {
                None => pending.next().await,
                Some(deadline) => match tokio::time::timeout_at(deadline, pending.next()).await {
                    Ok(n) => n,
                    Err(_) => break,
                },
            };
            let Some((node, res)) = next else { break };
            answered.insert(node);
            let idxs = &per_peer[&node];
            match res {
                Ok(acked) => {
                    for &i in idxs {
                        if acked.contains(&items[i].id) {
                            copies[i] += 1;
                        } else {
                            missing.push((items[i].id, node));
                        }
                    }
                }
                Err(e) => {
                    debug!(node, error = %e, "forward to replica failed");
                    missing.extend(idxs.iter().map(|&i| (items[i].id, node)));
                }
            }
            if grace.is_none() && copies.iter().all(|c| *c >= needed) {
                grace = Some(tokio::time::Instant::now() + QUORUM_GRACE);
            }
        }
        drop(pending);
        for (node, idxs) in &per_peer {
            if !answered.contains(node) {
                debug!(node, "replica too slow; its copies are queued for repair");
                missing.extend(idxs.iter().map(|&i| (items[i].id, *node)));
            }
        }
        (copies, missing)
    }

    /// Sends chunks to a replica; returns the ids it acknowledged. With the cluster's token,
    /// each blob goes with its CRC-32 (computed here unless the caller did; see
    /// [`cairn_proto::ReplicaToken`]).
    pub async fn forward(
        &self,
        addr: &str,
        mut batch: Vec<PutChunkRequest>,
    ) -> Result<HashSet<ChunkId>, tonic::Status> {
        let channel = self.channels.channel(addr)?;
        if self.token.is_some() {
            for r in batch.iter_mut().filter(|r| r.crc32.is_none()) {
                r.crc32 = Some(crc32fast::hash(&r.blob));
            }
        }
        let fut = async {
            let mut stream =
                cairn_proto::upload::put_chunks(channel, batch, self.token.as_ref()).await?;
            let mut acked = HashSet::new();
            while let Some(r) = stream.message().await? {
                if let Ok(id) = ChunkId::from_slice(&r.id) {
                    acked.insert(id);
                }
            }
            Ok(acked)
        };
        tokio::time::timeout(FORWARD_TIMEOUT, fut)
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("forward timed out"))?
    }

    async fn enqueue(&self, missing: &[(ChunkId, u64)]) -> Result<(), StoreError> {
        let mut batch = self.store.batch();
        let due = now_ms() + 1000;
        for (id, node) in missing {
            let mut v = [0u8; 12];
            v[8..].copy_from_slice(&0u32.to_be_bytes());
            v[..8].copy_from_slice(&due.to_be_bytes());
            batch.insert(&self.repair, repair_key(id, *node), v);
        }
        batch.commit()?;
        self.store.flush().await?;
        info!(count = missing.len(), "copies queued for repair");
        self.wake.notify_one();
        Ok(())
    }

    /// One pass over the repair queue: sends due copies; backs off failures.
    pub async fn repair_pass(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let layout = self.me.layout();
        let mut due: BTreeMap<u64, Vec<(ChunkId, u32)>> = BTreeMap::new();
        let mut drop_keys = Vec::new();
        for kv in self.repair.iter().take(REPAIR_BATCH * 4) {
            let (k, v) = kv.map_err(StoreError::Index)?;
            let (Ok(id), Ok(node_b), Ok(at_b), Ok(tries_b)) = (
                ChunkId::from_slice(&k[..32]),
                <[u8; 8]>::try_from(&k[32..]),
                <[u8; 8]>::try_from(&v[..8]),
                <[u8; 4]>::try_from(&v[8..12]),
            ) else {
                drop_keys.push(k);
                continue;
            };
            let node = u64::from_be_bytes(node_b);
            if !layout.replicas(id.partition()).contains(&node) {
                drop_keys.push(k); // no longer that node's partition
                continue;
            }
            if u64::from_be_bytes(at_b) <= now
                && due.values().map(Vec::len).sum::<usize>() < REPAIR_BATCH
            {
                due.entry(node)
                    .or_default()
                    .push((id, u32::from_be_bytes(tries_b)));
            }
        }
        for k in drop_keys {
            self.repair.remove(k).map_err(StoreError::Index)?;
        }
        let mut done = 0;
        for (node, list) in due {
            let Some(addr) = layout.address(node).map(str::to_string) else {
                continue;
            };
            let mut batch = Vec::new();
            for (id, _) in &list {
                match self.store.get(*id).await {
                    Ok((blob, hash)) => batch.push(PutChunkRequest {
                        id: Bytes::copy_from_slice(&id.0),
                        blob,
                        hash: Bytes::copy_from_slice(&hash),
                        replica: true,
                        layout_version: layout.version,
                        crc32: None,
                    }),
                    Err(e) => {
                        warn!(chunk = %id, error = %e, "cannot repair: local copy unreadable");
                        self.repair
                            .remove(repair_key(id, node))
                            .map_err(StoreError::Index)?;
                    }
                }
            }
            let acked = self.forward(&addr, batch).await.unwrap_or_default();
            for (id, tries) in list {
                let key = repair_key(&id, node);
                if acked.contains(&id) {
                    self.repair.remove(key).map_err(StoreError::Index)?;
                    done += 1;
                } else if self.repair.contains_key(key).map_err(StoreError::Index)? {
                    let backoff = (Duration::from_secs(1) * 2u32.saturating_pow(tries.min(10)))
                        .min(MAX_BACKOFF);
                    let mut v = [0u8; 12];
                    v[..8].copy_from_slice(&(now + backoff.as_millis() as u64).to_be_bytes());
                    v[8..].copy_from_slice(&(tries + 1).to_be_bytes());
                    self.repair.insert(key, v).map_err(StoreError::Index)?;
                }
            }
        }
        if done > 0 {
            self.repairs_done
                .fetch_add(done as u64, std::sync::atomic::Ordering::Relaxed);
            info!(
                repaired = done,
                left = self.under_replicated(),
                "repair pass"
            );
        }
        self.store.flush().await?;
        Ok(done)
    }

    /// Drains the repair queue until shutdown.
    pub async fn run_repairs(
        self: Arc<Self>,
        period: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            if self.repair.is_empty().unwrap_or(false) {
                continue;
            }
            if let Err(e) = self.repair_pass().await {
                warn!(error = %e, "repair pass failed");
            }
        }
    }
}
