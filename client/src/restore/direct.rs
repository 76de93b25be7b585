//! Writing a large restored file past the page cache.
//!
//! A restore writes every byte once, and nothing reads it back soon after. Through the page
//! cache each page costs the kernel an allocation and a copy, then a write-back, and it pushes
//! out whatever the host was caching; on the machines Cairn was measured on that copy was the
//! largest single cost of a restore. Files of at least [`DIRECT_MIN`] bytes are instead staged
//! in block-aligned buffers and written with `O_DIRECT` on a blocking thread while the next
//! buffer fills, so the data goes from the buffer to the device.
//!
//! All-zero blocks are not written, so holes stay holes. `O_DIRECT` needs block-aligned
//! offsets, lengths and memory: the last, partial block is written padded with zeros and the
//! file is then cut to its length, so no padding remains. Where the file system refuses
//! `O_DIRECT`, when it is turned on or at a write, the same writes go through the page cache.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use aligned_vec::{AVec, ConstAlign};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use tokio::task::JoinHandle;

/// Alignment of offsets, lengths and memory (covers 512 and 4096-byte devices); also the size
/// of the zero blocks left as holes.
pub const BLOCK: usize = 4096;
/// Files at least this large are written directly; smaller ones through the page cache.
pub const DIRECT_MIN: u64 = 8 << 20;
/// Size of each staging buffer (a file has two: one filling, one being written).
const STAGE: usize = 4 << 20;

type Stage = AVec<u8, ConstAlign<BLOCK>>;

fn stage() -> Stage {
    Stage::with_capacity(BLOCK, STAGE)
}

/// A new, empty file being written sequentially with `O_DIRECT`.
pub struct DirectFile {
    file: Arc<File>,
    /// Bytes not yet handed to a write; `stage[0]` goes at `pos`.
    stage: Stage,
    /// File offset of the next write; a multiple of [`BLOCK`].
    pos: u64,
    /// The write in flight, which gives its buffer back.
    pending: Option<JoinHandle<io::Result<Stage>>>,
}

impl DirectFile {
    /// Turns on `O_DIRECT` for `file` (new, empty and open for writing), or gives the file back
    /// unchanged if its file system refuses.
    pub fn new(file: File) -> Result<Self, File> {
        let direct = fcntl_getfl(&file).and_then(|fl| fcntl_setfl(&file, fl | OFlags::DIRECT));
        match direct {
            Ok(()) => Ok(Self {
                file: Arc::new(file),
                stage: stage(),
                pos: 0,
                pending: None,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "O_DIRECT not supported; restoring through the page cache");
                Err(file)
            }
        }
    }

    /// Whether writes still bypass the page cache.
    #[cfg(test)]
    pub fn is_direct(&self) -> bool {
        fcntl_getfl(&*self.file).is_ok_and(|fl| fl.contains(OFlags::DIRECT))
    }

    /// Appends `data`; every full buffer is written out while the next one fills.
    pub async fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = (STAGE - self.stage.len()).min(data.len());
            self.stage.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.stage.len() == STAGE {
                let spare = match self.pending.take() {
                    Some(job) => {
                        let mut s = joined(job).await?;
                        s.clear();
                        s
                    }
                    None => stage(),
                };
                let full = std::mem::replace(&mut self.stage, spare);
                let (file, at) = (self.file.clone(), self.pos);
                self.pos += STAGE as u64;
                self.pending = Some(tokio::task::spawn_blocking(move || {
                    write_blocks(&file, at, &full).map(|()| full)
                }));
            }
        }
        Ok(())
    }

    /// Writes the rest (the last block zero-padded), sets the file's length to `size` and gives
    /// the file back.
    pub async fn finish(mut self, size: u64) -> io::Result<File> {
        if let Some(job) = self.pending.take() {
            joined(job).await?;
        }
        let Self {
            file,
            mut stage,
            pos,
            ..
        } = self;
        stage.resize(stage.len().next_multiple_of(BLOCK), 0);
        let job = tokio::task::spawn_blocking(move || {
            write_blocks(&file, pos, &stage)?;
            file.set_len(size)?;
            Ok(file)
        });
        let file = joined(job).await?;
        Arc::into_inner(file).ok_or_else(|| io::Error::other("restored file still shared"))
    }
}

async fn joined<T>(job: JoinHandle<io::Result<T>>) -> io::Result<T> {
    job.await
        .map_err(|e| io::Error::other(format!("write task failed: {e}")))?
}

