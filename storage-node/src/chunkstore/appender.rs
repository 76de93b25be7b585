//! Appending to the active segment without going through the page cache.
//!
//! Buffered writes of new data cost the kernel a page-cache allocation and a copy per page,
//! and then a write-back at fsync; on the machines Cairn was measured on that was over two
//! CPU-seconds per GB written, more than everything else a storage node does. The appender
//! instead stages records in a block-aligned buffer and writes whole blocks with `O_DIRECT`,
//! so the data goes from that buffer to the device and `fdatasync` only has to flush the
//! device cache and the file size.
//!
//! `O_DIRECT` needs block-aligned offsets, lengths and memory, so the last, partial block of a
//! commit is written padded with zeros and kept in the buffer; the next commit rewrites that
//! block with the same leading bytes plus what follows. Bytes before the logical end are
//! therefore never changed, and the zero padding past it is recognised by the segment scan as
//! a clean end (and cut when the segment is closed). Where the file system refuses `O_DIRECT`
//! (tmpfs, some overlay set-ups) the same aligned writes go through the page cache instead.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aligned_vec::{ABox, ConstAlign};
use tracing::info;

/// Alignment of offsets, lengths and memory for direct writes (covers 512 and 4096-byte devices).
pub const BLOCK: usize = 4096;
/// Size of the staging buffer: data is written in pieces of this size.
const STAGE: usize = 4 * 1024 * 1024;

/// Memory aligned to [`BLOCK`], as `O_DIRECT` needs.
pub(super) type AlignedBuf = ABox<[u8], ConstAlign<BLOCK>>;

/// `len` zeroed bytes of [`AlignedBuf`].
pub(super) fn aligned_buf(len: usize) -> AlignedBuf {
    aligned_vec::avec![[BLOCK]| 0u8; len].into_boxed_slice()
}

/// Size and alignment of a transparent huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 * 1024 * 1024;

/// The staging buffer: [`STAGE`] zeroed bytes of anonymous memory, aligned to [`HUGE_PAGE`]
/// (which [`BLOCK`] divides) and backed by transparent huge pages where the kernel allows them.
/// Every direct write pins the pages it is written from: two huge pages cost the kernel far
/// less to pin than a thousand small ones (in profiles of a first backup, pinning was about 3%
/// of a storage node's CPU).
struct StageBuf {
    map: memmap2::MmapMut,
    /// Where the aligned [`STAGE`] bytes begin in `map`.
    at: usize,
}

impl StageBuf {
    fn new() -> io::Result<Self> {
        // One huge page more than needed, so that an aligned window fits whatever address the
        // mapping gets; the unused rest is never touched, so never backed.
        let map = memmap2::MmapMut::map_anon(STAGE + HUGE_PAGE)?;
        let at = (HUGE_PAGE - map.as_ptr() as usize % HUGE_PAGE) % HUGE_PAGE;
        // Advice before the first touch; a kernel without huge pages leaves small ones.
        let _ = map.advise_range(memmap2::Advice::HugePage, at, STAGE);
        Ok(Self { map, at })
    }
}

impl std::ops::Deref for StageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.at..self.at + STAGE]
    }
}

impl std::ops::DerefMut for StageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map[self.at..self.at + STAGE]
    }
}

/// The writer's handle on the active segment.
pub struct Appender {
    path: PathBuf,
    file: File,
    direct: bool,
    buf: StageBuf,
    /// File offset of `buf[0]`; always a multiple of [`BLOCK`].
    base: u64,
    /// Bytes of `buf` in use: the durable tail of the last block, then staged data.
    len: usize,
}

fn round_up(n: usize) -> usize {
    n.div_ceil(BLOCK) * BLOCK
}

/// Opens `path` for reading past the page cache; `None` where the file system refuses it.
pub(super) fn open_direct_reader(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

fn open_file(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

impl Appender {
    /// Opens `path` for appending at `end` (the logical end of its records).
    pub fn open(path: &Path, end: u64) -> io::Result<Self> {
        let (file, direct) = match open_file(path, true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                info!(path = %path.display(), "O_DIRECT not supported here; using buffered writes");
                (open_file(path, false)?, false)
            }
            Err(e) => return Err(e),
        };
        let base = end / BLOCK as u64 * BLOCK as u64;
        let len = (end - base) as usize;
        let mut buf = StageBuf::new()?;
        if len > 0 {
            File::open(path)?.read_exact_at(&mut buf[..len], base)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            direct,
            buf,
            base,
            len,
        })
    }

    /// The logical end: where the next appended byte goes.
    pub fn end(&self) -> u64 {
        self.base + self.len as u64
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Stages `data`; every full buffer is written out (not yet synced).
    pub fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = (STAGE - self.len).min(data.len());
            let at = self.len;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            if self.len == STAGE {
                self.write_blocks(STAGE)?;
                self.base += STAGE as u64;
                self.len = 0;
            }
        }
        Ok(())
    }

    /// Writes everything staged (the last block zero-padded) and makes it durable.
    pub fn commit(&mut self) -> io::Result<()> {
        if self.len > 0 {
            let padded = round_up(self.len);
            let len = self.len;
            self.buf[len..padded].fill(0);
            self.write_blocks(padded)?;
            let full = len / BLOCK * BLOCK;
            if full > 0 {
                self.buf.copy_within(full..len, 0);
                self.base += full as u64;
                self.len -= full;
            }
        }
        self.file.sync_data()
    }

    /// Commits, cuts the padding past the logical end and syncs: for closing a segment.
    pub fn finish(&mut self) -> io::Result<()> {
        self.commit()?;
        self.file.set_len(self.end())?;
        self.file.sync_all()
    }

    fn write_blocks(&mut self, n: usize) -> io::Result<()> {
        let base = self.base;
        let r = {
            let buf = &self.buf[..n];
            self.file.write_all_at(buf, base)
        };
        match r {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                info!(path = %self.path.display(), "O_DIRECT write refused; using buffered writes");
                self.file = open_file(&self.path, false)?;
                self.direct = false;
                let buf = &self.buf[..n];
                self.file.write_all_at(buf, base)
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap()
    }

    #[test]
    fn the_staging_buffer_is_zeroed_and_aligned_to_a_huge_page() {
        let mut b = StageBuf::new().unwrap();
        assert_eq!(b.len(), STAGE);
        assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[STAGE - 1] = 7;
        assert_eq!(b[STAGE - 1], 7);
    }

    #[test]
    fn appends_across_commits_and_reopen_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seg");
        let mut want = Vec::new();
        let mut a = Appender::open(&p, 0).unwrap();
        // Sizes that straddle blocks and the staging buffer.
        for (i, n) in [1usize, 4095, 4097, 100, STAGE + 17, 3, 2 * STAGE]
            .iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..*n).map(|j| (i * 31 + j * 7) as u8 | 1).collect();
            a.append(&data).unwrap();
            want.extend_from_slice(&data);
            a.commit().unwrap();
            assert_eq!(a.end(), want.len() as u64);
            let got = contents(&p);
            assert_eq!(&got[..want.len()], &want[..]);
            assert!(
                got[want.len()..].iter().all(|&b| b == 0),
                "padding is zeros"
            );
            assert!(got.len() - want.len() < BLOCK);
        }
        drop(a);
        // Reopen mid-block: the tail is read back and rewritten unchanged.
        let mut a = Appender::open(&p, want.len() as u64).unwrap();
        a.append(b"after reopen").unwrap();
        want.extend_from_slice(b"after reopen");
        a.finish().unwrap();
        assert_eq!(contents(&p), want, "finish cuts the padding");
    }
}
