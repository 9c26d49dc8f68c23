//! The tokio driver for SIP transports: UDP, TCP and TLS sockets, stream
//! framing, connection reuse and the Via processing of the transport layer
//! (RFC 3261 §18, RFC 3581, RFC 5626 §4.4.1 keep-alives).
//!
//! This module owns the sockets and the connection table; it knows nothing of
//! transactions. Every message that parses is handed to the application as an
//! [`Incoming`] on a bounded channel, tagged with the [`Flow`] it arrived on.
//!
//! ```text
//!   UDP socket ──datagram──┐
//!                          ├─ parse ─ stamp Via (§18.2.1, RFC 3581) ─▶ mpsc<Incoming>
//!   TCP/TLS conn ─frame()──┘    │
//!                               └─ malformed request ─▶ 400/505/513 on the same flow
//!
//!   Transports::send(flow, msg) ─▶ UDP socket of the flow's family
//!                               └▶ connection queue (flow.conn, else by remote, else connect)
//! ```
//!
//! Received requests get `received=<source ip>` on their top Via when the
//! sent-by host differs from the source address, and a valueless `rport` is
//! filled with the source port (which also forces `received`, RFC 3581 §4).
//! Responses are routed by [`response_target`] (RFC 3261 §18.2.2 with RFC 3581).
//!
//! Everything is bounded: the incoming channel, each connection's send queue
//! (a full queue is an error, never growth), the read buffer of a connection
//! (at most [`Limits::max_message`] plus one read), and the number of
//! connections.
//!
//! # Configuration ([`TransportConfig`])
//!
//! | name | type | meaning | default |
//! |---|---|---|---|
//! | `udp` | `Vec<SocketAddr>` | UDP listen addresses (port 0: any free port) | none |
//! | `tcp` | `Vec<SocketAddr>` | TCP listen addresses | none |
//! | `tls` | `Vec<SocketAddr>` | TLS listen addresses (need `tls_server`) | none |
//! | `limits` | [`Limits`] | message, body and header limits on every transport | `Limits::default()` |
//! | `max_connections` | `usize` | open TCP+TLS connections, both directions | 10 000 |
//! | `idle_timeout` | `Duration` | a connection with no traffic (CRLF keep-alives count) is closed | 5 min |
//! | `connect_timeout` | `Duration` | outgoing TCP connect | 10 s |
//! | `handshake_timeout` | `Duration` | TLS handshake, both directions | 10 s |
//! | `write_timeout` | `Duration` | one write to a connection; a peer that does not read is dropped | 10 s |
//! | `incoming_queue` | `usize` | capacity of the [`Incoming`] channel | 1024 |
//! | `conn_queue` | `usize` | messages queued per connection before `send` fails | 64 |
//! | `udp_recv_buffer` | `Option<usize>` | SO_RCVBUF of UDP sockets | system default |
//! | `tls_server` | `Option<Arc<ServerConfig>>` | certificate for TLS listeners ([`tls::server_config`]) | none |
//! | `tls_client` | `Option<Arc<ClientConfig>>` | outgoing TLS ([`tls::client_config`]) | none: TLS sends fail |
//! | `tls_server_name` | `Option<String>` | SNI and verified name for outgoing TLS when none is given | the remote IP |

pub mod metrics;
pub mod pki;
mod tcp;
pub mod tls;
mod udp;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::flow::{ConnId, Flow, Transport};
use crate::msg::{Header, HeaderName, Limits, Message, ParseError, Via};

