//! The Raft transport between nodes (DESIGN §7): QUIC (quinn) with mutual
//! TLS 1.3 under the cluster CA, ALPN `sipzone-raft/1`. A node presenting a
//! certificate the cluster CA did not sign is refused in the handshake.
//!
//! ```text
//!   Replica ──Output::Send──▶ Peers::send ──▶ per-peer queue ──▶ peer task
//!                                                   one uni stream, frames in order
//!                                                   MsgSnapshot: its own stream, in chunks
//!   accept loop ──▶ stream reader ──▶ PeerEvent::Message ──▶ node loop ──▶ Replica::step
//! ```
//!
//! Frames are a 4-byte big-endian length and a protobuf-encoded raft-rs
//! `Message`. A peer task that cannot connect or write drops what is queued
//! (Raft retransmits), reports the peer unreachable, and reconnects with a
//! growing delay (100 ms to 1 s). Queues are bounded: a message that does
//! not fit is dropped, as the network would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use sip::transport::tls;
use tokio::sync::mpsc;

/// The ALPN protocol of the Raft transport.
pub const ALPN: &[u8] = b"sipzone-raft/1";
/// The DNS name every node certificate carries and every node expects.
pub const CLUSTER_NAME: &str = "sipzone-cluster";
/// Largest frame accepted (a snapshot of the whole state).
const MAX_FRAME: usize = 1 << 30;
/// Largest write of a snapshot frame at a time.
const CHUNK: usize = 64 * 1024;
/// Messages queued per peer before new ones are dropped.
const QUEUE: usize = 4096;

/// Why the peer transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The certificates or keys were refused.
    #[error("cluster TLS: {0}")]
    Tls(String),
    /// The QUIC endpoint could not bind.
    #[error("binding the Raft endpoint on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// An operator's request (`sipzone-node member ...`, `sipzone-node user
/// ...`) over the cluster's mutual TLS: only holders of a cluster
/// certificate can ask.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AdminRequest {
    /// A membership change (joint consensus when it has several parts).
    Members {
        /// Voters to add (or learners to promote).
        add_voters: Vec<u64>,
        /// Learners to add.
        add_learners: Vec<u64>,
        /// Members to remove.
        remove: Vec<u64>,
        /// The new member's Raft listener and zone, announced to every replica.
        member: Option<crate::cluster::Member>,
    },
    /// Adds or replaces a directory user (HA1 values, computed by the client).
    PutUser {
        /// The digest user name.
        name: String,
        /// Its credentials.
        user: crate::directory::User,
    },
    /// Removes a directory user.
    RemoveUser {
        /// The digest user name.
        name: String,
    },
}

/// The answer to an [`AdminRequest`]: the configuration after it, or why not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AdminReply {
    /// Applied: the voters and learners now.
    Done {
        /// Voter ids.
        voters: Vec<u64>,
        /// Learner ids.
        learners: Vec<u64>,
    },
    /// The change is committed (users).
    Committed,
    /// Refused or failed.
    Failed(String),
}

/// What the transport hands to the node loop.
#[derive(Debug)]
pub enum PeerEvent {
    /// An operator's membership change; answer on `reply`.
    Admin(AdminRequest, tokio::sync::oneshot::Sender<AdminReply>),
    /// A Raft message from a peer.
    Message(Box<Message>),
    /// Peer `id` could not be reached.
    Unreachable(u64),
    /// Sending a snapshot to peer `id` finished (`true`) or failed.
    Snapshot(u64, bool),
}

/// The PEM material of a node's cluster identity.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The cluster CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// This node's certificate chain, signed by the cluster CA.
    pub cert_pem: Vec<u8>,
    /// This node's private key.
    pub key_pem: Vec<u8>,
}

fn tls_err(e: impl std::fmt::Display) -> PeerError {
    PeerError::Tls(e.to_string())
}

