//! `sipzone-balancer`: the stateless SIP edge in front of the zone-nodes of
//! both zones (DESIGN §1, §4, §8).
//!
//! - [`route`]: the sans-IO routing core (classification, forwarding,
//!   Record-Route and Path with signed tokens, refusals).
//! - [`token`]: the HMAC-signed flow tokens it writes into its URIs.
//! - [`config`]: the typed TOML configuration.
//! - [`driver`]: the tokio driver over `sip::transport`.
//! - [`limit`]: per-source rate limits and scanner rejection.
//! - [`metrics`]: metric names.
//!
//! Node health and selection is `sip::dispatch`, shared with the SBC.
#![forbid(unsafe_code)]

pub mod config;
pub mod driver;
pub mod limit;
pub mod metrics;
pub mod route;
pub mod token;
