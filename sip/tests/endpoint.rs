//! The endpoint driver on real loopback sockets: a send that needs a new
//! connection must not hold up the loop (a peer that accepts TCP and never
//! finishes the TLS handshake would otherwise stall every transaction).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use sip::endpoint::Endpoint;
use sip::flow::{Flow, Transport};
use sip::msg::{HeaderName, Message, Method};
use sip::transport::{TransportConfig, Transports, tls};
use sip::txn::{Config, Event};

fn options(via: &str, target: &str, call_id: &str) -> Message {
    Message::request(Method::Options, target)
        .with(HeaderName::Via, via)
        .with(HeaderName::MaxForwards, "70")
        .with(HeaderName::From, "<sip:t@127.0.0.1>;tag=1")
        .with(HeaderName::To, &format!("<{target}>"))
        .with(HeaderName::CallId, call_id)
        .with(HeaderName::CSeq, "1 OPTIONS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_tls_handshake_does_not_stall_the_endpoint() {
    let cfg = TransportConfig {
        udp: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        tls_client: Some(tls::danger_accept_any_server_cert(None).unwrap()),
        // long enough that an inline handshake would hold the loop for the
        // whole test
        handshake_timeout: Duration::from_secs(3600),
        ..TransportConfig::default()
    };
    let (transports, incoming) = Transports::bind(cfg).await.unwrap();
    let udp_addr = transports.local_addr(Transport::Udp).unwrap();
    let (endpoint, mut events) = Endpoint::start(transports, incoming, Config::default(), 64);

    // accepts TCP, never speaks TLS
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let req = options(
        "SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bKhang1",
        &format!("sip:x@{silent_addr}"),
        "hang1",
    );
    endpoint
        .send_request(Flow::to(Transport::Tls, silent_addr), req)
        .await
        .unwrap();

    // meanwhile a request over UDP is still handled and answered
    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let via = format!(
        "SIP/2.0/UDP {};branch=z9hG4bKudp1",
        peer.local_addr().unwrap()
    );
    let req = options(&via, &format!("sip:x@{udp_addr}"), "udp1");
    peer.send_to(&req.to_bytes(), udp_addr).await.unwrap();
    let served = async {
        loop {
            match events.recv().await.unwrap() {
                Event::Request { key, msg, .. } => {
                    endpoint
                        .send_response(key, msg.response(200, "OK", Some("t")))
                        .await
                        .unwrap();
                    let mut buf = vec![0u8; 4096];
                    let (n, _) = peer.recv_from(&mut buf).await.unwrap();
                    let resp = Message::parse(
                        Bytes::copy_from_slice(&buf[..n]),
                        sip::msg::Framing::Datagram,
                        &Default::default(),
                    )
                    .unwrap();
                    return resp.status();
                }
                _ => continue,
            }
        }
    };
    // a safety net against a hang, not a timing assertion
    let status = tokio::time::timeout(Duration::from_secs(60), served)
        .await
        .expect("the endpoint stalled behind the TLS handshake");
    assert_eq!(status, Some(200));
    hold.abort();
}
