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
//! The cut points are the `fastcdc` crate's, found nearly three times as fast ([`Cutter`]).

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

/// FastCDC 2020 with normalization level 1 and the `fastcdc` crate's gear table and masks: the
/// crate's cut points, found nearly three times as fast (it scans every byte of every large
/// file, and at the crate's 1.25 GiB/s it was an eighth of a backup client's CPU).
///
/// The crate rolls a gear hash, `h = 2h + gear[byte]`, from the minimum chunk size on (two
/// bytes per step, testing its doubled hash at even positions against its doubled mask, which
/// no mask's top bit tells apart), and cuts before the first byte whose hash matches the mask
/// of its stretch. Shifted 64 times, a byte leaves the hash, so the hash at a byte depends on
/// that byte and the 63 before it (and none before the scan began): any position's hash can be
/// had by rolling from 63 bytes earlier. That is what makes the scan fast here: [`SEGMENT`]
/// bytes long stretches are scanned [`LANES`] at a time in independent chains the processor
/// runs side by side, each rolled in from 63 bytes before its start; the first match in
/// stream order wins.
struct Cutter {
    gear: Box<[u64; 256]>,
    /// Tested before the average size (harder to match) and after it (easier).
    mask_s: u64,
    mask_l: u64,
    min: usize,
    avg: usize,
    max: usize,
}

/// Independent hash chains scanned side by side.
const LANES: usize = 4;
/// Bytes each chain scans per step of [`Cutter::first_match`]; past a cut, at most
/// `LANES * SEGMENT` bytes are scanned for nothing.
const SEGMENT: usize = 8192;
/// Bytes that make up a gear hash: a byte shifted this many times is out of it.
const HASH_SPAN: usize = 64;

impl Cutter {
    fn new(c: ChunkerOptions) -> Self {
        use fastcdc::v2020::{get_gear_with_seed, logarithm2, Normalization, MASKS};
        let bits = logarithm2(c.avg);
        let level = Normalization::Level1.bits();
        Self {
            gear: get_gear_with_seed(0).0,
            mask_s: MASKS[(bits + level) as usize],
            mask_l: MASKS[(bits - level) as usize],
            min: c.min as usize,
            avg: c.avg as usize,
            max: c.max as usize,
        }
    }

    /// The length of the chunk that starts `source` (all of it if no cut is found).
    fn cut(&self, source: &[u8]) -> usize {
        let mut remaining = source.len();
        if remaining <= self.min {
            return remaining;
        }
        let mut center = self.avg;
        if remaining > self.max {
            remaining = self.max;
        } else if remaining < center {
            center = remaining;
        }
        // The crate steps two bytes at a time from the even position at or below the minimum,
        // so each stretch it scans ends at an even position too.
        let (start, center, end) = (self.min & !1, center & !1, remaining & !1);
        self.first_match(source, start, start, center, self.mask_s)
            .or_else(|| self.first_match(source, start, center, end, self.mask_l))
            .unwrap_or(remaining)
    }

    /// The hash at `at` of a scan that began at `origin`, before `at`'s byte is rolled in.
    fn rolled_in(&self, source: &[u8], origin: usize, at: usize) -> u64 {
        let from = origin.max(at.saturating_sub(HASH_SPAN - 1));
        source[from..at]
            .iter()
            .fold(0u64, |h, &b| (h << 1).wrapping_add(self.gear[b as usize]))
    }

