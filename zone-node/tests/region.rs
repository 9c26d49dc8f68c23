//! A region on loopback: zone A (a1, a2), zone B (b1, b2) and a witness, one
//! Raft group over QUIC. Registrations through one zone serve calls through
//! the other; the leader can be SIGKILLed and writes resume. Bounded in count
//! and time; talks to 127.0.0.1 only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::region::*;
use sip::flow::{Flow, Transport};
use testkit::net::free_port;

#[test]
fn registration_through_zone_a_serves_a_call_through_zone_b() {
    let region = Region::start("cross-zone");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        wait_ready(&region).await;
        let callee = ua("1002").await;
        let a1 = region.member("a1").sip;
        let st = register_until_ok(&callee, a1, "1002", 50).await;
        assert_eq!(st, 200, "a1 log:\n{}", region.log("a1"));
        // The binding is replicated to every switch.
        for name in ["a2", "b1", "b2"] {
            assert!(
                wait_metric(
                    region.member(name).metrics,
                    "sipzone_node_registrations",
                    1.0
                )
                .await,
                "{name} did not apply the registration"
            );
        }
        let caller = ua("1000").await;
        let b2 = Flow::to(Transport::Udp, region.member("b2").sip);
        let r = caller
            .call(&format!("sip:1002@{REALM}"), b2, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(r.invite_status, 200, "b2 log:\n{}", region.log("b2"));
        assert_eq!(r.bye_status, Some(200));
        assert_eq!(callee.stats().answered, 1);
    });
}

#[test]
fn directory_users_added_through_one_node_authenticate_on_every_node() {
    let region = Region::start("users");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_ready(&region));
    // 3000 is not among the configured users; its password never leaves
    // the operator's process, only its HA1 hashes do.
    let (ok, out) = region.operator("a1", &["user", "add", "--name", "3000"], "s3cret-3000\n");
    assert!(ok, "user add: {out}");
    let b2 = region.member("b2").sip;
    rt.block_on(async {
        let dev = ua_without_credentials("3000").await;
        let flow = Flow::to(Transport::Udp, b2);
        let mut status = 0;
        for _ in 0..50 {
            let r = dev
                .register(flow, REALM, "3000", "s3cret-3000", 600)
                .await
                .unwrap();
            status = r.status().unwrap_or(0);
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200, "b2 log:\n{}", region.log("b2"));
        let wrong = dev
            .register(flow, REALM, "3000", "guess", 600)
            .await
            .unwrap();
        assert_ne!(wrong.status(), Some(200));
    });
    let (ok, out) = region.operator("b1", &["user", "remove", "--name", "3000"], "");
    assert!(ok, "user remove: {out}");
    let a2 = region.member("a2").sip;
    rt.block_on(async {
        let dev = ua_without_credentials("3000").await;
        let mut status = 200;
        for _ in 0..50 {
            let r = dev
                .register(
                    Flow::to(Transport::Udp, a2),
                    REALM,
                    "3000",
                    "s3cret-3000",
                    600,
                )
                .await
                .unwrap();
            status = r.status().unwrap_or(0);
            if status != 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_ne!(status, 200, "a removed user still registers");
    });
    let (ok, out) = region.operator("b1", &["user", "add", "--name", "3001"], "");
    assert!(!ok, "an empty password is refused: {out}");
}

#[test]
fn leader_sigkill_writes_resume_and_nothing_acknowledged_is_lost() {
    let mut region = Region::start("leader-kill");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        wait_ready(&region).await;
        let dev = ua("1100").await;
        assert_eq!(
            register_until_ok(&dev, region.member("a1").sip, "1100", 50).await,
            200
        );
    });
    let mut leader = None;
    for _ in 0..100 {
        leader = region.leader();
        if leader.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let leader = leader.expect("one leader");
    let survivor = region
        .members
        .iter()
        .find(|m| !m.witness && m.name != leader)
        .map(|m| (m.name, m.sip, m.metrics))
        .unwrap();
    #[allow(clippy::disallowed_methods)] // the test measures, it asserts no time
    let killed_at = Instant::now();
    region.kill(leader);
    rt.block_on(async {
        let dev = ua("1101").await;
        let st = register_until_ok(&dev, survivor.1, "1101", 100).await;
        println!(
            "leader {leader} SIGKILLed: a registration through {} committed {:?} later",
            survivor.0,
            killed_at.elapsed()
        );
        assert_eq!(st, 200, "{} log:\n{}", survivor.0, region.log(survivor.0));
        // The registration acknowledged before the kill is still there.
        assert!(wait_metric(survivor.2, "sipzone_node_registrations", 2.0).await);
    });
    // The killed leader restarts over its data and catches up.
    let i = region
        .members
        .iter()
        .position(|m| m.name == leader)
        .unwrap();
    region.spawn(i);
    let m = &region.members[i];
    if !m.witness {
        let at = m.metrics;
        rt.block_on(async {
            assert!(
                wait_metric(at, "sipzone_node_registrations", 2.0).await,
                "restarted {leader} did not catch up; log:\n{}",
                region.log(leader)
            );
        });
    }
}

