//! The tokio driver: binds the transports, feeds every received message and
//! the probe deadlines to the routing core ([`crate::route::Core`]), sends
//! what it outputs, and turns its counters into metrics.
//!
//! Sends never open a connection toward a device: a device is reached on
//! its own TCP/TLS connection or not at all (RFC 5626 §5.3; a device whose
//! connection is gone reconnects and registers again). Toward the nodes the
//! balancer uses UDP from its first UDP address, so no send waits for a
//! connect and the loop never blocks on a slow peer.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use sip::dispatch::Health;
use sip::flow::{Flow, Transport};
use sip::msg::{Limits, Message};
use sip::transport::{Incoming, TransportConfig, TransportError, Transports, tls};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, LogSection};
use crate::metrics as m;
use crate::route::{Core, CoreConfig, CoreError, NodeSpec, Output, Stats};
use crate::token::{TokenError, TokenKey};

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The cluster secret file could not be read or written.
    #[error("cluster secret {path}: {source}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The cluster secret file is not hex.
    #[error("cluster secret {0}: not hex")]
    SecretNotHex(PathBuf),
    /// No randomness for a new secret.
    #[error("no randomness for a new cluster secret")]
    NoRandom,
    /// The secret is too short for tokens.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A TLS certificate or key file could not be read.
    #[error("reading {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Binding or configuring a transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The routing core refused the configuration.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The Prometheus endpoint could not start.
    #[error("metrics endpoint on {addr}: {reason}")]
    Metrics {
        /// Its address.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
}

/// Sets up `tracing` as configured (`RUST_LOG` overrides the level).
pub fn init_logging(cfg: &LogSection) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

#[allow(clippy::disallowed_methods)] // the driver owns the clock
fn now() -> Instant {
    Instant::now()
}

/// Reads the cluster secret (hex, as zone-node writes it), or writes a new
/// random one (owner-only file) when there is none.
pub fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, DriverError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            return hex::decode(text.trim()).map_err(|_| DriverError::SecretNotHex(path.into()));
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(DriverError::Secret {
                path: path.into(),
                source: e,
            });
        }
        Err(_) => {}
    }
    let mut s = [0u8; 32];
    SystemRandom::new()
        .fill(&mut s)
        .map_err(|_| DriverError::NoRandom)?;
    let io = |source| DriverError::Secret {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(hex::encode(s).as_bytes()))
        .map_err(io)?;
    Ok(s.to_vec())
}

/// A running balancer.
pub struct Balancer {
    transports: Transports,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Reads the secret, binds the listeners, starts the metrics endpoint
    /// and the loop. `cfg` must have passed [`Config::validate`].
    pub async fn start(cfg: Config) -> Result<Balancer, DriverError> {
        let secret = load_or_create_secret(&cfg.cluster.secret_file)?;
        let key = TokenKey::new(&secret)?;
        let mut tc = TransportConfig {
            udp: cfg.sip.udp.clone(),
            tcp: cfg.sip.tcp.clone(),
            tls: cfg.sip.tls.clone(),
            limits: Limits {
                max_message: cfg.sip.max_message,
                max_body: cfg.sip.max_message.saturating_sub(512),
                ..Limits::default()
            },
            max_connections: cfg.sip.max_connections,
            idle_timeout: Duration::from_secs(cfg.sip.idle_timeout_secs),
            ..TransportConfig::default()
        };
        if let (false, Some(c), Some(k)) =
            (cfg.sip.tls.is_empty(), &cfg.sip.tls_cert, &cfg.sip.tls_key)
        {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|source| DriverError::TlsFile {
                    path: p.clone(),
                    source,
                })
            };
            tc.tls_server = Some(tls::server_config(&read(c)?, &read(k)?, None)?);
        }
        if let Some(addr) = cfg.metrics.listen {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| DriverError::Metrics {
                    addr,
                    reason: e.to_string(),
                })?;
        }
        let (transports, incoming) = Transports::bind(tc).await?;
        let node_addr = transports
            .local_addr(Transport::Udp)
            .ok_or(TransportError::InvalidConfig("sip.udp"))?;
        let mut device_addrs = Vec::new();
        for t in [Transport::Udp, Transport::Tcp, Transport::Tls] {
            if let Some(a) = transports.local_addr(t) {
                device_addrs.push((t, a));
            }
        }
        let core_cfg = CoreConfig {
            node_addr,
            device_addrs,
            nodes: cfg
                .nodes
                .iter()
                .map(|n| NodeSpec {
                    name: n.name.clone(),
                    zone: n.zone.clone(),
                    addr: n.addr,
                    weight: n.weight,
                })
                .collect(),
            dispatch: cfg.probe.dispatch(),
            register_limit: cfg.limits.register(),
            invite_limit: cfg.limits.invite(),
            scanners: cfg.limits.scanners(),
            retry_after_secs: cfg.limits.retry_after_secs,
        };
        let core = Core::new(now(), core_cfg, key)?;
        for t in [Transport::Udp, Transport::Tcp, Transport::Tls] {
            for a in transports.local_addrs(t) {
                tracing::info!(transport = %t, addr = %a, balancer = %cfg.balancer.id, "listening");
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(core, transports.clone(), incoming, stop_rx));
        Ok(Balancer {
            transports,
            stop,
            task,
        })
    }

    /// The bound addresses of `transport`.
    pub fn local_addrs(&self, transport: Transport) -> Vec<SocketAddr> {
        self.transports.local_addrs(transport)
    }

    /// Stops the loop and closes the transports.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        tracing::info!("stopped");
    }
}