fn quic_configs(id: &Identity) -> Result<(quinn::ServerConfig, quinn::ClientConfig), PeerError> {
    let provider = tls::provider();
    let chain = tls::certs_from_pem(&id.cert_pem).map_err(tls_err)?;
    let key = tls::key_from_pem(&id.key_pem).map_err(tls_err)?;
    let roots = tls::root_store(&id.ca_pem).map_err(tls_err)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(tls_err)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(tls_err)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(500)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(3)).map_err(tls_err)?,
    ));
    let transport = Arc::new(transport);
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_err)?,
    ));
    sc.transport_config(transport.clone());
    let mut cc = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls_err)?,
    ));
    cc.transport_config(transport);
    Ok((sc, cc))
}

/// The Raft transport of one node.
#[derive(Debug)]
pub struct Peers {
    endpoint: quinn::Endpoint,
    addrs: Arc<Mutex<HashMap<u64, SocketAddr>>>,
    queues: HashMap<u64, mpsc::Sender<Message>>,
    events: mpsc::Sender<PeerEvent>,
    refused: Arc<Refused>,
}

/// Connections refused in the handshake (metric and test signal).
#[derive(Debug, Default)]
struct Refused {
    count: std::sync::atomic::AtomicU64,
    notify: tokio::sync::Notify,
}

impl Peers {
    /// Binds `listen`, accepts peers and returns the transport and the
    /// stream of what peers send.
    pub fn start(
        listen: SocketAddr,
        identity: &Identity,
        addrs: HashMap<u64, SocketAddr>,
    ) -> Result<(Peers, mpsc::Receiver<PeerEvent>), PeerError> {
        let (sc, cc) = quic_configs(identity)?;
        let mut endpoint =
            quinn::Endpoint::server(sc, listen).map_err(|source| PeerError::Bind {
                addr: listen,
                source,
            })?;
        endpoint.set_default_client_config(cc);
        let (tx, rx) = mpsc::channel(QUEUE);
        let refused = Arc::new(Refused::default());
        tokio::spawn(accept_loop(endpoint.clone(), tx.clone(), refused.clone()));
        Ok((
            Peers {
                endpoint,
                addrs: Arc::new(Mutex::new(addrs)),
                queues: HashMap::new(),
                events: tx,
                refused,
            },
            rx,
        ))
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Sets (or changes) the address of peer `id`.
    pub fn set_addr(&self, id: u64, addr: SocketAddr) {
        if let Ok(mut a) = self.addrs.lock() {
            a.insert(id, addr);
        }
    }

    /// Queues `msg` for peer `msg.to`; never waits.
    pub fn send(&mut self, msg: Message) {
        let to = msg.to;
        let q = self.queues.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(peer_task(
                to,
                self.endpoint.clone(),
                self.addrs.clone(),
                rx,
                self.events.clone(),
            ));
            tx
        });
        if q.try_send(msg).is_err() {
            tracing::debug!(peer = to, "raft queue full: message dropped");
        }
    }

    /// Connections refused in the handshake so far.
    pub fn refused(&self) -> u64 {
        self.refused
            .count
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until a connection is refused after this call.
    pub async fn next_refusal(&self) {
        self.refused.notify.notified().await;
    }

    /// Closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"stopping");
    }
}

fn frame(msg: &Message) -> Option<Vec<u8>> {
    let body = msg.write_to_bytes().ok()?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&u32::try_from(body.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&body);
    Some(out)
}

