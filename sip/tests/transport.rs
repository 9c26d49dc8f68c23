//! The transport driver over real loopback sockets: UDP, TCP and TLS receive
//! and send paths, RFC 3261 §18 Via handling and RFC 3581, framing, limits,
//! connection reuse, and the TLS configurations (mutual TLS, AEAD suites).
//!
//! Nothing here waits on the clock: every test awaits the message or the
//! socket event it expects; `within` is only a safety net against hangs.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sip::flow::{Flow, Transport};
use sip::msg::{Frame, Framing, HeaderName, Limits, Message, frame};
use sip::transport::{Incoming, TransportConfig, TransportError, Transports, tls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

const LOOPBACK: &str = "127.0.0.1:0";

/// Fails the test instead of hanging it.
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("test step timed out")
}

async fn next(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
    within(rx.recv()).await.expect("transports closed")
}

fn request(method: &str, via: &str, call_id: &str) -> String {
    format!(
        "{method} sip:bob@example.com SIP/2.0\r\n\
Via: {via}\r\n\
Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKproxy\r\n\
From: <sip:alice@example.com>;tag=a1\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 {method}\r\n\
Max-Forwards: 70\r\n\
Content-Length: 0\r\n\r\n"
    )
}

fn parse(s: &str) -> Message {
    Message::parse(
        Bytes::copy_from_slice(s.as_bytes()),
        Framing::Datagram,
        &Limits::default(),
    )
    .unwrap()
}

fn config() -> TransportConfig {
    TransportConfig {
        udp: vec![LOOPBACK.parse().unwrap()],
        tcp: vec![LOOPBACK.parse().unwrap()],
        ..TransportConfig::default()
    }
}

async fn bind(config: TransportConfig) -> (Transports, mpsc::Receiver<Incoming>) {
    Transports::bind(config).await.unwrap()
}

/// Reads the next SIP message from a stream, skipping keep-alives.
async fn read_msg<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Message {
    within(async {
        loop {
            match frame(buf, &Limits::default()).unwrap() {
                Frame::Message(n) => {
                    let bytes = buf.split_to(n).freeze();
                    return Message::parse(bytes, Framing::Stream, &Limits::default()).unwrap();
                }
                Frame::Ping(n) | Frame::Pong(n) => buf.advance(n),
                Frame::Incomplete => {
                    let n = s.read_buf(buf).await.unwrap();
                    assert!(n > 0, "connection closed");
                }
            }
        }
    })
    .await
}

async fn recv_udp(sock: &UdpSocket) -> (Message, SocketAddr) {
    let mut buf = vec![0u8; 65_535];
    let (n, from) = within(sock.recv_from(&mut buf)).await.unwrap();
    let msg = Message::parse(
        Bytes::copy_from_slice(&buf[..n]),
        Framing::Datagram,
        &Limits::default(),
    )
    .unwrap();
    (msg, from)
}

#[tokio::test]
async fn udp_request_is_stamped_and_response_follows_rport() {
    let (t, mut rx) = bind(config()).await;
    let server = t.local_addr(Transport::Udp).unwrap();
    assert_ne!(server.port(), 0);
    let client = UdpSocket::bind(LOOPBACK).await.unwrap();
    let me = client.local_addr().unwrap();

    let req = request(
        "OPTIONS",
        "SIP/2.0/UDP 192.0.2.1:5099;rport;branch=z9hG4bK-u1",
        "u1",
    );
    client.send_to(req.as_bytes(), server).await.unwrap();
    let inc = next(&mut rx).await;
    assert_eq!(inc.flow.transport, Transport::Udp);
    assert_eq!(inc.flow.remote, me);
    assert_eq!(inc.flow.local, Some(server));
    let via = inc.msg.top_via().unwrap();
    assert_eq!(via.received(), Some(me.ip()));
    assert_eq!(via.rport(), Some(Some(me.port())));
    assert_eq!(via.branch(), Some("z9hG4bK-u1"));
    let vias: Vec<_> = inc.msg.values(HeaderName::Via).collect();
    assert_eq!(vias.len(), 2);
    assert_eq!(vias[1], "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKproxy");

    // §18.2.2 + RFC 3581: to received:rport, not to the sent-by 192.0.2.1:5099.
    let resp = inc.msg.response(200, "OK", Some("b1"));
    assert_eq!(sip::transport::response_target(&resp).unwrap().remote, me);
    let used = t.send_response(&inc.flow, &resp).await.unwrap();
    assert_eq!(used.remote, me);
    assert_eq!(used.local, Some(server));
    let (got, from) = recv_udp(&client).await;
    assert_eq!(from, server);
    assert_eq!(got.status(), Some(200));
    assert_eq!(got.call_id(), Some("u1"));
    let stats = t.stats();
    assert_eq!((stats.received, stats.sent), (1, 1));
}

