//! The gRPC codec of the chunk service: prost messages, framed in buffers sized for blobs.
//!
//! tonic's default codec starts every message in an 8 KiB buffer and lets it grow as prost
//! writes into it, so a megabyte blob is copied by each reallocation before the copy that puts
//! it in place; profiles of storage nodes forwarding blobs showed those reallocations as a
//! copy of their own. [`ChunkCodec`] reserves a message's whole encoded length before encoding
//! it, so a blob is copied into the outgoing buffer once. Decoding is prost's, unchanged: a
//! blob is a slice of the receive buffer, not a copy. Every get, and the decoding of every put,
//! goes through it, so the integration tests exercise it end to end; puts are sent by
//! [`crate::upload`], which does not copy blobs at all.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder, ProstCodec};
use tonic::Status;

/// Outgoing bytes gathered before they are handed to HTTP/2: a few small messages (replies,
/// small blobs) share one frame, a large blob goes out alone.
const YIELD_THRESHOLD: usize = 256 * 1024;
/// Initial size of a stream's buffers.
const BUFFER_SIZE: usize = 64 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// Codec of the chunk service (named in `build.rs`): encodes and decodes prost messages.
#[derive(Debug, Clone)]
pub struct ChunkCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ChunkCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ChunkCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ChunkEncoder<T>;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ChunkEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

/// Encodes a prost message into room reserved for all of it at once.
#[derive(Debug, Clone)]
pub struct ChunkEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ChunkEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}
