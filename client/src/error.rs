//! The client library's one public error type.

use cairn_proto::ChunkId;

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster answered with an error status.
    #[error("{}", .0.message())]
    Rpc(#[from] tonic::Status),
    /// Local file system I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The password does not unlock the tenant's key.
    #[error("wrong password for tenant {0}")]
    WrongPassword(String),
    /// The tenant does not exist.
    #[error("tenant {0} does not exist (run `cairn init` first)")]
    NoTenant(String),
    /// No replica returned a verifiable copy of a chunk.
    #[error("chunk {id}: no replica returned a valid copy ({detail})")]
    ChunkUnavailable {
        /// The chunk.
        id: ChunkId,
        /// What each replica answered.
        detail: String,
    },
    /// Stored data failed verification (tampering or corruption).
    #[error("integrity: {0}")]
    Integrity(String),
    /// A snapshot selector matched nothing.
    #[error("no snapshot matches {0}")]
    NoSnapshot(String),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A snapshot tree would write outside the restore target.
    #[error("refusing hostile tree entry {0:?}")]
    HostilePath(String),
}

impl Error {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// Result alias of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
