//! The scripted test user agent: a UAC that places calls, registers (with
//! digest auth) and sends requests, and a UAS that answers by a policy. Built
//! on the project's stack (`sip::endpoint` over `sip::transport`), so every
//! test that drives it also exercises the stack.
//!
//! In-dialog requests and ACKs go to the flow the dialog-creating request used
//! (the next hop: a proxy, balancer, or the peer itself), with the Request-URI
//! and Route set built from the dialog (RFC 3261 §12.2.1.1).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ring::rand::{SecureRandom, SystemRandom};
use sip::auth::{Challenge, respond};
use sip::dialog::Dialog;
use sip::endpoint::Endpoint;
use sip::flow::{Flow, Transport};
use sip::msg::{Header, HeaderName, Message, Method};
use sip::transport::{TransportConfig, Transports};
use sip::txn::{Config, Event, TxnKey};
use tokio::sync::{mpsc, watch};

/// The methods the UA's UAS side answers (the `Allow` of its responses).
const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, UPDATE, MESSAGE";

/// How the UAS side answers an initial INVITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 180 then 200 after `ring`.
    Accept {
        /// Time between the 180 and the 200.
        ring: Duration,
    },
    /// A final error response with this code.
    Reject(u16),
}

/// Counters of what the UA did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UaStats {
    /// INVITEs answered 200 by the UAS side.
    pub answered: u64,
    /// ACKs received for those 200s.
    pub acked: u64,
    /// BYEs answered 200.
    pub byes: u64,
    /// 2xx retransmitted for lack of an ACK.
    pub retransmitted_2xx: u64,
    /// 200s given up on after 64*T1 without an ACK.
    pub unacked: u64,
    /// Out-of-dialog MESSAGEs answered 200 by the UAS side.
    pub messages: u64,
}

/// Settings of a UA.
#[derive(Debug, Clone)]
pub struct UaConfig {
    /// Transport listeners and TLS settings.
    pub transport: TransportConfig,
    /// User part of Contact and From.
    pub user: String,
    /// Answer policy of the UAS side.
    pub answer: Answer,
    /// Transaction layer settings.
    pub txn: Config,
    /// User name and password to answer 401/407 challenges to INVITEs with.
    pub credentials: Option<(String, String)>,
}

impl Default for UaConfig {
    fn default() -> Self {
        UaConfig {
            transport: TransportConfig::default(),
            user: "testkit".into(),
            answer: Answer::Accept {
                ring: Duration::ZERO,
            },
            txn: Config::default(),
            credentials: None,
        }
    }
}

impl UaConfig {
    /// A UA for one of the local-testing users (`deploy/single-node.toml`):
    /// UDP on an ephemeral 127.0.0.1 port, answering challenges as `user`
    /// with the password `pw` + `user`.
    pub fn local_user(user: &str) -> UaConfig {
        UaConfig {
            transport: TransportConfig {
                udp: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
                ..TransportConfig::default()
            },
            user: user.into(),
            credentials: Some((user.into(), format!("pw{user}"))),
            ..UaConfig::default()
        }
    }
}

/// Registers local-testing `user` of `domain` at the registrar `node`
/// (UDP) with its Contact at `contact`, another process (a SIPp UAS, say):
/// a third-party registration made by local-testing user 1000. Returns the
/// final status. It runs a runtime of its own: call it outside one.
pub fn register_contact_blocking(
    node: SocketAddr,
    domain: &str,
    user: &str,
    contact: SocketAddr,
) -> Result<u16> {
    tokio::runtime::Runtime::new()?.block_on(async {
        let ua = Ua::start(UaConfig::local_user("1000")).await?;
        let r = ua
            .register_contact(
                Flow::to(Transport::Udp, node),
                domain,
                user,
                &format!("pw{user}"),
                3600,
                &format!("<sip:{user}@{contact}>"),
            )
            .await?;
        Ok(r.status().unwrap_or(0))
    })
}

/// An INVITE client transaction the UA waits on.
struct PendingInvite {
    invite: Message,
    key: TxnKey,
    rx: mpsc::UnboundedReceiver<Event>,
    answered_challenge: bool,
}

