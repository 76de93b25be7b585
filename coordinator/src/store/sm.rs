//! openraft's state machine over the sled state tree ([`super::state`]), and its snapshots.
//!
//! A snapshot is every key/value of the state tree, postcard-encoded; the latest one is kept in
//! tree `snapshot` so it survives restarts. The state is O(nodes + snapshots), so a snapshot is
//! small enough to hold in memory while it is built, sent in chunks or installed.

use std::io::Cursor;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::io_err;
use super::state::{self, StateReader, APPLIED, MEMBERSHIP};
use crate::types::{decode, encode, NodeId, Response, TypeConfig};

const CURRENT: &[u8] = b"current";

type SResult<T> = Result<T, StorageError<NodeId>>;

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

/// The state machine (cheap to clone).
#[derive(Clone)]
pub struct StateMachine {
    db: sled::Db,
    state: StateReader,
    snapshots: sled::Tree,
}

impl StateMachine {
    pub(crate) fn new(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self {
            db: db.clone(),
            state: StateReader {
                tree: db.open_tree("state")?,
            },
            snapshots: db.open_tree("snapshot")?,
        })
    }

    /// A read handle for the application.
    pub fn reader(&self) -> StateReader {
        self.state.clone()
    }

    async fn flush(&self) -> SResult<()> {
        self.db
            .flush_async()
            .await
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        Ok(())
    }
}

fn sm_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        // openraft runs apply and build_snapshot on the same state-machine task, so this scan
        // sees one applied id together with exactly the state it produced.
        let mut kvs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for kv in self.state.tree.iter() {
            let (k, v) = kv.map_err(sm_err)?;
            kvs.push((k.to_vec(), v.to_vec()));
        }
        let find = |k: &[u8]| kvs.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
        let last_log_id: Option<LogId<NodeId>> = find(APPLIED)
            .map(|v| decode::<Option<LogId<NodeId>>>(&v))
            .transpose()
            .map_err(sm_err)?
            .flatten();
        let last_membership: StoredMembership<NodeId, openraft::BasicNode> = find(MEMBERSHIP)
            .map(|v| decode(&v))
            .transpose()
            .map_err(sm_err)?
            .unwrap_or_default();
        let data = encode(&kvs);
        let snapshot_id = match last_log_id {
            Some(l) => format!(
                "{}-{}-{}",
                l.leader_id,
                l.index,
                blake3::hash(&data).to_hex()
            ),
            None => format!("empty-{}", blake3::hash(&data).to_hex()),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.snapshots
            .insert(CURRENT, encode(&stored))
            .map_err(sm_err)?;
        self.flush().await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> SResult<(
        Option<LogId<NodeId>>,
        StoredMembership<NodeId, openraft::BasicNode>,
    )> {
        self.state
            .applied()
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<Response>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for entry in entries {
            let mut batch = sled::Batch::default();
            let resp = match entry.payload {
                EntryPayload::Blank => Response::None,
                EntryPayload::Normal(req) => state::apply(&self.state, req, &mut batch)
                    .map_err(|e| io_err(ErrorSubject::Apply(entry.log_id), ErrorVerb::Write, e))?,
                EntryPayload::Membership(m) => {
                    let sm = StoredMembership::new(Some(entry.log_id), m);
                    batch.insert(MEMBERSHIP, encode(&sm));
                    Response::None
                }
            };
            batch.insert(APPLIED, encode(&Some(entry.log_id)));
            self.state.tree.apply_batch(batch).map_err(sm_err)?;
            out.push(resp);
        }
        self.flush().await?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let data = snapshot.into_inner();
        let kvs: Vec<(Vec<u8>, Vec<u8>)> = decode(&data).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        let mut batch = sled::Batch::default();
        for k in self.state.tree.iter().keys() {
            batch.remove(k.map_err(sm_err)?);
        }
        for (k, v) in kvs {
            batch.insert(k, v);
        }
        // The snapshot's own marks win over whatever the data carried.
        batch.insert(APPLIED, encode(&meta.last_log_id));
        batch.insert(MEMBERSHIP, encode(&meta.last_membership));
        self.state.tree.apply_batch(batch).map_err(sm_err)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.snapshots
            .insert(CURRENT, encode(&stored))
            .map_err(sm_err)?;
        self.flush().await
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        let Some(v) = self.snapshots.get(CURRENT).map_err(sm_err)? else {
            return Ok(None);
        };
        let s: StoredSnapshot = decode(&v).map_err(sm_err)?;
        Ok(Some(Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::store::log::LogStore;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> SResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().expect("tempdir");
            let (log, sm) = crate::store::open(dir.path()).expect("open store");
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage conformance suite against the sled stores.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).expect("openraft storage suite");
    }
}
