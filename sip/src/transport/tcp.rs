//! Stream connections, shared by TCP and TLS: listeners, the connection
//! table, outgoing connects, and the per-connection task that frames the
//! byte stream (RFC 3261 §18.3), answers keep-alives (RFC 5626 §4.4.1) and
//! writes the connection's bounded send queue.
//!
//! One task owns each connection and both directions of it; the rest of the
//! stack reaches it only through its queue, indexed by [`ConnId`] and by
//! remote address so that both accepted and opened connections are reused.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

use super::{Shared, Slot, TransportError, canonical, label, metrics, next_conn_id, now};
use crate::flow::{ConnId, Flow, Transport};
use crate::msg::{Frame, Framing, Limits, Message, ParseError, error_response, frame};

/// Most octets asked from the socket in one read.
const READ_CHUNK: usize = 16 * 1024;
/// How long a connection closed for a framing error keeps draining input, so
/// that the error response is not lost to a reset.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Most octets drained during the linger.
const LINGER_DRAIN: usize = 64 * 1024;
/// Pause after a failed accept (EMFILE and the like) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds a listening socket (SO_REUSEADDR; IPv6 sockets are IPv6-only so an
/// IPv4 socket can share the port).
pub(super) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

struct Entry {
    flow: Flow,
    tx: mpsc::Sender<Bytes>,
}

#[derive(Default)]
struct Table {
    by_id: HashMap<ConnId, Entry>,
    /// Connections per remote address, oldest first.
    by_remote: HashMap<(Transport, SocketAddr), Vec<ConnId>>,
}

/// Open connections by id and by remote address, and the count of reserved
/// connection slots (handshakes in progress included).
#[derive(Default)]
pub(super) struct ConnTable {
    pub(super) count: AtomicUsize,
    table: Mutex<Table>,
}

impl ConnTable {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table holds no invariant a panicking holder could break half-way.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn slots(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn insert(&self, flow: Flow, tx: mpsc::Sender<Bytes>) {
        let Some(id) = flow.conn else { return };
        let mut t = self.lock();
        t.by_remote
            .entry((flow.transport, flow.remote))
            .or_default()
            .push(id);
        t.by_id.insert(id, Entry { flow, tx });
    }

    /// Forgets connection `id`; its task ends once the queue is drained.
    pub(super) fn remove(&self, id: ConnId) -> bool {
        let mut t = self.lock();
        let Some(e) = t.by_id.remove(&id) else {
            return false;
        };
        let key = (e.flow.transport, e.flow.remote);
        if let Some(ids) = t.by_remote.get_mut(&key) {
            ids.retain(|x| *x != id);
            if ids.is_empty() {
                t.by_remote.remove(&key);
            }
        }
        true
    }

    pub(super) fn lookup(&self, id: ConnId) -> Option<(Flow, mpsc::Sender<Bytes>)> {
        self.lock().by_id.get(&id).map(|e| (e.flow, e.tx.clone()))
    }

    /// The newest open connection to `remote`.
    pub(super) fn find(&self, transport: Transport, remote: SocketAddr) -> Option<Flow> {
        let t = self.lock();
        let id = t.by_remote.get(&(transport, remote))?.last()?;
        t.by_id.get(id).map(|e| e.flow)
    }

    /// Queues `bytes` on connection `id`. `Ok(None)` when it is not open (or
    /// is of another transport); an error when its queue is full.
    pub(super) fn try_send(
        &self,
        id: ConnId,
        transport: Transport,
        bytes: &Bytes,
    ) -> Result<Option<Flow>, TransportError> {
        let Some((flow, tx)) = self.lookup(id) else {
            return Ok(None);
        };
        if flow.transport != transport {
            return Ok(None);
        }
        match tx.try_send(bytes.clone()) {
            Ok(()) => Ok(Some(flow)),
            Err(mpsc::error::TrySendError::Full(_)) => Err(TransportError::QueueFull(id)),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.remove(id);
                Ok(None)
            }
        }
    }

