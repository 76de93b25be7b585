//! `cairn`: the command line for users and admins.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use cairn_client::{
    BackupKind, BackupOptions, Cluster, Progress, Repository, RestoreOptions, SnapshotQuery,
};
use cairn_proto::metadata::{
    AddCoordinatorRequest, ClusterStatusRequest, DeleteSnapshotRequest, GetLayoutRequest,
    ListNodesRequest, RemoveCoordinatorRequest, SetNodeStateRequest, SetReplicationRequest,
    SnapshotRecord,
};
use cairn_proto::types::{NodeInfo, NodeState};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tracing_subscriber::EnvFilter;

/// jemalloc, with one arena (`.cargo/config.toml`): a backup allocates and frees a buffer for
/// every small file and a blob for every chunk, and glibc's allocator, even tuned (one arena,
/// chunk-sized buffers from the heap, a high trim threshold), spent about 0.6 CPU-s of the
/// benchmark's first backup splitting and merging free blocks, a tenth of the client's CPU on
/// its small files. jemalloc's default of four arenas per core kept freed pages in each, for
/// a peak half again as high; with one, the peak is glibc's and restores are as fast.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn: distributed, deduplicating, encrypted backups"
)]
struct Cli {
    /// Coordinator addresses, comma-separated.
    #[arg(long, global = true, env = "CAIRN_COORDINATOR", value_delimiter = ',')]
    coordinator: Vec<String>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    /// TOML configuration file.
    #[arg(long, global = true, env = "CAIRN_CONFIG")]
    config: Option<PathBuf>,
    /// Tenant (repository) name.
    #[arg(long, global = true, env = "CAIRN_TENANT")]
    tenant: Option<String>,
    /// File holding the tenant's password.
    #[arg(long, global = true, env = "CAIRN_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// No progress output.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum TypeArg {
    Full,
    Incremental,
    Differential,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a local cluster on 127.0.0.1 in the foreground.
    DevCluster {
        /// Data directory.
        #[arg(long, default_value = ".cairn-dev")]
        dir: PathBuf,
        /// Coordinators.
        #[arg(long, default_value_t = 3)]
        coordinators: usize,
        /// Storage nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Redundancy factor (default: min(3, nodes)).
        #[arg(long)]
        replicas: Option<u32>,
        /// Spread the nodes over this many zones.
        #[arg(long, default_value_t = 3)]
        zones: usize,
    },
    /// Create the tenant and its encryption key.
    Init,
    /// Back up files and directories.
    Backup {
        /// Paths to back up.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// full, incremental (default) or differential.
        #[arg(long = "type", value_enum, default_value = "incremental")]
        kind: TypeArg,
        /// Tag the snapshot (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Host name to record (default: this machine's).
        #[arg(long)]
        host: Option<String>,
        /// Exclude paths matching a glob (repeatable).
        #[arg(long = "exclude")]
        excludes: Vec<String>,
        /// Read exclude globs from a file, one per line.
        #[arg(long)]
        exclude_file: Vec<PathBuf>,
        /// Do not cross file system boundaries.
        #[arg(long)]
        one_file_system: bool,
    },
    /// List snapshots.
    Snapshots {
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        tag: Option<String>,
    },
    /// List the files of a snapshot.
    Ls {
        /// Snapshot id, prefix or `latest`.
        snapshot: String,
        /// Path inside the snapshot.
        path: Option<String>,
    },
    /// Show what changed between two snapshots.
    Diff { a: String, b: String },
    /// Restore a snapshot.
    Restore {
        /// Snapshot id, prefix or `latest`.
        snapshot: String,
        /// Directory to restore into.
        #[arg(long)]
        target: PathBuf,
        /// With `latest`: the latest snapshot at or before this time (RFC 3339).
        #[arg(long)]
        at: Option<String>,
        /// Restore only paths matching a glob (repeatable).
        #[arg(long = "include")]
        includes: Vec<String>,
        /// Re-read the restored files and compare them with the snapshot.
        #[arg(long)]
        verify: bool,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        tag: Option<String>,
    },
    /// Mark a snapshot deleted.
    Forget { snapshot: String },
    /// Check that every referenced chunk is stored (and optionally readable).
    Check {
        /// Download and verify every chunk.
        #[arg(long)]
        read_data: bool,
        /// Download and verify this share of the chunks, e.g. 10%.
        #[arg(long)]
        read_data_subset: Option<String>,
    },
    /// Cluster administration.
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Coordinators, leader, layout and nodes.
    Status,
    /// Storage nodes.
    Nodes,
    /// The placement layout.
    Layout,
    /// Put a node (back) into the layout: Active.
    AddNode { node: u64 },
    /// Take a node out of the cluster for good (Out). Refused while it still reports chunks
    /// (drain it first) unless --force.
    RemoveNode {
        node: u64,
        #[arg(long)]
        force: bool,
    },
    /// Move a node's partitions away (Draining).
    Drain { node: u64 },
    /// Maintenance mode on or off (suppresses Out).
    Maintenance { node: u64, mode: OnOff },
    /// Set the redundancy factor and write quorum.
    SetReplication {
        replicas: u32,
        /// Write quorum (default: a majority).
        #[arg(long, default_value_t = 0)]
        write_quorum: u32,
    },
    /// Add a coordinator (as learner, then voter).
    AddCoordinator { id: u64, address: String },
    /// Remove a coordinator.
    RemoveCoordinator { id: u64 },
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

struct Ctx {
    json: bool,
    quiet: bool,
    coordinators: Vec<String>,
    tenant: String,
    file: cli::config::FileConfig,
    password_file: Option<PathBuf>,
}

impl Ctx {
    async fn cluster(&self) -> anyhow::Result<std::sync::Arc<Cluster>> {
        if self.coordinators.is_empty() {
            bail!("no coordinator: pass --coordinator, set CAIRN_COORDINATOR, or start `cairn dev-cluster`");
        }
        Ok(Cluster::connect(self.coordinators.clone()).await?)
    }
    async fn repo(&self) -> anyhow::Result<Repository> {
        let cluster = self.cluster().await?;
        let pw = cli::config::password(self.password_file.as_deref(), &self.file, false)?;
        Ok(Repository::open(cluster, &self.tenant, &pw).await?)
    }
    fn progress(&self, what: &str) -> Progress {
        Progress::new(!self.json && !self.quiet, what)
    }
}

fn fmt_time(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn snap_json(s: &SnapshotRecord) -> serde_json::Value {
    let st = s.stats.unwrap_or_default();
    json!({
        "id": s.id, "short_id": &s.id[..8.min(s.id.len())], "time": fmt_time(s.time_unix_nanos),
        "host": s.host, "paths": s.paths, "tags": s.tags, "kind": s.kind, "parent": s.parent,
        "root": hex::encode(&s.root),
        "stats": {"files_new": st.files_new, "files_changed": st.files_changed, "files_unmodified": st.files_unmodified,
                  "dirs": st.dirs, "bytes_read": st.bytes_read, "bytes_total": st.bytes_total,
                  "bytes_uploaded": st.bytes_uploaded, "chunks_uploaded": st.chunks_uploaded,
                  "duration_ms": st.duration_ms, "errors": st.errors}
    })
}

fn node_json(n: &NodeInfo) -> serde_json::Value {
    json!({"id": n.id, "address": n.address, "zone": n.zone, "state": NodeState::try_from(n.state).unwrap_or(NodeState::Unspecified).name(),
           "capacity": n.capacity, "used": n.used, "chunks": n.chunks, "under_replicated": n.under_replicated,
           "heartbeat_age_ms": n.heartbeat_age_ms,
           "healing": n.healing.map(|h| json!({"partitions_out_of_sync": h.partitions_out_of_sync, "chunks_pushed": h.chunks_pushed,
               "chunks_offloaded": h.chunks_offloaded, "resync_passes": h.resync_passes, "scrub_checked": h.scrub_checked,
               "scrub_total": h.scrub_total, "scrub_passes": h.scrub_passes, "corrupt_found": h.corrupt_found, "repaired": h.repaired}))})
}

fn print_healing(nodes: &[NodeInfo]) {
    println!(
        "{:>4}  {:>8} {:>9} {:>10} {:>8} {:>14} {:>8} {:>9}",
        "ID", "OUT-SYNC", "PUSHED", "OFFLOADED", "PASSES", "SCRUB", "CORRUPT", "REPAIRED"
    );
    for n in nodes {
        let h = n.healing.unwrap_or_default();
        println!(
            "{:>4}  {:>8} {:>9} {:>10} {:>8} {:>14} {:>8} {:>9}",
            n.id,
            h.partitions_out_of_sync,
            h.chunks_pushed,
            h.chunks_offloaded,
            h.resync_passes,
            format!(
                "{}/{} (#{})",
                h.scrub_checked, h.scrub_total, h.scrub_passes
            ),
            h.corrupt_found,
            h.repaired
        );
    }
}

fn print_nodes(nodes: &[NodeInfo]) {
    println!(
        "{:>4}  {:<22} {:<10} {:<12} {:>10} {:>10} {:>9} {:>8}",
        "ID", "ADDRESS", "ZONE", "STATE", "USED", "CAPACITY", "CHUNKS", "OWED"
    );
    for n in nodes {
        println!(
            "{:>4}  {:<22} {:<10} {:<12} {:>10} {:>10} {:>9} {:>8}",
            n.id,
            n.address,
            n.zone,
            NodeState::try_from(n.state)
                .unwrap_or(NodeState::Unspecified)
                .name(),
            bytes(n.used),
            bytes(n.capacity),
            n.chunks,
            n.under_replicated
        );
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = cli::config::load(cli.config.as_deref())?;
    let ctx = Ctx {
        json: cli.json,
        quiet: cli.quiet,
        coordinators: if cli.coordinator.is_empty() {
            file.coordinator.clone()
        } else {
            cli.coordinator.clone()
        },
        tenant: cli
            .tenant
            .clone()
            .or_else(|| file.tenant.clone())
            .unwrap_or_else(|| "default".into()),
        password_file: cli.password_file.clone(),
        file,
    };
    match cli.cmd {
        Cmd::DevCluster {
            dir,
            coordinators,
            nodes,
            replicas,
            zones,
        } => {
            cli::devcluster::run(
                cli::devcluster::DevOptions {
                    dir,
                    coordinators,
                    nodes,
                    replicas,
                    zones,
                },
                ctx.json,
            )
            .await?;
        }
        Cmd::Init => {
            let cluster = ctx.cluster().await?;
            let pw = cli::config::password(ctx.password_file.as_deref(), &ctx.file, true)?;
            Repository::init(cluster, &ctx.tenant, &pw).await?;
            if ctx.json {
                println!("{}", json!({"tenant": ctx.tenant, "created": true}));
            } else {
                println!(
                    "created tenant {} (keep the password: without it the data cannot be read)",
                    ctx.tenant
                );
            }
        }
        Cmd::Backup {
            paths,
            kind,
            tags,
            host,
            mut excludes,
            exclude_file,
            one_file_system,
        } => {
            for f in exclude_file {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?;
                excludes.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(String::from),
                );
            }
            let repo = ctx.repo().await?;
            let opts = BackupOptions {
                host: host
                    .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned()),
                tags,
                kind: match kind {
                    TypeArg::Full => BackupKind::Full,
                    TypeArg::Incremental => BackupKind::Incremental,
                    TypeArg::Differential => BackupKind::Differential,
                },
                excludes,
                one_file_system,
                ..Default::default()
            };
            let progress = ctx.progress("backup");
            let s = repo.backup(&paths, &opts, &progress).await?;
            if ctx.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                for w in &s.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "snapshot {} saved ({}{})",
                    &s.snapshot[..8],
                    s.kind,
                    if s.parent.is_empty() {
                        String::new()
                    } else {
                        format!(", parent {}", &s.parent[..8])
                    }
                );
                println!(
                    "  files: {} new, {} changed, {} unmodified; {} dirs",
                    s.files_new, s.files_changed, s.files_unmodified, s.dirs
                );
                println!(
                    "  read {} of {}; uploaded {} in {} chunks; {:.1}s",
                    bytes(s.bytes_read),
                    bytes(s.bytes_total),
                    bytes(s.bytes_uploaded),
                    s.chunks_uploaded,
                    s.duration_ms as f64 / 1000.0
                );
            }
            if !s.warnings.is_empty() {
                return Ok(ExitCode::from(3));
            }
        }
        Cmd::Snapshots { host, path, tag } => {
            let repo = ctx.repo().await?;
            let q = SnapshotQuery {
                host: host.unwrap_or_default(),
                path: path.unwrap_or_default(),
                tag: tag.unwrap_or_default(),
                before_unix_nanos: 0,
            };
            let list = repo.snapshots(&q).await?;
            if ctx.json {
                println!(
                    "{}",
                    serde_json::Value::Array(list.iter().map(snap_json).collect())
                );
            } else {
                println!(
                    "{:<10} {:<21} {:<14} {:<13} {:>10}  PATHS",
                    "ID", "TIME", "HOST", "TYPE", "SIZE"
                );
                for s in &list {
                    let st = s.stats.unwrap_or_default();
                    println!(
                        "{:<10} {:<21} {:<14} {:<13} {:>10}  {}",
                        &s.id[..8],
                        fmt_time(s.time_unix_nanos),
                        s.host,
                        s.kind,
                        bytes(st.bytes_total),
                        s.paths.join(" ")
                    );
                }
                println!("{} snapshots", list.len());
            }
        }
        Cmd::Ls { snapshot, path } => {
            let repo = ctx.repo().await?;
            let snap = repo
                .find_snapshot(&snapshot, &SnapshotQuery::default())
                .await?;
            let entries = repo.ls(&snap, path.as_deref().unwrap_or("/")).await?;
            if ctx.json {
                println!("{}", serde_json::to_string(&entries)?);
            } else {
                for e in entries {
                    println!("{:<8} {:>10} {:o} {}", e.kind, e.size, e.mode, e.path);
                }
            }
        }
        Cmd::Diff { a, b } => {
            let repo = ctx.repo().await?;
            let sa = repo.find_snapshot(&a, &SnapshotQuery::default()).await?;
            let sb = repo.find_snapshot(&b, &SnapshotQuery::default()).await?;
            let d = repo.diff(&sa, &sb).await?;
            if ctx.json {
                println!("{}", serde_json::to_string(&d)?);
            } else {
                for e in &d {
                    println!("{}  {}", e.change, e.path);
                }
                println!(
                    "{} added, {} removed, {} modified",
                    d.iter().filter(|e| e.change == "+").count(),
                    d.iter().filter(|e| e.change == "-").count(),
                    d.iter().filter(|e| e.change == "M").count()
                );
            }
        }
        Cmd::Restore {
            snapshot,
            target,
            at,
            includes,
            verify,
            host,
            path,
            tag,
        } => {
            let repo = ctx.repo().await?;
            let before = match &at {
                Some(t) => {
                    let st = humantime::parse_rfc3339_weak(t).with_context(|| {
                        format!("--at {t}: expected a time like 2026-11-21T10:00:00Z")
                    })?;
                    st.duration_since(std::time::UNIX_EPOCH)?.as_nanos() as i64
                }
                None => 0,
            };
            if at.is_some() && snapshot != "latest" {
                bail!("--at selects among snapshots: use it with `latest`");
            }
            let q = SnapshotQuery {
                host: host.unwrap_or_default(),
                path: path.unwrap_or_default(),
                tag: tag.unwrap_or_default(),
                before_unix_nanos: before,
            };
            let snap = repo.find_snapshot(&snapshot, &q).await?;
            let progress = ctx.progress("restore");
            let s = repo
                .restore(
                    &snap,
                    &RestoreOptions {
                        target: target.clone(),
                        includes,
                        verify,
                    },
                    &progress,
                )
                .await?;
            if ctx.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                for b in &s.bad_copies {
                    eprintln!("warning: bad copy of chunk {} on node {}: {} (restored from another replica)", &b.chunk[..16], b.node, b.error);
                }
                println!(
                    "restored snapshot {} to {}: {} files, {} dirs, {} symlinks, {}{}; {:.1}s",
                    &s.snapshot[..8],
                    target.display(),
                    s.files,
                    s.dirs,
                    s.symlinks,
                    bytes(s.bytes),
                    if verify {
                        format!(", {} files verified", s.verified)
                    } else {
                        String::new()
                    },
                    s.duration_ms as f64 / 1000.0
                );
            }
        }
        Cmd::Forget { snapshot } => {
            let repo = ctx.repo().await?;
            let snap = repo
                .find_snapshot(&snapshot, &SnapshotQuery::default())
                .await?;
            let id = snap.id.clone();
            repo.cluster
                .coord
                .call(|mut c| {
                    let id = id.clone();
                    async move { c.delete_snapshot(DeleteSnapshotRequest { id }).await }
                })
                .await?;
            if ctx.json {
                println!("{}", json!({"forgotten": snap.id}));
            } else {
                println!("snapshot {} marked deleted", &snap.id[..8]);
            }
        }
        Cmd::Check {
            read_data,
            read_data_subset,
        } => {
            let pct = match (read_data, read_data_subset) {
                (true, _) => Some(100.0),
                (false, Some(s)) => Some(
                    s.trim_end_matches('%')
                        .parse::<f64>()
                        .context("--read-data-subset takes a percentage like 10%")?,
                ),
                _ => None,
            };
            let repo = ctx.repo().await?;
            let r = repo.check(pct).await?;
            if ctx.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} snapshots, {} trees, {} chunks; {} missing, {} below R={}",
                    r.snapshots,
                    r.trees,
                    r.chunks,
                    r.missing.len(),
                    r.under_replicated,
                    r.replicas
                );
                if pct.is_some() {
                    println!(
                        "{} chunks downloaded and verified, {} errors",
                        r.read_verified,
                        r.read_errors.len()
                    );
                }
                for m in &r.missing {
                    println!("missing chunk {m}");
                }
                for e in &r.read_errors {
                    println!("error: {e}");
                }
                println!(
                    "{}",
                    if r.ok() {
                        "no errors found"
                    } else {
                        "ERRORS FOUND"
                    }
                );
            }
            if !r.ok() {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Cluster(c) => cluster_cmd(&ctx, c).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn cluster_cmd(ctx: &Ctx, c: ClusterCmd) -> anyhow::Result<()> {
    if ctx.coordinators.is_empty() {
        bail!("no coordinator: pass --coordinator, set CAIRN_COORDINATOR, or start `cairn dev-cluster`");
    }
    let coord = cairn_proto::coord_client::CoordClient::new(ctx.coordinators.clone())?;
    let set_state = |node: u64, state: NodeState| {
        let coord = &coord;
        async move {
            let n = coord
                .call(|mut c| async move {
                    c.set_node_state(SetNodeStateRequest {
                        id: node,
                        state: state as i32,
                    })
                    .await
                })
                .await?;
            if ctx.json {
                println!("{}", node_json(&n));
            } else {
                println!("node {} is now {}", n.id, state.name());
            }
            anyhow::Ok(())
        }
    };
    match c {
        ClusterCmd::Status => {
            // Ask the leader (any coordinator redirects) so usage figures are current.
            let nodes = coord
                .call(|mut c| async move { c.list_nodes(ListNodesRequest {}).await })
                .await?
                .nodes;
            let s = coord
                .call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await })
                .await?;
            let under: u64 = nodes.iter().map(|n| n.under_replicated).sum();
            if ctx.json {
                println!(
                    "{}",
                    json!({"leader": s.leader_id, "leader_address": s.leader_address, "term": s.term, "last_applied": s.last_applied,
                    "coordinators": s.members.iter().map(|m| json!({"id": m.id, "address": m.address, "voter": m.voter})).collect::<Vec<_>>(),
                    "layout_version": s.layout_version, "replicas": s.replicas, "write_quorum": s.write_quorum,
                    "snapshots": s.snapshots, "under_replicated": under, "nodes": nodes.iter().map(node_json).collect::<Vec<_>>()})
                );
            } else {
                println!(
                    "leader: coordinator {} at {} (term {})",
                    s.leader_id.map(|l| l.to_string()).unwrap_or("none".into()),
                    s.leader_address,
                    s.term
                );
                for m in &s.members {
                    println!(
                        "  coordinator {} {} {}",
                        m.id,
                        m.address,
                        if m.voter { "voter" } else { "learner" }
                    );
                }
                let out_of_sync: u64 = nodes
                    .iter()
                    .filter_map(|n| n.healing)
                    .map(|h| h.partitions_out_of_sync)
                    .sum();
                println!(
                    "layout version {}, R={} W={}, {} snapshots, {} copies owed (under-replicated), {} partition replicas out of sync",
                    s.layout_version, s.replicas, s.write_quorum, s.snapshots, under, out_of_sync
                );
                print_nodes(&nodes);
                println!("self-healing (anti-entropy, rebalance, drain, scrub):");
                print_healing(&nodes);
            }
        }
        ClusterCmd::Nodes => {
            let nodes = coord
                .call(|mut c| async move { c.list_nodes(ListNodesRequest {}).await })
                .await?
                .nodes;
            if ctx.json {
                println!(
                    "{}",
                    serde_json::Value::Array(nodes.iter().map(node_json).collect())
                );
            } else {
                print_nodes(&nodes);
            }
        }
        ClusterCmd::Layout => {
            let l =
                coord
                    .call(|mut c| async move {
                        c.get_layout(GetLayoutRequest { allow_stale: false }).await
                    })
                    .await?;
            let mut count: std::collections::BTreeMap<u64, (usize, usize)> = Default::default();
            for p in &l.partitions {
                for (i, n) in p.nodes.iter().enumerate() {
                    let e = count.entry(*n).or_default();
                    e.0 += 1;
                    if i == 0 {
                        e.1 += 1;
                    }
                }
            }
            if ctx.json {
                println!(
                    "{}",
                    json!({"version": l.version, "replicas": l.replicas, "write_quorum": l.write_quorum, "partitions": l.partitions.len(),
                    "nodes": count.iter().map(|(n, (r, p))| json!({"node": n, "address": l.addresses.get(n), "partitions": r, "primary": p})).collect::<Vec<_>>()})
                );
            } else {
                println!(
                    "layout version {}: {} partitions, R={} W={}",
                    l.version,
                    l.partitions.len(),
                    l.replicas,
                    l.write_quorum
                );
                for (n, (r, p)) in count {
                    println!(
                        "  node {n:>3} {:<22} {r:>5} partitions ({p} as primary)",
                        l.addresses.get(&n).map(String::as_str).unwrap_or("")
                    );
                }
            }
        }
        ClusterCmd::AddNode { node } => set_state(node, NodeState::Active).await?,
        ClusterCmd::RemoveNode { node, force } => {
            let nodes = coord
                .call(|mut c| async move { c.list_nodes(ListNodesRequest {}).await })
                .await?
                .nodes;
            let n = nodes
                .iter()
                .find(|n| n.id == node)
                .with_context(|| format!("no node {node}"))?;
            let live = n.heartbeat_age_ms.is_some_and(|a| a < 10_000);
            if live && n.chunks > 0 && !force {
                bail!(
                    "node {node} still holds {} chunks: drain it first (cairn cluster drain {node}), or use --force",
                    n.chunks
                );
            }
            set_state(node, NodeState::Out).await?
        }
        ClusterCmd::Drain { node } => set_state(node, NodeState::Draining).await?,
        ClusterCmd::Maintenance { node, mode } => {
            set_state(
                node,
                match mode {
                    OnOff::On => NodeState::Maintenance,
                    OnOff::Off => NodeState::Active,
                },
            )
            .await?
        }
        ClusterCmd::SetReplication {
            replicas,
            write_quorum,
        } => {
            let l = coord
                .call(|mut c| async move {
                    c.set_replication(SetReplicationRequest {
                        replicas,
                        write_quorum,
                    })
                    .await
                })
                .await?;
            if ctx.json {
                println!(
                    "{}",
                    json!({"version": l.version, "replicas": l.replicas, "write_quorum": l.write_quorum})
                );
            } else {
                println!(
                    "layout version {}: R={} W={}",
                    l.version, l.replicas, l.write_quorum
                );
            }
        }
        ClusterCmd::AddCoordinator { id, address } => {
            let r = coord
                .call(|mut c| {
                    let address = address.clone();
                    async move {
                        c.add_coordinator(AddCoordinatorRequest { id, address })
                            .await
                    }
                })
                .await?;
            if ctx.json {
                println!(
                    "{}",
                    json!({"members": r.members.iter().map(|m| json!({"id": m.id, "address": m.address, "voter": m.voter})).collect::<Vec<_>>()})
                );
            } else {
                println!("coordinator {id} added; {} members", r.members.len());
            }
        }
        ClusterCmd::RemoveCoordinator { id } => {
            let r =
                coord
                    .call(|mut c| async move {
                        c.remove_coordinator(RemoveCoordinatorRequest { id }).await
                    })
                    .await?;
            if ctx.json {
                println!(
                    "{}",
                    json!({"members": r.members.iter().map(|m| json!({"id": m.id, "address": m.address, "voter": m.voter})).collect::<Vec<_>>()})
                );
            } else {
                println!("coordinator {id} removed; {} members", r.members.len());
            }
        }
    }
    Ok(())
}

/// Lets the process keep open as many files as its hard limit allows, up to 65,536, as Go
/// programs do: a restore keeps up to about a thousand files open while their chunks are
/// fetched, and many systems start processes with a soft limit of 1,024.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(1 << 16);
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
        }
    }
}

fn main() -> ExitCode {
    raise_open_files_limit();
    // A reader that goes away (`cairn snapshots | head`) ends the output quietly, as in other
    // Unix tools, instead of a panic report.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let json = cli.json;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if json {
                println!("{}", json!({"error": format!("{e:#}")}));
            } else {
                eprintln!("cairn: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
