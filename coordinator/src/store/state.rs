//! The coordinator's replicated state and the rules that change it.
//!
//! Everything lives in one sled tree under key prefixes, so that one [`sled::Batch`] applies a
//! command and the last-applied log id atomically:
//! `m/…` metadata (applied id, membership, next node id, replication, layout),
//! `n/<be id>` nodes, `t/<name>` tenants, `s/<id>` snapshots.
//! [`apply`] is deterministic: every replica reaches the same verdict from the same state.

use openraft::{LogId, StoredMembership};

use crate::layout::{self, Candidate, Layout};
use crate::types::{
    decode, encode, AppError, DecodeError, NodeId, NodeRecord, NodeState, Request, Response,
    SnapshotRecord, SnapshotStatus, TenantRecord,
};

pub(crate) const APPLIED: &[u8] = b"m/applied";
pub(crate) const MEMBERSHIP: &[u8] = b"m/membership";
const NEXT_NODE: &[u8] = b"m/next_node";
const LAYOUT: &[u8] = b"m/layout";
const NODE: &[u8] = b"n/";
const TENANT: &[u8] = b"t/";
const SNAP: &[u8] = b"s/";

/// Default redundancy factor of a new cluster.
pub const DEFAULT_REPLICAS: u32 = 3;
/// Upper bounds on user-supplied fields (bad input is refused, never stored).
pub const MAX_NAME: usize = 256;
/// Most paths or tags one snapshot record may carry.
pub const MAX_LIST: usize = 1024;

/// Errors reading the state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed.
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value could not be decoded.
    #[error("state decode: {0}")]
    Decode(#[from] DecodeError),
}

type R<T> = Result<T, StateError>;

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(rest);
    k
}

/// The last applied log id and the membership it carries.
pub type Applied = (
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, openraft::BasicNode>,
);

/// Read access to the state (a cheap handle over the sled tree).
#[derive(Clone)]
pub struct StateReader {
    pub(crate) tree: sled::Tree,
}

impl StateReader {
    fn get<T: for<'a> serde::Deserialize<'a>>(&self, k: &[u8]) -> R<Option<T>> {
        Ok(self.tree.get(k)?.map(|v| decode(&v)).transpose()?)
    }
    fn scan<T: for<'a> serde::Deserialize<'a>>(&self, prefix: &[u8]) -> R<Vec<T>> {
        self.tree
            .scan_prefix(prefix)
            .map(|kv| Ok(decode(&kv?.1)?))
            .collect()
    }

    /// Last applied log id and membership.
    pub fn applied(&self) -> R<Applied> {
        Ok((
            self.get::<Option<LogId<NodeId>>>(APPLIED)?.flatten(),
            self.get(MEMBERSHIP)?.unwrap_or_default(),
        ))
    }
    /// A node by id.
    pub fn node(&self, id: u64) -> R<Option<NodeRecord>> {
        self.get(&key(NODE, &id.to_be_bytes()))
    }
    /// Every node, by id.
    pub fn nodes(&self) -> R<Vec<NodeRecord>> {
        self.scan(NODE)
    }
    /// The current layout (version 0 and no partitions before any node joined).
    pub fn layout(&self) -> R<Layout> {
        Ok(self.get(LAYOUT)?.unwrap_or_else(|| Layout {
            version: 0,
            replicas: DEFAULT_REPLICAS,
            write_quorum: layout::majority(DEFAULT_REPLICAS),
            partitions: Vec::new(),
            previous: Vec::new(),
        }))
    }
    /// A tenant by name.
    pub fn tenant(&self, name: &str) -> R<Option<TenantRecord>> {
        self.get(&key(TENANT, name.as_bytes()))
    }
    /// A snapshot by id.
    pub fn snapshot(&self, id: &str) -> R<Option<SnapshotRecord>> {
        self.get(&key(SNAP, id.as_bytes()))
    }
    /// Every snapshot record.
    pub fn snapshots(&self) -> R<Vec<SnapshotRecord>> {
        self.scan(SNAP)
    }
}

