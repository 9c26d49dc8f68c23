//! The typed configuration of `sipzone-node` (TOML). Every parameter, its
//! type, meaning and default is listed in `docs/config.md`; [`Config::load`]
//! parses with unknown keys refused and [`Config::validate`] checks it before
//! any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML does not parse or does not match the schema.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause, with line and column.
        source: toml::de::Error,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node.
    pub node: NodeConfig,
    /// SIP listeners and limits (a witness has none).
    #[serde(default)]
    pub sip: SipConfig,
    /// Registrar parameters.
    #[serde(default)]
    pub registrar: RegistrarSection,
    /// Digest authentication and lockout.
    pub auth: AuthConfig,
    /// Call handling (session timers).
    #[serde(default)]
    pub b2bua: B2buaSection,
    /// Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Where calls to numbers that are not local users go.
    #[serde(default)]
    pub outbound: Option<OutboundConfig>,
    /// Directory users with stored HA1 hashes.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// A range of users with derived passwords, for local testing only.
    #[serde(default)]
    pub danger_test_users: Option<TestUsers>,
    /// Raft replication with the other nodes of the region; absent, the node
    /// keeps its state in memory alone.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this node's Raft replica and its peers (DESIGN §7).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's Raft id: non-zero, unique in the region.
    pub raft_id: u64,
    /// Address of the QUIC listener for peers.
    pub listen: SocketAddr,
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM), signed by the cluster CA for the name
    /// `sipzone-cluster`.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// Raft ids of the initial voters, used only on the first start of a new
    /// region (empty: join an existing region and wait for the leader).
    #[serde(default)]
    pub bootstrap: Vec<u64>,
    /// Milliseconds per Raft tick (election after 10 ticks, heartbeat every 2).
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Milliseconds a voter may stay silent before the leader reassigns its
    /// calls to live nodes.
    #[serde(default = "default_takeover_after_ms")]
    pub takeover_after_ms: u64,
    /// The other members.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

fn default_tick_ms() -> u64 {
    50
}

fn default_takeover_after_ms() -> u64 {
    1000
}

/// `[[cluster.peers]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's Raft id.
    pub id: u64,
    /// The peer's QUIC listener.
    pub addr: SocketAddr,
    /// The peer's zone label (informational: balancers and takeover use it).
    #[serde(default)]
    pub zone: String,
}

/// `[node]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id, unique in the region (`a1`).
    pub id: String,
    /// Zone label (`a`, `b`).
    #[serde(default = "default_zone")]
    pub zone: String,
    /// Directory for generated certificates and the Raft data.
    pub data_dir: PathBuf,
    /// `switch` (registrar and B2BUA) or `witness` (a Raft voter with
    /// storage and no SIP, the third failure domain of a region).
    #[serde(default = "default_role")]
    pub role: String,
}

fn default_role() -> String {
    "switch".into()
}

impl NodeConfig {
    /// True for a witness node.
    pub fn is_witness(&self) -> bool {
        self.role == "witness"
    }
}

fn default_zone() -> String {
    "a".into()
}

/// `[sip]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[serde(deny_unknown_fields)]
pub struct SipConfig {
    /// UDP listen addresses.
    #[serde(default)]
    pub udp: Vec<SocketAddr>,
    /// TCP listen addresses.
    #[serde(default)]
    pub tcp: Vec<SocketAddr>,
    /// TLS listen addresses.
    #[serde(default)]
    pub tls: Vec<SocketAddr>,
    /// TLS certificate chain (PEM); generated under `node.data_dir` on first
    /// start when absent.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Largest SIP message accepted, in octets.
    #[serde(default = "default_max_message")]
    pub max_message: usize,
    /// Most TCP/TLS connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most live SIP transactions; beyond it new requests get 503 with
    /// Retry-After. A completed UDP transaction lives 32 s (Timer J/H), so
    /// this bounds the sustained rate to about max / 32 s per transaction.
    #[serde(default = "default_max_transactions")]
    pub max_transactions: usize,
    /// SO_RCVBUF of the UDP sockets in bytes (the kernel caps it at
    /// net.core.rmem_max); none keeps the system default.
    #[serde(default = "default_udp_recv_buffer")]
    pub udp_recv_buffer: Option<usize>,
}

impl Default for SipConfig {
    fn default() -> SipConfig {
        SipConfig {
            udp: vec![],
            tcp: vec![],
            tls: vec![],
            tls_cert: None,
            tls_key: None,
            max_message: default_max_message(),
            max_connections: default_max_connections(),
            max_transactions: default_max_transactions(),
            udp_recv_buffer: default_udp_recv_buffer(),
        }
    }
}

