//! The durable content-addressed chunk store of one storage node.
//!
//! Blob bytes live in append-only segment files (`segments/NNNNNNNN.v3.seg`; formats in
//! [`segment`], where segments of earlier formats stay readable until compaction moves their
//! records); a fjall keyspace (a log-structured merge tree, in `index/`) holds only the
//! index (chunk id → segment, offset, length) and a few counters, and the index can be rebuilt
//! by scanning the segments. A read checks the record it finds there against the id asked for
//! and the blob against the hash in the record's header, so an index entry is only a pointer.
//! Small records are read through the page cache (with readahead); records of
//! [`DIRECT_READ_MIN`] bytes and more with `O_DIRECT`, into memory the blob shares.
//! Chunk ids are random keys, which an LSM tree inserts cheaply: 80,000 ids in groups of 32
//! cost sled's B-tree 1.7 CPU-s and fjall 0.2 CPU-s.
//!
//! One writer thread owns the active segment. It takes every request waiting in its bounded
//! queue as one group, appends them, fsyncs the segment once, writes the index entries and the
//! new frontier as one atomic index batch, and only then answers every request in the group
//! (group commit). While several put streams are open, a small group first waits up to
//! `GROUP_LINGER` for the others' puts, so that they share the write and the fsync. The segment
//! is the durable copy: the writer fsyncs the index's journal at most once a second after a
//! group (and on every delete, compaction and shutdown), not per group, which would double the
//! fsyncs of a write. It seals the index's memtables into sorted tables after
//! `INDEX_SEAL_ENTRIES` writes and when idle, so the journal stays short and the index takes its
//! compact form on disk. On open, every record past the last frontier the index made durable is
//! re-verified and indexed, so an acknowledged chunk whose index entry was not yet durable is
//! found again; a record whose blob fails its checksum is skipped, and a torn header (a write
//! never acknowledged) and everything after it is cut.
//!
//! In front of the index sits an in-memory Bloom filter of every indexed id ([`Presence`]): a
//! chunk it has never seen is answered "absent" without an index lookup, which is what almost
//! every dedup check of new data is. It only ever holds more ids than the index (ids are added
//! before their entries, deletes leave them), so a "maybe" is confirmed in the index; it is
//! rebuilt from the index on open and whenever the ids added outgrow the size it was built for.

pub mod appender;
pub mod segment;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_proto::ChunkId;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use appender::Appender;
use bloomfilter::Bloom;
use fjall::{Batch, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use segment::{Format, Scanned};

/// A segment is closed and a new one started beyond this size.
pub const SEGMENT_MAX: u64 = 256 * 1024 * 1024;
/// At most this many bytes go into one group commit.
const GROUP_MAX_BYTES: usize = 64 * 1024 * 1024;
/// A group of less than this waits up to [`GROUP_LINGER`] for the puts of other open streams,
/// so that they share one write and one `fsync`: in a first backup of the benchmark's data,
/// each storage node made about 30% fewer `fdatasync` calls (1,045 to 738 on one node). A lone
/// stream's puts are written at once.
const GROUP_FILL: usize = 8 * 1024 * 1024;
/// How long a group waits for other streams' puts at most, from its first.
const GROUP_LINGER: Duration = Duration::from_millis(2);
/// The writer fsyncs the index journal at most this often after group commits. Records past the
/// durable frontier are re-verified on open, so this bounds that work to about this much writing.
const INDEX_PERSIST: Duration = Duration::from_secs(1);
/// Queue depth of the writer.
const WRITER_QUEUE: usize = 64;
/// Once this many index entries were written since the index's memtables were last sealed,
/// the writer seals them ([`Shared::seal_index`]).
const INDEX_SEAL_ENTRIES: u64 = 32 * 1024;
/// After this long without a request, the writer seals the index's memtables if anything was
/// written to them since they were last sealed.
const INDEX_SEAL_IDLE: Duration = Duration::from_secs(3);
/// The presence filter is sized for at least this many ids (unless [`ChunkStore::open_with`]
/// says otherwise), and for twice the ids indexed.
pub const PRESENCE_MIN: u64 = 1 << 20;
/// False-positive rate of the presence filter at its sized capacity (about 10 bits per id).
const PRESENCE_FP: f64 = 0.01;
/// Records with blobs of at least this many bytes are read with `O_DIRECT`.
const DIRECT_READ_MIN: u32 = 128 * 1024;
/// Most segments kept open for reads (two descriptors each), well inside the common limit of
/// 1,024 open files: a node of many terabytes has thousands of segments.
const OPEN_SEGMENTS: usize = 128;

/// Chunk store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Disk I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The index failed.
    #[error("index: {0}")]
    Index(#[from] fjall::Error),
    /// The stored copy does not match its checksum; it has been quarantined.
    #[error("chunk {0} is corrupt on this node (quarantined)")]
    Corrupt(ChunkId),
    /// The chunk is not here.
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
    /// The store is shutting down.
    #[error("chunk store is closed")]
    Closed,
}

/// One chunk read by [`ChunkStore::get_batch`]: its id and its blob and blob hash, or why not.
pub type Read = (ChunkId, Result<(Bytes, [u8; 32]), StoreError>);

/// Where a chunk's record is. The blob's hash is not repeated here: it is in the record's
/// header, which every read checks against the id asked for.
///
/// An entry is stored compactly: the tag byte [`Location::COMPACT`], then segment, offset and
/// length as varints (8 bytes or so, where the fixed form takes 16). Entries of exactly 16 bytes
/// are the fixed form (`segment u32 | offset u64 | len u32`, big-endian), which is also written
/// in the rare case where the compact form would be 16 bytes long, and entries of 48 bytes are
/// the fixed form followed by the blob's hash, as earlier versions wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Segment number.
    pub segment: u32,
    /// Record offset.
    pub offset: u64,
    /// Blob length.
    pub len: u32,
}

