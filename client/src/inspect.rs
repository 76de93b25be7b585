//! Looking into snapshots: `ls`, `diff`, and `check` of the repository's integrity.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use cairn_proto::metadata::SnapshotRecord;
use cairn_proto::ChunkId;
use futures::StreamExt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::{Repository, SnapshotQuery};
use crate::tree::{Kind, Node, Tree};

/// Bytes of chunks (by plaintext length) in one batch read by `check --read-data`.
const READ_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// One entry of `ls`.
#[derive(Debug, Clone, Serialize)]
pub struct LsEntry {
    /// Path inside the snapshot.
    pub path: String,
    /// file, dir or symlink.
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (ns since the epoch).
    pub mtime_ns: i64,
}

/// One difference between two snapshots.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DiffEntry {
    /// `+` added, `-` removed, `M` modified.
    pub change: &'static str,
    /// Path.
    pub path: String,
}

/// Result of `check`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CheckReport {
    /// Snapshots checked.
    pub snapshots: u64,
    /// Distinct trees read.
    pub trees: u64,
    /// Distinct chunks referenced.
    pub chunks: u64,
    /// Chunks with no copy at all.
    pub missing: Vec<String>,
    /// Chunks with fewer than R copies.
    pub under_replicated: u64,
    /// Chunks downloaded and verified.
    pub read_verified: u64,
    /// Chunks that failed download or verification.
    pub read_errors: Vec<String>,
    /// The redundancy factor checked against.
    pub replicas: u32,
}

impl CheckReport {
    /// Whether the repository is sound.
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.read_errors.is_empty()
    }
}

fn kind_name(n: &Node) -> &'static str {
    match n.kind {
        Kind::File { .. } => "file",
        Kind::Dir { .. } => "dir",
        Kind::Symlink { .. } => "symlink",
    }
}

fn join(base: &str, name: &[u8]) -> String {
    format!("{base}/{}", String::from_utf8_lossy(name))
}

impl Repository {
    /// Lists a snapshot's entries below `path` (`/` or empty for everything).
    pub async fn ls(&self, snap: &SnapshotRecord, path: &str) -> Result<Vec<LsEntry>> {
        let mut tree = self.tree(Self::root_of(snap)?).await?;
        let mut base = String::new();
        for comp in Path::new(path).components() {
            if let std::path::Component::Normal(c) = comp {
                let n = tree.get(c.as_bytes()).ok_or_else(|| {
                    Error::Invalid(format!("{path} is not in snapshot {}", &snap.id[..8]))
                })?;
                match &n.kind {
                    Kind::Dir { subtree } => {
                        base = join(&base, &n.name);
                        tree = self.tree(*subtree).await?;
                    }
                    _ => {
                        return Ok(vec![self.entry(&base, n)]);
                    }
                }
            }
        }
        let mut out = Vec::new();
        self.walk(&tree, &base, &mut out).await?;
        Ok(out)
    }

    fn entry(&self, base: &str, n: &Node) -> LsEntry {
        LsEntry {
            path: join(base, &n.name),
            kind: kind_name(n),
            size: n.size,
            mode: n.mode,
            mtime_ns: n.mtime_ns,
        }
    }

    async fn walk(&self, tree: &Tree, base: &str, out: &mut Vec<LsEntry>) -> Result<()> {
        for n in &tree.nodes {
            out.push(self.entry(base, n));
            if let Kind::Dir { subtree } = &n.kind {
                let sub = self.tree(*subtree).await?;
                Box::pin(self.walk(&sub, &join(base, &n.name), out)).await?;
            }
        }
        Ok(())
    }

    /// Differences from snapshot `a` to snapshot `b`.
    pub async fn diff(&self, a: &SnapshotRecord, b: &SnapshotRecord) -> Result<Vec<DiffEntry>> {
        let mut out = Vec::new();
        self.diff_trees(
            Some(Self::root_of(a)?),
            Some(Self::root_of(b)?),
            "",
            &mut out,
        )
        .await?;
        Ok(out)
    }