/// The users whose REGISTER got a 200, from a SIPp message log.
fn acknowledged_users(log: &str) -> std::collections::BTreeSet<String> {
    let mut users = std::collections::BTreeSet::new();
    for block in log.split("\n----------------------------------------------- ") {
        if !block.contains("message received") {
            continue;
        }
        let mut lines = block.lines().map(str::trim).filter(|l| !l.is_empty());
        if !lines.any(|l| l.starts_with("SIP/2.0 200")) {
            continue;
        }
        let lines: Vec<&str> = block.lines().map(str::trim).collect();
        let is_register = lines
            .iter()
            .any(|l| l.to_ascii_lowercase().starts_with("cseq:") && l.ends_with("REGISTER"));
        let to = lines
            .iter()
            .find(|l| l.to_ascii_lowercase().starts_with("to:"))
            .and_then(|l| l.split("sip:").nth(1))
            .and_then(|r| r.split('@').next());
        if let (true, Some(user)) = (is_register, to) {
            users.insert(user.to_string());
        }
    }
    users
}

#[test]
fn zone_a_sigkill_during_sipp_registrations_loses_no_acknowledged_one() {
    let mut region = Region::start("zone-a-kill");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (b1, b2) = (
        region.member("b1").clone_addrs(),
        region.member("b2").clone_addrs(),
    );
    rt.block_on(async {
        wait_ready(&region).await;
        let probe = ua("1999").await;
        assert_eq!(register_until_ok(&probe, b1.0, "1999", 50).await, 200);
    });
    let sipp = sipp_registrations(
        &region,
        "zone-a-load",
        region.member("a1").sip,
        1000,
        100,
        20,
    )
    .arg("-trace_msg")
    .arg("-message_file")
    .arg(region.dir.join("zone-a-load-messages.log").display());
    let mut load = sipp.spawn().unwrap();
    // Kill zone A once a good part of the load is acknowledged.
    rt.block_on(async {
        assert!(wait_metric_at_least(b1.1, "sipzone_node_registrations", 300.0).await);
    });
    region.kill("a1");
    region.kill("a2");
    let _ = load.wait_timeout(Duration::from_secs(90));
    let log = std::fs::read_to_string(region.dir.join("zone-a-load-messages.log")).unwrap();
    let acked = acknowledged_users(&log);
    println!(
        "zone A SIGKILLed after {} acknowledged registrations",
        acked.len()
    );
    assert!(acked.len() >= 200, "{} acknowledged", acked.len());
    rt.block_on(async {
        let checker = ua("1998").await;
        let mut missing = vec![];
        for user in &acked {
            for (name, at) in [("b1", b1.0), ("b2", b2.0)] {
                let r = checker
                    .fetch_bindings(
                        Flow::to(Transport::Udp, at),
                        REALM,
                        user,
                        &format!("pw{user}"),
                    )
                    .await
                    .unwrap();
                let has = r.status() == Some(200)
                    && r.values(sip::msg::HeaderName::Contact)
                        .any(|c| c.contains(&format!("sip:{user}@127.0.0.1")));
                if !has {
                    missing.push(format!("{user} on {name}"));
                }
            }
        }
        assert!(missing.is_empty(), "lost: {missing:?}");
        // Registrations continue on zone B.
        let dev = ua("1997").await;
        assert_eq!(register_until_ok(&dev, b2.0, "1997", 50).await, 200);
    });
}

