//! `PutChunks` requests read on the server without copying blobs, and its replies framed.
//!
//! tonic's server decoder copies every received HTTP/2 DATA frame into its own buffer before it
//! cuts messages out of it; for a storage node that copy was about 5% of its CPU during a first
//! backup (every blob it receives, from clients and from other replicas, went through it).
//! [`put_requests`] cuts each gRPC message out of the frames as they arrived, as slices of them,
//! and lets prost decode it from those slices: a blob that arrived within one frame (the
//! senders of [`crate::upload`] send each large blob as a frame of its own) is a view of the
//! receive buffer, never copied; one split over frames is joined, as tonic would. Replies are
//! framed by [`reply_body`], with the call's status in the trailers.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::Stream;
use http_body::{Body, Frame};
use prost::Message;
use tokio::sync::mpsc;
use tonic::body::BoxBody;
use tonic::codegen::http;
use tonic::{Code, Status};

use crate::chunk::{PutChunkReply, PutChunkRequest};

/// The method's HTTP/2 path.
pub const PUT_CHUNKS_PATH: &str = "/cairn.chunk.ChunkStore/PutChunks";

/// Received bytes not yet consumed: the frames as they arrived, sliced, never joined.
#[derive(Default)]
struct Rope {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Rope {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push_back(b);
        }
    }

    /// The first `N` bytes (at least `N` are buffered), not consumed.
    fn peek<const N: usize>(&self) -> [u8; N] {
        let mut out = [0u8; N];
        let mut at = 0;
        for p in &self.parts {
            let n = (N - at).min(p.len());
            out[at..at + n].copy_from_slice(&p[..n]);
            at += n;
            if at == N {
                break;
            }
        }
        out
    }

    /// The next `n` bytes (at most [`Rope::remaining`]), as slices of the frames they are in.
    fn split_to(&mut self, mut n: usize) -> Rope {
        let mut out = Rope::default();
        while n > 0 {
            let front = self.parts.front_mut().expect("n <= remaining");
            let piece = if front.len() <= n {
                self.parts.pop_front().expect("front exists")
            } else {
                front.split_to(n)
            };
            n -= piece.len();
            self.len -= piece.len();
            out.push(piece);
        }
        out
    }
}

impl Buf for Rope {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let front = self.parts.front_mut().expect("advance within remaining");
            let n = cnt.min(front.len());
            front.advance(n);
            if front.is_empty() {
                self.parts.pop_front();
            }
            self.len -= n;
            cnt -= n;
        }
    }

    /// A slice of the frame when the bytes lie in one (prost takes `bytes` fields with this),
    /// otherwise a copy.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        match self.parts.front_mut() {
            Some(front) if front.len() >= len => {
                let b = front.split_to(len);
                if front.is_empty() {
                    self.parts.pop_front();
                }
                self.len -= len;
                b
            }
            _ => {
                assert!(len <= self.len, "copy_to_bytes past the end");
                let mut out = BytesMut::with_capacity(len);
                out.put(self.take(len));
                out.freeze()
            }
        }
    }
}

/// Reads the messages of one request body.
struct Reader<B> {
    body: B,
    buf: Rope,
    /// The body has no more frames.
    ended: bool,
    /// A message could not be read: what follows it cannot be framed, so nothing more is.
    failed: bool,
    max_message: usize,
}

impl<B> Reader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// Polls the body until `n` bytes are buffered; false if it ended first.
    fn poll_fill(&mut self, cx: &mut Context<'_>, n: usize) -> Poll<Result<bool, Status>> {
        while self.buf.remaining() < n {
            if self.ended {
                return Poll::Ready(Ok(false));
            }
            match std::task::ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers of a request carry nothing Cairn uses.
                    if let Ok(data) = frame.into_data() {
                        self.buf.push(data);
                    }
                }
                Some(Err(e)) => {
                    return Poll::Ready(Err(Status::cancelled(format!("reading the request: {e}"))))
                }
                None => self.ended = true,
            }
        }
        Poll::Ready(Ok(true))
    }

    fn poll_next_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<PutChunkRequest, Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let next = std::task::ready!(self.poll_message(cx));
        self.failed = matches!(next, Some(Err(_)));
        Poll::Ready(next)
    }

    fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<PutChunkRequest, Status>>> {
        match std::task::ready!(self.poll_fill(cx, 5)) {
            Err(e) => return Poll::Ready(Some(Err(e))),
            Ok(false) if self.buf.remaining() == 0 => return Poll::Ready(None),
            Ok(false) => return Poll::Ready(Some(Err(truncated()))),
            Ok(true) => {}
        }
        let head = self.buf.peek::<5>();
        let len = u32::from_be_bytes(head[1..].try_into().expect("4 bytes")) as usize;
        if head[0] != 0 {
            return Poll::Ready(Some(Err(Status::unimplemented(
                "compressed messages are not accepted: blobs are compressed by the client",
            ))));
        }
        if len > self.max_message {
            return Poll::Ready(Some(Err(Status::out_of_range(format!(
                "message of {len} bytes exceeds the limit of {} bytes",
                self.max_message
            )))));
        }
        match std::task::ready!(self.poll_fill(cx, 5 + len)) {
            Err(e) => return Poll::Ready(Some(Err(e))),
            Ok(false) => return Poll::Ready(Some(Err(truncated()))),
            Ok(true) => {}
        }
        self.buf.advance(5);
        let msg = self.buf.split_to(len);
        Poll::Ready(Some(PutChunkRequest::decode(msg).map_err(|e| {
            Status::invalid_argument(format!("malformed put request: {e}"))
        })))
    }
}

