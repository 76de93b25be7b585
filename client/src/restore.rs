//! Restore: a snapshot, whole or in part, into a target directory.
//!
//! Every chunk is fetched from any replica, verified (the AEAD tag of the blob and the keyed
//! chunk id of the plaintext; the node has checked the blob's BLAKE3 as it read it) and, on any
//! error, fetched again from the next replica. A new file is written in place; one that exists is
//! written to a temporary name and renamed over it. All-zero chunks become holes. Metadata (mode,
//! owner where permitted, mtime), symlinks, hard links and empty directories are restored.
//! Tree entries that could leave the target are refused when the tree is decoded. Large files
//! are written past the page cache ([`direct`]).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cluster::BadCopy;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::tree::{ChunkRef, Kind, Node, Tree};
use cairn_proto::metadata::SnapshotRecord;
use cairn_proto::ChunkId;

mod direct;
use direct::DirectFile;

/// Chunks fetched in parallel per file.
const FETCH_PARALLEL: usize = 4;
/// Large files written with `O_DIRECT` at once; each holds two staging buffers, and any
/// beyond this go through the page cache.
const DIRECT_FILES: usize = 4;

/// Options of a restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Target directory.
    pub target: PathBuf,
    /// Only paths matching one of these globs (or below a matching directory).
    pub includes: Vec<String>,
    /// Re-read restored files and compare them with the snapshot.
    pub verify: bool,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RestoreSummary {
    /// Snapshot restored.
    pub snapshot: String,
    /// Files written.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Hard links.
    pub hardlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Files re-read and verified (with `verify`).
    pub verified: u64,
    /// Copies that failed verification on some replica (restored from another).
    pub bad_copies: Vec<BadCopy>,
    /// Wall time.
    pub duration_ms: u64,
    /// Metadata that could not be restored (e.g. owner without privileges) — counted only.
    pub metadata_skipped: u64,
}

/// Files restored at once (many small files are latency-bound); room for a few batches of
/// small files.
const FILES_PARALLEL: usize = 1024;
/// Files of one chunk are fetched together, this many per request batch (split by node)...
/// Every batch costs a get stream per node and a blocking read on each: with 16, restoring the
/// benchmark's 72,545 small files took about 50% more of the nodes' CPU and 25% more time.
const SMALL_BATCH_FILES: usize = 256;
/// ...and up to about this many bytes.
const SMALL_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Files restored at once: [`FILES_PARALLEL`], or fewer if the process may not keep that many
/// open (a file waiting in a batch is open), with room left for connections and directories.
fn files_parallel() -> usize {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(64, |(soft, _)| {
        usize::try_from(soft)
            .unwrap_or(usize::MAX)
            .saturating_sub(256)
            .clamp(16, FILES_PARALLEL)
    })
}
/// Bytes of chunks fetched but not yet written, across all files, in KiB: bounds memory.
const INFLIGHT_KIB: usize = 64 * 1024;

struct FileDone {
    bytes: u64,
    verified: bool,
    metadata_skipped: u64,
}

struct Restorer<'a> {
    repo: &'a Repository,
    opts: &'a RestoreOptions,
    includes: Option<GlobSet>,
    /// First restored path of each hard-linked inode, and the links to make once files exist.
    links: HashMap<(u64, u64), PathBuf>,
    deferred_links: Vec<(PathBuf, PathBuf)>,
    /// Directories whose metadata is set after everything inside them (post-order).
    dir_meta: Vec<(Node, PathBuf)>,
    tasks: JoinSet<Result<Vec<FileDone>>>,
    /// Files of one chunk, created and waiting to be fetched together.
    small: Vec<SmallFile>,
    /// Bytes of the chunks of `small`.
    small_bytes: usize,
    sem: Arc<Semaphore>,
    /// Files of one chunk fetched per batch: at most a quarter of `sem`'s permits, so that
    /// files waiting for their batch never hold all of them.
    small_batch: usize,
    bytes: Arc<Semaphore>,
    /// Slots for files written with `O_DIRECT` (see [`DIRECT_FILES`]).
    direct: Arc<Semaphore>,
    sum: RestoreSummary,
    progress: &'a Progress,
    euid_root: bool,
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(p, e)
}

