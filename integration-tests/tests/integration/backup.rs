//! The client's promises, through the real CLI: round trip, incremental efficiency, keys,
//! hostile trees, corrupt copies.

use std::path::Path;

use cairn_integration_tests::fixtures::{allocated, compare_trees, make_tree, random_bytes};
use cairn_integration_tests::{Spec, TestCluster};

pub fn init(c: &TestCluster) {
    let out = c.cli(&["init"]);
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn restored(target: &Path, src: &Path) -> std::path::PathBuf {
    target.join(src.strip_prefix("/").unwrap())
}

#[tokio::test]
async fn round_trip_is_byte_identical_with_metadata() {
    let c = TestCluster::start(Spec::default()).await;
    init(&c);
    let src = std::fs::canonicalize(c.dir.path()).unwrap().join("src");
    make_tree(&src);
    let b = c.cli_json(&["backup", src.to_str().unwrap(), "--tag", "first"]);
    assert_eq!(b["kind"], "full");
    assert!(b["files_new"].as_u64().unwrap() >= 10);
    let target = c.dir.path().join("restore");
    let r = c.cli_json(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--verify",
    ]);
    assert_eq!(r["files"], r["verified"]);
    let out = restored(&target, &src);
    compare_trees(&src, &out).unwrap();
    // Restoring over an existing tree replaces each file (through a temporary name and an
    // atomic rename) and leaves no temporary file behind.
    std::fs::write(out.join("docs/readme.txt"), b"changed since the backup").unwrap();
    c.cli_json(&["restore", "latest", "--target", target.to_str().unwrap()]);
    compare_trees(&src, &out).unwrap();
    fn temporaries(d: &Path) -> usize {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    temporaries(&e.path())
                } else {
                    usize::from(
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(".cairn-restore-"),
                    )
                }
            })
            .sum()
    }
    assert_eq!(temporaries(&target), 0);
    // The sparse file stays sparse.
    assert!(
        allocated(&out.join("sparse.img")) < 2 << 20,
        "holes restored as holes"
    );
    // Partial restore with an include glob.
    let part = c.dir.path().join("part");
    c.cli_json(&[
        "restore",
        "latest",
        "--target",
        part.to_str().unwrap(),
        "--include",
        "**/docs/nested/**",
    ]);
    let p = restored(&part, &src);
    assert!(p.join("docs/nested/notes.md").exists());
    assert!(!p.join("docs/readme.txt").exists());
    assert!(!p.join("run.sh").exists());
    // ls and snapshots see it.
    let ls = c.cli_json(&["ls", "latest"]);
    assert!(ls
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["path"].as_str().unwrap().ends_with("/docs/readme.txt")));
    let snaps = c.cli_json(&["snapshots", "--tag", "first"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    // Storage nodes never hold plaintext: no node's segments contain a marker from the data.
    let marker = &random_bytes(3, 3 << 20)[1000..1064];
    for i in 0..c.nodes.len() {
        for e in std::fs::read_dir(c.node_dir(i).join("segments")).unwrap() {
            let bytes = std::fs::read(e.unwrap().path()).unwrap();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "plaintext found on node {i}"
            );
            assert!(!bytes
                .windows(24)
                .any(|w| w == b"#!/bin/sh\necho hi\n\0\0\0\0\0\0"
                    || w.starts_with(b"newline in the name")));
        }
    }
}

#[tokio::test]
async fn unchanged_files_are_not_read_and_inserts_upload_few_chunks() {
    let c = TestCluster::start(Spec::default()).await;
    init(&c);
    let src = std::fs::canonicalize(c.dir.path()).unwrap().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..50 {
        std::fs::write(src.join(format!("f{i}")), random_bytes(i, 20_000)).unwrap();
    }
    let big = random_bytes(100, 24 << 20);
    std::fs::write(src.join("big"), &big).unwrap();
    let first = c.cli_json(&["backup", src.to_str().unwrap()]);
    let total_chunks = first["chunks_uploaded"].as_u64().unwrap();
    assert!(total_chunks > 20, "{first}");

    let second = c.cli_json(&["backup", src.to_str().unwrap()]);
    assert_eq!(second["kind"], "incremental");
    assert_eq!(second["files_unmodified"], 51);
    assert_eq!(second["bytes_read"], 0, "no unchanged file is read");
    // Only directory listings of the backed-up path's ancestors may change (other tests touch
    // /tmp's mtime); no file data is uploaded.
    assert!(second["chunks_uploaded"].as_u64().unwrap() <= 2, "{second}");
    assert!(
        second["bytes_uploaded"].as_u64().unwrap() < 4096,
        "{second}"
    );

    // Insert 1 MiB at the start of the large file.
    let mut changed = random_bytes(7, 1 << 20);
    changed.extend_from_slice(&big);
    std::fs::write(src.join("big"), &changed).unwrap();
    let third = c.cli_json(&["backup", src.to_str().unwrap()]);
    assert_eq!(third["files_changed"], 1);
    assert_eq!(third["files_unmodified"], 50);
    let up = third["chunks_uploaded"].as_u64().unwrap();
    // New chunks: the ones around the insert, plus the changed trees.
    assert!(up <= 6, "inserting 1 MiB re-uploaded {up} chunks: {third}");
    let bytes_up = third["bytes_uploaded"].as_u64().unwrap();
    assert!(bytes_up < 6 << 20, "uploaded {bytes_up} bytes");

    // A full backup reads everything but still uploads nothing new.
    let full = c.cli_json(&["backup", "--type", "full", src.to_str().unwrap()]);
    assert_eq!(full["kind"], "full");
    assert_eq!(
        full["bytes_read"].as_u64().unwrap(),
        50 * 20_000 + changed.len() as u64
    );
    assert!(full["chunks_uploaded"].as_u64().unwrap() <= 2, "{full}");
    assert!(full["bytes_uploaded"].as_u64().unwrap() < 4096, "{full}");
    let diff = c.cli_json(&[
        "diff",
        first["snapshot"].as_str().unwrap(),
        third["snapshot"].as_str().unwrap(),
    ]);
    let d = diff.as_array().unwrap();
    assert_eq!(d.len(), 1, "{diff}");
    assert_eq!(d[0]["change"], "M");
}