/// What an INVITE transaction brought.
enum InviteEvent {
    /// A 1xx.
    Provisional(Message),
    /// The final response (after answering one 401/407 when the UA has
    /// credentials).
    Final(Message),
}

impl PendingInvite {
    /// The next response, answering one digest challenge transparently.
    async fn next(&mut self, inner: &Inner, next_hop: Flow) -> Result<InviteEvent> {
        loop {
            match self.rx.recv().await.context("endpoint stopped")? {
                Event::Response { msg, .. } => match msg.status() {
                    Some(s) if s < 200 => return Ok(InviteEvent::Provisional(msg)),
                    Some(401 | 407) if !self.answered_challenge && inner.credentials.is_some() => {
                        self.answered_challenge = true;
                        inner.forget(&self.key);
                        self.invite = inner.with_credentials(&self.invite, &msg, next_hop)?;
                        (self.key, self.rx) =
                            inner.start_client(next_hop, self.invite.clone()).await?;
                    }
                    Some(_) => return Ok(InviteEvent::Final(msg)),
                    None => bail!("response without status"),
                },
                Event::Timeout { timer, .. } => bail!("INVITE timed out (timer {timer:?})"),
                Event::TransportError { .. } => bail!("transport error on INVITE"),
                _ => {}
            }
        }
    }
}

/// Outcome of one call placed by [`Ua::call`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallReport {
    /// Final status of the INVITE.
    pub invite_status: u16,
    /// Final status of the BYE (when the call was answered).
    pub bye_status: Option<u16>,
}

struct Uas2xx {
    acked: watch::Sender<bool>,
    dialog: Dialog,
}

struct Inner {
    endpoint: Endpoint,
    transports: Transports,
    user: String,
    answer: Answer,
    credentials: Option<(String, String)>,
    t1: Duration,
    t2: Duration,
    rng: SystemRandom,
    /// Client transactions someone waits on.
    waiters: Mutex<HashMap<TxnKey, mpsc::UnboundedSender<Event>>>,
    /// UAC: the ACK last sent per Call-ID, resent on 2xx retransmissions.
    acks: Mutex<HashMap<String, (Flow, Message)>>,
    /// UAS: confirmed or early dialogs per Call-ID.
    uas: Mutex<HashMap<String, Uas2xx>>,
    /// UAS: out-of-dialog MESSAGEs received, in order.
    messages: Mutex<Vec<Message>>,
    stats: Mutex<UaStats>,
}

/// A running UA; clones share it.
#[derive(Clone)]
pub struct Ua {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ua {
    /// Binds the transports and starts the UA.
    pub async fn start(cfg: UaConfig) -> Result<Ua> {
        let (transports, incoming) = Transports::bind(cfg.transport.clone())
            .await
            .context("binding the UA's transports")?;
        let mut txn = cfg.txn.clone();
        let rng = SystemRandom::new();
        let mut seed = [0u8; 8];
        rng.fill(&mut seed).map_err(|_| anyhow!("no randomness"))?;
        txn.tag_seed = u64::from_le_bytes(seed);
        let (endpoint, events) = Endpoint::start(transports.clone(), incoming, txn.clone(), 4096);
        let inner = Arc::new(Inner {
            endpoint,
            transports,
            user: cfg.user,
            answer: cfg.answer,
            credentials: cfg.credentials,
            t1: txn.timers.t1,
            t2: txn.timers.t2,
            rng,
            waiters: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
            uas: Mutex::new(HashMap::new()),
            messages: Mutex::new(Vec::new()),
            stats: Mutex::new(UaStats::default()),
        });
        tokio::spawn(event_loop(Arc::downgrade(&inner), events));
        Ok(Ua { inner })
    }

    /// The bound address of the first listener of `transport`.
    pub fn local_addr(&self, transport: Transport) -> Option<SocketAddr> {
        self.inner.transports.local_addr(transport)
    }

    /// The transports (for tests that need raw access).
    pub fn transports(&self) -> &Transports {
        &self.inner.transports
    }

    /// Counters so far.
    pub fn stats(&self) -> UaStats {
        *lock(&self.inner.stats)
    }

