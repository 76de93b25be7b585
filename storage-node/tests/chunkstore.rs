//! Conformance suite for the chunk store: every property a backend must keep.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use cairn_proto::ChunkId;
use cairn_storage_node::chunkstore::segment::{self, Format};
use cairn_storage_node::chunkstore::{ChunkStore, PutItem, StoreError};

fn item(n: u32, size: usize) -> PutItem {
    let blob: Vec<u8> = (0..size)
        .map(|i| (i as u32).wrapping_mul(n + 7) as u8)
        .collect();
    let mut id = *blake3::hash(&n.to_le_bytes()).as_bytes();
    id[31] = 0;
    PutItem {
        id: ChunkId(id),
        hash: cairn_proto::blob_hash(&blob),
        blob: blob.into(),
    }
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// XORs the byte at `pos` of the file at `path` with `mask`, durably (reads past the page cache
/// must see it too).
fn flip_bits(path: &Path, pos: u64, mask: u8) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.seek(SeekFrom::Start(pos)).unwrap();
    let mut b = [0u8; 1];
    std::io::Read::read_exact(&mut f, &mut b).unwrap();
    f.seek(SeekFrom::Start(pos)).unwrap();
    f.write_all(&[b[0] ^ mask]).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test]
async fn put_get_has_delete_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<_> = (0..50).map(|n| item(n, 1000 + n as usize * 37)).collect();
    {
        let s = ChunkStore::open(dir.path()).unwrap();
        let existed = s.put(items.clone()).await.unwrap();
        assert!(existed.iter().all(|e| !e));
        // A second put of the same ids stores nothing new.
        let again = s.put(items[..5].to_vec()).await.unwrap();
        assert!(again.iter().all(|e| *e));
        for it in &items {
            let (blob, hash) = s.get(it.id).await.unwrap();
            assert_eq!(blob, it.blob.as_ref());
            assert_eq!(hash, it.hash);
        }
        let ids: Vec<_> = items.iter().map(|i| i.id).collect();
        assert!(s.has(&ids).unwrap().iter().all(|p| *p));
        assert_eq!(s.delete(ids[..10].to_vec()).await.unwrap(), 10);
        assert!(matches!(s.get(ids[0]).await, Err(StoreError::NotFound(_))));
        assert_eq!(s.stats().chunks, 40);
        s.close().await;
    }
    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.stats().chunks, 40);
    for it in &items[10..] {
        assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
    }
    assert!(!s.has(&[items[0].id]).unwrap()[0]);
    s.close().await;
}

#[tokio::test]
async fn presence_filter_never_hides_a_stored_chunk_as_it_grows() {
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<_> = (0..400).map(|n| item(n, 64)).collect();
    let absent: Vec<_> = (1000..1400).map(|n| item(n, 64).id).collect();
    let ids: Vec<_> = items.iter().map(|i| i.id).collect();
    let check = |s: &ChunkStore, upto: usize| {
        assert!(s.has(&ids[..upto]).unwrap().iter().all(|p| *p));
        assert!(s.has(&ids[upto..]).unwrap().iter().all(|p| !p));
        assert!(s.has(&absent).unwrap().iter().all(|p| !p));
    };
    {
        // Sized for 16 ids: it is rebuilt several times while 400 are stored.
        let s = ChunkStore::open_with(dir.path(), 16).unwrap();
        for (k, batch) in items.chunks(10).enumerate() {
            assert!(s.put(batch.to_vec()).await.unwrap().iter().all(|e| !e));
            check(&s, (k + 1) * 10);
        }
        // Stored chunks are found as present by the dedup check of a put, too.
        assert!(s.put(items.clone()).await.unwrap().iter().all(|e| *e));
        assert_eq!(s.stats().chunks, 400);
        s.close().await;
    }
    // Rebuilt from the index on open.
    let s = ChunkStore::open_with(dir.path(), 16).unwrap();
    check(&s, 400);
    assert!(s
        .put(items[..50].to_vec())
        .await
        .unwrap()
        .iter()
        .all(|e| *e));
    s.close().await;
}

#[tokio::test]
async fn concurrent_writers_share_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    let mut tasks = Vec::new();
    for w in 0..16u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..20u32 {
                s.put(vec![item(w * 1000 + n, 4096)]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.stats().chunks, 320);
    s.close().await;
}

