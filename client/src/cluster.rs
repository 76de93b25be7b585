//! The client's view of the cluster: the coordinator (leader found automatically), the cached
//! placement layout, and one channel per storage node.
//!
//! Writes go to a chunk's primary and fall over to the next replica of its partition when the
//! primary is unreachable, with one call per node for all of a batch's chunks bound there;
//! reads try the replicas in order and fall back on any error or failed verification,
//! recording the bad copy.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_proto::chunk::chunk_store_client::ChunkStoreClient;
use cairn_proto::chunk::{
    GetChunkReply, GetChunksRequest, HasChunksRequest, PutChunkRequest, ReportBadRequest,
};
use cairn_proto::coord_client::CoordClient;
use cairn_proto::metadata::GetLayoutRequest;
use cairn_proto::transport::NodeChannels;
use cairn_proto::types::Layout;
use cairn_proto::ChunkId;
use tonic::transport::Channel;
use tonic::Code;
use tracing::{debug, warn};

use crate::crypto::Keys;
use crate::error::{Error, Result};

/// A copy of a chunk that failed verification or could not be read.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadCopy {
    /// Chunk id (hex).
    pub chunk: String,
    /// Node id.
    pub node: u64,
    /// What went wrong.
    pub error: String,
}

/// A sealed chunk, ready to upload: its id, its blob, and the blob's BLAKE3 hash, which every
/// put carries (computed where the chunk is sealed, while the blob is still in the cache).
#[derive(Debug, Clone)]
pub struct Blob {
    /// The chunk id.
    pub id: ChunkId,
    /// `encrypt(compress(plaintext))`.
    pub data: Bytes,
    /// `blake3(data)`.
    pub hash: [u8; 32],
}

impl Blob {
    /// Hashes `data`.
    pub fn new(id: ChunkId, data: Bytes) -> Self {
        let hash = cairn_proto::blob_hash(&data);
        Self { id, data, hash }
    }
}

/// Connection to a cluster.
pub struct Cluster {
    /// The coordinator client.
    pub coord: Arc<CoordClient>,
    layout: RwLock<Arc<Layout>>,
    channels: NodeChannels,
    bad: Mutex<Vec<BadCopy>>,
    /// Nodes that recently failed or timed out, and when: tried last for a while.
    suspect: Mutex<HashMap<u64, Instant>>,
}

/// How long a failed node is tried last.
const SUSPECT_FOR: Duration = Duration::from_secs(15);
/// Per-call limits: a healthy node answers far sooner; a stalled one must not stall the client.
const HAS_TIMEOUT: Duration = Duration::from_secs(5);
const PUT_TIMEOUT: Duration = Duration::from_secs(30);
const GET_TIMEOUT: Duration = Duration::from_secs(20);

/// Largest plaintext chunk accepted on read.
pub const MAX_CHUNK: usize = 16 * 1024 * 1024;

impl Cluster {
    /// Connects to the coordinators and fetches the layout.
    pub async fn connect(coordinators: Vec<String>) -> Result<Arc<Self>> {
        let coord = Arc::new(CoordClient::new(coordinators)?);
        let c = Arc::new(Self {
            coord,
            layout: RwLock::new(Arc::new(Layout::default())),
            channels: NodeChannels::default(),
            bad: Mutex::new(Vec::new()),
            suspect: Mutex::new(HashMap::new()),
        });
        c.refresh_layout().await?;
        Ok(c)
    }

    /// Fetches the current layout.
    pub async fn refresh_layout(&self) -> Result<Arc<Layout>> {
        let l = self
            .coord
            .call(
                |mut c| async move { c.get_layout(GetLayoutRequest { allow_stale: false }).await },
            )
            .await?;
        let l = Arc::new(l);
        *self.layout.write().expect("layout lock") = l.clone();
        Ok(l)
    }

    /// The cached layout.
    pub fn layout(&self) -> Arc<Layout> {
        self.layout.read().expect("layout lock").clone()
    }

    /// Copies found bad so far.
    pub fn bad_copies(&self) -> Vec<BadCopy> {
        self.bad.lock().expect("bad lock").clone()
    }

    fn mark_suspect(&self, node: u64) {
        self.suspect
            .lock()
            .expect("suspect lock")
            .insert(node, Instant::now());
    }

    fn clear_suspect(&self, node: u64) {
        self.suspect.lock().expect("suspect lock").remove(&node);
    }