    /// A fresh random token (hex) for tags, Call-IDs and branches.
    pub fn token(&self) -> String {
        self.inner.token()
    }

    /// Places a call to `target` through `next_hop`: INVITE, ACK, `hold`,
    /// BYE. Returns the statuses; an error only for transport or protocol
    /// failures (timeouts, malformed answers).
    pub async fn call(&self, target: &str, next_hop: Flow, hold: Duration) -> Result<CallReport> {
        let inner = &self.inner;
        let mut pending = inner.send_invite(target, next_hop).await?;
        let ok = loop {
            match pending.next(inner, next_hop).await? {
                InviteEvent::Provisional(_) => continue,
                InviteEvent::Final(msg) if msg.status().is_some_and(|s| s < 300) => break msg,
                InviteEvent::Final(msg) => {
                    inner.forget(&pending.key);
                    return Ok(CallReport {
                        invite_status: msg.status().unwrap_or(0),
                        bye_status: None,
                    });
                }
            }
        };
        let (invite, key) = (&pending.invite, pending.key.clone());
        let call_id = invite.call_id().unwrap_or_default().to_string();
        let mut dialog = Dialog::uac(invite, &ok).context("2xx creates no dialog")?;
        let ack = dialog.ack(dialog.local_seq, &inner.via(next_hop));
        lock(&inner.acks).insert(call_id.clone(), (next_hop, ack.clone()));
        inner
            .transports
            .send(&next_hop, &ack)
            .await
            .context("sending ACK")?;
        if !hold.is_zero() {
            tokio::time::sleep(hold).await;
        }
        let bye = dialog.request(Method::Bye, &inner.via(next_hop));
        let status = self.request(next_hop, bye).await.map(|r| r.status());
        inner.forget(&key);
        lock(&inner.acks).remove(&call_id);
        Ok(CallReport {
            invite_status: ok.status().unwrap_or(200),
            bye_status: Some(status?.unwrap_or(0)),
        })
    }

    /// Sends an INVITE to `target`, CANCELs it once a provisional response
    /// other than 100 arrives (RFC 3261 §9.1), and returns the INVITE's final
    /// status (487 when the CANCEL won).
    pub async fn call_and_cancel(&self, target: &str, next_hop: Flow) -> Result<u16> {
        let inner = &self.inner;
        let mut pending = inner.send_invite(target, next_hop).await?;
        let mut cancelled = false;
        let status = loop {
            match pending.next(inner, next_hop).await? {
                InviteEvent::Provisional(msg)
                    if msg.status().is_some_and(|s| s > 100) && !cancelled =>
                {
                    inner
                        .endpoint
                        .cancel(pending.key.clone())
                        .await
                        .map_err(|e| anyhow!("CANCEL: {e}"))?;
                    cancelled = true;
                }
                InviteEvent::Provisional(_) => {}
                InviteEvent::Final(msg) => break msg.status().unwrap_or(0),
            }
        };
        inner.forget(&pending.key);
        Ok(status)
    }

    /// Sends a non-INVITE request on a client transaction and returns the
    /// final response.
    pub async fn request(&self, next_hop: Flow, msg: Message) -> Result<Message> {
        let inner = &self.inner;
        let (key, mut rx) = inner.start_client(next_hop, msg).await?;
        let r = loop {
            match rx.recv().await.context("endpoint stopped")? {
                Event::Response { msg, .. } if msg.status().is_some_and(|s| s >= 200) => {
                    break Ok(msg);
                }
                Event::Timeout { timer, .. } => {
                    break Err(anyhow!("request timed out (timer {timer:?})"));
                }
                Event::TransportError { .. } => break Err(anyhow!("transport error")),
                _ => {}
            }
        };
        inner.forget(&key);
        r
    }

    /// Like [`Ua::request`], answering one 401/407 with the UA's
    /// credentials (next CSeq, new branch, RFC 3261 §22.2).
    pub async fn request_authenticated(&self, next_hop: Flow, msg: Message) -> Result<Message> {
        let first = self.request(next_hop, msg.clone()).await?;
        if !matches!(first.status(), Some(401 | 407)) || self.inner.credentials.is_none() {
            return Ok(first);
        }
        let again = self.inner.with_credentials(&msg, &first, next_hop)?;
        self.request(next_hop, again).await
    }