    /// Queues `bytes` on the newest open connection to `remote`.
    pub(super) fn try_send_remote(
        &self,
        transport: Transport,
        remote: SocketAddr,
        bytes: &Bytes,
    ) -> Result<Option<Flow>, TransportError> {
        let ids: Vec<ConnId> = self
            .lock()
            .by_remote
            .get(&(transport, remote))
            .map(|v| v.iter().rev().copied().collect())
            .unwrap_or_default();
        for id in ids {
            if let Some(f) = self.try_send(id, transport, bytes)? {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Enters a connection in the table and returns its flow and queue.
fn register(
    shared: &Arc<Shared>,
    transport: Transport,
    remote: SocketAddr,
    local: Option<SocketAddr>,
    direction: Direction,
) -> (Flow, mpsc::Receiver<Bytes>) {
    let id = next_conn_id();
    let flow = Flow {
        transport,
        remote,
        local,
        conn: Some(id),
    };
    let (tx, rx) = mpsc::channel(shared.config.conn_queue);
    shared.conns.insert(flow, tx);
    shared
        .counters
        .connections_opened
        .fetch_add(1, Ordering::Relaxed);
    ::metrics::counter!(metrics::CONNECTIONS_OPENED,
        "transport" => label(transport), "direction" => direction.label())
    .increment(1);
    tracing::debug!(conn = ?flow.conn, %remote, %transport, direction = direction.label(), "connection open");
    (flow, rx)
}

/// Accepts connections on `listener` until shutdown; refuses (closes) those
/// beyond `max_connections`.
pub(super) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, transport: Transport) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            r = listener.accept() => r,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(%transport, error = %e, "accept failed");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let remote = canonical(remote);
        let Some(slot) = Slot::reserve(&shared, transport) else {
            shared
                .counters
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            ::metrics::counter!(metrics::CONNECTIONS_REFUSED, "transport" => label(transport))
                .increment(1);
            tracing::warn!(%remote, %transport, "connection limit reached: refusing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().map(canonical);
        match (transport, shared.tls_acceptor.clone()) {
            (Transport::Tls, Some(acceptor)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let limit = shared.config.handshake_timeout;
                    let tls = match timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            handshake_failed(transport, remote, Direction::Inbound, &e);
                            return;
                        }
                        Err(_) => {
                            let e = io::Error::from(io::ErrorKind::TimedOut);
                            handshake_failed(transport, remote, Direction::Inbound, &e);
                            return;
                        }
                    };
                    let (flow, rx) =
                        register(&shared, transport, remote, local, Direction::Inbound);
                    run_conn(shared, tls, flow, rx, slot).await;
                });
            }
            (Transport::Tls, None) | (Transport::Udp, _) => {
                // bind() refuses TLS listeners without a server config.
                tracing::warn!(%transport, "listener without configuration: refusing");
            }
            (Transport::Tcp, _) => {
                let (flow, rx) = register(&shared, transport, remote, local, Direction::Inbound);
                tokio::spawn(run_conn(shared.clone(), stream, flow, rx, slot));
            }
        }
    }
}

fn handshake_failed(transport: Transport, remote: SocketAddr, direction: Direction, e: &io::Error) {
    ::metrics::counter!(metrics::TLS_HANDSHAKE_FAILURES,
        "transport" => label(transport), "direction" => direction.label())
    .increment(1);
    tracing::warn!(%remote, direction = direction.label(), error = %e, "TLS handshake failed");
}

