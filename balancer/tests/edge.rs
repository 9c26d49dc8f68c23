//! The balancer's edge duties as processes on loopback, each test with its
//! own `sipzone-balancer` in front of one in-memory `sipzone-node` (one
//! node, so a registration and the calls to it meet on the same registrar):
//!
//! - a device registered over TCP gets its incoming call on that connection;
//! - a REGISTER flood from one source address is refused with 429 while
//!   another source registers;
//! - a Path token altered by one character is refused with 403 and counted.
//!
//! The devices are the project's test UA (`testkit::ua`) and raw UDP
//! sockets. Bounded in count and time; loopback only (127.0.0.1, and
//! 127.0.0.2 as the second source address).
#![allow(clippy::unwrap_used, clippy::expect_used)]
// A process test measures real elapsed time on a bounded poll.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{REALM, refused, start_balancer, start_balancer_with, start_node, test_dir, wait_for};
use sip::flow::{Flow, Transport};
use sip::msg::{HeaderName, Method};
use sip::transport::TransportConfig;
use testkit::ua::{Answer, CallReport, Ua, UaConfig};

/// Bound on one UA operation (a registration or a call); the UA's own
/// transaction timers (64*T1) end a lost exchange before this.
const UA_LIMIT: Duration = Duration::from_secs(60);

/// A UA as `user` (password `pw` + user, as the nodes' test users) with
/// `transport`'s listeners.
async fn ua(user: &str, transport: TransportConfig) -> Ua {
    Ua::start(UaConfig {
        transport,
        user: user.into(),
        answer: Answer::Accept {
            ring: Duration::ZERO,
        },
        credentials: Some((user.into(), format!("pw{user}"))),
        ..UaConfig::default()
    })
    .await
    .unwrap()
}

/// A UDP listener on `ip`, ephemeral port.
fn udp_on(ip: [u8; 4]) -> TransportConfig {
    TransportConfig {
        udp: vec![SocketAddr::from((ip, 0))],
        ..TransportConfig::default()
    }
}

/// Reads from `sock` until a response carrying `call_id` arrives (requests,
/// such as the balancer's OPTIONS probes, and other responses are skipped);
/// fails after 10 s.
fn recv_response(sock: &UdpSocket, call_id: &str) -> String {
    let start = Instant::now();
    let mut buf = [0u8; 65_536];
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no response for {call_id}"
        );
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.starts_with("SIP/2.0 ") && text.contains(&format!("Call-ID: {call_id}\r\n")) {
            return text;
        }
    }
}