impl Location {
    /// First byte of the compact form.
    const COMPACT: u8 = 1;

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16);
        b.push(Self::COMPACT);
        prost::encoding::encode_varint(u64::from(self.segment), &mut b);
        prost::encoding::encode_varint(self.offset, &mut b);
        prost::encoding::encode_varint(u64::from(self.len), &mut b);
        if b.len() == 16 {
            b.clear();
            b.extend_from_slice(&self.segment.to_be_bytes());
            b.extend_from_slice(&self.offset.to_be_bytes());
            b.extend_from_slice(&self.len.to_be_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() == 16 || b.len() == 48 {
            return Some(Self {
                segment: u32::from_be_bytes(b[..4].try_into().ok()?),
                offset: u64::from_be_bytes(b[4..12].try_into().ok()?),
                len: u32::from_be_bytes(b[12..16].try_into().ok()?),
            });
        }
        let (&tag, mut rest) = b.split_first()?;
        if tag != Self::COMPACT {
            return None;
        }
        let mut next = || prost::encoding::decode_varint(&mut rest).ok();
        let (segment, offset, len) = (next()?, next()?, next()?);
        if !rest.is_empty() {
            return None;
        }
        Some(Self {
            segment: segment.try_into().ok()?,
            offset,
            len: len.try_into().ok()?,
        })
    }
}

/// A blob to store.
#[derive(Debug, Clone)]
pub struct PutItem {
    /// Chunk id.
    pub id: ChunkId,
    /// blake3(blob), already verified by the caller.
    pub hash: [u8; 32],
    /// The blob.
    pub blob: Bytes,
}

/// Counters of the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Chunks indexed.
    pub chunks: u64,
    /// Bytes of live records.
    pub bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Corrupt copies found since the store was created.
    pub corrupt_found: u64,
    /// Group commits (one segment write and one `fsync` each) since the store was opened.
    pub group_commits: u64,
}

/// Result of a compaction.
#[derive(Debug, Clone, Copy, Default)]
pub struct CompactStats {
    /// Segments rewritten and removed.
    pub segments_removed: u64,
    /// Bytes reclaimed.
    pub bytes_reclaimed: u64,
}

enum Msg {
    Put(Vec<PutItem>, oneshot::Sender<Result<Vec<bool>, StoreError>>),
    Delete(Vec<ChunkId>, oneshot::Sender<Result<u64, StoreError>>),
    Compact(f64, oneshot::Sender<Result<CompactStats, StoreError>>),
    Shutdown(oneshot::Sender<()>),
}

struct Shared {
    dir: PathBuf,
    db: Keyspace,
    index: PartitionHandle,
    meta: PartitionHandle,
    files: RwLock<HashMap<u32, Arc<SegFile>>>,
    live_bytes: AtomicU64,
    /// Put streams open ([`ChunkStore::put_stream`]): more puts may come from each.
    open_streams: AtomicUsize,
    /// How long a group waits for other open streams' puts at most, in microseconds
    /// ([`GROUP_LINGER`]; tests set it).
    linger_us: AtomicU64,
    /// Group commits written since the store was opened ([`Stats::group_commits`]).
    group_commits: AtomicU64,
    /// Entries in the index, kept here: the index counts them by walking all of them.
    live_chunks: AtomicU64,
    corrupt_found: AtomicU64,
    presence: RwLock<Presence>,
    presence_min: u64,
    /// Segments in an earlier format than [`Format::CURRENT`], as found on open; every segment
    /// written since is in the current one. Segment numbers are never reused, so a compacted one
    /// may stay here.
    legacy: HashMap<u32, Format>,
}

/// A segment file open for reading: through the page cache, and past it where the file system
/// allows (`O_DIRECT`, for records of [`DIRECT_READ_MIN`] bytes and more).
struct SegFile {
    cached: File,
    direct: Option<File>,
}

/// A Bloom filter over the ids in the index, sized for `capacity` ids; only the writer thread
/// adds to it (see the module docs).
struct Presence {
    bloom: Bloom<[u8; 32]>,
    capacity: u64,
    /// Ids set in the filter, those it was built from included: past `capacity`, its false
    /// positives exceed [`PRESENCE_FP`] and it is rebuilt.
    added: u64,
}

impl Presence {
    fn with_capacity(ids: u64, min: u64) -> Self {
        let capacity = ids.saturating_mul(2).max(min).max(1);
        let items = usize::try_from(capacity).unwrap_or(usize::MAX);
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut seed);
        Self {
            bloom: Bloom::new_for_fp_rate_with_seed(items, PRESENCE_FP, &seed)
                .expect("a positive capacity and a rate in (0, 1)"),
            capacity,
            added: 0,
        }
    }

    fn add(&mut self, id: &ChunkId) {
        self.bloom.set(&id.0);
        self.added += 1;
    }

    fn may_hold(&self, id: &ChunkId) -> bool {
        self.bloom.check(&id.0)
    }

    fn full(&self) -> bool {
        self.added > self.capacity
    }
}

