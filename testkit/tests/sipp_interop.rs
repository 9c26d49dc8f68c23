//! Interop of the project's SIP stack with SIPp (Debian `sip-tester`): the
//! stack's UAS (`sipzone-uas`) answers 1,000 calls from `sipp -sn uac`, and
//! the stack's UAC (`sipzone-uac`) places 1,000 calls to `sipp -sn uas`, over
//! UDP, TCP and TLS, and over UDP with SIPp losing 10 % of messages
//! (`-lost 10`), which exercises retransmissions on both sides.
//!
//! Debian's SIPp has no TLS, so TLS runs through stunnel (OpenSSL): SIPp's
//! TCP enters a client-mode tunnel that speaks TLS to `sipzone-uas`, and
//! `sipzone-uac`'s TLS ends in a server-mode tunnel in front of SIPp.
//!
//! Every run is bounded (SIPp `-m`, a wall-clock limit on each process) and
//! talks to 127.0.0.1 only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sip::flow::{Flow, Transport};
use sip::msg::Method;
use testkit::net::{addr, free_port};
use testkit::pki::Ca;
use testkit::proc::Proc;
use testkit::sipp::{Sipp, SippTransport};
use testkit::stunnel::{self, Mode};
use testkit::ua::{Ua, UaConfig};

const CALLS: u64 = 1000;
const LIMIT: Duration = Duration::from_secs(240);

fn work_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("sipp")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Waits (bounded) until something accepts TCP connections on `a`.
fn wait_tcp(a: SocketAddr) {
    for _ in 0..200 {
        if TcpStream::connect_timeout(&a, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listening on {a}");
}

/// Waits (bounded) until a UDP socket is bound to `port` (per /proc/net/udp).
fn wait_udp_bound(port: u16) {
    let needle = format!(":{port:04X} ");
    for _ in 0..200 {
        let t = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
        if t.lines().any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| format!("{a} ").contains(&needle))
        }) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("no UDP socket on port {port}");
}

/// A running `sipzone-uas` and its ports.
struct Uas {
    _proc: Proc,
    port: u16,
    tls_port: u16,
}

/// Starts `sipzone-uas` on free ports (UDP+TCP, and TLS with `tls`) and waits
/// until it answers OPTIONS. The ports are picked before the UAS binds them,
/// so another test may take one in between: the UAS then exits at start and
/// is tried again on new ports.
fn start_uas(dir: &std::path::Path, tls: Option<&testkit::pki::LeafFiles>) -> Uas {
    for _ in 0..5 {
        let (port, tls_port) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sipzone-uas"));
        cmd.arg("--listen").arg(addr(port).to_string());
        if let Some(leaf) = tls {
            cmd.arg("--tls-listen")
                .arg(addr(tls_port).to_string())
                .arg("--cert")
                .arg(&leaf.cert)
                .arg("--key")
                .arg(&leaf.key);
        }
        let mut p = Proc::spawn("sipzone-uas", &mut cmd, &dir.join("uas.log")).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let up = rt.block_on(async {
            let ua = Ua::start(UaConfig {
                transport: sip::transport::TransportConfig {
                    udp: vec![addr(0)],
                    ..Default::default()
                },
                ..UaConfig::default()
            })
            .await
            .unwrap();
            let flow = Flow::to(Transport::Udp, addr(port));
            for _ in 0..100 {
                if !p.is_running() {
                    return false;
                }
                let req =
                    ua.out_of_dialog(Method::Options, &format!("sip:uas@{}", addr(port)), flow);
                if let Ok(Ok(r)) =
                    tokio::time::timeout(Duration::from_millis(600), ua.request(flow, req)).await
                    && r.status() == Some(200)
                {
                    return true;
                }
            }
            panic!("sipzone-uas does not answer OPTIONS");
        });
        if up {
            return Uas {
                _proc: p,
                port,
                tls_port,
            };
        }
    }
    panic!("sipzone-uas did not start in 5 tries");
}

