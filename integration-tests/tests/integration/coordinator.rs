//! The coordinator group: failover without losing acknowledged writes, restart, catch-up
//! through snapshots, membership changes under load, and refusal of bad input.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_integration_tests::{wait_for, Spec, TestCluster};
use cairn_proto::coord_client::CoordClient;
use cairn_proto::metadata::*;
use tonic::Code;

fn tenant_req(i: usize) -> CreateTenantRequest {
    CreateTenantRequest {
        name: format!("t{i}"),
        wrapped_key: vec![7; 60],
        salt: vec![1; 16],
        kdf: "argon2id:m=8,t=1,p=1".into(),
    }
}

/// Writes tenants t0, t1, ... until stopped; records every acknowledged one.
fn writer(
    coord: Arc<CoordClient>,
    acked: Arc<Mutex<BTreeSet<usize>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let r = coord
                .call(|mut c| async move { c.create_tenant(tenant_req(i)).await })
                .await;
            match r {
                Ok(_) => {
                    acked.lock().unwrap().insert(i);
                }
                // A retried write that had committed before its reply was lost.
                Err(s) if s.code() == Code::FailedPrecondition => {
                    acked.lock().unwrap().insert(i);
                }
                Err(_) => {}
            }
            i += 1;
        }
    })
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.unwrap_err().code()
}

async fn count(acked: &Arc<Mutex<BTreeSet<usize>>>) -> usize {
    acked.lock().unwrap().len()
}

async fn assert_all_present(coord: &CoordClient, acked: &BTreeSet<usize>) {
    for &i in acked {
        let name = format!("t{i}");
        let t = coord
            .call(|mut c| {
                let name = name.clone();
                async move { c.get_tenant(GetTenantRequest { name }).await }
            })
            .await;
        assert!(t.is_ok(), "acknowledged write t{i} lost: {t:?}");
    }
}

#[tokio::test]
async fn leader_kill9_loses_no_acknowledged_write_and_restart_keeps_state() {
    let mut c = TestCluster::start(Spec {
        nodes: 0,
        ..Default::default()
    })
    .await;
    let coord = Arc::new(c.coord());
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(coord.clone(), acked.clone(), stop.clone());
    wait_for("first writes", Duration::from_secs(30), || async {
        (count(&acked).await >= 30).then_some(())
    })
    .await;
    let old = c.leader().await;
    c.coordinators[old].kill9();
    let before = count(&acked).await;
    // A new leader serves within a few seconds and writes continue.
    wait_for("writes after failover", Duration::from_secs(15), || async {
        (count(&acked).await >= before + 30).then_some(())
    })
    .await;
    let new = c.leader().await;
    assert_ne!(new, old);
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    let acked_now = acked.lock().unwrap().clone();
    assert_all_present(&coord, &acked_now).await;
    // The killed coordinator rejoins; then the whole group restarts.
    c.coordinators[old].restart();
    for p in c.coordinators.iter_mut() {
        p.stop();
    }
    for p in c.coordinators.iter_mut() {
        p.restart();
    }
    c.leader().await;
    assert_all_present(&coord, &acked_now).await;
}