#[tokio::test]
async fn udp_malformed_request_gets_400_and_garbage_is_dropped() {
    let (t, mut rx) = bind(config()).await;
    let server = t.local_addr(Transport::Udp).unwrap();
    let client = UdpSocket::bind(LOOPBACK).await.unwrap();

    let bad = request("OPTIONS", "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK-b1", "bad1")
        .replace("CSeq: 1 OPTIONS", "CSeq: 1 INVITE");
    client.send_to(bad.as_bytes(), server).await.unwrap();
    let (resp, from) = recv_udp(&client).await;
    assert_eq!(from, server);
    assert_eq!(resp.status(), Some(400));
    assert_eq!(resp.call_id(), Some("bad1"));

    // Garbage and a malformed response get no answer; the socket keeps serving.
    client
        .send_to(b"\x00\x01 not sip at all", server)
        .await
        .unwrap();
    client
        .send_to(b"SIP/2.0 999 Nope\r\n\r\n", server)
        .await
        .unwrap();
    let good = request(
        "OPTIONS",
        "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-g1",
        "good1",
    );
    client.send_to(good.as_bytes(), server).await.unwrap();
    let inc = next(&mut rx).await;
    assert_eq!(inc.msg.call_id(), Some("good1"));
    // sent-by equals the source address: no received added
    assert_eq!(inc.msg.top_via().unwrap().received(), None);
    let stats = t.stats();
    assert_eq!(stats.parse_errors, 1);
    assert_eq!(stats.dropped, 2);
    assert_eq!(stats.received, 1);
}

#[tokio::test]
async fn tcp_framing_coalesced_and_split_writes() {
    let (t, mut rx) = bind(config()).await;
    let server = t.local_addr(Transport::Tcp).unwrap();
    let mut c = TcpStream::connect(server).await.unwrap();
    let me = c.local_addr().unwrap();

    let a = request("OPTIONS", "SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK-t1", "t1");
    let b = request("OPTIONS", "SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK-t2", "t2");
    c.write_all(format!("{a}{b}").as_bytes()).await.unwrap();
    let first = next(&mut rx).await;
    let second = next(&mut rx).await;
    assert_eq!(first.msg.call_id(), Some("t1"));
    assert_eq!(second.msg.call_id(), Some("t2"));
    assert_eq!(first.flow.transport, Transport::Tcp);
    assert_eq!(first.flow.remote, me);
    assert!(first.flow.conn.is_some());
    assert_eq!(first.flow.conn, second.flow.conn);
    assert_eq!(first.msg.top_via().unwrap().received(), Some(me.ip()));

    let m = request("OPTIONS", "SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK-t3", "t3");
    let (p1, p2) = m.as_bytes().split_at(m.len() / 2);
    c.write_all(p1).await.unwrap();
    c.flush().await.unwrap();
    c.write_all(p2).await.unwrap();
    let third = next(&mut rx).await;
    assert_eq!(third.msg.call_id(), Some("t3"));
    assert_eq!(third.flow.conn, first.flow.conn);
}

