//! Self-healing of this node's data, in three background tasks:
//!
//! - **Anti-entropy / rebalance / drain** ([`Healer::resync_pass`]): for each partition this
//!   node holds chunks of, compare a digest of its ids with each replica the layout names; where
//!   they differ, push the chunks the replica lacks. A partition this node no longer owns (the
//!   layout moved it, the node is draining, or a node came back after being replaced) is
//!   offloaded: each chunk is deleted here only once *every* replica the layout names holds it,
//!   so no chunk ever has fewer copies than R on the nodes that are meant to hold it. One
//!   mechanism therefore re-replicates after a node is Out, fills a joining node, empties a
//!   draining one, and repairs divergence that queues missed.
//! - **Scrub** ([`Healer::scrub_pass`]): re-reads and verifies every blob on a schedule; the store
//!   quarantines a copy that fails, and the copy is fetched again from a replica.
//! - **Pulls**: chunks found corrupt here (scrub or read) or reported missing by a client are
//!   fetched again from the other replicas.
//!
//! All passes are throttled (they sleep as long as they worked) and stop on shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_proto::chunk::{
    GetChunksRequest, HasChunksRequest, HealingStats, PartitionDigestsRequest, PutChunkRequest,
};
use cairn_proto::{ChunkId, PARTITIONS};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::chunkstore::{digest, ChunkStore, PutItem, StoreError};
use crate::membership::Membership;
use crate::replication::Replicator;

/// Partitions handled per step of a pass.
const SLICE: u32 = 64;
/// Most ids per has-chunks call.
const HAS_BATCH: usize = 4096;
/// Bytes per push batch.
const PUSH_BYTES: usize = 16 * 1024 * 1024;
/// Depth of the pull queue (a full queue drops; anti-entropy catches what was dropped).
const PULL_QUEUE: usize = 1024;

/// Schedules of the healing tasks.
#[derive(Debug, Clone, Copy)]
pub struct HealConfig {
    /// Anti-entropy period (a pass also starts when the layout changes).
    pub resync: Duration,
    /// Pause between scrub passes.
    pub scrub: Duration,
}

#[derive(Default)]
struct Counters {
    out_of_sync: AtomicU64,
    pushed: AtomicU64,
    offloaded: AtomicU64,
    resync_passes: AtomicU64,
    scrub_checked: AtomicU64,
    scrub_total: AtomicU64,
    scrub_passes: AtomicU64,
    corrupt_found: AtomicU64,
    repaired: AtomicU64,
}

/// The healing tasks of one node.
pub struct Healer {
    me: Arc<Membership>,
    store: ChunkStore,
    repl: Arc<Replicator>,
    pulls: mpsc::Sender<ChunkId>,
    pull_rx: tokio::sync::Mutex<Option<mpsc::Receiver<ChunkId>>>,
    c: Counters,
    cfg: HealConfig,
}

/// Errors of a pass (logged; the next pass retries).
#[derive(Debug, thiserror::Error)]
pub enum HealError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A peer failed.
    #[error("peer: {0}")]
    Peer(#[from] tonic::Status),
}

async fn throttle(started: Instant) {
    tokio::time::sleep(started.elapsed().min(Duration::from_secs(1))).await;
}

impl Healer {
    /// Creates the healer.
    pub fn new(
        me: Arc<Membership>,
        store: ChunkStore,
        repl: Arc<Replicator>,
        cfg: HealConfig,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(PULL_QUEUE);
        Arc::new(Self {
            me,
            store,
            repl,
            pulls: tx,
            pull_rx: tokio::sync::Mutex::new(Some(rx)),
            c: Counters::default(),
            cfg,
        })
    }