impl Restorer<'_> {
    fn wanted(&self, rel: &Path) -> bool {
        self.includes.as_ref().is_none_or(|g| g.is_match(rel))
    }

    fn reap(
        &mut self,
        r: std::result::Result<Result<Vec<FileDone>>, tokio::task::JoinError>,
    ) -> Result<()> {
        let done = r.map_err(|e| Error::Invalid(format!("restore task failed: {e}")))??;
        for d in done {
            self.sum.files += 1;
            self.sum.bytes += d.bytes;
            self.sum.verified += u64::from(d.verified);
            self.sum.metadata_skipped += d.metadata_skipped;
        }
        Ok(())
    }

    fn file_ctx(&self) -> FileCtx {
        FileCtx {
            verify: self.opts.verify,
            euid_root: self.euid_root,
            progress: self.progress.clone(),
            budget: self.bytes.clone(),
        }
    }

    /// Restores the waiting files of one chunk in one task: their chunks in one batch read.
    fn flush_small(&mut self) {
        if self.small.is_empty() {
            return;
        }
        let files = std::mem::take(&mut self.small);
        self.small_bytes = 0;
        let (repo, ctx) = (self.repo.clone(), self.file_ctx());
        self.tasks
            .spawn(async move { restore_small(&repo, files, &ctx).await });
    }

    async fn dir(&mut self, tree: &Tree, rel: &Path, abs: &Path, whole: bool) -> Result<bool> {
        let mut any = false;
        // Fetch this directory's subtrees concurrently.
        let ids: Vec<ChunkId> = tree
            .nodes
            .iter()
            .filter_map(|n| match n.kind {
                Kind::Dir { subtree } => Some(subtree),
                _ => None,
            })
            .collect();
        let trees = self.repo.trees(&ids).await;
        let subtrees: HashMap<ChunkId, Tree> = ids
            .into_iter()
            .zip(trees)
            .map(|(id, t)| t.map(|t| (id, t)))
            .collect::<Result<_>>()?;
        // Made (or checked) once, before the first entry that is not a directory is put in it.
        let mut here = false;
        let mut ensure_here = || -> Result<()> {
            if !here {
                ensure_dir(abs)?;
                here = true;
            }
            Ok(())
        };
        for node in &tree.nodes {
            let name = std::ffi::OsStr::from_bytes(&node.name);
            let crel = rel.join(name);
            let cabs = abs.join(name);
            let take = whole || self.wanted(&crel);
            match &node.kind {
                Kind::Dir { subtree } => {
                    // Identical directories share one subtree id: clone, do not take.
                    let sub = subtrees.get(subtree).cloned().expect("prefetched above");
                    if take {
                        ensure_dir(&cabs)?;
                    }
                    let inner = Box::pin(self.dir(&sub, &crel, &cabs, take)).await?;
                    if take || inner {
                        ensure_dir(&cabs)?;
                        self.dir_meta.push((node.clone(), cabs.clone()));
                        self.sum.dirs += 1;
                        any = true;
                    }
                }
                _ if !take => {}
                Kind::Symlink { target } => {
                    ensure_here()?;
                    replace(&cabs)?;
                    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &cabs)
                        .map_err(io(&cabs))?;
                    self.sum.metadata_skipped += set_meta(node, &cabs, true, self.euid_root)?;
                    self.sum.symlinks += 1;
                    any = true;
                }
                Kind::File { content } => {
                    ensure_here()?;
                    any = true;
                    let key = (node.dev, node.inode);
                    if node.nlink > 1 {
                        if let Some(first) = self.links.get(&key) {
                            self.deferred_links.push((first.clone(), cabs));
                            continue;
                        }
                        self.links.insert(key, cabs.clone());
                    }
                    let permit = self
                        .sem
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("semaphore open");
                    while let Some(r) = self.tasks.try_join_next() {
                        self.reap(r)?;
                    }
                    // Files are created here, one at a time: creating in a directory holds its
                    // lock while the file system allocates an inode, and tasks creating side by
                    // side spent their time spinning on it.
                    let target = Target::create(&cabs)?;
                    if let [chunk] = content.as_slice() {
                        self.small.push(SmallFile {
                            node: node.clone(),
                            chunk: *chunk,
                            target,
                            _permit: permit,
                        });
                        self.small_bytes += chunk.len as usize;
                        if self.small.len() >= self.small_batch
                            || self.small_bytes >= SMALL_BATCH_BYTES
                        {
                            self.flush_small();
                        }
                        continue;
                    }
                    let direct = if node.size >= direct::DIRECT_MIN {
                        self.direct.clone().try_acquire_owned().ok()
                    } else {
                        None
                    };
                    let (repo, node, content) = (self.repo.clone(), node.clone(), content.clone());
                    let ctx = self.file_ctx();
                    self.tasks.spawn(async move {
                        let _permit = permit;
                        let first = FirstChunk::Fetch { direct };
                        restore_file(&repo, &node, &content, target, &ctx, first)
                            .await
                            .map(|d| vec![d])
                    });
                }
            }
        }
        Ok(any)
    }

    /// Waits for the files, then makes hard links and sets directories' metadata.
    async fn finish(&mut self) -> Result<()> {
        self.flush_small();
        while let Some(r) = self.tasks.join_next().await {
            self.reap(r)?;
        }
        for (first, link) in std::mem::take(&mut self.deferred_links) {
            replace(&link)?;
            std::fs::hard_link(&first, &link).map_err(io(&link))?;
            self.sum.hardlinks += 1;
        }
        for (node, path) in std::mem::take(&mut self.dir_meta) {
            self.sum.metadata_skipped += set_meta(&node, &path, false, self.euid_root)?;
        }
        Ok(())
    }
}