    /// `nodes` in order, with recently failed ones moved to the end.
    fn healthy_first(&self, nodes: &[u64]) -> Vec<u64> {
        let s = self.suspect.lock().expect("suspect lock");
        let bad = |n: &u64| s.get(n).is_some_and(|t| t.elapsed() < SUSPECT_FOR);
        let mut v: Vec<u64> = nodes.iter().copied().filter(|n| !bad(n)).collect();
        v.extend(nodes.iter().copied().filter(|n| bad(n)));
        v
    }

    /// A client for the storage node at `addr`.
    pub fn node(&self, addr: &str) -> Result<ChunkStoreClient<Channel>> {
        Ok(self.channels.client(addr)?)
    }

    /// Makes one call per storage node for the items whose turn it is there, all nodes at
    /// once: each item goes to the first of its replicas (healthy first), so a batch costs one
    /// call per node, not one per replica set (with three nodes at R=3, six orders of the same
    /// three nodes). The items of a call that fails, or that was answered for the wrong number
    /// of items, go on to their next replicas, grouped again, and that node becomes suspect and
    /// is not asked again in this round of calls. Returns one outcome per item, in order: its
    /// answer, or the last error met on the way (`None` if no replica had an address).
    async fn per_node<R, F, Fut>(
        &self,
        layout: &Layout,
        ids: &[ChunkId],
        call: F,
    ) -> Vec<std::result::Result<R, Option<tonic::Status>>>
    where
        F: Fn(String, Vec<usize>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Vec<R>, tonic::Status>>,
    {
        let order: Vec<Vec<u64>> = ids
            .iter()
            .map(|id| self.healthy_first(layout.replicas(id.partition())))
            .collect();
        let mut next = vec![0usize; ids.len()];
        let mut last: Vec<Option<tonic::Status>> = vec![None; ids.len()];
        let mut out: Vec<Option<std::result::Result<R, Option<tonic::Status>>>> =
            (0..ids.len()).map(|_| None).collect();
        let mut undecided: Vec<usize> = (0..ids.len()).collect();
        let mut failed: Vec<u64> = Vec::new();
        while !undecided.is_empty() {
            let mut groups: BTreeMap<u64, (&str, Vec<usize>)> = BTreeMap::new();
            for i in undecided.drain(..) {
                let addressed = order[i][next[i]..]
                    .iter()
                    .position(|&n| layout.address(n).is_some() && !failed.contains(&n));
                match addressed {
                    Some(k) => {
                        next[i] += k;
                        let n = order[i][next[i]];
                        let addr = layout.address(n).expect("checked above");
                        groups.entry(n).or_insert((addr, Vec::new())).1.push(i);
                    }
                    None => out[i] = Some(Err(last[i].take())),
                }
            }
            let calls = groups.into_iter().map(|(n, (addr, idxs))| {
                let want = idxs.len();
                let res = call(addr.to_string(), idxs.clone());
                async move {
                    let res = match res.await {
                        Ok(v) if v.len() == want => Ok(v),
                        Ok(v) => Err(tonic::Status::unavailable(format!(
                            "node answered for {} of {want} chunks",
                            v.len()
                        ))),
                        Err(e) => Err(e),
                    };
                    (n, idxs, res)
                }
            });
            for (n, idxs, res) in futures::future::join_all(calls).await {
                match res {
                    Ok(answers) => {
                        self.clear_suspect(n);
                        for (i, a) in idxs.into_iter().zip(answers) {
                            out[i] = Some(Ok(a));
                        }
                    }
                    Err(e) => {
                        debug!(node = n, error = %e, "call failed; trying the next replicas");
                        self.mark_suspect(n);
                        failed.push(n);
                        for i in idxs {
                            last[i] = Some(e.clone());
                            next[i] += 1;
                            undecided.push(i);
                        }
                    }
                }
            }
        }
        out.into_iter()
            .map(|o| o.expect("every item decided"))
            .collect()
    }

    /// Which ids the cluster already holds (asked of each chunk's primary, falling over to the
    /// next replica). An id whose replicas cannot be asked counts as absent.
    pub async fn has(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let layout = self.layout();
        let outcomes = self
            .per_node(&layout, ids, |addr, idxs| {
                let req = HasChunksRequest {
                    ids: idxs
                        .iter()
                        .map(|&i| Bytes::copy_from_slice(&ids[i].0))
                        .collect(),
                };
                let client = self.node(&addr);
                async move {
                    let mut c = client.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                    match tokio::time::timeout(HAS_TIMEOUT, c.has_chunks(req)).await {
                        Ok(r) => Ok(r?.into_inner().present),
                        Err(_) => Err(tonic::Status::deadline_exceeded("has-chunks timed out")),
                    }
                }
            })
            .await;
        Ok(outcomes.into_iter().map(|o| o.unwrap_or(false)).collect())
    }

    /// Uploads sealed blobs; returns once every one is acknowledged at the write quorum.
    pub async fn put(&self, blobs: Vec<Blob>) -> Result<()> {
        let mut pending = blobs;
        for attempt in 0..3 {
            let layout = if attempt == 0 {
                self.layout()
            } else {
                self.refresh_layout().await?
            };
            let ids: Vec<ChunkId> = pending.iter().map(|b| b.id).collect();
            let outcomes = self
                .per_node(&layout, &ids, |addr, idxs| {
                    let items: Vec<&Blob> = idxs.iter().map(|&i| &pending[i]).collect();
                    let call = self.put_to(addr, items, layout.version);
                    async move {
                        match tokio::time::timeout(PUT_TIMEOUT, call).await {
                            Ok(r) => r,
                            Err(_) => Err(tonic::Status::deadline_exceeded("put timed out")),
                        }
                    }
                })
                .await;
            let mut error = None;
            let mut failed = Vec::new();
            for (blob, outcome) in pending.drain(..).zip(outcomes) {
                if let Err(e) = outcome {
                    failed.push(blob);
                    error = error.or(e);
                }
            }
            pending = failed;
            if pending.is_empty() {
                return Ok(());
            }
            if attempt == 2 {
                return Err(match error {
                    Some(s) => Error::Rpc(s),
                    None => Error::Rpc(tonic::Status::unavailable(
                        "no storage node serves these chunks",
                    )),
                });
            }
        }
        unreachable!("loop returns")
    }

    /// One put stream to the node at `addr`: one acknowledgement per item.
    async fn put_to(
        &self,
        addr: String,
        items: Vec<&Blob>,
        layout_version: u64,
    ) -> std::result::Result<Vec<()>, tonic::Status> {
        let channel = self.channels.channel(&addr)?;
        let reqs: Vec<PutChunkRequest> = items
            .iter()
            .map(|b| PutChunkRequest {
                id: Bytes::copy_from_slice(&b.id.0),
                hash: Bytes::copy_from_slice(&b.hash),
                blob: b.data.clone(),
                replica: false,
                layout_version,
                crc32: None,
            })
            .collect();
        let mut stream = cairn_proto::upload::put_chunks(channel, reqs, None).await?;
        let mut acks = Vec::with_capacity(items.len());
        while let Some(_r) = stream.message().await? {
            acks.push(());
        }
        Ok(acks)
    }

    /// Where a chunk may be, in the order to try: its replicas, then the replicas of the
    /// previous layout version (data still moving), then every other node.
    fn read_order(&self, layout: &Layout, id: &ChunkId) -> Vec<(u64, String, bool)> {
        let p = id.partition();
        let mut order: Vec<(u64, String, bool)> = Vec::new();
        let mut push = |n: u64, owner: bool| {
            if !order.iter().any(|(m, _, _)| *m == n) {
                if let Some(a) = layout.address(n) {
                    order.push((n, a.to_string(), owner));
                }
            }
        };
        for n in layout.replicas(p) {
            push(*n, true);
        }
        if let Some(prev) = layout.previous.get(p as usize) {
            for n in &prev.nodes {
                push(*n, false);
            }
        }
        let mut rest: Vec<u64> = layout.addresses.keys().copied().collect();
        rest.sort_unstable();
        for n in rest {
            push(n, false);
        }
        order
    }

    /// Fetches, verifies and opens one chunk, falling back across replicas. A replica that
    /// should hold the chunk but returned nothing usable is told, so that it fetches a good copy.
    pub async fn get(&self, keys: &Keys, id: ChunkId) -> Result<Vec<u8>> {
        let mut detail = Vec::new();
        let mut to_report: Vec<String> = Vec::new();
        for attempt in 0..2 {
            let layout = if attempt == 0 {
                self.layout()
            } else {
                self.refresh_layout().await?
            };
            let order = self.read_order(&layout, &id);
            let ids: Vec<u64> = order.iter().map(|(n, _, _)| *n).collect();
            let ranked = self.healthy_first(&ids);
            let mut order = order;
            order.sort_by_key(|(n, _, _)| ranked.iter().position(|m| m == n));
            for (node, addr, owner) in order {
                let got =
                    match tokio::time::timeout(GET_TIMEOUT, self.get_from(&addr, keys, id)).await {
                        Ok(r) => r,
                        Err(_) => Err(Error::Rpc(tonic::Status::deadline_exceeded(
                            "read timed out",
                        ))),
                    };
                if matches!(&got, Err(Error::Rpc(s)) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled))
                {
                    self.mark_suspect(node);
                }
                match got {
                    Ok(p) => {
                        for a in to_report {
                            self.report_bad(&a, id).await;
                        }
                        return Ok(p);
                    }
                    Err(e) => {
                        if self.note_failure(id, node, &e) && owner && !to_report.contains(&addr) {
                            to_report.push(addr.clone());
                        }
                        detail.push(format!("node {node}: {e}"));
                    }
                }
            }
        }
        Err(Error::ChunkUnavailable {
            id,
            detail: detail.join("; "),
        })
    }

