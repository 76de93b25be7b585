//! The on-disk record formats of segment files.
//!
//! A segment is an append-only file of records, each a header followed by its blob. Its file
//! name tells its format; every format stays readable, and new segments are written in the
//! newest:
//!
//! - [`Format::V3`], `NNNNNNNN.v3.seg`:
//!   `len(u32 LE) | id(32) | hash(8) | header-check(4) | blob(len)`, 48 bytes of header.
//!   `hash` is the first 8 bytes of blake3(blob): the node's own check against bit rot and torn
//!   writes, where 64 bits miss one corruption in 2^64 (storage systems commonly use a 32-bit
//!   CRC for this). The end-to-end check is the client's: the AES-GCM tag of the blob and the
//!   keyed chunk id of its plaintext. The header check is the first 4 bytes of
//!   blake3(`"CRN3"` | the preceding fields).
//! - [`Format::V2`], `NNNNNNNN.v2.seg`: the same with the first 16 bytes of blake3(blob) and
//!   `"CRN2"` in the header check, 56 bytes.
//! - [`Format::V1`], `NNNNNNNN.seg`:
//!   `MAGIC "CRN1"(4) | len(u32 LE) | id(32) | hash(32) | header-check(4) | blob(len)`, 76 bytes,
//!   with the whole blake3(blob) and a check over the preceding fields.
//!
//! In all, the header check means a torn or garbled header is detected before its length is
//! trusted, and the blob is verified against its hash on every read and scan without any key.
//! A read returns the whole blake3(blob), computed as it verifies.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use cairn_proto::ChunkId;

use super::appender::{aligned_buf, AlignedBuf, BLOCK};

/// Marks the start of every [`Format::V1`] record.
pub const MAGIC: [u8; 4] = *b"CRN1";
/// Prefixed to the fields of a [`Format::V2`] header for its check, so that a header of one
/// format never passes as another's.
const V2_DOMAIN: [u8; 4] = *b"CRN2";
/// The same for [`Format::V3`].
const V3_DOMAIN: [u8; 4] = *b"CRN3";
/// The longest header of any format.
const MAX_HEADER: usize = Format::V1.header_len();

/// The record format of a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// 76-byte headers with a magic and the whole blob hash; segments written before V2.
    V1,
    /// 56-byte headers with a 128-bit blob hash; segments written before V3.
    V2,
    /// 48-byte headers with a 64-bit blob hash; every new segment.
    V3,
}

impl Format {
    /// The format new segments are written in.
    pub const CURRENT: Format = Format::V3;

    /// Bytes before the blob.
    pub const fn header_len(self) -> usize {
        match self {
            Format::V1 => 76,
            Format::V2 => 56,
            Format::V3 => 48,
        }
    }

    /// Bytes of blake3(blob) the header keeps.
    const fn hash_len(self) -> usize {
        match self {
            Format::V1 => 32,
            Format::V2 => 16,
            Format::V3 => 8,
        }
    }