/// The transport configuration (see the table in the module documentation).
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// UDP listen addresses (port 0 picks a free port: see [`Transports::local_addrs`]).
    pub udp: Vec<SocketAddr>,
    /// TCP listen addresses.
    pub tcp: Vec<SocketAddr>,
    /// TLS listen addresses; they need `tls_server`.
    pub tls: Vec<SocketAddr>,
    /// Size limits applied to every received and sent message.
    pub limits: Limits,
    /// Most open TCP and TLS connections, inbound and outbound together.
    pub max_connections: usize,
    /// A connection without traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Limit on an outgoing TCP connect.
    pub connect_timeout: Duration,
    /// Limit on a TLS handshake.
    pub handshake_timeout: Duration,
    /// Limit on one write to a connection.
    pub write_timeout: Duration,
    /// Capacity of the channel of [`Incoming`] messages.
    pub incoming_queue: usize,
    /// Messages queued per connection before [`Transports::send`] fails.
    pub conn_queue: usize,
    /// SO_RCVBUF for the UDP sockets (`None`: the system default).
    pub udp_recv_buffer: Option<usize>,
    /// Server configuration for the TLS listeners.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// Client configuration for outgoing TLS connections.
    pub tls_client: Option<Arc<rustls::ClientConfig>>,
    /// Server name (SNI, certificate check) for outgoing TLS when the caller
    /// gives none; without it the remote IP address is used.
    pub tls_server_name: Option<String>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            udp: Vec::new(),
            tcp: Vec::new(),
            tls: Vec::new(),
            limits: Limits::default(),
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            incoming_queue: 1024,
            conn_queue: 64,
            udp_recv_buffer: None,
            tls_server: None,
            tls_client: None,
            tls_server_name: None,
        }
    }
}

/// A message received on some transport, with the flow it arrived on.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The parsed message; for requests the top Via carries `received`/`rport`.
    pub msg: Message,
    /// The flow: source address, local address, and connection for TCP/TLS.
    pub flow: Flow,
}

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding a listen address failed.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A configuration value is out of range (the field is named).
    #[error("invalid transport configuration: {0}")]
    InvalidConfig(&'static str),
    /// A socket operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// No UDP socket is bound for the destination's address family.
    #[error("no UDP socket for {0}")]
    NoSocket(SocketAddr),
    /// The message is larger than `Limits::max_message`.
    #[error("message of {len} octets exceeds the limit of {max}")]
    MessageTooLarge {
        /// The message size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The connection limit is reached.
    #[error("connection limit reached")]
    TooManyConnections,
    /// The connection's send queue is full (the peer does not keep up).
    #[error("send queue of connection {0:?} is full")]
    QueueFull(ConnId),
    /// A new connection closed before the message could be queued.
    #[error("connection {0:?} closed")]
    ConnectionClosed(ConnId),
    /// An outgoing TCP connect did not complete in time.
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    /// A TLS handshake did not complete in time.
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(SocketAddr),
    /// TLS is needed but no client configuration was given.
    #[error("no TLS client configuration")]
    NoTlsClientConfig,
    /// The TLS server name is neither a DNS name nor an IP address.
    #[error("invalid TLS server name {0:?}")]
    InvalidServerName(String),
    /// A rustls error (configuration or handshake).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The client CA set cannot build a client verifier.
    #[error("client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    /// A PEM buffer does not parse.
    #[error("PEM: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// A PEM buffer holds no certificate.
    #[error("no certificate in PEM input")]
    NoCertificate,
    /// The response has no usable top Via.
    #[error("no usable Via: {0}")]
    Via(#[source] ParseError),
    /// The Via transport is not UDP, TCP or TLS.
    #[error("unsupported transport {0:?}")]
    UnsupportedTransport(String),
    /// The destination is a host name: resolve it (RFC 3263) before sending.
    #[error("{0} needs name resolution")]
    Unresolved(String),
}

/// Counters since [`Transports::bind`], for tests and status pages (the
/// `metrics` facade carries the same with labels).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Messages handed to the application.
    pub received: u64,
    /// Messages sent (error responses and pongs included).
    pub sent: u64,
    /// Malformed requests answered with an error response.
    pub parse_errors: u64,
    /// Input dropped without an answer.
    pub dropped: u64,
    /// CRLFCRLF pings answered.
    pub keepalives: u64,
    /// Connections established, both directions.
    pub connections_opened: u64,
    /// Inbound connections refused at the limit.
    pub connections_refused: u64,
    /// Connections open now.
    pub connections_open: usize,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    sent: AtomicU64,
    parse_errors: AtomicU64,
    dropped: AtomicU64,
    keepalives: AtomicU64,
    connections_opened: AtomicU64,
    connections_refused: AtomicU64,
}

/// State shared by the handle and the socket tasks.
struct Shared {
    config: TransportConfig,
    udp: Vec<(Arc<UdpSocket>, SocketAddr)>,
    tcp_addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    incoming: mpsc::Sender<Incoming>,
    conns: tcp::ConnTable,
    tls_connector: Option<tokio_rustls::TlsConnector>,
    tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Resolves (with an error) when the last [`Transports`] handle is dropped.
    shutdown: watch::Receiver<()>,
    counters: Counters,
}

/// Dropping the last one stops every socket task.
struct Guard {
    _stop: watch::Sender<()>,
}

/// The transports: a cheap-to-clone handle to the bound sockets and the
/// connection table. Dropping the last clone closes every socket and
/// connection.
#[derive(Clone)]
pub struct Transports {
    shared: Arc<Shared>,
    _guard: Arc<Guard>,
}

impl std::fmt::Debug for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transports")
            .field("udp", &self.local_addrs(Transport::Udp))
            .field("tcp", &self.shared.tcp_addrs)
            .field("tls", &self.shared.tls_addrs)
            .finish()
    }
}

