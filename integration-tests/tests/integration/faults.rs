//! Faults during real work: processes killed during backups and restores, whole-cluster
//! restarts, concurrent clients, corrupt copies.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_integration_tests::fixtures::{
    compare_trees, corrupt_where, make_tree, random_bytes, text_bytes,
};
use cairn_integration_tests::{wait_for, Spec, TestCluster, PASSWORD};

use crate::backup::{init, restored};

pub fn src_dir(c: &TestCluster, name: &str) -> PathBuf {
    std::fs::canonicalize(c.dir.path()).unwrap().join(name)
}

/// A tree with several large random files (many chunks).
pub fn big_tree(root: &Path, files: u64, size: usize) {
    std::fs::create_dir_all(root).unwrap();
    for i in 0..files {
        std::fs::write(
            root.join(format!("big{i}.bin")),
            random_bytes(1000 + i, size),
        )
        .unwrap();
    }
    std::fs::write(root.join("small.txt"), text_bytes(5, 5000)).unwrap();
}

fn spawn_cli(c: &TestCluster, args: &[&str]) -> Child {
    Command::new(cairn_integration_tests::bin_dir().join("cairn"))
        .arg("--json")
        .args(args)
        .env("CAIRN_COORDINATOR", c.coordinator_addrs.join(","))
        .env("CAIRN_PASSWORD", PASSWORD)
        .env("XDG_CONFIG_HOME", c.dir.path().join("xdg"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn finish(child: Child) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "cairn failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn total_chunks(c: &TestCluster, alive: &[usize]) -> u64 {
    let mut n = 0;
    for &i in alive {
        n += c.node_stats(i).await.map(|s| s.chunks).unwrap_or(0);
    }
    n
}

pub fn restore_and_compare(c: &TestCluster, snap: &str, src: &Path, name: &str) {
    let target = c.dir.path().join(name);
    let r = c.cli_json(&[
        "restore",
        snap,
        "--target",
        target.to_str().unwrap(),
        "--verify",
    ]);
    assert_eq!(r["files"], r["verified"]);
    compare_trees(src, &restored(&target, src)).unwrap();
}

#[tokio::test]
async fn storage_node_killed_during_backup_still_commits_and_restores() {
    let mut c = TestCluster::start(Spec::default()).await;
    init(&c);
    let src = src_dir(&c, "src");
    big_tree(&src, 6, 8 << 20);
    let mut backup = spawn_cli(&c, &["backup", src.to_str().unwrap()]);
    wait_for("backup to be under way", Duration::from_secs(60), || {
        let c = &c;
        async move { (total_chunks(c, &[0, 1, 2]).await >= 10).then_some(()) }
    })
    .await;
    assert!(
        backup.try_wait().unwrap().is_none(),
        "the fault hits a backup in progress"
    );
    c.nodes[1].kill9();
    let b = finish(backup).await;
    restore_and_compare(&c, b["snapshot"].as_str().unwrap(), &src, "restore");
}

#[tokio::test]
async fn leader_killed_during_backup_client_carries_on() {
    let mut c = TestCluster::start(Spec::default()).await;
    init(&c);
    let src = src_dir(&c, "src");
    big_tree(&src, 6, 8 << 20);
    let mut backup = spawn_cli(&c, &["backup", src.to_str().unwrap()]);
    wait_for("backup to be under way", Duration::from_secs(60), || {
        let c = &c;
        async move { (total_chunks(c, &[0, 1, 2]).await >= 10).then_some(()) }
    })
    .await;
    let leader = c.leader().await;
    assert!(
        backup.try_wait().unwrap().is_none(),
        "the fault hits a backup in progress"
    );
    c.coordinators[leader].kill9();
    let b = finish(backup).await;
    restore_and_compare(&c, b["snapshot"].as_str().unwrap(), &src, "restore");
}

#[tokio::test]
async fn whole_cluster_restart_keeps_every_snapshot() {
    let mut c = TestCluster::start(Spec::default()).await;
    init(&c);
    let src = src_dir(&c, "src");
    make_tree(&src);
    let first = c.cli_json(&["backup", src.to_str().unwrap()]);
    let snap1 = c.dir.path().join("snap1");
    c.cli_json(&[
        "restore",
        first["snapshot"].as_str().unwrap(),
        "--target",
        snap1.to_str().unwrap(),
    ]);
    std::fs::write(src.join("added-later.txt"), b"second snapshot").unwrap();
    let second = c.cli_json(&["backup", src.to_str().unwrap()]);
    for n in c.nodes.iter_mut() {
        n.kill9();
    }
    for p in c.coordinators.iter_mut() {
        p.kill9();
    }
    for p in c.coordinators.iter_mut() {
        p.restart();
    }
    for n in c.nodes.iter_mut() {
        n.restart();
    }
    c.leader().await;
    wait_for("nodes to serve", Duration::from_secs(30), || {
        let c = &c;
        async move {
            for i in 0..3 {
                c.node_stats(i).await?;
            }
            Some(())
        }
    })
    .await;
    let again = c.dir.path().join("again");
    c.cli_json(&[
        "restore",
        first["snapshot"].as_str().unwrap(),
        "--target",
        again.to_str().unwrap(),
        "--verify",
    ]);
    compare_trees(&snap1, &again).unwrap();
    restore_and_compare(&c, second["snapshot"].as_str().unwrap(), &src, "latest");
}

#[tokio::test]
async fn two_clients_back_up_one_tenant_at_once_and_share_dedup() {
    let c = TestCluster::start(Spec::default()).await;
    init(&c);
    let (a, b) = (src_dir(&c, "a"), src_dir(&c, "b"));
    // Both trees hold the same 16 MiB plus 2 MiB of their own.
    for (dir, own) in [(&a, 1u64), (&b, 2)] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("shared.bin"), random_bytes(42, 16 << 20)).unwrap();
        std::fs::write(dir.join("own.bin"), random_bytes(own, 2 << 20)).unwrap();
    }
    let ja = spawn_cli(&c, &["backup", a.to_str().unwrap(), "--host", "client-a"]);
    let jb = spawn_cli(&c, &["backup", b.to_str().unwrap(), "--host", "client-b"]);
    let (ra, rb) = (finish(ja).await, finish(jb).await);
    restore_and_compare(&c, ra["snapshot"].as_str().unwrap(), &a, "ra");
    restore_and_compare(&c, rb["snapshot"].as_str().unwrap(), &b, "rb");
    // The shared content is stored once: a node holds far less than both trees' bytes.
    let stored = c.node_stats(0).await.unwrap().bytes_stored;
    assert!(
        stored < 24 << 20,
        "stored {stored} bytes for 36 MiB of input with 16 MiB shared"
    );
}

