//! Composition root: validates the configuration, opens the stores, starts Raft, bootstraps the
//! group once, serves the public and Raft services on one tonic server, and shuts everything
//! down in order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::metadata::coordinator_server::CoordinatorServer;
use cairn_proto::raft::raft_service_server::RaftServiceServer;
use openraft::{BasicNode, SnapshotPolicy};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::network::Network;
use crate::node::{CoordinatorNode, LivenessConfig};
use crate::service::{CoordinatorService, RaftRpc};
use crate::types::{NodeId, Raft};

/// Everything a coordinator needs to start. Flags, environment and a TOML file fill it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Raft id (never reused).
    pub id: NodeId,
    /// Listen address.
    pub listen: String,
    /// Address peers and clients use to reach this coordinator (defaults to `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// The initial voters, `ID=ADDR`, this one included.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Join an existing group (never bootstrap).
    #[serde(default)]
    pub join: bool,
    /// Raft heartbeat interval.
    #[serde(default = "d_heartbeat")]
    pub heartbeat_ms: u64,
    /// Lower bound of the election timeout (upper bound = 2x).
    #[serde(default = "d_election")]
    pub election_timeout_ms: u64,
    /// Build a snapshot after this many log entries.
    #[serde(default = "d_snapshot_logs")]
    pub snapshot_logs: u64,
    /// Storage node becomes Down after this much silence.
    #[serde(default = "d_down")]
    pub node_down_ms: u64,
    /// Storage node becomes Out after this long Down.
    #[serde(default = "d_out")]
    pub node_out_ms: u64,
}

fn d_heartbeat() -> u64 {
    100
}
fn d_election() -> u64 {
    600
}
fn d_snapshot_logs() -> u64 {
    1000
}
fn d_down() -> u64 {
    10_000
}
fn d_out() -> u64 {
    600_000
}

/// Configuration and start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The store could not be opened.
    #[error("opening the store: {0}")]
    Store(#[from] sled::Error),
    /// Raft could not start.
    #[error("raft: {0}")]
    Raft(String),
    /// The listener could not bind.
    #[error("listen: {0}")]
    Io(#[from] std::io::Error),
    /// The server failed.
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl Config {
    /// Parses `--peer` values into the initial membership.
    pub fn members(&self) -> Result<BTreeMap<NodeId, BasicNode>, StartError> {
        let mut m = BTreeMap::new();
        for p in &self.peers {
            let (id, addr) = p
                .split_once('=')
                .ok_or_else(|| StartError::Config(format!("peer {p:?} is not ID=ADDR")))?;
            let id: NodeId = id
                .parse()
                .map_err(|_| StartError::Config(format!("peer id {id:?} is not a number")))?;
            m.insert(
                id,
                BasicNode {
                    addr: addr.to_string(),
                },
            );
        }
        m.entry(self.id).or_insert_with(|| BasicNode {
            addr: self.advertise().to_string(),
        });
        Ok(m)
    }

    /// The address others use.
    pub fn advertise(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    fn raft_config(&self) -> Result<openraft::Config, StartError> {
        let c = openraft::Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_ms,
            election_timeout_max: self.election_timeout_ms * 2,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            max_in_snapshot_log_to_keep: self.snapshot_logs.min(1000),
            snapshot_max_chunk_size: 1 << 20,
            ..Default::default()
        };
        c.validate().map_err(|e| StartError::Config(e.to_string()))
    }
}

/// A running coordinator.
pub struct Running {
    /// The domain handle.
    pub node: Arc<CoordinatorNode>,
    /// The address actually bound.
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    liveness: tokio::task::JoinHandle<()>,
}

/// Starts a coordinator and returns once it serves.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    if cfg.id == 0 {
        return Err(StartError::Config("--id must be at least 1".into()));
    }
    let members = cfg.members()?;
    let raft_config = Arc::new(cfg.raft_config()?);
    std::fs::create_dir_all(&cfg.data_dir)?;
    let (log, sm) = crate::store::open(&cfg.data_dir)?;
    let reader = sm.reader();
    info!(id = cfg.id, dir = %cfg.data_dir.display(), "opened store");

    let raft = Raft::new(cfg.id, raft_config, Network::default(), log, sm)
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;

    let listener = TcpListener::bind(&cfg.listen).await?;
    let addr = listener.local_addr()?;
    info!(%addr, "listening");

    let node = Arc::new(CoordinatorNode::new(
        cfg.id,
        raft.clone(),
        reader,
        LivenessConfig {
            down_after: Duration::from_millis(cfg.node_down_ms),
            out_after: Duration::from_millis(cfg.node_out_ms),
        },
    ));
    let (tx, rx) = watch::channel(false);
    let mut srx = rx.clone();
    let server = tokio::spawn(
        cairn_proto::transport::server()
            .add_service(
                CoordinatorServer::new(CoordinatorService::new(node.clone()))
                    .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE),
            )
            .add_service(
                RaftServiceServer::new(RaftRpc::new(raft.clone()))
                    .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE),
            )
            .serve_with_incoming_shutdown(cairn_proto::transport::incoming(listener), async move {
                let _ = srx.changed().await;
            }),
    );

    // Bootstrap exactly once: only the lowest id of the initial peers, only on a fresh store,
    // never with --join. A restart finds the store initialised and does nothing.
    let lowest = members.keys().next().copied();
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    if !cfg.join && lowest == Some(cfg.id) && !initialized {
        info!(members = ?members.keys().collect::<Vec<_>>(), "bootstrapping the coordinator group");
        if let Err(e) = raft.initialize(members).await {
            warn!(error = %e, "bootstrap skipped");
        }
    }

    let liveness = tokio::spawn(node.clone().run_liveness(rx));
    Ok(Running {
        node,
        addr,
        shutdown: tx,
        server,
        liveness,
    })
}

impl Running {
    /// Stops serving, stops background tasks, then stops Raft.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        cairn_proto::transport::stop_server(self.server, Duration::from_secs(3)).await;
        let _ = self.liveness.await;
        if let Err(e) = self.node.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
        info!("stopped");
    }
}