fn label(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
        Transport::Tls => "tls",
    }
}

fn kind(msg: &Message) -> &'static str {
    if msg.is_request() {
        "request"
    } else {
        "response"
    }
}

/// The address with an IPv4-mapped IPv6 address turned into IPv4, so flows
/// and Via comparisons see one form.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[allow(clippy::disallowed_methods)] // the driver owns the clock
fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

impl Transports {
    /// Binds every configured listen address and starts the socket tasks.
    /// Returns the handle and the channel of received messages.
    pub async fn bind(
        config: TransportConfig,
    ) -> Result<(Transports, mpsc::Receiver<Incoming>), TransportError> {
        if config.max_connections == 0 {
            return Err(TransportError::InvalidConfig("max_connections"));
        }
        if config.incoming_queue == 0 {
            return Err(TransportError::InvalidConfig("incoming_queue"));
        }
        if config.conn_queue == 0 {
            return Err(TransportError::InvalidConfig("conn_queue"));
        }
        if config.idle_timeout.is_zero() {
            return Err(TransportError::InvalidConfig("idle_timeout"));
        }
        if config.limits.max_message == 0 {
            return Err(TransportError::InvalidConfig("limits.max_message"));
        }
        if !config.tls.is_empty() && config.tls_server.is_none() {
            return Err(TransportError::InvalidConfig("tls_server"));
        }

        let mut udp = Vec::with_capacity(config.udp.len());
        for &addr in &config.udp {
            let sock = udp::bind(addr, config.udp_recv_buffer)
                .map_err(|source| TransportError::Bind { addr, source })?;
            let local = sock.local_addr()?;
            udp.push((Arc::new(sock), local));
        }
        let mut listeners = Vec::new();
        let (mut tcp_addrs, mut tls_addrs) = (Vec::new(), Vec::new());
        for (t, addrs, out) in [
            (Transport::Tcp, &config.tcp, &mut tcp_addrs),
            (Transport::Tls, &config.tls, &mut tls_addrs),
        ] {
            for &addr in addrs {
                let l = tcp::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
                out.push(l.local_addr()?);
                listeners.push((t, l));
            }
        }

        let (stop, shutdown) = watch::channel(());
        let (tx, rx) = mpsc::channel(config.incoming_queue);
        let shared = Arc::new(Shared {
            tls_connector: config
                .tls_client
                .clone()
                .map(tokio_rustls::TlsConnector::from),
            tls_acceptor: config
                .tls_server
                .clone()
                .map(tokio_rustls::TlsAcceptor::from),
            config,
            udp,
            tcp_addrs,
            tls_addrs,
            incoming: tx,
            conns: tcp::ConnTable::default(),
            shutdown,
            counters: Counters::default(),
        });
        for (sock, local) in &shared.udp {
            tracing::info!(%local, "SIP UDP listening");
            tokio::spawn(udp::run(shared.clone(), sock.clone(), *local));
        }
        for (t, l) in listeners {
            if let Ok(local) = l.local_addr() {
                tracing::info!(%local, transport = %t, "SIP listening");
            }
            tokio::spawn(tcp::accept_loop(shared.clone(), l, t));
        }
        let handle = Transports {
            shared,
            _guard: Arc::new(Guard { _stop: stop }),
        };
        Ok((handle, rx))
    }

