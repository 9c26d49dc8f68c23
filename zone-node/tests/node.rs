//! `sipzone-node` as a process on loopback: registrations from SIPp with
//! digest auth, lockout, and bad input. Bounded in count and time; talks to
//! 127.0.0.1 only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sip::flow::{Flow, Transport};
use sip::msg::Method;
use testkit::net::{addr, free_port};
use testkit::proc::Proc;
use testkit::sipp::Sipp;
use testkit::ua::{Ua, UaConfig};

const REALM: &str = "sipzone.local";

struct Node {
    _proc: Proc,
    sip: SocketAddr,
    metrics: SocketAddr,
    dir: PathBuf,
}

/// The value of the first sample of `name` on the node's `/metrics`.
fn metric(node: &Node, name: &str) -> Option<f64> {
    common::region::metric(node.metrics, name)
}

/// Starts a node with the local-testing users on free ports and waits until
/// it answers OPTIONS.
fn start_node(name: &str) -> Node {
    start_node_with(name, "")
}

/// Like [`start_node`], with `extra` TOML appended to the config. The free
/// ports are picked before the node binds them, so another test may take one
/// in between: the node then exits at start and is tried again on new ports.
fn start_node_with(name: &str, extra: &str) -> Node {
    for _ in 0..5 {
        if let Some(node) = try_start_node(name, extra) {
            return node;
        }
    }
    panic!("sipzone-node did not start in 5 tries");
}

/// One start; `None` when the node exited before answering (a port taken).
fn try_start_node(name: &str, extra: &str) -> Option<Node> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("node")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (sip, tls, metrics) = (free_port(), free_port(), free_port());
    let cfg = format!(
        r#"
[node]
id = "t1"
data_dir = "data"
[sip]
udp = ["127.0.0.1:{sip}"]
tcp = ["127.0.0.1:{sip}"]
tls = ["127.0.0.1:{tls}"]
[auth]
realm = "{REALM}"
secret_file = "data/secret"
algorithms = ["MD5", "SHA-256"]
lockout_max_failures = 3
[metrics]
listen = "127.0.0.1:{metrics}"
[log]
format = "text"
level = "warn"
[danger_test_users]
first = 1000
last = 1999
password_prefix = "pw"
{extra}
"#
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut p = Proc::spawn(
        "sipzone-node",
        Command::new(env!("CARGO_BIN_EXE_sipzone-node"))
            .arg("--config")
            .arg(&path),
        &dir.join("node.log"),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(async {
        let ua = ua().await;
        let flow = Flow::to(Transport::Udp, addr(sip));
        for _ in 0..100 {
            if !p.is_running() {
                return false;
            }
            let req = ua.out_of_dialog(Method::Options, &format!("sip:{REALM}"), flow);
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_millis(600), ua.request(flow, req)).await
                && r.status() == Some(200)
            {
                return true;
            }
        }
        panic!("sipzone-node does not answer OPTIONS; log:\n{}", log(&dir));
    });
    up.then_some(Node {
        _proc: p,
        sip: addr(sip),
        metrics: addr(metrics),
        dir,
    })
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
}

/// A UA that calls as user 1000 (answering 407 with its credentials).
async fn ua() -> Ua {
    Ua::start(UaConfig {
        transport: sip::transport::TransportConfig {
            udp: vec![addr(0)],
            tcp: vec![addr(0)],
            ..Default::default()
        },
        ..UaConfig::local_user("1000")
    })
    .await
    .unwrap()
}

/// Registers the SIPp UAS listening on `uas_port` as user 1001 (a
/// third-party registration by user 1000's UA).
fn register_sipp_uas_as_1001(node: &Node, uas_port: u16) {
    let status =
        testkit::ua::register_contact_blocking(node.sip, REALM, "1001", addr(uas_port)).unwrap();
    assert_eq!(status, 200);
}

#[test]
fn sipp_registers_1000_users_with_digest_auth() {
    let node = start_node("register-1000");
    let users = node.dir.join("users.csv");
    testkit::sipp::write_test_users(&users).unwrap();
    let sipp = Sipp::scenario_file("register_auth.xml", &node.dir, "register")
        .unwrap()
        .arg("-inf")
        .arg(users.display())
        .arg("-key")
        .arg("domain")
        .arg(REALM)
        .arg("-r")
        .arg(200)
        .arg("-timeout")
        .arg("60s")
        .arg("-timeout_error")
        .local(addr(free_port()))
        .calls(1000)
        .remote(node.sip);
    let (code, stats) = sipp.run(Duration::from_secs(120)).unwrap();
    println!("register-1000: exit {code}, {stats:?}");
    assert_eq!(
        (code, stats.successful, stats.failed),
        (0, 1000, 0),
        "sipp log: {}",
        std::fs::read_to_string(sipp.log_path()).unwrap_or_default()
    );
}

