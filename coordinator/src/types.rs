//! The coordinator's replicated vocabulary: the Raft type configuration, the commands that go
//! through the log ([`Request`]), their results ([`Response`]) and the records the state machine
//! stores. Everything here is encoded with postcard, prefixed by a format version.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// Raft node id of a coordinator.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft type configuration of the coordinator group.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle of a coordinator.
pub type Raft = openraft::Raft<TypeConfig>;

/// State of a storage node in the cluster map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Serving reads and writes; holds its share of partitions.
    Active,
    /// Temporarily unavailable by intent; never marked Out while here.
    Maintenance,
    /// Its partitions are being moved away; excluded from new layouts.
    Draining,
    /// Missed heartbeats; still holds its place in the layout.
    Down,
    /// Gone for good; excluded from the layout.
    Out,
}

impl NodeState {
    /// Whether a node in this state holds partitions in the layout.
    pub fn in_layout(self) -> bool {
        matches!(self, Self::Active | Self::Maintenance | Self::Down)
    }
    /// Wire form.
    pub fn to_proto(self) -> cairn_proto::types::NodeState {
        use cairn_proto::types::NodeState as P;
        match self {
            Self::Active => P::Active,
            Self::Maintenance => P::Maintenance,
            Self::Draining => P::Draining,
            Self::Down => P::Down,
            Self::Out => P::Out,
        }
    }
    /// From the wire form; `None` for unspecified.
    pub fn from_proto(p: cairn_proto::types::NodeState) -> Option<Self> {
        use cairn_proto::types::NodeState as P;
        Some(match p {
            P::Unspecified => return None,
            P::Active => Self::Active,
            P::Maintenance => Self::Maintenance,
            P::Draining => Self::Draining,
            P::Down => Self::Down,
            P::Out => Self::Out,
        })
    }
}

/// A storage node in the cluster map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Allocated through the log; never reused.
    pub id: u64,
    /// blake3 of the node's secret: proves that a re-registration comes from the same node.
    pub secret_hash: [u8; 32],
    /// gRPC address clients and peers use.
    pub address: String,
    /// Failure domain.
    pub zone: String,
    /// Capacity in bytes (the placement weight).
    pub capacity: u64,
    /// Current state.
    pub state: NodeState,
}

/// A tenant: a namespace of snapshots with its own wrapped master key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Unique name.
    pub name: String,
    /// Master key encrypted with a password-derived key.
    pub wrapped_key: Vec<u8>,
    /// KDF salt.
    pub salt: Vec<u8>,
    /// KDF description (algorithm and parameters).
    pub kdf: String,
    /// Creation time.
    pub created_unix_nanos: i64,
}

/// Statistics a client reports with a committed snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SnapshotStats {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    pub dirs: u64,
    pub bytes_read: u64,
    pub bytes_total: u64,
    pub bytes_uploaded: u64,
    pub chunks_uploaded: u64,
    pub duration_ms: u64,
    pub errors: u64,
}

/// Life cycle of a catalog entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotStatus {
    /// Begun, not yet committed: its chunks are protected from garbage collection.
    Pending,
    /// Committed: visible and immutable.
    Committed,
    /// Marked deleted.
    Deleted,
}

impl SnapshotStatus {
    /// User-facing name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Committed => "committed",
            Self::Deleted => "deleted",
        }
    }
}

/// A snapshot in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SnapshotRecord {
    pub id: String,
    pub tenant: String,
    pub host: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
    pub kind: String,
    pub parent: String,
    pub time_unix_nanos: i64,
    pub root: Vec<u8>,
    pub stats: SnapshotStats,
    pub status: SnapshotStatus,
}

/// A command replicated through the Raft log. Validation that needs state happens in `apply`,
/// so every replica reaches the same verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Register a new node (`id == 0`) or re-register a known one.
    RegisterNode {
        id: u64,
        secret_hash: [u8; 32],
        address: String,
        zone: String,
        capacity: u64,
    },
    /// Commit a state transition of a node.
    SetNodeState { id: u64, state: NodeState },
    /// Change the redundancy factor and write quorum.
    SetReplication { replicas: u32, write_quorum: u32 },
    /// Create a tenant.
    CreateTenant(TenantRecord),
    /// Begin a snapshot (status Pending).
    BeginSnapshot(SnapshotRecord),
    /// Commit a pending snapshot with its root tree and stats.
    CommitSnapshot {
        id: String,
        root: Vec<u8>,
        stats: SnapshotStats,
    },
    /// Mark a snapshot deleted.
    DeleteSnapshot { id: String },
}

/// Why a command was refused by the state machine (the same verdict on every replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AppError {
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The thing exists already and the request conflicts with it.
    #[error("{0}")]
    Conflict(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
}

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Response {
    /// Blank and membership entries.
    None,
    Node(Result<NodeRecord, AppError>),
    Replication(Result<(u32, u32), AppError>),
    Tenant(Result<TenantRecord, AppError>),
    Snapshot(Result<SnapshotRecord, AppError>),
}

/// Version byte in front of every persisted encoding.
pub const FORMAT_VERSION: u8 = 1;

/// Encodes a value with a format version byte.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // postcard cannot fail on these types except on allocation failure.
    out.extend(postcard::to_stdvec(v).expect("postcard encoding of an in-memory value"));
    out
}

/// Decodes a value written by [`encode`].
pub fn decode<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T, DecodeError> {
    match b.split_first() {
        Some((&FORMAT_VERSION, rest)) => Ok(postcard::from_bytes(rest)?),
        Some((v, _)) => Err(DecodeError::Version(*v)),
        None => Err(DecodeError::Empty),
    }
}

/// A stored or received value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Unknown format version.
    #[error("unknown format version {0}")]
    Version(u8),
    /// Empty input.
    #[error("empty value")]
    Empty,
    /// postcard failed.
    #[error(transparent)]
    Postcard(#[from] postcard::Error),
}
