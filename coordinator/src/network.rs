//! Raft transport between coordinators over tonic: one cached channel per peer, per-call
//! timeouts from openraft, and back-off on unreachable peers. Messages are postcard-encoded
//! openraft types carried in `RaftMessage.data`; the receiving side answers with an encoded
//! `Result` so remote Raft errors travel back intact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_proto::raft::raft_service_client::RaftServiceClient;
use cairn_proto::raft::RaftMessage;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::types::{decode, encode, NodeId, TypeConfig};

/// Builds tonic channels to peers, lazily, and caches one per peer address.
#[derive(Clone, Default)]
pub struct Network {
    channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
}

/// Connects lazily to `addr` (`host:port` or a URL).
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

impl Network {
    fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().expect("channel cache lock");
        if let Some(c) = map.get(&(target, addr.to_string())) {
            return Ok(c.clone());
        }
        let c = endpoint(addr)?.connect_lazy();
        map.insert((target, addr.to_string()), c.clone());
        Ok(c)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            channel: self.channel(target, &node.addr).map_err(|e| e.to_string()),
        }
    }
}

/// One RPC of the Raft service, as a function of a client and a request.
type RaftCall =
    fn(
        RaftServiceClient<Channel>,
        tonic::Request<RaftMessage>,
    )
        -> futures::future::BoxFuture<'static, Result<tonic::Response<RaftMessage>, tonic::Status>>;

/// A connection to one peer.
pub struct PeerClient {
    target: NodeId,
    channel: Result<Channel, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        method: RaftCall,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = self
            .channel
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&TransportError(e))))?;
        let client = RaftServiceClient::new(channel)
            .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(cairn_proto::MAX_MESSAGE_SIZE);
        let mut request = tonic::Request::new(RaftMessage { data: encode(req) });
        request.set_timeout(timeout);
        let reply = match tokio::time::timeout(timeout, method(client, request)).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&TransportError(
                    "timed out".into(),
                ))))
            }
            Ok(Err(status)) => {
                let err = TransportError(status.to_string());
                return Err(match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Unknown => {
                        RPCError::Unreachable(Unreachable::new(&err))
                    }
                    _ => RPCError::Network(NetworkError::new(&err)),
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, E> = decode(&reply.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e.to_string()))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(
            |mut c, r| Box::pin(async move { c.append_entries(r).await }),
            &rpc,
            option.hard_ttl(),
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(
            |mut c, r| Box::pin(async move { c.install_snapshot(r).await }),
            &rpc,
            option.hard_ttl(),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(
            |mut c, r| Box::pin(async move { c.vote(r).await }),
            &rpc,
            option.hard_ttl(),
        )
        .await
    }
}