#[test]
fn wrong_passwords_lock_the_user_out_while_others_register() {
    let node = start_node("lockout");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ua = ua().await;
        let flow = Flow::to(Transport::Udp, node.sip);
        // lockout_max_failures = 3: two wrong answers are challenged again,
        // the third starts the lockout
        for _ in 0..2 {
            let r = ua
                .register(flow, REALM, "1500", "wrong", 600)
                .await
                .unwrap();
            assert_eq!(r.status(), Some(401), "{r}");
        }
        let r = ua
            .register(flow, REALM, "1500", "wrong", 600)
            .await
            .unwrap();
        assert_eq!(r.status(), Some(429), "{r}");
        // the source stays locked out: 429 with Retry-After, whatever it sends
        let r = ua
            .register(flow, REALM, "1500", "pw1500", 600)
            .await
            .unwrap();
        assert_eq!(r.status(), Some(429), "{r}");
        assert!(r.header(sip::msg::HeaderName::RetryAfter).is_some());
        // and so is the user, from any source: 403, even with its password
        // (UDP from 127.0.0.2: outgoing TCP would leave from 127.0.0.1)
        let other = ua_other_source().await;
        let udp = Flow::to(Transport::Udp, node.sip);
        let r = other
            .register(udp, REALM, "1500", "pw1500", 600)
            .await
            .unwrap();
        assert_eq!(r.status(), Some(403), "{r}");
        // another user from another source still registers
        let r = other
            .register(udp, REALM, "1501", "pw1501", 600)
            .await
            .unwrap();
        assert_eq!(r.status(), Some(200), "{r}");
    });
}

async fn ua_other_source() -> Ua {
    Ua::start(UaConfig {
        transport: sip::transport::TransportConfig {
            udp: vec![SocketAddr::from(([127, 0, 0, 2], 0))],
            ..Default::default()
        },
        ..UaConfig::default()
    })
    .await
    .unwrap()
}