#[tokio::test]
async fn torn_tail_is_cut_and_acknowledged_data_kept() {
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<_> = (0..10).map(|n| item(n, 5000)).collect();
    {
        let s = ChunkStore::open(dir.path()).unwrap();
        s.put(items.clone()).await.unwrap();
        s.close().await;
    }
    // Simulate a crash mid-append: half a record after the last acknowledged one.
    let seg = segment_files(dir.path()).pop().unwrap();
    let good_len = std::fs::metadata(&seg).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(b"CRN1\x10\x00\x00\x00partial-garbage").unwrap();
    drop(f);
    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        good_len,
        "torn tail cut"
    );
    for it in &items {
        assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
    }
    // Writing continues after the cut.
    s.put(vec![item(99, 100)]).await.unwrap();
    assert_eq!(
        s.get(item(99, 100).id).await.unwrap().0,
        item(99, 100).blob.as_ref()
    );
    s.close().await;
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[tokio::test]
async fn crash_image_keeps_data_and_padding_is_a_clean_end() {
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<_> = (0..7).map(|n| item(n, 3001 + n as usize)).collect();
    let header = Format::CURRENT.header_len() as u64;
    let records: u64 = items.iter().map(|i| header + i.blob.len() as u64).sum();
    let crashed = tempfile::tempdir().unwrap();
    {
        let s = ChunkStore::open(dir.path()).unwrap();
        s.put(items[..3].to_vec()).await.unwrap();
        s.put(items[3..].to_vec()).await.unwrap();
        // A copy taken now is what a crash would leave: the active segment still has the
        // zero padding of its last block.
        copy_tree(dir.path(), crashed.path());
        s.close().await;
    }
    let dir = crashed;
    let seg = segment_files(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    assert!(
        len > records && len.is_multiple_of(4096),
        "padded to a block: {len}"
    );
    let s = ChunkStore::open(dir.path()).unwrap();
    for it in &items {
        assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
    }
    s.put(vec![item(50, 9000)]).await.unwrap();
    s.close().await;
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        records + header + 9000,
        "close cuts the padding"
    );
    drop(s);
    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.stats().chunks, 8);
    assert_eq!(
        s.get(item(50, 9000).id).await.unwrap().0,
        item(50, 9000).blob.as_ref()
    );
    s.close().await;
}

/// The index is flushed in the background, so a crash can leave an index that predates
/// acknowledged puts: those chunks are in the fsynced segment and must be found on open.
#[tokio::test]
async fn acknowledged_chunks_missing_from_a_stale_index_are_found_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let early: Vec<_> = (0..5).map(|n| item(n, 2000 + n as usize)).collect();
    let late: Vec<_> = (5..40).map(|n| item(n, 5000 + n as usize)).collect();
    let crashed = tempfile::tempdir().unwrap();
    {
        let s = ChunkStore::open(dir.path()).unwrap();
        s.put(early.clone()).await.unwrap();
        s.flush().await.unwrap();
        // The index as a crash right now would leave it: it knows only `early`.
        copy_tree(&dir.path().join("index"), &crashed.path().join("index"));
        s.put(late[..20].to_vec()).await.unwrap();
        s.put(late[20..].to_vec()).await.unwrap();
        copy_tree(
            &dir.path().join("segments"),
            &crashed.path().join("segments"),
        );
        s.close().await;
    }
    let s = ChunkStore::open(crashed.path()).unwrap();
    for it in early.iter().chain(&late) {
        assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
    }
    assert_eq!(s.stats().chunks, 40);
    s.close().await;
}

#[tokio::test]
async fn flipped_bit_is_a_corruption_error_never_bad_data() {
    let dir = tempfile::tempdir().unwrap();
    let it = item(1, 10_000);
    let other = item(2, 10_000);
    let s = ChunkStore::open(dir.path()).unwrap();
    s.put(vec![it.clone(), other.clone()]).await.unwrap();
    let loc = s.location(&it.id).unwrap().unwrap();
    let seg = segment_files(dir.path()).pop().unwrap();
    flip_bits(
        &seg,
        loc.offset + Format::CURRENT.header_len() as u64 + 1234,
        0x10,
    );
    assert!(matches!(s.get(it.id).await, Err(StoreError::Corrupt(_))));
    assert_eq!(s.stats().corrupt_found, 1);
    // Quarantined: no longer claimed as present, so it can be re-stored.
    assert!(!s.has(&[it.id]).unwrap()[0]);
    assert_eq!(s.get(other.id).await.unwrap().0, other.blob.as_ref());
    s.put(vec![it.clone()]).await.unwrap();
    assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
    s.close().await;
}

