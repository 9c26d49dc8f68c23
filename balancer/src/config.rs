//! The typed configuration of `sipzone-balancer` (TOML). Every parameter,
//! its type, meaning and default is listed in `docs/balancer-config.md`;
//! [`Config::load`] parses with unknown keys refused and
//! [`Config::validate`] checks it before any port is bound.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sip::dispatch::DispatchConfig;

use crate::limit::{DEFAULT_SCANNERS, RateConfig};

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
    /// This instance.
    pub balancer: BalancerSection,
    /// Listeners toward devices and size limits.
    pub sip: SipSection,
    /// The cluster secret that signs route tokens.
    pub cluster: ClusterSection,
    /// The zone-nodes of both zones.
    pub nodes: Vec<NodeSection>,
    /// Health probes and selection.
    #[serde(default)]
    pub probe: ProbeSection,
    /// Edge protection.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
}

/// `[balancer]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerSection {
    /// The instance name (logs).
    pub id: String,
}

/// `[sip]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipSection {
    /// UDP listen addresses; the first also talks to the nodes.
    pub udp: Vec<SocketAddr>,
    /// TCP listen addresses.
    #[serde(default)]
    pub tcp: Vec<SocketAddr>,
    /// TLS listen addresses (need `tls_cert` and `tls_key`).
    #[serde(default)]
    pub tls: Vec<SocketAddr>,
    /// TLS certificate chain (PEM).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Largest message in octets (larger ones get 513 or are dropped).
    #[serde(default = "default_max_message")]
    pub max_message: usize,
    /// Most open TCP and TLS connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection idle this long is closed (seconds).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
}

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// File holding the cluster secret (at least 16 octets); every balancer
    /// of the region needs the same one.
    pub secret_file: PathBuf,
}

/// One `[[nodes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's name (unique, at most 64 octets).
    pub name: String,
    /// Its zone.
    pub zone: String,
    /// Its SIP UDP address.
    pub addr: SocketAddr,
    /// Relative weight.
    #[serde(default = "default_weight")]
    pub weight: f64,
}

/// `[probe]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSection {
    /// Time between probes of one node (ms).
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// A probe without reply this long has failed (ms).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Consecutive failures that mark a node down.
    #[serde(default = "default_two")]
    pub down_after: u32,
    /// Consecutive successes that mark a node up.
    #[serde(default = "default_two")]
    pub up_after: u32,
    /// Reported calls are rounded down to a multiple of this.
    #[serde(default = "default_load_step")]
    pub load_step: u64,
    /// Calls at which a node's weight is halved.
    #[serde(default = "default_load_scale")]
    pub load_scale: u64,
}

impl Default for ProbeSection {
    fn default() -> Self {
        ProbeSection {
            interval_ms: default_interval(),
            timeout_ms: default_timeout(),
            down_after: 2,
            up_after: 2,
            load_step: default_load_step(),
            load_scale: default_load_scale(),
        }
    }
}

impl ProbeSection {
    /// The dispatcher parameters.
    pub fn dispatch(&self) -> DispatchConfig {
        DispatchConfig {
            interval: Duration::from_millis(self.interval_ms),
            timeout: Duration::from_millis(self.timeout_ms),
            down_after: self.down_after,
            up_after: self.up_after,
            load_step: self.load_step,
            load_scale: self.load_scale,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// REGISTERs per second per source address.
    #[serde(default = "default_rate")]
    pub register_per_second: f64,
    /// REGISTER burst per source.
    #[serde(default = "default_burst")]
    pub register_burst: f64,
    /// Initial INVITEs per second per source address.
    #[serde(default = "default_rate")]
    pub invite_per_second: f64,
    /// INVITE burst per source.
    #[serde(default = "default_burst")]
    pub invite_burst: f64,
    /// Most sources tracked per limit.
    #[serde(default = "default_max_sources")]
    pub max_sources: usize,
    /// User-Agent substrings that are dropped (case ignored).
    #[serde(default = "default_scanners")]
    pub scanner_user_agents: Vec<String>,
    /// Retry-After on 503 when no node is up (seconds).
    #[serde(default = "default_retry_after")]
    pub retry_after_secs: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            register_per_second: default_rate(),
            register_burst: default_burst(),
            invite_per_second: default_rate(),
            invite_burst: default_burst(),
            max_sources: default_max_sources(),
            scanner_user_agents: default_scanners(),
            retry_after_secs: default_retry_after(),
        }
    }
}

impl LimitsSection {
    /// The REGISTER limit.
    pub fn register(&self) -> RateConfig {
        RateConfig {
            per_second: self.register_per_second,
            burst: self.register_burst,
            max_sources: self.max_sources,
        }
    }

    /// The INVITE limit.
    pub fn invite(&self) -> RateConfig {
        RateConfig {
            per_second: self.invite_per_second,
            burst: self.invite_burst,
            max_sources: self.max_sources,
        }
    }