    /// The bound local addresses of `transport` (actual ports when 0 was asked).
    pub fn local_addrs(&self, transport: Transport) -> Vec<SocketAddr> {
        match transport {
            Transport::Udp => self.shared.udp.iter().map(|(_, a)| *a).collect(),
            Transport::Tcp => self.shared.tcp_addrs.clone(),
            Transport::Tls => self.shared.tls_addrs.clone(),
        }
    }

    /// The first bound local address of `transport`.
    pub fn local_addr(&self, transport: Transport) -> Option<SocketAddr> {
        self.local_addrs(transport).first().copied()
    }

    /// Counters since bind.
    pub fn stats(&self) -> TransportStats {
        let c = &self.shared.counters;
        TransportStats {
            received: c.received.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            parse_errors: c.parse_errors.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            keepalives: c.keepalives.load(Ordering::Relaxed),
            connections_opened: c.connections_opened.load(Ordering::Relaxed),
            connections_refused: c.connections_refused.load(Ordering::Relaxed),
            connections_open: self.shared.conns.slots(),
        }
    }

    /// True while connection `id` is open.
    pub fn is_open(&self, id: ConnId) -> bool {
        self.shared.conns.lookup(id).is_some()
    }

    /// True when sending on `flow` needs no new connection: UDP, or a TCP/TLS
    /// flow whose connection (or another to the same remote) is open. A
    /// driver uses it to keep connection setup, which can take seconds, off
    /// its own loop.
    pub fn is_connected(&self, flow: &Flow) -> bool {
        match flow.transport {
            Transport::Udp => true,
            t => {
                flow.conn.is_some_and(|id| self.is_open(id))
                    || self.shared.conns.find(t, canonical(flow.remote)).is_some()
            }
        }
    }

    /// Closes connection `id` once its queued messages are written; false
    /// when it was not open.
    pub fn close(&self, id: ConnId) -> bool {
        self.shared.conns.remove(id)
    }

    /// Sends `msg` on `flow` and returns the flow actually used.
    ///
    /// UDP leaves from the socket bound to `flow.local` when there is one,
    /// else from the first socket of the destination's address family. TCP
    /// and TLS use connection `flow.conn` if it is still open, else an open
    /// connection to `flow.remote`, else a new one (TLS with the configured
    /// client configuration and server name). A full connection queue is an
    /// error, never a wait.
    pub async fn send(&self, flow: &Flow, msg: &Message) -> Result<Flow, TransportError> {
        self.send_with_name(flow, msg, None).await
    }

    /// Like [`Transports::send`], with the TLS server name (SNI, certificate
    /// check) to use if a new TLS connection is opened.
    pub async fn send_with_name(
        &self,
        flow: &Flow,
        msg: &Message,
        server_name: Option<&str>,
    ) -> Result<Flow, TransportError> {
        let r = self.send_inner(flow, msg, server_name).await;
        if let Err(e) = &r {
            self.shared.on_send_error(flow, e);
        }
        r
    }

    async fn send_inner(
        &self,
        flow: &Flow,
        msg: &Message,
        server_name: Option<&str>,
    ) -> Result<Flow, TransportError> {
        let bytes = self.shared.encode(msg)?;
        let used = match flow.transport {
            Transport::Udp => self.shared.send_udp(flow, bytes).await?,
            Transport::Tcp | Transport::Tls => {
                let mut used = None;
                if let Some(id) = flow.conn {
                    used = self.shared.conns.try_send(id, flow.transport, &bytes)?;
                }
                if used.is_none() {
                    used = self.shared.conns.try_send_remote(
                        flow.transport,
                        canonical(flow.remote),
                        &bytes,
                    )?;
                }
                match used {
                    Some(f) => f,
                    None => {
                        let (id, _) =
                            tcp::open(&self.shared, flow.transport, flow.remote, server_name)
                                .await?;
                        self.shared
                            .conns
                            .try_send(id, flow.transport, &bytes)?
                            .ok_or(TransportError::ConnectionClosed(id))?
                    }
                }
            }
        };
        self.shared.on_sent(used.transport, msg, used.remote);
        Ok(used)
    }