/// What every file task shares.
struct FileCtx {
    verify: bool,
    euid_root: bool,
    progress: Progress,
    budget: Arc<Semaphore>,
}

/// A file being restored: created exclusively, so an entry already at either name (a symlink
/// included) is never followed.
struct Target {
    file: std::fs::File,
    /// The final name.
    path: PathBuf,
    /// Where it is written: the final name for a new file; for one that exists, a temporary
    /// name beside it, renamed over it once complete.
    written: PathBuf,
}

impl Target {
    /// A file that is not there yet is written in place (one directory operation per file, as
    /// cp does) and removed again if its restore fails; an existing one is replaced atomically.
    fn create(path: &Path) -> Result<Self> {
        match create_new(path) {
            Ok(file) => Ok(Self {
                file,
                path: path.to_path_buf(),
                written: path.to_path_buf(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let dir = path.parent().expect("restored files live in a directory");
                let tmp = dir.join(format!(
                    ".cairn-restore-{}",
                    hex::encode(rand::random::<[u8; 8]>())
                ));
                Ok(Self {
                    file: create_new(&tmp).map_err(io(&tmp))?,
                    path: path.to_path_buf(),
                    written: tmp,
                })
            }
            Err(e) => Err(io(path)(e)),
        }
    }
}

/// A file of one chunk waiting in a batch (see [`SMALL_BATCH_FILES`]).
struct SmallFile {
    node: Node,
    chunk: ChunkRef,
    target: Target,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Restores files of one chunk each: every chunk from one batch read, then each file.
async fn restore_small(
    repo: &Repository,
    files: Vec<SmallFile>,
    ctx: &FileCtx,
) -> Result<Vec<FileDone>> {
    let bytes: usize = files.iter().map(|f| f.chunk.len as usize).sum();
    let kib = bytes.div_ceil(1024).clamp(1, INFLIGHT_KIB) as u32;
    let _budget = ctx
        .budget
        .clone()
        .acquire_many_owned(kib)
        .await
        .expect("semaphore open");
    let ids: Vec<ChunkId> = files.iter().map(|f| f.chunk.id).collect();
    let mut got = repo.cluster.get_many(&repo.keys, &ids).await.into_iter();
    let mut done = Vec::with_capacity(files.len());
    let mut failed = None;
    for f in files {
        let data = got.next().expect("one result per chunk");
        if failed.is_some() {
            // Another file of the batch failed: this one is not left half made either.
            let _ = std::fs::remove_file(&f.target.written);
            continue;
        }
        let content = [f.chunk];
        let first = FirstChunk::Fetched(data);
        match restore_file(repo, &f.node, &content, f.target, ctx, first).await {
            Ok(d) => done.push(d),
            Err(e) => failed = Some(e),
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// How a file's content arrives.
enum FirstChunk {
    /// Its only chunk, fetched already (with those of other small files).
    Fetched(Result<Vec<u8>>),
    /// To be fetched here, chunk by chunk; written with `O_DIRECT` given a slot.
    Fetch {
        direct: Option<tokio::sync::OwnedSemaphorePermit>,
    },
}

/// Restores one file into `target`.
async fn restore_file(
    repo: &Repository,
    node: &Node,
    content: &[ChunkRef],
    target: Target,
    ctx: &FileCtx,
    first: FirstChunk,
) -> Result<FileDone> {
    let (verify, progress) = (ctx.verify, &ctx.progress);
    let Target {
        file,
        path,
        written,
    } = target;
    // The file is closed when this block ends, before it is renamed or removed.
    let result = async {
        let file = match first {
            FirstChunk::Fetched(data) => {
                let mut file = file;
                let mut end = WrittenEnd::default();
                write_chunk(&mut file, &written, &content[0], &data?, progress, &mut end)?;
                end.set_length(&file, &written, node.size)?;
                file
            }
            FirstChunk::Fetch { direct } => {
                write_file(repo, content, file, &written, node.size, ctx, direct).await?
            }
        };
        set_file_meta(node, &file, &written, ctx.euid_root)
    }
    .await;
    let skipped = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&written);
            return Err(e);
        }
    };
    if written != path {
        std::fs::rename(&written, &path).map_err(io(&path))?;
    }
    if verify {
        verify_file(repo, content, &path)?;
    }
    progress.file_done(0, true);
    Ok(FileDone {
        bytes: node.size,
        verified: verify,
        metadata_skipped: skipped,
    })
}

fn create_new(p: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
}

/// Fetches a file's chunks, a few at a time, and writes them in order; with a `direct` slot,
/// past the page cache where the file system allows. Gives the file back at its full length.
async fn write_file(
    repo: &Repository,
    content: &[ChunkRef],
    file: std::fs::File,
    path: &Path,
    size: u64,
    ctx: &FileCtx,
    direct: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<std::fs::File> {
    let (budget, progress) = (&ctx.budget, &ctx.progress);
    let mut chunks = futures::stream::iter(content.iter().copied())
        .map(|c| async move {
            let kib = (c.len as usize).div_ceil(1024).clamp(1, INFLIGHT_KIB) as u32;
            let permit = budget
                .clone()
                .acquire_many_owned(kib)
                .await
                .expect("semaphore open");
            repo.cluster
                .get(&repo.keys, c.id)
                .await
                .map(|d| (c, d, permit))
        })
        .buffered(FETCH_PARALLEL);
    let mut file = match direct {
        None => file,
        // The slot is held until the file is finished.
        Some(_slot) => match DirectFile::new(file) {
            Ok(mut d) => {
                while let Some(r) = chunks.next().await {
                    let (c, data, _permit) = r?;
                    check_len(&c, &data)?;
                    d.write(&data).await.map_err(io(path))?;
                    progress.bytes(data.len() as u64);
                }
                return d.finish(size).await.map_err(io(path));
            }
            Err(file) => file,
        },
    };
    let mut end = WrittenEnd::default();
    while let Some(r) = chunks.next().await {
        let (c, data, _permit) = r?;
        write_chunk(&mut file, path, &c, &data, progress, &mut end)?;
    }
    end.set_length(&file, path, size)?;
    Ok(file)
}

/// Checks a fetched chunk's length against the tree's.
fn check_len(c: &ChunkRef, data: &[u8]) -> Result<()> {
    if data.len() != c.len as usize {
        return Err(Error::Integrity(format!(
            "chunk {} has the wrong length",
            c.id
        )));
    }
    Ok(())
}

/// Where the chunks written through the page cache into a new (empty) file end.
#[derive(Debug, Default)]
struct WrittenEnd {
    /// Bytes of content given so far, holes included.
    len: u64,
    /// Whether the last of them were seeked over, not written (the file is shorter than `len`).
    hole: bool,
}

impl WrittenEnd {
    /// Gives the file its length where what was written does not: a trailing hole was seeked
    /// over, or the tree's size differs from its chunks'. Known from the writes, so the file
    /// is not asked (that `fstat`, with a check of the file's directory, made two `statx`
    /// calls per file: 2.7% of the client's CPU in a restore).
    fn set_length(&self, f: &std::fs::File, path: &Path, size: u64) -> Result<()> {
        if self.hole || self.len != size {
            f.set_len(size).map_err(io(path))?;
        }
        Ok(())
    }
}

/// Writes the next chunk of a file through the page cache, after checking its length.
fn write_chunk(
    f: &mut std::fs::File,
    path: &Path,
    c: &ChunkRef,
    data: &[u8],
    progress: &Progress,
    end: &mut WrittenEnd,
) -> Result<()> {
    check_len(c, data)?;
    let hole = write_sparse(f, data).map_err(io(path))?;
    if !data.is_empty() {
        end.hole = hole;
    }
    end.len += data.len() as u64;
    progress.bytes(data.len() as u64);
    Ok(())
}

fn mtime(node: &Node) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(
        node.mtime_ns.div_euclid(1_000_000_000),
        node.mtime_ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// Sets a restored file's owner (as root), mode and mtime through its open descriptor;
/// returns 1 if the owner could not be set.
fn set_file_meta(node: &Node, f: &std::fs::File, path: &Path, euid_root: bool) -> Result<u64> {
    let mut skipped = 0;
    if euid_root {
        if let Err(e) = std::os::unix::fs::fchown(f, Some(node.uid), Some(node.gid)) {
            tracing::debug!(path = %path.display(), error = %e, "owner not restored");
            skipped = 1;
        }
    }
    f.set_permissions(std::fs::Permissions::from_mode(node.mode))
        .map_err(io(path))?;
    let mtime = mtime(node);
    filetime::set_file_handle_times(f, Some(mtime), Some(mtime)).map_err(io(path))?;
    Ok(skipped)
}

/// Sets owner (as root), mode and mtime; returns 1 if the owner could not be set.
fn set_meta(node: &Node, path: &Path, symlink: bool, euid_root: bool) -> Result<u64> {
    let mut skipped = 0;
    if euid_root {
        if let Err(e) = std::os::unix::fs::lchown(path, Some(node.uid), Some(node.gid)) {
            tracing::debug!(path = %path.display(), error = %e, "owner not restored");
            skipped = 1;
        }
    }
    if !symlink {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(node.mode))
            .map_err(io(path))?;
    }
    let mtime = mtime(node);
    filetime::set_symlink_file_times(path, mtime, mtime).map_err(io(path))?;
    Ok(skipped)
}

/// Writes `data`, seeking over 4 KiB blocks of zeros so that holes stay holes; true if its
/// last bytes were seeked over rather than written.
fn write_sparse(f: &mut std::fs::File, data: &[u8]) -> std::io::Result<bool> {
    const BLOCK: usize = 4096;
    let mut run_start = 0;
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + BLOCK).min(data.len());
        if data[pos..end].iter().all(|b| *b == 0) {
            f.write_all(&data[run_start..pos])?;
            f.seek(SeekFrom::Current((end - pos) as i64))?;
            run_start = end;
        }
        pos = end;
    }
    f.write_all(&data[run_start..])?;
    Ok(run_start == data.len() && !data.is_empty())
}

fn ensure_dir(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Invalid(format!(
            "{} exists and is not a directory",
            p.display()
        ))),
        Err(_) => std::fs::create_dir_all(p).map_err(io(p)),
    }
}

