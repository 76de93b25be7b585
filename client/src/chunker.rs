//! Content-defined chunking of a byte stream with FastCDC (v2020), through a bounded window.
//!
//! The window (at least 8 MiB and 2× the maximum chunk) is filled from the reader; every chunk
//! FastCDC finds in it is emitted except the last one, which may have been cut short by the end
//! of the window: those bytes move to the front and are chunked again with more data behind
//! them. A cut depends only on the `max` bytes after a chunk's start, so the boundaries are the
//! same as over the whole stream. Small files are read once, into a buffer of their own size.

use std::io::{self, Read};

use crate::backup::ChunkerOptions;

/// Cuts `reader` into chunks, calling `emit` with each; stops early if `emit` returns false.
/// Returns the number of bytes chunked.
pub fn chunk_stream<R: Read>(
    mut reader: R,
    size_hint: u64,
    c: ChunkerOptions,
    mut emit: impl FnMut(&[u8]) -> bool,
) -> io::Result<u64> {
    let window = (c.max as usize * 2).max(8 << 20);
    let mut buf: Vec<u8> = Vec::with_capacity((size_hint as usize).min(window) + 1);
    let mut eof = false;
    let mut total = 0u64;
    loop {
        if !eof {
            let want = window - buf.len();
            let n = (&mut reader).take(want as u64).read_to_end(&mut buf)?;
            eof = n < want;
        }
        if buf.is_empty() {
            return Ok(total);
        }
        let cuts: Vec<(usize, usize)> = fastcdc::v2020::FastCDC::new(&buf, c.min, c.avg, c.max)
            .map(|ch| (ch.offset, ch.length))
            .collect();
        let mut consumed = 0;
        for (i, &(off, len)) in cuts.iter().enumerate() {
            if i + 1 == cuts.len() && !eof {
                break; // possibly cut short by the window: chunk it again with more data
            }
            if !emit(&buf[off..off + len]) {
                return Ok(total);
            }
            consumed = off + len;
            total += len as u64;
        }
        buf.drain(..consumed);
        if eof && buf.is_empty() {
            return Ok(total);
        }
    }
}

/// As [`chunk_stream`], with each chunk handed over as a buffer of its own. A stream of at most
/// `c.min` bytes is one chunk (FastCDC never cuts below the minimum), so it is read into its own
/// buffer and handed over without a copy; only longer streams pay a copy per chunk.
pub fn chunk_owned<R: Read>(
    mut reader: R,
    size_hint: u64,
    c: ChunkerOptions,
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> io::Result<u64> {
    let min = u64::from(c.min);
    let mut head = Vec::with_capacity(size_hint.min(min) as usize + 1);
    (&mut reader).take(min + 1).read_to_end(&mut head)?;
    if head.len() as u64 <= min {
        let n = head.len() as u64;
        if n > 0 {
            emit(head);
        }
        return Ok(n);
    }
    chunk_stream(io::Cursor::new(head).chain(reader), size_hint, c, |d| {
        emit(d.to_vec())
    })
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
    fn owned_chunks_equal_streamed_chunks() {
        let min = opts().min as usize;
        for len in [0, 1, min - 1, min, min + 1, 3 * min, 5 << 20] {
            let d = data(len);
            let mut streamed = Vec::new();
            chunk_stream(&d[..], len as u64, opts(), |c| {
                streamed.push(c.to_vec());
                true
            })
            .unwrap();
            let mut owned = Vec::new();
            let n = chunk_owned(&d[..], len as u64, opts(), |c| {
                owned.push(c);
                true
            })
            .unwrap();
            assert_eq!(n as usize, len);
            assert_eq!(owned, streamed, "length {len}");
        }
    }

    #[test]
    fn small_and_empty_inputs() {
        assert!(cuts_streamed(&[]).is_empty());
        assert_eq!(cuts_streamed(&data(1000)), vec![1000]);
    }
}
