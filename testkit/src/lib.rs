//! sipzone's test kit: a scripted test user agent on the project's own SIP
//! stack, a throw-away PKI, and harnesses for SIPp and stunnel. Tests of every
//! crate use it; the `sipzone-uas` and `sipzone-uac` binaries expose the UA
//! on the command line.
#![forbid(unsafe_code)]

/// The PKI helpers live in the stack (`sip::transport::pki`); re-exported
/// here for tests.
pub use sip::transport::pki;
pub mod metrics;
pub mod net;
pub mod proc;
pub mod sipp;
pub mod stunnel;
pub mod ua;

/// Logs to stderr, filtered by `RUST_LOG`: the setup of the kit's binaries.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
}
