//! Composition root of the storage node: opens the store, binds, registers with the
//! coordinator, starts heartbeats and the repair worker, serves, and shuts down in order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::coord_client::CoordClient;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::chunkstore::{ChunkStore, StoreError};
use crate::healing::{HealConfig, Healer};
use crate::membership::{Membership, MembershipError};
use crate::replication::Replicator;
use crate::service::{ChunkRouter, ChunkService};

/// Storage node configuration (flags > environment > TOML file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Listen address.
    pub listen: String,
    /// Address others use (default: the bound address).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Coordinator addresses.
    pub coordinators: Vec<String>,
    /// Failure domain.
    #[serde(default = "d_zone")]
    pub zone: String,
    /// Capacity, e.g. `500G` (the placement weight).
    #[serde(default = "d_capacity")]
    pub capacity: String,
    /// Heartbeat period.
    #[serde(default = "d_heartbeat")]
    pub heartbeat_ms: u64,
    /// Repair queue period.
    #[serde(default = "d_repair")]
    pub repair_ms: u64,
    /// Anti-entropy period (also runs on every layout change).
    #[serde(default = "d_resync")]
    pub resync_ms: u64,
    /// Pause between scrub passes.
    #[serde(default = "d_scrub")]
    pub scrub_ms: u64,
    /// A secret shared by the cluster's storage nodes: nodes with the same one trust the blob
    /// hashes of the puts they forward to each other and check those blobs' CRC-32 instead of
    /// hashing them again. Without it (or with different ones) replicas verify every hash.
    #[serde(default)]
    pub cluster_secret: Option<String>,
}

fn d_resync() -> u64 {
    60_000
}
fn d_scrub() -> u64 {
    7 * 24 * 3600 * 1000
}

fn d_zone() -> String {
    "default".into()
}
fn d_capacity() -> String {
    "100G".into()
}
fn d_heartbeat() -> u64 {
    1000
}
fn d_repair() -> u64 {
    2000
}

/// Parses `500G`, `1T`, `1024M`, `4096` (bytes).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let m = match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                "P" => 1 << 50,
                _ => return None,
            };
            (&s[..i], m)
        }
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// Start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The store failed to open.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Registration failed.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// Binding failed.
    #[error("listen: {0}")]
    Io(#[from] std::io::Error),
}

/// A running storage node.
pub struct Running {
    /// Bound address.
    pub addr: SocketAddr,
    /// Node id.
    pub id: u64,
    store: ChunkStore,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Starts a storage node.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let capacity = parse_size(&cfg.capacity)
        .filter(|c| *c > 0)
        .ok_or_else(|| StartError::Config(format!("bad capacity {:?}", cfg.capacity)))?;
    if cfg.coordinators.is_empty() {
        return Err(StartError::Config(
            "at least one --coordinator is required".into(),
        ));
    }
    std::fs::create_dir_all(&cfg.data_dir)?;
    let store = ChunkStore::open(&cfg.data_dir)?;
    let stats = store.stats();
    info!(
        chunks = stats.chunks,
        segments = stats.segments,
        "chunk store open"
    );

    let listener = TcpListener::bind(&cfg.listen).await?;
    let addr = listener.local_addr()?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());
    let coord = Arc::new(
        CoordClient::new(cfg.coordinators.clone())
            .map_err(|e| StartError::Config(e.message().to_string()))?
            .with_deadline(Duration::from_secs(120)),
    );
    let me =
        Membership::register(&cfg.data_dir, coord, advertise, cfg.zone.clone(), capacity).await?;
    let token = cfg
        .cluster_secret
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(cairn_proto::ReplicaToken::from_secret);
    let repl = Replicator::new(me.clone(), store.clone(), token.clone())?;
    let healer = Healer::new(
        me.clone(),
        store.clone(),
        repl.clone(),
        HealConfig {
            resync: Duration::from_millis(cfg.resync_ms),
            scrub: Duration::from_millis(cfg.scrub_ms),
        },
    );

    let (tx, rx) = watch::channel(false);
    let mut srx = rx.clone();
    let tasks = vec![
        tokio::spawn(me.clone().run_heartbeats(
            healer.clone(),
            Duration::from_millis(cfg.heartbeat_ms),
            rx.clone(),
        )),
        tokio::spawn(
            repl.clone()
                .run_repairs(Duration::from_millis(cfg.repair_ms), rx.clone()),
        ),
        tokio::spawn(healer.clone().run_resync(rx.clone())),
        tokio::spawn(healer.clone().run_scrub(rx.clone())),
        tokio::spawn(healer.clone().run_pulls(rx.clone())),
    ];
    let svc = ChunkRouter::new(
        ChunkService::new(store.clone(), repl, me.clone(), healer),
        token,
    );
    let incoming = cairn_proto::transport::incoming(listener);
    let server = tokio::spawn(
        cairn_proto::transport::server()
            .max_frame_size(cairn_proto::transport::BLOB_FRAME)
            .concurrency_limit_per_connection(64)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = srx.changed().await;
            }),
    );
    info!(%addr, node = me.id(), "serving");
    Ok(Running {
        addr,
        id: me.id(),
        store,
        shutdown: tx,
        tasks,
        server,
    })
}

impl Running {
    /// Stops serving, stops the workers, then closes the store.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        cairn_proto::transport::stop_server(self.server, Duration::from_secs(3)).await;
        for t in self.tasks {
            let _ = t.await;
        }
        self.store.close().await;
        info!("stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1K"), Some(1024));
        assert_eq!(parse_size("500G"), Some(500 << 30));
        assert_eq!(parse_size("2TiB"), Some(2 << 40));
        assert_eq!(parse_size("1X"), None);
        assert_eq!(parse_size(""), None);
    }
}
