//! gRPC handlers of the storage node: decode, call the replicator or the store, encode. The
//! only place where storage errors become gRPC statuses ([`to_status`]). [`ChunkRouter`] is
//! what the server runs: put streams go to [`ChunkService::put_stream`] through
//! `cairn_proto::receive`, every other call to the generated server.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use cairn_proto::chunk::chunk_store_server::{ChunkStore as ChunkStoreRpc, ChunkStoreServer};
use cairn_proto::chunk::*;
use cairn_proto::{ChunkId, ReplicaToken, REPLICA_TOKEN_HEADER};
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::BoxBody;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use crate::chunkstore::{ChunkStore, StoreError};
use crate::healing::Healer;
use crate::membership::Membership;
use crate::replication::{validate, validate_forwarded, ReplError, Replicator};

/// Most ids one has/get request may name.
pub const MAX_IDS: usize = 10_000;
/// Most chunks handled as one group of a put stream (one write group, one `fsync`): a client's
/// batch of small files sends a primary a few hundred.
const PUT_GROUP: usize = 256;
/// Most bytes handled as one group of a put stream.
const PUT_GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Most chunks of a get stream read by one blocking task (a client restoring small files asks
/// a node for about a hundred at a time).
const READ_BATCH_CHUNKS: usize = 256;
/// A get stream's blocking read stops after this many bytes.
const READ_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Maps errors to statuses.
pub fn to_status(e: ReplError) -> Status {
    match e {
        ReplError::Invalid(m) => Status::invalid_argument(m),
        e @ ReplError::WrongNode { .. } => Status::failed_precondition(e.to_string()),
        e @ ReplError::BelowQuorum { .. } => Status::unavailable(e.to_string()),
        ReplError::Store(StoreError::NotFound(id)) => {
            Status::not_found(format!("chunk {id} not found"))
        }
        ReplError::Store(e @ StoreError::Corrupt(_)) => Status::data_loss(e.to_string()),
        ReplError::Store(StoreError::Closed) => Status::unavailable("node is shutting down"),
        ReplError::Store(e) => Status::internal(e.to_string()),
    }
}

/// The `ChunkStore` service.
pub struct ChunkService {
    store: ChunkStore,
    repl: Arc<Replicator>,
    me: Arc<Membership>,
    healer: Arc<Healer>,
}

impl ChunkService {
    /// Serves `store` through `repl`; `healer` learns of corrupt or missing copies.
    pub fn new(
        store: ChunkStore,
        repl: Arc<Replicator>,
        me: Arc<Membership>,
        healer: Arc<Healer>,
    ) -> Self {
        Self {
            store,
            repl,
            me,
            healer,
        }
    }

    /// Handles one put stream: its messages in groups (one write group, one `fsync` each),
    /// validated, stored and replicated; the replies come through the returned channel, which
    /// closes after the last (or after the first error). On a `trusted` stream (it showed the
    /// cluster's replica token) a forwarded blob with a CRC-32 is checked by it, not hashed.
    pub fn put_stream<S>(
        &self,
        mut inbound: S,
        trusted: bool,
    ) -> mpsc::Receiver<Result<PutChunkReply, Status>>
    where
        S: Stream<Item = Result<PutChunkRequest, Status>> + Send + Unpin + 'static,
    {
        let repl = self.repl.clone();
        let (tx, rx) = mpsc::channel(PUT_GROUP);
        let open = self.store.put_stream();
        // Ends when the client closes its stream, on the first error, or when the connection drops.
        tokio::spawn(async move {
            let _open = open;
            loop {
                let first = match inbound.next().await {
                    Some(Ok(m)) => m,
                    None => return,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let mut group = vec![first];
                let mut bytes = group[0].blob.len();
                while group.len() < PUT_GROUP && bytes < PUT_GROUP_BYTES {
                    match inbound.next().now_or_never() {
                        Some(Some(Ok(m))) => {
                            bytes += m.blob.len();
                            group.push(m);
                        }
                        _ => break,
                    }
                }
                let replica = group[0].replica;
                let sender_layout = group.iter().map(|m| m.layout_version).max().unwrap_or(0);
                let result = async {
                    if group.iter().any(|m| m.replica != replica) {
                        return Err(ReplError::Invalid(
                            "a stream mixes replica and client puts".into(),
                        ));
                    }
                    // Validate the whole group before storing anything.
                    let items = group
                        .iter()
                        .map(|m| match m.crc32 {
                            Some(crc) if trusted && m.replica => {
                                validate_forwarded(&m.id, &m.blob, &m.hash, crc)
                            }
                            _ => validate(&m.id, &m.blob, &m.hash),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    if replica {
                        repl.put_replica(items, sender_layout).await
                    } else {
                        repl.put_primary(items, sender_layout).await
                    }
                }
                .await;
                match result {
                    Ok(acks) => {
                        for a in acks {
                            let reply = PutChunkReply {
                                id: Bytes::copy_from_slice(&a.id.0),
                                copies: a.copies,
                                existed: a.existed,
                            };
                            if tx.send(Ok(reply)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e))).await;
                        return;
                    }
                }
            }
        });
        rx
    }
}

fn ids(raw: &[Bytes]) -> Result<Vec<ChunkId>, Status> {
    if raw.len() > MAX_IDS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_IDS} ids per request"
        )));
    }
    raw.iter()
        .map(|b| ChunkId::from_slice(b).map_err(|e| Status::invalid_argument(e.to_string())))
        .collect()
}

