//! Cairn's coordinator: a Raft group (openraft 0.9, state in sled) that holds the cluster map,
//! the placement layout, tenants and the snapshot catalog.
//!
//! - [`types`]: the replicated vocabulary (commands, results, records);
//! - [`store`]: the durable Raft log and state machine;
//! - [`layout`]: placement of partitions on nodes (pure);
//! - [`node`]: the domain operations the RPC handlers call;
//! - [`service`]: the thin gRPC handlers; [`network`]: the Raft transport;
//! - [`app`]: the composition root.

pub mod app;
pub mod layout;
pub mod network;
pub mod node;
pub mod service;
pub mod store;
pub mod types;