    /// The out-of-dialog MESSAGEs the UAS side received so far.
    pub fn messages(&self) -> Vec<Message> {
        lock(&self.inner.messages).clone()
    }

    /// Registers `user@domain` with the registrar at `next_hop`, answering
    /// one digest challenge with `password`. Returns the final response.
    pub async fn register(
        &self,
        next_hop: Flow,
        domain: &str,
        user: &str,
        password: &str,
        expires: u32,
    ) -> Result<Message> {
        let contact = self.inner.contact(next_hop);
        self.register_contact(next_hop, domain, user, password, expires, &contact)
            .await
    }

    /// Like [`Ua::register`], binding `contact` (for example another
    /// element's address, as a third-party registration).
    pub async fn register_contact(
        &self,
        next_hop: Flow,
        domain: &str,
        user: &str,
        password: &str,
        expires: u32,
        contact: &str,
    ) -> Result<Message> {
        self.register_with(next_hop, domain, user, password, Some((contact, expires)))
            .await
    }

    /// Asks the registrar at `next_hop` for the bindings of `user@domain`
    /// (a REGISTER without Contact, RFC 3261 §10.2.3); the 200 lists them
    /// in its Contact headers.
    pub async fn fetch_bindings(
        &self,
        next_hop: Flow,
        domain: &str,
        user: &str,
        password: &str,
    ) -> Result<Message> {
        self.register_with(next_hop, domain, user, password, None)
            .await
    }

    async fn register_with(
        &self,
        next_hop: Flow,
        domain: &str,
        user: &str,
        password: &str,
        binding: Option<(&str, u32)>,
    ) -> Result<Message> {
        let inner = &self.inner;
        let call_id = format!("{}@testkit", inner.token());
        let from_tag = inner.token();
        let aor = format!("sip:{user}@{domain}");
        let registrar = format!("sip:{domain}");
        let build = |seq: u32| {
            let mut m = inner.base_request(
                Method::Register,
                &registrar,
                next_hop,
                &call_id,
                &from_tag,
                seq,
            );
            if let Some((contact, expires)) = binding {
                m = m
                    .with(HeaderName::Contact, contact)
                    .with(HeaderName::Expires, &expires.to_string());
            }
            // REGISTER's To is the AOR, like From.
            m.set(HeaderName::To, &format!("<{aor}>"));
            m.set(HeaderName::From, &format!("<{aor}>;tag={from_tag}"));
            m
        };
        let first = self.request(next_hop, build(1)).await?;
        let Some(code @ (401 | 407)) = first.status() else {
            return Ok(first);
        };
        let (ch_name, auth_name) = if code == 401 {
            (HeaderName::WwwAuthenticate, HeaderName::Authorization)
        } else {
            (
                HeaderName::ProxyAuthenticate,
                HeaderName::ProxyAuthorization,
            )
        };
        let challenge = first
            .header(ch_name)
            .context("challenge without WWW-Authenticate")?;
        let challenge = Challenge::parse(challenge).map_err(|e| anyhow!("bad challenge: {e}"))?;
        let cnonce = inner.token();
        let value = respond(
            &challenge, "REGISTER", &registrar, user, password, &cnonce, 1,
        )
        .map_err(|e| anyhow!("cannot answer the challenge: {e}"))?;
        let mut second = build(2);
        second.push(Header::new(auth_name, &value));
        self.request(next_hop, second).await
    }