#[tokio::test]
async fn tcp_ping_gets_pong() {
    let (t, _rx) = bind(config()).await;
    let mut c = TcpStream::connect(t.local_addr(Transport::Tcp).unwrap())
        .await
        .unwrap();
    c.write_all(b"\r\n\r\n").await.unwrap();
    let mut pong = [0u8; 2];
    within(c.read_exact(&mut pong)).await.unwrap();
    assert_eq!(&pong, b"\r\n");
    assert_eq!(t.stats().keepalives, 1);
}

#[tokio::test]
async fn tcp_connection_reuse_for_requests_and_responses() {
    let (t, mut rx) = bind(config()).await;
    let mut c = TcpStream::connect(t.local_addr(Transport::Tcp).unwrap())
        .await
        .unwrap();
    let me = c.local_addr().unwrap();
    let reg = request("REGISTER", "SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK-r1", "r1");
    c.write_all(reg.as_bytes()).await.unwrap();
    let inc = next(&mut rx).await;
    assert!(t.is_open(inc.flow.conn.unwrap()));

    let mut buf = BytesMut::new();
    let resp = inc.msg.response(200, "OK", Some("s1"));
    let used = t.send_response(&inc.flow, &resp).await.unwrap();
    assert_eq!(used.conn, inc.flow.conn);
    assert_eq!(read_msg(&mut c, &mut buf).await.status(), Some(200));

    // A request to the client's address, without a connection id, goes over
    // the connection the client opened (no new connection).
    let opts = parse(&request(
        "OPTIONS",
        "SIP/2.0/TCP 127.0.0.1;branch=z9hG4bK-s2",
        "s2",
    ));
    let used = t.send(&Flow::to(Transport::Tcp, me), &opts).await.unwrap();
    assert_eq!(used.conn, inc.flow.conn);
    let got = read_msg(&mut c, &mut buf).await;
    assert_eq!(got.call_id(), Some("s2"));
    let stats = t.stats();
    assert_eq!(stats.connections_opened, 1);
    assert_eq!(stats.connections_open, 1);
}

#[tokio::test]
async fn tcp_outgoing_connection_is_reused_and_replies_come_back() {
    let (a, mut a_rx) = bind(config()).await;
    let (b, mut b_rx) = bind(config()).await;
    let b_addr = b.local_addr(Transport::Tcp).unwrap();

    let r1 = parse(&request(
        "OPTIONS",
        "SIP/2.0/TCP 127.0.0.1;branch=z9hG4bK-o1",
        "o1",
    ));
    let f1 = a
        .send(&Flow::to(Transport::Tcp, b_addr), &r1)
        .await
        .unwrap();
    let inc = next(&mut b_rx).await;
    assert_eq!(inc.msg.call_id(), Some("o1"));
    b.send_response(&inc.flow, &inc.msg.response(200, "OK", Some("x")))
        .await
        .unwrap();
    let back = next(&mut a_rx).await;
    assert_eq!(back.msg.status(), Some(200));
    assert_eq!(back.flow.conn, f1.conn);

    let r2 = parse(&request(
        "OPTIONS",
        "SIP/2.0/TCP 127.0.0.1;branch=z9hG4bK-o2",
        "o2",
    ));
    let f2 = a
        .send(&Flow::to(Transport::Tcp, b_addr), &r2)
        .await
        .unwrap();
    assert_eq!(f2.conn, f1.conn);
    assert_eq!(next(&mut b_rx).await.flow.conn, inc.flow.conn);
    assert_eq!(a.stats().connections_opened, 1);
}

