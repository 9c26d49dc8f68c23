//! The tokio driver of a node: binds the transports, runs the transaction
//! endpoint, feeds requests to the cores (registrar now, B2BUA next), applies
//! their proposals to the store, answers when the store commits, and emits
//! metrics. It owns the clock and the random source; the cores get both as
//! arguments.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use ring::rand::{SecureRandom, SystemRandom};
use sip::auth::{Algorithm, NonceKey};
use sip::endpoint::Endpoint;
use sip::flow::{Flow, Transport};
use sip::msg::check::{Caps, check_request};
use sip::msg::{HeaderName, Limits, Message, Method, Uri};
use sip::transport::{TransportConfig, Transports, pki, tls};
use sip::txn::{Config as TxnConfig, Event, TxnKey};
use tokio::sync::{mpsc, watch};

use crate::b2bua::{self, B2bua, B2buaConfig, Now, Target};
use crate::cluster::{NodeStore, run_witness};
use crate::config::{Config, LogConfig};
use crate::directory::Directory;
use crate::metrics as m;
use crate::peer::PeerEvent;
use crate::registrar::{LockoutConfig, Outcome, Pending, Registrar, RegistrarConfig};
use crate::state::{ProposalId, Store};

/// Most queued events taken after one before the store runs its Ready loop.
const BATCH: usize = 512;

/// Methods this node implements: the registrar's, OPTIONS, and what the
/// B2BUA handles (calls and the requests inside them).
const METHODS: &[Method] = &[
    Method::Register,
    Method::Options,
    Method::Invite,
    Method::Ack,
    Method::Cancel,
    Method::Bye,
    Method::Update,
    Method::Info,
    Method::Prack,
    Method::Message,
];

