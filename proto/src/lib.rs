//! Cairn's wire contract.
//!
//! This crate owns the protobuf services (generated with tonic/prost) and the few wire-level
//! types every other crate shares: [`ChunkId`], the partition function and layout look-ups.
//! It holds no behaviour beyond those pure functions.

#![allow(missing_docs)]

use std::fmt;

/// Generated code for `types.proto`.
pub mod types {
    tonic::include_proto!("cairn.types");
}
/// Generated code for `raft.proto` (internal coordinator-to-coordinator RPCs).
pub mod raft {
    tonic::include_proto!("cairn.raft");
}
/// Generated code for `metadata.proto` (the coordinator's public API).
pub mod metadata {
    tonic::include_proto!("cairn.metadata");
}
/// Generated code for `chunk.proto` (the storage node's API).
pub mod chunk {
    tonic::include_proto!("cairn.chunk");
}

pub mod codec;
pub mod coord_client;
pub mod receive;
pub mod transport;
pub mod upload;

/// Number of placement partitions. Fixed for the life of a cluster.
pub const PARTITIONS: u32 = 1024;
/// Bits of the chunk id that select its partition.
pub const PARTITION_BITS: u32 = 10;
/// Largest blob a node accepts (a chunk's maximum size plus compression and AEAD overhead).
pub const MAX_BLOB_SIZE: usize = 16 * 1024 * 1024 + 64 * 1024;
/// Largest gRPC message any Cairn service decodes.
pub const MAX_MESSAGE_SIZE: usize = MAX_BLOB_SIZE + 1024 * 1024;
/// Metadata header that carries the leader's address on a redirect.
pub const LEADER_HEADER: &str = "cairn-leader";
/// Metadata header of a put stream between storage nodes that share the cluster secret.
pub const REPLICA_TOKEN_HEADER: &str = "cairn-replica-token";

/// What storage nodes configured with the same cluster secret show each other on the put
/// streams they forward to replicas (derived from the secret, which is never sent). A replica
/// that recognises it trusts the stream's blob hashes, verified by the node that forwards them,
/// and checks each blob's CRC-32 against damage in transit instead of hashing it again.
#[derive(Clone)]
pub struct ReplicaToken(blake3::Hash);

impl ReplicaToken {
    /// The token of `secret` (any non-empty string shared by the cluster's storage nodes).
    pub fn from_secret(secret: &str) -> Self {
        Self(blake3::Hash::from(blake3::derive_key(
            "cairn storage node replica token v1",
            secret.as_bytes(),
        )))
    }

    /// The header value that carries it.
    pub fn header_value(&self) -> tonic::codegen::http::HeaderValue {
        tonic::codegen::http::HeaderValue::from_str(&self.0.to_hex())
            .expect("hex is a valid header value")
    }

    /// Whether a received header value is this token (compared in constant time).
    pub fn matches(&self, value: &[u8]) -> bool {
        std::str::from_utf8(value)
            .ok()
            .and_then(|s| blake3::Hash::from_hex(s).ok())
            .is_some_and(|h| h == self.0)
    }
}

impl fmt::Debug for ReplicaToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplicaToken(..)")
    }
}

/// Errors in wire-level values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A chunk id was not 32 bytes.
    #[error("chunk id must be 32 bytes, got {0}")]
    BadChunkIdLength(usize),
    /// A chunk id in text was not 64 hex digits.
    #[error("chunk id must be 64 hex digits")]
    BadChunkIdHex,
}

/// Content address of a chunk: the tenant-keyed BLAKE3 of its plaintext (32 bytes).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Parses the 32 raw bytes of a wire message.
    pub fn from_slice(b: &[u8]) -> Result<Self, WireError> {
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| WireError::BadChunkIdLength(b.len()))?;
        Ok(Self(arr))
    }
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, WireError> {
        let v = hex::decode(s).map_err(|_| WireError::BadChunkIdHex)?;
        Self::from_slice(&v)
    }
    /// The partition that holds this chunk: the id's top [`PARTITION_BITS`] bits.
    pub fn partition(&self) -> u32 {
        partition_of(&self.0)
    }
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}
impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The partition of a raw id (at least 2 bytes).
pub fn partition_of(id: &[u8]) -> u32 {
    let top = u32::from(u16::from_be_bytes([id[0], id[1]]));
    top >> (16 - PARTITION_BITS)
}

/// blake3 of a blob, the checksum every node verifies without keys.
pub fn blob_hash(blob: &[u8]) -> [u8; 32] {
    *blake3::hash(blob).as_bytes()
}

impl types::Layout {
    /// The ordered replica set of a partition (primary first); empty if the layout has none.
    pub fn replicas(&self, partition: u32) -> &[u64] {
        self.partitions
            .get(partition as usize)
            .map(|p| p.nodes.as_slice())
            .unwrap_or(&[])
    }
    /// The address of a node named in the layout.
    pub fn address(&self, node: u64) -> Option<&str> {
        self.addresses.get(&node).map(String::as_str)
    }
}

impl types::NodeState {
    /// The user-facing name (`Active`, `Maintenance`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "Unspecified",
            Self::Active => "Active",
            Self::Maintenance => "Maintenance",
            Self::Draining => "Draining",
            Self::Down => "Down",
            Self::Out => "Out",
        }
    }
    /// Parses a user-facing name, case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "active" => Self::Active,
            "maintenance" => Self::Maintenance,
            "draining" => Self::Draining,
            "down" => Self::Down,
            "out" => Self::Out,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_uses_top_bits() {
        assert_eq!(partition_of(&[0, 0]), 0);
        assert_eq!(partition_of(&[0xff, 0xff]), PARTITIONS - 1);
        assert_eq!(partition_of(&[0x00, 0x40]), 1);
        assert_eq!(partition_of(&[0x80, 0x00]), PARTITIONS / 2);
    }

    #[test]
    fn chunk_id_parsing_rejects_bad_lengths() {
        assert_eq!(
            ChunkId::from_slice(&[1, 2, 3]),
            Err(WireError::BadChunkIdLength(3))
        );
        let id = ChunkId([7; 32]);
        assert_eq!(ChunkId::from_hex(&id.to_hex()).unwrap(), id);
        assert!(ChunkId::from_hex("zz").is_err());
    }
}
