//! sipzone's SIP stack.
//!
//! - [`msg`]: the wire parser and serializer (RFC 3261 §7, §20, §25; RFC 5118),
//!   zero-copy over [`bytes::Bytes`].
//! - [`endpoint`]: the tokio driver of the transaction layer over the transports.
//! - [`dispatch`]: the health-checked dispatcher (OPTIONS probes, weighted
//!   rendezvous hashing over the nodes of both zones), used by balancer and SBC.
//! - [`dialog`]: dialog state and in-dialog requests (RFC 3261 §12).
//! - [`auth`]: digest authentication (RFC 3261 §22, RFC 7616, RFC 8760).
//! - [`txn`]: the transaction layer (RFC 3261 §17, RFC 6026), sans-IO.
//! - `transport` (feature `runtime`): the tokio UDP/TCP/TLS driver (RFC 3261 §18, RFC 3581).
//!
//! The protocol modules are sans-IO: they take `now` and bytes as inputs and
//! return actions. The `runtime` feature adds the tokio drivers.
#![forbid(unsafe_code)]

pub mod auth;
pub mod dialog;
pub mod dispatch;
#[cfg(feature = "runtime")]
pub mod endpoint;
pub mod flow;
pub mod msg;
#[cfg(feature = "runtime")]
pub mod transport;
pub mod txn;