/// Sets up `tracing` as configured (`RUST_LOG` overrides the level).
pub fn init_logging(cfg: &LogConfig) {
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
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The current Unix second.
pub fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

#[allow(clippy::disallowed_methods)] // the driver owns the clock
fn now() -> Now {
    Now {
        instant: std::time::Instant::now(),
        unix_ms: unix_now_ms(),
    }
}

/// A running node.
pub struct Node {
    transports: Option<Transports>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Starts a node: secret, certificates, transports, metrics, then the
    /// request loop.
    pub async fn start(cfg: Config) -> Result<Node> {
        let rng = SystemRandom::new();
        std::fs::create_dir_all(&cfg.node.data_dir)
            .with_context(|| format!("creating {}", cfg.node.data_dir.display()))?;
        let mut boot = [0u8; 8];
        rng.fill(&mut boot).map_err(|_| anyhow!("no randomness"))?;
        let boot = u64::from_le_bytes(boot);
        let (store, peer_events) = match &cfg.cluster {
            Some(c) => {
                let me = crate::state::MemberRecord {
                    name: cfg.node.id.clone(),
                    zone: cfg.node.zone.clone(),
                    witness: cfg.node.is_witness(),
                    raft_addr: Some(c.listen),
                };
                let (s, ev) = NodeStore::open_raft(c, me, &cfg.node.data_dir.join("raft"), boot)?;
                (s, Some(ev))
            }
            None => (NodeStore::Mem(Box::default()), None),
        };
        let tick = Duration::from_millis(cfg.cluster.as_ref().map_or(50, |c| c.tick_ms));
        if let Some(addr) = cfg.metrics.listen {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .with_context(|| format!("starting the metrics endpoint on {addr}"))?;
        }
        if cfg.node.is_witness() {
            let (stop, stop_rx) = watch::channel(false);
            let events = peer_events.ok_or_else(|| anyhow!("a witness needs [cluster]"))?;
            let task = tokio::spawn(async move {
                if let Err(e) = run_witness(store, events, tick, stop_rx).await {
                    tracing::error!(error = %e, "witness stopped");
                }
            });
            tracing::info!(node = %cfg.node.id, "witness running");
            return Ok(Node {
                transports: None,
                stop,
                task,
            });
        }
        let secret = load_or_create_secret(&cfg.auth.secret_file, &rng)?;
        let nonce_key = NonceKey::new(&secret).map_err(|e| anyhow!("nonce secret: {e}"))?;

        let mut directory = Directory::default();
        for u in &cfg.users {
            directory.add_hashed(&u.name, &u.ha1_sha256, &u.ha1_md5);
        }
        if let Some(t) = &cfg.danger_test_users {
            tracing::warn!(
                first = t.first,
                last = t.last,
                "danger_test_users: local-testing users with derivable passwords are enabled"
            );
            for n in t.first..=t.last {
                let user = n.to_string();
                directory.add_with_password(
                    &user,
                    &cfg.auth.realm,
                    &format!("{}{user}", t.password_prefix),
                );
            }
        }

        let mut tc = TransportConfig {
            udp: cfg.sip.udp.clone(),
            tcp: cfg.sip.tcp.clone(),
            tls: cfg.sip.tls.clone(),
            limits: Limits {
                max_message: cfg.sip.max_message,
                max_body: cfg.sip.max_message.saturating_sub(1024),
                ..Limits::default()
            },
            max_connections: cfg.sip.max_connections,
            udp_recv_buffer: cfg.sip.udp_recv_buffer,
            ..TransportConfig::default()
        };
        if !cfg.sip.tls.is_empty() {
            let files = match (&cfg.sip.tls_cert, &cfg.sip.tls_key) {
                (Some(c), Some(k)) => pki::LeafFiles {
                    cert: c.clone(),
                    key: k.clone(),
                },
                _ => {
                    let ips: Vec<String> = cfg.sip.tls.iter().map(|a| a.ip().to_string()).collect();
                    let mut names: Vec<&str> = ips.iter().map(String::as_str).collect();
                    names.push("localhost");
                    pki::load_or_create(&cfg.node.data_dir.join("tls"), "node", &names)?
                }
            };
            let cert = std::fs::read(&files.cert)
                .with_context(|| format!("reading {}", files.cert.display()))?;
            let key = std::fs::read(&files.key)
                .with_context(|| format!("reading {}", files.key.display()))?;
            tc.tls_server = Some(tls::server_config(&cert, &key, None)?);
        }
        let (transports, incoming) = Transports::bind(tc).await?;

        let mut seed = [0u8; 8];
        rng.fill(&mut seed).map_err(|_| anyhow!("no randomness"))?;
        let (endpoint, events) = Endpoint::start(
            transports.clone(),
            incoming,
            TxnConfig {
                tag_seed: u64::from_le_bytes(seed),
                max_transactions: cfg.sip.max_transactions,
                ..TxnConfig::default()
            },
            8192,
        );
        let base_directory = directory.clone();
        let registrar = Registrar::new(
            RegistrarConfig {
                realm: cfg.auth.realm.clone(),
                min_expires: cfg.registrar.min_expires,
                max_expires: cfg.registrar.max_expires,
                default_expires: cfg.registrar.default_expires,
                nonce_max_age_secs: cfg.auth.nonce_max_age_secs,
                max_contacts_per_aor: cfg.registrar.max_contacts_per_aor,
                lockout: LockoutConfig {
                    max_failures: cfg.auth.lockout_max_failures,
                    window_secs: cfg.auth.lockout_window_secs,
                    lockout_secs: cfg.auth.lockout_secs,
                },
                node_id: cfg.node.id.clone(),
                algorithms: cfg
                    .auth
                    .algorithms
                    .iter()
                    .filter_map(|a| a.parse::<Algorithm>().ok())
                    .collect(),
                local_addrs: [Transport::Udp, Transport::Tcp, Transport::Tls]
                    .iter()
                    .flat_map(|t| transports.local_addrs(*t))
                    .collect(),
            },
            directory,
            nonce_key,
        );
        let sent_by = transports
            .local_addr(Transport::Udp)
            .or_else(|| transports.local_addr(Transport::Tcp))
            .or_else(|| transports.local_addr(Transport::Tls))
            .ok_or_else(|| anyhow!("no SIP listener"))?;
        let b2b_rng = SystemRandom::new();
        let b2bua = B2bua::new(
            B2buaConfig {
                session_expires: cfg.b2bua.session_expires,
                min_se: cfg.b2bua.min_se,
                ..B2buaConfig::new(
                    cfg.node.id.clone(),
                    cfg.auth.realm.clone(),
                    format!("sip:{}@{sent_by}", cfg.node.id),
                    sent_by.to_string(),
                )
            },
            Box::new(move || {
                let mut b = [0u8; 8];
                let _ = b2b_rng.fill(&mut b);
                b
            }),
        );
        let (stop, stop_rx) = watch::channel(false);
        let core = Core {
            endpoint,
            registrar,
            b2bua,
            authenticate_calls: !cfg.auth.danger_unauthenticated_calls,
            outbound: cfg
                .outbound
                .as_ref()
                .map(|o| Flow::to(o.transport_kind(), o.next_hop)),
            next_id: 1,
            base_directory,
            users_version: 0,
            node_id: cfg.node.id.clone(),
            store,
            rng,
            pending: HashMap::new(),
            reported: (0, 0),
        };
        let task = tokio::spawn(core.run(events, peer_events, tick, stop_rx));
        for t in [Transport::Udp, Transport::Tcp, Transport::Tls] {
            for a in transports.local_addrs(t) {
                tracing::info!(transport = %t, addr = %a, node = %cfg.node.id, "listening");
            }
        }
        Ok(Node {
            transports: Some(transports),
            stop,
            task,
        })
    }

    /// The bound addresses of `transport` (none on a witness).
    pub fn local_addrs(&self, transport: Transport) -> Vec<SocketAddr> {
        self.transports
            .as_ref()
            .map(|t| t.local_addrs(transport))
            .unwrap_or_default()
    }

    /// Stops the request loop and closes the transports.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        tracing::info!("stopped");
    }
}