fn replace(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Err(Error::Invalid(format!(
            "{} exists and is a directory",
            p.display()
        ))),
        Ok(_) => std::fs::remove_file(p).map_err(io(p)),
        Err(_) => Ok(()),
    }
}

/// Re-reads a restored file and checks each piece against its chunk id.
fn verify_file(repo: &Repository, content: &[ChunkRef], path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut buf = Vec::new();
    for c in content {
        buf.resize(c.len as usize, 0);
        f.read_exact(&mut buf).map_err(io(path))?;
        if repo.keys.chunk_id(&buf) != c.id {
            return Err(Error::Integrity(format!(
                "{}: restored content differs from the snapshot",
                path.display()
            )));
        }
    }
    let mut rest = [0u8; 1];
    if f.read(&mut rest).map_err(io(path))? != 0 {
        return Err(Error::Integrity(format!(
            "{}: restored file is longer than in the snapshot",
            path.display()
        )));
    }
    Ok(())
}

impl Repository {
    /// Restores `snap` (whole, or the parts matching `opts.includes`) into `opts.target`.
    pub async fn restore(
        &self,
        snap: &SnapshotRecord,
        opts: &RestoreOptions,
        progress: &Progress,
    ) -> Result<RestoreSummary> {
        let start = Instant::now();
        let includes = if opts.includes.is_empty() {
            None
        } else {
            let mut b = GlobSetBuilder::new();
            for g in &opts.includes {
                let g = g.trim_start_matches('/');
                b.add(Glob::new(g).map_err(|e| Error::Invalid(format!("include {g:?}: {e}")))?);
            }
            Some(b.build().map_err(|e| Error::Invalid(e.to_string()))?)
        };
        std::fs::create_dir_all(&opts.target).map_err(io(&opts.target))?;
        let root = self.tree(Self::root_of(snap)?).await?;
        let parallel = files_parallel();
        let mut r = Restorer {
            repo: self,
            opts,
            includes,
            links: HashMap::new(),
            deferred_links: Vec::new(),
            dir_meta: Vec::new(),
            tasks: JoinSet::new(),
            small: Vec::new(),
            small_bytes: 0,
            sem: Arc::new(Semaphore::new(parallel)),
            small_batch: (parallel / 4).clamp(1, SMALL_BATCH_FILES),
            bytes: Arc::new(Semaphore::new(INFLIGHT_KIB)),
            direct: Arc::new(Semaphore::new(DIRECT_FILES)),
            sum: RestoreSummary {
                snapshot: snap.id.clone(),
                ..Default::default()
            },
            progress,
            euid_root: is_root(),
        };
        r.dir(&root, Path::new(""), &opts.target, false).await?;
        r.finish().await?;
        progress.finish();
        let mut sum = r.sum;
        sum.bad_copies = self.cluster.bad_copies();
        sum.duration_ms = start.elapsed().as_millis() as u64;
        Ok(sum)
    }
}