async fn peer_task(
    id: u64,
    endpoint: quinn::Endpoint,
    addrs: Arc<Mutex<HashMap<u64, SocketAddr>>>,
    mut queue: mpsc::Receiver<Message>,
    events: mpsc::Sender<PeerEvent>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut conn: Option<(quinn::Connection, quinn::SendStream)> = None;
    while let Some(msg) = queue.recv().await {
        if conn
            .as_ref()
            .is_some_and(|(c, _)| c.close_reason().is_some())
        {
            conn = None;
        }
        if conn.is_none() {
            let addr = addrs.lock().ok().and_then(|a| a.get(&id).copied());
            let Some(addr) = addr else {
                tracing::debug!(peer = id, "no address for peer");
                continue;
            };
            match connect(&endpoint, addr).await {
                Ok(c) => {
                    backoff = Duration::from_millis(100);
                    conn = Some(c);
                }
                Err(e) => {
                    tracing::debug!(peer = id, %addr, error = %e, "peer unreachable");
                    let _ = events.try_send(PeerEvent::Unreachable(id));
                    // Drop what piled up while waiting: Raft resends.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    while queue.try_recv().is_ok() {}
                    continue;
                }
            }
        }
        let Some((c, stream)) = conn.as_mut() else {
            continue;
        };
        let Some(bytes) = frame(&msg) else {
            continue;
        };
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            // A snapshot goes on its own stream so heartbeats and appends
            // are not queued behind it.
            let c = c.clone();
            let events = events.clone();
            tokio::spawn(async move {
                let ok = send_snapshot(&c, &bytes).await.is_ok();
                let _ = events.send(PeerEvent::Snapshot(id, ok)).await;
            });
            continue;
        }
        if let Err(e) = stream.write_all(&bytes).await {
            tracing::debug!(peer = id, error = %e, "peer stream failed");
            let _ = events.try_send(PeerEvent::Unreachable(id));
            conn = None;
        }
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<(quinn::Connection, quinn::SendStream), Box<dyn std::error::Error + Send + Sync>> {
    let c = tokio::time::timeout(
        Duration::from_secs(2),
        endpoint.connect(addr, CLUSTER_NAME)?,
    )
    .await??;
    let s = c.open_uni().await?;
    Ok((c, s))
}

async fn send_snapshot(
    c: &quinn::Connection,
    bytes: &[u8],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut s = c.open_uni().await?;
    for chunk in bytes.chunks(CHUNK) {
        s.write_all(chunk).await?;
    }
    s.finish()?;
    s.stopped().await?;
    Ok(())
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    events: mpsc::Sender<PeerEvent>,
    refused: Arc<Refused>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let events = events.clone();
        let refused = refused.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused a Raft peer");
                    refused
                        .count
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    refused.notify.notify_waiters();
                    return;
                }
            };
            loop {
                tokio::select! {
                    uni = conn.accept_uni() => match uni {
                        Ok(stream) => {
                            tokio::spawn(read_frames(stream, events.clone()));
                        }
                        Err(_) => break,
                    },
                    bi = conn.accept_bi() => match bi {
                        Ok((send, recv)) => {
                            tokio::spawn(serve_admin(send, recv, events.clone()));
                        }
                        Err(_) => break,
                    },
                }
            }
        });
    }
}

/// Largest admin request or reply.
const MAX_ADMIN: usize = 64 * 1024;

