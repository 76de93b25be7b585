//! Durable storage of a coordinator, all in one sled database:
//! - [`log::LogStore`]: the Raft log, vote and purge/commit marks (tree `log`, tree `raft`);
//! - [`sm::StateMachine`]: the applied state (tree `state`) and the latest snapshot (tree `snapshot`).
//!
//! Every method that openraft treats as durable flushes (fsync) before it returns or before it
//! reports completion; the state machine stores the last-applied log id in the same atomic batch
//! as the state it produced.

pub mod log;
pub mod sm;
pub mod state;

use std::path::Path;

use openraft::{ErrorSubject, ErrorVerb, StorageError, StorageIOError};

use crate::types::NodeId;

/// Opens (or creates) the coordinator's database and its two stores.
pub fn open(dir: &Path) -> Result<(log::LogStore, sm::StateMachine), sled::Error> {
    let db = sled::Config::new()
        .path(dir.join("db"))
        // The process flushes explicitly before every acknowledgement.
        .flush_every_ms(None)
        .open()?;
    Ok((log::LogStore::new(&db)?, sm::StateMachine::new(&db)?))
}

pub(crate) fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

pub(crate) fn be(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}