#[test]
fn a_node_restarted_after_10000_commits_catches_up() {
    let mut region = Region::start("catch-up");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a1 = region.member("a1").sip;
    rt.block_on(async {
        wait_ready(&region).await;
        let probe = ua("1999").await;
        assert_eq!(register_until_ok(&probe, a1, "1999", 50).await, 200);
    });
    region.kill("b1");
    // A few more than 10,000, so that 10,000 commits hold even if a
    // registration or two fails under load.
    let sipp = sipp_registrations(&region, "catch-up-load", a1, 10_100, 500, 90);
    let mut load = sipp.spawn().unwrap();
    let status = load.wait_timeout(Duration::from_secs(120)).unwrap();
    let stats = sipp.stats().unwrap();
    println!("registrations while b1 was down: {stats:?} ({status})");
    assert!(
        stats.successful >= 10_000,
        "fewer than 10,000 commits: {stats:?}"
    );
    let i = region.members.iter().position(|m| m.name == "b1").unwrap();
    region.spawn(i);
    let b1 = region.member("b1").metrics;
    rt.block_on(async {
        assert!(
            wait_metric(b1, "sipzone_node_registrations", 1001.0).await,
            "b1 did not catch up; log:\n{}",
            region.log("b1")
        );
    });
    assert!(
        region.log("b1").contains("snapshot installed"),
        "b1 caught up by snapshot: the log was compacted past it"
    );
    // A new node joins as a learner, receives the state as a snapshot, and
    // is promoted to voter.
    let peers: Vec<(u64, u16, &str)> = MEMBERS
        .iter()
        .map(|m| (m.1, region.member(m.0).raft, m.2))
        .collect();
    let ports = (free_port(), free_port(), free_port());
    region.add(("a3", 6, "a", false), ports, &peers, "");
    let i = region.members.len() - 1;
    region.spawn(i);
    let (ok, out) = region.operator(
        "a1",
        &[
            "member",
            "add",
            "--id",
            "6",
            "--addr",
            &format!("127.0.0.1:{}", ports.1),
            "--zone",
            "a",
            "--learner",
        ],
        "",
    );
    assert!(ok, "member add: {out}");
    assert!(out.contains("\"learners\":[6]"), "{out}");
    let a3 = region.member("a3").metrics;
    rt.block_on(async {
        assert!(
            wait_metric(a3, "sipzone_node_registrations", 1001.0).await,
            "a3 did not receive the state; log:\n{}",
            region.log("a3")
        );
    });
    assert!(
        region.log("a3").contains("snapshot installed"),
        "{}",
        region.log("a3")
    );
    let (ok, out) = region.operator("b2", &["member", "promote", "--id", "6"], "");
    assert!(ok, "member promote: {out}");
    let reply: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mut voters: Vec<u64> = reply["Done"]["voters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    voters.sort_unstable();
    assert_eq!(voters, vec![1, 2, 3, 4, 5, 6], "{out}");
}

#[test]
fn the_calls_of_a_sigkilled_node_are_reassigned_to_live_nodes() {
    let mut region = Region::start("takeover");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a1, a1_metrics) = region.member("a1").clone_addrs();
    rt.block_on(async {
        wait_ready(&region).await;
        let callee = ua("1300").await;
        assert_eq!(
            register_until_ok(&callee, region.member("a2").sip, "1300", 50).await,
            200
        );
        let caller = ua("1301").await;
        // Calls held up while the node that set them up dies; the caller's
        // BYE later goes nowhere, which this test does not look at.
        let mut calls = vec![];
        let caller = std::sync::Arc::new(caller);
        for _ in 0..3 {
            let c = caller.clone();
            calls.push(tokio::spawn(async move {
                c.call(
                    &format!("sip:1300@{REALM}"),
                    Flow::to(Transport::Udp, a1),
                    Duration::from_secs(30),
                )
                .await
            }));
        }
        if !wait_metric(a1_metrics, "sipzone_node_owned_calls", 3.0).await {
            let active = metric(a1_metrics, "sipzone_node_active_calls");
            let owned = metric(a1_metrics, "sipzone_node_owned_calls");
            let mut results = vec![];
            for c in calls {
                results.push(c.await);
            }
            panic!("a1 owns {owned:?} calls, {active:?} active; calls: {results:?}");
        }
        std::mem::forget(callee);
        std::mem::forget(calls);
    });
    #[allow(clippy::disallowed_methods)] // the test measures, it asserts no time
    let killed_at = Instant::now();
    region.kill("a1");
    let others: Vec<(&str, SocketAddr)> = ["a2", "b1", "b2"]
        .iter()
        .map(|n| (*n, region.member(n).metrics))
        .collect();
    let mut owned = vec![];
    for _ in 0..100 {
        owned = others
            .iter()
            .map(|(n, m)| (*n, metric(*m, "sipzone_node_owned_calls").unwrap_or(0.0)))
            .collect();
        if owned.iter().map(|(_, v)| v).sum::<f64>() == 3.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "a1 SIGKILLed: its 3 calls reassigned within {:?}: {owned:?}",
        killed_at.elapsed()
    );
    assert_eq!(owned.iter().map(|(_, v)| v).sum::<f64>(), 3.0, "{owned:?}");
    assert!(
        owned.iter().all(|(_, v)| *v <= 1.0),
        "spread evenly: {owned:?}"
    );
}