#[test]
fn bad_input_gets_4xx_or_is_dropped_and_the_node_keeps_serving() {
    let node = start_node("bad-input");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = udp.local_addr().unwrap();
    // a malformed request (CSeq method differs from the request's) gets 400
    let bad = format!(
        "OPTIONS sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKbad1\r\nFrom: <sip:a@{REALM}>;tag=1\r\nTo: <sip:{REALM}>\r\nCall-ID: bad1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    );
    udp.send_to(bad.as_bytes(), node.sip).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"SIP/2.0 400"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // garbage is dropped (no answer) ...
    udp.send_to(b"\x00\x01garbage\xff\r\n\r\n", node.sip)
        .unwrap();
    // ... and a 10 MB message over TCP is refused and the connection closed
    let mut tcp = TcpStream::connect(node.sip).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "OPTIONS sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bKbig\r\nFrom: <sip:a@{REALM}>;tag=1\r\nTo: <sip:{REALM}>\r\nCall-ID: big\r\nCSeq: 1 OPTIONS\r\nContent-Length: 10485760\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b'x'; 65536];
    for _ in 0..160 {
        if tcp.write_all(&chunk).is_err() {
            break; // closed by the node: refused
        }
    }
    let mut resp = Vec::new();
    let _ = tcp.read_to_end(&mut resp);
    assert!(
        resp.starts_with(b"SIP/2.0 513"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    // the node still answers, and the garbage was counted as dropped
    let ok = format!(
        "OPTIONS sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKok1\r\nMax-Forwards: 70\r\nFrom: <sip:a@{REALM}>;tag=1\r\nTo: <sip:{REALM}>\r\nCall-ID: ok1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    udp.send_to(ok.as_bytes(), node.sip).unwrap();
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"SIP/2.0 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // the garbage datagram was read before this OPTIONS on the same socket
    let dropped = metric(&node, "sip_transport_dropped_total").unwrap_or(0.0);
    assert!(dropped >= 1.0, "garbage not counted: {dropped}");
}

/// A SIPp UAS registered (by the test UA, as a third party) as user 1001
/// receives 1,000 calls that a SIPp UAC places through the node's B2BUA.
#[test]
fn sipp_uac_calls_registered_sipp_uas_1000_times_through_the_b2bua() {
    let node = start_node("calls-1000");
    let uas_port = free_port();
    let uas = Sipp::builtin("uas", &node.dir, "uas")
        .unwrap()
        .local(addr(uas_port))
        .calls(1000)
        .arg("-timeout")
        .arg("120s")
        .arg("-timeout_error");
    let mut uas_proc = uas.spawn().unwrap();
    register_sipp_uas_as_1001(&node, uas_port);
    // every caller authenticates (407, then Proxy-Authorization as user 1000)
    let uac = Sipp::scenario_file("uac_auth.xml", &node.dir, "uac")
        .unwrap()
        .local(addr(free_port()))
        .calls(1000)
        .arg("-s")
        .arg("1001")
        .arg("-key")
        .arg("caller")
        .arg("1000")
        .arg("-key")
        .arg("domain")
        .arg(REALM)
        .arg("-au")
        .arg("1000")
        .arg("-ap")
        .arg("pw1000")
        .arg("-r")
        .arg(100)
        .arg("-d")
        .arg(100)
        .arg("-timeout")
        .arg("120s")
        .arg("-timeout_error")
        .remote(node.sip);
    let (code, stats) = uac.run(Duration::from_secs(180)).unwrap();
    let uas_status = uas_proc.wait_timeout(Duration::from_secs(30)).unwrap();
    let uas_stats = uas.stats().unwrap();
    println!("calls-1000: uac exit {code} {stats:?}; uas {uas_status} {uas_stats:?}");
    assert_eq!(
        (code, stats.successful, stats.failed),
        (0, 1000, 0),
        "uac log: {}\nnode log: {}",
        std::fs::read_to_string(uac.log_path()).unwrap_or_default(),
        log(&node.dir)
    );
    assert_eq!((uas_stats.successful, uas_stats.failed), (1000, 0));
    // the B2BUA's responses are counted like the registrar's
    let ok = metric(
        &node,
        r#"sipzone_node_responses_total{method="INVITE",code="200"}"#,
    );
    assert_eq!(ok, Some(1000.0));
}

#[test]
fn a_caller_without_credentials_gets_407() {
    let node = start_node("no-credentials");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let anonymous = ua_other_source().await;
        let flow = Flow::to(Transport::Udp, node.sip);
        let r = anonymous
            .call(&format!("sip:1001@{REALM}"), flow, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(r.invite_status, 407);
    });
}

#[test]
fn a_call_to_an_unregistered_user_gets_480() {
    let node = start_node("unregistered");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ua = ua().await;
        let flow = Flow::to(Transport::Udp, node.sip);
        let r = ua
            .call(&format!("sip:1999@{REALM}"), flow, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(r.invite_status, 480);
    });
}

/// The caller CANCELs while the callee rings: 487 to the caller, and the
/// ringing callee's INVITE is cancelled too.
#[test]
fn cancel_before_answer_gives_487() {
    let node = start_node("cancel");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let flow = Flow::to(Transport::Udp, node.sip);
        // the callee rings for a long time and never answers in this test
        let callee = Ua::start(UaConfig {
            transport: sip::transport::TransportConfig {
                udp: vec![addr(0)],
                ..Default::default()
            },
            answer: testkit::ua::Answer::Accept {
                ring: Duration::from_secs(3600),
            },
            user: "1002".into(),
            ..UaConfig::default()
        })
        .await
        .unwrap();
        let r = callee
            .register(flow, REALM, "1002", "pw1002", 600)
            .await
            .unwrap();
        assert_eq!(r.status(), Some(200), "{r}");
        let caller = ua().await;
        let status = caller
            .call_and_cancel(&format!("sip:1002@{REALM}"), flow)
            .await
            .unwrap();
        assert_eq!(status, 487);
    });
}