/// Writes `buf` (whole blocks) at `at`, skipping all-zero blocks.
fn write_blocks(file: &File, at: u64, buf: &[u8]) -> io::Result<()> {
    debug_assert_eq!(buf.len() % BLOCK, 0);
    let mut run: Option<usize> = None;
    for (i, block) in buf.chunks(BLOCK).enumerate() {
        let zero = block.iter().all(|b| *b == 0);
        match (zero, run) {
            (false, None) => run = Some(i * BLOCK),
            (true, Some(start)) => {
                write_at(file, &buf[start..i * BLOCK], at + start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        write_at(file, &buf[start..], at + start as u64)?;
    }
    Ok(())
}

/// One positioned write; if the file system refuses it as a direct write, `O_DIRECT` is turned
/// off for the file and the write is made through the page cache.
fn write_at(file: &File, buf: &[u8], at: u64) -> io::Result<()> {
    match file.write_all_at(buf, at) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let fl = fcntl_getfl(file)?;
            if !fl.contains(OFlags::DIRECT) {
                return Err(e);
            }
            tracing::info!("O_DIRECT write refused; restoring through the page cache");
            fcntl_setfl(file, fl - OFlags::DIRECT)?;
            file.write_all_at(buf, at)
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Whether the file system under `dir` takes `O_DIRECT` at all.
    fn supports_direct(dir: &std::path::Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.join("probe"))
            .is_ok()
    }

    async fn write_in_pieces(path: &std::path::Path, data: &[u8], pieces: &[usize]) -> bool {
        let file = File::create_new(path).unwrap();
        let mut d = match DirectFile::new(file) {
            Ok(d) => d,
            Err(_) => return false,
        };
        let mut rest = data;
        for &n in pieces.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = n.min(rest.len());
            d.write(&rest[..n]).await.unwrap();
            rest = &rest[n..];
        }
        let direct = d.is_direct();
        d.finish(data.len() as u64).await.unwrap();
        direct
    }

    #[tokio::test]
    async fn files_are_written_whole_with_any_length_and_piece_size() {
        let dir = tempfile::tempdir().unwrap();
        let direct_here = supports_direct(dir.path());
        let mut seed = 7u64;
        // Lengths around block and buffer boundaries, written in odd piece sizes.
        for (k, len) in [
            0,
            1,
            BLOCK - 1,
            BLOCK + 1,
            STAGE,
            STAGE + 3,
            2 * STAGE + BLOCK + 5,
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 33) as u8 | 1
                })
                .collect();
            let p = dir.path().join(format!("f{k}"));
            let direct = write_in_pieces(&p, &data, &[1000, 1 << 20, 7, 3 << 20]).await;
            assert_eq!(
                direct, direct_here,
                "O_DIRECT used wherever it is supported"
            );
            assert_eq!(std::fs::read(&p).unwrap(), data, "length {len}");
        }
    }

    #[test]
    fn a_refused_direct_write_is_made_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let direct_here = supports_direct(dir.path());
        let p = dir.path().join("f");
        let file = File::create_new(&p).unwrap();
        if direct_here {
            let fl = fcntl_getfl(&file).unwrap();
            fcntl_setfl(&file, fl | OFlags::DIRECT).unwrap();
        }
        // 17 bytes at offset 3: not block-aligned, which a direct write refuses with EINVAL.
        write_at(&file, b"not block-aligned", 3).unwrap();
        assert!(!fcntl_getfl(&file).unwrap().contains(OFlags::DIRECT));
        assert_eq!(std::fs::read(&p).unwrap(), b"\0\0\0not block-aligned");
    }

    #[test]
    fn a_file_that_refuses_direct_io_is_given_back() {
        // A socket has no direct I/O: setting O_DIRECT on it fails as on such a file system.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(a));
        assert!(DirectFile::new(file).is_err());
    }

    #[tokio::test]
    async fn zero_blocks_become_holes() {
        let dir = tempfile::tempdir().unwrap();
        // 12 MiB: data, then 8 MiB of zeros, then a short tail of data, then zeros to the end.
        let mut data = vec![0u8; 12 << 20];
        data[..BLOCK * 3 + 10].fill(0xAB);
        data[(10 << 20) + 17..(10 << 20) + 100].fill(0xCD);
        let p = dir.path().join("sparse");
        write_in_pieces(&p, &data, &[5 << 20, 123_457]).await;
        assert_eq!(std::fs::read(&p).unwrap(), data);
        let allocated = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(
            allocated < 1 << 20,
            "{allocated} bytes allocated for 12 MiB with 4 blocks of data"
        );
    }
}