#[tokio::test]
async fn wrong_password_is_refused() {
    let c = TestCluster::start(Spec {
        nodes: 1,
        replicas: 1,
        coordinators: 1,
        ..Default::default()
    })
    .await;
    init(&c);
    let out = c.cli_env(&["snapshots"], &[("CAIRN_PASSWORD", "not it")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong password"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = c.cli(&["init"]);
    assert_eq!(
        again.status.code(),
        Some(1),
        "a tenant cannot be created twice"
    );
}

#[tokio::test]
async fn unreadable_file_is_a_warning_and_exit_3() {
    let c = TestCluster::start(Spec {
        nodes: 1,
        replicas: 1,
        coordinators: 1,
        ..Default::default()
    })
    .await;
    init(&c);
    let src = std::fs::canonicalize(c.dir.path()).unwrap().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ok"), b"fine").unwrap();
    // A symlink loop cannot be opened as a file: make a directory we cannot read instead, if
    // permissions are enforced (not for root), else a dangling read via a removed file.
    let locked = src.join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::write(locked.join("x"), b"x").unwrap();
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let root = std::fs::read_dir(&locked).is_ok();
    let out = c.cli(&["backup", src.to_str().unwrap()]);
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    if root {
        // Running as root: permissions are not enforced, so the backup is clean.
        assert_eq!(out.status.code(), Some(0));
    } else {
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("locked"));
    }
}

#[tokio::test]
async fn hostile_tree_is_refused_and_nothing_escapes() {
    use cairn_client::{Kind, Node, Tree};
    use cairn_proto::metadata::{BeginSnapshotRequest, CommitSnapshotRequest};
    let c = TestCluster::start(Spec {
        nodes: 1,
        replicas: 1,
        coordinators: 1,
        ..Default::default()
    })
    .await;
    let repo = c.repo().await;
    // A file chunk, and a tree whose entry is named "..".
    let data = b"owned".to_vec();
    let id = repo.keys.chunk_id(&data);
    let node = |name: &[u8], kind| Node {
        name: name.to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        size: 5,
        dev: 0,
        inode: 0,
        nlink: 1,
    };
    let mut evil_dir = Tree {
        nodes: vec![node(
            b"escaped.txt",
            Kind::File {
                content: vec![cairn_client::ChunkRef { id, len: 5 }],
            },
        )],
    };
    let evil_bytes = evil_dir.encode();
    let evil_id = repo.keys.chunk_id(&evil_bytes);
    let mut root = Tree {
        nodes: vec![node(b"..", Kind::Dir { subtree: evil_id })],
    };
    let root_bytes = root.encode();
    let root_id = repo.keys.chunk_id(&root_bytes);
    let blobs = [(id, data), (evil_id, evil_bytes), (root_id, root_bytes)]
        .into_iter()
        .map(|(i, p)| {
            cairn_client::Blob::new(i, bytes::Bytes::from(repo.keys.seal(&i, &p).unwrap()))
        })
        .collect();
    repo.cluster.put(blobs).await.unwrap();
    let coord = c.coord();
    let s = coord
        .call(|mut cl| async move {
            cl.begin_snapshot(BeginSnapshotRequest {
                tenant: "default".into(),
                host: "evil".into(),
                paths: vec!["/x".into()],
                tags: vec![],
                kind: "full".into(),
                parent: String::new(),
            })
            .await
        })
        .await
        .unwrap();
    let sid = s.id.clone();
    coord
        .call(|mut cl| {
            let sid = sid.clone();
            let root = root_id.0.to_vec();
            async move {
                cl.commit_snapshot(CommitSnapshotRequest {
                    id: sid,
                    root,
                    stats: None,
                })
                .await
            }
        })
        .await
        .unwrap();
    let target = c.dir.path().join("inner/target");
    let out = c.cli(&["restore", &s.id, "--target", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hostile"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!c.dir.path().join("inner/escaped.txt").exists());
    assert!(!target.join("../escaped.txt").exists());
}