/// Reads the nonce secret, or writes a new random one (owner-only file).
fn load_or_create_secret(path: &Path, rng: &SystemRandom) -> Result<Vec<u8>> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return hex::decode(text.trim()).with_context(|| format!("{}: not hex", path.display()));
    }
    let mut s = [0u8; 32];
    rng.fill(&mut s).map_err(|_| anyhow!("no randomness"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(hex::encode(s).as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(s.to_vec())
}

/// The request loop: owns the cores and the store.
struct Core {
    endpoint: Endpoint,
    registrar: Registrar,
    b2bua: B2bua,
    /// Initial INVITEs must carry the caller's digest credentials.
    authenticate_calls: bool,
    /// Where calls to numbers that are not local users go.
    outbound: Option<Flow>,
    /// Node-wide proposal ids: every entry is numbered here, whichever core
    /// made it, so the state applies them in order.
    next_id: u64,
    /// The users of the configuration; the replicated state's users are
    /// laid over them.
    base_directory: Directory,
    /// The version of the replicated users last laid over the directory.
    users_version: u64,
    /// This node's id (the owner name of its calls).
    node_id: String,
    store: NodeStore,
    rng: SystemRandom,
    /// Requests waiting for their proposal to commit.
    pending: HashMap<ProposalId, (TxnKey, Pending)>,
    /// Registrar counters already turned into metrics (failures, lockouts).
    reported: (u64, u64),
}

impl Core {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut peer_events: Option<mpsc::Receiver<PeerEvent>>,
        raft_tick: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut raft_ticker = tokio::time::interval(raft_tick);
        let replicated = peer_events.is_some();
        loop {
            let peer_event = async {
                match peer_events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let deadline = self.b2bua.poll_timeout();
            let b2b_timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.event(ev).await,
                    None => break,
                },
                () = b2b_timer => {
                    self.b2bua.handle_timeout(now());
                    self.drain_b2bua().await;
                }
                _ = tick.tick() => self.housekeeping(),
                _ = raft_ticker.tick(), if replicated => self.store.tick(unix_now(), &mut self.next_id),
                ev = peer_event => match ev {
                    Some(ev) => self.store.peer_event(ev, &mut self.next_id),
                    None => break,
                },
                _ = stop.changed() => break,
            }
            if replicated {
                // Take what else is queued already, so that one Ready (one
                // fsync, one append per peer) covers all of it.
                for _ in 0..BATCH {
                    let mut more = false;
                    if let Ok(ev) = events.try_recv() {
                        self.event(ev).await;
                        more = true;
                    }
                    if let Some(rx) = peer_events.as_mut()
                        && let Ok(ev) = rx.try_recv()
                    {
                        self.store.peer_event(ev, &mut self.next_id);
                        more = true;
                    }
                    if !more {
                        break;
                    }
                }
            }
            if let Err(e) = self.progress().await {
                // A replica that cannot persist must not vote or acknowledge.
                tracing::error!(error = %e, "raft replica failed: node stops");
                break;
            }
        }
        self.store.close();
    }

    /// Runs the store's Ready loop and answers the requests whose proposals
    /// committed (or were given up: 503).
    async fn progress(&mut self) -> Result<()> {
        let p = self.store.process()?;
        let (users, version) = self.store.state().users();
        if version != self.users_version {
            let mut d = self.base_directory.clone();
            for (name, u) in users {
                d.insert(name.clone(), u.clone());
            }
            *self.registrar.directory_mut() = d;
            self.users_version = version;
            tracing::info!(users = users.len(), "replicated directory users loaded");
        }
        for id in p.committed {
            if let Some((key, pending)) = self.pending.remove(&id) {
                let resp = self.registrar.committed(pending, self.store.state());
                self.respond(key, resp).await;
            }
        }
        for id in p.dropped {
            metrics::counter!(m::PROPOSALS_DROPPED).increment(1);
            if let Some((key, pending)) = self.pending.remove(&id) {
                let tag = hex::encode(self.random());
                let resp = pending
                    .request()
                    .response(503, "Service Unavailable (not replicated)", Some(&tag))
                    .with(HeaderName::RetryAfter, "1");
                self.respond(key, resp).await;
            }
        }
        Ok(())
    }

    fn random(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        let _ = self.rng.fill(&mut b);
        b
    }

    fn housekeeping(&mut self) {
        let now = unix_now();
        let id = ProposalId(self.next_id);
        self.next_id += 1;
        self.store.expire(now, id);
        self.registrar.purge(now);
        metrics::gauge!(m::REGISTRATIONS).set(self.store.state().binding_count() as f64);
        metrics::gauge!(m::OWNED_CALLS).set(self.store.owned_calls(&self.node_id) as f64);
    }

    /// Sends a response on server transaction `key`, counting it by method
    /// (from its CSeq) and code, whichever core made it.
    async fn respond(&self, key: TxnKey, resp: Message) {
        let method = resp.method().map(|m| m.to_string()).unwrap_or_default();
        let code = resp.status().unwrap_or(0).to_string();
        metrics::counter!(m::RESPONSES, "method" => method, "code" => code).increment(1);
        if let Err(e) = self.endpoint.send_response(key, resp).await {
            tracing::debug!(error = %e, "response not sent");
        }
    }

    async fn event(&mut self, ev: Event) {
        let input = match ev {
            Event::Request { key, flow, msg } => return self.request(key, flow, msg).await,
            Event::Response { key, msg, .. } => b2bua::Input::Response { key, msg },
            Event::StrayResponse { msg, .. } => match TxnKey::client(&msg) {
                Ok(key) => b2bua::Input::Response { key, msg },
                Err(_) => return,
            },
            Event::Timeout { key, .. } | Event::TransportError { key } => {
                b2bua::Input::Timeout { key }
            }
            Event::Cancelled { invite, .. } => b2bua::Input::Cancelled { invite },
            Event::Ack { msg, .. } => b2bua::Input::Ack { msg },
        };
        self.feed_b2bua(input).await;
    }

    async fn feed_b2bua(&mut self, input: b2bua::Input) {
        if let Err(e) = self.b2bua.handle(now(), input, self.store.state()) {
            tracing::debug!(error = %e, "B2BUA refused an input");
        }
        self.drain_b2bua().await;
    }

    async fn request(&mut self, key: TxnKey, flow: Flow, msg: Message) {
        let Some(method) = msg.method() else {
            return;
        };
        metrics::counter!(m::REQUESTS, "method" => method.to_string()).increment(1);
        let caps = Caps {
            methods: METHODS,
            ..Caps::default()
        };
        if let Err(r) = check_request(&msg, &caps) {
            let tag = hex::encode(self.random());
            let resp = r.response_to(&msg, Some(&tag));
            self.respond(key, resp).await;
            return;
        }
        let in_dialog = msg.to().is_ok_and(|t| t.tag().is_some());
        match method {
            Method::Register => self.register(key, flow, msg).await,
            Method::Options if !in_dialog => {
                let tag = hex::encode(self.random());
                let allow: Vec<&str> = METHODS.iter().map(Method::as_str).collect();
                let resp = msg
                    .response(200, "OK", Some(&tag))
                    .with(HeaderName::Allow, &allow.join(", "))
                    .with(HeaderName::Accept, "application/sdp")
                    .with(HeaderName::Supported, "path, outbound, 100rel, timer")
                    .with_named(
                        "X-Sipzone-Load",
                        &format!(
                            "calls={};registrations={}",
                            self.b2bua.call_count(),
                            self.store.state().binding_count()
                        ),
                    );
                self.respond(key, resp).await;
            }
            Method::Invite | Method::Message if !in_dialog => {
                self.initial_request(key, flow, msg).await
            }
            _ => {
                self.feed_b2bua(b2bua::Input::Request { key, flow, msg })
                    .await
            }
        }
    }

    /// An initial INVITE or MESSAGE: the caller authenticates (unless the
    /// bench knob says otherwise), then a local user's call or message goes
    /// to the B2BUA's location lookup, another number to the outbound next
    /// hop, or 404.
    async fn initial_request(&mut self, key: TxnKey, flow: Flow, msg: Message) {
        if self.authenticate_calls {
            let random = self.random();
            let checked = self.registrar.authenticate_caller(
                unix_now(),
                random,
                flow.remote,
                flow.transport.via_token(),
                &msg,
                self.store.state(),
            );
            self.report_registrar_stats();
            if let Err(resp) = checked {
                return self.respond(key, *resp).await;
            }
        }
        let callee = msg
            .request_uri()
            .and_then(|u| u.as_sip().and_then(|s| s.user_decoded()))
            .and_then(|u| String::from_utf8(u).ok());
        let local = callee
            .as_deref()
            .is_some_and(|u| self.registrar.directory().user(u).is_some());
        let input = match (local, self.outbound) {
            (true, _) => b2bua::Input::Request { key, flow, msg },
            (false, Some(next_hop)) if callee.is_some() => b2bua::Input::Outbound {
                key,
                flow,
                msg,
                next_hop,
            },
            _ => {
                let tag = hex::encode(self.random());
                let resp = msg.response(404, "Not Found", Some(&tag));
                return self.respond(key, resp).await;
            }
        };
        self.feed_b2bua(input).await;
    }

    /// Performs what the B2BUA asked for.
    async fn drain_b2bua(&mut self) {
        while let Some(out) = self.b2bua.poll_output() {
            match out {
                b2bua::Output::SendRequest { target, msg } => {
                    let Some(flow) = resolve(&target, &msg) else {
                        tracing::warn!(?target, "no route to a call target");
                        continue;
                    };
                    if let Err(e) = self.endpoint.send_request(flow, msg).await {
                        tracing::debug!(error = %e, "B2BUA request not sent");
                    }
                }
                b2bua::Output::SendResponse { key, msg } => self.respond(key, msg).await,
                b2bua::Output::SendAck { target, msg } => {
                    if let Some(flow) = resolve(&target, &msg)
                        && let Err(e) = self.endpoint.transports().send(&flow, &msg).await
                    {
                        tracing::debug!(error = %e, "ACK not sent");
                    }
                }
                b2bua::Output::Cancel { key } => {
                    if let Err(e) = self.endpoint.cancel(key).await {
                        tracing::debug!(error = %e, "CANCEL not sent");
                    }
                }
                b2bua::Output::Propose(entry) => {
                    self.propose(entry);
                }
            }
        }
        metrics::gauge!(m::ACTIVE_CALLS).set(self.store.state().call_count() as f64);
    }

    /// Numbers `entry` from the node-wide counter and hands it to the store;
    /// returns its id.
    fn propose(&mut self, mut entry: crate::state::Entry) -> ProposalId {
        entry.id = ProposalId(self.next_id);
        self.next_id += 1;
        let id = entry.id;
        self.store.propose(entry);
        id
    }

    async fn register(&mut self, key: TxnKey, flow: Flow, msg: Message) {
        let now = unix_now();
        let random = self.random();
        let outcome = self.registrar.handle(
            now,
            random,
            flow.remote,
            flow.transport.via_token(),
            &msg,
            self.store.state(),
        );
        self.report_registrar_stats();
        match outcome {
            Outcome::Respond(resp) => self.respond(key, resp).await,
            Outcome::Propose { entry, pending } => {
                let id = self.propose(entry);
                self.pending.insert(id, (key, pending));
            }
        }
    }

    fn report_registrar_stats(&mut self) {
        let s = self.registrar.stats();
        let (f, l) = (s.auth_failures, s.lockouts);
        if f > self.reported.0 {
            metrics::counter!(m::AUTH_FAILURES).increment(f - self.reported.0);
        }
        if l > self.reported.1 {
            metrics::counter!(m::LOCKOUTS).increment(l - self.reported.1);
        }
        self.reported = (f, l);
    }
}