/// Applies one command: returns the writes to make (to be committed with the applied id in the
/// same batch) and the command's result.
pub fn apply(state: &StateReader, req: Request, batch: &mut sled::Batch) -> R<Response> {
    Ok(match req {
        Request::RegisterNode {
            id,
            secret_hash,
            address,
            zone,
            capacity,
        } => Response::Node(register_node(
            state,
            id,
            secret_hash,
            address,
            zone,
            capacity,
            batch,
        )?),
        Request::SetNodeState { id, state: to } => {
            Response::Node(set_node_state(state, id, to, batch)?)
        }
        Request::SetReplication {
            replicas,
            write_quorum,
        } => Response::Replication(set_replication(state, replicas, write_quorum, batch)?),
        Request::CreateTenant(t) => Response::Tenant(create_tenant(state, t, batch)?),
        Request::BeginSnapshot(s) => Response::Snapshot(begin_snapshot(state, s, batch)?),
        Request::CommitSnapshot { id, root, stats } => {
            Response::Snapshot(match state.snapshot(&id)? {
                None => Err(AppError::NotFound(format!("snapshot {id}"))),
                Some(s) if s.status == SnapshotStatus::Committed && s.root == root => Ok(s),
                Some(s) if s.status != SnapshotStatus::Pending => Err(AppError::Conflict(format!(
                    "snapshot {id} is {} and cannot be committed again",
                    s.status.name()
                ))),
                Some(_) if root.len() != 32 => {
                    Err(AppError::Invalid("root tree id must be 32 bytes".into()))
                }
                Some(mut s) => {
                    s.root = root;
                    s.stats = stats;
                    s.status = SnapshotStatus::Committed;
                    batch.insert(key(SNAP, id.as_bytes()), encode(&s));
                    Ok(s)
                }
            })
        }
        Request::DeleteSnapshot { id } => Response::Snapshot(match state.snapshot(&id)? {
            None => Err(AppError::NotFound(format!("snapshot {id}"))),
            Some(mut s) => {
                s.status = SnapshotStatus::Deleted;
                batch.insert(key(SNAP, id.as_bytes()), encode(&s));
                Ok(s)
            }
        }),
    })
}

fn register_node(
    state: &StateReader,
    id: u64,
    secret_hash: [u8; 32],
    address: String,
    zone: String,
    capacity: u64,
    batch: &mut sled::Batch,
) -> R<Result<NodeRecord, AppError>> {
    if address.is_empty() || address.len() > MAX_NAME || zone.len() > MAX_NAME || capacity == 0 {
        return Ok(Err(AppError::Invalid(
            "a node needs an address, a zone of at most 256 bytes and a capacity above 0".into(),
        )));
    }
    let mut nodes = state.nodes()?;
    let record = if id == 0 {
        let next: u64 = state.get(NEXT_NODE)?.unwrap_or(1);
        batch.insert(NEXT_NODE, encode(&(next + 1)));
        NodeRecord {
            id: next,
            secret_hash,
            address,
            zone,
            capacity,
            state: NodeState::Active,
        }
    } else {
        let Some(old) = nodes.iter().find(|n| n.id == id) else {
            return Ok(Err(AppError::NotFound(format!("node {id}"))));
        };
        if old.secret_hash != secret_hash {
            return Ok(Err(AppError::PermissionDenied(format!(
                "node {id} is registered with another secret"
            ))));
        }
        if old.state == NodeState::Out {
            return Ok(Err(AppError::Conflict(format!(
                "node {id} was removed from the cluster (Out); wipe it and join as a new node"
            ))));
        }
        let state = if old.state == NodeState::Down {
            NodeState::Active
        } else {
            old.state
        };
        NodeRecord {
            id,
            secret_hash,
            address,
            zone,
            capacity,
            state,
        }
    };
    if nodes
        .iter()
        .any(|n| n.id != record.id && n.address == record.address && n.state != NodeState::Out)
    {
        return Ok(Err(AppError::Conflict(format!(
            "address {} belongs to another node",
            record.address
        ))));
    }
    batch.insert(key(NODE, &record.id.to_be_bytes()), encode(&record));
    nodes.retain(|n| n.id != record.id);
    nodes.push(record.clone());
    relayout(state, &nodes, None, batch)?;
    Ok(Ok(record))
}

