//! Loopback addresses for tests.

use std::net::{SocketAddr, TcpListener, UdpSocket};

/// A port free on 127.0.0.1 for both UDP and TCP (from the ephemeral range).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let Ok(t) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = t.local_addr().map(|a| a.port()) else {
            continue;
        };
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

/// `127.0.0.1:port`.
pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