    /// Returns an open connection to `remote` or opens one (TLS: checking
    /// `server_name`, else the configured name, else the IP address).
    pub async fn connect(
        &self,
        transport: Transport,
        remote: SocketAddr,
        server_name: Option<&str>,
    ) -> Result<Flow, TransportError> {
        if transport == Transport::Udp {
            return Err(TransportError::UnsupportedTransport("UDP".into()));
        }
        if let Some(f) = self.shared.conns.find(transport, canonical(remote)) {
            return Ok(f);
        }
        Ok(tcp::open(&self.shared, transport, remote, server_name)
            .await?
            .1)
    }

    /// Sends a response to a request that arrived on `incoming` (RFC 3261
    /// §18.2.2, RFC 3581): on TCP/TLS over the same connection while it is
    /// open, else over a connection to the top Via's `received` address and
    /// sent-by port; on UDP from the socket the request arrived on, to
    /// [`response_target`].
    pub async fn send_response(
        &self,
        incoming: &Flow,
        resp: &Message,
    ) -> Result<Flow, TransportError> {
        let r = self.send_response_inner(incoming, resp).await;
        if let Err(e) = &r {
            self.shared.on_send_error(incoming, e);
        }
        r
    }

    async fn send_response_inner(
        &self,
        incoming: &Flow,
        resp: &Message,
    ) -> Result<Flow, TransportError> {
        if incoming.transport.is_reliable() {
            if let Some(id) = incoming.conn {
                let bytes = self.shared.encode(resp)?;
                if let Some(f) = self.shared.conns.try_send(id, incoming.transport, &bytes)? {
                    self.shared.on_sent(f.transport, resp, f.remote);
                    return Ok(f);
                }
            }
            // The connection is gone: open one to received:sent-by-port, on
            // the transport the request used (never downgrade TLS).
            let target = response_target(resp)?;
            let flow = Flow::to(incoming.transport, target.remote);
            return self.send_inner(&flow, resp, None).await;
        }
        let mut target = response_target(resp)?;
        if target.transport != Transport::Udp {
            // The Via names a stream transport but the request came over
            // UDP: answer over UDP (never open a connection a datagram asked
            // for), to the received address and the rport, else the sent-by
            // port, else 5060 (RFC 3261 §18.2.2 for unreliable transports).
            let via = resp.top_via().map_err(TransportError::Via)?;
            let port = match via.rport() {
                Some(Some(p)) => p,
                _ => via.port.unwrap_or(5060),
            };
            target = Flow::to(Transport::Udp, SocketAddr::new(target.remote.ip(), port));
        }
        target.local = incoming.local;
        self.send_inner(&target, resp, None).await
    }
}

impl Shared {
    fn encode(&self, msg: &Message) -> Result<Bytes, TransportError> {
        let bytes = msg.to_bytes();
        let max = self.config.limits.max_message;
        if bytes.len() > max {
            return Err(TransportError::MessageTooLarge {
                len: bytes.len(),
                max,
            });
        }
        Ok(bytes)
    }

    async fn send_udp(&self, flow: &Flow, bytes: Bytes) -> Result<Flow, TransportError> {
        let remote = canonical(flow.remote);
        // Listen sockets are IPv6-only, so the family must match.
        let family = |l: &SocketAddr| l.is_ipv4() == remote.is_ipv4();
        let (sock, local) = self
            .udp
            .iter()
            .find(|(_, l)| Some(*l) == flow.local && family(l))
            .or_else(|| self.udp.iter().find(|(_, l)| family(l)))
            .ok_or(TransportError::NoSocket(remote))?;
        sock.send_to(&bytes, remote).await?;
        Ok(Flow {
            transport: Transport::Udp,
            remote,
            local: Some(*local),
            conn: None,
        })
    }