#[tokio::test]
async fn corrupt_copies_are_detected_and_restore_uses_another_replica() {
    let c = TestCluster::start(Spec::default()).await;
    init(&c);
    let src = src_dir(&c, "src");
    big_tree(&src, 2, 4 << 20);
    // Enough chunks that node 0 is the first replica asked for some of them (each chunk's
    // first replica is one of three: with about 70 chunks, none on node 0 has odds near 1e-12).
    // Each is longer than the 4 KiB stride of the bit flips below, so every copy is hit.
    for i in 0..60 {
        std::fs::write(src.join(format!("r{i}.bin")), random_bytes(100 + i, 5000)).unwrap();
    }
    let b = c.cli_json(&["backup", src.to_str().unwrap()]);
    // Flip bits inside every record on node 0 (past each record's header).
    let flipped = flip_segments(&c, 0, 4096);
    assert!(flipped > 100);
    let target = c.dir.path().join("restore");
    let r = c.cli_json(&[
        "restore",
        b["snapshot"].as_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
        "--verify",
    ]);
    compare_trees(&src, &restored(&target, &src)).unwrap();
    let bad = r["bad_copies"].as_array().unwrap();
    assert!(!bad.is_empty(), "the corrupt copies were reported");
    let stats = c.node_stats(0).await.unwrap();
    assert!(
        stats.corrupt_found > 0,
        "node 0 counted the corruption it served no bytes of"
    );
    // The node fetches good copies of what it lost from the other replicas.
    let distinct: std::collections::HashSet<&str> =
        bad.iter().map(|b| b["chunk"].as_str().unwrap()).collect();
    let n = distinct.len() as u64;
    wait_for(
        "node 0 to restore its copies",
        Duration::from_secs(60),
        || {
            let c = &c;
            async move {
                c.node_stats(0)
                    .await?
                    .healing
                    .filter(|h| h.repaired >= n)
                    .map(|_| ())
            }
        },
    )
    .await;
}

