//! sipzone's call switch (`sipzone-node`): registrar, B2BUA, media relay host
//! and Raft replica (DESIGN §2, §4). This first cut serves one node with an
//! in-memory store behind the [`state::Store`] trait; the Raft-backed store
//! replaces it without changing the protocol cores.
//!
//! - [`config`]: the typed configuration, validated before any port is bound.
//! - [`state`]: the replicated state machine (bindings) and the `Store` trait.
//! - [`directory`]: users and their HA1 credentials.
//! - [`registrar`]: RFC 3261 §10.3 registrar with digest auth and lockout, sans-IO.
//! - [`b2bua`]: the B2BUA core (forking, relaying, call records), sans-IO.
//! - [`replica`]: the Raft replica (raft-rs, redb log, sled state) behind the `Store`.
//! - [`peer`]: the Raft transport between nodes (QUIC, mutual TLS).
//! - [`cluster`]: the node's store (in memory, or the replica and its transport).
//! - [`takeover`]: which live node takes the calls of a dead one.
//! - [`driver`]: the tokio driver tying transports, transactions and cores together.
#![forbid(unsafe_code)]

pub mod b2bua;
pub mod cluster;
pub mod config;
pub mod directory;
pub mod driver;
pub mod metrics;
pub mod peer;
pub mod registrar;
pub mod replica;
pub mod state;
pub mod takeover;