fn default_max_transactions() -> usize {
    500_000
}

fn default_udp_recv_buffer() -> Option<usize> {
    Some(4 << 20)
}

fn default_max_message() -> usize {
    65_535
}

fn default_max_connections() -> usize {
    10_000
}

/// `[registrar]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrarSection {
    /// Shortest registration accepted (423 below it), seconds.
    #[serde(default = "default_min_expires")]
    pub min_expires: u32,
    /// Longest registration granted (longer requests are shortened), seconds.
    #[serde(default = "default_max_expires")]
    pub max_expires: u32,
    /// Registration time when the request names none, seconds.
    #[serde(default = "default_max_expires")]
    pub default_expires: u32,
    /// Most contacts per address-of-record.
    #[serde(default = "default_max_contacts")]
    pub max_contacts_per_aor: usize,
}

impl Default for RegistrarSection {
    fn default() -> Self {
        RegistrarSection {
            min_expires: default_min_expires(),
            max_expires: default_max_expires(),
            default_expires: default_max_expires(),
            max_contacts_per_aor: default_max_contacts(),
        }
    }
}

fn default_min_expires() -> u32 {
    60
}
fn default_max_expires() -> u32 {
    3600
}
fn default_max_contacts() -> usize {
    10
}

/// `[b2bua]`: call handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct B2buaSection {
    /// Session interval (RFC 4028 Session-Expires) asked for on both legs
    /// when the caller asks for none or a longer one, seconds.
    #[serde(default = "default_session_expires")]
    pub session_expires: u32,
    /// Smallest session interval accepted (RFC 4028 Min-SE); a caller
    /// asking for less gets 422. At least 90 (RFC 4028 §4), seconds.
    #[serde(default = "default_min_se")]
    pub min_se: u32,
}

impl Default for B2buaSection {
    fn default() -> Self {
        B2buaSection {
            session_expires: default_session_expires(),
            min_se: default_min_se(),
        }
    }
}

fn default_session_expires() -> u32 {
    1800
}
fn default_min_se() -> u32 {
    90
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Digest realm.
    pub realm: String,
    /// File holding the cluster secret (at least 16 bytes) that signs nonces;
    /// created with a random secret on first start when absent.
    pub secret_file: PathBuf,
    /// Nonce lifetime in seconds (older nonces get `stale=true`).
    #[serde(default = "default_nonce_age")]
    pub nonce_max_age_secs: u64,
    /// Digest algorithms offered, in order of preference (`SHA-256`, `MD5`).
    /// Clients take the first they support (RFC 8760); some (SIPp 3.6) only
    /// read the first challenge and know only MD5.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Let initial INVITEs and MESSAGEs through without digest authentication of the
    /// caller. Unsafe anywhere but a bench: anyone who reaches the node can
    /// call its users.
    #[serde(default)]
    pub danger_unauthenticated_calls: bool,
    /// Failed authentications (per user, and per source address) before lockout.
    #[serde(default = "default_max_failures")]
    pub lockout_max_failures: u32,
    /// Window in which failures are counted, seconds.
    #[serde(default = "default_window")]
    pub lockout_window_secs: u64,
    /// How long a lockout lasts, seconds.
    #[serde(default = "default_lockout")]
    pub lockout_secs: u64,
}

fn default_algorithms() -> Vec<String> {
    vec!["SHA-256".into(), "MD5".into()]
}

fn default_nonce_age() -> u64 {
    300
}
fn default_max_failures() -> u32 {
    5
}
fn default_window() -> u64 {
    60
}
fn default_lockout() -> u64 {
    300
}

/// `[outbound]`: the next hop for calls to numbers that are not local users
/// (a carrier trunk or the SBC). Without it such calls get 404.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// `ip:port` of the next hop.
    pub next_hop: SocketAddr,
    /// `udp`, `tcp` or `tls`.
    #[serde(default = "default_outbound_transport")]
    pub transport: String,
}

fn default_outbound_transport() -> String {
    "udp".into()
}