/// A number that is not a local user: 404 without an outbound route; with
/// one, the call goes to the next hop (here a test UA standing in for a
/// carrier) and completes there.
#[test]
fn calls_to_other_numbers_take_the_outbound_route_or_get_404() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = start_node("no-outbound");
    rt.block_on(async {
        let caller = ua().await;
        let flow = Flow::to(Transport::Udp, node.sip);
        let r = caller
            .call(&format!("sip:15551234567@{REALM}"), flow, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(r.invite_status, 404);
    });
    drop(node);
    let carrier = rt.block_on(async {
        Ua::start(UaConfig {
            transport: sip::transport::TransportConfig {
                udp: vec![addr(0)],
                ..Default::default()
            },
            user: "carrier".into(),
            ..UaConfig::default()
        })
        .await
        .unwrap()
    });
    let hop = carrier.local_addr(Transport::Udp).unwrap();
    let node = start_node_with(
        "outbound",
        &format!("[outbound]\nnext_hop = \"{hop}\"\ntransport = \"udp\"\n"),
    );
    rt.block_on(async {
        let caller = ua().await;
        let flow = Flow::to(Transport::Udp, node.sip);
        let r = caller
            .call(
                &format!("sip:15551234567@{REALM}"),
                flow,
                Duration::from_millis(50),
            )
            .await
            .unwrap();
        assert_eq!((r.invite_status, r.bye_status), (200, Some(200)));
        // the node answers the caller's BYE and sends its own to the
        // carrier; wait (bounded) for that one to arrive
        for _ in 0..500 {
            if carrier.stats().byes == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s = carrier.stats();
        assert_eq!((s.answered, s.byes), (1, 1));
    });
}

/// RFC 3262 and RFC 4028 through the B2BUA between two SIPp processes: the
/// caller offers 100rel and a session timer, the callee (registered as
/// 1001) requires 100rel and checks the PRACK's RAck is mapped to its own
/// RSeq and that the core asks to refresh its leg; the caller checks the
/// reliable 183 and that the core refreshes its leg (refresher=uas).
#[test]
fn sipp_prack_and_session_timer_pass_through_the_b2bua() {
    let node = start_node("prack");
    let sipp_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sipp");
    let uas_port = free_port();
    let uas = Sipp::scenario_path(&sipp_dir.join("uas_100rel.xml"), &node.dir, "uas")
        .unwrap()
        .local(addr(uas_port))
        .calls(5)
        .arg("-timeout")
        .arg("60s")
        .arg("-timeout_error");
    let mut uas_proc = uas.spawn().unwrap();
    register_sipp_uas_as_1001(&node, uas_port);
    let uac = Sipp::scenario_path(&sipp_dir.join("uac_100rel.xml"), &node.dir, "uac")
        .unwrap()
        .local(addr(free_port()))
        .calls(5)
        .arg("-s")
        .arg("1001")
        .arg("-key")
        .arg("caller")
        .arg("1000")
        .arg("-key")
        .arg("domain")
        .arg(REALM)
        .arg("-au")
        .arg("1000")
        .arg("-ap")
        .arg("pw1000")
        .arg("-r")
        .arg(5)
        .arg("-d")
        .arg(100)
        .arg("-timeout")
        .arg("60s")
        .arg("-timeout_error")
        .remote(node.sip);
    let (code, stats) = uac.run(Duration::from_secs(90)).unwrap();
    let uas_status = uas_proc.wait_timeout(Duration::from_secs(30)).unwrap();
    let uas_stats = uas.stats().unwrap();
    println!("prack: uac exit {code} {stats:?}; uas {uas_status} {uas_stats:?}");
    assert_eq!(
        (code, stats.successful, stats.failed),
        (0, 5, 0),
        "uac log: {}\nuas log: {}\nnode log: {}",
        std::fs::read_to_string(uac.log_path()).unwrap_or_default(),
        std::fs::read_to_string(uas.log_path()).unwrap_or_default(),
        log(&node.dir)
    );
    assert_eq!((uas_stats.successful, uas_stats.failed), (5, 0));
}

/// RFC 3428 pager mode: an authenticated MESSAGE reaches every binding of
/// the callee with its body and Content-Type, and the 200 comes back;
/// 480 when the callee has no binding, 404 for a user the node does not
/// know, 407 without credentials.
#[test]
fn message_reaches_every_binding_of_a_registered_user() {
    let node = start_node("message");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let flow = Flow::to(Transport::Udp, node.sip);
        let mut callees = Vec::new();
        for _ in 0..2 {
            let callee = Ua::start(UaConfig {
                transport: sip::transport::TransportConfig {
                    udp: vec![addr(0)],
                    ..Default::default()
                },
                user: "1003".into(),
                ..UaConfig::default()
            })
            .await
            .unwrap();
            let r = callee
                .register(flow, REALM, "1003", "pw1003", 600)
                .await
                .unwrap();
            assert_eq!(r.status(), Some(200), "{r}");
            callees.push(callee);
        }
        let caller = ua().await;
        let message = |to: &str| {
            caller
                .out_of_dialog(Method::Message, &format!("sip:{to}@{REALM}"), flow)
                .with_body("text/plain;charset=utf-8", "hello, 1003")
        };
        let r = caller
            .request_authenticated(flow, message("1003"))
            .await
            .unwrap();
        assert_eq!(r.status(), Some(200), "{r}");
        // both bindings got it (the second answer may still be in flight)
        for callee in &callees {
            for _ in 0..500 {
                if callee.stats().messages == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let got = callee.messages();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].body().as_ref(), b"hello, 1003");
            assert_eq!(
                got[0].header(sip::msg::HeaderName::ContentType),
                Some("text/plain;charset=utf-8")
            );
        }
        let r = caller
            .request_authenticated(flow, message("1998"))
            .await
            .unwrap();
        assert_eq!(r.status(), Some(480), "{r}");
        let r = caller
            .request_authenticated(flow, message("15551234567"))
            .await
            .unwrap();
        assert_eq!(r.status(), Some(404), "{r}");
        let anonymous = ua_other_source().await;
        let m = anonymous
            .out_of_dialog(Method::Message, &format!("sip:1003@{REALM}"), flow)
            .with_body("text/plain", "hi");
        let r = anonymous.request(flow, m).await.unwrap();
        assert_eq!(r.status(), Some(407), "{r}");
    });
}