    /// Fetches, verifies and opens many chunks: one streamed request to each node asked (the
    /// first healthy replica of each chunk), all at once, then [`Cluster::get`] (with its
    /// replica fallback) for any that did not verify.
    pub async fn get_many(&self, keys: &Keys, ids: &[ChunkId]) -> Vec<Result<Vec<u8>>> {
        let layout = self.layout();
        let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, id) in ids.iter().enumerate() {
            if let Some(&first) = self.healthy_first(layout.replicas(id.partition())).first() {
                groups.entry(first).or_default().push(i);
            }
        }
        let fetches = groups.into_iter().map(|(node, idxs)| {
            let layout = &layout;
            async move {
                let mut got: Vec<(usize, Vec<u8>)> = Vec::new();
                let Some(addr) = layout.address(node) else {
                    return got;
                };
                let Ok(mut c) = self.node(addr) else {
                    return got;
                };
                let req = GetChunksRequest {
                    ids: idxs
                        .iter()
                        .map(|&i| Bytes::copy_from_slice(&ids[i].0))
                        .collect(),
                };
                let Ok(Ok(resp)) = tokio::time::timeout(GET_TIMEOUT, c.get_chunks(req)).await
                else {
                    self.mark_suspect(node);
                    return got;
                };
                let mut stream = resp.into_inner();
                for &i in &idxs {
                    let Ok(Ok(Some(r))) = tokio::time::timeout(GET_TIMEOUT, stream.message()).await
                    else {
                        return got;
                    };
                    match open_reply(keys, ids[i], r) {
                        Ok(p) => got.push((i, p)),
                        // The node is a replica of the chunk: it is told, and the chunk is
                        // read again below from the next replica.
                        Err(e) => {
                            if self.note_failure(ids[i], node, &e) {
                                self.report_bad(addr, ids[i]).await;
                            }
                        }
                    }
                }
                // To the end of the stream, as in `get_from`.
                let _ = tokio::time::timeout(GET_TIMEOUT, stream.message()).await;
                got
            }
        });
        let mut out: Vec<Option<Result<Vec<u8>>>> = (0..ids.len()).map(|_| None).collect();
        for (i, p) in futures::future::join_all(fetches)
            .await
            .into_iter()
            .flatten()
        {
            out[i] = Some(Ok(p));
        }
        let mut res = Vec::with_capacity(ids.len());
        for (i, o) in out.into_iter().enumerate() {
            res.push(match o {
                Some(r) => r,
                None => self.get(keys, ids[i]).await,
            });
        }
        res
    }

    /// Records a failed read of `id` from `node`: a bad copy (integrity) is kept for the
    /// summary, once. Returns whether the node lacks a good copy (so it should be told).
    fn note_failure(&self, id: ChunkId, node: u64, e: &Error) -> bool {
        let integrity = matches!(e, Error::Integrity(_))
            || matches!(e, Error::Rpc(s) if s.code() == Code::DataLoss);
        let missing = matches!(e, Error::Rpc(s) if s.code() == Code::NotFound);
        if integrity {
            warn!(chunk = %id, node, error = %e, "bad copy; trying another replica");
            let chunk = id.to_hex();
            let mut bad = self.bad.lock().expect("bad lock");
            if !bad.iter().any(|b| b.chunk == chunk && b.node == node) {
                bad.push(BadCopy {
                    chunk,
                    node,
                    error: e.to_string(),
                });
            }
        }
        integrity || missing
    }

    async fn report_bad(&self, addr: &str, id: ChunkId) {
        let Ok(mut c) = self.node(addr) else { return };
        let req = ReportBadRequest {
            ids: vec![Bytes::copy_from_slice(&id.0)],
        };
        // Best effort: the node's own anti-entropy finds the gap anyway.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), c.report_bad(req)).await;
    }

    async fn get_from(&self, addr: &str, keys: &Keys, id: ChunkId) -> Result<Vec<u8>> {
        let mut c = self.node(addr)?;
        let mut s = c
            .get_chunks(GetChunksRequest {
                ids: vec![Bytes::copy_from_slice(&id.0)],
            })
            .await?
            .into_inner();
        let r = s
            .message()
            .await?
            .ok_or_else(|| Error::Rpc(tonic::Status::unavailable("empty reply")))?;
        // Read to the end of the stream: one dropped before its end is reset, and HTTP/2 closes
        // a connection after 1024 such resets.
        let _ = s.message().await;
        open_reply(keys, id, r)
    }

    /// Number of replicas holding each id (asks every replica of each partition).
    pub async fn copies(&self, ids: &[ChunkId]) -> Result<Vec<u32>> {
        let layout = self.layout();
        let mut per_node: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, id) in ids.iter().enumerate() {
            for n in layout.replicas(id.partition()) {
                per_node.entry(*n).or_default().push(i);
            }
        }
        let mut out = vec![0u32; ids.len()];
        for (n, idxs) in per_node {
            let Some(addr) = layout.address(n) else {
                continue;
            };
            for part in idxs.chunks(crate::MAX_IDS_PER_CALL) {
                let req: Vec<Bytes> = part
                    .iter()
                    .map(|&i| Bytes::copy_from_slice(&ids[i].0))
                    .collect();
                let Ok(mut c) = self.node(addr) else { continue };
                if let Ok(r) = c.has_chunks(HasChunksRequest { ids: req }).await {
                    for (&i, p) in part.iter().zip(r.into_inner().present) {
                        out[i] += u32::from(p);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Checks a node's reply for chunk `id` (its id and error) and opens it. The blob's BLAKE3 is
/// not recomputed here: nodes check it on every read, and [`Keys::open`] authenticates every
/// byte a node could alter (the AES-GCM tag covers the nonce and the ciphertext, and the keyed
/// chunk id covers the plaintext), so a third hash over the blob found nothing the others miss.
fn open_reply(keys: &Keys, id: ChunkId, r: GetChunkReply) -> Result<Vec<u8>> {
    if r.id.as_ref() != id.0 {
        return Err(Error::Integrity(format!(
            "chunk {id}: reply for another chunk"
        )));
    }
    if !r.error.is_empty() {
        let code = if r.error.contains("corrupt") {
            Code::DataLoss
        } else {
            Code::NotFound
        };
        return Err(Error::Rpc(tonic::Status::new(code, r.error)));
    }
    keys.open(&id, &r.blob, MAX_CHUNK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::types::PartitionReplicas;

    /// Three nodes; partition p's replicas are the six orders of them, in turn.
    fn layout() -> Layout {
        let orders = [
            [1, 2, 3],
            [1, 3, 2],
            [2, 1, 3],
            [2, 3, 1],
            [3, 1, 2],
            [3, 2, 1],
        ];
        Layout {
            version: 1,
            replicas: 3,
            write_quorum: 2,
            partitions: (0..cairn_proto::PARTITIONS as usize)
                .map(|p| PartitionReplicas {
                    nodes: orders[p % 6].to_vec(),
                })
                .collect(),
            addresses: (1..=3).map(|n| (n, format!("node-{n}"))).collect(),
            previous: Vec::new(),
        }
    }

    fn cluster() -> Cluster {
        Cluster {
            coord: Arc::new(CoordClient::new(vec!["127.0.0.1:1".into()]).unwrap()),
            layout: RwLock::new(Arc::new(layout())),
            channels: NodeChannels::default(),
            bad: Mutex::new(Vec::new()),
            suspect: Mutex::new(HashMap::new()),
        }
    }

    /// An id in partition `p`.
    fn id_in(p: u32) -> ChunkId {
        let top = (p << (16 - cairn_proto::PARTITION_BITS)) as u16;
        let mut id = [0u8; 32];
        id[..2].copy_from_slice(&top.to_be_bytes());
        ChunkId(id)
    }

    #[tokio::test]
    async fn calls_are_made_per_node_and_a_failed_nodes_items_go_on_to_their_next_replicas() {
        let c = cluster();
        let layout = layout();
        let ids: Vec<ChunkId> = (0..60).map(id_in).collect();
        let calls = Mutex::new(Vec::<(String, Vec<usize>)>::new());
        let out = c
            .per_node(&layout, &ids, |addr, idxs| {
                calls.lock().unwrap().push((addr.clone(), idxs.clone()));
                async move {
                    if addr == "node-1" {
                        Err(tonic::Status::unavailable("down"))
                    } else {
                        Ok(idxs.iter().map(|&i| (addr.clone(), i)).collect())
                    }
                }
            })
            .await;
        // Every item answered by the first of its replicas that is not node 1.
        for (i, o) in out.iter().enumerate() {
            let first_up = layout
                .replicas(ids[i].partition())
                .iter()
                .find(|&&n| n != 1)
                .unwrap();
            assert_eq!(o.as_ref().unwrap(), &(format!("node-{first_up}"), i));
        }
        let calls = calls.into_inner().unwrap();
        // One call per node in the first round (not one per replica set), then one per node
        // that takes over node 1's items.
        assert_eq!(calls.len(), 5, "{calls:?}");
        let first: Vec<&str> = calls[..3].iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(first, ["node-1", "node-2", "node-3"]);
        assert_eq!(calls[0].1.len(), 20);
        assert!(
            c.healthy_first(&[1, 2, 3]) == [2, 3, 1],
            "node 1 is suspect"
        );
    }

    #[tokio::test]
    async fn an_item_whose_replicas_all_fail_gets_the_last_error() {
        let c = cluster();
        let layout = layout();
        let ids = vec![id_in(0), id_in(1)];
        let out = c
            .per_node(&layout, &ids, |addr, idxs| async move {
                if addr == "node-3" {
                    Ok(vec![true; idxs.len()])
                } else {
                    Err(tonic::Status::unavailable(format!("{addr} down")))
                }
            })
            .await;
        // Partition 0 tries nodes 1, 2, then 3; partition 1 tries 1, then 3.
        assert!(out[0].as_ref().unwrap());
        assert!(out[1].as_ref().unwrap());
        let c = cluster();
        let out = c
            .per_node(&layout, &ids, |addr, _| async move {
                Err::<Vec<bool>, _>(tonic::Status::unavailable(format!("{addr} down")))
            })
            .await;
        for o in out {
            let e = o.unwrap_err().expect("an error");
            assert_eq!(e.code(), Code::Unavailable);
        }
    }

    #[tokio::test]
    async fn a_node_that_failed_is_not_asked_again_for_other_items() {
        let c = cluster();
        let layout = layout();
        // Replicas 1, 2, 3 and 2, 1, 3: with nodes 1 and 2 down, both go on to node 3 at once.
        let ids = vec![id_in(0), id_in(2)];
        let calls = Mutex::new(Vec::<String>::new());
        let out = c
            .per_node(&layout, &ids, |addr, idxs| {
                calls.lock().unwrap().push(addr.clone());
                async move {
                    if addr == "node-3" {
                        Ok(vec![(); idxs.len()])
                    } else {
                        Err(tonic::Status::unavailable(format!("{addr} down")))
                    }
                }
            })
            .await;
        assert!(out.iter().all(Result::is_ok));
        assert_eq!(calls.into_inner().unwrap(), ["node-1", "node-2", "node-3"]);
    }

    #[tokio::test]
    async fn an_answer_for_the_wrong_number_of_items_counts_as_a_failure() {
        let c = cluster();
        let layout = layout();
        let ids = vec![id_in(0)];
        let out = c
            .per_node(&layout, &ids, |addr, _| async move {
                if addr == "node-1" {
                    Ok(Vec::new())
                } else {
                    Ok(vec![addr])
                }
            })
            .await;
        assert_eq!(out[0].as_ref().unwrap(), "node-2");
    }
}
