//! Setup shared by the balancer's process tests: `sipzone-node` and
//! `sipzone-balancer` processes on loopback, their metrics, bounded polls.
//!
//! Finding `sipzone-node`: cargo only sets `CARGO_BIN_EXE_<name>` for the
//! binaries of the crate under test, and a dev-dependency on `zone-node`
//! would break the layering (DESIGN §2) and still not build its binary. The
//! tests therefore look beside their own executable (`target/<profile>/`,
//! where `cargo build -p zone-node` or a workspace build puts it) and, when
//! it is not there, run `$CARGO build -p zone-node --bin sipzone-node` once
//! with the environment cargo gave the test (so `CARGO_TARGET_DIR` and the
//! profile match).
// Each test file uses part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use testkit::net::{addr, free_port};
use testkit::proc::Proc;

/// The realm (and domain) of the test nodes.
pub const REALM: &str = "sipzone.local";

/// `[limits]` high enough that no test load is limited.
pub const HIGH_LIMITS: &str = "register_per_second = 5000.0
register_burst = 5000.0
invite_per_second = 5000.0
invite_burst = 5000.0
";

/// A fresh directory for one test's processes, configs and logs.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A log file's text (empty when it cannot be read).
pub fn log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The `sipzone-node` binary (see the module docs).
pub fn node_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test>-<hash>
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let bin = profile_dir.join("sipzone-node");
        if !bin.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "zone-node", "--bin", "sipzone-node"]);
            if profile_dir.file_name().is_some_and(|p| p == "release") {
                cmd.arg("--release");
            }
            let st = cmd.status().unwrap();
            assert!(st.success(), "building sipzone-node failed");
        }
        assert!(bin.exists(), "no sipzone-node at {}", bin.display());
        bin
    })
    .clone()
}

/// The Prometheus text at `at` (empty when it cannot be fetched).
pub fn metric_text(at: SocketAddr) -> String {
    testkit::metrics::text(at)
}

/// The first sample whose line starts with `name` (labels included).
pub fn metric(at: SocketAddr, name: &str) -> Option<f64> {
    testkit::metrics::sample(at, name)
}

/// A running `sipzone-node` (single, in-memory).
pub struct Node {
    /// The process; `None` once the test killed it.
    pub proc: Option<Proc>,
    /// Its SIP address (UDP and TCP).
    pub sip: SocketAddr,
    /// Its Prometheus endpoint.
    pub metrics: SocketAddr,
    /// Its directory (config, data, `node.log`).
    pub dir: PathBuf,
}

/// The nonce secret of every test node (hex). The nodes of a region share
/// it so that any node verifies the nonces another issued (`sip::auth`,
/// docs/config.md `auth.secret_file`); the balancer relies on that: it
/// routes a challenged INVITE's retry, like any initial INVITE, by the
/// Call-ID's pick under the nodes' current load, which may be another node
/// than the one that sent the challenge.
pub const NONCE_SECRET: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

/// Starts node `name` in `dir/name` with the test users 1000..=1999
/// (password `pw` + user) and [`NONCE_SECRET`].
pub fn start_node(dir: &Path, name: &str) -> Node {
    let dir = dir.join(name);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/secret"), NONCE_SECRET).unwrap();
    let (sip, metrics) = (free_port(), free_port());
    let cfg = format!(
        r#"
[node]
id = "{name}"
data_dir = "data"
[sip]
udp = ["127.0.0.1:{sip}"]
tcp = ["127.0.0.1:{sip}"]
[auth]
realm = "{REALM}"
secret_file = "data/secret"
algorithms = ["MD5", "SHA-256"]
[metrics]
listen = "127.0.0.1:{metrics}"
[log]
format = "text"
level = "warn,zone_node::b2bua=debug,zone_node::driver=debug"
[danger_test_users]
first = 1000
last = 1999
password_prefix = "pw"
"#
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, cfg).unwrap();
    let proc = Proc::spawn(
        name,
        Command::new(node_bin())
            .arg("--config")
            .arg(&path)
            .current_dir(&dir),
        &dir.join("node.log"),
    )
    .unwrap();
    Node {
        proc: Some(proc),
        sip: addr(sip),
        metrics: addr(metrics),
        dir,
    }
}

/// A running `sipzone-balancer`.
pub struct Lb {
    _proc: Proc,
    /// Its SIP address (UDP and TCP).
    pub sip: SocketAddr,
    /// Its Prometheus endpoint.
    pub metrics: SocketAddr,
    /// Its directory (config, secret, `lb.log`).
    pub dir: PathBuf,
}

impl Lb {
    /// The balancer's log so far.
    pub fn log(&self) -> String {
        log(&self.dir.join("lb.log"))
    }
}

/// Starts a balancer in `dir/lb` in front of `nodes` (name, zone, address)
/// with [`HIGH_LIMITS`].
pub fn start_balancer(dir: &Path, nodes: &[(&str, &str, SocketAddr)]) -> Lb {
    start_balancer_with(dir, nodes, HIGH_LIMITS)
}

/// Like [`start_balancer`], with `limits` as the body of `[limits]`.
pub fn start_balancer_with(dir: &Path, nodes: &[(&str, &str, SocketAddr)], limits: &str) -> Lb {
    let dir = dir.join("lb");
    std::fs::create_dir_all(&dir).unwrap();
    let (sip, metrics) = (free_port(), free_port());
    let mut cfg = format!(
        r#"
[balancer]
id = "lb1"
[sip]
udp = ["127.0.0.1:{sip}"]
tcp = ["127.0.0.1:{sip}"]
[cluster]
secret_file = "secret"
[limits]
{limits}
[metrics]
listen = "127.0.0.1:{metrics}"
[log]
format = "json"
level = "info"
"#
    );
    for (name, zone, a) in nodes {
        cfg += &format!("[[nodes]]\nname = \"{name}\"\nzone = \"{zone}\"\naddr = \"{a}\"\n");
    }
    let path = dir.join("lb.toml");
    std::fs::write(&path, cfg).unwrap();
    let proc = Proc::spawn(
        "sipzone-balancer",
        Command::new(env!("CARGO_BIN_EXE_sipzone-balancer"))
            .arg("--config")
            .arg(&path)
            .current_dir(&dir),
        &dir.join("lb.log"),
    )
    .unwrap();
    Lb {
        _proc: proc,
        sip: addr(sip),
        metrics: addr(metrics),
        dir,
    }
}

/// Polls (bounded) until `f` holds.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The balancer's `node_up` gauge for `name`.
pub fn node_up(lb: &Lb, name: &str) -> Option<f64> {
    metric_text(lb.metrics)
        .lines()
        .find(|l| {
            l.starts_with("sipzone_balancer_node_up") && l.contains(&format!("node=\"{name}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits (bounded) until the balancer reports every node in `names` up.
pub fn wait_up(lb: &Lb, names: &[&str]) {
    wait_for(
        "the nodes up at the balancer",
        Duration::from_secs(20),
        || names.iter().all(|n| node_up(lb, n) == Some(1.0)),
    );
}

/// A refusal counter of the balancer (`reason` as in its metrics).
pub fn refused(lb: &Lb, reason: &str) -> Option<f64> {
    metric(
        lb.metrics,
        &format!(r#"sipzone_balancer_requests_refused_total{{reason="{reason}"}}"#),
    )
}