/// One chunk of a get stream: its blob and hash, or why this node cannot give it.
fn get_reply(id: ChunkId, got: Result<(Bytes, [u8; 32]), StoreError>) -> GetChunkReply {
    match got {
        Ok((blob, hash)) => GetChunkReply {
            id: Bytes::copy_from_slice(&id.0),
            blob,
            hash: Bytes::copy_from_slice(&hash),
            error: String::new(),
        },
        Err(e) => GetChunkReply {
            id: Bytes::copy_from_slice(&id.0),
            error: e.to_string(),
            ..Default::default()
        },
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ChunkStoreRpc for ChunkService {
    type PutChunksStream = BoxStream<PutChunkReply>;
    type GetChunksStream = BoxStream<GetChunkReply>;

    async fn put_chunks(
        &self,
        req: Request<Streaming<PutChunkRequest>>,
    ) -> Result<Response<Self::PutChunksStream>, Status> {
        // Only the router's streams are trusted: it checks the token.
        let rx = self.put_stream(req.into_inner(), false);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_chunks(
        &self,
        req: Request<GetChunksRequest>,
    ) -> Result<Response<Self::GetChunksStream>, Status> {
        let ids = ids(&req.into_inner().ids)?;
        let store = self.store.clone();
        let healer = self.healer.clone();
        // Each blocking read's replies are queued together, so the encoder finds them ready at
        // once and sends small blobs in shared frames rather than a write each. One batch
        // queued: a slow reader pins it, the one being sent and the one being read.
        let (tx, rx) = mpsc::channel::<Vec<Result<GetChunkReply, Status>>>(1);
        tokio::spawn(async move {
            let mut rest = &ids[..];
            while !rest.is_empty() {
                let batch = &rest[..rest.len().min(READ_BATCH_CHUNKS)];
                let replies = match store.get_batch(batch, READ_BATCH_BYTES).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(vec![Err(to_status(e.into()))]).await;
                        return;
                    }
                };
                rest = &rest[replies.len()..];
                let replies = replies
                    .into_iter()
                    .map(|(id, got)| {
                        if let Err(StoreError::Corrupt(id)) = &got {
                            healer.report(&[*id], true);
                        }
                        Ok(get_reply(id, got))
                    })
                    .collect();
                if tx.send(replies).await.is_err() {
                    return;
                }
            }
        });
        let replies = ReceiverStream::new(rx).flat_map(futures::stream::iter);
        Ok(Response::new(Box::pin(replies)))
    }

    async fn has_chunks(
        &self,
        req: Request<HasChunksRequest>,
    ) -> Result<Response<HasChunksReply>, Status> {
        let ids = ids(&req.into_inner().ids)?;
        let present = self.store.has(&ids).map_err(|e| to_status(e.into()))?;
        Ok(Response::new(HasChunksReply { present }))
    }

    async fn node_stats(
        &self,
        _: Request<NodeStatsRequest>,
    ) -> Result<Response<NodeStatsReply>, Status> {
        let s = self.store.stats();
        Ok(Response::new(NodeStatsReply {
            node_id: self.me.id(),
            chunks: s.chunks,
            bytes_stored: s.bytes,
            segments: s.segments,
            under_replicated: self.repl.under_replicated(),
            corrupt_found: s.corrupt_found,
            layout_version: self.me.layout().version,
            repairs_done: self.repl.repairs_done(),
            healing: Some(self.healer.stats()),
        }))
    }

    async fn partition_digests(
        &self,
        req: Request<PartitionDigestsRequest>,
    ) -> Result<Response<PartitionDigestsReply>, Status> {
        let parts = req.into_inner().partitions;
        if parts.len() > cairn_proto::PARTITIONS as usize
            || parts.iter().any(|p| *p >= cairn_proto::PARTITIONS)
        {
            return Err(Status::invalid_argument("partition out of range"));
        }
        let mut reply = PartitionDigestsReply::default();
        for p in parts {
            let (d, n) = self
                .store
                .partition_digest(p)
                .map_err(|e| to_status(e.into()))?;
            reply.digests.push(Bytes::copy_from_slice(&d));
            reply.counts.push(n);
        }
        Ok(Response::new(reply))
    }

    async fn report_bad(
        &self,
        req: Request<ReportBadRequest>,
    ) -> Result<Response<ReportBadReply>, Status> {
        let ids = ids(&req.into_inner().ids)?;
        let present = self.store.has(&ids).map_err(|e| to_status(e.into()))?;
        let missing: Vec<ChunkId> = ids
            .into_iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|(i, _)| i)
            .collect();
        let queued = self.healer.report(&missing, false) as u32;
        Ok(Response::new(ReportBadReply { queued }))
    }

    async fn list_chunks(
        &self,
        req: Request<ListChunksRequest>,
    ) -> Result<Response<ListChunksReply>, Status> {
        let r = req.into_inner();
        let end = if r.partition_end == 0 {
            cairn_proto::PARTITIONS
        } else {
            r.partition_end
        };
        let ids = self
            .store
            .list(r.partition_start, end)
            .map_err(|e| to_status(e.into()))?;
        Ok(Response::new(ListChunksReply {
            ids: ids
                .into_iter()
                .map(|i| Bytes::copy_from_slice(&i.0))
                .collect(),
        }))
    }
}

