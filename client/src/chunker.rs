//! Content-defined chunking of a byte stream with FastCDC (v2020), through a bounded window.
//!
//! The window (at least 8 MiB and 2× the maximum chunk) is filled from the reader; every chunk
//! FastCDC finds in it is emitted except the last one, which may have been cut short by the end
//! of the window: those bytes are copied to the front of the next window and chunked again with
//! more data behind them. A cut depends only on the `max` bytes after a chunk's start, so the
//! boundaries are the same as over the whole stream. Chunks are handed over as [`Bytes`] that
//! share the window they were read into, so a chunk is never copied out of it. A window is kept
//! in a small pool ([`Windows`]) and read into again once every chunk cut from it is dropped:
//! windows freshly taken from the allocator cost a page fault per 4 KiB, as the heap gives
//! freed ones back to the kernel. Small files are read once, into a buffer of their own size.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::Mutex;

use bytes::Bytes;

use crate::backup::ChunkerOptions;

/// Full windows kept for reuse: at most this many, the most recently filled.
const POOLED: usize = 4;

/// Windows that chunks were cut from, to read into again once their chunks are all dropped.
/// One pool serves every reader of a backup; it is freed with it.
#[derive(Default)]
pub struct Windows(Mutex<VecDeque<Bytes>>);

impl Windows {
    /// An empty buffer with room for at least `cap` bytes: a pooled window whose chunks are
    /// all dropped, or a new one.
    fn take(&self, cap: usize) -> Vec<u8> {
        let free = {
            let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
            pool.iter()
                .position(Bytes::is_unique)
                .and_then(|i| pool.remove(i))
        };
        let mut buf = match free {
            Some(mut w) => {
                // Without its bytes, the only handle gives its buffer back with no copy.
                w.truncate(0);
                Vec::from(w)
            }
            None => Vec::new(),
        };
        buf.reserve(cap);
        buf
    }

    /// Keeps `window` (its chunks may still be in use) for [`Windows::take`].
    fn give(&self, window: Bytes) {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() == POOLED {
            pool.pop_front();
        }
        pool.push_back(window);
    }
}

