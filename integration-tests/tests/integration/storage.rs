//! Storage nodes: replication to R, the write quorum with repair, durability across kill -9,
//! and refusal of bad input.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_client::Blob;
use cairn_integration_tests::fixtures::random_bytes;
use cairn_integration_tests::{wait_for, Spec, TestCluster};
use cairn_proto::chunk::{GetChunksRequest, HasChunksRequest, PutChunkRequest};
use cairn_proto::ChunkId;
use tonic::Code;

fn blob(seed: u64, len: usize) -> Blob {
    Blob::new(
        ChunkId(*blake3::hash(&seed.to_le_bytes()).as_bytes()),
        Bytes::from(random_bytes(seed, len)),
    )
}

async fn holders(c: &TestCluster, ids: &[ChunkId]) -> Vec<usize> {
    let mut count = vec![0; ids.len()];
    for i in 0..c.nodes.len() {
        let held: HashSet<ChunkId> = c
            .node_chunks(i)
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        for (k, id) in ids.iter().enumerate() {
            count[k] += usize::from(held.contains(id));
        }
    }
    count
}

#[tokio::test]
async fn every_acknowledged_chunk_is_on_r_nodes_and_quorum_writes_are_repaired() {
    let mut c = TestCluster::start(Spec {
        coordinators: 1,
        ..Default::default()
    })
    .await;
    let cluster = cairn_client::Cluster::connect(c.coordinator_addrs.clone())
        .await
        .unwrap();
    let first: Vec<_> = (0..40).map(|i| blob(i, 50_000)).collect();
    let ids: Vec<ChunkId> = first.iter().map(|b| b.id).collect();
    cluster.put(first).await.unwrap();
    assert!(
        holders(&c, &ids).await.iter().all(|n| *n == 3),
        "R=3 copies of every acknowledged chunk"
    );

    // One replica down: writes succeed at W=2 and the missing copies are queued.
    c.nodes[2].kill9();
    let second: Vec<_> = (100..140).map(|i| blob(i, 50_000)).collect();
    let ids2: Vec<ChunkId> = second.iter().map(|b| b.id).collect();
    cluster.put(second).await.unwrap();
    let owed: u64 = {
        let mut s = 0;
        for i in 0..2 {
            s += c.node_stats(i).await.unwrap().under_replicated;
        }
        s
    };
    assert!(owed > 0, "missing copies are recorded for repair");
    c.nodes[2].restart();
    wait_for(
        "repair to restore R copies",
        Duration::from_secs(60),
        || {
            let (c, ids2) = (&c, &ids2);
            async move { holders(c, ids2).await.iter().all(|n| *n == 3).then_some(()) }
        },
    )
    .await;
    wait_for("repair queues to drain", Duration::from_secs(30), || {
        let c = &c;
        async move {
            let mut s = 0;
            for i in 0..3 {
                s += c.node_stats(i).await?.under_replicated;
            }
            (s == 0).then_some(())
        }
    })
    .await;
    // Below W nothing is acknowledged.
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    let r = cluster.put(vec![blob(999, 1000)]).await;
    assert!(
        r.is_err(),
        "a write with one live replica of three must not be acknowledged"
    );
}

