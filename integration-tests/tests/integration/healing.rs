//! Self-healing: a node lost for good, a node added, a drain, bit rot, and maintenance.
//! Copies are counted through the nodes' admin RPCs (ListChunks), never through logs.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use cairn_integration_tests::fixtures::{corrupt_records, random_bytes};
use cairn_integration_tests::{wait_for, Spec, TestCluster};
use cairn_proto::metadata::{GetLayoutRequest, ListNodesRequest};
use cairn_proto::types::NodeState;
use cairn_proto::ChunkId;

use crate::backup::init;
use crate::faults::{restore_and_compare, src_dir};

/// A tree of many small distinct files (many chunks spread over many partitions).
fn many_files(root: &std::path::Path, n: u64) {
    std::fs::create_dir_all(root).unwrap();
    for i in 0..n {
        std::fs::write(root.join(format!("f{i:04}")), random_bytes(5000 + i, 8_000)).unwrap();
    }
}

/// The nodes (indexes in the test cluster) holding each chunk, listed in `order` (givers
/// before receivers: a chunk in transit is then never missed — a giver deletes only after every
/// receiver holds it).
async fn holders(c: &TestCluster, order: &[usize]) -> BTreeMap<ChunkId, BTreeSet<usize>> {
    let mut m: BTreeMap<ChunkId, BTreeSet<usize>> = BTreeMap::new();
    for &i in order {
        for id in c.node_chunks(i).await.unwrap_or_default() {
            m.entry(id).or_default().insert(i);
        }
    }
    m
}

/// Copies of each chunk over `order` (see [`holders`]).
async fn copies(c: &TestCluster, order: &[usize]) -> BTreeMap<ChunkId, usize> {
    holders(c, order)
        .await
        .into_iter()
        .map(|(id, h)| (id, h.len()))
        .collect()
}

/// Whether every chunk of `all` is held, as `held` lists them, by exactly the nodes its
/// partition maps to in the current layout: the layout fully carried out. Counting copies alone
/// cannot tell that: between two moves of a rebalance, every chunk has R copies.
async fn placed(
    c: &TestCluster,
    all: &HashSet<ChunkId>,
    held: &BTreeMap<ChunkId, BTreeSet<usize>>,
) -> bool {
    let Ok(layout) = c
        .coord()
        .call(|mut cl| async move { cl.get_layout(GetLayoutRequest::default()).await })
        .await
    else {
        return false;
    };
    let mut ids = BTreeMap::new();
    for &i in held.values().flatten() {
        if let std::collections::btree_map::Entry::Vacant(e) = ids.entry(i) {
            e.insert(node_id(c, i).await);
        }
    }
    all.iter().all(|id| {
        let want: Option<BTreeSet<u64>> = layout
            .partitions
            .get(id.partition() as usize)
            .map(|p| p.nodes.iter().copied().collect());
        let have: Option<BTreeSet<u64>> = held.get(id).map(|h| h.iter().map(|i| ids[i]).collect());
        want.is_some() && have == want
    })
}

async fn node_id(c: &TestCluster, i: usize) -> u64 {
    c.node_stats(i).await.unwrap().node_id
}

async fn state_of(c: &TestCluster, id: u64) -> NodeState {
    let nodes = c
        .coord()
        .call(|mut cl| async move { cl.list_nodes(ListNodesRequest {}).await })
        .await
        .unwrap();
    NodeState::try_from(nodes.nodes.iter().find(|n| n.id == id).unwrap().state).unwrap()
}

#[tokio::test]
async fn node_lost_for_good_is_re_replicated_to_r() {
    let mut c = TestCluster::start(Spec {
        nodes: 4,
        node_down_ms: 1000,
        node_out_ms: 1500,
        ..Default::default()
    })
    .await;
    init(&c);
    let src = src_dir(&c, "src");
    many_files(&src, 300);
    let b = c.cli_json(&["backup", src.to_str().unwrap()]);
    let all: HashSet<ChunkId> = copies(&c, &[0, 1, 2, 3]).await.keys().copied().collect();
    let lost = node_id(&c, 3).await;
    c.nodes[3].kill9();
    wait_for("node to be declared Out", Duration::from_secs(30), || {
        let c = &c;
        async move { (state_of(c, lost).await == NodeState::Out).then_some(()) }
    })
    .await;
    wait_for(
        "every chunk back at R on the survivors",
        Duration::from_secs(90),
        || {
            let (c, all) = (&c, &all);
            async move {
                let m = copies(c, &[0, 1, 2]).await;
                all.iter()
                    .all(|id| m.get(id).copied().unwrap_or(0) >= 3)
                    .then_some(())
            }
        },
    )
    .await;
    restore_and_compare(&c, b["snapshot"].as_str().unwrap(), &src, "restore");
}