/// Cuts `reader` into chunks, calling `emit` with each as a slice of the window it was read
/// into (taken from `windows`); stops early if `emit` returns false. Returns the number of
/// bytes chunked.
///
/// A stream of at most `c.min` bytes is one chunk (FastCDC never cuts below the minimum): it is
/// read into a buffer of its own size and handed over whole.
pub fn chunk_shared<R: Read>(
    mut reader: R,
    size_hint: u64,
    c: ChunkerOptions,
    windows: &Windows,
    mut emit: impl FnMut(Bytes) -> bool,
) -> io::Result<u64> {
    let window = (c.max as usize * 2).max(8 << 20);
    let min = u64::from(c.min);
    let mut buf = if size_hint as usize >= window {
        windows.take(window + 1)
    } else {
        Vec::with_capacity(size_hint as usize + 1)
    };
    (&mut reader).take(min + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 <= min {
        let n = buf.len() as u64;
        if n > 0 {
            emit(Bytes::from(buf));
        }
        return Ok(n);
    }
    let mut read = buf.len() as u64;
    let mut total = 0u64;
    loop {
        let want = window - buf.len();
        let n = (&mut reader).take(want as u64).read_to_end(&mut buf)?;
        read += n as u64;
        let eof = n < want;
        let cuts: Vec<(usize, usize)> = fastcdc::v2020::FastCDC::new(&buf, c.min, c.avg, c.max)
            .map(|ch| (ch.offset, ch.length))
            .collect();
        // Unless the stream ended, the last chunk may have been cut short by the window. A full
        // window holds at least two chunks, as no chunk is longer than half of it.
        let take = if eof { cuts.len() } else { cuts.len() - 1 };
        let full = buf.capacity() > window;
        let filled = Bytes::from(std::mem::take(&mut buf));
        let mut consumed = 0;
        for &(off, len) in &cuts[..take] {
            if !emit(filled.slice(off..off + len)) {
                return Ok(total);
            }
            consumed = off + len;
            total += len as u64;
        }
        if eof {
            if full {
                windows.give(filled);
            }
            return Ok(total);
        }
        let ahead = size_hint.saturating_sub(read) as usize;
        let rest = filled.len() - consumed;
        buf = if rest.saturating_add(ahead) >= window {
            windows.take(window + 1)
        } else {
            Vec::with_capacity(rest + ahead + 1)
        };
        buf.extend_from_slice(&filled[consumed..]);
        if full {
            windows.give(filled);
        }
    }
}

/// As [`chunk_shared`], with each chunk lent as a slice, and windows of its own.
pub fn chunk_stream<R: Read>(
    reader: R,
    size_hint: u64,
    c: ChunkerOptions,
    mut emit: impl FnMut(&[u8]) -> bool,
) -> io::Result<u64> {
    chunk_shared(reader, size_hint, c, &Windows::default(), |b| emit(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ChunkerOptions {
        ChunkerOptions {
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
        }
    }

    fn data(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn cuts_streamed(d: &[u8]) -> Vec<usize> {
        let mut v = Vec::new();
        // A reader that returns small pieces, to exercise refills.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = b.len().min(self.0.len()).min(100_003);
                b[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let n = chunk_stream(Trickle(d), 0, opts(), |c| {
            v.push(c.len());
            true
        })
        .unwrap();
        assert_eq!(n as usize, d.len());
        v
    }

    #[test]
    fn boundaries_match_chunking_the_whole_buffer() {
        let d = data(40 << 20);
        let whole: Vec<usize> = fastcdc::v2020::FastCDC::new(&d, 16 * 1024, 64 * 1024, 256 * 1024)
            .map(|c| c.length)
            .collect();
        assert_eq!(cuts_streamed(&d), whole);
    }

    #[test]
    fn shared_chunks_are_the_whole_buffer_cuts_whatever_the_size_hint() {
        let min = opts().min as usize;
        let windows = Windows::default();
        let mut held = Vec::new();
        for len in [0, 1, min - 1, min, min + 1, 3 * min, 5 << 20, 20 << 20] {
            let d = data(len);
            let whole: Vec<&[u8]> =
                fastcdc::v2020::FastCDC::new(&d, 16 * 1024, 64 * 1024, 256 * 1024)
                    .map(|c| &d[c.offset..c.offset + c.length])
                    .collect();
            // The hint sizes buffers only: a wrong one changes no cut. The windows are reused
            // across streams, some of them while chunks cut from them are still held.
            for (i, hint) in [0, len as u64, len as u64 / 2, 2 * len as u64 + 7]
                .into_iter()
                .enumerate()
            {
                let mut got = Vec::new();
                let n = chunk_shared(&d[..], hint, opts(), &windows, |c| {
                    got.push(c);
                    true
                })
                .unwrap();
                assert_eq!(n as usize, len);
                let got_slices: Vec<&[u8]> = got.iter().map(|b| &b[..]).collect();
                assert_eq!(got_slices, whole, "length {len}, hint {hint}");
                if i == 0 {
                    held.extend(got);
                }
            }
        }
        // Chunks held while their windows were pooled and others were read are intact.
        let mut at = 0;
        for len in [0, 1, min - 1, min, min + 1, 3 * min, 5 << 20, 20 << 20] {
            let d = data(len);
            let mut joined = Vec::new();
            while joined.len() < len {
                joined.extend_from_slice(&held[at]);
                at += 1;
            }
            assert!(joined == d, "held chunks of length {len} changed");
        }
        assert_eq!(at, held.len());
    }

    #[test]
    fn small_and_empty_inputs() {
        assert!(cuts_streamed(&[]).is_empty());
        assert_eq!(cuts_streamed(&data(1000)), vec![1000]);
    }
}
