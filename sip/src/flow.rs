//! Where a message came from or goes to, independent of sockets: the
//! transport protocol, the remote address, and for connection-oriented
//! transports the connection it travelled on (RFC 3261 §18, RFC 5626 flows).

use std::fmt;
use std::net::SocketAddr;

/// A SIP transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// UDP (unreliable: the transaction layer retransmits).
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl Transport {
    /// True for transports that deliver reliably (no retransmission timers,
    /// RFC 3261 §17.1.1.2, §17.1.2.2).
    pub fn is_reliable(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// The Via transport token (`UDP`, `TCP`, `TLS`).
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    /// Parses a Via transport token or `transport=` URI parameter value.
    pub fn from_token(t: &str) -> Option<Transport> {
        if t.eq_ignore_ascii_case("udp") {
            Some(Transport::Udp)
        } else if t.eq_ignore_ascii_case("tcp") {
            Some(Transport::Tcp)
        } else if t.eq_ignore_ascii_case("tls") {
            Some(Transport::Tls)
        } else {
            None
        }
    }

    /// The default port (5060, or 5061 for TLS).
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Tls => 5061,
            _ => 5060,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.via_token())
    }
}

/// Identifies one TCP/TLS connection for the lifetime of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A flow: transport, local and remote address, and the connection when the
/// transport has one. Incoming messages carry the flow they arrived on;
/// responses and requests to a device are sent on a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    /// The transport protocol.
    pub transport: Transport,
    /// The remote address (source of an incoming message, destination of an outgoing one).
    pub remote: SocketAddr,
    /// The local address the message arrived on or leaves from, when known.
    pub local: Option<SocketAddr>,
    /// The connection, for TCP/TLS flows that exist; `None` asks the
    /// transport to reuse or open a connection to `remote`.
    pub conn: Option<ConnId>,
}

impl Flow {
    /// A flow to `remote` over `transport`, with no particular connection.
    pub fn to(transport: Transport, remote: SocketAddr) -> Flow {
        Flow {
            transport,
            remote,
            local: None,
            conn: None,
        }
    }
}