fn set_node_state(
    state: &StateReader,
    id: u64,
    to: NodeState,
    batch: &mut sled::Batch,
) -> R<Result<NodeRecord, AppError>> {
    let mut nodes = state.nodes()?;
    let Some(n) = nodes.iter_mut().find(|n| n.id == id) else {
        return Ok(Err(AppError::NotFound(format!("node {id}"))));
    };
    if n.state == NodeState::Out && to != NodeState::Out {
        return Ok(Err(AppError::Conflict(format!(
            "node {id} is Out for good"
        ))));
    }
    n.state = to;
    let rec = n.clone();
    batch.insert(key(NODE, &id.to_be_bytes()), encode(&rec));
    relayout(state, &nodes, None, batch)?;
    Ok(Ok(rec))
}

fn set_replication(
    state: &StateReader,
    replicas: u32,
    write_quorum: u32,
    batch: &mut sled::Batch,
) -> R<Result<(u32, u32), AppError>> {
    let w = if write_quorum == 0 {
        layout::majority(replicas)
    } else {
        write_quorum
    };
    if replicas == 0 || replicas > 7 || w > replicas {
        return Ok(Err(AppError::Invalid(format!(
            "replicas must be 1..=7 and the write quorum at most replicas (got R={replicas}, W={w})"
        ))));
    }
    relayout(state, &state.nodes()?, Some((replicas, w)), batch)?;
    Ok(Ok((replicas, w)))
}

/// Recomputes the layout from the nodes that hold data; bumps the version if anything changed.
fn relayout(
    state: &StateReader,
    nodes: &[NodeRecord],
    replication: Option<(u32, u32)>,
    batch: &mut sled::Batch,
) -> R<()> {
    let old = state.layout()?;
    let (replicas, write_quorum) = replication.unwrap_or((old.replicas, old.write_quorum));
    let candidates: Vec<Candidate> = nodes
        .iter()
        .filter(|n| n.state.in_layout())
        .map(|n| Candidate {
            id: n.id,
            zone: n.zone.clone(),
            capacity: n.capacity,
        })
        .collect();
    let partitions = layout::compute(&candidates, replicas);
    if partitions != old.partitions || replicas != old.replicas || write_quorum != old.write_quorum
    {
        let previous = if partitions != old.partitions {
            old.partitions
        } else {
            old.previous
        };
        let new = Layout {
            version: old.version + 1,
            replicas,
            write_quorum,
            partitions,
            previous,
        };
        batch.insert(LAYOUT, encode(&new));
    }
    Ok(())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && !s.chars().any(char::is_control)
}

fn create_tenant(
    state: &StateReader,
    t: TenantRecord,
    batch: &mut sled::Batch,
) -> R<Result<TenantRecord, AppError>> {
    if !valid_name(&t.name) || t.wrapped_key.is_empty() || t.wrapped_key.len() > 4096 {
        return Ok(Err(AppError::Invalid(
            "a tenant needs a name (1-256 printable bytes) and wrapped key material".into(),
        )));
    }
    if state.tenant(&t.name)?.is_some() {
        return Ok(Err(AppError::Conflict(format!(
            "tenant {} already exists",
            t.name
        ))));
    }
    batch.insert(key(TENANT, t.name.as_bytes()), encode(&t));
    Ok(Ok(t))
}

fn begin_snapshot(
    state: &StateReader,
    s: SnapshotRecord,
    batch: &mut sled::Batch,
) -> R<Result<SnapshotRecord, AppError>> {
    if state.tenant(&s.tenant)?.is_none() {
        return Ok(Err(AppError::NotFound(format!("tenant {}", s.tenant))));
    }
    if !valid_name(&s.host)
        || s.paths.is_empty()
        || s.paths.len() > MAX_LIST
        || s.tags.len() > MAX_LIST
        || s.paths.iter().chain(&s.tags).any(|p| p.len() > 4096)
        || !matches!(s.kind.as_str(), "full" | "incremental" | "differential")
    {
        return Ok(Err(AppError::Invalid(
            "a snapshot needs a host, 1-1024 paths, at most 1024 tags and a kind of full, incremental or differential".into(),
        )));
    }
    if !s.parent.is_empty() && state.snapshot(&s.parent)?.is_none() {
        return Ok(Err(AppError::NotFound(format!(
            "parent snapshot {}",
            s.parent
        ))));
    }
    if state.snapshot(&s.id)?.is_some() {
        return Ok(Err(AppError::Conflict(format!("snapshot {} exists", s.id))));
    }
    batch.insert(key(SNAP, s.id.as_bytes()), encode(&s));
    Ok(Ok(s))
}
