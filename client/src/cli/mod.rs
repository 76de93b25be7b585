//! The `cairn` command line: argument parsing, configuration and output. Everything it does
//! is a call into the `cairn_client` library, or an admin RPC to the coordinator.

pub mod config;
pub mod devcluster;