    fn on_received(&self, t: Transport, msg: &Message, remote: SocketAddr) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::MESSAGES_RECEIVED, "transport" => label(t), "kind" => kind(msg))
            .increment(1);
        tracing::trace!(transport = %t, %remote, kind = kind(msg), "received message");
    }

    fn on_sent(&self, t: Transport, msg: &Message, remote: SocketAddr) {
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::MESSAGES_SENT, "transport" => label(t), "kind" => kind(msg))
            .increment(1);
        tracing::trace!(transport = %t, %remote, kind = kind(msg), "sent message");
    }

    fn on_send_error(&self, flow: &Flow, e: &TransportError) {
        ::metrics::counter!(metrics::SEND_ERRORS, "transport" => label(flow.transport))
            .increment(1);
        tracing::debug!(transport = %flow.transport, remote = %flow.remote, error = %e, "send failed");
    }

    fn on_parse_error(&self, t: Transport, remote: SocketAddr, err: &ParseError) {
        self.counters.parse_errors.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::PARSE_ERRORS, "transport" => label(t)).increment(1);
        tracing::warn!(transport = %t, %remote, error = %err, "malformed request");
    }

    fn on_dropped(&self, t: Transport, remote: SocketAddr, reason: &'static str, err: &ParseError) {
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::DROPPED, "transport" => label(t), "reason" => reason)
            .increment(1);
        tracing::warn!(transport = %t, %remote, reason, error = %err, "dropped input");
    }

    fn on_keepalive(&self, t: Transport) {
        self.counters.keepalives.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::KEEPALIVES, "transport" => label(t)).increment(1);
    }

    /// Hands a received message to the application: applies §18.2.1 and
    /// RFC 3581 to requests, counts, and waits for room on the channel.
    /// False when the transports are shutting down.
    async fn deliver(
        &self,
        mut msg: Message,
        flow: Flow,
        shutdown: &mut watch::Receiver<()>,
    ) -> bool {
        if msg.is_request() {
            stamp_via(&mut msg, flow.remote);
        }
        self.on_received(flow.transport, &msg, flow.remote);
        tokio::select! {
            r = self.incoming.send(Incoming { msg, flow }) => r.is_ok(),
            _ = shutdown.changed() => false,
        }
    }
}

/// Applies RFC 3261 §18.2.1 and RFC 3581 §4 to a received request: adds
/// `received=<source ip>` to the top Via when its sent-by host is not the
/// source address (or when `rport` asks for it), and fills a valueless
/// `rport` with the source port. The other Via values are kept as written.
/// Returns true when the top Via was rewritten.
pub fn stamp_via(msg: &mut Message, source: SocketAddr) -> bool {
    let source = canonical(source);
    let new_top = {
        let Some(top) = msg.values(HeaderName::Via).next() else {
            return false;
        };
        let Ok(via) = Via::parse(top) else {
            return false;
        };
        let fill_rport = via.rport() == Some(None);
        let host_differs = via.host.ip().map(|ip| ip.to_canonical()) != Some(source.ip());
        // A received the sender wrote itself would steer the response
        // (response_target prefers it): only the source address may stand.
        let forged_received = via.params.has("received")
            && via.received().map(|ip| ip.to_canonical()) != Some(source.ip());
        let add_received = fill_rport || host_differs || forged_received;
        if !add_received {
            return false;
        }
        rewrite_via(&via, source, fill_rport)
    };
    msg.pop_front_value(HeaderName::Via);
    msg.push_front(Header::new(HeaderName::Via, &new_top));
    true
}

fn rewrite_via(via: &Via<'_>, source: SocketAddr, fill_rport: bool) -> String {
    let mut out = format!("SIP/2.0/{} {}", via.transport, via.host);
    if let Some(p) = via.port {
        let _ = write!(out, ":{p}");
    }
    // RFC 3261 §25.1: received = IPv4address / IPv6address (no brackets).
    let received = source.ip().to_string();
    let mut wrote_received = false;
    for (name, value) in via.params.iter() {
        if name.eq_ignore_ascii_case("received") {
            if !wrote_received {
                let _ = write!(out, ";received={received}");
                wrote_received = true;
            }
            continue;
        }
        if fill_rport && name.eq_ignore_ascii_case("rport") {
            let _ = write!(out, ";rport={}", source.port());
            continue;
        }
        out.push(';');
        out.push_str(name);
        if let Some(v) = value {
            out.push('=');
            out.push_str(v);
        }
    }
    if !wrote_received {
        let _ = write!(out, ";received={received}");
    }
    out
}