    /// What a header's check begins with (V1 has its magic instead).
    const fn domain(self) -> &'static [u8] {
        match self {
            Format::V1 => &[],
            Format::V2 => &V2_DOMAIN,
            Format::V3 => &V3_DOMAIN,
        }
    }

    /// Bytes a record of a `len`-byte blob takes.
    pub fn record_len(self, len: u32) -> u64 {
        self.header_len() as u64 + u64::from(len)
    }

    /// The file name of segment `n` in this format.
    pub fn file_name(self, n: u32) -> String {
        match self {
            Format::V1 => format!("{n:08}.seg"),
            Format::V2 => format!("{n:08}.v2.seg"),
            Format::V3 => format!("{n:08}.v3.seg"),
        }
    }

    /// The segment number and format a file name stands for, if it names a segment.
    pub fn parse_file_name(name: &str) -> Option<(u32, Format)> {
        let (n, f) = if let Some(n) = name.strip_suffix(".v3.seg") {
            (n, Format::V3)
        } else if let Some(n) = name.strip_suffix(".v2.seg") {
            (n, Format::V2)
        } else {
            (name.strip_suffix(".seg")?, Format::V1)
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((n.parse().ok()?, f))
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Chunk id.
    pub id: ChunkId,
    /// Blob length.
    pub len: u32,
    /// The leading bytes of blake3(blob) the format keeps (the rest are zero).
    hash: [u8; 32],
    format: Format,
}

impl Header {
    /// The whole blake3 of `blob` if it matches this header's hash.
    fn verify(&self, blob: &[u8]) -> Option<[u8; 32]> {
        let n = self.format.hash_len();
        let h = *blake3::hash(blob).as_bytes();
        (h[..n] == self.hash[..n]).then_some(h)
    }
}

/// An encoded header, as long as its format's.
pub struct HeaderBytes {
    buf: [u8; MAX_HEADER],
    len: usize,
}

impl Deref for HeaderBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn check(domain: &[u8], fields: &[u8]) -> [u8; 4] {
    let mut h = blake3::Hasher::new();
    h.update(domain);
    h.update(fields);
    h.finalize().as_bytes()[..4].try_into().expect("4 bytes")
}

/// Encodes the header of a record of `len` bytes whose blob hashes to `hash`.
pub fn encode_header(format: Format, id: &ChunkId, hash: &[u8; 32], len: u32) -> HeaderBytes {
    let mut h = [0u8; MAX_HEADER];
    match format {
        Format::V1 => {
            h[..4].copy_from_slice(&MAGIC);
            h[4..8].copy_from_slice(&len.to_le_bytes());
            h[8..40].copy_from_slice(&id.0);
            h[40..72].copy_from_slice(hash);
            let c = check(format.domain(), &h[..72]);
            h[72..76].copy_from_slice(&c);
        }
        Format::V2 | Format::V3 => {
            let end = 36 + format.hash_len();
            h[..4].copy_from_slice(&len.to_le_bytes());
            h[4..36].copy_from_slice(&id.0);
            h[36..end].copy_from_slice(&hash[..format.hash_len()]);
            let c = check(format.domain(), &h[..end]);
            h[end..end + 4].copy_from_slice(&c);
        }
    }
    HeaderBytes {
        buf: h,
        len: format.header_len(),
    }
}

/// Decodes a header of `format` from the first [`Format::header_len`] bytes of `h`; `None` if
/// they are not a valid one.
pub fn decode_header(format: Format, h: &[u8]) -> Option<Header> {
    let h = h.get(..format.header_len())?;
    let mut hash = [0u8; 32];
    let (len, id) = match format {
        Format::V1 => {
            if h[..4] != MAGIC || check(format.domain(), &h[..72]) != h[72..76] {
                return None;
            }
            hash.copy_from_slice(&h[40..72]);
            (&h[4..8], &h[8..40])
        }
        Format::V2 | Format::V3 => {
            let end = 36 + format.hash_len();
            if check(format.domain(), &h[..end]) != h[end..end + 4] {
                return None;
            }
            hash[..format.hash_len()].copy_from_slice(&h[36..end]);
            (&h[..4], &h[4..36])
        }
    };
    Some(Header {
        id: ChunkId(id.try_into().ok()?),
        len: u32::from_le_bytes(len.try_into().ok()?),
        hash,
        format,
    })
}

/// What a scan found at one offset.
pub enum Scanned {
    /// A whole, verified record.
    Record { offset: u64, header: Header },
    /// A record whose header is sound but whose blob does not match its hash.
    Corrupt { offset: u64, header: Header },
    /// The scan stopped here: end of file, torn tail or unreadable header.
    End { offset: u64, clean: bool },
}

/// Scans a segment of `format` from `offset`, calling `f` for each record, and returns where it
/// stopped.
pub fn scan(
    file: &File,
    format: Format,
    mut offset: u64,
    mut f: impl FnMut(Scanned),
) -> io::Result<Scanned> {
    let size = file.metadata()?.len();
    let header_len = format.header_len() as u64;
    let mut header = [0u8; MAX_HEADER];
    let header = &mut header[..format.header_len()];
    let mut blob = Vec::new();
    loop {
        if offset == size {
            return Ok(Scanned::End {
                offset,
                clean: true,
            });
        }
        if offset + header_len > size {
            return Ok(Scanned::End {
                offset,
                clean: is_padding(file, offset, size)?,
            });
        }
        file.read_exact_at(header, offset)?;
        let Some(h) = decode_header(format, header) else {
            return Ok(Scanned::End {
                offset,
                clean: is_padding(file, offset, size)?,
            });
        };
        let end = offset + format.record_len(h.len);
        if end > size {
            return Ok(Scanned::End {
                offset,
                clean: false,
            });
        }
        blob.resize(h.len as usize, 0);
        file.read_exact_at(&mut blob, offset + header_len)?;
        if h.verify(&blob).is_some() {
            f(Scanned::Record { offset, header: h });
        } else {
            f(Scanned::Corrupt { offset, header: h });
        }
        offset = end;
    }
}

/// Whether `offset..size` is the zero padding of the active segment's last block (see
/// [`super::appender`]): less than a block, all zeros.
fn is_padding(file: &File, offset: u64, size: u64) -> io::Result<bool> {
    let n = size - offset;
    if n >= super::appender::BLOCK as u64 {
        return Ok(false);
    }
    let mut rest = vec![0u8; n as usize];
    file.read_exact_at(&mut rest, offset)?;
    Ok(rest.iter().all(|&b| b == 0))
}

/// Where the record of a chunk is expected: in a segment of `format`, at `offset`, with a blob of
/// `len` bytes.
#[derive(Debug, Clone, Copy)]
pub struct RecordAt<'a> {
    /// The segment's format.
    pub format: Format,
    /// Offset of the record's header.
    pub offset: u64,
    /// Length of its blob.
    pub len: u32,
    /// The chunk it must be the record of.
    pub id: &'a ChunkId,
}