    /// Builds a request outside a dialog with the UA's usual headers.
    pub fn out_of_dialog(&self, method: Method, target: &str, next_hop: Flow) -> Message {
        let call_id = format!("{}@testkit", self.inner.token());
        let tag = self.inner.token();
        self.inner
            .base_request(method, target, next_hop, &call_id, &tag, 1)
    }
}

impl Inner {
    fn token(&self) -> String {
        let mut b = [0u8; 8];
        // SystemRandom only fails when the OS has no entropy source.
        if self.rng.fill(&mut b).is_err() {
            b = rand_fallback();
        }
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn local_for(&self, flow: Flow) -> SocketAddr {
        flow.local
            .or_else(|| self.transports.local_addr(flow.transport))
            .or_else(|| self.transports.local_addr(Transport::Udp))
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5060)))
    }

    fn via(&self, flow: Flow) -> String {
        let local = self.local_for(flow);
        format!(
            "SIP/2.0/{} {};branch=z9hG4bK{};rport",
            flow.transport.via_token(),
            local,
            self.token()
        )
    }

    fn contact(&self, flow: Flow) -> String {
        let local = self.local_for(flow);
        match flow.transport {
            Transport::Udp => format!("<sip:{}@{}>", self.user, local),
            t => format!(
                "<sip:{}@{};transport={}>",
                self.user,
                local,
                t.via_token().to_ascii_lowercase()
            ),
        }
    }

    fn base_request(
        &self,
        method: Method,
        target: &str,
        flow: Flow,
        call_id: &str,
        from_tag: &str,
        seq: u32,
    ) -> Message {
        let local = self.local_for(flow);
        Message::request(method.clone(), target)
            .with(HeaderName::Via, &self.via(flow))
            .with(HeaderName::MaxForwards, "70")
            .with(
                HeaderName::From,
                &format!("<sip:{}@{}>;tag={from_tag}", self.user, local.ip()),
            )
            .with(HeaderName::To, &format!("<{target}>"))
            .with(HeaderName::CallId, call_id)
            .with(HeaderName::CSeq, &format!("{seq} {method}"))
            .with(HeaderName::UserAgent, "sipzone-testkit")
    }

    /// Builds and sends an INVITE with SDP to `target` through `next_hop`.
    async fn send_invite(&self, target: &str, next_hop: Flow) -> Result<PendingInvite> {
        let call_id = format!("{}@testkit", self.token());
        let from_tag = self.token();
        let invite = self
            .base_request(Method::Invite, target, next_hop, &call_id, &from_tag, 1)
            .with(HeaderName::Contact, &self.contact(next_hop))
            .with_body("application/sdp", sdp(next_hop));
        let (key, rx) = self.start_client(next_hop, invite.clone()).await?;
        Ok(PendingInvite {
            invite,
            key,
            rx,
            answered_challenge: false,
        })
    }

    /// `invite` (or another request) again, answering the 401/407
    /// `challenge` with the UA's credentials: next CSeq, new branch (RFC
    /// 3261 §22.2).
    fn with_credentials(
        &self,
        invite: &Message,
        challenge: &Message,
        flow: Flow,
    ) -> Result<Message> {
        let Some((user, password)) = &self.credentials else {
            bail!("challenged without credentials");
        };
        let (ch_name, auth_name) = if challenge.status() == Some(407) {
            (
                HeaderName::ProxyAuthenticate,
                HeaderName::ProxyAuthorization,
            )
        } else {
            (HeaderName::WwwAuthenticate, HeaderName::Authorization)
        };
        let ch = challenge
            .header(ch_name)
            .context("challenge without a header")?;
        let ch = Challenge::parse(ch).map_err(|e| anyhow!("bad challenge: {e}"))?;
        let uri = invite.request_uri_str().context("no Request-URI")?;
        let method = invite.method().context("not a request")?;
        let value = respond(&ch, method.as_str(), uri, user, password, &self.token(), 1)
            .map_err(|e| anyhow!("cannot answer the challenge: {e}"))?;
        let seq = invite.cseq().map_err(|e| anyhow!("{e}"))?.seq + 1;
        let mut again = invite.clone();
        again.set(HeaderName::Via, &self.via(flow));
        again.set(HeaderName::CSeq, &format!("{seq} {method}"));
        again.push(Header::new(auth_name, &value));
        Ok(again)
    }

    async fn start_client(
        &self,
        flow: Flow,
        msg: Message,
    ) -> Result<(TxnKey, mpsc::UnboundedReceiver<Event>)> {
        let key = TxnKey::client(&msg).map_err(|e| anyhow!("request has no key: {e}"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.waiters).insert(key.clone(), tx);
        if let Err(e) = self.endpoint.send_request(flow, msg).await {
            self.forget(&key);
            return Err(anyhow!("sending request: {e}"));
        }
        Ok((key, rx))
    }

    fn forget(&self, key: &TxnKey) {
        lock(&self.waiters).remove(key);
    }

    fn bump(&self, f: impl FnOnce(&mut UaStats)) {
        f(&mut lock(&self.stats));
    }
}

