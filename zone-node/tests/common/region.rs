//! A region of `sipzone-node` processes on loopback (zone A: a1, a2; zone
//! B: b1, b2; witness w), its PKI and configs, and the probes the region
//! tests and the region benchmark share. Talks to 127.0.0.1 only.
#![allow(dead_code)] // each user takes what it needs

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sip::flow::{Flow, Transport};
use sip::msg::Method;
use testkit::net::{addr, free_port};
use testkit::proc::Proc;
use testkit::sipp::Sipp;
use testkit::ua::{Ua, UaConfig};

pub const REALM: &str = "sipzone.local";

/// (name, raft id, zone, witness)
pub const MEMBERS: [(&str, u64, &str, bool); 5] = [
    ("a1", 1, "a", false),
    ("a2", 2, "a", false),
    ("b1", 3, "b", false),
    ("b2", 4, "b", false),
    ("w", 5, "w", true),
];

pub struct Member {
    pub name: &'static str,
    pub proc: Option<Proc>,
    pub sip: SocketAddr,
    pub raft: u16,
    pub metrics: SocketAddr,
    pub config: PathBuf,
    pub witness: bool,
}

impl Member {
    /// (SIP address, metrics address).
    pub fn clone_addrs(&self) -> (SocketAddr, SocketAddr) {
        (self.sip, self.metrics)
    }
}

pub struct Region {
    pub dir: PathBuf,
    pub members: Vec<Member>,
}

/// One member's configuration: (name, raft id, zone, witness), its ports
/// (SIP, Raft, metrics), its peers' `(id, raft port, zone)` and the
/// bootstrap voters (empty for a node joining later).
pub fn member_config(
    (name, id, zone, witness): (&str, u64, &str, bool),
    (sip, raft, metrics): (u16, u16, u16),
    peers: &[(u64, u16, &str)],
    bootstrap: &str,
) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|(pid, port, pzone)| {
            format!("{{ id = {pid}, addr = \"127.0.0.1:{port}\", zone = \"{pzone}\" }}")
        })
        .collect();
    let sip_section = if witness {
        String::new()
    } else {
        format!("[sip]\nudp = [\"127.0.0.1:{sip}\"]\ntcp = [\"127.0.0.1:{sip}\"]\n")
    };
    let role = if witness { "witness" } else { "switch" };
    format!(
        r#"
[node]
id = "{name}"
zone = "{zone}"
role = "{role}"
data_dir = "data-{name}"
{sip_section}
[auth]
realm = "{REALM}"
secret_file = "secret"
algorithms = ["MD5", "SHA-256"]
[metrics]
listen = "127.0.0.1:{metrics}"
[log]
format = "text"
level = "info,raft=warn"
[danger_test_users]
first = 1000
last = 1999
password_prefix = "pw"
[cluster]
raft_id = {id}
listen = "127.0.0.1:{raft}"
ca = "pki/ca.pem"
cert = "pki/{name}.pem"
key = "pki/{name}.key"
bootstrap = [{bootstrap}]
peers = [{peers}]
"#,
        peers = peers.join(", ")
    )
}

impl Region {
    /// Writes the PKI and the configs of a new region under the test's
    /// directory and starts every member.
    pub fn start(name: &str) -> Region {
        let mut region = Region::empty(name);
        let ports: Vec<(u16, u16, u16)> = MEMBERS
            .iter()
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        for (i, m) in MEMBERS.iter().enumerate() {
            let peers: Vec<(u64, u16, &str)> = MEMBERS
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, p)| (p.1, ports[j].1, p.2))
                .collect();
            region.add(*m, ports[i], &peers, "1, 2, 3, 4, 5");
        }
        for i in 0..region.members.len() {
            region.spawn(i);
        }
        region
    }

    /// A directory with the PKI and the shared nonce secret, no member yet.
    fn empty(name: &str) -> Region {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("region")
            .join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // One digest nonce secret for the region: any node verifies any nonce.
        std::fs::write(dir.join("secret"), "5a".repeat(32)).unwrap();
        Region {
            dir,
            members: vec![],
        }
    }

    /// One node `s1` with its state in memory (no `[cluster]`), started.
    pub fn single(name: &str) -> Region {
        let mut region = Region::empty(name);
        let ports = (free_port(), free_port(), free_port());
        region.add(("s1", 1, "a", false), ports, &[], "");
        let config = &region.members[0].config;
        let text = std::fs::read_to_string(config).unwrap();
        let alone = text.split("[cluster]").next().unwrap().to_string();
        std::fs::write(config, alone).unwrap();
        region.spawn(0);
        region
    }

    /// Issues the member's certificate and writes its config (not started).
    pub fn add(
        &mut self,
        m: (&'static str, u64, &str, bool),
        ports: (u16, u16, u16),
        peers: &[(u64, u16, &str)],
        bootstrap: &str,
    ) {
        // The operator's command: the CA on first use, then reloaded.
        let out = Command::new(env!("CARGO_BIN_EXE_sipzone-node"))
            .args(["cluster-pki", "--dir"])
            .arg(self.dir.join("pki"))
            .args(["--name", m.0])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster-pki: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = self.dir.join(format!("{}.toml", m.0));
        std::fs::write(&config, member_config(m, ports, peers, bootstrap)).unwrap();
        self.members.push(Member {
            name: m.0,
            proc: None,
            sip: addr(ports.0),
            raft: ports.1,
            metrics: addr(ports.2),
            config,
            witness: m.3,
        });
    }

    /// Runs `sipzone-node --config <via's config> ARGS...` (an operator
    /// command such as `member add ...`) with `stdin` on its standard input;
    /// returns its exit status and output.
    pub fn operator(&self, via: &str, args: &[&str], stdin: &str) -> (bool, String) {
        use std::io::Write as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_sipzone-node"))
            .arg("--config")
            .arg(&self.member(via).config)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = self.dir.join(format!("{}.log", m.name));
        m.proc = Some(
            Proc::spawn(
                m.name,
                Command::new(env!("CARGO_BIN_EXE_sipzone-node"))
                    .arg("--config")
                    .arg(&m.config),
                &log,
            )
            .unwrap(),
        );
    }

    pub fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.name == name).unwrap()
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// SIGKILLs a member (its data directory stays).
    pub fn kill(&mut self, name: &str) {
        let m = self.members.iter_mut().find(|m| m.name == name).unwrap();
        drop(m.proc.take());
    }

    /// The member that reports itself leader, if exactly one does.
    pub fn leader(&self) -> Option<&'static str> {
        let leaders: Vec<&'static str> = self
            .members
            .iter()
            .filter(|m| m.proc.is_some())
            .filter(|m| metric(m.metrics, "sipzone_node_raft_is_leader") == Some(1.0))
            .map(|m| m.name)
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    }
}