#[tokio::test]
async fn added_node_receives_its_share_and_nothing_drops_below_r() {
    let mut c = TestCluster::start(Spec::default()).await;
    init(&c);
    let src = src_dir(&c, "src");
    many_files(&src, 400);
    let b = c.cli_json(&["backup", src.to_str().unwrap()]);
    let all: HashSet<ChunkId> = copies(&c, &[0, 1, 2]).await.keys().copied().collect();
    c.add_node().await;
    let share = wait_for(
        "rebalance onto the new node",
        Duration::from_secs(90),
        || {
            let (c, all) = (&c, &all);
            async move {
                // Old nodes give, the new one receives: list the givers first.
                let held = holders(c, &[0, 1, 2, 3]).await;
                for id in all {
                    let n = held.get(id).map_or(0, BTreeSet::len);
                    assert!(n >= 3, "chunk {id} has {n} copies during the move");
                }
                let new = held.values().filter(|h| h.contains(&3)).count();
                let settled = new > 0 && placed(c, all, &held).await;
                settled.then_some(new as f64 / all.len() as f64)
            }
        },
    )
    .await;
    // Its share of the chunks follows its share of the partitions (3/4 with 4 nodes and R=3,
    // less when it shares a zone with another node).
    let layout = c.cli_json(&["cluster", "layout"]);
    let new_id = node_id(&c, 3).await;
    let parts = layout["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == new_id)
        .unwrap()["partitions"]
        .as_f64()
        .unwrap();
    let expected = parts / 1024.0;
    assert!(expected > 0.3, "the new node got partitions: {expected}");
    assert!(
        (share - expected).abs() < 0.15,
        "new node holds {share:.2} of the chunks, expected about {expected:.2}"
    );
    restore_and_compare(&c, b["snapshot"].as_str().unwrap(), &src, "restore");
}

#[tokio::test]
async fn drained_node_empties_without_dropping_below_r() {
    let mut c = TestCluster::start(Spec {
        nodes: 4,
        ..Default::default()
    })
    .await;
    init(&c);
    let src = src_dir(&c, "src");
    many_files(&src, 300);
    let b = c.cli_json(&["backup", src.to_str().unwrap()]);
    let all: HashSet<ChunkId> = copies(&c, &[0, 1, 2, 3]).await.keys().copied().collect();
    let id = node_id(&c, 0).await;
    let before = c.node_chunks(0).await.unwrap().len();
    assert!(before > 0);
    c.cli_json(&["cluster", "drain", &id.to_string()]);
    wait_for("the drained node to empty", Duration::from_secs(90), || {
        let (c, all) = (&c, &all);
        async move {
            // The draining node gives: list it first.
            let m = copies(c, &[0, 1, 2, 3]).await;
            for chunk in all {
                let n = m.get(chunk).copied().unwrap_or(0);
                assert!(n >= 3, "chunk {chunk} has {n} copies during the drain");
            }
            (c.node_chunks(0).await?.is_empty()).then_some(())
        }
    })
    .await;
    // As an operator sees it: `cluster nodes` shows the node Draining and, at last, empty.
    let me = wait_for(
        "cluster nodes to show the node empty",
        Duration::from_secs(30),
        || {
            let c = &c;
            async move {
                let nodes = c.cli_json(&["cluster", "nodes"]);
                let me = nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|n| n["id"] == id)
                    .unwrap()
                    .clone();
                (me["chunks"] == 0).then_some(me)
            }
        },
    )
    .await;
    assert_eq!(me["state"], "Draining");
    // Empty, it can be removed; the others hold everything at R.
    c.cli_json(&["cluster", "remove-node", &id.to_string()]);
    c.nodes[0].stop();
    let m = copies(&c, &[1, 2, 3]).await;
    assert!(all.iter().all(|chunk| m.get(chunk) == Some(&3)));
    restore_and_compare(&c, b["snapshot"].as_str().unwrap(), &src, "restore");
}