/// Where a response goes when no connection carries it (RFC 3261 §18.2.2,
/// RFC 3581 §4), from its top Via: to the `maddr` address on UDP; else to
/// `received` (or the sent-by host when it is an IP address), at the
/// `rport` value on UDP when there is one, else at the sent-by port or the
/// transport's default port (5060, 5061 for TLS). A sent-by host name needs
/// RFC 3263 resolution: [`TransportError::Unresolved`].
pub fn response_target(resp: &Message) -> Result<Flow, TransportError> {
    let via = resp.top_via().map_err(TransportError::Via)?;
    let transport = Transport::from_token(via.transport)
        .ok_or_else(|| TransportError::UnsupportedTransport(via.transport.to_string()))?;
    let default_port = via.port.unwrap_or(transport.default_port());
    if transport == Transport::Udp
        && let Some(maddr) = via.params.get("maddr").flatten()
    {
        let ip = parse_ip(maddr).ok_or_else(|| TransportError::Unresolved(maddr.to_string()))?;
        return Ok(Flow::to(transport, SocketAddr::new(ip, default_port)));
    }
    let ip = match via.received() {
        Some(ip) => ip,
        None => via
            .host
            .ip()
            .ok_or_else(|| TransportError::Unresolved(via.host.to_string()))?,
    };
    let port = match (transport, via.rport()) {
        (Transport::Udp, Some(Some(p))) => p,
        _ => default_port,
    };
    Ok(Flow::to(transport, canonical(SocketAddr::new(ip, port))))
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    s.parse().ok()
}

/// A reserved place under `max_connections`; released on drop.
struct Slot {
    shared: Arc<Shared>,
    transport: Transport,
}

