//! Metric names emitted by the transport driver, through the `metrics` facade.
//!
//! Every metric carries a `transport` label (`udp`, `tcp`, `tls`); the ones
//! below that say so carry a second label.

/// Counter: messages parsed and handed to the application; label `kind` (`request`, `response`).
pub const MESSAGES_RECEIVED: &str = "sip_transport_messages_received_total";
/// Counter: messages written to a socket or a connection's queue; label `kind`.
pub const MESSAGES_SENT: &str = "sip_transport_messages_sent_total";
/// Counter: sends that failed (no socket, queue full, connect or handshake failure).
pub const SEND_ERRORS: &str = "sip_transport_send_errors_total";
/// Counter: malformed requests answered with an error response (400, 505, 513, 413).
pub const PARSE_ERRORS: &str = "sip_transport_parse_errors_total";
/// Counter: input dropped without an answer (garbage, malformed responses); label `reason`.
pub const DROPPED: &str = "sip_transport_dropped_total";
/// Counter: CRLFCRLF keep-alive pings answered with CRLF (RFC 5626 §4.4.1).
pub const KEEPALIVES: &str = "sip_transport_keepalives_total";
/// Counter: connections established; label `direction` (`inbound`, `outbound`).
pub const CONNECTIONS_OPENED: &str = "sip_transport_connections_opened_total";
/// Counter: connections closed; label `reason`.
pub const CONNECTIONS_CLOSED: &str = "sip_transport_connections_closed_total";
/// Counter: inbound connections refused because the connection limit was reached.
pub const CONNECTIONS_REFUSED: &str = "sip_transport_connections_refused_total";
/// Gauge: connections currently open (handshakes in progress included).
pub const CONNECTIONS_OPEN: &str = "sip_transport_connections_open";
/// Counter: TLS handshakes that failed or timed out; label `direction`.
pub const TLS_HANDSHAKE_FAILURES: &str = "sip_transport_tls_handshake_failures_total";