/// The flow a B2BUA target resolves to: the top Route (a Path entry) if the
/// message has one, else the Request-URI's host and port, or the address the
/// binding registered from when the Contact names another host (NAT).
fn resolve(target: &Target, msg: &Message) -> Option<Flow> {
    if let Target::Peer { flow } = target {
        return Some(*flow);
    }
    let transport = target.transport();
    if let Some(route) = msg.values(HeaderName::Route).next() {
        let inner = route.trim_start_matches('<');
        let inner = inner.split('>').next().unwrap_or(inner);
        return uri_flow(inner, transport);
    }
    let by_contact = msg.request_uri_str().and_then(|u| uri_flow(u, transport));
    // The address the REGISTER came from is used when the Contact names
    // another host (a phone behind NAT writes its private address); a
    // Contact on the same host is taken as written, port included (a
    // third-party registration for another process on that host).
    if let Target::Binding {
        received: Some(r), ..
    } = target
        && let Some((t, addr)) = r.split_once(':')
        && let (Some(t), Ok(addr)) = (Transport::from_token(t), addr.parse::<SocketAddr>())
        && by_contact.is_none_or(|c| c.remote.ip() != addr.ip())
    {
        return Some(Flow::to(t, addr));
    }
    by_contact
}

/// A flow to the host and port of a SIP URI with a literal IP address.
fn uri_flow(uri: &str, transport: Transport) -> Option<Flow> {
    let Ok(Uri::Sip(u)) = Uri::parse(uri) else {
        return None;
    };
    let ip = u.host.ip()?;
    let t = u
        .transport()
        .and_then(Transport::from_token)
        .unwrap_or(transport);
    let port = u.port.unwrap_or(t.default_port());
    Some(Flow::to(t, SocketAddr::new(ip, port)))
}
