//! Directory trees as stored in the cluster.
//!
//! A [`Tree`] lists one directory's entries sorted by name, postcard-encoded behind a version
//! byte, and is stored as a chunk like file data — so an unchanged directory encodes to the same
//! bytes, gets the same id, and costs nothing in a later snapshot. Names are raw bytes (any Unix
//! name survives); [`Tree::validate`] refuses entries that could escape a restore target.

use cairn_proto::ChunkId;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const TREE_VERSION: u8 = 1;

/// A file's piece: chunk id and plaintext length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Chunk id.
    pub id: ChunkId,
    /// Plaintext length.
    pub len: u32,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Regular file with its content.
    File {
        /// Chunks in order.
        content: Vec<ChunkRef>,
    },
    /// Directory with its subtree.
    Dir {
        /// Id of the subtree chunk.
        subtree: ChunkId,
    },
    /// Symbolic link.
    Symlink {
        /// Raw target bytes.
        target: Vec<u8>,
    },
}

/// One directory entry with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Raw name bytes.
    pub name: Vec<u8>,
    /// Kind and content.
    pub kind: Kind,
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime_ns: i64,
    /// Change time (for change detection only).
    pub ctime_ns: i64,
    /// Size in bytes.
    pub size: u64,
    /// Device and inode (change detection, hard links).
    pub dev: u64,
    /// Inode number.
    pub inode: u64,
    /// Link count (> 1: hard-linked).
    pub nlink: u64,
}

/// One directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Entries sorted by name.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// Deterministic encoding (entries are sorted first).
    pub fn encode(&mut self) -> Vec<u8> {
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = vec![TREE_VERSION];
        out.extend(postcard::to_stdvec(self).expect("postcard encoding of a tree"));
        out
    }

    /// Decodes and validates a tree.
    pub fn decode(b: &[u8]) -> Result<Self> {
        match b.split_first() {
            Some((&TREE_VERSION, rest)) => {
                let t: Tree = postcard::from_bytes(rest)
                    .map_err(|e| Error::Integrity(format!("tree: {e}")))?;
                t.validate()?;
                Ok(t)
            }
            _ => Err(Error::Integrity("tree: unknown format".into())),
        }
    }

    /// Refuses names that are empty, `.`, `..`, contain `/` or NUL, and duplicates.
    pub fn validate(&self) -> Result<()> {
        let mut prev: Option<&[u8]> = None;
        for n in &self.nodes {
            let bad = n.name.is_empty()
                || n.name == b"."
                || n.name == b".."
                || n.name.contains(&b'/')
                || n.name.contains(&0);
            if bad {
                return Err(Error::HostilePath(
                    String::from_utf8_lossy(&n.name).into_owned(),
                ));
            }
            if prev.is_some_and(|p| p >= n.name.as_slice()) {
                return Err(Error::HostilePath(format!(
                    "{} (duplicate or unsorted entry)",
                    String::from_utf8_lossy(&n.name)
                )));
            }
            prev = Some(&n.name);
        }
        Ok(())
    }

    /// The entry with this name.
    pub fn get(&self, name: &[u8]) -> Option<&Node> {
        self.nodes
            .binary_search_by(|n| n.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.nodes[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &[u8]) -> Node {
        Node {
            name: name.to_vec(),
            kind: Kind::Symlink {
                target: b"x".to_vec(),
            },
            mode: 0o777,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            size: 0,
            dev: 0,
            inode: 0,
            nlink: 1,
        }
    }

    #[test]
    fn encoding_is_deterministic() {
        let mut a = Tree {
            nodes: vec![node(b"b"), node(b"a")],
        };
        let mut b = Tree {
            nodes: vec![node(b"a"), node(b"b")],
        };
        assert_eq!(a.encode(), b.encode());
        assert_eq!(Tree::decode(&a.encode()).unwrap().nodes[0].name, b"a");
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [&b".."[..], b".", b"", b"a/b", b"/etc", b"x\0y"] {
            let t = Tree {
                nodes: vec![node(bad)],
            };
            let enc = {
                let mut out = vec![TREE_VERSION];
                out.extend(postcard::to_stdvec(&t).unwrap());
                out
            };
            assert!(
                matches!(Tree::decode(&enc), Err(Error::HostilePath(_))),
                "{bad:?}"
            );
        }
        let dup = Tree {
            nodes: vec![node(b"a"), node(b"a")],
        };
        assert!(dup.validate().is_err());
    }
}