fn assert_sipp(dir: &std::path::Path, sipp: &Sipp, code: i32, stats: &testkit::sipp::SippStats) {
    let log = std::fs::read_to_string(sipp.log_path()).unwrap_or_default();
    let uas_log = std::fs::read_to_string(dir.join("uas.log")).unwrap_or_default();
    println!("{}: exit {code}, {stats:?}", dir.display());
    assert_eq!(
        (code, stats.successful, stats.failed),
        (0, CALLS, 0),
        "SIPp did not complete every call\nsipp log tail:\n{}\nuas log tail:\n{}",
        tail(&log),
        tail(&uas_log)
    );
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `sipp -sn uac` placing [`CALLS`] calls to `remote` at `rate` per second
/// (100 ms hold), with `-lost 10` when `lost`.
fn sipp_uac(
    dir: &std::path::Path,
    transport: SippTransport,
    rate: u64,
    lost: bool,
    remote: SocketAddr,
) -> Sipp {
    let mut sipp = Sipp::builtin("uac", dir, "uac")
        .unwrap()
        .transport(transport)
        .local(addr(free_port()))
        .calls(CALLS)
        .arg("-r")
        .arg(rate)
        .arg("-d")
        .arg(100)
        .arg("-timeout")
        .arg("200s")
        .arg("-timeout_error");
    if lost {
        sipp = sipp.arg("-lost").arg(10);
    }
    sipp.remote(remote)
}

/// `sipp -sn uac` calls `sipzone-uas`.
fn sipp_calls_uas(name: &str, transport: SippTransport, lost: bool, rate: u64) {
    let dir = work_dir(name);
    let uas = start_uas(&dir, None);
    let sipp = sipp_uac(&dir, transport, rate, lost, addr(uas.port));
    let (code, stats) = sipp.run(LIMIT).unwrap();
    assert_sipp(&dir, &sipp, code, &stats);
}

/// Runs `sipzone-uac` ([`CALLS`] calls at `rate`) through `next_hop` with
/// `extra` arguments while `sipp` (already started as `sipp_proc`) answers,
/// and checks both sides completed every call.
fn run_stack_uac(
    name: &str,
    dir: &std::path::Path,
    sipp: &Sipp,
    mut sipp_proc: Proc,
    next_hop: SocketAddr,
    rate: u64,
    extra: &[&std::ffi::OsStr],
) {
    let out = Command::new(env!("CARGO_BIN_EXE_sipzone-uac"))
        .args(["--target", &format!("sip:service@{next_hop}")])
        .args(["--next-hop", &next_hop.to_string()])
        .args(["--calls", &CALLS.to_string(), "--rate", &rate.to_string()])
        .args(["--timeout-s", "200"])
        .args(extra)
        .output()
        .unwrap();
    let uac_out =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let status = sipp_proc.wait_timeout(Duration::from_secs(30)).unwrap();
    let stats = sipp.stats().unwrap();
    println!("{name}: uac: {}", uac_out.lines().last().unwrap_or(""));
    assert!(
        out.status.success(),
        "sipzone-uac failed:\n{}",
        tail(&uac_out)
    );
    assert_sipp(dir, sipp, status.code().unwrap_or(-1), &stats);
}

/// `sipzone-uac` calls `sipp -sn uas`.
fn uac_calls_sipp(name: &str, transport: SippTransport, lost: bool, rate: u64) {
    let dir = work_dir(name);
    let port = free_port();
    // SIPp's built-in uas with -lost 10 aborts calls on a legal INVITE
    // retransmission; the lossy run uses the same scenario with per-message
    // loss (see scenarios/uas_lossy.xml).
    let sipp = if lost {
        Sipp::scenario_file("uas_lossy.xml", &dir, "uas")
    } else {
        Sipp::builtin("uas", &dir, "uas")
    };
    let sipp = sipp
        .unwrap()
        .transport(transport)
        .local(addr(port))
        .calls(CALLS)
        .arg("-timeout")
        .arg("200s")
        .arg("-timeout_error");
    let sipp_proc = sipp.spawn().unwrap();
    let t = match transport {
        SippTransport::Udp => {
            wait_udp_bound(port);
            "udp"
        }
        SippTransport::Tcp => {
            wait_tcp(addr(port));
            "tcp"
        }
    };
    run_stack_uac(
        name,
        &dir,
        &sipp,
        sipp_proc,
        addr(port),
        rate,
        &["--transport".as_ref(), t.as_ref()],
    );
}

#[test]
fn sipp_uac_to_stack_uas_udp() {
    sipp_calls_uas("uas-udp", SippTransport::Udp, false, 200);
}

#[test]
fn sipp_uac_to_stack_uas_tcp() {
    sipp_calls_uas("uas-tcp", SippTransport::Tcp, false, 200);
}

#[test]
fn sipp_uac_to_stack_uas_udp_lost_10_percent() {
    sipp_calls_uas("uas-udp-lost", SippTransport::Udp, true, 100);
}

#[test]
fn stack_uac_to_sipp_uas_udp() {
    uac_calls_sipp("uac-udp", SippTransport::Udp, false, 200);
}

#[test]
fn stack_uac_to_sipp_uas_tcp() {
    uac_calls_sipp("uac-tcp", SippTransport::Tcp, false, 200);
}

#[test]
fn stack_uac_to_sipp_uas_udp_lost_10_percent() {
    uac_calls_sipp("uac-udp-lost", SippTransport::Udp, true, 100);
}

/// SIPp (TCP) → stunnel client (TLS) → `sipzone-uas` TLS listener.
#[test]
fn sipp_uac_to_stack_uas_tls_via_stunnel() {
    let dir = work_dir("uas-tls");
    let ca = Ca::new("interop CA").unwrap();
    let ca_file = ca.write_ca(&dir).unwrap();
    let leaf = ca
        .issue(&["127.0.0.1", "localhost"])
        .unwrap()
        .write(&dir, "uas")
        .unwrap();
    let uas = start_uas(&dir, Some(&leaf));
    let (tls_port, tunnel_port) = (uas.tls_port, free_port());
    let _tunnel = stunnel::start(
        &dir,
        "to-uas",
        &Mode::Client { ca: ca_file },
        addr(tunnel_port),
        addr(tls_port),
    )
    .unwrap();
    wait_tcp(addr(tunnel_port));
    let sipp = sipp_uac(&dir, SippTransport::Tcp, 200, false, addr(tunnel_port));
    let (code, stats) = sipp.run(LIMIT).unwrap();
    assert_sipp(&dir, &sipp, code, &stats);
}

/// `sipzone-uac` TLS → stunnel server → SIPp uas (TCP).
#[test]
fn stack_uac_to_sipp_uas_tls_via_stunnel() {
    let dir = work_dir("uac-tls");
    let ca = Ca::new("interop CA").unwrap();
    let ca_file = ca.write_ca(&dir).unwrap();
    let leaf = ca
        .issue(&["127.0.0.1", "localhost"])
        .unwrap()
        .write(&dir, "tunnel")
        .unwrap();
    let (sipp_port, tunnel_port) = (free_port(), free_port());
    let sipp = Sipp::builtin("uas", &dir, "uas")
        .unwrap()
        .transport(SippTransport::Tcp)
        .local(addr(sipp_port))
        .calls(CALLS)
        .arg("-timeout")
        .arg("200s")
        .arg("-timeout_error");
    let sipp_proc = sipp.spawn().unwrap();
    wait_tcp(addr(sipp_port));
    let _tunnel = stunnel::start(
        &dir,
        "to-sipp",
        &Mode::Server { leaf },
        addr(tunnel_port),
        addr(sipp_port),
    )
    .unwrap();
    wait_tcp(addr(tunnel_port));
    run_stack_uac(
        "uac-tls",
        &dir,
        &sipp,
        sipp_proc,
        addr(tunnel_port),
        200,
        &[
            "--transport".as_ref(),
            "tls".as_ref(),
            "--ca".as_ref(),
            ca_file.as_os_str(),
        ],
    );
}