fn rand_fallback() -> [u8; 8] {
    // Only reached when the OS has no randomness; uniqueness within the
    // process is all the tokens need then.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_le_bytes()
}

fn sdp(flow: Flow) -> String {
    let ip = flow
        .local
        .map_or("127.0.0.1".to_string(), |a| a.ip().to_string());
    format!(
        "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
    )
}

async fn event_loop(inner: std::sync::Weak<Inner>, mut events: mpsc::Receiver<Event>) {
    while let Some(ev) = events.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        handle_event(&inner, ev).await;
    }
}

async fn handle_event(inner: &Arc<Inner>, ev: Event) {
    match &ev {
        Event::Response { key, msg, .. } => {
            let waiter = lock(&inner.waiters).get(key).cloned();
            if let Some(w) = waiter {
                let _ = w.send(ev.clone());
            }
            resend_ack(inner, msg).await;
        }
        Event::StrayResponse { msg, .. } => resend_ack(inner, msg).await,
        Event::Timeout { key, .. } | Event::TransportError { key } => {
            let waiter = lock(&inner.waiters).get(key).cloned();
            if let Some(w) = waiter {
                let _ = w.send(ev.clone());
            }
        }
        Event::Ack { msg, .. } => {
            if let Some(cid) = msg.call_id()
                && let Some(d) = lock(&inner.uas).get(cid)
                && !*d.acked.borrow()
            {
                let _ = d.acked.send(true);
                inner.bump(|s| s.acked += 1);
            }
        }
        Event::Cancelled { invite, msg, .. } => {
            let resp = msg.response(487, "Request Terminated", Some(&inner.token()));
            let _ = inner.endpoint.send_response(invite.clone(), resp).await;
        }
        Event::Request { key, flow, msg } => {
            let inner = inner.clone();
            let (key, flow, msg) = (key.clone(), *flow, msg.clone());
            tokio::spawn(async move { serve(&inner, key, flow, msg).await });
        }
    }
}

/// UAC: the 2xx was retransmitted, so our ACK was lost: send it again
/// (RFC 3261 §13.2.2.4).
async fn resend_ack(inner: &Arc<Inner>, msg: &Message) {
    if !matches!(msg.status(), Some(200..=299)) || !msg.is_method(&Method::Invite) {
        return;
    }
    let ack = msg
        .call_id()
        .and_then(|cid| lock(&inner.acks).get(cid).cloned());
    if let Some((flow, ack)) = ack {
        let _ = inner.transports.send(&flow, &ack).await;
    }
}

async fn serve(inner: &Arc<Inner>, key: TxnKey, flow: Flow, req: Message) {
    let Some(method) = req.method() else {
        return;
    };
    let in_dialog = req.to().is_ok_and(|t| t.tag().is_some());
    let result = match method {
        Method::Invite if !in_dialog => answer_invite(inner, key, flow, &req).await,
        Method::Invite => reinvite(inner, key, flow, &req).await,
        Method::Message if !in_dialog => {
            lock(&inner.messages).push(req.clone());
            inner.bump(|s| s.messages += 1);
            let r = req.response(200, "OK", Some(&inner.token()));
            inner
                .endpoint
                .send_response(key, r)
                .await
                .map_err(Into::into)
        }
        Method::Bye => {
            let known = req
                .call_id()
                .and_then(|cid| lock(&inner.uas).remove(cid))
                .is_some();
            let (code, reason) =
                if known || lock(&inner.acks).contains_key(req.call_id().unwrap_or("")) {
                    (200, "OK")
                } else {
                    (481, "Call/Transaction Does Not Exist")
                };
            if code == 200 {
                inner.bump(|s| s.byes += 1);
            }
            inner
                .endpoint
                .send_response(key, req.response(code, reason, None))
                .await
                .map_err(Into::into)
        }
        other => {
            let (code, reason) = match other {
                Method::Options
                | Method::Info
                | Method::Update
                | Method::Message
                | Method::Notify => (200, "OK"),
                _ => (501, "Not Implemented"),
            };
            let r = req
                .response(code, reason, Some(&inner.token()))
                .with(HeaderName::Allow, ALLOW);
            inner
                .endpoint
                .send_response(key, r)
                .await
                .map_err(Into::into)
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "UAS could not answer");
    }
}

