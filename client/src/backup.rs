//! Backup: walk → read → FastCDC → keyed BLAKE3 id → batched has-chunks → zstd + AES-GCM →
//! upload, then commit the snapshot.
//!
//! The walk is sequential, but each directory's listing and metadata are read on blocking
//! threads a few subdirectories ahead of it ([`LIST_AHEAD`]). Changed files up to
//! [`SMALL_FILE`] are read and cut whole on blocking threads, in groups of a directory's files
//! ([`READ_GROUP_FILES`], [`READ_GROUP_BYTES`]), [`READ_GROUPS`] groups at once while the walk
//! goes on; a larger file is read and cut on a blocking thread that feeds a bounded channel.
//! A large file's chunks are not copied out of the windows it is read into ([`crate::chunker`]):
//! they share them, and the windows are read into again once their chunks are sealed. Chunks
//! gather into batches that are checked, sealed and uploaded by at most [`MAX_BATCHES`]
//! concurrent tasks. Memory is bounded by those queues (about
//! `(MAX_BATCHES + 2) × (BATCH_BYTES + window) + (READ_GROUPS + 1) × (READ_GROUP_BYTES +
//! SMALL_FILE)` plus a few pooled windows of 8 MiB, and up to four pooled zstd contexts with
//! their frame buffers, [`crate::crypto::Sealer`]), not by the size of the repository. Files
//! unchanged since the parent snapshot (size, mtime, ctime, inode) reuse the parent's chunk list
//! unread. The snapshot is begun before the walk (its chunks are protected from GC from then
//! on) and committed only after every chunk it references is acknowledged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cairn_proto::metadata::{
    BeginSnapshotRequest, CommitSnapshotRequest, SnapshotRecord, SnapshotStats,
};
use cairn_proto::ChunkId;
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::warn;

use crate::cluster::Blob;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::{Repository, SnapshotQuery};
use crate::tree::{ChunkRef, Kind, Node, Tree};

/// Chunks are sealed and uploaded in batches of about this many bytes. In interleaved first
/// backups of the benchmark's data, 12 MiB batches took about 4% less CPU (client and cluster)
/// than 8 MiB ones, for about 12 MiB more peak memory in the client.
pub const BATCH_BYTES: usize = 12 * 1024 * 1024;
/// Most chunks in one batch. Each batch costs a has-chunks call and a put stream per primary,
/// and each of those a replica stream per other copy, a write group and an fsync on every node:
/// batches of small files are cut by bytes, not by count, before this (12 MiB of the
/// benchmark's files, 17 KB on average, is about 740 chunks). At 128, a first backup of the
/// benchmark's 72,545 small files took about 15% more CPU over the whole cluster.
const BATCH_CHUNKS: usize = 1024;
/// Subdirectories of a directory listed ahead of the walk, on blocking threads.
const LIST_AHEAD: usize = 4;
/// Files up to this size are read whole on a blocking thread while the walk goes on.
const SMALL_FILE: u64 = 1024 * 1024;
/// Most small files of a directory read by one blocking task: each task costs two thread
/// hand-offs; with one task per file, a backup of the benchmark's 72,545 small files made about
/// 180,000 futex calls in the client.
const READ_GROUP_FILES: usize = 32;
/// A group of small files is sent to be read once it holds this many bytes.
const READ_GROUP_BYTES: u64 = 2 * 1024 * 1024;
/// Groups of small files being read at once.
const READ_GROUPS: usize = 2;
/// Most batches in flight.
pub const MAX_BATCHES: usize = 3;
/// The in-session dedup set is cleared beyond this many ids (bounded memory).
const SEEN_MAX: usize = 1 << 20;

/// Snapshot type, in the vocabulary operators know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// Read every file (no parent shortcut).
    Full,
    /// Parent: the latest snapshot of the same host and paths.
    #[default]
    Incremental,
    /// Parent: the latest full snapshot of the same host and paths.
    Differential,
}

impl BackupKind {
    /// Name as stored in the catalog.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
            Self::Differential => "differential",
        }
    }
}

/// Chunker bounds (bytes).
#[derive(Debug, Clone, Copy)]
pub struct ChunkerOptions {
    /// Minimum chunk size.
    pub min: u32,
    /// Average chunk size.
    pub avg: u32,
    /// Maximum chunk size (at most 16 MiB).
    pub max: u32,
}