/// Opens a connection to `remote` and starts its task.
pub(super) async fn open(
    shared: &Arc<Shared>,
    transport: Transport,
    remote: SocketAddr,
    server_name: Option<&str>,
) -> Result<(ConnId, Flow), TransportError> {
    let remote = canonical(remote);
    let tls = match transport {
        Transport::Udp => return Err(TransportError::UnsupportedTransport("UDP".into())),
        Transport::Tcp => None,
        Transport::Tls => {
            let connector = shared
                .tls_connector
                .clone()
                .ok_or(TransportError::NoTlsClientConfig)?;
            let name = match server_name.or(shared.config.tls_server_name.as_deref()) {
                Some(n) => ServerName::try_from(n.to_string())
                    .map_err(|_| TransportError::InvalidServerName(n.to_string()))?,
                None => ServerName::IpAddress(remote.ip().into()),
            };
            Some((connector, name))
        }
    };
    let slot = Slot::reserve(shared, transport).ok_or(TransportError::TooManyConnections)?;
    let stream = timeout(shared.config.connect_timeout, TcpStream::connect(remote))
        .await
        .map_err(|_| TransportError::ConnectTimeout(remote))??;
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().ok().map(canonical);
    let flow = match tls {
        None => {
            let (flow, rx) = register(shared, transport, remote, local, Direction::Outbound);
            tokio::spawn(run_conn(shared.clone(), stream, flow, rx, slot));
            flow
        }
        Some((connector, name)) => {
            let limit = shared.config.handshake_timeout;
            let tls = match timeout(limit, connector.connect(name, stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    handshake_failed(transport, remote, Direction::Outbound, &e);
                    return Err(tls_error(e));
                }
                Err(_) => {
                    let e = io::Error::from(io::ErrorKind::TimedOut);
                    handshake_failed(transport, remote, Direction::Outbound, &e);
                    return Err(TransportError::HandshakeTimeout(remote));
                }
            };
            let (flow, rx) = register(shared, transport, remote, local, Direction::Outbound);
            tokio::spawn(run_conn(shared.clone(), tls, flow, rx, slot));
            flow
        }
    };
    let id = flow.conn.unwrap_or(ConnId(0));
    Ok((id, flow))
}

/// The rustls error inside a tokio-rustls I/O error, when there is one.
fn tls_error(e: io::Error) -> TransportError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => TransportError::Tls(t.clone()),
        None => TransportError::Io(e),
    }
}

/// What [`decode`] found at the front of a connection's buffer.
#[derive(Debug)]
pub(super) enum Decoded {
    /// More octets are needed.
    Incomplete,
    /// A CRLFCRLF ping: answer CRLF.
    Ping,
    /// A lone CRLF: nothing to do.
    Pong,
    /// A message.
    Message(Message),
    /// Input that does not parse. `reply` is the error response when it was
    /// recognisably a request; `fatal` when the stream cannot be framed any
    /// more and the connection must close.
    Bad {
        /// The parse error.
        err: ParseError,
        /// The error response to send, if any.
        reply: Option<Message>,
        /// Close the connection after replying.
        fatal: bool,
    },
}

/// Takes the next unit off the front of a stream buffer (RFC 3261 §18.3).
pub(super) fn decode(buf: &mut BytesMut, limits: &Limits) -> Decoded {
    match frame(buf, limits) {
        Ok(Frame::Incomplete) => Decoded::Incomplete,
        Ok(Frame::Ping(n)) => {
            buf.advance(n);
            Decoded::Ping
        }
        Ok(Frame::Pong(n)) => {
            buf.advance(n);
            Decoded::Pong
        }
        Ok(Frame::Message(n)) => {
            let bytes = buf.split_to(n).freeze();
            match Message::parse(bytes.clone(), Framing::Stream, limits) {
                Ok(m) => Decoded::Message(m),
                Err(err) => Decoded::Bad {
                    reply: error_response(&bytes, &err),
                    fatal: err.breaks_framing(),
                    err,
                },
            }
        }
        Err(err) => {
            // Where this unit ends is unknown: nothing after it can be framed.
            let reply = error_response(buf, &err);
            buf.clear();
            Decoded::Bad {
                err,
                reply,
                fatal: true,
            }
        }
    }
}