fn status(resp: &str) -> u16 {
    resp.get(8..11).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

#[test]
fn a_device_registered_over_tcp_gets_its_call_on_that_connection() {
    let dir = test_dir("edge-tcp-call");
    let node = start_node(&dir, "a1");
    let lb = start_balancer(&dir, &[("a1", "A", node.sip)]);
    common::wait_up(&lb, &["a1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The callee listens on nothing: no UDP socket, no TCP listener.
        // Whatever reaches it must come over a connection it opened itself,
        // and it opens exactly one, to register (checked below). So an
        // answered call proves the INVITE came back on the registration's
        // connection: no other way in exists (its Contact names
        // 127.0.0.1:5060, an address it does not hold). A callee with a
        // listener would answer an INVITE on a new connection or over UDP
        // just as well, and the test could not tell.
        let callee = ua("1002", TransportConfig::default()).await;
        assert_eq!(callee.local_addr(Transport::Tcp), None);
        assert_eq!(callee.local_addr(Transport::Udp), None);
        let to_lb = Flow::to(Transport::Tcp, lb.sip);
        let r = tokio::time::timeout(
            UA_LIMIT,
            callee.register(to_lb, REALM, "1002", "pw1002", 3600),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(r.status(), Some(200), "{r}\nlb: {}", lb.log());

        let caller = ua("1000", udp_on([127, 0, 0, 1])).await;
        let report = tokio::time::timeout(
            UA_LIMIT,
            caller.call(
                &format!("sip:1002@{REALM}"),
                Flow::to(Transport::Udp, lb.sip),
                Duration::ZERO,
            ),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            report,
            CallReport {
                invite_status: 200,
                bye_status: Some(200)
            },
            "lb: {}\nnode: {}",
            lb.log(),
            common::log(&node.dir.join("node.log"))
        );
        // The node answers the caller's BYE and sends its own to the
        // callee; the latter may still be on its way.
        wait_for("the callee's BYE", Duration::from_secs(10), || {
            callee.stats().byes == 1
        });
        let s = callee.stats();
        assert_eq!((s.answered, s.acked, s.byes), (1, 1, 1), "{s:?}");
        let t = callee.transports().stats();
        assert_eq!(
            (t.connections_opened, t.connections_open),
            (1, 1),
            "the callee's one connection, to the balancer: {t:?}"
        );
    });
}

#[test]
fn a_register_flood_from_one_source_is_limited_and_another_source_registers() {
    const FLOOD: usize = 40;
    let dir = test_dir("edge-register-flood");
    let node = start_node(&dir, "a1");
    // 5 REGISTERs at once per source address, then 1 per second.
    let lb = start_balancer_with(
        &dir,
        &[("a1", "A", node.sip)],
        "register_per_second = 1.0\nregister_burst = 5.0\n",
    );
    common::wait_up(&lb, &["a1"]);

    // The flood: FLOOD unauthenticated REGISTERs back to back from one
    // socket on 127.0.0.1. Each gets one answer: 401 from the node (the
    // ones the limit let through) or 429 from the balancer.
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    flood
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let me = flood.local_addr().unwrap();
    for i in 0..FLOOD {
        let reg = format!(
            "REGISTER sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKflood{i};rport\r\nMax-Forwards: 70\r\nFrom: <sip:1004@{REALM}>;tag=flood{i}\r\nTo: <sip:1004@{REALM}>\r\nCall-ID: flood-{i}\r\nCSeq: 1 REGISTER\r\nContact: <sip:1004@{me}>\r\nExpires: 60\r\nContent-Length: 0\r\n\r\n"
        );
        flood.send_to(reg.as_bytes(), lb.sip).unwrap();
    }
    // Answers come in any order (429s at once, 401s after the node).
    let mut answers = std::collections::HashMap::new();
    let start = Instant::now();
    let mut buf = [0u8; 65_536];
    while answers.len() < FLOOD {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} of {FLOOD} flood REGISTERs answered: {answers:?}",
            answers.len()
        );
        let Ok((n, _)) = flood.recv_from(&mut buf) else {
            continue;
        };
        let r = String::from_utf8_lossy(&buf[..n]).to_string();
        if let Some(id) = header(&r, "Call-ID") {
            answers.insert(id.to_string(), r.clone());
        }
    }
    let (mut limited, mut challenged) = (0, 0);
    for r in answers.values() {
        match status(r) {
            429 => {
                let after: u32 = header(r, "Retry-After")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("429 without Retry-After: {r}"));
                assert!(after >= 1, "{r}");
                limited += 1;
            }
            401 => challenged += 1,
            _ => panic!("unexpected answer to a flood REGISTER: {r}"),
        }
    }
    println!("flood of {FLOOD}: {limited} limited (429), {challenged} challenged by the node");
    assert!(limited > 0, "nothing limited");
    assert!(challenged > 0, "the burst itself was refused");

    // Another source address (127.0.0.2) registers with credentials at once.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let quiet = ua("1005", udp_on([127, 0, 0, 2])).await;
        let to_lb = Flow::to(Transport::Udp, lb.sip);
        let r = tokio::time::timeout(UA_LIMIT, quiet.register(to_lb, REALM, "1005", "pw1005", 60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), Some(200), "{r}\nlb: {}", lb.log());
    });
    wait_for("the 429s counted", Duration::from_secs(5), || {
        refused(&lb, "rate_limited") == Some(limited as f64)
    });
}

