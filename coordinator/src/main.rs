//! `cairn-coordinator`: one member of the coordinator group.

use std::path::PathBuf;

use anyhow::Context;
use cairn_coordinator::app::{self, Config};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Flags override the environment, which overrides the TOML file.
#[derive(Parser, Debug)]
#[command(
    name = "cairn-coordinator",
    version,
    about = "Cairn coordinator (Raft-replicated catalog)"
)]
struct Args {
    /// Raft id of this coordinator (>= 1, never reused).
    #[arg(long, env = "CAIRN_ID")]
    id: Option<u64>,
    /// Address to listen on.
    #[arg(long, env = "CAIRN_LISTEN")]
    listen: Option<String>,
    /// Address others reach this coordinator at (default: --listen).
    #[arg(long, env = "CAIRN_ADVERTISE")]
    advertise: Option<String>,
    /// Data directory.
    #[arg(long, env = "CAIRN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Initial voter, ID=ADDR (repeat; include this one).
    #[arg(long = "peer", env = "CAIRN_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Join an existing group instead of bootstrapping.
    #[arg(long)]
    join: bool,
    /// TOML configuration file (keys as the long flags).
    #[arg(long, env = "CAIRN_CONFIG")]
    config: Option<PathBuf>,
    /// Storage node becomes Down after this many ms without heartbeat.
    #[arg(long, env = "CAIRN_NODE_DOWN_MS")]
    node_down_ms: Option<u64>,
    /// Storage node becomes Out after this many ms Down.
    #[arg(long, env = "CAIRN_NODE_OUT_MS")]
    node_out_ms: Option<u64>,
    /// Build a Raft snapshot every this many log entries.
    #[arg(long, env = "CAIRN_SNAPSHOT_LOGS")]
    snapshot_logs: Option<u64>,
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
    set("id", args.id.map(|v| toml::Value::Integer(v as i64)));
    set("listen", args.listen.map(toml::Value::String));
    set("advertise", args.advertise.map(toml::Value::String));
    set(
        "data-dir",
        args.data_dir
            .map(|p| toml::Value::String(p.display().to_string())),
    );
    if !args.peers.is_empty() {
        set(
            "peers",
            Some(toml::Value::Array(
                args.peers.into_iter().map(toml::Value::String).collect(),
            )),
        );
    }
    if args.join {
        set("join", Some(toml::Value::Boolean(true)));
    }
    for (k, v) in [
        ("node-down-ms", args.node_down_ms),
        ("node-out-ms", args.node_out_ms),
        ("snapshot-logs", args.snapshot_logs),
    ] {
        set(k, v.map(|v| toml::Value::Integer(v as i64)));
    }
    Config::deserialize(t).context("configuration (need --id, --listen and --data-dir)")
}

use serde::Deserialize;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("cairn_coordinator=info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = load(Args::parse())?;
    let running = app::start(cfg).await?;
    println!("cairn-coordinator listening on {}", running.addr);
    shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
