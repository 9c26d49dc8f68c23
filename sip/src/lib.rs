//! sipzone's SIP stack.
//!
//! - [`msg`]: the wire parser and serializer (RFC 3261 §7, §20, §25; RFC 5118),
//!   zero-copy over [`bytes::Bytes`].
//! - [`auth`]: digest authentication (RFC 3261 §22, RFC 7616, RFC 8760).
//!
//! The protocol modules are sans-IO: they take `now` and bytes as inputs and
//! return actions. The `runtime` feature adds the tokio drivers.
#![forbid(unsafe_code)]

pub mod auth;
pub mod flow;
pub mod msg;
