//! gRPC handlers: decode, call one domain method, encode. The only place where coordinator
//! errors become gRPC statuses ([`to_status`]).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cairn_proto::metadata as pb;
use cairn_proto::metadata::coordinator_server::Coordinator;
use cairn_proto::raft::raft_service_server::RaftService;
use cairn_proto::raft::RaftMessage;
use cairn_proto::types as pt;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::layout::Layout;
use crate::node::{CoordError, CoordinatorNode, SnapshotFilter, Usage};
use crate::types::{
    decode, encode, AppError, NodeRecord, NodeState, Response as AppResponse, SnapshotRecord,
    SnapshotStats, SnapshotStatus, TenantRecord, TypeConfig,
};

/// Maps a coordinator error to a gRPC status (leader redirects carry the `cairn-leader` header).
pub fn to_status(e: CoordError) -> Status {
    match e {
        CoordError::NotLeader { leader_addr, .. } => {
            let mut s = Status::unavailable(format!(
                "not the leader; leader is {}",
                leader_addr
                    .as_deref()
                    .unwrap_or("unknown (election in progress)")
            ));
            if let Some(a) = leader_addr.and_then(|a| a.parse().ok()) {
                s.metadata_mut().insert(cairn_proto::LEADER_HEADER, a);
            }
            s
        }
        CoordError::App(AppError::NotFound(m)) => Status::not_found(format!("{m} not found")),
        CoordError::App(AppError::Conflict(m)) => Status::failed_precondition(m),
        CoordError::App(AppError::PermissionDenied(m)) => Status::permission_denied(m),
        CoordError::App(AppError::Invalid(m)) | CoordError::Invalid(m) => {
            Status::invalid_argument(m)
        }
        CoordError::Raft(m) => Status::unavailable(format!("raft: {m}")),
        CoordError::State(e) => Status::internal(e.to_string()),
    }
}

type Res<T> = Result<Response<T>, Status>;

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The public `Coordinator` service.
pub struct CoordinatorService {
    node: Arc<CoordinatorNode>,
}

impl CoordinatorService {
    /// Serves `node`.
    pub fn new(node: Arc<CoordinatorNode>) -> Self {
        Self { node }
    }

    fn node_info(&self, n: &NodeRecord) -> pt::NodeInfo {
        let (usage, age) = self.node.usage(n.id);
        pt::NodeInfo {
            id: n.id,
            address: n.address.clone(),
            zone: n.zone.clone(),
            capacity: n.capacity,
            used: usage.used,
            chunks: usage.chunks,
            state: n.state.to_proto() as i32,
            heartbeat_age_ms: age.map(|a| a.as_millis() as u64),
            under_replicated: usage.under_replicated,
            healing: usage.healing,
        }
    }

    fn layout_proto(&self, l: &Layout) -> Result<pt::Layout, CoordError> {
        let nodes = self.node.state.nodes()?;
        Ok(layout_to_proto(l, &nodes))
    }

    async fn read(&self, stale: bool) -> Result<(), CoordError> {
        if stale {
            Ok(())
        } else {
            self.node.linearizable().await
        }
    }
}

/// The wire form of a layout, with the addresses of the nodes it names.
pub fn layout_to_proto(l: &Layout, nodes: &[NodeRecord]) -> pt::Layout {
    pt::Layout {
        version: l.version,
        replicas: l.replicas,
        write_quorum: l.write_quorum,
        partitions: l
            .partitions
            .iter()
            .map(|p| pt::PartitionReplicas { nodes: p.clone() })
            .collect(),
        previous: l
            .previous
            .iter()
            .map(|p| pt::PartitionReplicas { nodes: p.clone() })
            .collect(),
        // Every node that may hold data (Draining ones too), so that reads can find it.
        addresses: nodes
            .iter()
            .filter(|n| n.state != NodeState::Out)
            .map(|n| (n.id, n.address.clone()))
            .collect(),
    }
}

