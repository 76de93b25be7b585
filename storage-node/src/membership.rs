//! This node's place in the cluster: its identity (id and secret, kept in the data directory),
//! registration with the coordinator, heartbeats, and the cached placement layout.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use cairn_proto::coord_client::CoordClient;
use cairn_proto::metadata::{GetLayoutRequest, HeartbeatRequest, RegisterNodeRequest};
use cairn_proto::types::Layout;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

/// What the node reports in heartbeats.
pub struct Usage {
    /// Bytes stored.
    pub used: u64,
    /// Chunks stored.
    pub chunks: u64,
    /// Copies owed to other replicas.
    pub under_replicated: u64,
    /// Self-healing counters.
    pub healing: Option<cairn_proto::chunk::HealingStats>,
}

/// Where heartbeats get their figures.
pub trait UsageSource: Send + Sync {
    /// Current usage.
    fn usage(&self) -> Usage;
}

/// Identity and layout of this node.
pub struct Membership {
    coord: Arc<CoordClient>,
    id: AtomicU64,
    secret: String,
    address: String,
    zone: String,
    capacity: u64,
    layout: RwLock<Arc<Layout>>,
    last_refresh: Mutex<Option<Instant>>,
}

/// Membership errors.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The identity files could not be read or written.
    #[error("node identity in {0}: {1}")]
    Identity(PathBuf, std::io::Error),
    /// The coordinator refused or could not be reached.
    #[error("coordinator: {0}")]
    Coordinator(#[from] tonic::Status),
}

fn write_durable(path: &Path, data: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Membership {
    /// Loads or creates this node's identity and registers with the coordinator.
    pub async fn register(
        dir: &Path,
        coord: Arc<CoordClient>,
        address: String,
        zone: String,
        capacity: u64,
    ) -> Result<Arc<Self>, MembershipError> {
        let secret_path = dir.join("node.secret");
        let id_path = dir.join("node.id");
        let ident = |e| MembershipError::Identity(dir.to_path_buf(), e);
        let secret = match std::fs::read_to_string(&secret_path) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let s = hex::encode(rand::random::<[u8; 32]>());
                write_durable(&secret_path, &s).map_err(ident)?;
                s
            }
            Err(e) => return Err(ident(e)),
        };
        let id: u64 = match std::fs::read_to_string(&id_path) {
            Ok(s) => s.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(ident(e)),
        };
        let req = RegisterNodeRequest {
            id,
            secret: secret.clone(),
            address: address.clone(),
            zone: zone.clone(),
            capacity,
        };
        let reply = coord
            .call(|mut c| {
                let r = req.clone();
                async move { c.register_node(r).await }
            })
            .await?;
        if reply.id != id {
            write_durable(&id_path, &reply.id.to_string()).map_err(ident)?;
        }
        info!(node = reply.id, %address, %zone, "registered with the coordinator");
        Ok(Arc::new(Self {
            coord,
            id: AtomicU64::new(reply.id),
            secret,
            address,
            zone,
            capacity,
            layout: RwLock::new(Arc::new(reply.layout.unwrap_or_default())),
            last_refresh: Mutex::new(None),
        }))
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    /// The layout this node knows.
    pub fn layout(&self) -> Arc<Layout> {
        self.layout.read().expect("layout lock").clone()
    }

    /// Whether this node is a replica of `partition` in the layout it knows.
    pub fn serves(&self, partition: u32) -> bool {
        self.layout().replicas(partition).contains(&self.id())
    }

    /// Whether this node serves `partition`, refreshing the layout (at most every 500 ms) when
    /// the cached one says no — the client may know a newer layout.
    pub async fn serves_fresh(&self, partition: u32) -> bool {
        if self.serves(partition) {
            return true;
        }
        {
            let mut last = self.last_refresh.lock().await;
            if last.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
                return false;
            }
            *last = Some(Instant::now());
        }
        if let Err(e) = self.refresh_layout().await {
            warn!(error = %e, "layout refresh failed");
        }
        self.serves(partition)
    }

    /// Fetches the current layout.
    pub async fn refresh_layout(&self) -> Result<(), tonic::Status> {
        let l = self
            .coord
            .call(
                |mut c| async move { c.get_layout(GetLayoutRequest { allow_stale: false }).await },
            )
            .await?;
        let mut cur = self.layout.write().expect("layout lock");
        if l.version >= cur.version {
            if l.version > cur.version {
                info!(version = l.version, "layout updated");
            }
            *cur = Arc::new(l);
        }
        Ok(())
    }

    /// Sends heartbeats every `period` until shutdown; follows layout versions.
    pub async fn run_heartbeats(
        self: Arc<Self>,
        usage: Arc<dyn UsageSource>,
        period: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            let u = usage.usage();
            let req = HeartbeatRequest {
                id: self.id(),
                secret: self.secret.clone(),
                used: u.used,
                chunks: u.chunks,
                under_replicated: u.under_replicated,
                layout_version: self.layout().version,
                healing: u.healing,
            };
            let res = self
                .coord
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.heartbeat(r).await }
                })
                .await;
            match res {
                Ok(reply) if reply.layout_version != self.layout().version => {
                    if let Err(e) = self.refresh_layout().await {
                        warn!(error = %e, "layout refresh failed");
                    }
                }
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::NotFound => {
                    warn!("coordinator does not know this node; registering again");
                    let req = RegisterNodeRequest {
                        id: self.id(),
                        secret: self.secret.clone(),
                        address: self.address.clone(),
                        zone: self.zone.clone(),
                        capacity: self.capacity,
                    };
                    let _ = self
                        .coord
                        .call(|mut c| {
                            let r = req.clone();
                            async move { c.register_node(r).await }
                        })
                        .await;
                }
                Err(e) => warn!(error = %e, "heartbeat failed"),
            }
        }
    }
}
