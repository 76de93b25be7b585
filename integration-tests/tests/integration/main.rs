//! Tests that run Cairn's real binaries: coordinators, storage nodes and the `cairn` CLI,
//! as separate processes on 127.0.0.1.

mod backup;
mod coordinator;
mod faults;
mod healing;
mod storage;
