//! The on-disk record format of segment files.
//!
//! A segment is an append-only file of records:
//! `MAGIC(4) | len(u32 LE) | id(32) | hash(32) | header-check(4) | blob(len)`.
//! The header check is the first 4 bytes of blake3 over the preceding header fields, so a torn
//! or garbled header is detected before its length is trusted; `hash` is blake3(blob), so the
//! blob is verified on every read and scan without any key.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use cairn_proto::ChunkId;

/// Marks the start of every record.
pub const MAGIC: [u8; 4] = *b"CRN1";
/// Bytes before the blob.
pub const HEADER_LEN: usize = 4 + 4 + 32 + 32 + 4;

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Chunk id.
    pub id: ChunkId,
    /// blake3 of the blob.
    pub hash: [u8; 32],
    /// Blob length.
    pub len: u32,
}

fn check(h: &[u8]) -> [u8; 4] {
    let d = blake3::hash(h);
    d.as_bytes()[..4].try_into().expect("4 bytes")
}

/// Encodes a record header.
pub fn encode_header(id: &ChunkId, hash: &[u8; 32], len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..40].copy_from_slice(&id.0);
    h[40..72].copy_from_slice(hash);
    let c = check(&h[..72]);
    h[72..76].copy_from_slice(&c);
    h
}

/// Decodes a header; `None` if it is not a valid one.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Option<Header> {
    if h[..4] != MAGIC || check(&h[..72]) != h[72..76] {
        return None;
    }
    Some(Header {
        len: u32::from_le_bytes(h[4..8].try_into().ok()?),
        id: ChunkId(h[8..40].try_into().ok()?),
        hash: h[40..72].try_into().ok()?,
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

/// Scans a segment from `offset`, calling `f` for each record, and returns where it stopped.
pub fn scan(file: &File, mut offset: u64, mut f: impl FnMut(Scanned)) -> io::Result<Scanned> {
    let size = file.metadata()?.len();
    let mut header = [0u8; HEADER_LEN];
    let mut blob = Vec::new();
    loop {
        if offset == size {
            return Ok(Scanned::End {
                offset,
                clean: true,
            });
        }
        if offset + HEADER_LEN as u64 > size {
            return Ok(Scanned::End {
                offset,
                clean: is_padding(file, offset, size)?,
            });
        }
        file.read_exact_at(&mut header, offset)?;
        let Some(h) = decode_header(&header) else {
            return Ok(Scanned::End {
                offset,
                clean: is_padding(file, offset, size)?,
            });
        };
        let end = offset + HEADER_LEN as u64 + u64::from(h.len);
        if end > size {
            return Ok(Scanned::End {
                offset,
                clean: false,
            });
        }
        blob.resize(h.len as usize, 0);
        file.read_exact_at(&mut blob, offset + HEADER_LEN as u64)?;
        if *blake3::hash(&blob).as_bytes() == h.hash {
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

/// Reads the record of chunk `id` at `offset` (header and blob in one read) and verifies it: a
/// sound header naming `id` and `len`, and a blob matching the header's hash. Returns the blob
/// (a view into the read buffer, not a copy) and its hash; `Err(InvalidData)` if anything does
/// not match.
pub fn read_record(
    file: &File,
    offset: u64,
    len: u32,
    id: &ChunkId,
) -> io::Result<(Bytes, [u8; 32])> {
    let mut buf = vec![0u8; HEADER_LEN + len as usize];
    file.read_exact_at(&mut buf, offset)?;
    let header: &[u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("header length");
    match decode_header(header) {
        Some(h)
            if h.id == *id
                && h.len == len
                && *blake3::hash(&buf[HEADER_LEN..]).as_bytes() == h.hash =>
        {
            Ok((Bytes::from(buf).slice(HEADER_LEN..), h.hash))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record does not verify",
        )),
    }
}