impl Slot {
    fn reserve(shared: &Arc<Shared>, transport: Transport) -> Option<Slot> {
        let max = shared.config.max_connections;
        shared
            .conns
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        ::metrics::gauge!(metrics::CONNECTIONS_OPEN, "transport" => label(transport))
            .increment(1.0);
        Some(Slot {
            shared: shared.clone(),
            transport,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.conns.count.fetch_sub(1, Ordering::AcqRel);
        ::metrics::gauge!(metrics::CONNECTIONS_OPEN, "transport" => label(self.transport))
            .decrement(1.0);
    }
}

/// Process-wide connection ids, so a [`ConnId`] never names two connections.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

fn next_conn_id() -> ConnId {
    ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::Framing;

    fn req(via: &str) -> Message {
        let s = format!(
            "OPTIONS sip:bob@example.com SIP/2.0\r\nVia: {via}\r\nVia: SIP/2.0/UDP second.example.com;branch=z9hG4bK2\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n\
Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(Bytes::from(s), Framing::Datagram, &Limits::default()).unwrap()
    }

    fn top(m: &Message) -> String {
        m.values(HeaderName::Via).next().unwrap().to_string()
    }

    #[test]
    fn stamp_via_golden() {
        let src: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let cases: &[(&str, Option<&str>)] = &[
            // sent-by equals the source: untouched
            ("SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bKa", None),
            // host name: received added
            (
                "SIP/2.0/UDP pc.example.com;branch=z9hG4bKa",
                Some("SIP/2.0/UDP pc.example.com;branch=z9hG4bKa;received=192.0.2.7"),
            ),
            // rport without value: filled, and received forced (RFC 3581 §4)
            (
                "SIP/2.0/UDP 192.0.2.7:5060;rport;branch=z9hG4bKa",
                Some("SIP/2.0/UDP 192.0.2.7:5060;rport=40000;branch=z9hG4bKa;received=192.0.2.7"),
            ),
            // rport with a value is the sender's business
            (
                "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa;rport=9",
                Some("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa;rport=9;received=192.0.2.7"),
            ),
            // a forged received is replaced in place
            (
                "SIP/2.0/TCP 10.0.0.1;received=10.9.9.9;branch=z9hG4bKa",
                Some("SIP/2.0/TCP 10.0.0.1;received=192.0.2.7;branch=z9hG4bKa"),
            ),
            // ... also when the sent-by is the source address
            (
                "SIP/2.0/UDP 192.0.2.7:5060;received=10.9.9.9;branch=z9hG4bKa",
                Some("SIP/2.0/UDP 192.0.2.7:5060;received=192.0.2.7;branch=z9hG4bKa"),
            ),
            // a received naming the source is left alone
            (
                "SIP/2.0/UDP 192.0.2.7:5060;received=192.0.2.7;branch=z9hG4bKa",
                None,
            ),
        ];
        for (via, want) in cases {
            let mut m = req(via);
            let changed = stamp_via(&mut m, src);
            assert_eq!(changed, want.is_some(), "{via}");
            assert_eq!(top(&m), want.unwrap_or(via), "{via}");
            let vias: Vec<_> = m.values(HeaderName::Via).collect();
            assert_eq!(vias.len(), 2);
            assert_eq!(vias[1], "SIP/2.0/UDP second.example.com;branch=z9hG4bK2");
            // the rewritten message still parses
            Message::parse(m.to_bytes(), Framing::Stream, &Limits::default()).unwrap();
        }
    }

    #[test]
    fn stamp_via_ipv6_and_mapped_sources() {
        let mut m = req("SIP/2.0/UDP [2001:db8::1]:5060;rport;branch=z9hG4bKa");
        assert!(stamp_via(&mut m, "[2001:db8::9]:7000".parse().unwrap()));
        let via = m.top_via().unwrap();
        assert_eq!(via.received(), Some("2001:db8::9".parse().unwrap()));
        assert_eq!(via.rport(), Some(Some(7000)));
        // an IPv4-mapped source is the same host as the IPv4 sent-by
        let mut m = req("SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bKa");
        assert!(!stamp_via(
            &mut m,
            "[::ffff:192.0.2.7]:5060".parse().unwrap()
        ));
    }

    #[test]
    fn response_target_golden() {
        let cases: &[(&str, Option<(Transport, &str)>)] = &[
            (
                "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKa",
                Some((Transport::Udp, "192.0.2.1:5070")),
            ),
            (
                "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKa",
                Some((Transport::Udp, "192.0.2.1:5060")),
            ),
            (
                "SIP/2.0/UDP h.example.com:5070;branch=z9hG4bKa;received=192.0.2.9",
                Some((Transport::Udp, "192.0.2.9:5070")),
            ),
            (
                "SIP/2.0/UDP h.example.com:5070;rport=4000;branch=z9hG4bKa;received=192.0.2.9",
                Some((Transport::Udp, "192.0.2.9:4000")),
            ),
            (
                "SIP/2.0/UDP 192.0.2.1;maddr=239.255.255.1;branch=z9hG4bKa;received=192.0.2.9",
                Some((Transport::Udp, "239.255.255.1:5060")),
            ),
            // reliable: received and the sent-by port, rport ignored
            (
                "SIP/2.0/TCP h.example.com:5070;rport=4000;branch=z9hG4bKa;received=192.0.2.9",
                Some((Transport::Tcp, "192.0.2.9:5070")),
            ),
            (
                "SIP/2.0/TLS 192.0.2.1;branch=z9hG4bKa",
                Some((Transport::Tls, "192.0.2.1:5061")),
            ),
            (
                "SIP/2.0/UDP [2001:db8::1];branch=z9hG4bKa",
                Some((Transport::Udp, "[2001:db8::1]:5060")),
            ),
            ("SIP/2.0/UDP h.example.com;branch=z9hG4bKa", None),
            ("SIP/2.0/SCTP 192.0.2.1;branch=z9hG4bKa", None),
        ];
        for (via, want) in cases {
            let resp = req(via).response(200, "OK", None);
            let got = response_target(&resp).map(|f| (f.transport, f.remote)).ok();
            let want = want.map(|(t, a)| (t, a.parse::<SocketAddr>().unwrap()));
            assert_eq!(got, want, "{via}");
        }
    }
}
