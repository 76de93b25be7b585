//! The multi-host fault suite: a compose cluster (3 coordinators, 5 storage nodes in 2 zones,
//! R=3) broken in seven ways while a client loops backup and restore. Afterwards every
//! acknowledged snapshot must be in the catalog and restore byte-identical.
//! Runs when `CAIRN_DOCKER_TESTS=1` (set by `.ci/run` when a Docker engine is available).

use std::time::Duration;

use cairn_integration_tests::docker::{docker, enabled, verify, Compose, Workload};
use cairn_integration_tests::fixtures::corrupt_records;

const T: Duration = Duration::from_secs(120);

#[test]
fn kill9_of_the_coordinator_leader() {
    if !enabled() {
        return;
    }
    let c = Compose::up(&[]);
    c.init();
    let w = Workload::start(&c);
    w.wait_more(&c, 2, T);
    let leader = c.leader();
    docker(&["kill", "-s", "KILL", &c.container(&leader)]);
    w.wait_more(&c, 3, T);
    assert_ne!(c.leader(), leader, "a new leader took over");
    docker(&["start", &c.container(&leader)]);
    w.finish(&c);
}

#[test]
fn storage_node_cut_off_mid_backup_then_healed() {
    if !enabled() {
        return;
    }
    let c = Compose::up(&[("CAIRN_TEST_RESYNC_MS", "2000")]);
    c.init();
    let w = Workload::start(&c);
    w.wait_more(&c, 1, T);
    c.disconnect("node3");
    w.wait_more(&c, 3, T);
    c.connect("node3");
    w.wait_more(&c, 2, T);
    let src = w.src.clone();
    let acked = w.stop();
    // The copies node3 missed come back: nothing stays below R.
    c.wait_redundancy(T);
    verify(&c, &acked, &src);
}

#[test]
fn coordinator_leader_partitioned_from_the_majority() {
    if !enabled() {
        return;
    }
    let c = Compose::up(&[]);
    c.init();
    let w = Workload::start(&c);
    w.wait_more(&c, 2, T);
    let leader = c.leader();
    c.disconnect(&leader);
    c.wait("the majority to elect another leader", T, || {
        c.leader() != leader
    });
    w.wait_more(&c, 3, T);
    c.connect(&leader);
    w.wait_more(&c, 1, T);
    w.finish(&c);
}

#[test]
fn rolling_restart_of_every_container() {
    if !enabled() {
        return;
    }
    let c = Compose::up(&[]);
    c.init();
    let w = Workload::start(&c);
    w.wait_more(&c, 1, T);
    for svc in [
        "coord1", "coord2", "coord3", "node1", "node2", "node3", "node4", "node5",
    ] {
        docker(&["restart", "-t", "10", &c.container(svc)]);
        c.leader();
        c.wait_nodes_active(5, T);
        w.wait_more(&c, 1, T);
    }
    w.finish(&c);
}

#[test]
fn storage_node_and_its_volume_destroyed_for_good() {
    if !enabled() {
        return;
    }
    let c = Compose::up(&[
        ("CAIRN_TEST_NODE_DOWN_MS", "2000"),
        ("CAIRN_TEST_NODE_OUT_MS", "4000"),
        ("CAIRN_TEST_RESYNC_MS", "1000"),
    ]);
    c.init();
    let w = Workload::start(&c);
    w.wait_more(&c, 3, T);
    docker(&["rm", "-f", &c.container("node5")]);
    docker(&["volume", "rm", &format!("{}_node5", c.project)]);
    w.wait_more(&c, 2, T);
    let src = w.src.clone();
    let acked = w.stop();
    let nodes = || c.try_json(&["cluster", "nodes"]).unwrap_or_default();
    c.wait("the lost node to be Out", T, || {
        nodes().as_array().is_some_and(|v| {
            v.iter().any(|n| {
                n["address"].as_str() == Some(&format!("{}:7100", c.ip("node5")))
                    && n["state"] == "Out"
            })
        })
    });
    c.wait_redundancy(T);
    verify(&c, &acked, &src);
}

#[test]
fn bit_rot_in_a_segment_file_is_repaired() {
    if !enabled() {
        return;
    }
    let c = Compose::up(&[("CAIRN_TEST_SCRUB_MS", "1000")]);
    c.init();
    let w = Workload::start(&c);
    w.wait_more(&c, 3, T);
    // Flip a byte inside up to five records of node1's segment files, once node1 holds any
    // outside the block its writer still rewrites (a few backups may all have gone elsewhere).
    let mut flipped = 0;
    c.wait("node1 to hold records to corrupt", T, || {
        flipped = corrupt_records(&c.volume_path("node1").join("segments"), 5);
        flipped > 0
    });
    let node1 = format!("{}:7100", c.ip("node1"));
    c.wait(
        "scrub or read repair to fix every flipped record",
        T,
        || {
            c.try_json(&["cluster", "nodes"]).is_some_and(|v| {
                v.as_array().unwrap().iter().any(|n| {
                    n["address"].as_str() == Some(node1.as_str())
                        && n["healing"]["corrupt_found"].as_u64() >= Some(flipped)
                        && n["healing"]["repaired"].as_u64() >= Some(flipped)
                })
            })
        },
    );
    w.finish(&c);
}

#[test]
fn paused_node_and_slow_link() {
    if !enabled() {
        return;
    }
    let c = Compose::up(&[]);
    c.init();
    let w = Workload::start(&c);
    w.wait_more(&c, 1, T);
    docker(&["pause", &c.container("node2")]);
    w.wait_more(&c, 2, T);
    docker(&["unpause", &c.container("node2")]);
    let node3 = c.container("node3");
    let netem = std::process::Command::new("docker")
        .args([
            "exec", &node3, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "100ms",
            "20ms",
        ])
        .output()
        .unwrap();
    if netem.status.success() {
        w.wait_more(&c, 2, T);
        docker(&["exec", &node3, "tc", "qdisc", "del", "dev", "eth0", "root"]);
    } else {
        eprintln!(
            "slow link not tested: tc netem unavailable here ({})",
            String::from_utf8_lossy(&netem.stderr).trim()
        );
    }
    w.wait_more(&c, 1, T);
    w.finish(&c);
}