#[tokio::test]
async fn tcp_oversized_message_gets_513_and_close_listener_keeps_serving() {
    let (t, mut rx) = bind(config()).await;
    let server = t.local_addr(Transport::Tcp).unwrap();
    let mut c = TcpStream::connect(server).await.unwrap();
    let huge = request("OPTIONS", "SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK-h1", "h1")
        .replace("Content-Length: 0", "Content-Length: 10000000");
    c.write_all(huge.as_bytes()).await.unwrap();
    let mut buf = BytesMut::new();
    let resp = read_msg(&mut c, &mut buf).await;
    assert_eq!(resp.status(), Some(513));
    assert_eq!(resp.call_id(), Some("h1"));
    let n = within(c.read_buf(&mut buf)).await.unwrap();
    assert_eq!(n, 0, "connection closed after the 513");

    let mut c2 = TcpStream::connect(server).await.unwrap();
    let ok = request("OPTIONS", "SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK-h2", "h2");
    c2.write_all(ok.as_bytes()).await.unwrap();
    assert_eq!(next(&mut rx).await.msg.call_id(), Some("h2"));
    assert_eq!(t.stats().parse_errors, 1);
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused() {
    let (t, mut rx) = bind(TransportConfig {
        max_connections: 1,
        ..config()
    })
    .await;
    let server = t.local_addr(Transport::Tcp).unwrap();
    let mut a = TcpStream::connect(server).await.unwrap();
    let m1 = request("OPTIONS", "SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK-l1", "l1");
    a.write_all(m1.as_bytes()).await.unwrap();
    let first = next(&mut rx).await;

    let mut b = TcpStream::connect(server).await.unwrap();
    let mut sink = [0u8; 16];
    let r = within(b.read(&mut sink)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "refused connection is closed");
    assert_eq!(t.stats().connections_refused, 1);

    // outgoing connections count against the same limit
    let err = t
        .send(&Flow::to(Transport::Tcp, server), &first.msg)
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::TooManyConnections), "{err}");

    let m2 = request("OPTIONS", "SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK-l2", "l2");
    a.write_all(m2.as_bytes()).await.unwrap();
    let second = next(&mut rx).await;
    assert_eq!(second.msg.call_id(), Some("l2"));
    assert_eq!(second.flow.conn, first.flow.conn);
}

// ---- TLS ----

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// A leaf certificate signed by `ca`: `(chain_pem, key_pem)`.
fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn tls_server(ca: &Ca, client_ca: Option<&Ca>) -> TransportConfig {
    let (chain, key) = leaf(ca, &["sip.example.com", "127.0.0.1"]);
    TransportConfig {
        tls: vec![LOOPBACK.parse().unwrap()],
        tls_server: Some(
            tls::server_config(
                chain.as_bytes(),
                key.as_bytes(),
                client_ca.map(|c| c.pem.as_bytes()),
            )
            .unwrap(),
        ),
        ..TransportConfig::default()
    }
}

fn tls_client(config: Arc<rustls::ClientConfig>) -> TransportConfig {
    TransportConfig {
        tls_client: Some(config),
        ..TransportConfig::default()
    }
}

#[tokio::test]
async fn tls_request_response_round_trip() {
    let pki = ca("test CA");
    let (server, mut server_rx) = bind(tls_server(&pki, None)).await;
    let server_addr = server.local_addr(Transport::Tls).unwrap();
    let cfg = tls::client_config(pki.pem.as_bytes(), None).unwrap();
    let (client, mut client_rx) = bind(tls_client(cfg)).await;

    let req = parse(&request(
        "INVITE",
        "SIP/2.0/TLS client.example.com;branch=z9hG4bK-s1",
        "tls1",
    ));
    // no server name given: the certificate is checked against the IP
    let used = client
        .send(&Flow::to(Transport::Tls, server_addr), &req)
        .await
        .unwrap();
    assert_eq!(used.transport, Transport::Tls);
    let inc = next(&mut server_rx).await;
    assert_eq!(inc.flow.transport, Transport::Tls);
    assert_eq!(inc.msg.call_id(), Some("tls1"));
    assert_eq!(
        inc.msg.top_via().unwrap().received(),
        Some("127.0.0.1".parse().unwrap())
    );
    server
        .send_response(&inc.flow, &inc.msg.response(180, "Ringing", Some("t")))
        .await
        .unwrap();
    let back = next(&mut client_rx).await;
    assert_eq!(back.msg.status(), Some(180));
    assert_eq!(back.flow.conn, used.conn);

    // a named server is checked against its DNS name
    let (named, mut named_rx) = bind(tls_client(
        tls::client_config(pki.pem.as_bytes(), None).unwrap(),
    ))
    .await;
    named
        .send_with_name(
            &Flow::to(Transport::Tls, server_addr),
            &req,
            Some("sip.example.com"),
        )
        .await
        .unwrap();
    let inc = next(&mut server_rx).await;
    server
        .send_response(&inc.flow, &inc.msg.response(200, "OK", Some("t")))
        .await
        .unwrap();
    assert_eq!(next(&mut named_rx).await.msg.status(), Some(200));
}