/// The loop: one core, fed in arrival order.
async fn run(
    mut core: Core,
    transports: Transports,
    mut incoming: mpsc::Receiver<Incoming>,
    mut stop: watch::Receiver<bool>,
) {
    let mut reported = Reported::default();
    let mut report = tokio::time::interval(Duration::from_secs(1));
    loop {
        let deadline = core.poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = incoming.recv() => match m {
                Some(Incoming { msg, flow }) => core.handle(now(), flow, msg),
                None => break,
            },
            () = sleep => core.handle_timeout(now()),
            _ = report.tick() => reported.update(&core),
            _ = stop.changed() => break,
        }
        while let Some(out) = core.poll_output() {
            perform(&transports, out).await;
        }
    }
    reported.update(&core);
}

async fn perform(transports: &Transports, out: Output) {
    match out {
        Output::Send { flow, msg } => send(transports, &flow, &msg, false).await,
        Output::Reply { flow, msg } => send(transports, &flow, &msg, true).await,
        Output::Health { node, zone, health } => {
            let up = health == Health::Up;
            if up {
                tracing::info!(%node, %zone, "node up");
            } else {
                tracing::warn!(%node, %zone, "node down");
            }
            metrics::gauge!(m::NODE_UP, "node" => node, "zone" => zone).set(if up {
                1.0
            } else {
                0.0
            });
        }
    }
}

async fn send(transports: &Transports, flow: &Flow, msg: &Message, reply: bool) {
    let kind = if msg.is_request() {
        "request"
    } else {
        "response"
    };
    // Never connect toward a device: its own connection or nothing.
    if flow.transport.is_reliable() && !transports.is_connected(flow) {
        tracing::debug!(remote = %flow.remote, kind, "connection gone; not sent");
        metrics::counter!(m::SEND_ERRORS, "kind" => kind).increment(1);
        return;
    }
    let r = if reply {
        transports.send_response(flow, msg).await
    } else {
        transports.send(flow, msg).await
    };
    if let Err(e) = r {
        tracing::debug!(remote = %flow.remote, kind, error = %e, "send failed");
        metrics::counter!(m::SEND_ERRORS, "kind" => kind).increment(1);
    }
}

/// What has been turned into metrics already.
#[derive(Default)]
struct Reported {
    stats: Stats,
}

impl Reported {
    fn update(&mut self, core: &Core) {
        let s = core.stats();
        metrics::counter!(m::FORWARDED, "direction" => "to_node").absolute(s.to_node);
        metrics::counter!(m::FORWARDED, "direction" => "to_device").absolute(s.to_device);
        metrics::counter!(m::RESPONSES).absolute(s.responses);
        metrics::counter!(m::RESPONSES_DROPPED).absolute(s.responses_dropped);
        metrics::counter!(m::REROUTED).absolute(s.rerouted);
        for (reason, v) in [
            ("bad_token", s.bad_tokens),
            ("rate_limited", s.rate_limited),
            ("scanner", s.scanners),
            ("loop", s.loops),
            ("no_node", s.no_node),
            ("unroutable", s.unroutable),
        ] {
            metrics::counter!(m::REFUSED, "reason" => reason).absolute(v);
        }
        let d = core.dispatcher();
        for id in d.ids() {
            let node = d.name(id).unwrap_or_default().to_string();
            let zone = d.zone(id).unwrap_or_default().to_string();
            let st = d.stats(id);
            metrics::counter!(m::PROBES, "node" => node.clone()).absolute(st.probes_sent);
            metrics::counter!(m::PROBES_FAILED, "node" => node.clone()).absolute(st.probes_failed);
            metrics::counter!(m::PICKED, "node" => node.clone(), "zone" => zone.clone())
                .absolute(st.picked);
            metrics::gauge!(m::NODE_UP, "node" => node.clone(), "zone" => zone)
                .set(if d.is_up(id) { 1.0 } else { 0.0 });
            if let Some(l) = d.load(id) {
                metrics::gauge!(m::NODE_CALLS, "node" => node.clone()).set(l.calls as f64);
                metrics::gauge!(m::NODE_REGISTRATIONS, "node" => node).set(l.registrations as f64);
            }
        }
        self.stats = s;
    }
}