/// The value of the first sample of `name` on a `/metrics` endpoint.
pub fn metric(at: SocketAddr, name: &str) -> Option<f64> {
    testkit::metrics::sample(at, name)
}

/// A UA for `user` that answers no challenge (its caller supplies the
/// password per request).
pub async fn ua_without_credentials(user: &str) -> Ua {
    let cfg = UaConfig {
        credentials: None,
        ..UaConfig::local_user(user)
    };
    Ua::start(cfg).await.unwrap()
}

/// A UA for `user` answering challenges with the local-testing password.
pub async fn ua(user: &str) -> Ua {
    Ua::start(UaConfig::local_user(user)).await.unwrap()
}

/// Registers `user` through `node` until it gets 200 (a region without a
/// leader yet answers 503), at most `tries` times; returns the last status.
pub async fn register_until_ok(ua: &Ua, node: SocketAddr, user: &str, tries: usize) -> u16 {
    let flow = Flow::to(Transport::Udp, node);
    let mut last = 0;
    for _ in 0..tries {
        match tokio::time::timeout(
            Duration::from_secs(5),
            ua.register(flow, REALM, user, &format!("pw{user}"), 600),
        )
        .await
        {
            Ok(Ok(r)) => {
                last = r.status().unwrap_or(0);
                if last == 200 {
                    return 200;
                }
            }
            _ => last = 408,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}

/// Waits until every running switch answers OPTIONS.
pub async fn wait_ready(region: &Region) {
    let probe = ua("1999").await;
    for m in region.members.iter().filter(|m| !m.witness) {
        let flow = Flow::to(Transport::Udp, m.sip);
        let ok = async {
            for _ in 0..50 {
                let req = probe.out_of_dialog(Method::Options, &format!("sip:{REALM}"), flow);
                if let Ok(Ok(r)) =
                    tokio::time::timeout(Duration::from_millis(500), probe.request(flow, req)).await
                    && r.status() == Some(200)
                {
                    return true;
                }
            }
            false
        }
        .await;
        assert!(ok, "{} not ready; log:\n{}", m.name, region.log(m.name));
    }
}

/// Polls `/metrics` of `node` until `name` equals `want` (bounded).
pub async fn wait_metric(at: SocketAddr, name: &str, want: f64) -> bool {
    for _ in 0..100 {
        if metric(at, name) == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Polls `/metrics` of `node` until `name` is at least `want` (bounded).
pub async fn wait_metric_at_least(at: SocketAddr, name: &str, want: f64) -> bool {
    for _ in 0..300 {
        if metric(at, name).is_some_and(|v| v >= want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A SIPp REGISTER load (digest auth) of `count` registrations over users
/// 1000..1999 at `rate`/s towards `node`, for at most `limit_secs`.
pub fn sipp_registrations(
    region: &Region,
    name: &str,
    node: SocketAddr,
    count: u64,
    rate: u32,
    limit_secs: u32,
) -> Sipp {
    let users = region.dir.join(format!("{name}-users.csv"));
    testkit::sipp::write_test_users(&users).unwrap();
    Sipp::scenario_file("register_auth.xml", &region.dir, name)
        .unwrap()
        .arg("-inf")
        .arg(users.display())
        .arg("-key")
        .arg("domain")
        .arg(REALM)
        .arg("-r")
        .arg(rate)
        .arg("-timeout")
        .arg(format!("{limit_secs}s"))
        .local(addr(free_port()))
        .calls(count)
        .remote(node)
}