#[tokio::test]
async fn scrub_finds_and_repairs_ten_corrupt_blobs() {
    let c = TestCluster::start(Spec {
        scrub_ms: 300,
        ..Default::default()
    })
    .await;
    init(&c);
    let src = src_dir(&c, "src");
    many_files(&src, 100);
    let b = c.cli_json(&["backup", src.to_str().unwrap()]);
    let held = c.node_chunks(0).await.unwrap().len();
    // Flip one byte inside the blob of ten records of node 0's segment files.
    let flipped = corrupt_records(&c.node_dir(0).join("segments"), 10);
    assert_eq!(flipped, 10);
    let s = wait_for(
        "scrub to find and repair all ten",
        Duration::from_secs(60),
        || {
            let c = &c;
            async move {
                let h = c.node_stats(0).await?.healing?;
                (h.corrupt_found >= 10 && h.repaired >= 10).then_some(h)
            }
        },
    )
    .await;
    assert_eq!(s.corrupt_found, 10, "{s:?}");
    assert_eq!(
        c.node_chunks(0).await.unwrap().len(),
        held,
        "every copy is back"
    );
    // A second scrub pass finds nothing more.
    let passes = s.scrub_passes;
    let s2 = wait_for("another clean scrub pass", Duration::from_secs(60), || {
        let c = &c;
        async move {
            c.node_stats(0)
                .await?
                .healing
                .filter(|h| h.scrub_passes > passes + 1)
        }
    })
    .await;
    assert_eq!(s2.corrupt_found, 10);
    restore_and_compare(&c, b["snapshot"].as_str().unwrap(), &src, "restore");
}

#[tokio::test]
async fn maintenance_restart_causes_no_re_replication() {
    let mut c = TestCluster::start(Spec {
        nodes: 4,
        node_down_ms: 1000,
        node_out_ms: 1500,
        ..Default::default()
    })
    .await;
    init(&c);
    let src = src_dir(&c, "src");
    many_files(&src, 100);
    c.cli_json(&["backup", src.to_str().unwrap()]);
    let id = node_id(&c, 3).await;
    let version = c.cli_json(&["cluster", "layout"])["version"]
        .as_u64()
        .unwrap();
    let pushed_before: u64 = {
        let mut s = 0;
        for i in 0..3 {
            s += c
                .node_stats(i)
                .await
                .unwrap()
                .healing
                .unwrap()
                .chunks_pushed;
        }
        s
    };
    c.cli_json(&["cluster", "maintenance", &id.to_string(), "on"]);
    c.nodes[3].kill9();
    // Let well over down + out time pass, measured in the others' anti-entropy passes (500 ms each).
    let start_passes = c
        .node_stats(0)
        .await
        .unwrap()
        .healing
        .unwrap()
        .resync_passes;
    wait_for("eight anti-entropy passes", Duration::from_secs(60), || {
        let c = &c;
        async move {
            c.node_stats(0)
                .await?
                .healing
                .filter(|h| h.resync_passes >= start_passes + 8)
                .map(|_| ())
        }
    })
    .await;
    assert_eq!(state_of(&c, id).await, NodeState::Maintenance);
    assert_eq!(
        c.cli_json(&["cluster", "layout"])["version"]
            .as_u64()
            .unwrap(),
        version,
        "no new layout"
    );
    let mut pushed = 0;
    for i in 0..3 {
        pushed += c
            .node_stats(i)
            .await
            .unwrap()
            .healing
            .unwrap()
            .chunks_pushed;
    }
    assert_eq!(pushed, pushed_before, "nothing was re-replicated");
    c.nodes[3].restart();
    c.cli_json(&["cluster", "maintenance", &id.to_string(), "off"]);
    assert_eq!(state_of(&c, id).await, NodeState::Active);
}
