//! Reading a process's Prometheus endpoint (`/metrics`, plain HTTP on
//! loopback) from a test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// The Prometheus text at `at` (empty when it cannot be fetched).
pub fn text(at: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect(at) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// The value of the first sample whose line starts with `name` (labels
/// included, e.g. `x_total{code="200"}`).
pub fn sample(at: SocketAddr, name: &str) -> Option<f64> {
    text(at)
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