impl Default for ChunkerOptions {
    fn default() -> Self {
        Self {
            min: 256 * 1024,
            avg: 1024 * 1024,
            max: 4 * 1024 * 1024,
        }
    }
}

/// Options of a backup.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Host name recorded in the snapshot.
    pub host: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Snapshot type.
    pub kind: BackupKind,
    /// Glob patterns to exclude (matched against the full path and the file name).
    pub excludes: Vec<String>,
    /// Stay on the file system of each backup path.
    pub one_file_system: bool,
    /// Chunker bounds.
    pub chunker: ChunkerOptions,
}

/// What a backup did.
#[derive(Debug, Clone, Serialize)]
pub struct BackupSummary {
    /// Snapshot id.
    pub snapshot: String,
    /// Parent snapshot (empty for none).
    pub parent: String,
    /// Type actually taken (a backup with no parent is full).
    pub kind: String,
    /// Files not seen in the parent.
    pub files_new: u64,
    /// Files changed since the parent.
    pub files_changed: u64,
    /// Files reused from the parent unread.
    pub files_unmodified: u64,
    /// Directories.
    pub dirs: u64,
    /// Bytes read from disk.
    pub bytes_read: u64,
    /// Bytes of all files in the snapshot.
    pub bytes_total: u64,
    /// Bytes sent after dedup, compression and encryption.
    pub bytes_uploaded: u64,
    /// Chunks uploaded.
    pub chunks_uploaded: u64,
    /// Wall time.
    pub duration_ms: u64,
    /// Warnings (unreadable or changing files).
    pub warnings: Vec<String>,
}

#[derive(Default)]
struct Counters {
    files_new: u64,
    files_changed: u64,
    files_unmodified: u64,
    dirs: u64,
    bytes_read: u64,
    bytes_total: u64,
}

#[derive(Default)]
struct Uploaded {
    bytes: u64,
    chunks: u64,
}

/// Seals and uploads chunks in bounded concurrent batches.
struct Uploader {
    repo: Repository,
    pending: Vec<(ChunkId, Bytes)>,
    pending_bytes: usize,
    seen: HashSet<ChunkId>,
    sem: Arc<Semaphore>,
    tasks: JoinSet<Result<Uploaded>>,
    done: Uploaded,
}

impl Uploader {
    fn new(repo: Repository) -> Self {
        Self {
            repo,
            pending: Vec::new(),
            pending_bytes: 0,
            seen: HashSet::new(),
            sem: Arc::new(Semaphore::new(MAX_BATCHES)),
            tasks: JoinSet::new(),
            done: Uploaded::default(),
        }
    }

    async fn add(&mut self, id: ChunkId, data: Bytes) -> Result<()> {
        if self.seen.len() >= SEEN_MAX {
            self.seen.clear();
        }
        if !self.seen.insert(id) {
            return Ok(());
        }
        self.pending_bytes += data.len();
        self.pending.push((id, data));
        if self.pending_bytes >= BATCH_BYTES || self.pending.len() >= BATCH_CHUNKS {
            self.flush().await?;
        }
        Ok(())
    }

    fn reap(
        &mut self,
        r: std::result::Result<Result<Uploaded>, tokio::task::JoinError>,
    ) -> Result<()> {
        let u = r.map_err(|e| Error::Invalid(format!("upload task failed: {e}")))??;
        self.done.bytes += u.bytes;
        self.done.chunks += u.chunks;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let permit = self
            .sem
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        while let Some(r) = self.tasks.try_join_next() {
            self.reap(r)?;
        }
        let repo = self.repo.clone();
        self.tasks.spawn(async move {
            let _permit = permit;
            upload_batch(repo, batch).await
        });
        Ok(())
    }

    async fn finish(mut self) -> Result<Uploaded> {
        self.flush().await?;
        while let Some(r) = self.tasks.join_next().await {
            self.reap(r)?;
        }
        Ok(self.done)
    }
}

