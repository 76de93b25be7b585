//! The coordinator's domain layer: what every RPC handler calls.
//!
//! It owns the Raft handle, a read handle on the replicated state, and the leader's in-memory
//! liveness table (heartbeats are not log entries; only node state transitions are). Writes go
//! through [`CoordinatorNode::write`]; reads that must be linearizable go through
//! [`CoordinatorNode::linearizable`] first. A follower answers both with [`CoordError::NotLeader`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::store::state::{StateError, StateReader};
use crate::types::{
    AppError, NodeId, NodeRecord, NodeState, Raft, Request, Response, SnapshotRecord,
    SnapshotStatus,
};

/// Errors of the coordinator's operations (mapped to gRPC status in one place, `service.rs`).
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// This coordinator is not the leader; the caller should retry at `leader_addr`.
    #[error("not the leader (leader: {})", leader_addr.as_deref().unwrap_or("unknown"))]
    NotLeader {
        /// Raft id of the leader, if known.
        leader_id: Option<NodeId>,
        /// Its address, if known.
        leader_addr: Option<String>,
    },
    /// The state machine refused the command.
    #[error(transparent)]
    App(#[from] AppError),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Raft failed (fatal error, membership change in progress, ...).
    #[error("raft: {0}")]
    Raft(String),
    /// Reading the local state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Timeouts of failure detection.
#[derive(Debug, Clone, Copy)]
pub struct LivenessConfig {
    /// A node silent this long becomes Down.
    pub down_after: Duration,
    /// A node Down this long (and not in Maintenance) becomes Out.
    pub out_after: Duration,
}

/// Usage a node last reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Self-healing counters.
    pub healing: Option<cairn_proto::chunk::HealingStats>,
    /// Bytes stored.
    pub used: u64,
    /// Chunks stored.
    pub chunks: u64,
    /// Copies it owes to other replicas.
    pub under_replicated: u64,
}

#[derive(Default)]
struct Liveness {
    leader_since: Option<Instant>,
    last_seen: HashMap<u64, Instant>,
    down_since: HashMap<u64, Instant>,
    usage: HashMap<u64, Usage>,
}

/// One coordinator.
pub struct CoordinatorNode {
    /// Raft id.
    pub id: NodeId,
    /// The Raft handle.
    pub raft: Raft,
    /// Local replicated state.
    pub state: StateReader,
    live: Mutex<Liveness>,
    liveness: LivenessConfig,
}

/// Heartbeat result: the layout version and the node's state.
pub struct HeartbeatAck {
    /// Current layout version.
    pub layout_version: u64,
    /// The node's committed state.
    pub state: NodeState,
}

