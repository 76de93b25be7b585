//! `cairn-storage-node`: one storage node.

use std::path::PathBuf;

use anyhow::Context;
use cairn_storage_node::app::{self, Config};
use clap::Parser;
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// jemalloc keeps freed pages for reuse a while. With glibc's allocator, page faults on fresh
/// message buffers were a tenth of a node's CPU during a backup; with jemalloc the three nodes
/// of a dev cluster use about 12% less CPU for the same backup.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Flags override the environment, which overrides the TOML file.
#[derive(Parser, Debug)]
#[command(
    name = "cairn-storage-node",
    version,
    about = "Cairn storage node (chunk store)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "CAIRN_LISTEN")]
    listen: Option<String>,
    /// Address others reach this node at (default: the bound address).
    #[arg(long, env = "CAIRN_ADVERTISE")]
    advertise: Option<String>,
    /// Data directory.
    #[arg(long, env = "CAIRN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Coordinator addresses, comma-separated.
    #[arg(long = "coordinator", env = "CAIRN_COORDINATOR", value_delimiter = ',')]
    coordinators: Vec<String>,
    /// Failure domain (zone).
    #[arg(long, env = "CAIRN_ZONE")]
    zone: Option<String>,
    /// Capacity, e.g. 500G.
    #[arg(long, env = "CAIRN_CAPACITY")]
    capacity: Option<String>,
    /// Heartbeat period in ms.
    #[arg(long, env = "CAIRN_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// Anti-entropy period in ms.
    #[arg(long, env = "CAIRN_RESYNC_MS")]
    resync_ms: Option<u64>,
    /// Pause between scrub passes in ms.
    #[arg(long, env = "CAIRN_SCRUB_MS")]
    scrub_ms: Option<u64>,
    /// Secret shared by the cluster's storage nodes (forwarded puts are then checked by CRC-32).
    #[arg(long, env = "CAIRN_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// TOML configuration file (keys as the long flags).
    #[arg(long, env = "CAIRN_CONFIG")]
    config: Option<PathBuf>,
}

fn load(args: Args) -> anyhow::Result<Config> {
    let mut t: toml::Table = match &args.config {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
            .parse()
            .with_context(|| format!("parsing {}", p.display()))?,
        None => toml::Table::new(),
    };
    let mut set = |k: &str, v: Option<toml::Value>| {
        if let Some(v) = v {
            t.insert(k.into(), v);
        }
    };
    set("listen", args.listen.map(toml::Value::String));
    set("advertise", args.advertise.map(toml::Value::String));
    set(
        "data-dir",
        args.data_dir
            .map(|p| toml::Value::String(p.display().to_string())),
    );
    if !args.coordinators.is_empty() {
        set(
            "coordinators",
            Some(toml::Value::Array(
                args.coordinators
                    .into_iter()
                    .map(toml::Value::String)
                    .collect(),
            )),
        );
    }
    set("zone", args.zone.map(toml::Value::String));
    set("capacity", args.capacity.map(toml::Value::String));
    set(
        "cluster-secret",
        args.cluster_secret.map(toml::Value::String),
    );
    for (k, v) in [
        ("heartbeat-ms", args.heartbeat_ms),
        ("resync-ms", args.resync_ms),
        ("scrub-ms", args.scrub_ms),
    ] {
        set(k, v.map(|v| toml::Value::Integer(v as i64)));
    }
    Config::deserialize(t).context("configuration (need --listen, --data-dir and --coordinator)")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("cairn_storage_node=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = load(Args::parse())?;
    let running = app::start(cfg).await?;
    println!(
        "cairn-storage-node {} listening on {}",
        running.id, running.addr
    );
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    running.shutdown().await;
    Ok(())
}