fn truncated() -> Status {
    Status::invalid_argument("the request ended inside a message")
}

/// The `PutChunkRequest` messages of a `PutChunks` request body, each decoded from slices of
/// the frames it arrived in; messages longer than `max_message` are refused.
pub fn put_requests<B>(
    body: B,
    max_message: usize,
) -> impl Stream<Item = Result<PutChunkRequest, Status>> + Send + Unpin
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let mut r = Reader {
        body,
        buf: Rope::default(),
        ended: false,
        failed: false,
        max_message,
    };
    // The first error ends the stream.
    futures::stream::poll_fn(move |cx| r.poll_next_message(cx))
}

/// Replies of one call, gathered into frames as they are ready; then the status as trailers.
struct Replies {
    rx: mpsc::Receiver<Result<PutChunkReply, Status>>,
    /// How the call ends, once known; sent after the replies before it.
    end: Option<Status>,
    done: bool,
}

/// Encoded replies gathered into one frame at most.
const GATHER: usize = 64 * 1024;

impl Body for Replies {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut buf = BytesMut::new();
        while this.end.is_none() && buf.len() < GATHER {
            let next = match this.rx.poll_recv(cx) {
                Poll::Ready(n) => n,
                Poll::Pending if buf.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            };
            match next {
                Some(Ok(reply)) => {
                    let len = reply.encoded_len();
                    buf.reserve(5 + len);
                    buf.put_u8(0);
                    buf.put_u32(len as u32);
                    reply.encode(&mut buf).expect("reserved room for the reply");
                }
                Some(Err(status)) => this.end = Some(status),
                None => this.end = Some(Status::new(Code::Ok, "")),
            }
        }
        if !buf.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(buf.freeze()))));
        }
        this.done = true;
        let status = this
            .end
            .take()
            .expect("the loop ends with replies or the end");
        Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if let Err(e) = status.add_header(&mut map) {
        map.clear();
        let _ = e.add_header(&mut map);
    }
    map
}

