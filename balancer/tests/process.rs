//! `sipzone-balancer` as a process on loopback in front of two
//! `sipzone-node` processes (single, in-memory; "a1" in zone A, "b1" in zone
//! B), driven by SIPp and raw sockets. Bounded in count and time; talks to
//! 127.0.0.1 only.
//!
//! Setup (finding `sipzone-node`, configs, metrics) is in `common`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// A process test measures real elapsed time on a bounded poll.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{Node, REALM, log, metric, node_up, start_balancer, start_node, wait_for};
use testkit::net::{addr, free_port};
use testkit::sipp::Sipp;

fn invites_ok(n: &Node) -> f64 {
    metric(
        n.metrics,
        r#"sipzone_node_responses_total{method="INVITE",code="200"}"#,
    )
    .unwrap_or(0.0)
}

/// Registers the SIPp UAS on `uas_port` as user 1001 directly on `node`
/// (a third-party registration by the test UA). The in-memory nodes do not
/// share registrations, so the callee is registered on both; the calls
/// themselves go through the balancer.
fn register_contact(node: &Node, uas_port: u16) {
    let status =
        testkit::ua::register_contact_blocking(node.sip, REALM, "1001", addr(uas_port)).unwrap();
    assert_eq!(status, 200);
}

#[test]
fn calls_and_registrations_through_the_balancer_spread_over_both_zones() {
    let dir = common::test_dir("balancer-process");
    let mut a1 = start_node(&dir, "a1");
    let b1 = start_node(&dir, "b1");
    let lb = start_balancer(&dir, &[("a1", "A", a1.sip), ("b1", "B", b1.sip)]);
    wait_for(
        "both nodes up at the balancer",
        Duration::from_secs(20),
        || node_up(&lb, "a1") == Some(1.0) && node_up(&lb, "b1") == Some(1.0),
    );

    // 1. 1,000 registrations with digest auth through the balancer
    let users = dir.join("users.csv");
    testkit::sipp::write_test_users(&users).unwrap();
    let reg = Sipp::scenario_file("register_auth.xml", &dir, "register")
        .unwrap()
        .arg("-inf")
        .arg(users.display())
        .arg("-key")
        .arg("domain")
        .arg(REALM)
        // SIPp's default digest uri is the remote address (the balancer's),
        // which the node does not take for its own name: use the
        // Request-URI's
        .arg("-auth_uri")
        .arg(REALM)
        .arg("-r")
        .arg(200)
        .arg("-timeout")
        .arg("60s")
        .arg("-timeout_error")
        .local(addr(free_port()))
        .calls(1000)
        .remote(lb.sip);
    let (code, stats) = reg.run(Duration::from_secs(90)).unwrap();
    let (ra, rb) = (
        metric(a1.metrics, "sipzone_node_registrations").unwrap_or(0.0),
        metric(b1.metrics, "sipzone_node_registrations").unwrap_or(0.0),
    );
    println!("registrations: exit {code}, {stats:?}; per node a1 {ra} b1 {rb}");
    assert_eq!(
        (code, stats.successful, stats.failed),
        (0, 1000, 0),
        "sipp: {}\nlb: {}",
        log(&reg.log_path()),
        lb.log()
    );
    assert!(ra >= 400.0 && rb >= 400.0, "split a1 {ra} b1 {rb}");

    // 2. calls: the callee (a SIPp UAS as user 1001) is registered on both
    // nodes; 1,000 calls through the balancer
    let uas_port = free_port();
    let uas = Sipp::builtin("uas", &dir, "uas")
        .unwrap()
        .local(addr(uas_port))
        .arg("-timeout")
        .arg("120s");
    let mut uas_proc = uas.spawn().unwrap();
    register_contact(&a1, uas_port);
    register_contact(&b1, uas_port);
    let calls = |name: &str, n: u64| {
        let uac = Sipp::scenario_file("uac_auth.xml", &dir, name)
            .unwrap()
            .local(addr(free_port()))
            .calls(n)
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
            .arg("-auth_uri")
            .arg(format!("1001@{}", lb.sip))
            .arg("-r")
            .arg(100)
            .arg("-d")
            .arg(100)
            .arg("-timeout")
            .arg("120s")
            .arg("-timeout_error")
            .remote(lb.sip);
        let r = uac.run(Duration::from_secs(180)).unwrap();
        (r, log(&uac.log_path()))
    };
    let ((code, stats), uac_log) = calls("uac", 1000);
    let (ca, cb) = (invites_ok(&a1), invites_ok(&b1));
    println!(
        "calls: exit {code}, {stats:?}; per node a1 {ca} b1 {cb} ({:.1} % / {:.1} %)",
        100.0 * ca / (ca + cb),
        100.0 * cb / (ca + cb)
    );
    // A challenged INVITE's retry may reach another node than the
    // challenge came from (the pick follows the nodes' load); the nodes
    // share the nonce secret (common::NONCE_SECRET), so it is answered like
    // any other. The challenges per node show how many moved.
    let challenges = |n: &Node| {
        metric(
            n.metrics,
            r#"sipzone_node_responses_total{method="INVITE",code="407"}"#,
        )
        .unwrap_or(0.0)
    };
    println!(
        "challenges (407): a1 {} b1 {}",
        challenges(&a1),
        challenges(&b1)
    );
    assert_eq!(
        (code, stats.successful, stats.failed),
        (0, 1000, 0),
        "{uac_log}\nlb: {}",
        lb.log()
    );
    assert_eq!(ca + cb, 1000.0, "every INVITE answered 200 by a node");
    assert!((400.0..=600.0).contains(&ca), "split a1 {ca} b1 {cb}");

    // 3. a forged Record-Route token gets 403
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = udp.local_addr().unwrap();
    let forged = "0100".to_string() + &"ab".repeat(30);
    let bye = format!(
        "BYE sip:a1@{} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKforged1;rport\r\nMax-Forwards: 70\r\nRoute: <sip:{};transport=udp;lr;sz={forged}>\r\nFrom: <sip:1000@{REALM}>;tag=f1\r\nTo: <sip:1001@{REALM}>;tag=t1\r\nCall-ID: forged-1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        a1.sip, lb.sip
    );
    udp.send_to(bye.as_bytes(), lb.sip).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("SIP/2.0 403"), "{text}");
    wait_for("the bad token counted", Duration::from_secs(5), || {
        common::refused(&lb, "bad_token") == Some(1.0)
    });

    // 4. a1 dies: the balancer marks it down and new calls go to b1
    let killed_at = Instant::now();
    drop(a1.proc.take());
    wait_for("a1 down at the balancer", Duration::from_secs(10), || {
        node_up(&lb, "a1") == Some(0.0)
    });
    // metrics are exported once a second: the detection is at most that late
    println!(
        "a1 seen down {:?} after the kill (metrics refresh 1 s)",
        killed_at.elapsed()
    );
    let before_b = invites_ok(&b1);
    let ((code, stats), uac_log) = calls("uac-after-kill", 200);
    let after_b = invites_ok(&b1);
    println!(
        "after the kill: exit {code}, {stats:?}; b1 answered {}",
        after_b - before_b
    );
    assert_eq!(
        (code, stats.successful, stats.failed),
        (0, 200, 0),
        "{uac_log}"
    );
    assert_eq!(after_b - before_b, 200.0);
    let _ = uas_proc.wait_timeout(Duration::from_millis(10));
}