#[tokio::test]
async fn new_and_long_stopped_coordinators_catch_up_through_snapshots() {
    let mut c = TestCluster::start(Spec {
        nodes: 0,
        snapshot_logs: 20,
        ..Default::default()
    })
    .await;
    let coord = c.coord();
    for i in 0..150 {
        coord
            .call(|mut cl| async move { cl.create_tenant(tenant_req(i)).await })
            .await
            .unwrap();
    }
    let leader = c.leader().await;
    // The leader builds snapshots and purges the log they cover.
    let purged = wait_for("leader to purge its log", Duration::from_secs(30), || {
        let c = &c;
        async move {
            c.status_of(leader)
                .await
                .map(|s| s.purged_index)
                .filter(|p| *p > 0)
        }
    })
    .await;
    // A follower stopped for a while misses more writes.
    let follower = (leader + 1) % 3;
    c.coordinators[follower].stop();
    for i in 150..250 {
        coord
            .call(|mut cl| async move { cl.create_tenant(tenant_req(i)).await })
            .await
            .unwrap();
    }
    // A brand-new coordinator can only get the state below the purge point by snapshot install.
    let addr = format!("127.0.0.1:{}", cairn_integration_tests::free_port());
    let p = c.coordinator_proc(4, &addr, true);
    c.coordinators.push(p);
    c.coordinator_addrs.push(addr.clone());
    let a = addr.clone();
    coord
        .call(|mut cl| {
            let a = a.clone();
            async move {
                cl.add_coordinator(AddCoordinatorRequest { id: 4, address: a })
                    .await
            }
        })
        .await
        .unwrap();
    let target = c.status_of(leader).await.unwrap().last_applied;
    let s = wait_for(
        "new coordinator to catch up",
        Duration::from_secs(30),
        || {
            let c = &c;
            async move { c.status_of(3).await.filter(|s| s.last_applied >= target) }
        },
    )
    .await;
    assert!(
        s.snapshot_index >= purged,
        "installed a snapshot covering the purged log: {s:?}"
    );
    c.coordinators[follower].restart();
    wait_for(
        "stopped follower to catch up",
        Duration::from_secs(30),
        || {
            let c = &c;
            async move {
                c.status_of(follower)
                    .await
                    .filter(|s| s.last_applied >= target)
            }
        },
    )
    .await;
    // Every write is readable through the new coordinator's view of the group.
    let acked: BTreeSet<usize> = (0..250).collect();
    assert_all_present(&CoordClient::new(vec![addr]).unwrap(), &acked).await;
}

