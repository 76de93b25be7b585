//! A repository: one tenant on a cluster, unlocked with its password.

use std::sync::Arc;

use cairn_proto::metadata::{
    CreateTenantRequest, GetSnapshotRequest, GetTenantRequest, ListSnapshotsRequest, SnapshotRecord,
};
use cairn_proto::ChunkId;

use crate::cluster::Cluster;
use crate::crypto::{self, Keys, Wrapped};
use crate::error::{Error, Result};
use crate::tree::Tree;

/// Trees fetched in one batch by [`Repository::trees`].
pub const TREES_PER_REQUEST: usize = 256;

/// An open repository.
#[derive(Clone)]
pub struct Repository {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// Tenant name.
    pub tenant: String,
    /// Unlocked keys.
    pub keys: Keys,
}

/// Which snapshots to consider.
#[derive(Debug, Clone, Default)]
pub struct SnapshotQuery {
    /// Host (empty: any).
    pub host: String,
    /// A path the snapshot backed up (empty: any).
    pub path: String,
    /// A tag (empty: any).
    pub tag: String,
    /// Latest at or before this time (0: now).
    pub before_unix_nanos: i64,
}

impl Repository {
    /// Creates a tenant with a new random master key wrapped under `password`.
    pub async fn init(cluster: Arc<Cluster>, tenant: &str, password: &[u8]) -> Result<Self> {
        Self::init_with_kdf(cluster, tenant, password, crypto::KDF).await
    }

    /// [`Repository::init`] with explicit argon2id parameters.
    pub async fn init_with_kdf(
        cluster: Arc<Cluster>,
        tenant: &str,
        password: &[u8],
        kdf: &str,
    ) -> Result<Self> {
        if password.is_empty() {
            return Err(Error::Invalid("an empty password is not allowed".into()));
        }
        let (w, keys) = crypto::new_master(password, kdf)?;
        let req = CreateTenantRequest {
            name: tenant.to_string(),
            wrapped_key: w.wrapped_key,
            salt: w.salt,
            kdf: w.kdf,
        };
        cluster
            .coord
            .call(|mut c| {
                let r = req.clone();
                async move { c.create_tenant(r).await }
            })
            .await?;
        Ok(Self {
            cluster,
            tenant: tenant.to_string(),
            keys,
        })
    }

    /// Opens a tenant; a wrong password is [`Error::WrongPassword`].
    pub async fn open(cluster: Arc<Cluster>, tenant: &str, password: &[u8]) -> Result<Self> {
        let name = tenant.to_string();
        let t = cluster
            .coord
            .call(|mut c| {
                let name = name.clone();
                async move { c.get_tenant(GetTenantRequest { name }).await }
            })
            .await
            .map_err(|s| {
                if s.code() == tonic::Code::NotFound {
                    Error::NoTenant(tenant.to_string())
                } else {
                    Error::Rpc(s)
                }
            })?;
        let w = Wrapped {
            wrapped_key: t.wrapped_key,
            salt: t.salt,
            kdf: t.kdf,
        };
        let keys = crypto::unwrap_master(password, &w)?
            .ok_or_else(|| Error::WrongPassword(tenant.to_string()))?;
        Ok(Self {
            cluster,
            tenant: tenant.to_string(),
            keys,
        })
    }

    /// Committed snapshots matching a query, oldest first.
    pub async fn snapshots(&self, q: &SnapshotQuery) -> Result<Vec<SnapshotRecord>> {
        let req = ListSnapshotsRequest {
            tenant: self.tenant.clone(),
            host: q.host.clone(),
            path: q.path.clone(),
            tag: q.tag.clone(),
            after_unix_nanos: 0,
            before_unix_nanos: q.before_unix_nanos,
            include_pending: false,
        };
        Ok(self
            .cluster
            .coord
            .call(|mut c| {
                let r = req.clone();
                async move { c.list_snapshots(r).await }
            })
            .await?
            .snapshots)
    }

    /// Resolves `latest`, a full id or a unique id prefix (within the query for `latest`).
    pub async fn find_snapshot(&self, sel: &str, q: &SnapshotQuery) -> Result<SnapshotRecord> {
        if sel == "latest" {
            return self
                .snapshots(q)
                .await?
                .pop()
                .ok_or_else(|| Error::NoSnapshot("latest".into()));
        }
        if sel.len() == 32 {
            let id = sel.to_string();
            let s = self
                .cluster
                .coord
                .call(|mut c| {
                    let id = id.clone();
                    async move { c.get_snapshot(GetSnapshotRequest { id }).await }
                })
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::NotFound => Error::NoSnapshot(sel.to_string()),
                    _ => Error::Rpc(s),
                })?;
            if s.tenant != self.tenant || s.status != "committed" {
                return Err(Error::NoSnapshot(sel.to_string()));
            }
            return Ok(s);
        }
        let mut found: Vec<_> = self
            .snapshots(&SnapshotQuery::default())
            .await?
            .into_iter()
            .filter(|s| s.id.starts_with(sel))
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(Error::NoSnapshot(sel.to_string())),
            _ => Err(Error::Invalid(format!(
                "snapshot prefix {sel} is ambiguous"
            ))),
        }
    }

    /// Loads and validates a tree.
    pub async fn tree(&self, id: ChunkId) -> Result<Tree> {
        let b = self.cluster.get(&self.keys, id).await?;
        Tree::decode(&b)
    }

    /// Many trees, in the order of `ids`: [`TREES_PER_REQUEST`] at a time, each batch in one
    /// request per node asked.
    pub async fn trees(&self, ids: &[ChunkId]) -> Vec<Result<Tree>> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(TREES_PER_REQUEST) {
            let got = self.cluster.get_many(&self.keys, batch).await;
            out.extend(got.into_iter().map(|b| b.and_then(|b| Tree::decode(&b))));
        }
        out
    }

    /// Root tree of a snapshot.
    pub fn root_of(s: &SnapshotRecord) -> Result<ChunkId> {
        ChunkId::from_slice(&s.root).map_err(|e| Error::Integrity(format!("snapshot root: {e}")))
    }
}