#[tokio::test]
async fn kill9_during_writes_loses_no_acknowledged_chunk() {
    let mut c = TestCluster::start(Spec {
        coordinators: 1,
        nodes: 1,
        replicas: 1,
        ..Default::default()
    })
    .await;
    let cluster = cairn_client::Cluster::connect(c.coordinator_addrs.clone())
        .await
        .unwrap();
    let acked: cairn_integration_tests::Shared<Vec<(ChunkId, [u8; 32])>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (cluster, acked, stop) = (cluster.clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<_> = (0..4)
                        .map(|k| blob(w * 1_000_000 + i * 10 + k, 200_000))
                        .collect();
                    let hashes: Vec<_> = batch.iter().map(|b| (b.id, b.hash)).collect();
                    if cluster.put(batch).await.is_ok() {
                        acked.lock().unwrap().extend(hashes);
                    } else {
                        return;
                    }
                    i += 1;
                }
            })
        })
        .collect();
    wait_for("writes", Duration::from_secs(30), || async {
        (acked.lock().unwrap().len() >= 100).then_some(())
    })
    .await;
    c.nodes[0].kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    c.nodes[0].restart();
    let acked = acked.lock().unwrap().clone();
    let mut client = c.node_client(0);
    wait_for("node back", Duration::from_secs(30), || {
        let c = &c;
        async move { c.node_stats(0).await }
    })
    .await;
    for part in acked.chunks(100) {
        let ids = part
            .iter()
            .map(|(id, _)| Bytes::copy_from_slice(&id.0))
            .collect();
        let mut s = client
            .get_chunks(GetChunksRequest { ids })
            .await
            .unwrap()
            .into_inner();
        for (id, hash) in part {
            let r = s.message().await.unwrap().unwrap();
            assert!(
                r.error.is_empty(),
                "acknowledged chunk {id} lost: {}",
                r.error
            );
            assert_eq!(
                cairn_proto::blob_hash(&r.blob),
                *hash,
                "chunk {id} served with wrong bytes"
            );
        }
    }
}