/// True when this process runs as root.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs `nft` with `args`; panics with its error output on failure.
fn nft(args: &str) {
    let out = Command::new("nft").args(args.split(' ')).output().unwrap();
    assert!(
        out.status.success(),
        "nft {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The partition drill needs its own network namespace (it filters packets
/// with nftables): this test runs [`partition_in_netns`] inside
/// `unshare -n` (root, nftables and util-linux needed; without them it says
/// so and does nothing).
#[test]
fn partition_the_side_with_the_witness_keeps_writing_and_one_history_after_healing() {
    if !is_root() || !testkit::proc::have("nft") || !testkit::proc::have("unshare") {
        println!("skipped: needs root, nft and unshare (CI has them)");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "ip link set lo up && exec '{}' --exact partition_in_netns --ignored --nocapture",
        exe.display()
    );
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .env("SIPZONE_IN_NETNS", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "the partition drill failed:\n{text}");
    assert!(text.contains("1 passed"), "the drill did not run:\n{text}");
}

/// The drill itself; only meaningful inside the namespace made above.
#[test]
#[ignore = "run by the partition test inside its own network namespace"]
fn partition_in_netns() {
    assert_eq!(
        std::env::var("SIPZONE_IN_NETNS").as_deref(),
        Ok("1"),
        "run through the partition test, never in the host's namespace"
    );
    let region = Region::start("partition");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a1, b1) = (region.member("a1").sip, region.member("b1").sip);
    rt.block_on(async {
        wait_ready(&region).await;
        let probe = ua("1999").await;
        assert_eq!(register_until_ok(&probe, b1, "1999", 50).await, 200);
    });
    let ports = |names: &[&str]| {
        names
            .iter()
            .map(|n| region.member(n).raft.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (side_a, side_b) = (ports(&["a1", "a2"]), ports(&["b1", "b2", "w"]));
    nft("add table inet sipzone_partition");
    nft("add chain inet sipzone_partition out { type filter hook output priority 0 ; }");
    nft(&format!(
        "add rule inet sipzone_partition out udp sport {{ {side_a} }} udp dport {{ {side_b} }} drop"
    ));
    nft(&format!(
        "add rule inet sipzone_partition out udp sport {{ {side_b} }} udp dport {{ {side_a} }} drop"
    ));
    rt.block_on(async {
        // Zone B with the witness has the quorum: it keeps accepting writes.
        let dev_b = ua("1501").await;
        assert_eq!(
            register_until_ok(&dev_b, b1, "1501", 50).await,
            200,
            "b1 log:\n{}",
            region.log("b1")
        );
        // Zone A has none: its registration is never acknowledged.
        let dev_a = ua("1500").await;
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            dev_a.register(Flow::to(Transport::Udp, a1), REALM, "1500", "pw1500", 600),
        )
        .await;
        let status = match r {
            Ok(Ok(m)) => m.status().unwrap_or(0),
            _ => 408,
        };
        println!("zone A cut off: its REGISTER got {status}");
        assert_ne!(status, 200, "the side without quorum acknowledged a write");
    });
    nft("delete table inet sipzone_partition");
    rt.block_on(async {
        // After healing, zone A converges on zone B's history: 1501 is
        // there, 1500 is nowhere.
        for name in ["a1", "a2"] {
            assert!(
                wait_metric(
                    region.member(name).metrics,
                    "sipzone_node_registrations",
                    2.0
                )
                .await,
                "{name} did not converge; log:\n{}",
                region.log(name)
            );
        }
        let checker = ua("1998").await;
        for name in ["a1", "a2", "b1", "b2"] {
            let at = Flow::to(Transport::Udp, region.member(name).sip);
            for (user, present) in [("1501", true), ("1500", false)] {
                let r = checker
                    .fetch_bindings(at, REALM, user, &format!("pw{user}"))
                    .await
                    .unwrap();
                assert_eq!(r.status(), Some(200), "{name} {user}");
                assert_eq!(
                    r.values(sip::msg::HeaderName::Contact).next().is_some(),
                    present,
                    "{user} on {name}"
                );
            }
        }
    });
}