fn map_write_err(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> CoordError {
    match e.forward_to_leader() {
        Some(f) => CoordError::NotLeader {
            leader_id: f.leader_id,
            leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
        },
        None => CoordError::Raft(e.to_string()),
    }
}

impl CoordinatorNode {
    /// Wraps a started Raft.
    pub fn new(id: NodeId, raft: Raft, state: StateReader, liveness: LivenessConfig) -> Self {
        Self {
            id,
            raft,
            state,
            live: Mutex::new(Liveness::default()),
            liveness,
        }
    }

    /// The leader's id and address as this coordinator knows them.
    pub fn leader(&self) -> (Option<NodeId>, Option<String>) {
        let m = self.raft.metrics().borrow().clone();
        let addr = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        });
        (m.current_leader, addr)
    }

    fn not_leader(&self) -> CoordError {
        let (leader_id, leader_addr) = self.leader();
        CoordError::NotLeader {
            leader_id,
            leader_addr,
        }
    }

    /// Whether this coordinator currently leads.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Replicates a command and returns its result once committed and applied.
    pub async fn write(&self, req: Request) -> Result<Response, CoordError> {
        self.raft
            .client_write(req)
            .await
            .map(|r| r.data)
            .map_err(map_write_err)
    }

    /// Waits until local state reflects every write committed before this call (ReadIndex).
    pub async fn linearizable(&self) -> Result<(), CoordError> {
        self.raft.ensure_linearizable().await.map_err(|e| {
            match e.forward_to_leader::<BasicNode>() {
                Some(f) => CoordError::NotLeader {
                    leader_id: f.leader_id,
                    leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
                },
                None => CoordError::Raft(e.to_string()),
            }
        })?;
        Ok(())
    }

    /// Registers or re-registers a storage node.
    pub async fn register_node(
        &self,
        id: u64,
        secret: &str,
        address: String,
        zone: String,
        capacity: u64,
    ) -> Result<NodeRecord, CoordError> {
        if secret.len() < 16 {
            return Err(CoordError::Invalid(
                "a node secret of at least 16 characters is required".into(),
            ));
        }
        let resp = self
            .write(Request::RegisterNode {
                id,
                secret_hash: *blake3::hash(secret.as_bytes()).as_bytes(),
                address,
                zone,
                capacity,
            })
            .await?;
        let Response::Node(r) = resp else {
            return Err(CoordError::Raft("unexpected response".into()));
        };
        let rec = r?;
        self.saw(rec.id);
        Ok(rec)
    }

    fn saw(&self, id: u64) {
        let mut l = self.live.lock().expect("liveness lock");
        l.last_seen.insert(id, Instant::now());
        l.down_since.remove(&id);
    }

    /// Records a heartbeat (leader only); commits Down -> Active if the node was Down.
    pub async fn heartbeat(
        &self,
        id: u64,
        secret: &str,
        usage: Usage,
    ) -> Result<HeartbeatAck, CoordError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let node = self
            .state
            .node(id)?
            .ok_or_else(|| AppError::NotFound(format!("node {id}")))?;
        if node.secret_hash != *blake3::hash(secret.as_bytes()).as_bytes() {
            return Err(AppError::PermissionDenied(format!(
                "node {id} is registered with another secret"
            ))
            .into());
        }
        {
            self.saw(id);
            self.live
                .lock()
                .expect("liveness lock")
                .usage
                .insert(id, usage);
        }
        let mut state = node.state;
        if state == NodeState::Down {
            info!(node = id, "node is back: Down -> Active");
            self.set_node_state(id, NodeState::Active).await?;
            state = NodeState::Active;
        }
        Ok(HeartbeatAck {
            layout_version: self.state.layout()?.version,
            state,
        })
    }

    /// Commits a node state transition.
    pub async fn set_node_state(
        &self,
        id: u64,
        state: NodeState,
    ) -> Result<NodeRecord, CoordError> {
        match self.write(Request::SetNodeState { id, state }).await? {
            Response::Node(r) => Ok(r?),
            _ => Err(CoordError::Raft("unexpected response".into())),
        }
    }

    /// Usage last reported by a node and how long ago it was heard (leader only).
    pub fn usage(&self, id: u64) -> (Usage, Option<Duration>) {
        let l = self.live.lock().expect("liveness lock");
        (
            l.usage.get(&id).copied().unwrap_or_default(),
            l.last_seen.get(&id).map(Instant::elapsed),
        )
    }

    /// Lists snapshots matching the filters, oldest first.
    pub fn list_snapshots(
        &self,
        filter: &SnapshotFilter,
    ) -> Result<Vec<SnapshotRecord>, CoordError> {
        let mut out: Vec<SnapshotRecord> = self
            .state
            .snapshots()?
            .into_iter()
            .filter(|s| filter.matches(s))
            .collect();
        out.sort_by(|a, b| {
            a.time_unix_nanos
                .cmp(&b.time_unix_nanos)
                .then(a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// Voters and learners of the coordinator group.
    pub fn members(&self) -> (BTreeSet<NodeId>, BTreeMap<NodeId, String>) {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        let voters = mem.voter_ids().collect();
        let nodes = mem.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        (voters, nodes)
    }

    /// Adds a coordinator: first as a learner (it catches up), then as a voter.
    pub async fn add_coordinator(&self, id: NodeId, addr: String) -> Result<(), CoordError> {
        if addr.is_empty() {
            return Err(CoordError::Invalid("address required".into()));
        }
        let (voters, nodes) = self.members();
        if voters.contains(&id) {
            return Err(AppError::Conflict(format!("coordinator {id} is already a voter")).into());
        }
        if let Some(a) = nodes.get(&id) {
            if a != &addr {
                return Err(AppError::Conflict(format!(
                    "coordinator id {id} is known with address {a}; ids are never reused"
                ))
                .into());
            }
        }
        self.raft
            .add_learner(id, BasicNode { addr }, true)
            .await
            .map_err(map_write_err)?;
        let mut new_voters = voters;
        new_voters.insert(id);
        self.raft
            .change_membership(new_voters, false)
            .await
            .map_err(map_write_err)?;
        Ok(())
    }

    /// Removes a coordinator from the voters (and from the group).
    pub async fn remove_coordinator(&self, id: NodeId) -> Result<(), CoordError> {
        let (mut voters, nodes) = self.members();
        if !nodes.contains_key(&id) {
            return Err(AppError::NotFound(format!("coordinator {id}")).into());
        }
        voters.remove(&id);
        if voters.is_empty() {
            return Err(CoordError::Invalid(
                "cannot remove the last coordinator".into(),
            ));
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(map_write_err)?;
        Ok(())
    }

    /// One pass of failure detection (leader only): Active -> Down after `down_after` without
    /// a heartbeat, Down -> Out after a further `out_after` (never from Maintenance).
    pub async fn check_liveness(&self) -> Result<(), CoordError> {
        if !self.is_leader() {
            self.live.lock().expect("liveness lock").leader_since = None;
            return Ok(());
        }
        let now = Instant::now();
        let mut transitions = Vec::new();
        {
            let mut l = self.live.lock().expect("liveness lock");
            let since = *l.leader_since.get_or_insert(now);
            for n in self.state.nodes()? {
                let seen = l.last_seen.get(&n.id).copied().unwrap_or(since).max(since);
                match n.state {
                    NodeState::Active | NodeState::Draining
                        if now.duration_since(seen) > self.liveness.down_after =>
                    {
                        transitions.push((n.id, NodeState::Down));
                        l.down_since.insert(n.id, now);
                    }
                    NodeState::Down => {
                        let down = *l.down_since.entry(n.id).or_insert(now);
                        if now.duration_since(down) > self.liveness.out_after {
                            transitions.push((n.id, NodeState::Out));
                        }
                    }
                    _ => {}
                }
            }
        }
        for (id, state) in transitions {
            warn!(node = id, to = state.name(), "node state transition");
            self.set_node_state(id, state).await?;
        }
        Ok(())
    }

    /// Runs failure detection until `shutdown` flips.
    pub async fn run_liveness(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let period = (self.liveness.down_after / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.check_liveness().await {
                warn!(error = %e, "liveness check failed");
            }
        }
    }
}

impl NodeState {
    /// User-facing name.
    pub fn name(self) -> &'static str {
        self.to_proto().name()
    }
}

/// Filters of a snapshot listing (empty = any).
#[derive(Debug, Default, Clone)]
pub struct SnapshotFilter {
    /// Tenant name (required by the API).
    pub tenant: String,
    /// Host.
    pub host: String,
    /// One of the snapshot's paths.
    pub path: String,
    /// One of the snapshot's tags.
    pub tag: String,
    /// Only snapshots at or after this time (0 = any).
    pub after_unix_nanos: i64,
    /// Only snapshots at or before this time (0 = any).
    pub before_unix_nanos: i64,
    /// Include snapshots still being written.
    pub include_pending: bool,
}

impl SnapshotFilter {
    fn matches(&self, s: &SnapshotRecord) -> bool {
        s.tenant == self.tenant
            && match s.status {
                SnapshotStatus::Committed => true,
                SnapshotStatus::Pending => self.include_pending,
                SnapshotStatus::Deleted => false,
            }
            && (self.host.is_empty() || s.host == self.host)
            && (self.path.is_empty() || s.paths.iter().any(|p| p == &self.path))
            && (self.tag.is_empty() || s.tags.iter().any(|t| t == &self.tag))
            && (self.after_unix_nanos == 0 || s.time_unix_nanos >= self.after_unix_nanos)
            && (self.before_unix_nanos == 0 || s.time_unix_nanos <= self.before_unix_nanos)
    }
}