/// Handle to the chunk store (cheap to clone).
#[derive(Clone)]
pub struct ChunkStore {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Msg>,
    writer: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

/// A put stream counted as open ([`ChunkStore::put_stream`]).
pub struct OpenStream(Arc<Shared>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// blake3 over ids in the given (sorted) order.
pub fn digest(ids: &[ChunkId]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for id in ids {
        h.update(&id.0);
    }
    *h.finalize().as_bytes()
}

const FRONTIER: &[u8] = b"frontier";
const CORRUPT: &[u8] = b"corrupt_found";
const DEAD: &[u8] = b"dead/";

fn seg_path(dir: &Path, n: u32, format: Format) -> PathBuf {
    dir.join("segments").join(format.file_name(n))
}

fn dead_key(seg: u32) -> Vec<u8> {
    let mut k = DEAD.to_vec();
    k.extend_from_slice(&seg.to_be_bytes());
    k
}

fn fsync_dir(p: &Path) -> io::Result<()> {
    File::open(p)?.sync_all()
}

/// The segments in `dir`, in order, with their formats.
fn list_segments(dir: &Path) -> io::Result<Vec<(u32, Format)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir.join("segments"))? {
        let name = e?.file_name();
        if let Some(s) = Format::parse_file_name(&name.to_string_lossy()) {
            v.push(s);
        }
    }
    v.sort_unstable_by_key(|&(n, _)| n);
    if let Some(w) = v.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("segment {} exists in two formats", w[0].0),
        ));
    }
    Ok(v)
}

impl ChunkStore {
    /// Opens (or creates) the store in `dir`, recovering from an unclean stop.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, PRESENCE_MIN)
    }

    /// [`ChunkStore::open`] with the presence filter sized for at least `presence_min` ids
    /// (tests use a small one to exercise its rebuilds).
    pub fn open_with(dir: &Path, presence_min: u64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir.join("segments"))?;
        let segs = list_segments(dir)?;
        let legacy = segs
            .iter()
            .filter(|&&(_, f)| f != Format::CURRENT)
            .copied()
            .collect();
        // One flush and one compaction worker: the index is small next to the segments, and
        // the node's cores are for the data path.
        let db = fjall::Config::new(dir.join("index"))
            .flush_workers(1)
            .compaction_workers(1)
            .open()?;
        let index = db.open_partition("index", PartitionCreateOptions::default())?;
        let meta = db.open_partition("meta", PartitionCreateOptions::default())?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            db,
            index,
            meta,
            files: RwLock::new(HashMap::new()),
            live_bytes: AtomicU64::new(0),
            open_streams: AtomicUsize::new(0),
            linger_us: AtomicU64::new(GROUP_LINGER.as_micros() as u64),
            group_commits: AtomicU64::new(0),
            live_chunks: AtomicU64::new(0),
            corrupt_found: AtomicU64::new(0),
            presence: RwLock::new(Presence::with_capacity(0, presence_min)),
            presence_min,
            legacy,
        });
        let active = shared.recover(segs.into_iter().map(|(n, _)| n).collect())?;
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("chunk-writer".into())
            .spawn(move || match Writer::new(s, active) {
                Ok(w) => w.run(rx),
                Err(e) => tracing::error!(error = %e, "chunk writer could not start"),
            })?;
        Ok(Self {
            shared,
            tx,
            writer: Arc::new(std::sync::Mutex::new(Some(writer))),
        })
    }

    /// Counts a put stream as open until the returned guard is dropped: while other streams are
    /// open, a group commit waits a little for their puts ([`GROUP_LINGER`]).
    pub fn put_stream(&self) -> OpenStream {
        self.shared.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.shared.clone())
    }

    #[cfg(test)]
    fn set_group_linger(&self, linger: Duration) {
        let us = linger.as_micros() as u64;
        self.shared.linger_us.store(us, Ordering::Relaxed);
    }

    /// Stores blobs durably; returns, per item, whether the chunk was already present.
    pub async fn put(&self, items: Vec<PutItem>) -> Result<Vec<bool>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Put(items, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Removes chunks from the index (space is reclaimed by [`ChunkStore::compact`]).
    pub async fn delete(&self, ids: Vec<ChunkId>) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Delete(ids, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Rewrites closed segments whose dead fraction is at least `min_dead` (0..1).
    pub async fn compact(&self, min_dead: f64) -> Result<CompactStats, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Compact(min_dead, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Whether each id is present.
    pub fn has(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        ids.iter()
            .map(|id| Ok(self.shared.may_hold(id) && self.shared.index.contains_key(id.0)?))
            .collect()
    }

    /// Where a chunk is stored.
    pub fn location(&self, id: &ChunkId) -> Result<Option<Location>, StoreError> {
        Ok(self
            .shared
            .index
            .get(id.0)?
            .and_then(|v| Location::decode(&v)))
    }

    /// Reads and verifies a blob. A copy that fails verification is quarantined (dropped from
    /// the index, counted) and reported as [`StoreError::Corrupt`]; bad bytes are never returned.
    pub async fn get(&self, id: ChunkId) -> Result<(Bytes, [u8; 32]), StoreError> {
        let mut read = self.get_batch(&[id], 0).await?;
        read.pop().map_or(Err(StoreError::NotFound(id)), |(_, r)| r)
    }

    /// Reads chunks from the front of `ids` on one blocking thread, stopping once `max_bytes`
    /// have been read (at least one chunk is read), and returns one result per chunk read, in
    /// order. Corrupt copies are quarantined as by [`ChunkStore::get`]. A stream of reads pays
    /// one thread hand-off per batch instead of one per chunk.
    pub async fn get_batch(
        &self,
        ids: &[ChunkId],
        max_bytes: usize,
    ) -> Result<Vec<Read>, StoreError> {
        let shared = self.shared.clone();
        let ids = ids.to_vec();
        let res = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut bytes = 0;
            for id in ids {
                let r = shared.read(&id);
                if let Ok((blob, _)) = &r {
                    bytes += blob.len();
                }
                out.push((id, r));
                if bytes >= max_bytes {
                    break;
                }
            }
            out
        })
        .await
        .map_err(|_| StoreError::Closed)?;
        for (_, r) in &res {
            if let Err(StoreError::Corrupt(id)) = r {
                self.quarantine(*id).await?;
            }
        }
        Ok(res)
    }

    /// Counts a copy that failed its checksum and deletes it, so that repair can replace it.
    async fn quarantine(&self, id: ChunkId) -> Result<(), StoreError> {
        warn!(chunk = %id, "corrupt copy found on read; quarantined");
        let n = self.shared.corrupt_found.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.shared.meta.insert(CORRUPT, n.to_be_bytes());
        self.delete(vec![id]).await.map(|_| ())
    }

    /// Ids held in partitions `[start, end)`, in id order (a range scan: ids sort by partition).
    pub fn list(&self, start: u32, end: u32) -> Result<Vec<ChunkId>, StoreError> {
        let key = |p: u32| -> Vec<u8> {
            let top = (p << (16 - cairn_proto::PARTITION_BITS)) as u16;
            top.to_be_bytes().to_vec()
        };
        let upper = if end >= cairn_proto::PARTITIONS {
            Bound::Unbounded
        } else {
            Bound::Excluded(key(end))
        };
        let iter = self
            .shared
            .index
            .range((Bound::Included(key(start)), upper));
        let mut out = Vec::new();
        for kv in iter {
            let (k, _) = kv?;
            let id = ChunkId::from_slice(&k).map_err(|e| io::Error::other(e.to_string()))?;
            out.push(id);
        }
        Ok(out)
    }

    /// blake3 over the sorted ids held in one partition, and their count.
    pub fn partition_digest(&self, partition: u32) -> Result<([u8; 32], u64), StoreError> {
        let ids = self.list(partition, partition + 1)?;
        Ok((digest(&ids), ids.len() as u64))
    }

    /// A partition of the store's index keyspace for other persisted state of the node (the
    /// repair queue). Its writes become durable with the next [`ChunkStore::flush`].
    pub fn open_tree(&self, name: &str) -> Result<PartitionHandle, StoreError> {
        Ok(self
            .shared
            .db
            .open_partition(name, PartitionCreateOptions::default())?)
    }

    /// A batch of writes to partitions of the index keyspace, applied atomically on commit.
    pub fn batch(&self) -> Batch {
        self.shared.db.batch()
    }

    /// Makes every index write so far durable (fsync of its journal).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.persist())
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        Stats {
            chunks: self.shared.live_chunks.load(Ordering::Relaxed),
            bytes: self.shared.live_bytes.load(Ordering::Relaxed),
            segments: list_segments(&self.shared.dir)
                .map(|v| v.len() as u64)
                .unwrap_or(0),
            corrupt_found: self.shared.corrupt_found.load(Ordering::Relaxed),
            group_commits: self.shared.group_commits.load(Ordering::Relaxed),
        }
    }

    /// Stops the writer after the requests queued before this call, then flushes the index.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.writer.lock().expect("writer lock").take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        let _ = self.flush().await;
    }
}

