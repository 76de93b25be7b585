//! Connection plumbing every Cairn process shares: endpoints, a cache of channels to storage
//! nodes, a server's accept stream, and the bounded graceful stop of a server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::chunk::chunk_store_client::ChunkStoreClient;

/// HTTP/2 stream window: chunk streams carry megabytes per message, so a sender should not have
/// to wait for a window update every megabyte (hyper's default) on a fast link.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 connection window (all streams of one connection together).
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame a Cairn server accepts (storage nodes: [`BLOB_FRAME`]). The protocol's default, 16 KiB, cuts every
/// uploaded megabyte into 64 frames, each parsed and scheduled on its own. Frames as large as a
/// whole blob cost a copy of their own: tonic buffers a message's first frame, then reserves the
/// message's length on top of what it holds, so a blob that arrived in one frame was copied
/// again into a larger buffer. With 256 KiB frames at most that much is copied twice, and the
/// three nodes of the benchmark's first backup used about 0.35 CPU-s (4%) less than with 1 MiB
/// frames, in seven interleaved pairs (128 KiB frames cost more again).
pub const MAX_FRAME: u32 = 256 << 10;
/// Largest HTTP/2 frame a storage node accepts: a whole blob of a chunk of up to 4 MiB, so that
/// each blob a sender hands over as a frame of its own ([`crate::upload`]) arrives as one, which
/// [`crate::receive`] passes on without copying (tonic's decoder is not used for puts).
pub const BLOB_FRAME: u32 = (4 << 20) + (64 << 10);

/// A tonic server with Cairn's HTTP/2 settings.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}

/// A lazily-connecting endpoint from `host:port` or a URL, with Cairn's timeouts.
pub fn endpoint(addr: &str) -> Result<Endpoint, Status> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(url)
        .map_err(|e| Status::invalid_argument(format!("bad address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        // No call of the public services legitimately takes this long; a stalled peer does.
        .timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// One cached channel per storage node address.
#[derive(Default)]
pub struct NodeChannels {
    map: Mutex<HashMap<String, Channel>>,
}

impl NodeChannels {
    /// The cached channel to the storage node at `addr` (for [`crate::upload::put_chunks`]).
    pub fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut map = self.map.lock().expect("channel cache lock");
        Ok(match map.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = endpoint(addr)?.connect_lazy();
                map.insert(addr.to_string(), c.clone());
                c
            }
        })
    }

    /// A client for the storage node at `addr`, on a cached channel.
    pub fn client(&self, addr: &str) -> Result<ChunkStoreClient<Channel>, Status> {
        Ok(ChunkStoreClient::new(self.channel(addr)?)
            .max_decoding_message_size(crate::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(crate::MAX_MESSAGE_SIZE))
    }
}

/// The accepted connections of `listener`, with Nagle off, for `serve_with_incoming_shutdown`.
pub fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = Result<TcpStream, std::io::Error>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

/// Waits for a server told to shut down: in-flight calls finish, but peers' idle HTTP/2
/// connections are not waited for beyond `grace`.
pub async fn stop_server(
    mut server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
) {
    match tokio::time::timeout(grace, &mut server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
        Ok(Ok(Ok(()))) => {}
        Err(_) => {
            tracing::warn!("connections still open after {grace:?}; closing them");
            server.abort();
        }
    }
}