async fn answer_invite(inner: &Arc<Inner>, key: TxnKey, flow: Flow, req: &Message) -> Result<()> {
    let tag = inner.token();
    let ring = match inner.answer {
        Answer::Reject(code) => {
            let r = req.response(code, "Rejected", Some(&tag));
            return inner
                .endpoint
                .send_response(key, r)
                .await
                .map_err(Into::into);
        }
        Answer::Accept { ring } => ring,
    };
    let ringing = req
        .response(180, "Ringing", Some(&tag))
        .with(HeaderName::Contact, &inner.contact(flow));
    let ringing = copy_record_route(req, ringing);
    inner.endpoint.send_response(key.clone(), ringing).await?;
    if !ring.is_zero() {
        tokio::time::sleep(ring).await;
    }
    let dialog = Dialog::uas(req, &tag).map_err(|e| anyhow!("no dialog: {e}"))?;
    let ok = copy_record_route(
        req,
        req.response(200, "OK", Some(&tag))
            .with(HeaderName::Contact, &inner.contact(flow)),
    )
    .with_body("application/sdp", sdp(flow));
    let (acked_tx, acked_rx) = watch::channel(false);
    if let Some(cid) = req.call_id() {
        lock(&inner.uas).insert(
            cid.to_string(),
            Uas2xx {
                acked: acked_tx,
                dialog,
            },
        );
    }
    inner.endpoint.send_response(key, ok.clone()).await?;
    inner.bump(|s| s.answered += 1);
    retransmit_2xx(inner, flow, ok, acked_rx).await;
    Ok(())
}

async fn reinvite(inner: &Arc<Inner>, key: TxnKey, flow: Flow, req: &Message) -> Result<()> {
    let known = req
        .call_id()
        .is_some_and(|cid| lock(&inner.uas).contains_key(cid));
    if !known {
        let r = req.response(481, "Call/Transaction Does Not Exist", None);
        return inner
            .endpoint
            .send_response(key, r)
            .await
            .map_err(Into::into);
    }
    let (acked_tx, acked_rx) = watch::channel(false);
    if let Some(cid) = req.call_id()
        && let Some(d) = lock(&inner.uas).get_mut(cid)
    {
        d.dialog.refresh_target(req);
        d.acked = acked_tx;
    }
    let ok = req
        .response(200, "OK", None)
        .with(HeaderName::Contact, &inner.contact(flow))
        .with_body("application/sdp", sdp(flow));
    inner.endpoint.send_response(key, ok.clone()).await?;
    retransmit_2xx(inner, flow, ok, acked_rx).await;
    Ok(())
}

fn copy_record_route(req: &Message, mut resp: Message) -> Message {
    for h in req
        .headers()
        .iter()
        .filter(|h| h.name() == HeaderName::RecordRoute)
    {
        resp.push(h.clone());
    }
    resp
}

/// UAS core 2xx retransmission until the ACK (RFC 3261 §13.3.1.4): T1,
/// doubling up to T2, for 64*T1.
async fn retransmit_2xx(
    inner: &Arc<Inner>,
    flow: Flow,
    ok: Message,
    mut acked: watch::Receiver<bool>,
) {
    let mut wait = inner.t1;
    let mut total = Duration::ZERO;
    let limit = inner.t1 * 64;
    loop {
        tokio::select! {
            r = acked.wait_for(|a| *a) => {
                let _ = r;
                return;
            }
            () = tokio::time::sleep(wait) => {}
        }
        total += wait;
        if total >= limit {
            inner.bump(|s| s.unacked += 1);
            return;
        }
        let _ = inner.transports.send_response(&flow, &ok).await;
        inner.bump(|s| s.retransmitted_2xx += 1);
        wait = (wait * 2).min(inner.t2);
    }
}
