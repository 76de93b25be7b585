//! Generated file trees and their exact comparison (content and metadata).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rand::{Rng, RngCore, SeedableRng};

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Compressible text-like bytes.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "cairn", "backup", "chunk", "raft", "node", "layout", "restore", "tenant", "zone", "\n",
    ];
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(words[r.gen_range(0..words.len())].as_bytes());
        v.push(b' ');
    }
    v.truncate(len);
    v
}

fn set_mtime(p: &Path, secs: i64, nanos: u32) {
    let t = filetime::FileTime::from_unix_time(secs, nanos);
    filetime::set_symlink_file_times(p, t, t).unwrap();
}

/// Writes a tree with every kind of entry the client must keep: regular files small and large,
/// empty and sparse files, odd names (unicode, newline, very long), deep paths, symlinks, hard
/// links, empty directories, unusual modes and mtimes.
pub fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("docs/nested/deeper")).unwrap();
    std::fs::write(root.join("docs/readme.txt"), text_bytes(1, 10_000)).unwrap();
    std::fs::write(root.join("docs/nested/notes.md"), text_bytes(2, 300_000)).unwrap();
    std::fs::write(
        root.join("docs/nested/deeper/data.bin"),
        random_bytes(3, 3 << 20),
    )
    .unwrap();
    std::fs::write(root.join("empty.txt"), b"").unwrap();
    // Sparse: 8 MiB with 64 KiB of data in the middle.
    let mut f = std::fs::File::create(root.join("sparse.img")).unwrap();
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    f.write_all(&random_bytes(4, 64 << 10)).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    std::fs::write(root.join("ünïcödé ✓ 名前.txt"), b"unicode").unwrap();
    std::fs::write(
        root.join(OsStr::from_bytes(b"new\nline")),
        b"newline in the name",
    )
    .unwrap();
    std::fs::write(
        root.join(OsStr::from_bytes(b"latin1-\xe9")),
        b"non-utf8 name",
    )
    .unwrap();
    let mut deep = root.join("long");
    for i in 0..12 {
        deep = deep.join(format!("{}{i}", "d".repeat(200)));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("leaf.txt"), b"far down").unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    // A second identical directory: both share one tree id.
    std::fs::create_dir_all(root.join("another-empty-dir")).unwrap();
    std::os::unix::fs::symlink("docs/readme.txt", root.join("link-to-readme")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    std::fs::hard_link(root.join("docs/readme.txt"), root.join("hardlink.txt")).unwrap();
    std::fs::write(root.join("private.key"), b"secret").unwrap();
    std::fs::set_permissions(
        root.join("private.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    set_mtime(&root.join("docs/readme.txt"), 1_000_000_000, 123_456_789);
    set_mtime(&root.join("link-to-readme"), 1_100_000_000, 5);
    set_mtime(&root.join("empty-dir"), 1_200_000_000, 0);
}

#[derive(Debug, PartialEq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    size: u64,
    mtime: (i64, i64),
    content: Option<[u8; 32]>,
    target: Option<Vec<u8>>,
    link_group: Option<usize>,
}

fn scan(root: &Path) -> BTreeMap<Vec<u8>, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, usize> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let ft = m.file_type();
            let (kind, content, target) = if ft.is_dir() {
                stack.push(p.clone());
                ("dir", None, None)
            } else if ft.is_symlink() {
                (
                    "symlink",
                    None,
                    Some(
                        std::fs::read_link(&p)
                            .unwrap()
                            .as_os_str()
                            .as_bytes()
                            .to_vec(),
                    ),
                )
            } else {
                (
                    "file",
                    Some(*blake3::hash(&std::fs::read(&p).unwrap()).as_bytes()),
                    None,
                )
            };
            let link_group = (ft.is_file() && m.nlink() > 1).then(|| {
                let n = inodes.len();
                *inodes.entry(m.ino()).or_insert(n)
            });
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: if ft.is_symlink() {
                        0
                    } else {
                        m.mode() & 0o7777
                    },
                    size: if ft.is_file() { m.len() } else { 0 },
                    // Directory mtimes are set after their children; symlink mtimes too.
                    mtime: (m.mtime(), m.mtime_nsec()),
                    content,
                    target,
                    link_group,
                },
            );
        }
    }
    out
}

/// Compares two trees entry by entry; returns the first difference.
pub fn compare_trees(a: &Path, b: &Path) -> Result<(), String> {
    let (ea, eb) = (scan(a), scan(b));
    for (k, va) in &ea {
        let name = String::from_utf8_lossy(k);
        match eb.get(k) {
            None => return Err(format!("{name}: missing from {}", b.display())),
            Some(vb) if vb != va => return Err(format!("{name}: {va:?} != {vb:?}")),
            _ => {}
        }
    }
    if let Some(k) = eb.keys().find(|k| !ea.contains_key(*k)) {
        return Err(format!(
            "{}: extra in {}",
            String::from_utf8_lossy(k),
            b.display()
        ));
    }
    Ok(())
}

/// Allocated bytes of a file (to check that holes stayed holes).
pub fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Flips one byte in the middle of the blob of up to `max` records (of more than 64 bytes) in
/// the segment files under `segments`; returns how many records it corrupted.
pub fn corrupt_records(segments: &Path, max: u64) -> u64 {
    let mut left = max;
    let (flipped, _) = corrupt_where(segments, |_| {
        let take = left > 0;
        left = left.saturating_sub(1);
        take
    });
    flipped.len() as u64
}

/// Flips one byte in the middle of the blob of each record that `pick` chooses, among those of
/// more than 64 bytes, in the segment files under `segments`. The last 4 KiB block of a file is
/// left alone: a running node holds it (partial, zero-padded on disk) in its write buffer and
/// rewrites it at its next group commit, which would undo a flip there. Returns the ids of the
/// records flipped and of every record left as it was.
pub fn corrupt_where(
    segments: &Path,
    mut pick: impl FnMut(&cairn_storage_node::chunkstore::segment::Header) -> bool,
) -> (Vec<cairn_proto::ChunkId>, Vec<cairn_proto::ChunkId>) {
    use cairn_storage_node::chunkstore::segment::{decode_header, Format};
    use std::os::unix::fs::FileExt;
    let (mut flipped, mut kept) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(segments).unwrap() {
        let e = e.unwrap();
        let (_, format) = Format::parse_file_name(&e.file_name().to_string_lossy())
            .expect("only segment files in segments/");
        let header_len = format.header_len() as u64;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(e.path())
            .unwrap();
        let len = f.metadata().unwrap().len();
        let stable = len.saturating_sub(1) & !4095;
        let mut off = 0u64;
        let mut h = vec![0u8; header_len as usize];
        while off + header_len <= len {
            f.read_exact_at(&mut h, off).unwrap();
            let Some(header) = decode_header(format, &h) else {
                // Only the zero padding of the last block may follow the last record.
                assert!(off >= stable, "a record header at {off} in {:?}", e.path());
                break;
            };
            let blob = u64::from(header.len);
            let at = off + header_len + blob / 2;
            if blob > 64 && at < stable && pick(&header) {
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, at).unwrap();
                f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
                flipped.push(header.id);
            } else {
                kept.push(header.id);
            }
            off += header_len + blob;
        }
    }
    (flipped, kept)
}
