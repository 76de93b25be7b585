//! Cairn's storage node: a durable content-addressed chunk store that replicates each chunk to
//! its partition's replicas until the redundancy factor holds.
//!
//! - [`chunkstore`]: segment files + fjall index (behind an in-memory presence filter), group
//!   commit, recovery, compaction;
//! - [`membership`]: registration, heartbeats and the cached placement layout;
//! - [`replication`]: forwarding to replicas, the persisted repair queue and its worker;
//! - [`healing`]: anti-entropy (re-replication, rebalancing, drain), scrub and pulls;
//! - [`service`]: the thin gRPC handlers; [`app`]: the composition root.

pub mod app;
pub mod chunkstore;
pub mod healing;
pub mod membership;
pub mod replication;
pub mod service;