/// Every read checks the record against the id asked for: an index entry is only a pointer.
#[tokio::test]
async fn index_entries_are_checked_against_the_record_they_point_at() {
    let dir = tempfile::tempdir().unwrap();
    let a = item(1, 5_000);
    let b = item(2, 5_000);
    let s = ChunkStore::open(dir.path()).unwrap();
    s.put(vec![a.clone(), b.clone()]).await.unwrap();
    let loc = s.location(&a.id).unwrap().unwrap();
    let entry = |hash: Option<&[u8; 32]>| {
        let mut v = Vec::new();
        v.extend_from_slice(&loc.segment.to_be_bytes());
        v.extend_from_slice(&loc.offset.to_be_bytes());
        v.extend_from_slice(&loc.len.to_be_bytes());
        if let Some(h) = hash {
            v.extend_from_slice(h);
        }
        v
    };
    let index = s.open_tree("index").unwrap();
    // An entry as earlier versions wrote it (ending with the blob's hash) still reads.
    index.insert(a.id.0, entry(Some(&a.hash))).unwrap();
    assert_eq!(s.get(a.id).await.unwrap().0, a.blob.as_ref());
    // b's entry pointing at a's record, of the same length: refused, never a's bytes.
    index.insert(b.id.0, entry(None)).unwrap();
    assert!(matches!(s.get(b.id).await, Err(StoreError::Corrupt(_))));
    assert_eq!(s.get(a.id).await.unwrap().0, a.blob.as_ref());
    s.close().await;
}

#[tokio::test]
async fn index_rebuilds_from_segments() {
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<_> = (0..20).map(|n| item(n, 3000)).collect();
    {
        let s = ChunkStore::open(dir.path()).unwrap();
        s.put(items.clone()).await.unwrap();
        s.close().await;
    }
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.stats().chunks, 20);
    for it in &items {
        assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
    }
    s.close().await;
}

#[tokio::test]
async fn compaction_reclaims_deleted_space_and_keeps_live_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    // Fill past one segment (256 MiB) with 4 MiB blobs so that segment 0 closes.
    let big: Vec<_> = (0..70).map(|n| item(n, 4 << 20)).collect();
    for chunk in big.chunks(8) {
        s.put(chunk.to_vec()).await.unwrap();
    }
    // Putting chunks it holds again changes no count.
    s.put(big[..4].to_vec()).await.unwrap();
    assert_eq!(s.stats().chunks as usize, big.len());
    assert!(segment_files(dir.path()).len() >= 2);
    let first_seg: Vec<_> = big
        .iter()
        .filter(|i| s.location(&i.id).unwrap().unwrap().segment == 0)
        .map(|i| i.id)
        .collect();
    let (dead, keep) = first_seg.split_at(first_seg.len() - 3);
    s.delete(dead.to_vec()).await.unwrap();
    assert_eq!(s.stats().chunks as usize, big.len() - dead.len());
    let st = s.compact(0.5).await.unwrap();
    assert_eq!(st.segments_removed, 1);
    // Chunks moved by compaction are still counted once.
    assert_eq!(s.stats().chunks as usize, big.len() - dead.len());
    assert!(st.bytes_reclaimed > 200 << 20, "{st:?}");
    for id in keep {
        assert_ne!(s.location(id).unwrap().unwrap().segment, 0);
    }
    for it in big.iter().filter(|i| !dead.contains(&i.id)) {
        assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
    }
    s.close().await;
    drop(s);
    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.stats().chunks as usize, big.len() - dead.len());
    s.close().await;
}

/// A data directory written in earlier segment formats (one segment of each): its segments are
/// read (the index rebuilt from them), new chunks go to a new segment of the current format, and
/// compaction moves the old records into it.
#[tokio::test]
async fn segments_of_earlier_formats_are_read_extended_and_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let old: Vec<_> = (0..10).map(|n| item(n, 4000 + n as usize)).collect();
    std::fs::create_dir_all(dir.path().join("segments")).unwrap();
    let mut old_segs = Vec::new();
    for (n, (format, items)) in [(Format::V1, &old[..5]), (Format::V2, &old[5..])]
        .into_iter()
        .enumerate()
    {
        let mut seg = Vec::new();
        for it in items {
            let h = segment::encode_header(format, &it.id, &it.hash, it.blob.len() as u32);
            seg.extend_from_slice(&h);
            seg.extend_from_slice(&it.blob);
        }
        let path = dir.path().join("segments").join(format.file_name(n as u32));
        std::fs::write(&path, &seg).unwrap();
        old_segs.push((path, seg));
    }
    let record = |f: Format, it: &PutItem| f.record_len(it.blob.len() as u32);
    let old_bytes: u64 = old[..5].iter().map(|i| record(Format::V1, i)).sum::<u64>()
        + old[5..].iter().map(|i| record(Format::V2, i)).sum::<u64>();

    let new: Vec<_> = (10..15).map(|n| item(n, 3000)).collect();
    {
        let s = ChunkStore::open(dir.path()).unwrap();
        assert_eq!(s.stats().chunks, 10);
        assert_eq!(s.stats().bytes, old_bytes);
        for it in &old {
            assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
        }
        s.put(new.clone()).await.unwrap();
        let new_bytes: u64 = new.iter().map(|i| record(Format::CURRENT, i)).sum();
        assert_eq!(s.stats().bytes, old_bytes + new_bytes);
        s.close().await;
    }
    assert_eq!(Format::CURRENT, Format::V3);
    let current_seg = dir.path().join("segments").join(Format::V3.file_name(2));
    assert_eq!(
        segment_files(dir.path()),
        vec![
            old_segs[0].0.clone(),
            old_segs[1].0.clone(),
            current_seg.clone()
        ],
        "the old segments are left as they were, and new chunks go to a new one"
    );
    for (path, bytes) in &old_segs {
        assert_eq!(&std::fs::read(path).unwrap(), bytes);
    }

    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.stats().chunks, 15);
    let (dead, kept) = old.split_at(8);
    s.delete(dead.iter().map(|i| i.id).collect()).await.unwrap();
    let st = s.compact(0.5).await.unwrap();
    assert_eq!(st.segments_removed, 2);
    assert!(old_segs.iter().all(|(p, _)| !p.exists()));
    let live: u64 = kept
        .iter()
        .chain(&new)
        .map(|i| record(Format::CURRENT, i))
        .sum();
    assert_eq!(
        s.stats().bytes,
        live,
        "moved records are counted in their new format"
    );
    for it in kept.iter().chain(&new) {
        assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
        assert_eq!(s.location(&it.id).unwrap().unwrap().segment, 2);
    }
    s.close().await;
    drop(s);
    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.stats().chunks, 7);
    assert_eq!(s.stats().bytes, live);
    for it in dead {
        assert!(matches!(s.get(it.id).await, Err(StoreError::NotFound(_))));
    }
    s.close().await;
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.filter(|e| e.is_ok()).count())
}