impl RecordAt<'_> {
    /// Reads the record from `file` (header and blob in one read) and verifies it: a sound
    /// header naming the id and length, and a blob matching the header's hash. Returns the blob
    /// (a view into the read buffer, not a copy) and its whole blake3; `Err(InvalidData)` if
    /// anything does not match.
    pub fn read(&self, file: &File) -> io::Result<(Bytes, [u8; 32])> {
        let header_len = self.format.header_len();
        let mut buf = vec![0u8; header_len + self.len as usize];
        file.read_exact_at(&mut buf, self.offset)?;
        let hash = self.verify(&buf)?;
        Ok((Bytes::from(buf).slice(header_len..), hash))
    }

    /// The whole blake3 of the blob of `record` (header and blob), if it is the record expected
    /// and its blob matches the header's hash.
    fn verify(&self, record: &[u8]) -> io::Result<[u8; 32]> {
        decode_header(self.format, record)
            .filter(|h| h.id == *self.id && h.len == self.len)
            .and_then(|h| h.verify(&record[self.format.header_len()..]))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "record does not verify"))
    }

    /// As [`RecordAt::read`], from `file` opened with `O_DIRECT`: the blocks that hold the
    /// record are read into block-aligned memory, past the page cache, and the blob returned
    /// shares that memory (no copy). A read that fails with `EINVAL` means the file system
    /// refuses direct reads here.
    pub fn read_direct(&self, file: &File) -> io::Result<(Bytes, [u8; 32])> {
        let (format, offset, len) = (self.format, self.offset, self.len);
        let block = BLOCK as u64;
        let header_len = format.header_len();
        let end = offset + (header_len + len as usize) as u64;
        let start = offset / block * block;
        let span = (end.div_ceil(block) * block - start) as usize;
        let mut buf = aligned_buf(span);
        let mut got = 0;
        while got < span {
            match file.read_at(&mut buf[got..], start + got as u64) {
                Ok(0) => break,
                // A closed segment ends where its last record does, inside a block.
                Ok(n) if n % BLOCK != 0 => {
                    got += n;
                    break;
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let at = (offset - start) as usize;
        let record_end = at + header_len + len as usize;
        if got < record_end {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let hash = self.verify(&buf[at..record_end])?;
        let blob = Bytes::from_owner(DirectBuf(buf)).slice(at + header_len..record_end);
        Ok((blob, hash))
    }
}

/// Block-aligned memory that a blob read with `O_DIRECT` is handed over in (see
/// [`RecordAt::read_direct`]).
struct DirectBuf(AlignedBuf);

impl AsRef<[u8]> for DirectBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(format: Format, id: &ChunkId, blob: &[u8]) -> Vec<u8> {
        let hash = *blake3::hash(blob).as_bytes();
        let mut r = encode_header(format, id, &hash, blob.len() as u32).to_vec();
        r.extend_from_slice(blob);
        r
    }

    #[test]
    fn every_format_round_trips_and_none_passes_for_another() {
        let id = ChunkId([7; 32]);
        let blob = b"some blob bytes".to_vec();
        let all = [Format::V1, Format::V2, Format::V3];
        for (format, other) in all
            .iter()
            .flat_map(|&f| all.iter().filter(move |&&o| o != f).map(move |&o| (f, o)))
        {
            let r = record(format, &id, &blob);
            assert_eq!(r.len(), format.header_len() + blob.len());
            let h = decode_header(format, &r).expect("own format decodes");
            assert_eq!((h.id, h.len), (id, blob.len() as u32));
            assert_eq!(
                h.verify(&blob),
                Some(*blake3::hash(&blob).as_bytes()),
                "{format:?}"
            );
            assert_eq!(h.verify(b"some blob bytez"), None);
            assert!(
                decode_header(other, &r).is_none(),
                "{format:?} as {other:?}"
            );
        }
    }

    #[test]
    fn a_flipped_header_bit_is_never_a_header() {
        for format in [Format::V2, Format::V3] {
            let r = record(format, &ChunkId([9; 32]), &[1u8; 100]);
            for bit in 0..format.header_len() * 8 {
                let mut bad = r.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    decode_header(format, &bad).is_none(),
                    "{format:?} bit {bit}"
                );
            }
            assert!(
                decode_header(format, &[0u8; MAX_HEADER]).is_none(),
                "{format:?} zero padding"
            );
        }
    }

    #[test]
    fn file_names_tell_the_format() {
        for f in [Format::V1, Format::V2, Format::V3] {
            assert_eq!(Format::parse_file_name(&f.file_name(42)), Some((42, f)));
        }
        assert_eq!(Format::parse_file_name("00000042.seg.tmp"), None);
        assert_eq!(
            Format::parse_file_name("4294967295.v2.seg"),
            Some((u32::MAX, Format::V2))
        );
        assert_eq!(
            Format::parse_file_name("00000007.v3.seg"),
            Some((7, Format::V3))
        );
        assert_eq!(Format::parse_file_name(".v2.seg"), None);
        assert_eq!(Format::parse_file_name(".v3.seg"), None);
        assert_eq!(Format::parse_file_name("0000004x.v2.seg"), None);
    }
}