#[tokio::test]
async fn bad_chunks_are_refused_and_store_nothing() {
    let c = TestCluster::start(Spec {
        coordinators: 1,
        nodes: 4,
        replicas: 1,
        zones: 1,
        ..Default::default()
    })
    .await;
    let mut client = c.node_client(0);
    let layout = cairn_client::Cluster::connect(c.coordinator_addrs.clone())
        .await
        .unwrap()
        .layout();
    let me = c.node_stats(0).await.unwrap().node_id;
    // An id this node serves, and one it does not.
    let mut served = None;
    let mut foreign = None;
    for seed in 0u64..10_000 {
        let id = ChunkId(*blake3::hash(&seed.to_le_bytes()).as_bytes());
        let mine = layout.replicas(id.partition()).contains(&me);
        if mine && served.is_none() {
            served = Some(id);
        }
        if !mine && foreign.is_none() {
            foreign = Some(id);
        }
    }
    let (served, foreign) = (served.unwrap(), foreign.unwrap());
    let put = |id: &[u8], blob: Bytes, hash: Vec<u8>| PutChunkRequest {
        id: Bytes::copy_from_slice(id),
        hash: Bytes::from(hash),
        blob,
        replica: false,
        layout_version: layout.version,
        crc32: None,
    };
    let data = Bytes::from(random_bytes(1, 1000));
    let good_hash = cairn_proto::blob_hash(&data).to_vec();
    let cases = vec![
        (
            "wrong hash",
            put(&served.0, data.clone(), vec![0; 32]),
            Code::InvalidArgument,
        ),
        (
            "short id",
            put(&served.0[..5], data.clone(), good_hash.clone()),
            Code::InvalidArgument,
        ),
        (
            "foreign partition",
            put(&foreign.0, data.clone(), good_hash.clone()),
            Code::FailedPrecondition,
        ),
    ];
    for (what, req, want) in cases {
        let r = client.put_chunks(tokio_stream_once(req)).await;
        let code = match r {
            Err(s) => s.code(),
            Ok(resp) => resp.into_inner().message().await.unwrap_err().code(),
        };
        assert_eq!(code, want, "{what}");
    }
    // Oversized: over the maximum blob size.
    let huge = Bytes::from(vec![0u8; cairn_proto::MAX_BLOB_SIZE + 1]);
    let h = cairn_proto::blob_hash(&huge).to_vec();
    let r = client
        .put_chunks(tokio_stream_once(put(&served.0, huge, h)))
        .await;
    let failed = match r {
        Err(_) => true,
        Ok(resp) => resp.into_inner().message().await.is_err(),
    };
    assert!(failed, "oversized blob refused");
    let has = client
        .has_chunks(HasChunksRequest {
            ids: vec![
                Bytes::copy_from_slice(&served.0),
                Bytes::copy_from_slice(&foreign.0),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(has.present, vec![false, false], "nothing was stored");
    assert_eq!(c.node_stats(0).await.unwrap().chunks, 0);
}

/// A replica put is checked by its CRC-32 alone only on a stream that shows the token of the
/// cluster's secret; without it, or with another, its hash is verified as for any put; a
/// client put's hash always is.
#[tokio::test]
async fn forwarded_puts_skip_the_hash_only_with_the_cluster_token() {
    let c = TestCluster::start(Spec {
        coordinators: 1,
        nodes: 3,
        replicas: 1,
        zones: 1,
        ..Default::default()
    })
    .await;
    let layout = cairn_client::Cluster::connect(c.coordinator_addrs.clone())
        .await
        .unwrap()
        .layout();
    let me = c.node_stats(0).await.unwrap().node_id;
    let ids: Vec<ChunkId> = (0u64..)
        .map(|i| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
        .filter(|id| layout.replicas(id.partition()).contains(&me))
        .take(2)
        .collect();
    let data = Bytes::from(random_bytes(2, 5000));
    let good_hash = cairn_proto::blob_hash(&data).to_vec();
    let crc = crc32fast::hash(&data);
    let put = |id: &ChunkId, hash: &[u8], crc32: u32, replica: bool| PutChunkRequest {
        id: Bytes::copy_from_slice(&id.0),
        blob: data.clone(),
        hash: Bytes::copy_from_slice(hash),
        replica,
        layout_version: layout.version,
        crc32: Some(crc32),
    };
    let token = cairn_proto::ReplicaToken::from_secret(&c.cluster_secret());
    let other = cairn_proto::ReplicaToken::from_secret("another cluster");
    let channels = cairn_proto::transport::NodeChannels::default();
    let send = |req: PutChunkRequest, token: Option<cairn_proto::ReplicaToken>| {
        let ch = channels.channel(&c.node_addrs[0]).unwrap();
        async move {
            let mut s = cairn_proto::upload::put_chunks(ch, vec![req], token.as_ref()).await?;
            s.message().await.map(|r| r.is_some())
        }
    };
    let wrong_hash = [7u8; 32];
    let cases = [
        (
            "token, blob damaged after its CRC",
            put(&ids[0], &good_hash, crc ^ 1, true),
            Some(token.clone()),
            "CRC-32",
        ),
        (
            "another cluster's token, wrong hash",
            put(&ids[0], &wrong_hash, crc, true),
            Some(other),
            "blake3",
        ),
        (
            "no token, wrong hash",
            put(&ids[0], &wrong_hash, crc, true),
            None,
            "blake3",
        ),
        (
            "token on a client put, wrong hash",
            put(&ids[0], &wrong_hash, crc, false),
            Some(token.clone()),
            "blake3",
        ),
    ];
    for (what, req, token, says) in cases {
        let e = send(req, token).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(says), "{what}: {e:?}");
    }
    assert_eq!(
        c.node_stats(0).await.unwrap().chunks,
        0,
        "nothing was stored"
    );
    // With the token and its CRC-32 the forwarded blob is stored, and reads back verified.
    assert!(send(put(&ids[1], &good_hash, crc, true), Some(token))
        .await
        .unwrap());
    let mut got = c
        .node_client(0)
        .get_chunks(GetChunksRequest {
            ids: vec![Bytes::copy_from_slice(&ids[1].0)],
        })
        .await
        .unwrap()
        .into_inner();
    let r = got.message().await.unwrap().unwrap();
    assert_eq!(r.error, "");
    assert_eq!(r.blob, data);
    assert_eq!(&r.hash[..], &good_hash[..]);
}

fn tokio_stream_once(r: PutChunkRequest) -> impl futures::Stream<Item = PutChunkRequest> {
    futures::stream::iter(vec![r])
}