fn snapshot_to_proto(s: SnapshotRecord) -> pb::SnapshotRecord {
    let st = s.stats;
    pb::SnapshotRecord {
        id: s.id,
        tenant: s.tenant,
        host: s.host,
        paths: s.paths,
        tags: s.tags,
        kind: s.kind,
        parent: s.parent,
        time_unix_nanos: s.time_unix_nanos,
        root: s.root,
        stats: Some(pb::SnapshotStats {
            files_new: st.files_new,
            files_changed: st.files_changed,
            files_unmodified: st.files_unmodified,
            dirs: st.dirs,
            bytes_read: st.bytes_read,
            bytes_total: st.bytes_total,
            bytes_uploaded: st.bytes_uploaded,
            chunks_uploaded: st.chunks_uploaded,
            duration_ms: st.duration_ms,
            errors: st.errors,
        }),
        status: s.status.name().to_string(),
    }
}

fn tenant_to_proto(t: TenantRecord) -> pb::Tenant {
    pb::Tenant {
        name: t.name,
        wrapped_key: t.wrapped_key,
        salt: t.salt,
        kdf: t.kdf,
        created_unix_nanos: t.created_unix_nanos,
    }
}

fn expect_snapshot(r: AppResponse) -> Result<pb::SnapshotRecord, CoordError> {
    match r {
        AppResponse::Snapshot(r) => Ok(snapshot_to_proto(r?)),
        _ => Err(CoordError::Raft("unexpected response".into())),
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> Res<pb::ClusterStatusReply> {
        // Answered locally by any coordinator: it describes this coordinator's view.
        let m = self.node.raft.metrics().borrow().clone();
        let (leader_id, leader_addr) = self.node.leader();
        let (voters, nodes) = self.node.members();
        let layout = self.node.state.layout().map_err(|e| to_status(e.into()))?;
        let snaps = self
            .node
            .state
            .snapshots()
            .map_err(|e| to_status(e.into()))?;
        let node_recs = self.node.state.nodes().map_err(|e| to_status(e.into()))?;
        Ok(Response::new(pb::ClusterStatusReply {
            id: self.node.id,
            leader_id,
            leader_address: leader_addr.unwrap_or_default(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            members: nodes
                .into_iter()
                .map(|(id, address)| pb::CoordinatorMember {
                    id,
                    address,
                    voter: voters.contains(&id),
                })
                .collect(),
            layout_version: layout.version,
            replicas: layout.replicas,
            write_quorum: layout.write_quorum,
            nodes: node_recs.iter().map(|n| self.node_info(n)).collect(),
            snapshots: snaps
                .iter()
                .filter(|s| s.status == SnapshotStatus::Committed)
                .count() as u64,
            state: format!("{:?}", m.state),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
        }))
    }

    async fn add_coordinator(
        &self,
        req: Request<pb::AddCoordinatorRequest>,
    ) -> Res<pb::MembershipReply> {
        let r = req.into_inner();
        self.node
            .add_coordinator(r.id, r.address)
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.membership()))
    }

    async fn remove_coordinator(
        &self,
        req: Request<pb::RemoveCoordinatorRequest>,
    ) -> Res<pb::MembershipReply> {
        self.node
            .remove_coordinator(req.into_inner().id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.membership()))
    }

    async fn set_replication(&self, req: Request<pb::SetReplicationRequest>) -> Res<pt::Layout> {
        let r = req.into_inner();
        let resp = self
            .node
            .write(crate::types::Request::SetReplication {
                replicas: r.replicas,
                write_quorum: r.write_quorum,
            })
            .await
            .map_err(to_status)?;
        if let AppResponse::Replication(Err(e)) = resp {
            return Err(to_status(e.into()));
        }
        let l = self.node.state.layout().map_err(|e| to_status(e.into()))?;
        Ok(Response::new(self.layout_proto(&l).map_err(to_status)?))
    }

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Res<pb::RegisterNodeReply> {
        let r = req.into_inner();
        let rec = self
            .node
            .register_node(r.id, &r.secret, r.address, r.zone, r.capacity)
            .await
            .map_err(to_status)?;
        let l = self.node.state.layout().map_err(|e| to_status(e.into()))?;
        Ok(Response::new(pb::RegisterNodeReply {
            id: rec.id,
            layout: Some(self.layout_proto(&l).map_err(to_status)?),
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Res<pb::HeartbeatReply> {
        let r = req.into_inner();
        let ack = self
            .node
            .heartbeat(
                r.id,
                &r.secret,
                Usage {
                    used: r.used,
                    chunks: r.chunks,
                    under_replicated: r.under_replicated,
                    healing: r.healing,
                },
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::HeartbeatReply {
            layout_version: ack.layout_version,
            state: ack.state.to_proto() as i32,
        }))
    }

    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Res<pb::ListNodesReply> {
        self.read(false).await.map_err(to_status)?;
        let nodes = self.node.state.nodes().map_err(|e| to_status(e.into()))?;
        Ok(Response::new(pb::ListNodesReply {
            nodes: nodes.iter().map(|n| self.node_info(n)).collect(),
        }))
    }

    async fn set_node_state(&self, req: Request<pb::SetNodeStateRequest>) -> Res<pt::NodeInfo> {
        let r = req.into_inner();
        let state = pt::NodeState::try_from(r.state)
            .ok()
            .and_then(NodeState::from_proto)
            .ok_or_else(|| Status::invalid_argument("unknown node state"))?;
        let rec = self
            .node
            .set_node_state(r.id, state)
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.node_info(&rec)))
    }

    async fn get_layout(&self, req: Request<pb::GetLayoutRequest>) -> Res<pt::Layout> {
        self.read(req.into_inner().allow_stale)
            .await
            .map_err(to_status)?;
        let l = self.node.state.layout().map_err(|e| to_status(e.into()))?;
        Ok(Response::new(self.layout_proto(&l).map_err(to_status)?))
    }

    async fn create_tenant(&self, req: Request<pb::CreateTenantRequest>) -> Res<pb::Tenant> {
        let r = req.into_inner();
        let resp = self
            .node
            .write(crate::types::Request::CreateTenant(TenantRecord {
                name: r.name,
                wrapped_key: r.wrapped_key,
                salt: r.salt,
                kdf: r.kdf,
                created_unix_nanos: now_nanos(),
            }))
            .await
            .map_err(to_status)?;
        match resp {
            AppResponse::Tenant(t) => Ok(Response::new(tenant_to_proto(
                t.map_err(|e| to_status(e.into()))?,
            ))),
            _ => Err(Status::internal("unexpected response")),
        }
    }

    async fn get_tenant(&self, req: Request<pb::GetTenantRequest>) -> Res<pb::Tenant> {
        self.read(false).await.map_err(to_status)?;
        let name = req.into_inner().name;
        let t = self
            .node
            .state
            .tenant(&name)
            .map_err(|e| to_status(e.into()))?
            .ok_or_else(|| Status::not_found(format!("tenant {name} not found")))?;
        Ok(Response::new(tenant_to_proto(t)))
    }

    async fn begin_snapshot(
        &self,
        req: Request<pb::BeginSnapshotRequest>,
    ) -> Res<pb::SnapshotRecord> {
        let r = req.into_inner();
        let rec = SnapshotRecord {
            id: hex::encode(rand::random::<[u8; 16]>()),
            tenant: r.tenant,
            host: r.host,
            paths: r.paths,
            tags: r.tags,
            kind: r.kind,
            parent: r.parent,
            time_unix_nanos: now_nanos(),
            root: Vec::new(),
            stats: SnapshotStats::default(),
            status: SnapshotStatus::Pending,
        };
        let resp = self
            .node
            .write(crate::types::Request::BeginSnapshot(rec))
            .await
            .map_err(to_status)?;
        Ok(Response::new(expect_snapshot(resp).map_err(to_status)?))
    }

    async fn commit_snapshot(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Res<pb::SnapshotRecord> {
        let r = req.into_inner();
        let s = r.stats.unwrap_or_default();
        let resp = self
            .node
            .write(crate::types::Request::CommitSnapshot {
                id: r.id,
                root: r.root,
                stats: SnapshotStats {
                    files_new: s.files_new,
                    files_changed: s.files_changed,
                    files_unmodified: s.files_unmodified,
                    dirs: s.dirs,
                    bytes_read: s.bytes_read,
                    bytes_total: s.bytes_total,
                    bytes_uploaded: s.bytes_uploaded,
                    chunks_uploaded: s.chunks_uploaded,
                    duration_ms: s.duration_ms,
                    errors: s.errors,
                },
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(expect_snapshot(resp).map_err(to_status)?))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Res<pb::ListSnapshotsReply> {
        self.read(false).await.map_err(to_status)?;
        let r = req.into_inner();
        if r.tenant.is_empty() {
            return Err(Status::invalid_argument("tenant required"));
        }
        let list = self
            .node
            .list_snapshots(&SnapshotFilter {
                tenant: r.tenant,
                host: r.host,
                path: r.path,
                tag: r.tag,
                after_unix_nanos: r.after_unix_nanos,
                before_unix_nanos: r.before_unix_nanos,
                include_pending: r.include_pending,
            })
            .map_err(to_status)?;
        Ok(Response::new(pb::ListSnapshotsReply {
            snapshots: list.into_iter().map(snapshot_to_proto).collect(),
        }))
    }

    async fn get_snapshot(&self, req: Request<pb::GetSnapshotRequest>) -> Res<pb::SnapshotRecord> {
        self.read(false).await.map_err(to_status)?;
        let id = req.into_inner().id;
        let s = self
            .node
            .state
            .snapshot(&id)
            .map_err(|e| to_status(e.into()))?
            .ok_or_else(|| Status::not_found(format!("snapshot {id} not found")))?;
        Ok(Response::new(snapshot_to_proto(s)))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Res<pb::SnapshotRecord> {
        let resp = self
            .node
            .write(crate::types::Request::DeleteSnapshot {
                id: req.into_inner().id,
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(expect_snapshot(resp).map_err(to_status)?))
    }
}

impl CoordinatorService {
    fn membership(&self) -> pb::MembershipReply {
        let (voters, nodes) = self.node.members();
        pb::MembershipReply {
            members: nodes
                .into_iter()
                .map(|(id, address)| pb::CoordinatorMember {
                    id,
                    address,
                    voter: voters.contains(&id),
                })
                .collect(),
        }
    }
}

/// The internal Raft service: hands each decoded message to openraft.
pub struct RaftRpc {
    raft: crate::types::Raft,
}

impl RaftRpc {
    /// Serves `raft`.
    pub fn new(raft: crate::types::Raft) -> Self {
        Self { raft }
    }
}

fn decode_msg<T: for<'a> serde::Deserialize<'a>>(m: Request<RaftMessage>) -> Result<T, Status> {
    decode(&m.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftRpc {
    async fn append_entries(&self, req: Request<RaftMessage>) -> Res<RaftMessage> {
        let r: AppendEntriesRequest<TypeConfig> = decode_msg(req)?;
        let res = self.raft.append_entries(r).await;
        Ok(Response::new(RaftMessage { data: encode(&res) }))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Res<RaftMessage> {
        let r: VoteRequest<u64> = decode_msg(req)?;
        let res = self.raft.vote(r).await;
        Ok(Response::new(RaftMessage { data: encode(&res) }))
    }

    async fn install_snapshot(&self, req: Request<RaftMessage>) -> Res<RaftMessage> {
        let r: InstallSnapshotRequest<TypeConfig> = decode_msg(req)?;
        let res = self.raft.install_snapshot(r).await;
        Ok(Response::new(RaftMessage { data: encode(&res) }))
    }
}