impl Shared {
    fn persist(&self) -> Result<(), StoreError> {
        Ok(self.db.persist(PersistMode::SyncAll)?)
    }

    /// Seals the memtable of every partition of the index keyspace. fjall's flush worker writes
    /// each into a sorted table (about 49 bytes an entry against 58 in the journal, and nothing
    /// to replay on open) and deletes a journal once every partition written in it is flushed.
    /// Sealing only the partition that grew is not enough: the frontier written with every
    /// group keeps the small `meta` partition in every journal, which would keep them all.
    /// `rotate_memtable` is the call fjall's own monitor makes once the journals pass half of
    /// their limit (512 MiB by default, and never below 24 MiB: far more than the index of a
    /// node takes); fjall is pinned to one version in the workspace.
    fn seal_index(&self) -> Result<(), StoreError> {
        for name in self.db.list_partitions() {
            self.db
                .open_partition(&name, PartitionCreateOptions::default())?
                .rotate_memtable()?;
        }
        Ok(())
    }

    /// The record format of segment `seg`.
    fn format(&self, seg: u32) -> Format {
        self.legacy.get(&seg).copied().unwrap_or(Format::CURRENT)
    }

    /// Bytes the record at `loc` takes in its segment.
    fn record_len(&self, loc: &Location) -> u64 {
        self.format(loc.segment).record_len(loc.len)
    }

    fn seg_path(&self, seg: u32) -> PathBuf {
        seg_path(&self.dir, seg, self.format(seg))
    }

    fn file(&self, seg: u32) -> io::Result<Arc<SegFile>> {
        if let Some(f) = self.files.read().expect("files lock").get(&seg) {
            return Ok(f.clone());
        }
        // Small records are read through the page cache with the kernel's readahead left on. A
        // node serves only the chunks asked of it, so some of what readahead brings in is
        // another replica's to serve; but small records are read many to a disk request instead
        // of one each, and a restore from a cold cache (segments are written past it) took about
        // 15% less of the nodes' CPU than with `POSIX_FADV_RANDOM`. Large records are read with
        // `O_DIRECT` into memory the reply shares: through the page cache, copying them out of
        // it was about 40% of a node's CPU in a restore.
        let path = self.seg_path(seg);
        let f = Arc::new(SegFile {
            cached: File::open(&path)?,
            direct: appender::open_direct_reader(&path)?,
        });
        let mut files = self.files.write().expect("files lock");
        if files.len() >= OPEN_SEGMENTS {
            // Any one: a read still using it keeps its own handle.
            if let Some(&old) = files.keys().next() {
                files.remove(&old);
            }
        }
        files.insert(seg, f.clone());
        Ok(f)
    }