/// The chunk service as the server runs it: `PutChunks` streams are read by
/// [`cairn_proto::receive`], which hands on blobs as slices of the frames they arrived in where
/// tonic's decoder copies every frame first; every other method goes to the generated server.
#[derive(Clone)]
pub struct ChunkRouter {
    svc: Arc<ChunkService>,
    generated: ChunkStoreServer<ChunkService>,
    token: Option<ReplicaToken>,
}

impl ChunkRouter {
    /// Routes calls to `svc`; put streams that show `token` are trusted.
    pub fn new(svc: ChunkService, token: Option<ReplicaToken>) -> Self {
        let svc = Arc::new(svc);
        Self {
            token,
            generated: ChunkStoreServer::from_arc(svc.clone())
                .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
                .max_encoding_message_size(cairn_proto::MAX_MESSAGE_SIZE),
            svc,
        }
    }
}

impl NamedService for ChunkRouter {
    const NAME: &'static str = <ChunkStoreServer<ChunkService> as NamedService>::NAME;
}

impl Service<http::Request<BoxBody>> for ChunkRouter {
    type Response = http::Response<BoxBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<BoxBody>) -> Self::Future {
        if req.uri().path() == cairn_proto::receive::PUT_CHUNKS_PATH {
            let trusted = match (&self.token, req.headers().get(REPLICA_TOKEN_HEADER)) {
                (Some(t), Some(v)) => t.matches(v.as_bytes()),
                _ => false,
            };
            let requests =
                cairn_proto::receive::put_requests(req.into_body(), cairn_proto::MAX_MESSAGE_SIZE);
            let replies = self.svc.put_stream(requests, trusted);
            return Box::pin(async move { Ok(cairn_proto::receive::reply_body(replies)) });
        }
        Box::pin(self.generated.call(req))
    }
}
