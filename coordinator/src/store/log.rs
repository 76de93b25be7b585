//! The Raft log store: entries keyed by big-endian index in tree `log`; the vote, the last
//! purged log id and the committed log id in tree `raft`. `append` reports completion only
//! after sled has flushed (fsync) the entries.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, RaftLogReader, StorageError, Vote};

use super::{be, io_err};
use crate::types::{decode, encode, NodeId, TypeConfig};

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"purged";
const COMMITTED: &[u8] = b"committed";

/// The Raft log (cheap to clone: sled trees are shared handles).
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

type SResult<T> = Result<T, StorageError<NodeId>>;

impl LogStore {
    pub(crate) fn new(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self {
            db: db.clone(),
            log: db.open_tree("log")?,
            meta: db.open_tree("raft")?,
        })
    }

    async fn flush(&self, subject: ErrorSubject<NodeId>) -> SResult<()> {
        self.db
            .flush_async()
            .await
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    fn get_meta<T: for<'a> serde::Deserialize<'a>>(&self, key: &[u8]) -> SResult<Option<T>> {
        let v = self
            .meta
            .get(key)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        v.map(|b| decode(&b))
            .transpose()
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], v: &T) -> SResult<()> {
        self.meta
            .insert(key, encode(v))
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        Ok(())
    }

    fn last_entry_id(&self) -> SResult<Option<LogId<NodeId>>> {
        let last = self
            .log
            .last()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        match last {
            None => Ok(None),
            Some((_, v)) => {
                let e: Entry<TypeConfig> =
                    decode(&v).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Ok(Some(e.log_id))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => be(*i),
            Bound::Excluded(i) => be(i.saturating_add(1)),
            Bound::Unbounded => be(0),
        };
        let mut out = Vec::new();
        for kv in self.log.range(start..) {
            let (k, v) = kv.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().unwrap_or_default());
            if !range.contains(&idx) {
                break;
            }
            let entry = decode(&v).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        self.put_meta(VOTE, vote)?;
        self.flush(ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> SResult<()> {
        self.put_meta(COMMITTED, &committed)?;
        self.flush(ErrorSubject::Store).await
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<NodeId>>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&be(e.log_id.index), encode(&e));
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        let res = self.db.flush_async().await.map(|_| ());
        let report = res
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(report);
        res.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(be(log_id.index)..) {
            let (k, _) = k.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.flush(ErrorSubject::Logs).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        // Record the purge point first: a crash in between leaves extra entries, never a gap.
        self.put_meta(PURGED, &log_id)?;
        self.flush(ErrorSubject::Store).await?;
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=be(log_id.index)) {
            let (k, _) = k.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.flush(ErrorSubject::Logs).await
    }
}