/// The HTTP response of a `PutChunks` call whose replies come from `rx`: each reply a gRPC
/// message; the first error, or the end of `rx`, ends the call with its status.
pub fn reply_body(rx: mpsc::Receiver<Result<PutChunkReply, Status>>) -> http::Response<BoxBody> {
    let mut resp = http::Response::new(tonic::body::boxed(Replies {
        rx,
        end: None,
        done: false,
    }));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use rand::{Rng, SeedableRng};

    use crate::upload::tests::req;
    use crate::upload::Frames;

    /// What tonic's encoder sends: each message whole, behind its 5-byte head.
    fn wire(reqs: &[PutChunkRequest]) -> Vec<u8> {
        let mut w = Vec::new();
        for r in reqs {
            w.push(0);
            w.extend_from_slice(&(r.encoded_len() as u32).to_be_bytes());
            r.encode(&mut w).unwrap();
        }
        w
    }

    fn read_all(frames: Vec<Bytes>, max: usize) -> Vec<Result<PutChunkRequest, Status>> {
        let stream = put_requests(Frames(frames.into()), max);
        futures::executor::block_on(stream.collect())
    }

    /// However the bytes are cut into frames (single bytes, random pieces, all in one), the
    /// messages decode to what was sent.
    #[test]
    fn messages_decode_whatever_the_frames() {
        let reqs: Vec<_> = [0, 1, 100, 5000, 70_000, 3, 300_000]
            .iter()
            .enumerate()
            .map(|(i, &n)| req(i, n))
            .collect();
        let w = wire(&reqs);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for cut in 0..20 {
            let mut frames = Vec::new();
            let mut at = 0;
            while at < w.len() {
                let n = match cut {
                    0 => w.len(),
                    1 => 1,
                    _ => rng.gen_range(1..=4096.min(w.len() - at)),
                }
                .min(w.len() - at);
                frames.push(Bytes::copy_from_slice(&w[at..at + n]));
                at += n;
            }
            let got: Vec<_> = read_all(frames, usize::MAX)
                .into_iter()
                .map(|r| r.expect("decodes"))
                .collect();
            assert_eq!(got, reqs, "cut {cut}");
        }
    }

    /// A blob that arrives in a frame of its own, as `upload` sends it, is that frame's memory.
    #[test]
    fn a_blob_in_a_frame_of_its_own_is_not_copied() {
        let reqs = vec![req(3, 200_000), req(4, 10), req(5, 1 << 20)];
        let frames: Vec<Bytes> = crate::upload::frames(reqs.clone()).into();
        let got: Vec<_> = read_all(frames.clone(), usize::MAX)
            .into_iter()
            .map(|r| r.expect("decodes"))
            .collect();
        assert_eq!(got, reqs);
        for i in [0, 2] {
            assert!(
                frames.iter().any(|f| f.as_ptr() == got[i].blob.as_ptr()),
                "blob {i} was copied"
            );
        }
    }

    #[test]
    fn bad_bodies_are_refused_with_a_status() {
        let reqs = [req(1, 1000)];
        let w = wire(&reqs);
        // Cut short, inside the head and inside the message.
        for n in [3, w.len() - 1] {
            let got = read_all(vec![Bytes::copy_from_slice(&w[..n])], usize::MAX);
            assert_eq!(got.len(), 1);
            let e = got[0].as_ref().unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        }
        // Longer than the limit.
        let got = read_all(vec![Bytes::copy_from_slice(&w)], 100);
        assert_eq!(got[0].as_ref().unwrap_err().code(), Code::OutOfRange);
        // Compressed.
        let mut c = w.clone();
        c[0] = 1;
        let got = read_all(vec![Bytes::from(c)], usize::MAX);
        assert_eq!(got[0].as_ref().unwrap_err().code(), Code::Unimplemented);
        // Not a put request: a length-delimited field whose length runs past the message.
        let mut m = vec![0, 0, 0, 0, 3, 0x0a, 0x7f, 0x01];
        m[4] = 3;
        let got = read_all(vec![Bytes::from(m)], usize::MAX);
        assert_eq!(got[0].as_ref().unwrap_err().code(), Code::InvalidArgument);
        // An empty body is no message at all.
        assert!(read_all(vec![], usize::MAX).is_empty());
    }

    /// Replies are gRPC messages; the trailers carry OK, or the error that ended the call.
    #[test]
    fn replies_end_with_the_calls_status() {
        use http_body_util::BodyExt;
        for fail in [false, true] {
            let (tx, rx) = mpsc::channel(8);
            let replies: Vec<_> = (0..5u32)
                .map(|i| PutChunkReply {
                    id: Bytes::from(vec![i as u8; 32]),
                    copies: i,
                    existed: false,
                })
                .collect();
            for r in &replies {
                tx.try_send(Ok(r.clone())).unwrap();
            }
            if fail {
                tx.try_send(Err(Status::unavailable("only 1 of 2 copies")))
                    .unwrap();
            }
            drop(tx);
            let body = reply_body(rx).into_body();
            let collected = futures::executor::block_on(body.collect()).unwrap();
            let trailers = collected.trailers().cloned().expect("trailers");
            let mut data = collected.to_bytes();
            let mut got = Vec::new();
            while data.has_remaining() {
                assert_eq!(data.get_u8(), 0);
                let len = data.get_u32() as usize;
                got.push(PutChunkReply::decode(data.split_to(len)).unwrap());
            }
            assert_eq!(got, replies);
            let status = Status::from_header_map(&trailers).expect("a status");
            if fail {
                assert_eq!(status.code(), Code::Unavailable);
                assert_eq!(status.message(), "only 1 of 2 copies");
            } else {
                assert_eq!(status.code(), Code::Ok);
            }
        }
    }

    fn rope(parts: &[&[u8]]) -> Rope {
        let mut r = Rope::default();
        parts.iter().for_each(|p| r.push(Bytes::copy_from_slice(p)));
        r
    }

    #[test]
    fn rope_reads_across_parts_and_slices_within_one() {
        let mut r = rope(&[b"abc", b"", b"defgh", b"ij"]);
        assert_eq!(r.remaining(), 10);
        let inside = r.copy_to_bytes(2);
        assert_eq!(&inside[..], b"ab");
        let across = r.copy_to_bytes(4);
        assert_eq!(&across[..], b"cdef");
        let mut s = r.split_to(3);
        assert_eq!(s.remaining(), 3);
        assert_eq!(&s.copy_to_bytes(3)[..], b"ghi");
        r.advance(1);
        assert_eq!(r.remaining(), 0);
        assert!(r.chunk().is_empty());
    }
}
