//! `upload::put_chunks` against a real tonic server of the generated `ChunkStore` service, over
//! TCP on 127.0.0.1: what the server decodes is what was sent, replies come back in order, and
//! a refusal (mid-stream or before any reply) reaches the caller as its status.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cairn_proto::chunk::chunk_store_server::{ChunkStore, ChunkStoreServer};
use cairn_proto::chunk::*;
use cairn_proto::transport::NodeChannels;
use cairn_proto::upload::put_chunks;
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status, Streaming};

/// Id byte that makes the server refuse a message.
const REFUSE: u8 = 0xEE;

#[derive(Default)]
struct Recorder {
    got: Arc<Mutex<Vec<PutChunkRequest>>>,
    tokens: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    refuse_calls: bool,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ChunkStore for Recorder {
    type PutChunksStream = BoxStream<PutChunkReply>;
    type GetChunksStream = BoxStream<GetChunkReply>;

    async fn put_chunks(
        &self,
        req: Request<Streaming<PutChunkRequest>>,
    ) -> Result<Response<Self::PutChunksStream>, Status> {
        if self.refuse_calls {
            return Err(Status::unavailable("node is shutting down"));
        }
        self.tokens.lock().unwrap().push(
            req.metadata()
                .get(cairn_proto::REPLICA_TOKEN_HEADER)
                .map(|v| v.as_bytes().to_vec()),
        );
        let got = self.got.clone();
        let replies = req.into_inner().map(move |m| {
            let m = m?;
            if m.id.first() == Some(&REFUSE) {
                return Err(Status::invalid_argument("blob does not match its hash"));
            }
            let reply = PutChunkReply {
                id: m.id.clone(),
                copies: m.blob.len() as u32,
                existed: m.replica,
            };
            got.lock().unwrap().push(m);
            Ok(reply)
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn get_chunks(
        &self,
        _: Request<GetChunksRequest>,
    ) -> Result<Response<Self::GetChunksStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn has_chunks(
        &self,
        _: Request<HasChunksRequest>,
    ) -> Result<Response<HasChunksReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn node_stats(
        &self,
        _: Request<NodeStatsRequest>,
    ) -> Result<Response<NodeStatsReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn list_chunks(
        &self,
        _: Request<ListChunksRequest>,
    ) -> Result<Response<ListChunksReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn partition_digests(
        &self,
        _: Request<PartitionDigestsRequest>,
    ) -> Result<Response<PartitionDigestsReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn report_bad(
        &self,
        _: Request<ReportBadRequest>,
    ) -> Result<Response<ReportBadReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves `svc` on a free port of 127.0.0.1 until the test ends; returns its address.
async fn serve(svc: Recorder) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let svc = ChunkStoreServer::new(svc)
        .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(cairn_proto::MAX_MESSAGE_SIZE);
    tokio::spawn(
        cairn_proto::transport::server()
            .add_service(svc)
            .serve_with_incoming(cairn_proto::transport::incoming(listener)),
    );
    addr
}

fn req(i: usize, blob_len: usize) -> PutChunkRequest {
    let mut id = vec![1u8; 32];
    id[24..].copy_from_slice(&(i as u64).to_be_bytes());
    PutChunkRequest {
        id: Bytes::from(id),
        blob: Bytes::from(
            (0..blob_len)
                .map(|k| (k * 13 + i) as u8)
                .collect::<Vec<_>>(),
        ),
        hash: Bytes::from(vec![!(i as u8); 32]),
        replica: i % 3 == 1,
        layout_version: 7 + i as u64,
        crc32: (i % 4 == 1).then_some(i as u32),
    }
}

#[tokio::test]
async fn the_server_decodes_what_was_sent_and_replies_in_order() {
    let svc = Recorder::default();
    let got = svc.got.clone();
    let tokens = svc.tokens.clone();
    let addr = serve(svc).await;
    let channels = NodeChannels::default();
    let token = cairn_proto::ReplicaToken::from_secret("the cluster's secret");
    // Empty, small, gathered, frame-sized and larger-than-a-frame blobs, and many of them.
    let mut sizes = vec![0, 1, 4096, 32 * 1024, 256 * 1024, 256 * 1024 + 1, 5 << 20];
    sizes.extend((0..300).map(|k| 100 + k * 37));
    let reqs: Vec<_> = sizes.iter().enumerate().map(|(i, &n)| req(i, n)).collect();
    let mut replies = put_chunks(channels.channel(&addr).unwrap(), reqs.clone(), Some(&token))
        .await
        .expect("call accepted");
    let mut n = 0;
    while let Some(r) = replies.message().await.expect("reply") {
        assert_eq!(r.id, reqs[n].id);
        assert_eq!(r.copies as usize, reqs[n].blob.len());
        assert_eq!(r.existed, reqs[n].replica);
        n += 1;
    }
    assert_eq!(n, reqs.len());
    assert_eq!(*got.lock().unwrap(), reqs);
    let sent = tokens.lock().unwrap()[0]
        .clone()
        .expect("the token was sent");
    assert!(token.matches(&sent));
    assert!(!cairn_proto::ReplicaToken::from_secret("another secret").matches(&sent));
}

#[tokio::test]
async fn a_refusal_mid_stream_or_before_any_reply_is_the_callers_error() {
    let svc = Recorder::default();
    let got = svc.got.clone();
    let addr = serve(svc).await;
    let channels = NodeChannels::default();
    let mut reqs: Vec<_> = (0..4).map(|i| req(i, 1 << 20)).collect();
    reqs[2].id = Bytes::from(vec![REFUSE; 32]);
    let mut replies = put_chunks(channels.channel(&addr).unwrap(), reqs.clone(), None)
        .await
        .expect("call accepted");
    let mut ok = 0;
    let err = loop {
        match replies.message().await {
            Ok(Some(_)) => ok += 1,
            Ok(None) => panic!("the stream ended without the refusal"),
            Err(e) => break e,
        }
    };
    assert_eq!(ok, 2);
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("does not match"), "{err:?}");
    assert_eq!(got.lock().unwrap().len(), 2);

    let addr = serve(Recorder {
        refuse_calls: true,
        ..Default::default()
    })
    .await;
    let err = match put_chunks(channels.channel(&addr).unwrap(), reqs, None).await {
        Ok(mut s) => s.message().await.expect_err("refused"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("shutting down"), "{err:?}");
}

#[tokio::test]
async fn an_unreachable_node_is_an_error_not_a_hang() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let channels = NodeChannels::default();
    let err = put_chunks(channels.channel(&addr).unwrap(), vec![req(1, 10)], None)
        .await
        .expect_err("nothing listens");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}