#[tokio::test]
async fn tls_client_rejects_untrusted_server_unless_told_not_to() {
    let pki = ca("server CA");
    let other = ca("other CA");
    let (server, mut server_rx) = bind(tls_server(&pki, None)).await;
    let server_addr = server.local_addr(Transport::Tls).unwrap();
    let req = parse(&request(
        "OPTIONS",
        "SIP/2.0/TLS 127.0.0.1;branch=z9hG4bK-d1",
        "d1",
    ));

    let (wrong, _rx) = bind(tls_client(
        tls::client_config(other.pem.as_bytes(), None).unwrap(),
    ))
    .await;
    let err = wrong
        .send(&Flow::to(Transport::Tls, server_addr), &req)
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Tls(_)), "{err}");
    assert_eq!(wrong.stats().connections_open, 0);

    let (danger, _rx) = bind(tls_client(
        tls::danger_accept_any_server_cert(None).unwrap(),
    ))
    .await;
    danger
        .send_with_name(
            &Flow::to(Transport::Tls, server_addr),
            &req,
            Some("not-the-name.example"),
        )
        .await
        .unwrap();
    assert_eq!(next(&mut server_rx).await.msg.call_id(), Some("d1"));
}

/// Connects with a raw rustls client and returns what the first read after
/// sending a request gives: the response, or the refusal.
async fn raw_tls_exchange(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    call_id: &str,
) -> Result<Message, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls::pki_types::ServerName::try_from("sip.example.com").unwrap();
    let mut s = within(connector.connect(name, tcp)).await?;
    let req = request("OPTIONS", "SIP/2.0/TLS 127.0.0.1;branch=z9hG4bK-m", call_id);
    s.write_all(req.as_bytes()).await?;
    s.flush().await?;
    let mut buf = BytesMut::new();
    loop {
        if let Frame::Message(n) = frame(&buf, &Limits::default()).unwrap() {
            let bytes = buf.split_to(n).freeze();
            return Ok(Message::parse(bytes, Framing::Stream, &Limits::default()).unwrap());
        }
        if within(s.read_buf(&mut buf)).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = ca("cluster CA");
    let other = ca("rogue CA");
    let (server, mut server_rx) = bind(tls_server(&pki, Some(&pki))).await;
    let addr = server.local_addr(Transport::Tls).unwrap();

    let anonymous = tls::client_config(pki.pem.as_bytes(), None).unwrap();
    let e = raw_tls_exchange(addr, anonymous, "m1").await.unwrap_err();
    assert!(format!("{e:?}").contains("CertificateRequired"), "{e:?}");

    let (chain, key) = leaf(&other, &["rogue.example.com"]);
    let rogue =
        tls::client_config(pki.pem.as_bytes(), Some((chain.as_bytes(), key.as_bytes()))).unwrap();
    let e = raw_tls_exchange(addr, rogue, "m2").await.unwrap_err();
    assert!(format!("{e:?}").contains("UnknownCA"), "{e:?}");

    let (chain, key) = leaf(&pki, &["node1.example.com"]);
    let good =
        tls::client_config(pki.pem.as_bytes(), Some((chain.as_bytes(), key.as_bytes()))).unwrap();
    let (client, mut client_rx) = bind(TransportConfig {
        tls_server_name: Some("sip.example.com".into()),
        ..tls_client(good)
    })
    .await;
    let req = parse(&request(
        "OPTIONS",
        "SIP/2.0/TLS 127.0.0.1;branch=z9hG4bK-m3",
        "m3",
    ));
    client
        .send(&Flow::to(Transport::Tls, addr), &req)
        .await
        .unwrap();
    // the refused clients never got a message through
    let inc = next(&mut server_rx).await;
    assert_eq!(inc.msg.call_id(), Some("m3"));
    assert_eq!(server.stats().connections_opened, 1);
    server
        .send_response(&inc.flow, &inc.msg.response(200, "OK", Some("t")))
        .await
        .unwrap();
    assert_eq!(next(&mut client_rx).await.msg.status(), Some(200));
}