#[tokio::test]
async fn an_idle_writer_seals_the_index_into_tables_and_drops_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let tables = dir.path().join("index/partitions/index/segments");
    let journals = dir.path().join("index/journals");
    let items: Vec<_> = (0..300).map(|n| item(n, 200 + n as usize)).collect();
    {
        let s = ChunkStore::open(dir.path()).unwrap();
        s.put(items[..150].to_vec()).await.unwrap();
        s.put(items[150..].to_vec()).await.unwrap();
        assert_eq!(files_in(&tables), 0, "nothing sealed while writes come in");
        // Sealed after the writer has been idle a few seconds; then fjall flushes the tables
        // and deletes every journal but the active one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !(files_in(&tables) >= 1 && files_in(&journals) == 1) {
            assert!(
                std::time::Instant::now() < deadline,
                "index not sealed: {} tables, {} journals",
                files_in(&tables),
                files_in(&journals)
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        for it in &items {
            assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
        }
        // Writes after the seal go to the new journal and are found with the sealed ones.
        s.delete(vec![items[0].id]).await.unwrap();
        s.close().await;
    }
    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.stats().chunks, 299);
    assert!(matches!(
        s.get(items[0].id).await,
        Err(StoreError::NotFound(_))
    ));
    for it in &items[1..] {
        assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
    }
    s.close().await;
}

/// Records of 128 KiB and more are read with `O_DIRECT` (where the file system allows it): at
/// offsets inside a block, up to the unaligned end of a closed segment, and still verified.
#[tokio::test]
async fn large_records_read_past_the_page_cache_round_trip_and_fail_on_corruption() {
    let dir = tempfile::tempdir().unwrap();
    // Small and large records alternate, so large ones start and end inside blocks; the last
    // record written is a large one, so the segment ends inside a block once closed.
    let sizes = [
        1_000,
        131_072,
        3,
        200_001,
        4_097,
        (1 << 20) + 3,
        77,
        262_147,
    ];
    let items: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(n, &size)| item(100 + n as u32, size))
        .collect();
    {
        let s = ChunkStore::open(dir.path()).unwrap();
        s.put(items[..3].to_vec()).await.unwrap();
        s.put(items[3..].to_vec()).await.unwrap();
        for it in &items {
            let (blob, hash) = s.get(it.id).await.unwrap();
            assert_eq!(blob, it.blob.as_ref());
            assert_eq!(hash, it.hash);
        }
        s.close().await;
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let size = std::fs::metadata(&seg).unwrap().len();
    assert_ne!(size % 4096, 0, "the closed segment ends inside a block");
    let s = ChunkStore::open(dir.path()).unwrap();
    for it in &items {
        assert_eq!(s.get(it.id).await.unwrap().0, it.blob.as_ref());
    }
    // A flipped bit in a large record's blob is found, as in a small one.
    let big = &items[5];
    let loc = s.location(&big.id).unwrap().unwrap();
    flip_bits(
        &seg,
        loc.offset + Format::CURRENT.header_len() as u64 + 700_000,
        0x01,
    );
    assert!(matches!(s.get(big.id).await, Err(StoreError::Corrupt(_))));
    assert_eq!(s.get(items[7].id).await.unwrap().0, items[7].blob.as_ref());
    s.close().await;
}