/// Writes and flushes `bytes`, bounded by the write timeout.
async fn write<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8], limit: Duration) -> io::Result<()> {
    timeout(limit, async {
        io.write_all(bytes).await?;
        io.flush().await
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Reads at most `room` octets into `buf` (cancel safe).
async fn read_some<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    room: usize,
) -> io::Result<usize> {
    buf.reserve(room);
    io.take(room as u64).read_buf(buf).await
}

/// Why a connection task ended.
enum End {
    Shutdown,
    Idle,
    Closed,
    Eof,
    ReadError,
    WriteError,
    Framing,
}

impl End {
    fn label(&self) -> &'static str {
        match self {
            End::Shutdown => "shutdown",
            End::Idle => "idle",
            End::Closed => "closed",
            End::Eof => "eof",
            End::ReadError => "read_error",
            End::WriteError => "write_error",
            End::Framing => "framing_error",
        }
    }
}

/// The connection task: reads and frames input, writes the queue, closes on
/// EOF, idle timeout, framing errors, removal from the table or shutdown.
async fn run_conn<S>(
    shared: Arc<Shared>,
    mut io: S,
    flow: Flow,
    mut rx: mpsc::Receiver<Bytes>,
    slot: Slot,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut shutdown = shared.shutdown.clone();
    let limits = shared.config.limits;
    let idle = shared.config.idle_timeout;
    let write_limit = shared.config.write_timeout;
    let mut buf = BytesMut::with_capacity(4096);
    let idle_timer = tokio::time::sleep_until(now() + idle);
    tokio::pin!(idle_timer);
    let end = loop {
        // `decode` fails once more than max_message octets are buffered
        // without a complete message, so the buffer stays below
        // max_message + READ_CHUNK.
        let room = (limits.max_message + 1)
            .saturating_sub(buf.len())
            .clamp(1, READ_CHUNK);
        tokio::select! {
            _ = shutdown.changed() => break End::Shutdown,
            () = &mut idle_timer => break End::Idle,
            out = rx.recv() => {
                let Some(bytes) = out else { break End::Closed };
                if let Err(e) = write(&mut io, &bytes, write_limit).await {
                    tracing::debug!(conn = ?flow.conn, remote = %flow.remote, error = %e, "write failed");
                    break End::WriteError;
                }
                idle_timer.as_mut().reset(now() + idle);
            }
            r = read_some(&mut io, &mut buf, room) => match r {
                Ok(0) => break End::Eof,
                Ok(_) => {
                    idle_timer.as_mut().reset(now() + idle);
                    if let Err(end) =
                        process(&shared, &mut io, &mut buf, &flow, &mut shutdown).await
                    {
                        break end;
                    }
                }
                Err(e) => {
                    tracing::debug!(conn = ?flow.conn, remote = %flow.remote, error = %e, "read failed");
                    break End::ReadError;
                }
            },
        }
    };
    if let Some(id) = flow.conn {
        shared.conns.remove(id);
    }
    rx.close();
    ::metrics::counter!(metrics::CONNECTIONS_CLOSED,
        "transport" => label(flow.transport), "reason" => end.label())
    .increment(1);
    tracing::debug!(conn = ?flow.conn, remote = %flow.remote, reason = end.label(), "connection closed");
    match end {
        End::Framing => {
            // Send FIN (or close_notify) after the error response, then read
            // what the peer still sends so the kernel does not answer it
            // with a reset that would destroy the response.
            let _ = timeout(CLOSE_LINGER, async {
                let _ = io.shutdown().await;
                let mut drained = 0;
                let mut sink = [0u8; 4096];
                while drained < LINGER_DRAIN {
                    match io.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => drained += n,
                    }
                }
            })
            .await;
        }
        End::Shutdown | End::Idle | End::Closed => {
            let _ = timeout(write_limit, io.shutdown()).await;
        }
        End::Eof | End::ReadError | End::WriteError => {}
    }
    drop(slot);
}

