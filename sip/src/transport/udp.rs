//! UDP sockets: one datagram is one message (RFC 3261 §18.3). Malformed
//! requests are answered to the source address; anything else that does not
//! parse is dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::UdpSocket;

use super::{Shared, canonical};
use crate::flow::{Flow, Transport};
use crate::msg::{Framing, Message, ParseError, error_response};

/// Largest UDP payload there can be.
const MAX_DATAGRAM: usize = 65_535;

/// Binds a UDP socket (IPv6 sockets are IPv6-only so an IPv4 socket can share
/// the port), with SO_RCVBUF when asked.
pub(super) fn bind(addr: SocketAddr, recv_buffer: Option<usize>) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if let Some(n) = recv_buffer {
        sock.set_recv_buffer_size(n)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// Receives datagrams on `sock` until shutdown.
pub(super) async fn run(shared: Arc<Shared>, sock: Arc<UdpSocket>, local: SocketAddr) {
    let mut shutdown = shared.shutdown.clone();
    let limits = shared.config.limits;
    // One octet more than the limit, so an oversized datagram is seen as such.
    let mut buf = vec![0u8; limits.max_message.saturating_add(1).min(MAX_DATAGRAM + 1)];
    loop {
        let (n, src) = tokio::select! {
            _ = shutdown.changed() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors reported on the socket, and the like: the
                    // socket itself stays usable.
                    tracing::debug!(%local, error = %e, "UDP receive error");
                    continue;
                }
            },
        };
        let src = canonical(src);
        let data = Bytes::copy_from_slice(&buf[..n]);
        let flow = Flow {
            transport: Transport::Udp,
            remote: src,
            local: Some(local),
            conn: None,
        };
        match Message::parse(data.clone(), Framing::Datagram, &limits) {
            Ok(msg) => {
                if !shared.deliver(msg, flow, &mut shutdown).await {
                    return;
                }
            }
            // CRLF keep-alives some clients send over UDP.
            Err(ParseError::Empty) => tracing::trace!(%src, "UDP keep-alive"),
            Err(err) => match error_response(&data, &err) {
                Some(resp) => {
                    shared.on_parse_error(Transport::Udp, src, &err);
                    match sock.send_to(&resp.to_bytes(), src).await {
                        Ok(_) => shared.on_sent(Transport::Udp, &resp, src),
                        Err(e) => tracing::debug!(%src, error = %e, "UDP send failed"),
                    }
                }
                None => shared.on_dropped(Transport::Udp, src, "garbage", &err),
            },
        }
    }
}