#[tokio::test]
async fn coordinators_are_replaced_under_load() {
    let mut c = TestCluster::start(Spec {
        nodes: 0,
        snapshot_logs: 50,
        ..Default::default()
    })
    .await;
    let coord = Arc::new(c.coord());
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(coord.clone(), acked.clone(), stop.clone());
    wait_for("first writes", Duration::from_secs(30), || async {
        (count(&acked).await >= 20).then_some(())
    })
    .await;
    // Replace coordinator 3 by a new coordinator 4 (ids are never reused).
    let leader = c.leader().await;
    let victim = if leader == 2 { 1 } else { 2 };
    let victim_id = victim as u64 + 1;
    coord
        .call(|mut cl| async move {
            cl.remove_coordinator(RemoveCoordinatorRequest { id: victim_id })
                .await
        })
        .await
        .unwrap();
    c.coordinators[victim].stop();
    let addr = format!("127.0.0.1:{}", cairn_integration_tests::free_port());
    let p = c.coordinator_proc(4, &addr, true);
    c.coordinators.push(p);
    c.coordinator_addrs.push(addr.clone());
    let a = addr.clone();
    let m = coord
        .call(|mut cl| {
            let a = a.clone();
            async move {
                cl.add_coordinator(AddCoordinatorRequest { id: 4, address: a })
                    .await
            }
        })
        .await
        .unwrap();
    let voters: BTreeSet<u64> = m.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert!(
        voters.contains(&4) && !voters.contains(&victim_id),
        "{voters:?}"
    );
    let before = count(&acked).await;
    wait_for(
        "writes after the change",
        Duration::from_secs(20),
        || async { (count(&acked).await >= before + 20).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    let l = c.leader().await;
    let target = c.status_of(l).await.unwrap().last_applied;
    wait_for(
        "new coordinator to catch up",
        Duration::from_secs(20),
        || {
            let c = &c;
            async move { c.status_of(3).await.filter(|s| s.last_applied >= target) }
        },
    )
    .await;
    let acked_now = acked.lock().unwrap().clone();
    assert_all_present(&coord, &acked_now).await;
    // The new coordinator alone can answer (after redirect) too.
    let only_new = CoordClient::new(vec![addr]).unwrap();
    assert_all_present(&only_new, &acked_now).await;
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let c = TestCluster::start(Spec {
        coordinators: 1,
        nodes: 1,
        replicas: 1,
        ..Default::default()
    })
    .await;
    let coord = c.coord();
    // A node re-registering with a stolen id (wrong secret).
    let stolen = coord
        .call(|mut cl| async move {
            cl.register_node(RegisterNodeRequest {
                id: 1,
                secret: "x".repeat(32),
                address: "127.0.0.1:1".into(),
                zone: "z".into(),
                capacity: 1 << 30,
            })
            .await
        })
        .await;
    assert_eq!(stolen.unwrap_err().code(), Code::PermissionDenied);
    let hb = coord
        .call(|mut cl| async move {
            cl.heartbeat(HeartbeatRequest {
                id: 1,
                secret: "y".repeat(32),
                ..Default::default()
            })
            .await
        })
        .await;
    assert_eq!(hb.unwrap_err().code(), Code::PermissionDenied);
    let nodes = coord
        .call(|mut cl| async move { cl.list_nodes(ListNodesRequest {}).await })
        .await
        .unwrap();
    assert_eq!(nodes.nodes.len(), 1);
    assert_ne!(
        nodes.nodes[0].address, "127.0.0.1:1",
        "stolen registration changed nothing"
    );
    let short = coord
        .call(|mut cl| async move {
            cl.register_node(RegisterNodeRequest {
                id: 0,
                secret: "short".into(),
                address: "a:1".into(),
                zone: "z".into(),
                capacity: 1,
            })
            .await
        })
        .await;
    assert_eq!(short.unwrap_err().code(), Code::InvalidArgument);
    // Unknown ids.
    let r = coord
        .call(|mut cl| async move {
            cl.commit_snapshot(CommitSnapshotRequest {
                id: "nope".into(),
                root: vec![0; 32],
                stats: None,
            })
            .await
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = coord
        .call(|mut cl| async move {
            cl.get_snapshot(GetSnapshotRequest { id: "nope".into() })
                .await
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = coord
        .call(|mut cl| async move {
            cl.set_node_state(SetNodeStateRequest { id: 99, state: 2 })
                .await
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    // Malformed catalog writes.
    coord
        .call(|mut cl| async move { cl.create_tenant(tenant_req(0)).await })
        .await
        .unwrap();
    let begin = |tenant: &str, kind: &str| BeginSnapshotRequest {
        tenant: tenant.into(),
        host: "h".into(),
        paths: vec!["/p".into()],
        tags: vec![],
        kind: kind.into(),
        parent: String::new(),
    };
    let (b1, b2) = (begin("nobody", "full"), begin("t0", "weekly"));
    let r = coord
        .call(|mut cl| {
            let b = b1.clone();
            async move { cl.begin_snapshot(b).await }
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = coord
        .call(|mut cl| {
            let b = b2.clone();
            async move { cl.begin_snapshot(b).await }
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    // Commit is atomic and idempotent; a conflicting second commit is refused.
    let b3 = begin("t0", "full");
    let s = coord
        .call(|mut cl| {
            let b = b3.clone();
            async move { cl.begin_snapshot(b).await }
        })
        .await
        .unwrap();
    let commit = |root: u8| CommitSnapshotRequest {
        id: s.id.clone(),
        root: vec![root; 32],
        stats: None,
    };
    let (c1, c2) = (commit(1), commit(2));
    let first = coord
        .call(|mut cl| {
            let r = c1.clone();
            async move { cl.commit_snapshot(r).await }
        })
        .await
        .unwrap();
    let again = coord
        .call(|mut cl| {
            let r = c1.clone();
            async move { cl.commit_snapshot(r).await }
        })
        .await
        .unwrap();
    assert_eq!(first, again);
    let r = coord
        .call(|mut cl| {
            let r = c2.clone();
            async move { cl.commit_snapshot(r).await }
        })
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    let got = coord
        .call(|mut cl| {
            let id = s.id.clone();
            async move { cl.get_snapshot(GetSnapshotRequest { id }).await }
        })
        .await
        .unwrap();
    assert_eq!(got.root, vec![1; 32]);
    // Oversized messages and fields.
    let huge = CreateTenantRequest {
        name: "huge".into(),
        wrapped_key: vec![0; 40 << 20],
        salt: vec![],
        kdf: String::new(),
    };
    let r = coord
        .call(|mut cl| {
            let h = huge.clone();
            async move { cl.create_tenant(h).await }
        })
        .await;
    assert!(r.is_err());
    let big = CreateTenantRequest {
        name: "big".into(),
        wrapped_key: vec![0; 5000],
        salt: vec![],
        kdf: String::new(),
    };
    let r = coord
        .call(|mut cl| {
            let h = big.clone();
            async move { cl.create_tenant(h).await }
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    for name in ["huge", "big"] {
        let r = coord
            .call(
                |mut cl| async move { cl.get_tenant(GetTenantRequest { name: name.into() }).await },
            )
            .await;
        assert_eq!(code(r), Code::NotFound, "{name} must not exist");
    }
}