    /// Current counters.
    pub fn stats(&self) -> HealingStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HealingStats {
            partitions_out_of_sync: l(&self.c.out_of_sync),
            chunks_pushed: l(&self.c.pushed),
            chunks_offloaded: l(&self.c.offloaded),
            resync_passes: l(&self.c.resync_passes),
            scrub_checked: l(&self.c.scrub_checked),
            scrub_total: l(&self.c.scrub_total),
            scrub_passes: l(&self.c.scrub_passes),
            corrupt_found: l(&self.c.corrupt_found),
            repaired: l(&self.c.repaired),
        }
    }

    /// Usage for heartbeats: the store's counters, the repair queue and these counters.
    pub fn usage(&self) -> crate::membership::Usage {
        let s = self.store.stats();
        crate::membership::Usage {
            used: s.bytes,
            chunks: s.chunks,
            under_replicated: self.repl.under_replicated(),
            healing: Some(self.stats()),
        }
    }

    /// Queues chunks to fetch again from a replica (missing or corrupt here).
    pub fn report(&self, ids: &[ChunkId], corrupt: bool) -> usize {
        let mut queued = 0;
        for id in ids {
            if corrupt {
                self.c.corrupt_found.fetch_add(1, Ordering::Relaxed);
            }
            if self.pulls.try_send(*id).is_ok() {
                queued += 1;
            }
        }
        queued
    }

    async fn has(&self, addr: &str, ids: &[ChunkId]) -> Result<Vec<bool>, HealError> {
        let mut out = Vec::with_capacity(ids.len());
        let mut client = self.repl.client(addr)?;
        for part in ids.chunks(HAS_BATCH) {
            let req = HasChunksRequest {
                ids: part.iter().map(|i| Bytes::copy_from_slice(&i.0)).collect(),
            };
            let present = client.has_chunks(req).await?.into_inner().present;
            if present.len() != part.len() {
                return Err(tonic::Status::internal("has-chunks answered the wrong count").into());
            }
            out.extend(present);
        }
        Ok(out)
    }

    /// Sends `peer` the chunks of `ids` it lacks; returns how many it still lacks afterwards.
    async fn push_missing(
        &self,
        addr: &str,
        ids: &[ChunkId],
        layout_version: u64,
    ) -> Result<usize, HealError> {
        let present = self.has(addr, ids).await?;
        let missing: Vec<ChunkId> = ids
            .iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|(i, _)| *i)
            .collect();
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut sent = 0usize;
        for (k, id) in missing.iter().enumerate() {
            match self.store.get(*id).await {
                Ok((blob, hash)) => {
                    bytes += blob.len();
                    batch.push(PutChunkRequest {
                        id: Bytes::copy_from_slice(&id.0),
                        blob,
                        hash: Bytes::copy_from_slice(&hash),
                        replica: true,
                        layout_version,
                        crc32: None,
                    });
                }
                Err(StoreError::Corrupt(id)) => {
                    self.report(&[id], true);
                }
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            if bytes >= PUSH_BYTES || (k + 1 == missing.len() && !batch.is_empty()) {
                let started = Instant::now();
                let n = batch.len();
                let acked = self.repl.forward(addr, std::mem::take(&mut batch)).await?;
                sent += acked.len();
                if acked.len() < n {
                    warn!(
                        peer = addr,
                        sent = acked.len(),
                        of = n,
                        "peer refused some pushed chunks"
                    );
                }
                bytes = 0;
                throttle(started).await;
            }
        }
        if sent > 0 {
            self.c.pushed.fetch_add(sent as u64, Ordering::Relaxed);
            debug!(peer = addr, sent, "pushed missing chunks");
        }
        Ok(missing.len() - sent)
    }

    /// One anti-entropy pass over every partition this node holds data of.
    pub async fn resync_pass(&self) -> Result<(), HealError> {
        let layout = self.me.layout();
        if layout.partitions.is_empty() {
            return Ok(());
        }
        let me = self.me.id();
        let r = layout.replicas as usize;
        let mut out_of_sync = 0u64;
        // Peers that failed once in this pass are skipped for the rest of it.
        let mut dead: std::collections::HashSet<u64> = Default::default();
        debug!(version = layout.version, "anti-entropy pass");
        let mut start = 0;
        while start < PARTITIONS {
            let end = (start + SLICE).min(PARTITIONS);
            let mut local: BTreeMap<u32, Vec<ChunkId>> = BTreeMap::new();
            for id in self.store.list(start, end)? {
                local.entry(id.partition()).or_default().push(id);
            }
            start = end;
            // Which replicas to compare with, per peer.
            let mut per_peer: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
            for p in local.keys() {
                for &n in layout.replicas(*p) {
                    if n != me {
                        per_peer.entry(n).or_default().push(*p);
                    }
                }
            }
            for (peer, parts) in per_peer {
                let addr = match layout.address(peer) {
                    Some(a) if !dead.contains(&peer) => a.to_string(),
                    _ => {
                        out_of_sync += parts.len() as u64;
                        continue;
                    }
                };
                let digests = self
                    .repl
                    .client(&addr)
                    .map_err(HealError::Peer)?
                    .partition_digests(PartitionDigestsRequest {
                        partitions: parts.clone(),
                    })
                    .await;
                let digests = match digests {
                    Ok(d) => d.into_inner().digests,
                    Err(e) => {
                        debug!(peer, error = %e, "digest request failed");
                        dead.insert(peer);
                        out_of_sync += parts.len() as u64;
                        continue;
                    }
                };
                for (p, d) in parts.iter().zip(digests) {
                    let mine = &local[p];
                    if d.as_ref() == digest(mine) {
                        continue;
                    }
                    match self.push_missing(&addr, mine, layout.version).await {
                        Ok(0) => {}
                        Ok(_) => out_of_sync += 1,
                        Err(e) => {
                            debug!(peer, partition = p, error = %e, "push failed");
                            out_of_sync += 1;
                        }
                    }
                }
            }
            // Offload partitions this node is no longer a replica of.
            for (p, ids) in &local {
                let desired = layout.replicas(*p);
                if desired.contains(&me) {
                    continue;
                }
                if desired.len() < r {
                    continue; // too few nodes to hold R copies elsewhere: keep ours
                }
                let mut everywhere = vec![true; ids.len()];
                let mut ok = true;
                for n in desired {
                    let present = match layout.address(*n) {
                        Some(a) if !dead.contains(n) => self.has(a, ids).await,
                        _ => Err(tonic::Status::unavailable("no address").into()),
                    };
                    match present {
                        Ok(v) => everywhere.iter_mut().zip(v).for_each(|(e, p)| *e &= p),
                        Err(_) => {
                            dead.insert(*n);
                            ok = false;
                            break;
                        }
                    }
                }
                if !ok {
                    out_of_sync += 1;
                    continue;
                }
                let deletable: Vec<ChunkId> = ids
                    .iter()
                    .zip(&everywhere)
                    .filter(|(_, e)| **e)
                    .map(|(i, _)| *i)
                    .collect();
                if deletable.len() < ids.len() {
                    out_of_sync += 1;
                }
                if !deletable.is_empty() {
                    let n = self.store.delete(deletable).await?;
                    self.c.offloaded.fetch_add(n, Ordering::Relaxed);
                    info!(
                        partition = p,
                        chunks = n,
                        "offloaded a partition this node no longer holds"
                    );
                }
            }
        }
        self.c.out_of_sync.store(out_of_sync, Ordering::Relaxed);
        self.c.resync_passes.fetch_add(1, Ordering::Relaxed);
        debug!(out_of_sync, "anti-entropy pass done");
        Ok(())
    }

    /// One scrub pass: verifies every blob; corrupt copies are quarantined and pulled again.
    pub async fn scrub_pass(&self, shutdown: &watch::Receiver<bool>) -> Result<(), HealError> {
        self.c.scrub_checked.store(0, Ordering::Relaxed);
        self.c
            .scrub_total
            .store(self.store.stats().chunks, Ordering::Relaxed);
        let mut start = 0;
        while start < PARTITIONS {
            let end = (start + SLICE).min(PARTITIONS);
            let ids = self.store.list(start, end)?;
            start = end;
            let started = Instant::now();
            for id in ids {
                if *shutdown.borrow() {
                    return Ok(());
                }
                match self.store.get(id).await {
                    Ok(_) | Err(StoreError::NotFound(_)) => {}
                    Err(StoreError::Corrupt(id)) => {
                        warn!(chunk = %id, "scrub found a corrupt copy");
                        self.report(&[id], true);
                    }
                    Err(e) => return Err(e.into()),
                }
                self.c.scrub_checked.fetch_add(1, Ordering::Relaxed);
            }
            throttle(started).await;
        }
        self.c.scrub_passes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Fetches one chunk from another replica and stores it here.
    async fn pull(&self, id: ChunkId) -> bool {
        let layout = self.me.layout();
        let p = id.partition();
        if !layout.replicas(p).contains(&self.me.id()) {
            return false; // not ours to hold
        }
        let prev = layout
            .previous
            .get(p as usize)
            .map(|r| r.nodes.clone())
            .unwrap_or_default();
        for n in layout.replicas(p).iter().chain(&prev) {
            if *n == self.me.id() {
                continue;
            }
            let Some(addr) = layout.address(*n) else {
                continue;
            };
            let Ok(mut c) = self.repl.client(addr) else {
                continue;
            };
            let Ok(resp) = c
                .get_chunks(GetChunksRequest {
                    ids: vec![Bytes::copy_from_slice(&id.0)],
                })
                .await
            else {
                continue;
            };
            let mut stream = resp.into_inner();
            let Ok(Some(r)) = stream.message().await else {
                continue;
            };
            // To the end: a stream dropped early is reset, and HTTP/2 closes a connection
            // after 1024 such resets.
            let _ = stream.message().await;
            if !r.error.is_empty() || cairn_proto::blob_hash(&r.blob) != r.hash.as_ref() {
                continue;
            }
            let item = PutItem {
                id,
                hash: cairn_proto::blob_hash(&r.blob),
                blob: r.blob,
            };
            if self.store.put(vec![item]).await.is_ok() {
                self.c.repaired.fetch_add(1, Ordering::Relaxed);
                info!(chunk = %id, from = n, "copy restored from a replica");
                return true;
            }
        }
        false
    }

    /// Runs anti-entropy until shutdown.
    pub async fn run_resync(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last = Instant::now();
        let mut seen_version = self.me.layout().version;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.changed() => return,
            }
            let v = self.me.layout().version;
            if last.elapsed() < self.cfg.resync && v == seen_version {
                continue;
            }
            seen_version = v;
            last = Instant::now();
            if let Err(e) = self.resync_pass().await {
                warn!(error = %e, "anti-entropy pass failed");
            }
        }
    }

    /// Runs scrub passes until shutdown.
    pub async fn run_scrub(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.scrub) => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.scrub_pass(&shutdown).await {
                warn!(error = %e, "scrub pass failed");
            }
        }
    }

    /// Serves the pull queue until shutdown.
    pub async fn run_pulls(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(mut rx) = self.pull_rx.lock().await.take() else {
            return;
        };
        loop {
            let id = tokio::select! {
                id = rx.recv() => match id { Some(id) => id, None => return },
                _ = shutdown.changed() => return,
            };
            if !self.pull(id).await {
                debug!(chunk = %id, "no replica could supply the chunk now; anti-entropy will retry");
            }
        }
    }
}

impl crate::membership::UsageSource for Healer {
    fn usage(&self) -> crate::membership::Usage {
        Healer::usage(self)
    }
}