async fn upload_batch(repo: Repository, batch: Vec<(ChunkId, Bytes)>) -> Result<Uploaded> {
    let ids: Vec<ChunkId> = batch.iter().map(|(id, _)| *id).collect();
    let present = repo.cluster.has(&ids).await?;
    let missing: Vec<(ChunkId, Bytes)> = batch
        .into_iter()
        .zip(present)
        .filter(|(_, p)| !p)
        .map(|(b, _)| b)
        .collect();
    if missing.is_empty() {
        return Ok(Uploaded::default());
    }
    let keys = repo.keys.clone();
    let sealed = tokio::task::spawn_blocking(move || {
        let mut sealer = keys.sealer();
        missing
            .into_iter()
            .map(|(id, p)| sealer.seal(&id, &p).map(|b| Blob::new(id, Bytes::from(b))))
            .collect::<Result<Vec<_>>>()
    })
    .await
    .map_err(|e| Error::Invalid(format!("sealing task failed: {e}")))??;
    let up = Uploaded {
        bytes: sealed.iter().map(|b| b.data.len() as u64).sum(),
        chunks: sealed.len() as u64,
    };
    repo.cluster.put(sealed).await?;
    Ok(up)
}

/// A directory's nodes while it is walked; `None` for a file that turned out unreadable.
#[derive(Default)]
struct Building {
    nodes: Vec<Option<Node>>,
}

/// An entry's counterpart in the parent snapshot, with its subtree when it is a directory.
struct Prev {
    node: Option<Node>,
    tree: Option<(ChunkId, Tree)>,
    /// This directory's listing, started ahead of the walk.
    listing: Option<tokio::task::JoinHandle<Listing>>,
}

/// A directory's entries sorted by name, each with its metadata (`fstatat` on the open
/// directory), and the errors met while reading it; `Err` when it cannot be opened.
type Listing = std::io::Result<(
    Vec<(OsString, std::io::Result<std::fs::Metadata>)>,
    Vec<String>,
)>;