    /// The scanner substrings, lowercase.
    pub fn scanners(&self) -> Vec<String> {
        self.scanner_user_agents
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect()
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the Prometheus `/metrics` listener; none: no endpoint.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `json` (production) or `text`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A tracing filter; `RUST_LOG` overrides.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_max_message() -> usize {
    16_384
}
fn default_max_connections() -> usize {
    10_000
}
fn default_idle_timeout() -> u64 {
    300
}
fn default_weight() -> f64 {
    1.0
}
fn default_interval() -> u64 {
    100
}
fn default_timeout() -> u64 {
    200
}
fn default_two() -> u32 {
    2
}
fn default_load_step() -> u64 {
    50
}
fn default_load_scale() -> u64 {
    1000
}
fn default_rate() -> f64 {
    20.0
}
fn default_burst() -> f64 {
    40.0
}
fn default_max_sources() -> usize {
    100_000
}
fn default_scanners() -> Vec<String> {
    DEFAULT_SCANNERS.iter().map(|s| s.to_string()).collect()
}
fn default_retry_after() -> u32 {
    5
}
fn default_log_format() -> String {
    "json".into()
}
fn default_log_level() -> String {
    "info".into()
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value before anything is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        if self.sip.udp.is_empty() {
            return bad("sip.udp needs at least one address (it also talks to the nodes)".into());
        }
        if !self.sip.tls.is_empty() && (self.sip.tls_cert.is_none() || self.sip.tls_key.is_none()) {
            return bad("sip.tls needs sip.tls_cert and sip.tls_key".into());
        }
        if !(512..=65_535).contains(&self.sip.max_message) {
            return bad("sip.max_message must be 512..=65535".into());
        }
        if self.sip.max_connections == 0 {
            return bad("sip.max_connections must be > 0".into());
        }
        if self.sip.idle_timeout_secs == 0 {
            return bad("sip.idle_timeout_secs must be > 0".into());
        }
        if self.nodes.is_empty() {
            return bad("at least one [[nodes]] entry is needed".into());
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for n in &self.nodes {
            if n.name.is_empty() || n.name.len() > 64 {
                return bad(format!("nodes: name {:?} must be 1..=64 octets", n.name));
            }
            if !names.insert(&n.name) {
                return bad(format!("nodes: duplicate name {:?}", n.name));
            }
            if !addrs.insert(n.addr) {
                return bad(format!("nodes: duplicate address {}", n.addr));
            }
            if n.zone.is_empty() {
                return bad(format!("nodes: {} has no zone", n.name));
            }
            if !(n.weight.is_finite() && n.weight > 0.0) {
                return bad(format!("nodes: {} weight must be > 0", n.name));
            }
        }
        self.probe
            .dispatch()
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("probe: {e}")))?;
        let l = &self.limits;
        for (name, v) in [
            ("register_per_second", l.register_per_second),
            ("invite_per_second", l.invite_per_second),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("limits.{name} must be > 0"));
            }
        }
        for (name, v) in [
            ("register_burst", l.register_burst),
            ("invite_burst", l.invite_burst),
        ] {
            if !(v.is_finite() && v >= 1.0) {
                return bad(format!("limits.{name} must be >= 1"));
            }
        }
        if l.max_sources == 0 {
            return bad("limits.max_sources must be > 0".into());
        }
        if !matches!(self.log.format.as_str(), "json" | "text") {
            return bad("log.format must be json or text".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[balancer]
id = "lb1"
[sip]
udp = ["127.0.0.1:5060"]
[cluster]
secret_file = "secret"
[[nodes]]
name = "a1"
zone = "A"
addr = "127.0.0.1:5071"
[[nodes]]
name = "b1"
zone = "B"
addr = "127.0.0.1:5072"
"#;

    #[test]
    fn defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.probe.dispatch(), DispatchConfig::default());
        assert_eq!(c.sip.max_message, 16_384);
        assert_eq!(c.limits.register().burst, 40.0);
        assert!(
            c.limits
                .scanners()
                .contains(&"friendly-scanner".to_string())
        );
        assert_eq!(c.log.format, "json");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let cases = [
            (
                format!("{MINIMAL}\n[probe]\nintervl_ms = 5\n"),
                "unknown field",
            ),
            (format!("{MINIMAL}\n[probe]\ninterval_ms = 0\n"), "interval"),
            (
                format!("{MINIMAL}\n[probe]\ndown_after = 0\n"),
                "down_after",
            ),
            (
                MINIMAL.replace("name = \"b1\"", "name = \"a1\""),
                "duplicate name",
            ),
            (
                MINIMAL.replace("127.0.0.1:5072", "127.0.0.1:5071"),
                "duplicate address",
            ),
            (
                MINIMAL.replace("udp = [\"127.0.0.1:5060\"]", "udp = []"),
                "sip.udp",
            ),
            (
                MINIMAL.replace("[sip]", "[sip]\ntls = [\"127.0.0.1:5061\"]"),
                "tls_cert",
            ),
            (
                format!("{MINIMAL}\n[limits]\nregister_per_second = 0.0\n"),
                "register_per_second",
            ),
            (
                format!("{MINIMAL}\n[log]\nformat = \"xml\"\n"),
                "log.format",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