    /// The first position in `from..to` whose hash (of a scan that began at `origin`) matches
    /// `mask`.
    fn first_match(
        &self,
        source: &[u8],
        origin: usize,
        from: usize,
        to: usize,
        mask: u64,
    ) -> Option<usize> {
        let g = &*self.gear;
        let mut at = from;
        while to - at >= LANES * SEGMENT {
            let starts: [usize; LANES] = std::array::from_fn(|l| at + l * SEGMENT);
            let mut h = starts.map(|s| self.rolled_in(source, origin, s));
            let seg: [&[u8; SEGMENT]; LANES] = starts.map(|s| {
                source[s..s + SEGMENT]
                    .try_into()
                    .expect("a segment is SEGMENT bytes")
            });
            let mut hit = None;
            'scan: for j in 0..SEGMENT {
                for l in 0..LANES {
                    h[l] = (h[l] << 1).wrapping_add(g[seg[l][j] as usize]);
                    if h[l] & mask == 0 {
                        hit = Some((l, j));
                        break 'scan;
                    }
                }
            }
            if let Some((lane, j)) = hit {
                // Lanes before it cover earlier bytes: one of them may match past `j`.
                for l in 0..lane {
                    if let Some(k) = Self::roll(g, &mut h[l], &seg[l][j + 1..], mask) {
                        return Some(starts[l] + j + 1 + k);
                    }
                }
                return Some(starts[lane] + j);
            }
            at += LANES * SEGMENT;
        }
        let mut h = self.rolled_in(source, origin, at);
        Self::roll(g, &mut h, &source[at..to], mask).map(|k| at + k)
    }

    /// Rolls `bytes` into `h`; the first position where it matches `mask`, if any.
    fn roll(g: &[u64; 256], h: &mut u64, bytes: &[u8], mask: u64) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            *h = (*h << 1).wrapping_add(g[b as usize]);
            if *h & mask == 0 {
                return Some(i);
            }
        }
        None
    }

    /// Every chunk of `source` as (offset, length).
    fn cuts<'a>(&'a self, source: &'a [u8]) -> impl Iterator<Item = (usize, usize)> + 'a {
        let mut at = 0;
        std::iter::from_fn(move || {
            let len = self.cut(&source[at..]);
            (len > 0).then(|| {
                at += len;
                (at - len, len)
            })
        })
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
    let cutter = Cutter::new(c);
    let mut read = buf.len() as u64;
    let mut total = 0u64;
    loop {
        let want = window - buf.len();
        let n = (&mut reader).take(want as u64).read_to_end(&mut buf)?;
        read += n as u64;
        let eof = n < want;
        let cuts: Vec<(usize, usize)> = cutter.cuts(&buf).collect();
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
        let whole: Vec<usize> = crate_cuts(&d, opts()).iter().map(|c| c.1).collect();
        assert_eq!(cuts_streamed(&d), whole);
    }

    #[test]
    fn shared_chunks_are_the_whole_buffer_cuts_whatever_the_size_hint() {
        let min = opts().min as usize;
        let windows = Windows::default();
        let mut held = Vec::new();
        for len in [0, 1, min - 1, min, min + 1, 3 * min, 5 << 20, 20 << 20] {
            let d = data(len);
            let whole: Vec<&[u8]> = crate_cuts(&d, opts())
                .into_iter()
                .map(|(at, len)| &d[at..at + len])
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

    /// Every chunk of `d` as the `fastcdc` crate cuts it.
    fn crate_cuts(d: &[u8], c: ChunkerOptions) -> Vec<(usize, usize)> {
        fastcdc::v2020::FastCDC::new(d, c.min, c.avg, c.max)
            .map(|ch| (ch.offset, ch.length))
            .collect()
    }

    #[test]
    fn cuts_are_the_crates_for_any_bounds_and_data() {
        let random = data(24 << 20);
        let zeros = vec![0u8; 9 << 20];
        // Low-entropy text-like bytes, and a short random block repeated.
        let text: Vec<u8> = random
            .iter()
            .map(|b| b"ab cd\nef"[*b as usize % 8])
            .collect();
        let repeated: Vec<u8> = random[..3000]
            .iter()
            .cycle()
            .take(6 << 20)
            .copied()
            .collect();
        let bounds = [
            (256 * 1024, 1024 * 1024, 4 * 1024 * 1024),
            (16 * 1024, 64 * 1024, 256 * 1024),
            (4097, 16385, 65537),
            (64, 256, 1024),
            (8191, 8191, 8191),
        ];
        for (min, avg, max) in bounds {
            let c = ChunkerOptions { min, avg, max };
            let cutter = Cutter::new(c);
            for (name, d) in [
                ("random", &random[..]),
                ("zeros", &zeros),
                ("text", &text),
                ("repeated", &repeated),
                ("odd tail", &random[..(5 << 20) + 12345]),
            ] {
                let got: Vec<(usize, usize)> = cutter.cuts(d).collect();
                assert_eq!(got, crate_cuts(d, c), "{name}, bounds {min}/{avg}/{max}");
            }
        }
    }

    #[test]
    fn side_by_side_scans_find_the_first_match_of_a_serial_scan() {
        let d = data(1 << 20);
        let cutter = Cutter::new(opts());
        // Masks of few bits match every few hundred bytes, so that matches fall in every lane,
        // near segment ends and in the bytes a lane rolls in from.
        for mask in [
            0x1f0u64,
            0x3f00,
            0xd90003,
            0x1_0401_0211,
            0x4000_0000_0000_0301,
        ] {
            for (origin, from, to) in [
                (0, 0, 1 << 20),
                (7, 7, 1 << 20),
                (100, 130, 100 + 4 * SEGMENT * LANES + 77),
                (0, 5000, 5000 + LANES * SEGMENT),
                (33, 40, 41),
                (9, 9, 9),
            ] {
                let serial = {
                    let mut h = 0u64;
                    (origin..to).find(|&i| {
                        h = (h << 1).wrapping_add(cutter.gear[d[i] as usize]);
                        i >= from && h & mask == 0
                    })
                };
                assert_eq!(
                    cutter.first_match(&d, origin, from, to, mask),
                    serial,
                    "mask {mask:#x}, scan {origin}/{from}..{to}"
                );
            }
        }
    }

    #[test]
    fn small_and_empty_inputs() {
        assert!(cuts_streamed(&[]).is_empty());
        assert_eq!(cuts_streamed(&data(1000)), vec![1000]);
    }
}