impl OutboundConfig {
    /// The transport, validated by [`Config::validate`].
    pub fn transport_kind(&self) -> sip::flow::Transport {
        sip::flow::Transport::from_token(&self.transport).unwrap_or(sip::flow::Transport::Udp)
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus `/metrics` listen address; none disables the endpoint.
    pub listen: Option<SocketAddr>,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `json` (production) or `text`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A tracing filter (`info`, `zone_node=debug,sip=info`); `RUST_LOG` overrides.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_log_format() -> String {
    "json".into()
}
fn default_log_level() -> String {
    "info".into()
}

/// `[[users]]`: a directory user with its HA1 hashes (hex) for the realm.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// User name (the user part of the AOR).
    pub name: String,
    /// HA1 = SHA-256(user:realm:password), hex.
    pub ha1_sha256: String,
    /// HA1 = MD5(user:realm:password), hex.
    pub ha1_md5: String,
}

/// `[danger_test_users]`: users `first..=last`, password `password_prefix`
/// followed by the user name. For local testing only: the passwords are
/// derivable by anyone who reads the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestUsers {
    /// First user number.
    pub first: u32,
    /// Last user number (inclusive).
    pub last: u32,
    /// Prefix of every password.
    pub password_prefix: String,
}

impl Config {
    /// Reads, parses and validates `path`. Relative paths in the file are
    /// taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.node.data_dir);
        fix(&mut self.auth.secret_file);
        if let Some(p) = self.sip.tls_cert.as_mut() {
            fix(p);
        }
        if let Some(p) = self.sip.tls_key.as_mut() {
            fix(p);
        }
        if let Some(c) = self.cluster.as_mut() {
            fix(&mut c.ca);
            fix(&mut c.cert);
            fix(&mut c.key);
        }
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.node.id.is_empty()
            || !self
                .node
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("node.id must be non-empty letters, digits or '-'");
        }
        if !matches!(self.node.role.as_str(), "switch" | "witness") {
            return bad("node.role must be switch or witness");
        }
        if self.node.is_witness() && self.cluster.is_none() {
            return bad("a witness needs a [cluster] section");
        }
        if let Some(c) = &self.cluster {
            if c.raft_id == 0 {
                return bad("cluster.raft_id must be non-zero");
            }
            if !(5..=1000).contains(&c.tick_ms) {
                return bad("cluster.tick_ms must be within 5..=1000");
            }
            if c.takeover_after_ms < 2 * c.tick_ms {
                return bad("cluster.takeover_after_ms must be at least two ticks");
            }
            let mut ids: Vec<u64> = c.peers.iter().map(|p| p.id).collect();
            ids.push(c.raft_id);
            ids.sort_unstable();
            if ids.contains(&0) || ids.windows(2).any(|w| w[0] == w[1]) {
                return bad(
                    "cluster: raft ids of the node and its peers must be non-zero and distinct",
                );
            }
            if c.bootstrap.iter().any(|v| ids.binary_search(v).is_err()) {
                return bad("cluster.bootstrap may only name this node and its peers");
            }
        }
        if !self.node.is_witness()
            && self.sip.udp.is_empty()
            && self.sip.tcp.is_empty()
            && self.sip.tls.is_empty()
        {
            return bad("sip: at least one of udp, tcp, tls must list an address");
        }
        if self.sip.tls_cert.is_some() != self.sip.tls_key.is_some() {
            return bad("sip.tls_cert and sip.tls_key go together");
        }
        if !(1500..=1_048_576).contains(&self.sip.max_message) {
            return bad("sip.max_message must be within 1500..=1048576");
        }
        if self.sip.max_connections == 0 {
            return bad("sip.max_connections must be at least 1");
        }
        if self.sip.max_transactions < 64 {
            return bad("sip.max_transactions must be at least 64");
        }
        let r = &self.registrar;
        if r.min_expires == 0 || r.min_expires > r.max_expires {
            return bad("registrar: need 0 < min_expires <= max_expires");
        }
        if r.default_expires < r.min_expires || r.default_expires > r.max_expires {
            return bad("registrar.default_expires must lie within min_expires..=max_expires");
        }
        if r.max_contacts_per_aor == 0 {
            return bad("registrar.max_contacts_per_aor must be at least 1");
        }
        let b = &self.b2bua;
        if b.min_se < 90 || b.min_se > b.session_expires || b.session_expires > 86_400 {
            return bad("b2bua: need 90 <= min_se <= session_expires <= 86400");
        }
        if self.auth.realm.is_empty() || self.auth.realm.contains(['"', '\\']) {
            return bad("auth.realm must be non-empty without quotes or backslashes");
        }
        if self.auth.nonce_max_age_secs == 0 || self.auth.lockout_max_failures == 0 {
            return bad("auth: nonce_max_age_secs and lockout_max_failures must be at least 1");
        }
        if self.auth.algorithms.is_empty()
            || self
                .auth
                .algorithms
                .iter()
                .any(|a| !matches!(a.as_str(), "SHA-256" | "MD5"))
        {
            return bad("auth.algorithms must list SHA-256 and/or MD5");
        }
        if let Some(o) = &self.outbound
            && sip::flow::Transport::from_token(&o.transport).is_none()
        {
            return bad("outbound.transport must be udp, tcp or tls");
        }
        if !matches!(self.log.format.as_str(), "json" | "text") {
            return bad("log.format must be json or text");
        }
        for u in &self.users {
            let hex_ok =
                |h: &str, n: usize| h.len() == n && h.bytes().all(|b| b.is_ascii_hexdigit());
            if u.name.is_empty() || !hex_ok(&u.ha1_sha256, 64) || !hex_ok(&u.ha1_md5, 32) {
                return Err(ConfigError::Invalid(format!(
                    "user {:?}: name must be non-empty, ha1_sha256 64 and ha1_md5 32 hex digits",
                    u.name
                )));
            }
        }
        if let Some(t) = &self.danger_test_users
            && (t.first > t.last || t.last - t.first >= 1_000_000)
        {
            return bad("danger_test_users: need first <= last and at most 1,000,000 users");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[node]
id = "a1"
data_dir = "data"
[sip]
udp = ["127.0.0.1:5060"]
[auth]
realm = "sipzone.local"
secret_file = "data/secret"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c: Config = toml::from_str(MIN).unwrap();
        c.validate().unwrap();
        assert_eq!(c.registrar.min_expires, 60);
        assert_eq!(c.auth.lockout_max_failures, 5);
        assert_eq!(c.log.format, "json");
        assert_eq!((c.b2bua.session_expires, c.b2bua.min_se), (1800, 90));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let t = MIN.replace("[sip]", "[sip]\nudpp = []");
        assert!(toml::from_str::<Config>(&t).is_err());
    }

    #[test]
    fn invalid_values_are_refused() {
        for (from, to) in [
            ("id = \"a1\"", "id = \"\""),
            ("udp = [\"127.0.0.1:5060\"]", "udp = []"),
            ("realm = \"sipzone.local\"", "realm = \"\""),
        ] {
            let c: Config = toml::from_str(&MIN.replace(from, to)).unwrap();
            assert!(c.validate().is_err(), "{to} accepted");
        }
        let c: Config = toml::from_str(&format!("{MIN}[registrar]\nmin_expires = 7200\n")).unwrap();
        assert!(c.validate().is_err());
        for b in [
            "min_se = 60",
            "min_se = 600\nsession_expires = 300",
            "session_expires = 100000",
        ] {
            let c: Config = toml::from_str(&format!("{MIN}[b2bua]\n{b}\n")).unwrap();
            assert!(c.validate().is_err(), "{b} accepted");
        }
        let c: Config = toml::from_str(&format!("{MIN}[b2bua]\nmin_se = 120\n")).unwrap();
        c.validate().unwrap();
        assert_eq!((c.b2bua.session_expires, c.b2bua.min_se), (1800, 120));
    }

    #[test]
    fn cluster_section_is_checked() {
        let cluster = r#"
[cluster]
raft_id = 1
listen = "127.0.0.1:7001"
ca = "pki/ca.pem"
cert = "pki/a1.pem"
key = "pki/a1.key"
bootstrap = [1, 2, 3]
peers = [{ id = 2, addr = "127.0.0.1:7002", zone = "a" }, { id = 3, addr = "127.0.0.1:7003" }]
"#;
        let c: Config = toml::from_str(&format!("{MIN}{cluster}")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.cluster.as_ref().unwrap().tick_ms, 50);
        for (from, to) in [
            ("bootstrap = [1, 2, 3]", "bootstrap = [1, 9]"),
            ("raft_id = 1", "raft_id = 2"),
            ("raft_id = 1", "raft_id = 0"),
        ] {
            let c: Config = toml::from_str(&format!("{MIN}{}", cluster.replace(from, to))).unwrap();
            assert!(c.validate().is_err(), "{to} accepted");
        }
        // A witness needs no SIP listener but does need the cluster.
        let witness = MIN.replace("udp = [\"127.0.0.1:5060\"]", "").replace(
            "data_dir = \"data\"",
            "data_dir = \"data\"\nrole = \"witness\"",
        );
        let c: Config = toml::from_str(&format!("{witness}{cluster}")).unwrap();
        c.validate().unwrap();
        let c: Config = toml::from_str(&witness).unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn shipped_configs_are_valid() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        Config::load(&deploy.join("single-node.toml")).unwrap();
        for m in ["a1", "a2", "b1", "b2", "w"] {
            let c = Config::load(&deploy.join(format!("region/{m}.toml"))).unwrap();
            assert!(c.cluster.is_some(), "{m}");
        }
    }
}