    fn read(&self, id: &ChunkId) -> Result<(Bytes, [u8; 32]), StoreError> {
        let loc = self
            .index
            .get(id.0)?
            .and_then(|v| Location::decode(&v))
            .ok_or(StoreError::NotFound(*id))?;
        let f = self.file(loc.segment)?;
        let at = segment::RecordAt {
            format: self.format(loc.segment),
            offset: loc.offset,
            len: loc.len,
            id,
        };
        let read = match &f.direct {
            Some(d) if loc.len >= DIRECT_READ_MIN => match at.read_direct(d) {
                // Refused after all (a file system that accepts the flag but not the read).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => at.read(&f.cached),
                r => r,
            },
            _ => at.read(&f.cached),
        };
        match read {
            Ok(r) => Ok(r),
            Err(e)
                if e.kind() == io::ErrorKind::InvalidData
                    || e.kind() == io::ErrorKind::UnexpectedEof =>
            {
                Err(StoreError::Corrupt(*id))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// False when the index certainly does not hold `id`.
    fn may_hold(&self, id: &ChunkId) -> bool {
        self.presence.read().expect("presence lock").may_hold(id)
    }

    /// Builds the presence filter anew from the index, sized for twice the ids it holds.
    fn rebuild_presence(&self) -> Result<(), StoreError> {
        let mut p =
            Presence::with_capacity(self.live_chunks.load(Ordering::Relaxed), self.presence_min);
        for k in self.index.keys() {
            if let Ok(id) = ChunkId::from_slice(&k?) {
                p.add(&id);
            }
        }
        *self.presence.write().expect("presence lock") = p;
        Ok(())
    }

    /// Bytes of records in segment `seg` that the index no longer points to.
    fn dead_bytes(&self, seg: u32) -> Result<u64, StoreError> {
        Ok(self
            .meta
            .get(dead_key(seg))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    fn frontier(&self) -> Result<Option<(u32, u64)>, StoreError> {
        Ok(self.meta.get(FRONTIER)?.and_then(|v| {
            let seg = u32::from_be_bytes(v.get(..4)?.try_into().ok()?);
            let off = u64::from_be_bytes(v.get(4..12)?.try_into().ok()?);
            Some((seg, off))
        }))
    }

    /// Re-verifies everything past the durable frontier (all segments if the index is gone),
    /// indexes the sound records and cuts a torn tail. Records there may have been acknowledged
    /// (the segment was fsynced, the index not yet flushed): each is indexed again; only a
    /// header that cannot be read, which a torn unacknowledged append leaves, ends the scan and
    /// is cut. When rebuilding a lost index nothing is cut. Returns the active segment and its end.
    /// `segs` are the segment numbers on disk, in order.
    fn recover(&self, segs: Vec<u32>) -> Result<(u32, u64), StoreError> {
        if let Some(v) = self.meta.get(CORRUPT)? {
            let n = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
            self.corrupt_found.store(n, Ordering::Relaxed);
        }
        let frontier = self.frontier()?;
        if frontier.is_none() && !segs.is_empty() {
            info!(
                segments = segs.len(),
                "index missing: rebuilding it from the segments"
            );
        }
        let (start_seg, start_off) = frontier.unwrap_or((segs.first().copied().unwrap_or(0), 0));
        let mut active = (start_seg, start_off);
        let mut idx = self.db.batch();
        for &seg in segs.iter().filter(|&&s| s >= start_seg) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.seg_path(seg))?;
            let from = if seg == start_seg { start_off } else { 0 };
            let mut found = 0u64;
            let end = segment::scan(&file, self.format(seg), from, |r| match r {
                Scanned::Record { offset, header } => {
                    let loc = Location {
                        segment: seg,
                        offset,
                        len: header.len,
                    };
                    idx.insert(&self.index, header.id.0, loc.encode());
                    found += 1;
                }
                Scanned::Corrupt { offset, header } => {
                    warn!(segment = seg, offset, chunk = %header.id, "corrupt record skipped during recovery");
                }
                Scanned::End { .. } => {}
            })?;
            let Scanned::End { offset, clean } = end else {
                continue;
            };
            if !clean {
                if frontier.is_some() {
                    warn!(segment = seg, offset, "torn or invalid tail cut");
                    file.set_len(offset)?;
                    file.sync_all()?;
                } else {
                    warn!(
                        segment = seg,
                        offset, "unreadable record: rest of segment not indexed"
                    );
                }
            }
            if found > 0 {
                info!(
                    segment = seg,
                    records = found,
                    "indexed records past the frontier"
                );
            }
            active = (seg, offset);
        }
        idx.insert(&self.meta, FRONTIER, frontier_bytes(active));
        idx.commit()?;
        self.persist()?;
        // One pass counts the index and fills the presence filter at its smallest size; only a
        // store holding more ids than that size is read again for a filter sized to it.
        let (mut live, mut chunks) = (0u64, 0u64);
        let mut presence = Presence::with_capacity(0, self.presence_min);
        for entry in self.index.iter() {
            let (k, v) = entry?;
            if let Ok(id) = ChunkId::from_slice(&k) {
                presence.add(&id);
            }
            if let Some(l) = Location::decode(&v) {
                live += self.record_len(&l);
                chunks += 1;
            }
        }
        self.live_bytes.store(live, Ordering::Relaxed);
        self.live_chunks.store(chunks, Ordering::Relaxed);
        let outgrown = presence.full();
        *self.presence.write().expect("presence lock") = presence;
        if outgrown {
            self.rebuild_presence()?;
        }
        Ok(active)
    }
}

fn frontier_bytes((seg, off): (u32, u64)) -> [u8; 12] {
    let mut f = [0u8; 12];
    f[..4].copy_from_slice(&seg.to_be_bytes());
    f[4..].copy_from_slice(&off.to_be_bytes());
    f
}

/// The writer thread's state: the active segment.
struct Writer {
    shared: Arc<Shared>,
    seg: u32,
    out: Appender,
    /// When the index journal was last made durable by this writer.
    persisted: Instant,
    /// Index entries written since the index's memtables were last sealed.
    unsealed: u64,
}

impl Writer {
    fn new(shared: Arc<Shared>, (mut seg, mut end): (u32, u64)) -> io::Result<Self> {
        if shared.format(seg) != Format::CURRENT {
            // Appends go to a segment of the current format only: start the next one.
            (seg, end) = (seg + 1, 0);
        }
        let out = Appender::open(&seg_path(&shared.dir, seg, Format::CURRENT), end)?;
        fsync_dir(&shared.dir.join("segments"))?;
        info!(
            direct = out.is_direct(),
            segment = seg,
            "chunk writer started"
        );
        Ok(Self {
            shared,
            seg,
            out,
            persisted: Instant::now(),
            unsealed: 0,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        // Only to wait for the next request with a time limit (a timer needs a runtime).
        let timer = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => Some(rt),
            Err(e) => {
                warn!(error = %e, "no timer for the chunk writer; the index is sealed by size only");
                None
            }
        };
        loop {
            let first = match &timer {
                Some(rt) if self.unsealed > 0 => {
                    let next = async { tokio::time::timeout(INDEX_SEAL_IDLE, rx.recv()).await };
                    match rt.block_on(next) {
                        Ok(m) => m,
                        Err(_) => {
                            self.seal_index();
                            continue;
                        }
                    }
                }
                _ => rx.blocking_recv(),
            };
            let Some(first) = first else { return };
            let mut puts = Vec::new();
            let mut bytes = 0usize;
            let linger = tokio::time::Instant::now()
                + Duration::from_micros(self.shared.linger_us.load(Ordering::Relaxed));
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Put(items, reply) => {
                        bytes += items.iter().map(|i| i.blob.len()).sum::<usize>();
                        puts.push((items, reply));
                        if bytes < GROUP_MAX_BYTES {
                            next = rx.try_recv().ok();
                        }
                        // Nothing queued: wait a little for the puts of other open streams.
                        let streams = &self.shared.open_streams;
                        match &timer {
                            Some(rt)
                                if next.is_none()
                                    && bytes < GROUP_FILL
                                    && streams.load(Ordering::Relaxed) > puts.len() =>
                            {
                                // Made inside the runtime, as a timer must be.
                                let more =
                                    async { tokio::time::timeout_at(linger, rx.recv()).await };
                                next = rt.block_on(more).ok().flatten();
                            }
                            _ => {}
                        }
                    }
                    Msg::Delete(ids, reply) => {
                        self.flush_puts(&mut puts);
                        let _ = reply.send(self.delete(&ids));
                    }
                    Msg::Compact(min_dead, reply) => {
                        self.flush_puts(&mut puts);
                        let _ = reply.send(self.compact(min_dead));
                    }
                    Msg::Shutdown(reply) => {
                        self.flush_puts(&mut puts);
                        if let Err(e) = self.out.finish() {
                            warn!(error = %e, "closing the active segment");
                        }
                        let _ = self.shared.persist();
                        let _ = reply.send(());
                        return;
                    }
                }
            }
            self.flush_puts(&mut puts);
        }
    }

    /// Writes one group: append all, one fsync, one index batch, then answer all.
    fn flush_puts(&mut self, puts: &mut Vec<PutItemsReply>) {
        if puts.is_empty() {
            return;
        }
        let group = std::mem::take(puts);
        let items: Vec<&[PutItem]> = group.iter().map(|(i, _)| i.as_slice()).collect();
        match self.write_group(&items, false) {
            Ok(mut existed) => {
                for (items, reply) in group {
                    let rest = existed.split_off(items.len());
                    let _ = reply.send(Ok(existed));
                    existed = rest;
                }
                // After the replies: the segment is the durable copy, this only bounds how
                // much recovery re-verifies.
                if self.persisted.elapsed() >= INDEX_PERSIST {
                    if let Err(e) = self.shared.persist() {
                        warn!(error = %e, "index journal sync failed");
                    }
                    self.persisted = Instant::now();
                }
                if self.unsealed >= INDEX_SEAL_ENTRIES {
                    self.seal_index();
                }
            }
            Err(e) => {
                warn!(error = %e, "group commit failed");
                let msg = e.to_string();
                for (_, reply) in group {
                    let _ = reply.send(Err(StoreError::Io(io::Error::other(msg.clone()))));
                }
            }
        }
    }

    /// Seals the index's memtables ([`Shared::seal_index`]); a failure only leaves the entries
    /// in the journal, where they are as durable.
    fn seal_index(&mut self) {
        if let Err(e) = self.shared.seal_index() {
            warn!(error = %e, "sealing the index memtables failed");
        }
        self.unsealed = 0;
    }

    fn roll(&mut self) -> io::Result<()> {
        self.out.finish()?;
        self.seg += 1;
        self.out = Appender::open(&seg_path(&self.shared.dir, self.seg, Format::CURRENT), 0)?;
        fsync_dir(&self.shared.dir.join("segments"))?;
        Ok(())
    }

    fn write_group(&mut self, groups: &[&[PutItem]], force: bool) -> Result<Vec<bool>, StoreError> {
        let mut existed = Vec::new();
        let mut seen = HashSet::new();
        let mut idx = self.shared.db.batch();
        let mut added = 0u64;
        let mut new_chunks = 0u64;
        let mut new_ids = Vec::new();
        let mut entries = 0u64;
        for item in groups.iter().flat_map(|g| g.iter()) {
            let held = !force
                && self.shared.may_hold(&item.id)
                && self.shared.index.contains_key(item.id.0)?;
            if !seen.insert(item.id) || held {
                existed.push(true);
                continue;
            }
            existed.push(false);
            if self.out.end() >= SEGMENT_MAX {
                self.roll()?;
            }
            let loc = Location {
                segment: self.seg,
                offset: self.out.end(),
                len: item.blob.len() as u32,
            };
            let header = segment::encode_header(Format::CURRENT, &item.id, &item.hash, loc.len);
            self.out.append(&header)?;
            self.out.append(&item.blob)?;
            added += Format::CURRENT.record_len(loc.len);
            // A forced write moves a chunk the index holds already (compaction).
            new_chunks += u64::from(!force);
            idx.insert(&self.shared.index, item.id.0, loc.encode());
            entries += 1;
            if !force {
                new_ids.push(item.id);
            }
        }
        let mut rebuild = false;
        if added > 0 {
            self.out.commit()?;
            self.shared.group_commits.fetch_add(1, Ordering::Relaxed);
            {
                // Before the index entries: the filter never misses an id the index holds.
                let mut presence = self.shared.presence.write().expect("presence lock");
                new_ids.iter().for_each(|id| presence.add(id));
                rebuild = presence.full();
            }
            idx.insert(
                &self.shared.meta,
                FRONTIER,
                frontier_bytes((self.seg, self.out.end())),
            );
            idx.commit()?;
            self.unsealed += entries;
            self.shared.live_bytes.fetch_add(added, Ordering::Relaxed);
            self.shared
                .live_chunks
                .fetch_add(new_chunks, Ordering::Relaxed);
        }
        if rebuild {
            self.shared.rebuild_presence()?;
        }
        Ok(existed)
    }

    /// Drops `ids` from the index and counts their records as dead bytes of their segments, in
    /// one atomic index batch, then makes it durable.
    fn delete(&mut self, ids: &[ChunkId]) -> Result<u64, StoreError> {
        let mut batch = self.shared.db.batch();
        let mut dead: BTreeMap<u32, u64> = BTreeMap::new();
        let mut seen = HashSet::new();
        let (mut removed, mut bytes) = (0u64, 0u64);
        for id in ids {
            if !seen.insert(*id) {
                continue;
            }
            let Some(v) = self.shared.index.get(id.0)? else {
                continue;
            };
            batch.remove(&self.shared.index, id.0);
            if let Some(loc) = Location::decode(&v) {
                let len = self.shared.record_len(&loc);
                *dead.entry(loc.segment).or_default() += len;
                bytes += len;
                removed += 1;
            }
        }
        for (seg, d) in dead {
            let total = self.shared.dead_bytes(seg)? + d;
            batch.insert(&self.shared.meta, dead_key(seg), total.to_be_bytes());
        }
        batch.commit()?;
        self.unsealed += removed;
        self.shared.live_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.shared
            .live_chunks
            .fetch_sub(removed, Ordering::Relaxed);
        self.shared.persist()?;
        Ok(removed)
    }

    /// Copies the live records of mostly-dead closed segments into the active one, makes that
    /// durable and re-points the index, and only then removes the old segment files.
    fn compact(&mut self, min_dead: f64) -> Result<CompactStats, StoreError> {
        let mut stats = CompactStats::default();
        for (seg, format) in list_segments(&self.shared.dir)? {
            if seg == self.seg {
                continue;
            }
            let path = seg_path(&self.shared.dir, seg, format);
            let size = std::fs::metadata(&path)?.len();
            let dead = self.shared.dead_bytes(seg)?;
            if size > 0 && (dead as f64 / size as f64) < min_dead {
                continue;
            }
            let file = File::open(&path)?;
            let mut live = Vec::new();
            segment::scan(&file, format, 0, |r| {
                if let Scanned::Record { offset, header } = r {
                    live.push((offset, header));
                }
            })?;
            let mut moved = Vec::new();
            for (offset, h) in live {
                let still = self
                    .shared
                    .index
                    .get(h.id.0)?
                    .and_then(|v| Location::decode(&v))
                    .is_some_and(|l| l.segment == seg && l.offset == offset);
                if still {
                    let (blob, hash) = segment::RecordAt {
                        format,
                        offset,
                        len: h.len,
                        id: &h.id,
                    }
                    .read(&file)?;
                    moved.push(PutItem {
                        id: h.id,
                        hash,
                        blob,
                    });
                }
            }
            // Re-append live records; the index entry moves to the new place atomically with
            // the flush, so a crash leaves either the old or the new location, both intact.
            // The records leave this segment's format for the current one.
            let moved_bytes: u64 = moved
                .iter()
                .map(|m| format.record_len(m.blob.len() as u32))
                .sum();
            if !moved.is_empty() {
                self.write_group(&[&moved], true)?;
                self.shared
                    .live_bytes
                    .fetch_sub(moved_bytes, Ordering::Relaxed);
            }
            self.shared.meta.remove(dead_key(seg))?;
            self.shared.persist()?;
            self.shared.files.write().expect("files lock").remove(&seg);
            std::fs::remove_file(&path)?;
            fsync_dir(&self.shared.dir.join("segments"))?;
            stats.segments_removed += 1;
            stats.bytes_reclaimed += size.saturating_sub(moved_bytes);
        }
        Ok(stats)
    }
}

type PutItemsReply = (Vec<PutItem>, oneshot::Sender<Result<Vec<bool>, StoreError>>);

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Poll;

    #[tokio::test]
    async fn reads_keep_at_most_open_segments_files_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("segments")).unwrap();
        // One record per segment, in more segments than may be open at once; the store
        // indexes them on open, as segments past its frontier.
        let count = OPEN_SEGMENTS as u32 + 40;
        let mut chunks = Vec::new();
        for n in 0..count {
            let blob = vec![n as u8; 1000 + n as usize];
            let id = ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes());
            let hash = cairn_proto::blob_hash(&blob);
            let header = segment::encode_header(Format::CURRENT, &id, &hash, blob.len() as u32);
            let seg = [&header[..], &blob].concat();
            std::fs::write(seg_path(dir.path(), n, Format::CURRENT), seg).unwrap();
            chunks.push((id, blob));
        }
        let s = ChunkStore::open(dir.path()).unwrap();
        // Twice over, so that segments closed to make room are opened again.
        for _ in 0..2 {
            for (id, blob) in &chunks {
                assert_eq!(s.get(*id).await.unwrap().0, blob.as_slice());
                let open = s.shared.files.read().unwrap().len();
                assert!(open <= OPEN_SEGMENTS, "{open} segments open");
            }
        }
        assert_eq!(s.shared.files.read().unwrap().len(), OPEN_SEGMENTS);
        s.close().await;
    }

    /// Polls `f` once: whether it finished (its output is then dropped).
    async fn polled_ready<F: Future + Unpin>(f: &mut F) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx).is_ready()))
            .await
    }

    fn item(n: u32) -> PutItem {
        let blob = Bytes::from(vec![n as u8; 5000]);
        PutItem {
            id: ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes()),
            hash: *blake3::hash(&blob).as_bytes(),
            blob,
        }
    }

    #[tokio::test]
    async fn a_group_waits_for_the_puts_of_other_open_streams_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path()).unwrap();
        // Far longer than the test may take: a group that waits when it should not is seen.
        s.set_group_linger(Duration::from_secs(600));

        // One stream open: its put is written at once, not after the linger.
        let one = s.put_stream();
        let start = Instant::now();
        s.put(vec![item(1)]).await.unwrap();
        assert!(start.elapsed() < Duration::from_secs(300));
        assert_eq!(s.stats().group_commits, 1);

        // Two open: the first put, once the writer has it, waits for the other stream's.
        let two = s.put_stream();
        let mut first = Box::pin(s.put(vec![item(2)]));
        assert!(
            !polled_ready(&mut first).await,
            "sent, and waiting for its group"
        );
        while s.tx.capacity() < WRITER_QUEUE {
            tokio::task::yield_now().await;
        }
        assert!(!polled_ready(&mut first).await, "taken, and still waiting");
        s.put(vec![item(3)]).await.unwrap();
        first.await.unwrap();
        assert_eq!(s.stats().group_commits, 2, "both puts in one group");
        assert_eq!(s.stats().chunks, 3);

        // The other stream closed: a put is written at once again.
        drop(two);
        let start = Instant::now();
        s.put(vec![item(4)]).await.unwrap();
        assert!(start.elapsed() < Duration::from_secs(300));
        assert_eq!(s.stats().group_commits, 3);
        drop(one);
        s.close().await;
    }

    #[test]
    fn index_entries_are_compact_and_every_form_decodes() {
        let cases = [
            (0, 0, 0),
            (3, 200 << 20, 40_000),
            (u32::MAX, u64::MAX, u32::MAX),
            // Whose compact form would be 16 bytes long, the length of the fixed form.
            (1 << 28, 1 << 56, 1),
        ];
        for (segment, offset, len) in cases {
            let loc = Location {
                segment,
                offset,
                len,
            };
            let e = loc.encode();
            assert_eq!(Location::decode(&e), Some(loc), "{loc:?}");
            assert_ne!(e.len(), 48);
            let mut fixed = Vec::new();
            fixed.extend_from_slice(&segment.to_be_bytes());
            fixed.extend_from_slice(&offset.to_be_bytes());
            fixed.extend_from_slice(&len.to_be_bytes());
            assert_eq!(Location::decode(&fixed), Some(loc));
            fixed.extend_from_slice(&[0xab; 32]);
            assert_eq!(Location::decode(&fixed), Some(loc), "with the old hash");
        }
        let typical = Location {
            segment: 6,
            offset: 221_446_144,
            len: 13_000,
        };
        assert!(typical.encode().len() <= 8, "{:?}", typical.encode());
        assert_eq!(
            Location::decode(&[Location::COMPACT, 1, 2]),
            None,
            "too short"
        );
        assert_eq!(
            Location::decode(&[Location::COMPACT, 1, 2, 3, 4]),
            None,
            "too long"
        );
        assert_eq!(Location::decode(&[9, 1, 2, 3]), None, "unknown tag");
    }
}