fn is_root() -> bool {
    // The effective uid of this process, read from /proc without unsafe code.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Writes `pieces` as a file's chunks through the page cache and gives it `size`.
    fn write_pieces(path: &Path, pieces: &[Vec<u8>], size: u64) {
        let mut f = create_new(path).unwrap();
        let mut end = WrittenEnd::default();
        for p in pieces {
            let c = ChunkRef {
                id: ChunkId([0; 32]),
                len: p.len() as u32,
            };
            write_chunk(&mut f, path, &c, p, &Progress::hidden(), &mut end).unwrap();
        }
        end.set_length(&f, path, size).unwrap();
    }

    /// Zero blocks are seeked over, a trailing run of them too, and the file still gets its
    /// full length and content without being asked for it.
    #[test]
    fn page_cache_writes_keep_holes_and_give_the_file_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let data = |n: usize| (0..n).map(|i| (i % 251) as u8 + 1).collect::<Vec<u8>>();
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("trailing-hole", vec![data(5000), vec![0; 64 << 10]]),
            (
                "hole-in-one-chunk",
                vec![[data(4096), vec![0; 12288]].concat()],
            ),
            ("leading-hole", vec![vec![0; 8192], data(100)]),
            ("short-zero-tail", vec![[data(4096), vec![0; 100]].concat()]),
            ("no-hole", vec![data(4097), data(3)]),
            (
                "hole-then-empty-chunk",
                vec![[data(4096), vec![0; 4096]].concat(), vec![]],
            ),
            ("only-zeros", vec![vec![0; 10_000]]),
            ("nothing", vec![]),
        ];
        for (name, pieces) in cases {
            let path = dir.path().join(name);
            let want = pieces.concat();
            write_pieces(&path, &pieces, want.len() as u64);
            assert_eq!(std::fs::read(&path).unwrap(), want, "{name}");
        }
        let trailing = std::fs::metadata(dir.path().join("trailing-hole")).unwrap();
        assert!(
            trailing.blocks() * 512 < 64 << 10,
            "the trailing zeros stay a hole"
        );
        // A tree whose size differs from its chunks' still sets the file's length.
        let path = dir.path().join("longer");
        write_pieces(&path, &[data(10)], 20_000);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 20_000);
    }
}