/// Flips one byte every `stride` bytes (from offset 200) in every segment of node `i`.
fn flip_segments(c: &TestCluster, i: usize, stride: u64) -> u64 {
    let mut flipped = 0;
    for e in std::fs::read_dir(c.node_dir(i).join("segments")).unwrap() {
        let path = e.unwrap().path();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let len = f.metadata().unwrap().len();
        let mut off = 200;
        while off < len {
            let mut byte = [0u8; 1];
            f.read_exact_at(&mut byte, off).unwrap();
            f.write_all_at(&[byte[0] ^ 0x55], off).unwrap();
            flipped += 1;
            off += stride;
        }
    }
    flipped
}

#[tokio::test]
async fn check_read_data_verifies_every_chunk_and_reports_copies_corrupt_everywhere() {
    let c = TestCluster::start(Spec::default()).await;
    init(&c);
    let src = src_dir(&c, "src");
    big_tree(&src, 2, 4 << 20);
    c.cli_json(&["backup", src.to_str().unwrap()]);
    let r = c.cli_json(&["check", "--read-data"]);
    let chunks = r["chunks"].as_u64().unwrap();
    // The trees down to src, small.txt, and the big files' chunks (at least 256 KiB each).
    let small = r["trees"].as_u64().unwrap() + 1;
    assert!(chunks > small, "{r}");
    assert_eq!(r["read_verified"].as_u64(), Some(chunks), "{r}");
    assert!(r["missing"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["read_errors"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(r["under_replicated"].as_u64(), Some(0), "{r}");
    // Every copy of every record over 16 KiB damaged (the big files' chunks): nothing can
    // repair them. The trees and small.txt are smaller and left alone, so the walk still finds
    // every chunk. A record left intact on any node (a big file's short last chunk, or one in a
    // file's last block) still reads.
    let mut intact = std::collections::HashSet::new();
    for i in 0..3 {
        let (flipped, kept) = corrupt_where(&c.node_dir(i).join("segments"), |h| h.len > 16 << 10);
        assert!(!flipped.is_empty());
        intact.extend(kept);
    }
    let damaged = chunks.saturating_sub(intact.len() as u64);
    assert!(damaged > 0 && intact.len() as u64 >= small, "{intact:?}");
    let out = c.cli(&["--json", "check", "--read-data"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = r["read_errors"].as_array().unwrap().len() as u64;
    assert!(errors >= damaged, "every damaged chunk is reported: {r}");
    assert_eq!(r["read_verified"].as_u64().unwrap() + errors, chunks, "{r}");
}

#[tokio::test]
async fn storage_node_killed_mid_restore_restore_completes() {
    let mut c = TestCluster::start(Spec::default()).await;
    init(&c);
    let src = src_dir(&c, "src");
    big_tree(&src, 6, 8 << 20);
    let b = c.cli_json(&["backup", src.to_str().unwrap()]);
    let target = c.dir.path().join("restore");
    let mut restore = spawn_cli(
        &c,
        &[
            "restore",
            b["snapshot"].as_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
        ],
    );
    wait_for("restore to be under way", Duration::from_secs(60), || {
        let t = target.clone();
        async move { t.exists().then_some(()) }
    })
    .await;
    assert!(
        restore.try_wait().unwrap().is_none(),
        "the fault hits a restore in progress"
    );
    c.nodes[0].kill9();
    finish(restore).await;
    compare_trees(&src, &restored(&target, &src)).unwrap();
}
