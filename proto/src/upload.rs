//! `PutChunks` calls that send blobs without copying them.
//!
//! A tonic client encodes each message into its outgoing buffer, so every blob a client
//! uploads, and every blob a storage node forwards to a replica, was copied once more before
//! HTTP/2 wrote it; in profiles of a first backup that copy was about 3% of the storage nodes'
//! CPU and 2% of the client's. [`put_chunks`] writes the gRPC framing and each message's other
//! fields into small buffers and hands every large blob to HTTP/2 as it is (h2 writes a large
//! DATA payload straight from it with vectored writes). The bytes on the wire are an ordinary
//! `PutChunks` stream (the blob field is placed last, which protobuf allows), which any gRPC
//! server decodes (storage nodes with [`crate::receive`], which takes such a blob as the frame it
//! arrived in); replies and errors come back as from the generated client.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use prost::Message;
use tonic::client::GrpcService;
use tonic::codec::{Codec, Streaming};
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::chunk::{PutChunkReply, PutChunkRequest};
use crate::codec::ChunkCodec;

/// Blobs at least this long go out as frames of their own; shorter ones are copied in with
/// their neighbours (a separate DATA frame costs more than copying a few kilobytes).
const OWN_FRAME: usize = 32 * 1024;
/// Copied bytes gathered before they are handed over as one frame.
const GATHER: usize = 256 * 1024;
/// Room for a message's fields other than its blob, and its gRPC head (ids and hashes are 32
/// bytes; the rest are a few varints).
const MESSAGE_ROOM: usize = 1024;
/// Protobuf key of field 2 (`blob`), wire type 2 (length-delimited).
const BLOB_KEY: u8 = (2 << 3) | 2;

/// The request body: the frames of every message, in order.
pub(crate) struct Frames(pub(crate) VecDeque<Bytes>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// The gRPC-framed bytes of `reqs`: large blobs as frames of their own, everything else
/// gathered into shared buffers.
pub(crate) fn frames(reqs: Vec<PutChunkRequest>) -> VecDeque<Bytes> {
    let mut out = VecDeque::new();
    let mut buf = BytesMut::new();
    for mut req in reqs {
        let blob = std::mem::take(&mut req.blob);
        let blob_field = 1 + prost::encoding::encoded_len_varint(blob.len() as u64) + blob.len();
        let len = req.encoded_len() + blob_field;
        let copied = 5 + len - blob.len()
            + if blob.len() < OWN_FRAME {
                blob.len()
            } else {
                0
            };
        // A gather never outgrows GATHER plus one message, so a buffer started with that room
        // is never reallocated (which would copy what it holds).
        buf.reserve(if buf.is_empty() {
            copied.max(GATHER + OWN_FRAME + MESSAGE_ROOM)
        } else {
            copied
        });
        buf.put_u8(0); // not compressed
        buf.put_u32(len as u32);
        req.encode(&mut buf).expect("reserved room for the message");
        buf.put_u8(BLOB_KEY);
        prost::encoding::encode_varint(blob.len() as u64, &mut buf);
        if blob.len() < OWN_FRAME {
            buf.put_slice(&blob);
            if buf.len() >= GATHER {
                out.push_back(buf.split().freeze());
            }
        } else {
            out.push_back(buf.split().freeze());
            out.push_back(blob);
        }
    }
    if !buf.is_empty() {
        out.push_back(buf.freeze());
    }
    out
}

/// Sends `reqs` as one `PutChunks` stream over `channel` and returns the reply stream, as the
/// generated client's `put_chunks` does.
/// A storage node forwarding to replicas passes its [`crate::ReplicaToken`].
pub async fn put_chunks(
    channel: Channel,
    reqs: Vec<PutChunkRequest>,
    token: Option<&crate::ReplicaToken>,
) -> Result<Streaming<PutChunkReply>, Status> {
    let body = tonic::body::boxed(Frames(frames(reqs)));
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(crate::receive::PUT_CHUNKS_PATH)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if let Some(t) = token {
        req = req.header(crate::REPLICA_TOKEN_HEADER, t.header_value());
    }
    let req = req
        .body(body)
        .map_err(|e| Status::internal(format!("building a put request: {e}")))?;
    let mut svc = channel;
    std::future::poll_fn(|cx| GrpcService::poll_ready(&mut svc, cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let resp = GrpcService::call(&mut svc, req)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    // A call refused before any reply carries its status in the headers ("trailers only").
    if let Some(status) = Status::from_header_map(resp.headers()) {
        if status.code() != Code::Ok {
            return Err(status);
        }
    }
    let code = resp.status();
    let decoder = ChunkCodec::<PutChunkRequest, PutChunkReply>::default().decoder();
    Ok(Streaming::new_response(
        decoder,
        resp.into_body(),
        code,
        None,
        Some(crate::MAX_MESSAGE_SIZE),
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Buf;

    /// A request with an id, hash and blob of its own; every third has a CRC-32.
    pub(crate) fn req(i: usize, blob_len: usize) -> PutChunkRequest {
        let mut id = vec![1u8; 32];
        id[24..].copy_from_slice(&(i as u64).to_be_bytes());
        PutChunkRequest {
            id: Bytes::from(id),
            blob: Bytes::from(
                (0..blob_len)
                    .map(|k| (k * 31 + i) as u8)
                    .collect::<Vec<_>>(),
            ),
            hash: Bytes::from(vec![i as u8; 32]),
            replica: i % 2 == 1,
            layout_version: i as u64,
            crc32: (i % 3 == 1).then_some(i as u32 * 77),
        }
    }

    /// The frames, joined, are gRPC messages that decode to the requests, whatever the blobs'
    /// sizes; large blobs are frames of their own, the very buffers given.
    #[test]
    fn frames_decode_to_the_requests_and_share_large_blobs() {
        let sizes = [0, 1, 100, OWN_FRAME - 1, OWN_FRAME, 300_000, 5, 1 << 20, 17];
        let reqs: Vec<_> = sizes.iter().enumerate().map(|(i, &n)| req(i, n)).collect();
        let frames = frames(reqs.clone());
        for r in &reqs {
            if r.blob.len() >= OWN_FRAME {
                assert!(
                    frames
                        .iter()
                        .any(|f| f.as_ptr() == r.blob.as_ptr() && f.len() == r.blob.len()),
                    "a blob of {} bytes was copied",
                    r.blob.len()
                );
            }
        }
        let mut wire = BytesMut::new();
        frames.iter().for_each(|f| wire.put_slice(f));
        let mut wire = wire.freeze();
        let mut got = Vec::new();
        while wire.has_remaining() {
            assert_eq!(wire.get_u8(), 0, "uncompressed");
            let len = wire.get_u32() as usize;
            got.push(PutChunkRequest::decode(wire.split_to(len)).expect("decodes"));
        }
        assert_eq!(got, reqs);
    }
}