#[tokio::test]
async fn tls12_negotiates_an_aead_suite() {
    let pki = ca("test CA");
    let (server, mut server_rx) = bind(tls_server(&pki, None)).await;
    let addr = server.local_addr(Transport::Tls).unwrap();

    // A TLS 1.2-only client offering everything ring has.
    let mut roots = rustls::RootCertStore::empty();
    for c in tls::certs_from_pem(pki.pem.as_bytes()).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("sip.example.com").unwrap();
    let mut s = within(tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp))
        .await
        .unwrap();
    let (_, conn) = s.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let suite = format!("{:?}", conn.negotiated_cipher_suite().unwrap().suite());
    assert!(
        suite.contains("GCM") || suite.contains("CHACHA20"),
        "negotiated {suite}"
    );
    let req = request("OPTIONS", "SIP/2.0/TLS 127.0.0.1;branch=z9hG4bK-12", "v12");
    s.write_all(req.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(next(&mut server_rx).await.msg.call_id(), Some("v12"));
}

#[tokio::test]
async fn bind_validates_the_configuration() {
    let err = Transports::bind(TransportConfig {
        tls: vec![LOOPBACK.parse().unwrap()],
        ..TransportConfig::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::InvalidConfig("tls_server")));
    let (t, _rx) = bind(config()).await;
    let taken = t.local_addr(Transport::Udp).unwrap();
    let err = Transports::bind(TransportConfig {
        udp: vec![taken],
        ..TransportConfig::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::Bind { .. }));
    // no IPv6 socket: a send to an IPv6 peer fails cleanly
    let msg = parse(&request(
        "OPTIONS",
        "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-v6",
        "v6",
    ));
    let err = t
        .send(
            &Flow::to(Transport::Udp, "[::1]:5060".parse().unwrap()),
            &msg,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::NoSocket(_)));
}

/// A request that arrives over UDP with a Via naming TLS (RFC 4475 bext01)
/// is answered over UDP at the received address and the sent-by port, not
/// by opening a connection the datagram asked for.
#[tokio::test]
async fn udp_request_with_a_stream_via_is_answered_over_udp() {
    let (t, mut rx) = bind(config()).await;
    let server = t.local_addr(Transport::Udp).unwrap();
    let client = UdpSocket::bind(LOOPBACK).await.unwrap();
    let me = client.local_addr().unwrap();
    let via = format!(
        "SIP/2.0/TLS fold-and-staple.example.com:{};branch=z9hG4bK-tls1",
        me.port()
    );
    client
        .send_to(request("OPTIONS", &via, "tls-via").as_bytes(), server)
        .await
        .unwrap();
    let inc = next(&mut rx).await;
    let resp = inc.msg.response(420, "Bad Extension", Some("b1"));
    let used = t.send_response(&inc.flow, &resp).await.unwrap();
    assert_eq!((used.transport, used.remote), (Transport::Udp, me));
    let (got, _) = recv_udp(&client).await;
    assert_eq!(got.status(), Some(420));
}