/// One admin exchange on a bidirectional stream: a JSON request, a JSON
/// reply, each ended by finishing the stream.
async fn serve_admin(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    events: mpsc::Sender<PeerEvent>,
) {
    let reply = match recv.read_to_end(MAX_ADMIN).await {
        Ok(body) => match serde_json::from_slice::<AdminRequest>(&body) {
            Ok(req) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if events.send(PeerEvent::Admin(req, tx)).await.is_err() {
                    AdminReply::Failed("node stopping".into())
                } else {
                    rx.await
                        .unwrap_or_else(|_| AdminReply::Failed("no answer".into()))
                }
            }
            Err(e) => AdminReply::Failed(format!("bad request: {e}")),
        },
        Err(e) => AdminReply::Failed(format!("reading the request: {e}")),
    };
    if let Ok(b) = serde_json::to_vec(&reply) {
        let _ = send.write_all(&b).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

/// Sends `req` to the member listening at `addr` with this node's cluster
/// identity and waits for its reply (at most `limit`).
pub async fn admin(
    identity: &Identity,
    addr: SocketAddr,
    req: &AdminRequest,
    limit: Duration,
) -> Result<AdminReply, PeerError> {
    let (_, cc) = quic_configs(identity)?;
    let local: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let mut ep = quinn::Endpoint::client(local).map_err(|source| PeerError::Bind {
        addr: local,
        source,
    })?;
    ep.set_default_client_config(cc);
    let io = |e: String| PeerError::Tls(e);
    let exchange = async {
        let conn = ep
            .connect(addr, CLUSTER_NAME)
            .map_err(|e| io(e.to_string()))?
            .await
            .map_err(|e| io(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| io(e.to_string()))?;
        let body = serde_json::to_vec(req).map_err(|e| io(e.to_string()))?;
        send.write_all(&body).await.map_err(|e| io(e.to_string()))?;
        send.finish().map_err(|e| io(e.to_string()))?;
        let reply = recv
            .read_to_end(MAX_ADMIN)
            .await
            .map_err(|e| io(e.to_string()))?;
        serde_json::from_slice::<AdminReply>(&reply).map_err(|e| io(e.to_string()))
    };
    let out = tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err(io(format!("no reply from {addr} within {limit:?}"))));
    ep.close(0u32.into(), b"done");
    out
}

async fn read_frames(mut s: quinn::RecvStream, events: mpsc::Sender<PeerEvent>) {
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            tracing::warn!(len, "oversized Raft frame: stream closed");
            let _ = s.stop(1u32.into());
            return;
        }
        let mut body = vec![0u8; len];
        if s.read_exact(&mut body).await.is_err() {
            return;
        }
        match Message::parse_from_bytes(&body) {
            Ok(m) => {
                if events.send(PeerEvent::Message(Box::new(m))).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable Raft frame: stream closed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sip::transport::pki::Ca;

    fn identity(ca: &Ca, ca_pem: &str) -> Identity {
        let leaf = ca.issue(&[CLUSTER_NAME]).unwrap();
        Identity {
            ca_pem: ca_pem.as_bytes().to_vec(),
            cert_pem: leaf.cert_pem.into_bytes(),
            key_pem: leaf.key_pem.into_bytes(),
        }
    }

    fn msg(from: u64, to: u64, t: MessageType, data: usize) -> Message {
        let mut m = Message {
            from,
            to,
            ..Message::default()
        };
        m.set_msg_type(t);
        if data > 0 {
            m.mut_snapshot().data = vec![7u8; data].into();
            m.mut_snapshot().mut_metadata().index = 9;
        }
        m
    }

    #[tokio::test]
    async fn messages_and_chunked_snapshots_cross_and_strangers_are_refused() {
        let ca = Ca::new("cluster").unwrap();
        let ca_pem = ca.cert_pem.clone();
        let lo = "127.0.0.1:0".parse().unwrap();
        let (p1, _rx1) = Peers::start(lo, &identity(&ca, &ca_pem), HashMap::new()).unwrap();
        let (p2, mut rx2) = Peers::start(lo, &identity(&ca, &ca_pem), HashMap::new()).unwrap();
        let mut p1 = p1;
        p1.set_addr(2, p2.local_addr().unwrap());
        p1.send(msg(1, 2, MessageType::MsgHeartbeat, 0));
        p1.send(msg(1, 2, MessageType::MsgSnapshot, 300_000));
        let mut got = vec![];
        while got.len() < 2 {
            match rx2.recv().await.unwrap() {
                PeerEvent::Message(m) => got.push(*m),
                other => panic!("{other:?}"),
            }
        }
        assert!(
            got.iter()
                .any(|m| m.get_msg_type() == MessageType::MsgHeartbeat)
        );
        let snap = got
            .iter()
            .find(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .unwrap();
        assert_eq!(snap.get_snapshot().data.len(), 300_000);

        // A node with a certificate from another CA gets nothing through.
        let other = Ca::new("intruder").unwrap();
        let bad = Identity {
            ca_pem: ca_pem.as_bytes().to_vec(),
            ..identity(&other, &other.cert_pem)
        };
        let (mut p3, _rx3) = Peers::start(lo, &bad, HashMap::new()).unwrap();
        p3.set_addr(2, p2.local_addr().unwrap());
        let refusal = p2.next_refusal();
        p3.send(msg(3, 2, MessageType::MsgHeartbeat, 0));
        refusal.await;
        assert_eq!(p2.refused(), 1);
        p1.send(msg(1, 2, MessageType::MsgHeartbeat, 0));
        match rx2.recv().await.unwrap() {
            PeerEvent::Message(m) => assert_eq!(m.from, 1, "only the member's message arrives"),
            other => panic!("{other:?}"),
        }
    }
}