fn list_dir(path: &Path) -> Listing {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for e in std::fs::read_dir(path)? {
        match e {
            Ok(e) => entries.push((e.file_name(), e.metadata())),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok((entries, errors))
}

/// What [`Job::entry`] found: a finished node, or a file node whose content is still being read.
enum Entry {
    Done(Node),
    /// A small file, to be read with others of its directory.
    Small(Node, Box<SmallRead>),
}

/// A small file to read.
struct SmallRead {
    path: PathBuf,
    /// Its metadata when listed (to tell whether it changed while it was read).
    before: std::fs::Metadata,
    /// Whether the parent snapshot had this file (changed, not new).
    changed: bool,
}

/// Small files of a directory gathered to be read by one blocking task.
#[derive(Default)]
struct ReadGroup {
    /// Each file's place among the directory's entries, and the file.
    files: Vec<(usize, SmallRead)>,
    bytes: u64,
}

/// A group of small files being read and cut on a blocking thread.
struct PendingReads {
    /// Each file's place among the directory's entries, and whether it changed.
    files: Vec<(usize, bool)>,
    /// One result per file, in order.
    task: tokio::task::JoinHandle<Vec<Result<SmallFile>>>,
}

/// A small file's chunks, and a warning if it changed while it was read.
struct SmallFile {
    chunks: Vec<(ChunkId, Bytes)>,
    warning: Option<String>,
}

/// Reads and cuts each small file whole: one result per file, in order, so that a file that
/// cannot be read fails alone.
fn read_small_files(
    keys: &Keys,
    c: ChunkerOptions,
    files: Vec<(PathBuf, std::fs::Metadata)>,
) -> Vec<Result<SmallFile>> {
    files
        .into_iter()
        .map(|(path, before)| {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            let mut chunks = Vec::new();
            // Files this small fit in no window: a pool of their own stays empty.
            let windows = crate::chunker::Windows::default();
            let read = crate::chunker::chunk_shared(&file, before.len(), c, &windows, |data| {
                chunks.push((keys.chunk_id(&data), data));
                true
            })
            .map_err(|e| Error::io(&path, e))?;
            let warning = changed_while_read(&path, &file, &before, read);
            Ok(SmallFile { chunks, warning })
        })
        .collect()
}

/// A warning if the file read from `file` (opened at `path`) changed while it was read: its
/// size or modification time moved, or the bytes read are not its size. The open file is
/// asked (`fstat`), not the path, which costs no path lookup and is not fooled by a file put
/// in the path's place after the read.
fn changed_while_read(
    path: &Path,
    file: &std::fs::File,
    before: &std::fs::Metadata,
    read: u64,
) -> Option<String> {
    let after = file.metadata().ok()?;
    (after.len() != before.len()
        || after.mtime() != before.mtime()
        || after.mtime_nsec() != before.mtime_nsec()
        || read != after.len())
    .then(|| format!("{}: file changed while it was read", path.display()))
}

/// Lists a directory on a blocking thread.
fn start_listing(path: PathBuf) -> tokio::task::JoinHandle<Listing> {
    tokio::task::spawn_blocking(move || list_dir(&path))
}

/// The selection of what to back up below one directory.
enum Sel {
    Whole,
    Partial(BTreeMap<OsString, Sel>),
}

struct Job<'a> {
    repo: &'a Repository,
    opts: &'a BackupOptions,
    excludes: GlobSet,
    uploader: Uploader,
    counters: Counters,
    warnings: Vec<String>,
    progress: &'a Progress,
    use_parent: bool,
    /// Windows large files are read into ([`crate::chunker::Windows`]).
    windows: Arc<crate::chunker::Windows>,
}

fn time_ns(sec: i64, nsec: i64) -> i64 {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

fn node_from_meta(name: &[u8], m: &std::fs::Metadata, kind: Kind) -> Node {
    Node {
        name: name.to_vec(),
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: time_ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: time_ns(m.ctime(), m.ctime_nsec()),
        size: if m.is_file() { m.len() } else { 0 },
        dev: m.dev(),
        inode: m.ino(),
        nlink: m.nlink(),
    }
}

impl Job<'_> {
    fn excluded(&self, path: &Path) -> bool {
        self.excludes.is_match(path)
            || path
                .file_name()
                .is_some_and(|n| self.excludes.is_match(Path::new(n)))
    }

    fn warn(&mut self, msg: String) {
        warn!("{msg}");
        self.progress.warn(&msg);
        self.warnings.push(msg);
    }

    /// The parent snapshot's trees of the child directories named, fetched together.
    async fn prefetch(&self, parent: Option<&Tree>, names: &[OsString]) -> HashMap<ChunkId, Tree> {
        let Some(parent) = parent.filter(|_| self.use_parent) else {
            return HashMap::new();
        };
        let ids: Vec<ChunkId> = names
            .iter()
            .filter_map(|n| match parent.get(n.as_bytes()).map(|p| &p.kind) {
                Some(Kind::Dir { subtree }) => Some(*subtree),
                _ => None,
            })
            .collect();
        let trees = self.repo.trees(&ids).await;
        ids.into_iter()
            .zip(trees)
            .filter_map(|(id, t)| t.ok().map(|t| (id, t)))
            .collect()
    }

    async fn dir(
        &mut self,
        path: &Path,
        sel: &Sel,
        parent: Option<(ChunkId, Tree)>,
        listing: Option<tokio::task::JoinHandle<Listing>>,
        root_dev: u64,
    ) -> Result<ChunkId> {
        let (parent_id, parent) = parent.unzip();
        let mut tree = Building::default();
        let mut group = ReadGroup::default();
        let mut reads = std::collections::VecDeque::new();
        // With the whole directory selected, its entries and their metadata come from a listing
        // made on a blocking thread (`fstatat` on the open directory), usually started while
        // the walk was still in an earlier sibling.
        let entries: Vec<(OsString, Option<std::io::Result<std::fs::Metadata>>)> = match sel {
            Sel::Partial(children) => children.keys().map(|n| (n.clone(), None)).collect(),
            Sel::Whole => {
                let listing = listing.unwrap_or_else(|| start_listing(path.to_path_buf()));
                let listed = listing
                    .await
                    .map_err(|e| Error::Invalid(format!("listing task failed: {e}")))?;
                match listed {
                    Ok((entries, errors)) => {
                        for e in errors {
                            self.warn(e);
                        }
                        entries.into_iter().map(|(n, m)| (n, Some(m))).collect()
                    }
                    Err(e) => {
                        self.warn(format!("{}: {e}", path.display()));
                        return self.store_tree(&mut Tree::default(), None).await;
                    }
                }
            }
        };
        let names: Vec<OsString> = entries.iter().map(|(n, _)| n.clone()).collect();
        // Fetch the parent's subtrees of this directory's children concurrently.
        let mut prefetched = self.prefetch(parent.as_ref(), &names).await;
        // Subdirectories the walk will enter, listed a few ahead of it.
        let mut subdirs = entries
            .iter()
            .filter(|(n, m)| match m {
                Some(Ok(m)) => {
                    m.is_dir()
                        && !(self.opts.one_file_system && m.dev() != root_dev)
                        && !self.excluded(&path.join(n))
                }
                _ => false,
            })
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>()
            .into_iter();
        let mut ahead: std::collections::VecDeque<(OsString, tokio::task::JoinHandle<Listing>)> =
            std::collections::VecDeque::new();
        for (name, meta) in entries {
            let child = path.join(&name);
            let child_sel = match sel {
                Sel::Partial(c) => &c[&name],
                Sel::Whole => &Sel::Whole,
            };
            if matches!(child_sel, Sel::Whole) && self.excluded(&child) {
                continue;
            }
            let meta = match meta.unwrap_or_else(|| std::fs::symlink_metadata(&child)) {
                Ok(m) => m,
                Err(e) => {
                    self.warn(format!("{}: {e}", child.display()));
                    continue;
                }
            };
            let mut listing = None;
            if matches!(sel, Sel::Whole) && meta.is_dir() {
                while ahead.len() < LIST_AHEAD {
                    let Some(n) = subdirs.next() else { break };
                    let h = start_listing(path.join(&n));
                    ahead.push_back((n, h));
                }
                if ahead.front().is_some_and(|(n, _)| *n == name) {
                    listing = ahead.pop_front().map(|(_, h)| h);
                }
            }
            let pnode = parent
                .as_ref()
                .and_then(|t| t.get(name.as_bytes()))
                .cloned();
            let ptree = match pnode.as_ref().map(|p| &p.kind) {
                // A subtree that occurs twice in the parent is fetched again the second time.
                Some(Kind::Dir { subtree }) => match prefetched.remove(subtree) {
                    Some(t) => Some((*subtree, t)),
                    None => self.repo.tree(*subtree).await.ok().map(|t| (*subtree, t)),
                },
                _ => None,
            };
            if meta.is_dir() {
                // Finish this directory's reads before the walk goes deeper (bounded memory).
                self.send_group(&mut group, &mut reads);
                self.finish_reads(&mut tree, &mut reads).await?;
            }
            match self
                .entry(
                    &child,
                    name.as_bytes(),
                    &meta,
                    child_sel,
                    Prev {
                        node: pnode,
                        tree: ptree,
                        listing,
                    },
                    root_dev,
                )
                .await?
            {
                Some(Entry::Done(node)) => tree.nodes.push(Some(node)),
                Some(Entry::Small(node, read)) => {
                    tree.nodes.push(Some(node));
                    group.bytes += read.before.len();
                    group.files.push((tree.nodes.len() - 1, *read));
                    if group.files.len() >= READ_GROUP_FILES || group.bytes >= READ_GROUP_BYTES {
                        self.send_group(&mut group, &mut reads);
                        if reads.len() > READ_GROUPS {
                            let pending = reads.pop_front().expect("not empty");
                            self.finish_group(&mut tree, pending).await?;
                        }
                    }
                }
                None => {}
            }
        }
        self.send_group(&mut group, &mut reads);
        self.finish_reads(&mut tree, &mut reads).await?;
        self.counters.dirs += 1;
        let mut tree = Tree {
            nodes: tree.nodes.into_iter().flatten().collect(),
        };
        self.store_tree(&mut tree, parent_id).await
    }

    /// Starts reading the small files gathered in `group`, if any.
    fn send_group(
        &self,
        group: &mut ReadGroup,
        reads: &mut std::collections::VecDeque<PendingReads>,
    ) {
        if group.files.is_empty() {
            return;
        }
        let (files, todo): (Vec<_>, Vec<_>) = std::mem::take(group)
            .files
            .into_iter()
            .map(|(at, r)| ((at, r.changed), (r.path, r.before)))
            .unzip();
        let task = self.read_small(todo);
        reads.push_back(PendingReads { files, task });
    }

    /// Waits for every small file of a directory still being read.
    async fn finish_reads(
        &mut self,
        tree: &mut Building,
        reads: &mut std::collections::VecDeque<PendingReads>,
    ) -> Result<()> {
        while let Some(pending) = reads.pop_front() {
            self.finish_group(tree, pending).await?;
        }
        Ok(())
    }

    /// Waits for a group of small files and takes each in.
    async fn finish_group(&mut self, tree: &mut Building, pending: PendingReads) -> Result<()> {
        let done = pending
            .task
            .await
            .map_err(|e| Error::Invalid(format!("reader task failed: {e}")))?;
        for ((at, changed), file) in pending.files.into_iter().zip(done) {
            self.finish_read(&mut tree.nodes[at], file, changed).await?;
        }
        Ok(())
    }

    /// Takes a small file's chunks into the upload and its chunk list into its node; a file
    /// that could not be read is warned about and left out.
    async fn finish_read(
        &mut self,
        node: &mut Option<Node>,
        done: Result<SmallFile>,
        changed: bool,
    ) -> Result<()> {
        let file = match done {
            Ok(f) => f,
            Err(Error::Io { path, source }) => {
                self.warn(format!("{path}: {source}"));
                *node = None;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut content = Vec::with_capacity(file.chunks.len());
        let mut bytes = 0u64;
        for (id, data) in file.chunks {
            bytes += self.take_chunk(&mut content, id, data).await?;
        }
        if let Some(n) = node.as_mut() {
            n.kind = Kind::File { content };
        }
        self.file_read(changed, bytes);
        if let Some(w) = file.warning {
            self.warn(w);
        }
        Ok(())
    }

    async fn entry(
        &mut self,
        path: &Path,
        name: &[u8],
        meta: &std::fs::Metadata,
        sel: &Sel,
        prev: Prev,
        root_dev: u64,
    ) -> Result<Option<Entry>> {
        let Prev {
            node: parent,
            tree: ptree,
            listing,
        } = prev;
        let ft = meta.file_type();
        if ft.is_dir() {
            if self.opts.one_file_system && meta.dev() != root_dev && matches!(sel, Sel::Whole) {
                return Ok(None);
            }
            let subtree = Box::pin(self.dir(path, sel, ptree, listing, root_dev)).await?;
            return Ok(Some(Entry::Done(node_from_meta(
                name,
                meta,
                Kind::Dir { subtree },
            ))));
        }
        if ft.is_symlink() {
            return match std::fs::read_link(path) {
                Ok(t) => Ok(Some(Entry::Done(node_from_meta(
                    name,
                    meta,
                    Kind::Symlink {
                        target: t.as_os_str().as_bytes().to_vec(),
                    },
                )))),
                Err(e) => {
                    self.warn(format!("{}: {e}", path.display()));
                    Ok(None)
                }
            };
        }
        if !ft.is_file() {
            // Devices, sockets and FIFOs are not backed up.
            return Ok(None);
        }
        let mut node = node_from_meta(
            name,
            meta,
            Kind::File {
                content: Vec::new(),
            },
        );
        self.counters.bytes_total += meta.len();
        let changed = parent.is_some();
        if self.use_parent {
            if let Some(p) = parent {
                if p.size == node.size
                    && p.mtime_ns == node.mtime_ns
                    && p.ctime_ns == node.ctime_ns
                    && p.inode == node.inode
                {
                    if let Kind::File { content } = p.kind {
                        node.kind = Kind::File { content };
                        self.counters.files_unmodified += 1;
                        self.progress.file_done(meta.len(), false);
                        return Ok(Some(Entry::Done(node)));
                    }
                }
            }
        }
        if meta.len() <= SMALL_FILE {
            let read = Box::new(SmallRead {
                path: path.to_path_buf(),
                before: meta.clone(),
                changed,
            });
            return Ok(Some(Entry::Small(node, read)));
        }
        match self.read_file(path, meta, changed).await {
            Ok(content) => {
                node.kind = Kind::File { content };
                Ok(Some(Entry::Done(node)))
            }
            Err(Error::Io { path, source }) => {
                self.warn(format!("{path}: {source}"));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads and cuts small files whole, one after the other, on a blocking thread.
    fn read_small(
        &self,
        files: Vec<(PathBuf, std::fs::Metadata)>,
    ) -> tokio::task::JoinHandle<Vec<Result<SmallFile>>> {
        let keys = self.repo.keys.clone();
        let c = self.opts.chunker;
        tokio::task::spawn_blocking(move || read_small_files(&keys, c, files))
    }

    async fn read_file(
        &mut self,
        path: &Path,
        before: &std::fs::Metadata,
        changed: bool,
    ) -> Result<Vec<ChunkRef>> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let (tx, mut rx) = mpsc::channel::<std::io::Result<(ChunkId, Bytes)>>(4);
        let keys = self.repo.keys.clone();
        let c = self.opts.chunker;
        let size = before.len();
        let windows = self.windows.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let res = crate::chunker::chunk_shared(&file, size, c, &windows, |data| {
                tx.blocking_send(Ok((keys.chunk_id(&data), data))).is_ok()
            });
            if let Err(e) = res {
                let _ = tx.blocking_send(Err(e));
            }
            file
        });
        let mut content = Vec::new();
        let mut read = 0u64;
        while let Some(msg) = rx.recv().await {
            let (id, data) = msg.map_err(|e| Error::io(path, e))?;
            read += self.take_chunk(&mut content, id, data).await?;
        }
        let file = reader
            .await
            .map_err(|e| Error::Invalid(format!("reader task failed: {e}")))?;
        self.file_read(changed, read);
        if let Some(w) = changed_while_read(path, &file, before, read) {
            self.warn(w);
        }
        Ok(content)
    }

    /// Adds a chunk just cut to a file's chunk list and to the upload; returns its length.
    async fn take_chunk(
        &mut self,
        content: &mut Vec<ChunkRef>,
        id: ChunkId,
        data: Bytes,
    ) -> Result<u64> {
        let len = data.len() as u64;
        self.progress.bytes(len);
        content.push(ChunkRef {
            id,
            len: len as u32,
        });
        self.uploader.add(id, data).await?;
        Ok(len)
    }

    /// Counts a file read whole: new, or changed since the parent snapshot.
    fn file_read(&mut self, changed: bool, bytes: u64) {
        self.counters.bytes_read += bytes;
        if changed {
            self.counters.files_changed += 1;
        } else {
            self.counters.files_new += 1;
        }
        self.progress.file_done(0, true);
    }

    /// Encodes and uploads a directory's tree, unless it is the parent snapshot's tree of the
    /// same directory unchanged (stored already, like the chunks of unchanged files).
    async fn store_tree(&mut self, tree: &mut Tree, parent: Option<ChunkId>) -> Result<ChunkId> {
        let bytes = tree.encode();
        if bytes.len() > crate::cluster::MAX_CHUNK {
            return Err(Error::Invalid("a directory listing exceeds 16 MiB".into()));
        }
        let id = self.repo.keys.chunk_id(&bytes);
        if parent == Some(id) {
            return Ok(id);
        }
        self.uploader.add(id, Bytes::from(bytes)).await?;
        Ok(id)
    }
}

fn build_selection(paths: &[PathBuf]) -> Result<Sel> {
    let mut root = BTreeMap::new();
    for p in paths {
        let comps: Vec<OsString> = p
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(n) => Some(n.to_os_string()),
                _ => None,
            })
            .collect();
        if comps.is_empty() {
            return Err(Error::Invalid(
                "backing up / as a whole is not supported; name its directories".into(),
            ));
        }
        let mut cur = &mut root;
        for (i, c) in comps.iter().enumerate() {
            if i + 1 == comps.len() {
                cur.insert(c.clone(), Sel::Whole);
                break;
            }
            let e = cur
                .entry(c.clone())
                .or_insert_with(|| Sel::Partial(BTreeMap::new()));
            match e {
                Sel::Partial(m) => cur = m,
                Sel::Whole => break, // an ancestor is backed up whole already
            }
        }
    }
    Ok(Sel::Partial(root))
}

impl Repository {
    /// Backs up `paths` and commits a snapshot.
    pub async fn backup(
        &self,
        paths: &[PathBuf],
        opts: &BackupOptions,
        progress: &Progress,
    ) -> Result<BackupSummary> {
        let start = Instant::now();
        if paths.is_empty() {
            return Err(Error::Invalid("nothing to back up".into()));
        }
        if opts.chunker.max as usize > crate::cluster::MAX_CHUNK
            || opts.chunker.min > opts.chunker.avg
            || opts.chunker.avg > opts.chunker.max
        {
            return Err(Error::Invalid(
                "chunker bounds must satisfy min <= avg <= max <= 16 MiB".into(),
            ));
        }
        let mut abs = Vec::new();
        for p in paths {
            abs.push(std::fs::canonicalize(p).map_err(|e| Error::io(p, e))?);
        }
        abs.sort();
        abs.dedup();
        let path_strs: Vec<String> = abs.iter().map(|p| p.display().to_string()).collect();
        let mut builder = GlobSetBuilder::new();
        for g in &opts.excludes {
            builder.add(Glob::new(g).map_err(|e| Error::Invalid(format!("exclude {g:?}: {e}")))?);
        }
        let excludes = builder.build().map_err(|e| Error::Invalid(e.to_string()))?;

        let parent = self.find_parent(opts, &path_strs).await?;
        let kind = if parent.is_none() {
            BackupKind::Full
        } else {
            opts.kind
        };
        let begin = BeginSnapshotRequest {
            tenant: self.tenant.clone(),
            host: opts.host.clone(),
            paths: path_strs.clone(),
            tags: opts.tags.clone(),
            kind: kind.name().to_string(),
            parent: parent.as_ref().map(|p| p.id.clone()).unwrap_or_default(),
        };
        let pending = self
            .cluster
            .coord
            .call(|mut c| {
                let r = begin.clone();
                async move { c.begin_snapshot(r).await }
            })
            .await?;

        let parent_tree = match &parent {
            Some(p) => {
                let id = Self::root_of(p)?;
                Some((id, self.tree(id).await?))
            }
            None => None,
        };
        let sel = build_selection(&abs)?;
        let root_dev = std::fs::metadata(&abs[0]).map(|m| m.dev()).unwrap_or(0);
        let mut job = Job {
            repo: self,
            opts,
            excludes,
            uploader: Uploader::new(self.clone()),
            counters: Counters::default(),
            warnings: Vec::new(),
            progress,
            use_parent: parent.is_some(),
            windows: Arc::default(),
        };
        let root = job
            .dir(Path::new("/"), &sel, parent_tree, None, root_dev)
            .await?;
        // Commit only after every chunk is acknowledged.
        let up = job.uploader.finish().await?;
        let c = job.counters;
        let stats = SnapshotStats {
            files_new: c.files_new,
            files_changed: c.files_changed,
            files_unmodified: c.files_unmodified,
            dirs: c.dirs,
            bytes_read: c.bytes_read,
            bytes_total: c.bytes_total,
            bytes_uploaded: up.bytes,
            chunks_uploaded: up.chunks,
            duration_ms: start.elapsed().as_millis() as u64,
            errors: job.warnings.len() as u64,
        };
        let commit = CommitSnapshotRequest {
            id: pending.id.clone(),
            root: root.0.to_vec(),
            stats: Some(stats),
        };
        let rec: SnapshotRecord = self
            .cluster
            .coord
            .call(|mut c| {
                let r = commit.clone();
                async move { c.commit_snapshot(r).await }
            })
            .await?;
        progress.finish();
        Ok(BackupSummary {
            snapshot: rec.id,
            parent: rec.parent,
            kind: rec.kind,
            files_new: c.files_new,
            files_changed: c.files_changed,
            files_unmodified: c.files_unmodified,
            dirs: c.dirs,
            bytes_read: c.bytes_read,
            bytes_total: c.bytes_total,
            bytes_uploaded: up.bytes,
            chunks_uploaded: up.chunks,
            duration_ms: start.elapsed().as_millis() as u64,
            warnings: job.warnings,
        })
    }

    async fn find_parent(
        &self,
        opts: &BackupOptions,
        paths: &[String],
    ) -> Result<Option<SnapshotRecord>> {
        if opts.kind == BackupKind::Full {
            return Ok(None);
        }
        let q = SnapshotQuery {
            host: opts.host.clone(),
            ..Default::default()
        };
        let mut list = self.snapshots(&q).await?;
        list.retain(|s| {
            s.paths == paths && (opts.kind == BackupKind::Incremental || s.kind == "full")
        });
        Ok(list.pop())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_file_that_cannot_be_read_fails_alone_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::from_master_key(&[7; 32]);
        let mut files = Vec::new();
        for (name, body) in [
            ("a", &b"first"[..]),
            ("b", b"gone"),
            ("c", b""),
            ("d", b"last"),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            files.push((p.clone(), std::fs::metadata(&p).unwrap()));
        }
        // Listed, then removed before it is read.
        std::fs::remove_file(dir.path().join("b")).unwrap();
        let got = read_small_files(&keys, ChunkerOptions::default(), files);
        assert_eq!(got.len(), 4);
        let ok = |r: &Result<SmallFile>, body: &[u8]| {
            let f = r.as_ref().expect("read");
            assert!(f.warning.is_none());
            let data: Vec<u8> = f.chunks.iter().flat_map(|(_, d)| d.clone()).collect();
            assert_eq!(data, body);
            for (id, d) in &f.chunks {
                assert_eq!(*id, keys.chunk_id(d));
            }
        };
        ok(&got[0], b"first");
        assert!(matches!(&got[1], Err(Error::Io { path, .. }) if path.ends_with("b")));
        ok(&got[2], b"");
        ok(&got[3], b"last");
    }
}