    async fn diff_trees(
        &self,
        a: Option<ChunkId>,
        b: Option<ChunkId>,
        base: &str,
        out: &mut Vec<DiffEntry>,
    ) -> Result<()> {
        if a == b {
            return Ok(());
        }
        let ta = match a {
            Some(id) => self.tree(id).await?,
            None => Tree::default(),
        };
        let tb = match b {
            Some(id) => self.tree(id).await?,
            None => Tree::default(),
        };
        let mut names: Vec<&[u8]> = ta
            .nodes
            .iter()
            .chain(&tb.nodes)
            .map(|n| n.name.as_slice())
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            let path = join(base, name);
            let (na, nb) = (ta.get(name), tb.get(name));
            let sub = |n: Option<&Node>| match n.map(|n| &n.kind) {
                Some(Kind::Dir { subtree }) => Some(*subtree),
                _ => None,
            };
            match (na, nb) {
                (None, Some(_)) => out.push(DiffEntry {
                    change: "+",
                    path: path.clone(),
                }),
                (Some(_), None) => out.push(DiffEntry {
                    change: "-",
                    path: path.clone(),
                }),
                (Some(x), Some(y)) => {
                    let same = match (&x.kind, &y.kind) {
                        (Kind::Dir { .. }, Kind::Dir { .. }) => true,
                        (xk, yk) => xk == yk && x.mode == y.mode,
                    };
                    if !same {
                        out.push(DiffEntry {
                            change: "M",
                            path: path.clone(),
                        });
                    }
                }
                (None, None) => {}
            }
            if sub(na).is_some() || sub(nb).is_some() {
                Box::pin(self.diff_trees(sub(na), sub(nb), &path, out)).await?;
            }
        }
        Ok(())
    }

    /// Checks that every chunk referenced by a committed snapshot is present (and counts those
    /// below R); with `read_percent`, downloads and verifies that share of the chunks.
    pub async fn check(&self, read_percent: Option<f64>) -> Result<CheckReport> {
        let snaps = self.snapshots(&SnapshotQuery::default()).await?;
        let mut report = CheckReport {
            snapshots: snaps.len() as u64,
            replicas: self.cluster.layout().replicas,
            ..Default::default()
        };
        let mut trees_seen = HashSet::new();
        // Every chunk referenced, with its plaintext length (0 for trees: not recorded).
        let mut chunks: HashMap<ChunkId, u32> = HashMap::new();
        let mut stack: Vec<ChunkId> = Vec::new();
        for s in &snaps {
            stack.push(Self::root_of(s)?);
        }
        // Walk the trees a frontier at a time, fetching (and holding) one batch of it at a time.
        while !stack.is_empty() {
            let frontier: Vec<ChunkId> = std::mem::take(&mut stack)
                .into_iter()
                .filter(|id| trees_seen.insert(*id))
                .collect();
            for batch in frontier.chunks(crate::repo::TREES_PER_REQUEST) {
                for (id, t) in batch.iter().zip(self.trees(batch).await) {
                    chunks.insert(*id, 0);
                    let t = match t {
                        Ok(t) => t,
                        Err(e) => {
                            report.read_errors.push(format!("tree {id}: {e}"));
                            continue;
                        }
                    };
                    for n in t.nodes {
                        match n.kind {
                            Kind::Dir { subtree } => stack.push(subtree),
                            Kind::File { content } => {
                                chunks.extend(content.iter().map(|c| (c.id, c.len)))
                            }
                            Kind::Symlink { .. } => {}
                        }
                    }
                }
            }
        }
        report.trees = trees_seen.len() as u64;
        report.chunks = chunks.len() as u64;
        let ids: Vec<(ChunkId, u32)> = chunks.into_iter().collect();
        let r = report.replicas;
        for part in ids.chunks(4096) {
            let part: Vec<ChunkId> = part.iter().map(|(id, _)| *id).collect();
            let copies = self.cluster.copies(&part).await?;
            for (id, c) in part.iter().zip(copies) {
                if c == 0 {
                    report.missing.push(id.to_hex());
                } else if c < r {
                    report.under_replicated += 1;
                }
            }
        }
        if let Some(pct) = read_percent {
            let threshold = (pct.clamp(0.0, 100.0) / 100.0 * u32::MAX as f64) as u64;
            let selected = ids.into_iter().filter(|(id, _)| {
                u64::from(u32::from_be_bytes(id.0[28..32].try_into().expect("4"))) <= threshold
                    && pct > 0.0
            });
            // Batches of up to 256 chunks and about READ_BATCH_BYTES, four batches at a time:
            // memory stays bounded whatever the chunk sizes.
            let mut batches: Vec<Vec<ChunkId>> = vec![Vec::new()];
            let mut bytes = 0usize;
            for (id, len) in selected {
                let last = batches.last_mut().expect("one batch");
                if last.len() == 256 || bytes >= READ_BATCH_BYTES {
                    batches.push(Vec::new());
                    bytes = 0;
                }
                batches.last_mut().expect("one batch").push(id);
                bytes += len.max(64 * 1024) as usize;
            }
            let mut results = futures::stream::iter(batches)
                .map(|batch| async move {
                    let got = self.cluster.get_many(&self.keys, &batch).await;
                    got
                })
                .buffer_unordered(4);
            while let Some(batch) = results.next().await {
                for r in batch {
                    match r {
                        Ok(_) => report.read_verified += 1,
                        // The error names the chunk.
                        Err(e) => report.read_errors.push(e.to_string()),
                    }
                }
            }
        }
        Ok(report)
    }
}
