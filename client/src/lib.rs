//! Cairn's client library: back up file trees to a Cairn cluster and restore them, with
//! content-defined chunking, deduplication, compression and encryption. The `cairn` CLI is a
//! thin layer over this crate.
//!
//! ```no_run
//! use cairn_client::{BackupOptions, Cluster, Progress, Repository, RestoreOptions, SnapshotQuery};
//!
//! # async fn demo() -> cairn_client::Result<()> {
//! let cluster = Cluster::connect(vec!["127.0.0.1:7000".into()]).await?;
//! let repo = Repository::open(cluster, "default", b"secret").await?;
//! let summary = repo
//!     .backup(&["/srv/data".into()], &BackupOptions::default(), &Progress::hidden())
//!     .await?;
//! println!("snapshot {} uploaded {} bytes", summary.snapshot, summary.bytes_uploaded);
//! let snap = repo.find_snapshot("latest", &SnapshotQuery::default()).await?;
//! let opts = RestoreOptions { target: "/tmp/restore".into(), verify: true, ..Default::default() };
//! repo.restore(&snap, &opts, &Progress::hidden()).await?;
//! # Ok(())
//! # }
//! ```

mod backup;
pub(crate) mod chunker;
mod cluster;
mod crypto;
mod error;
mod inspect;
mod progress;
mod repo;
mod restore;
mod tree;

pub use backup::{BackupKind, BackupOptions, BackupSummary, ChunkerOptions};
pub use chunker::chunk_stream;
pub use cluster::{BadCopy, Blob, Cluster};
pub use crypto::{Keys, KDF};
pub use error::{Error, Result};
pub use inspect::{CheckReport, DiffEntry, LsEntry};
pub use progress::Progress;
pub use repo::{Repository, SnapshotQuery};
pub use restore::{RestoreOptions, RestoreSummary};
pub use tree::{ChunkRef, Kind, Node, Tree};

/// Most ids sent in one has-chunks call.
pub(crate) const MAX_IDS_PER_CALL: usize = 4096;