/// Handles every complete unit in the buffer.
async fn process<S>(
    shared: &Shared,
    io: &mut S,
    buf: &mut BytesMut,
    flow: &Flow,
    shutdown: &mut watch::Receiver<()>,
) -> Result<(), End>
where
    S: AsyncWrite + Unpin,
{
    let write_limit = shared.config.write_timeout;
    loop {
        match decode(buf, &shared.config.limits) {
            Decoded::Incomplete => return Ok(()),
            Decoded::Pong => {}
            Decoded::Ping => {
                shared.on_keepalive(flow.transport);
                write(io, b"\r\n", write_limit)
                    .await
                    .map_err(|_| End::WriteError)?;
            }
            Decoded::Message(msg) => {
                if !shared.deliver(msg, *flow, shutdown).await {
                    return Err(End::Shutdown);
                }
            }
            Decoded::Bad { err, reply, fatal } => {
                match reply {
                    Some(resp) => {
                        shared.on_parse_error(flow.transport, flow.remote, &err);
                        write(io, &resp.to_bytes(), write_limit)
                            .await
                            .map_err(|_| End::WriteError)?;
                        shared.on_sent(flow.transport, &resp, flow.remote);
                    }
                    None => shared.on_dropped(flow.transport, flow.remote, "garbage", &err),
                }
                if fatal {
                    tracing::warn!(conn = ?flow.conn, remote = %flow.remote, error = %err,
                        "stream cannot be framed: closing");
                    return Err(End::Framing);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{TransportConfig, Transports};

    /// Transports without sockets, and a connection over an in-memory pipe
    /// driven by the real connection task (virtual time is allowed here:
    /// no socket is involved).
    async fn piped(
        config: TransportConfig,
    ) -> (
        Transports,
        mpsc::Receiver<crate::transport::Incoming>,
        tokio::io::DuplexStream,
        Flow,
        tokio::task::JoinHandle<()>,
    ) {
        let (t, rx) = Transports::bind(config).await.unwrap();
        let shared = t.shared.clone();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let slot = Slot::reserve(&shared, Transport::Tcp).unwrap();
        let remote = "192.0.2.1:5000".parse().unwrap();
        let (flow, conn_rx) = register(&shared, Transport::Tcp, remote, None, Direction::Inbound);
        let task = tokio::spawn(run_conn(shared, server, flow, conn_rx, slot));
        (t, rx, client, flow, task)
    }

    #[tokio::test(start_paused = true)]
    #[allow(clippy::disallowed_methods)]
    async fn idle_connections_close_and_keepalives_count_as_activity() {
        let config = TransportConfig {
            idle_timeout: Duration::from_secs(60),
            ..TransportConfig::default()
        };
        let (t, _rx, mut client, flow, task) = piped(config).await;
        let id = flow.conn.unwrap();
        let start = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_secs(50)).await;
        client.write_all(b"\r\n\r\n").await.unwrap();
        let mut pong = [0u8; 2];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"\r\n");
        tokio::time::advance(Duration::from_secs(50)).await;
        tokio::task::yield_now().await;
        assert!(t.is_open(id), "the ping restarted the idle timer");
        task.await.unwrap();
        let closed_after = tokio::time::Instant::now() - start;
        assert!(closed_after >= Duration::from_secs(110), "{closed_after:?}");
        assert!(closed_after < Duration::from_secs(111), "{closed_after:?}");
        assert!(!t.is_open(id));
        assert_eq!(t.stats().connections_open, 0);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_full_connection_queue_is_an_error_not_growth() {
        let (t, rx) = Transports::bind(TransportConfig {
            conn_queue: 2,
            ..TransportConfig::default()
        })
        .await
        .unwrap();
        // A registered connection whose task does not run: nothing drains it.
        let remote = "192.0.2.1:5000".parse().unwrap();
        let (flow, _conn_rx) =
            register(&t.shared, Transport::Tcp, remote, None, Direction::Inbound);
        let msg = Message::parse(
            Bytes::from_static(OPTIONS.as_bytes()),
            Framing::Stream,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(t.send(&flow, &msg).await.unwrap().conn, flow.conn);
        // found by remote address too
        let by_remote = Flow::to(Transport::Tcp, remote);
        assert_eq!(t.send(&by_remote, &msg).await.unwrap().conn, flow.conn);
        let err = t.send(&flow, &msg).await.unwrap_err();
        assert!(matches!(err, TransportError::QueueFull(id) if Some(id) == flow.conn));
        assert_eq!(t.stats().sent, 2);
        // closing forgets it; a TLS flow never matches a TCP connection
        let tls = Flow {
            transport: Transport::Tls,
            ..flow
        };
        assert!(matches!(
            t.send(&tls, &msg).await,
            Err(TransportError::NoTlsClientConfig)
        ));
        assert!(t.close(flow.conn.unwrap()));
        assert!(!t.is_open(flow.conn.unwrap()));
        drop(rx);
    }

    #[tokio::test]
    async fn dropping_the_last_handle_stops_everything() {
        let (t, mut rx, mut client, _flow, task) = piped(TransportConfig {
            udp: vec!["127.0.0.1:0".parse().unwrap()],
            tcp: vec!["127.0.0.1:0".parse().unwrap()],
            ..TransportConfig::default()
        })
        .await;
        let clone = t.clone();
        drop(t);
        client.write_all(OPTIONS.as_bytes()).await.unwrap();
        assert!(rx.recv().await.is_some(), "a clone keeps the transports up");
        drop(clone);
        task.await.unwrap();
        assert!(rx.recv().await.is_none(), "every task ended");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
    }

    const OPTIONS: &str = "OPTIONS sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK1\r\n\
From: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c1\r\n\
CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 3\r\n\r\nabc";

    /// Feeds `chunks` one at a time and collects what decode yields.
    fn run(chunks: &[&[u8]]) -> Vec<String> {
        let limits = Limits::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            loop {
                match decode(&mut buf, &limits) {
                    Decoded::Incomplete => break,
                    Decoded::Ping => out.push("ping".to_string()),
                    Decoded::Pong => out.push("pong".to_string()),
                    Decoded::Message(m) => out.push(format!("msg {}", m.body().len())),
                    Decoded::Bad { reply, fatal, .. } => out.push(format!(
                        "bad {:?} fatal={fatal}",
                        reply.and_then(|r| r.status())
                    )),
                }
            }
        }
        out
    }

    #[test]
    fn frames_split_and_coalesced_input() {
        let m = OPTIONS.as_bytes();
        // every split point of one message yields it exactly once
        for i in 1..m.len() {
            assert_eq!(run(&[&m[..i], &m[i..]]), ["msg 3"], "split at {i}");
        }
        let two = [m, m].concat();
        assert_eq!(run(&[&two]), ["msg 3", "msg 3"]);
        let mixed = [b"\r\n\r\n".as_slice(), m, b"\r\n", m].concat();
        assert_eq!(run(&[&mixed]), ["ping", "msg 3", "pong", "msg 3"]);
    }

    #[test]
    fn malformed_and_oversized_input() {
        // a bad CSeq is answered and the stream goes on
        let bad = OPTIONS.replace("CSeq: 1 OPTIONS", "CSeq: 1 INVITE");
        let input = [bad.as_bytes(), OPTIONS.as_bytes()].concat();
        assert_eq!(run(&[&input]), ["bad Some(400) fatal=false", "msg 3"]);
        // a 10 MB Content-Length breaks framing: 513 and close
        let huge = OPTIONS.replace("Content-Length: 3", "Content-Length: 10000000");
        assert_eq!(run(&[huge.as_bytes()]), ["bad Some(513) fatal=true"]);
        // no Content-Length on a stream
        let no_cl = OPTIONS.replace("Content-Length: 3\r\n", "");
        assert_eq!(run(&[no_cl.as_bytes()]), ["bad Some(400) fatal=true"]);
        // garbage without a request line is dropped silently, and closes
        assert_eq!(
            run(&[b"\x16\x03\x01garbage\r\n\r\n"]),
            ["bad None fatal=true"]
        );
        // headers that never end are bounded by max_message
        let mut endless =
            b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nX: ".to_vec();
        endless.resize(Limits::default().max_message + 10, b'a');
        assert_eq!(run(&[&endless]), ["bad Some(513) fatal=true"]);
    }
}