#[test]
fn a_path_token_altered_by_one_character_is_refused() {
    let dir = test_dir("edge-tampered-path");
    let node = start_node(&dir, "a1");
    // A node's position: the balancer takes requests from a configured
    // node's address for requests from that node. The real node's socket
    // belongs to its process, so the test holds the address of a second
    // configured node, "x1". It never answers the probes, so the balancer
    // keeps it down and never sends it anything but probes; what comes
    // from its address is still from a node.
    let x1 = UdpSocket::bind("127.0.0.1:0").unwrap();
    x1.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let x1_addr = x1.local_addr().unwrap();
    let lb = start_balancer(&dir, &[("a1", "A", node.sip), ("x1", "A", x1_addr)]);
    common::wait_up(&lb, &["a1"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (device, path) = rt.block_on(async {
        // The device registers over TCP and says it supports Path, so the
        // node's 200 echoes the Path it stored with the binding (RFC 3327
        // §5.3): the balancer's URI with the signed flow token.
        let device = ua("1003", TransportConfig::default()).await;
        let to_lb = Flow::to(Transport::Tcp, lb.sip);
        let mut reg = device.out_of_dialog(Method::Register, &format!("sip:{REALM}"), to_lb);
        reg.set(HeaderName::To, &format!("<sip:1003@{REALM}>"));
        let reg = reg
            .with(
                HeaderName::Contact,
                "<sip:1003@127.0.0.1:5060;transport=tcp>",
            )
            .with(HeaderName::Expires, "3600")
            .with(HeaderName::Supported, "path");
        let ok = tokio::time::timeout(UA_LIMIT, device.request_authenticated(to_lb, reg))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ok.status(), Some(200), "{ok}\nlb: {}", lb.log());
        let path = ok
            .header(HeaderName::Path)
            .unwrap_or_else(|| panic!("no Path echoed: {ok}"))
            .to_string();
        (device, path)
    });
    let start = path.find(";sz=").unwrap() + 4;
    let end = start + path[start..].find(['>', ';']).unwrap();
    let token = &path[start..end];

    let message = |route: &str, call_id: &str| {
        format!(
            "MESSAGE sip:1003@127.0.0.1:5060;transport=tcp SIP/2.0\r\nVia: SIP/2.0/UDP {x1_addr};branch=z9hG4bK{call_id};rport\r\nMax-Forwards: 70\r\nRoute: {route}\r\nFrom: <sip:1000@{REALM}>;tag=x1\r\nTo: <sip:1003@{REALM}>\r\nCall-ID: {call_id}\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
        )
    };
    // The control: with the Path as stored, a request from the node's
    // position reaches the device (on its TCP connection) and its 200
    // comes back.
    x1.send_to(message(&path, "path-intact").as_bytes(), lb.sip)
        .unwrap();
    let r = recv_response(&x1, "path-intact");
    assert_eq!(status(&r), 200, "{r}\nlb: {}", lb.log());
    assert_eq!(device.messages().len(), 1);

    // One hex digit of the token changed: the last digit of the port
    // (version, transport and family take octets 0..3, the IPv4 address
    // 3..7, the port 7..9; see balancer::token), i.e. a token naming another
    // flow. Still hex, still the right length: only the MAC can refuse it.
    let i = 2 * (3 + 4 + 2) - 1;
    let digit = token.as_bytes()[i];
    let other = if digit == b'0' { '1' } else { '0' };
    let mut forged = token.to_string();
    forged.replace_range(i..=i, &other.to_string());
    let tampered = path.replace(token, &forged);
    assert_ne!(tampered, path);
    x1.send_to(message(&tampered, "path-tampered").as_bytes(), lb.sip)
        .unwrap();
    let r = recv_response(&x1, "path-tampered");
    assert_eq!(status(&r), 403, "{r}");
    wait_for("the bad token counted", Duration::from_secs(5), || {
        refused(&lb, "bad_token") == Some(1.0)
    });
    assert_eq!(
        device.messages().len(),
        1,
        "the tampered request got through"
    );
}
