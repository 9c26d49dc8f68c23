//! The B2BUA core of the call switch (DESIGN §4), sans-IO: calls between
//! registered users, forked to every binding of the callee.
//!
//! The core is the UAS of the caller's leg (A) and the UAC of the callee's
//! leg (B, one INVITE per binding, RFC 3261 §16.6-like parallel forking). It
//! never touches a socket, a clock or a random source: the driver feeds
//! [`Input`]s with [`Now`] and the applied [`State`] (for binding lookups),
//! calls [`B2bua::handle_timeout`] at [`B2bua::poll_timeout`], and drains
//! [`Output`]s. Branches, tags and Call-IDs come from the random source given
//! to [`B2bua::new`].
//!
//! ```text
//!   A (caller)            B2BUA                      B1..Bn (bindings)
//!     | INVITE  ──────▶ Proceeding ── INVITE (new Call-ID) ──▶ |
//!     | ◀── 18x (A tag) ──────────── ◀── 18x ───────────────── |
//!     | ◀── 200 (B's SDP) Answered ◀── first 2xx ───────────── | ──▶ ACK it,
//!     |      (resent T1..T2)         CANCEL the other forks      later 2xx: ACK+BYE
//!     | ACK ──────────▶ Confirmed ── Propose(PutCall)
//!     | BYE ──────────▶ 200, BYE ──────────────────────────▶ B ── Propose(EndCall{cdr})
//! ```
//!
//! Call phases:
//!
//! ```text
//!   Proceeding --first 2xx--> Answered --A's ACK--> Confirmed --BYE--> Ended
//!       |                        |  64*T1 without ACK: BYE both --------^
//!       +--all forks failed / 6xx / CANCEL / early BYE-----------------^
//! ```
//!
//! Decisions this module takes:
//!
//! | case | answer |
//! |---|---|
//! | Max-Forwards 0 | 483 Too Many Hops |
//! | a Via carries a branch of this node ([`B2bua::branch_prefix`]) | 482 Loop Detected |
//! | Request-URI without a user part | 404 Not Found |
//! | no Contact / malformed dialog headers | 400 Bad Request |
//! | callee AOR (`sip:user@realm`) has no live binding | 480 Temporarily Unavailable (the directory, not this core, decides 404 for unknown users) |
//! | every fork failed | the best response (below) |
//! | initial non-INVITE | 405 Method Not Allowed |
//! | in-dialog request for no dialog, or from a losing fork | 481 |
//! | in-dialog CSeq lower than the last (RFC 3261 §12.2.2) | 500 |
//! | re-INVITE while one is being relayed on the call | 491 Request Pending |
//!
//! Best response (RFC 3261 §16.7, simplified): a 6xx ends the call at once
//! (the other forks are cancelled) and is relayed; otherwise, once every
//! fork is done, the lowest class wins (3xx < 4xx < 5xx); within a class
//! 486 Busy Here first, then specific codes, then 480, 408, 500, 503, each
//! group in arrival order. A fork that timed out counts as 408, so "all timed
//! out" answers 408. 503 is relayed as 500 (§16.7: a 503 would make the
//! balancer retry the call on another node, forking it twice). Contact (for
//! 3xx), Retry-After and Warning are copied.
//!
//! The B leg is a new dialog: A's Via, Record-Route, Route, Contact and other
//! headers are not copied; From keeps A's identity with a new tag, To is the
//! callee's AOR, the Request-URI is the binding's Contact and Route is the
//! binding's Path (RFC 3327). The SDP passes through unchanged (media
//! anchoring comes later). 18x relayed to A carry B's SDP (early media) and
//! one To tag chosen per call; reliable provisionals (RFC 3262) are not
//! supported, so `Require: 100rel` is never relayed.
//!
//! CANCEL (RFC 3261 §9.1): a fork is only cancelled once it sent a
//! provisional; until then the core remembers the wish and emits
//! [`Output::Cancel`] when the first provisional arrives. A fork answering
//! 2xx after losing, or after being cancelled, is ACKed and sent BYE.
//!
//! In-dialog requests other than BYE (re-INVITE, UPDATE, INFO, ...) are
//! relayed on the other leg as new requests of that leg's dialog; their
//! responses are relayed back. A 2xx to a relayed re-INVITE is ACKed by the
//! core at once (the offer was in the re-INVITE; an offer in the ACK, RFC
//! 3261 §13.2.1 late offer, is not supported yet), and the relayed 2xx is not
//! retransmitted by the core.
//!
//! The caller's 2xx is retransmitted by the core (RFC 3261 §13.3.1.4: T1
//! doubling up to T2) through [`Output::SendResponse`] on A's INVITE server
//! transaction, which passes 2xx from the TU in its Accepted state (RFC
//! 6026); after 64*T1 without ACK both legs get BYE.
//!
//! Proposals: [`Command::PutCall`] when a call is confirmed (2xx + ACK) and
//! when a relayed re-INVITE or UPDATE succeeds; [`Command::EndCall`] with the
//! CDR when a call ends, answered or not. The core does not wait for their
//! commits.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use sip::dialog::{Dialog, DialogError, DialogId};
use sip::flow::{Flow, Transport};
use sip::msg::{BRANCH_COOKIE, Header, HeaderName, Message, Method, ParseError, Uri};
use sip::txn::TxnKey;

use crate::state::{
    Aor, Binding, CallRecord, Cdr, Command, EndReason, Entry, LegRecord, ProposalId, State,
};

/// Methods the B2BUA handles (for `Allow`).
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, UPDATE, INFO, OPTIONS";

/// B2BUA parameters.
///
/// | name | type | meaning | default |
/// |---|---|---|---|
/// | `node_id` | `String` | this node's id: call owner, branch prefix for loop detection | — |
/// | `realm` | `String` | the domain of callee AORs (`sip:user@realm`) | — |
/// | `contact` | `String` | the node's Contact URI, put in every request and 2xx/18x it sends | — |
/// | `sent_by` | `String` | `host[:port]` of the Via the node puts in its requests | — |
/// | `t1` | `Duration` | RFC 3261 T1: first 2xx retransmission interval, 64*T1 ACK wait | 500 ms |
/// | `t2` | `Duration` | RFC 3261 T2: cap of the 2xx retransmission interval | 4 s |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct B2buaConfig {
    /// This node's id.
    pub node_id: String,
    /// The domain of callee AORs.
    pub realm: String,
    /// The node's Contact URI (without angle brackets).
    pub contact: String,
    /// `host[:port]` of this node's Via.
    pub sent_by: String,
    /// RFC 3261 T1.
    pub t1: Duration,
    /// RFC 3261 T2.
    pub t2: Duration,
}

impl B2buaConfig {
    /// The defaults above.
    pub fn new(
        node_id: impl Into<String>,
        realm: impl Into<String>,
        contact: impl Into<String>,
        sent_by: impl Into<String>,
    ) -> B2buaConfig {
        B2buaConfig {
            node_id: node_id.into(),
            realm: realm.into(),
            contact: contact.into(),
            sent_by: sent_by.into(),
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
        }
    }
}

/// The time of an input: monotonic for timers, wall clock for bindings and
/// CDRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for deadlines.
    pub instant: Instant,
    /// Unix time in milliseconds, for binding expiry and CDRs.
    pub unix_ms: u64,
}

impl Now {
    /// Unix seconds.
    pub fn unix_secs(&self) -> u64 {
        self.unix_ms / 1000
    }
}

/// Where a request leaves to; the driver resolves it to a [`Flow`].
///
/// Resolution: when the message carries Route headers, to the top Route
/// (loose routing, RFC 3261 §8.1.2; for a binding that is its Path);
/// otherwise to `received` / the flow; otherwise to the Request-URI
/// (RFC 3263).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A registered contact of the callee.
    Binding {
        /// The Contact URI as registered.
        contact: String,
        /// Where its REGISTER came from, `transport:address:port`.
        received: Option<String>,
        /// Its Path, top first (already in the message as Route).
        path: Vec<String>,
    },
    /// The caller, on the flow its INVITE arrived on.
    Peer {
        /// That flow.
        flow: Flow,
    },
}

impl Target {
    fn binding(b: &Binding) -> Target {
        Target::Binding {
            contact: b.contact.clone(),
            received: b.received.clone(),
            path: b.path.clone(),
        }
    }

    /// The transport the request will most likely use, for its Via: the
    /// first Path URI's, else `received`'s, else the Contact's (UDP unless a
    /// `transport` parameter or `sips` says otherwise).
    pub fn transport(&self) -> Transport {
        match self {
            Target::Peer { flow } => flow.transport,
            Target::Binding {
                contact,
                received,
                path,
            } => {
                if let Some(first) = path.first() {
                    return uri_transport(first.trim_start_matches('<').trim_end_matches('>'));
                }
                if let Some(t) = received
                    .as_deref()
                    .and_then(|r| r.split_once(':'))
                    .and_then(|(t, _)| Transport::from_token(t))
                {
                    return t;
                }
                uri_transport(contact)
            }
        }
    }

    fn received(&self) -> Option<String> {
        match self {
            Target::Binding { received, .. } => received.clone(),
            Target::Peer { flow } => Some(format!(
                "{}:{}",
                flow.transport.via_token().to_ascii_lowercase(),
                flow.remote
            )),
        }
    }

    fn path(&self) -> Vec<String> {
        match self {
            Target::Binding { path, .. } => path.clone(),
            Target::Peer { .. } => Vec::new(),
        }
    }
}

fn uri_transport(uri: &str) -> Transport {
    let uri = uri.split('>').next().unwrap_or(uri);
    match Uri::parse(uri) {
        Ok(Uri::Sip(u)) => u
            .transport()
            .and_then(Transport::from_token)
            .unwrap_or(if u.secure {
                Transport::Tls
            } else {
                Transport::Udp
            }),
        _ => Transport::Udp,
    }
}

/// What the driver feeds the core.
#[derive(Debug, Clone)]
pub enum Input {
    /// A request on new server transaction `key` (an initial INVITE, or an
    /// in-dialog request of a call of this core).
    Request {
        /// The server transaction.
        key: TxnKey,
        /// The flow it arrived on.
        flow: Flow,
        /// The request.
        msg: Message,
    },
    /// A response for client transaction `key` (every 2xx, retransmissions
    /// included).
    Response {
        /// The client transaction ([`TxnKey::client`] of the request sent).
        key: TxnKey,
        /// The response.
        msg: Message,
    },
    /// Client transaction `key` timed out or failed in the transport.
    Timeout {
        /// The client transaction.
        key: TxnKey,
    },
    /// The caller cancelled INVITE server transaction `invite` (the
    /// transaction layer already answered the CANCEL).
    Cancelled {
        /// The INVITE's server transaction.
        invite: TxnKey,
    },
    /// An ACK outside transactions (the ACK for a 2xx).
    Ack {
        /// The ACK.
        msg: Message,
    },
    /// An initial INVITE for a number that is not a local user: one B leg
    /// to `next_hop` (the configured outbound route, the SBC later), with
    /// Request-URI `sip:<number>@<next hop>`.
    Outbound {
        /// The server transaction.
        key: TxnKey,
        /// The flow it arrived on.
        flow: Flow,
        /// The INVITE.
        msg: Message,
        /// Where the B leg goes.
        next_hop: Flow,
    },
}

/// What the core asks of the driver.
#[derive(Debug, Clone)]
pub enum Output {
    /// Start a client transaction for `msg` (top Via and branch set; its key
    /// is [`TxnKey::client`] of `msg`) towards `target`.
    SendRequest {
        /// Where to send.
        target: Target,
        /// The request.
        msg: Message,
    },
    /// Send `msg` on server transaction `key`.
    SendResponse {
        /// The server transaction.
        key: TxnKey,
        /// The response.
        msg: Message,
    },
    /// Send an ACK for a 2xx outside any transaction (RFC 3261 §13.2.2.4).
    SendAck {
        /// Where to send.
        target: Target,
        /// The ACK.
        msg: Message,
    },
    /// CANCEL client INVITE transaction `key` (`Endpoint::cancel`).
    Cancel {
        /// The client INVITE transaction.
        key: TxnKey,
    },
    /// Propose the entry to the store. The id comes from this core's counter
    /// ([`B2bua::set_next_proposal_id`]); the core does not wait for the
    /// commit, so a driver with one node-wide id allocator may renumber it.
    Propose(Entry),
}

/// Why the core refused an input. A refused input leaves the core as it was
/// and outputs nothing; the driver logs it and drops the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum B2buaError {
    /// A response or timeout for a client transaction this core does not
    /// know (e.g. after its call was cleaned up).
    #[error("no client transaction {0}")]
    UnknownTransaction(TxnKey),
    /// A CANCEL or ACK for no call of this core.
    #[error("no call for this message")]
    UnknownCall,
    /// A message lacks a header the core needs.
    #[error("malformed message: {0}")]
    Malformed(#[from] ParseError),
    /// A 2xx from which no dialog can be built (no To tag or Contact).
    #[error("no dialog from the 2xx: {0}")]
    Dialog(#[from] DialogError),
    /// Input of the wrong kind (a response as a request, ...).
    #[error("unexpected message kind")]
    Unexpected,
}

/// The two legs of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Leg {
    /// The caller's leg (we are its UAS).
    A,
    /// The callee's leg (we are its UAC).
    B,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Proceeding,
    Answered,
    Confirmed,
    Ended,
}

/// One INVITE towards one binding.
#[derive(Debug, Clone)]
struct Fork {
    key: TxnKey,
    invite: Message,
    target: Target,
    /// A final response or a timeout ended its transaction.
    done: bool,
    /// A provisional arrived, so a CANCEL may be sent (§9.1).
    provisional: bool,
    /// Cancel as soon as a provisional arrives.
    cancel_wanted: bool,
    cancel_sent: bool,
    /// ACKs sent for its 2xx, by remote tag (re-sent on retransmissions).
    acks: Vec<(String, Message)>,
}

/// A relayed in-dialog request waiting for the other leg's response.
#[derive(Debug, Clone)]
struct Relay {
    server_key: TxnKey,
    request: Message,
    from: Leg,
    sent: Message,
}

#[derive(Debug, Clone)]
enum Client {
    Fork(usize),
    Bye,
    Relay(Box<Relay>),
}

/// A final response kept for the best-response choice.
#[derive(Debug, Clone)]
struct Final {
    code: u16,
    reason: String,
    headers: Vec<Header>,
}

/// The named deadlines of a call (RFC 3261 §13.3.1.4).
#[derive(Debug, Clone, Copy, Default)]
struct Timers {
    /// Next retransmission of the 2xx to A.
    retransmit_2xx: Option<Instant>,
    /// Give up waiting for A's ACK (64*T1 after the 2xx).
    ack_wait: Option<Instant>,
}

impl Timers {
    fn earliest(&self) -> Option<Instant> {
        match (self.retransmit_2xx, self.ack_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug, Clone)]
struct Call {
    phase: Phase,
    a_key: TxnKey,
    a_invite: Message,
    a_flow: Flow,
    a_dialog: Dialog,
    b_call_id: String,
    b_tag: String,
    forks: Vec<Fork>,
    winner: Option<usize>,
    b_dialog: Option<Dialog>,
    caller: String,
    callee: String,
    start_ms: u64,
    answer_ms: Option<u64>,
    a_ok: Option<Message>,
    interval: Duration,
    timers: Timers,
    best: Option<Final>,
    /// A relayed re-INVITE is in progress (glare guard).
    invite_relay: bool,
    /// Client transactions of this call (forks, BYEs, relays).
    clients: Vec<TxnKey>,
}

impl Call {
    fn a_call_id(&self) -> &str {
        &self.a_dialog.id.call_id
    }

    fn b_target(&self) -> Option<Target> {
        self.winner.map(|w| self.forks[w].target.clone())
    }
}

/// The random source: 8 fresh bytes per call.
pub type Random = Box<dyn FnMut() -> [u8; 8] + Send + Sync>;

/// The B2BUA core of one node.
pub struct B2bua {
    config: B2buaConfig,
    branch_prefix: String,
    rng: Random,
    next_call: u64,
    next_id: u64,
    calls: HashMap<u64, Call>,
    /// A's INVITE server transactions.
    servers: HashMap<TxnKey, u64>,
    /// Our client transactions.
    clients: HashMap<TxnKey, (u64, Client)>,
    /// Dialogs by (Call-ID, our tag).
    dialogs: HashMap<(String, String), (u64, Leg)>,
    /// Calls with an armed deadline.
    timed: BTreeSet<u64>,
    out: VecDeque<Output>,
}

impl fmt::Debug for B2bua {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("B2bua")
            .field("config", &self.config)
            .field("calls", &self.calls.len())
            .field("clients", &self.clients.len())
            .finish()
    }
}

fn token_safe(s: &str) -> String {
    s.chars().filter(char::is_ascii_alphanumeric).collect()
}

/// `display <uri>` of a From/To value, parameters (tag) dropped.
fn addr_without_params(value: &str) -> Option<String> {
    let na = sip::msg::NameAddr::parse(value).ok()?;
    Some(match na.display {
        Some(d) => format!("{d} <{}>", na.uri_raw),
        None => format!("<{}>", na.uri_raw),
    })
}

fn rank(code: u16) -> (u8, u8) {
    let class = match code / 100 {
        6 => 0,
        3 => 1,
        4 => 2,
        _ => 3,
    };
    let within = match code {
        486 | 600 => 0,
        480 => 2,
        408 => 3,
        500 => 4,
        503 => 5,
        _ => 1,
    };
    (class, within)
}

impl B2bua {
    /// A B2BUA with `config`, drawing branches, tags and Call-IDs from `rng`.
    pub fn new(config: B2buaConfig, rng: Random) -> B2bua {
        let branch_prefix = format!("{BRANCH_COOKIE}-sz-{}-", token_safe(&config.node_id));
        B2bua {
            config,
            branch_prefix,
            rng,
            next_call: 1,
            next_id: 1,
            calls: HashMap::new(),
            servers: HashMap::new(),
            clients: HashMap::new(),
            dialogs: HashMap::new(),
            timed: BTreeSet::new(),
            out: VecDeque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &B2buaConfig {
        &self.config
    }

    /// The branch prefix of every request this node sends; an INVITE
    /// carrying it in a Via has looped back (482).
    pub fn branch_prefix(&self) -> &str {
        &self.branch_prefix
    }

    /// Sets the id of the next proposal (ids must grow in apply order).
    pub fn set_next_proposal_id(&mut self, next: ProposalId) {
        self.next_id = next.0;
    }

    /// Calls held (ended calls waiting for their forks included).
    pub fn call_count(&self) -> usize {
        self.calls.len()
    }

    /// The next action for the driver.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest deadline, when one is armed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timed
            .iter()
            .filter_map(|id| self.calls.get(id)?.timers.earliest())
            .min()
    }

    /// Feeds one input; `state` is the applied state (bindings).
    pub fn handle(&mut self, now: Now, input: Input, state: &State) -> Result<(), B2buaError> {
        match input {
            Input::Request { key, flow, msg } => self.request(now, key, flow, msg, state),
            Input::Response { key, msg } => self.response(now, key, msg),
            Input::Timeout { key } => self.timeout(now, key),
            Input::Cancelled { invite } => {
                let id = *self.servers.get(&invite).ok_or(B2buaError::UnknownCall)?;
                self.abandon(now, id, EndReason::Cancelled);
                Ok(())
            }
            Input::Ack { msg } => self.ack(now, msg),
            Input::Outbound {
                key,
                flow,
                msg,
                next_hop,
            } => {
                if msg.to()?.tag().is_some() || !msg.is_method(&Method::Invite) {
                    return Err(B2buaError::Unexpected);
                }
                self.invite(now, key, flow, msg, state, Some(next_hop))
            }
        }
    }

    /// Fires the deadlines due at `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        let due: Vec<u64> = self
            .timed
            .iter()
            .copied()
            .filter(|id| {
                self.calls
                    .get(id)
                    .and_then(|c| c.timers.earliest())
                    .is_some_and(|t| t <= now.instant)
            })
            .collect();
        for id in due {
            let Some(call) = self.calls.get_mut(&id) else {
                continue;
            };
            if call.timers.ack_wait.is_some_and(|t| t <= now.instant) {
                tracing::debug!(call_id = %call.a_call_id(), "no ACK for the 2xx: BYE both legs");
                self.hang_up(now, id, None, EndReason::AckTimeout);
                continue;
            }
            if call.timers.retransmit_2xx.is_some_and(|t| t <= now.instant) {
                call.interval = (call.interval * 2).min(self.config.t2);
                call.timers.retransmit_2xx = Some(now.instant + call.interval);
                if let Some(ok) = call.a_ok.clone() {
                    self.out.push_back(Output::SendResponse {
                        key: call.a_key.clone(),
                        msg: ok,
                    });
                }
            }
        }
    }

    // ---- helpers ----

    fn random_hex(&mut self) -> String {
        hex::encode((self.rng)())
    }

    fn via(&mut self, target: &Target) -> String {
        let random = self.random_hex();
        let branch = format!("{}{random}", self.branch_prefix);
        format!(
            "SIP/2.0/{} {};branch={branch};rport",
            target.transport().via_token(),
            self.config.sent_by
        )
    }

    fn contact(&self) -> String {
        format!("<{}>", self.config.contact)
    }

    fn respond(&mut self, key: TxnKey, msg: Message) {
        self.out.push_back(Output::SendResponse { key, msg });
    }

    fn propose(&mut self, now: Now, cmd: Command) {
        let id = ProposalId(self.next_id);
        self.next_id += 1;
        self.out.push_back(Output::Propose(Entry {
            id,
            at_unix: now.unix_secs(),
            cmds: vec![cmd],
        }));
    }

    fn send_request(&mut self, id: u64, target: Target, msg: Message, role: Client) {
        if let Ok(key) = TxnKey::client(&msg) {
            if let Some(call) = self.calls.get_mut(&id) {
                call.clients.push(key.clone());
            }
            self.clients.insert(key, (id, role));
        }
        self.out.push_back(Output::SendRequest { target, msg });
    }

    fn copy_body(from: &Message, to: &mut Message) {
        if !from.body().is_empty() {
            to.set_body(from.header(HeaderName::ContentType), from.body().clone());
        }
    }

    // ---- requests ----

    fn request(
        &mut self,
        now: Now,
        key: TxnKey,
        flow: Flow,
        msg: Message,
        state: &State,
    ) -> Result<(), B2buaError> {
        let method = msg.method().ok_or(B2buaError::Unexpected)?;
        if !msg.is_request() {
            return Err(B2buaError::Unexpected);
        }
        let has_to_tag = msg.to()?.tag().is_some();
        if has_to_tag {
            return self.in_dialog(now, key, method, msg);
        }
        if method != Method::Invite {
            let tag = self.random_hex();
            let r = msg
                .response(405, "Method Not Allowed", Some(&tag))
                .with(HeaderName::Allow, ALLOW);
            self.respond(key, r);
            return Ok(());
        }
        self.invite(now, key, flow, msg, state, None)
    }

    fn invite(
        &mut self,
        now: Now,
        key: TxnKey,
        flow: Flow,
        msg: Message,
        state: &State,
        outbound: Option<Flow>,
    ) -> Result<(), B2buaError> {
        let a_tag = self.random_hex();
        let reject = |code: u16, reason: &str| msg.response(code, reason, Some(&a_tag));
        if msg.max_forwards() == Some(0) {
            let r = reject(483, "Too Many Hops");
            self.respond(key, r);
            return Ok(());
        }
        if msg.vias().filter_map(Result::ok).any(|v| {
            v.branch()
                .is_some_and(|b| b.starts_with(&self.branch_prefix))
        }) {
            let r = reject(482, "Loop Detected");
            self.respond(key, r);
            return Ok(());
        }
        let user = msg
            .request_uri()
            .and_then(|u| u.as_sip().and_then(|s| s.user_decoded()))
            .map(|u| String::from_utf8_lossy(&u).into_owned());
        let Some(user) = user else {
            let r = reject(404, "Not Found");
            self.respond(key, r);
            return Ok(());
        };
        // Where the B legs go: every live binding of the local callee, or
        // the outbound next hop for a number that is not a local user.
        // (target, Request-URI, Route set, To)
        let dests: Vec<(Target, String, Vec<String>, String)> = match outbound {
            Some(hop) => {
                let ruri = format!("sip:{user}@{}", hop.remote);
                vec![(Target::Peer { flow: hop }, ruri.clone(), Vec::new(), ruri)]
            }
            None => {
                let Some(aor) = Aor::parse(&format!("sip:{user}@{}", self.config.realm)) else {
                    let r = reject(404, "Not Found");
                    self.respond(key, r);
                    return Ok(());
                };
                state
                    .bindings(&aor, now.unix_secs())
                    .into_iter()
                    .map(|b| {
                        (
                            Target::binding(b),
                            b.contact.clone(),
                            b.path.clone(),
                            aor.to_string(),
                        )
                    })
                    .collect()
            }
        };
        if dests.is_empty() {
            let r = reject(480, "Temporarily Unavailable");
            self.respond(key, r);
            return Ok(());
        }
        let callee = dests[0].3.clone();
        // An RFC 2543 caller may send no Contact: its From address is then
        // where requests of the dialog go (RFC 4475 §3.4.1 asks to accept it).
        let a_dialog = match Dialog::uas(&msg, &a_tag) {
            Err(sip::dialog::DialogError::NoContact) => msg.from().ok().and_then(|f| {
                let mut m = msg.clone();
                m.push(Header::new(
                    HeaderName::Contact,
                    &format!("<{}>", f.uri_raw),
                ));
                Dialog::uas(&m, &a_tag).ok()
            }),
            other => other.ok(),
        };
        let (a_dialog, from) = match (
            a_dialog,
            msg.header(HeaderName::From).and_then(addr_without_params),
        ) {
            (Some(d), Some(f)) => (d, f),
            _ => {
                let r = reject(400, "Bad Request");
                self.respond(key, r);
                return Ok(());
            }
        };
        let caller = msg
            .from()
            .map(|f| f.uri_raw.to_string())
            .unwrap_or_default();
        let max_forwards = msg.max_forwards().map_or(70, |n| n.saturating_sub(1));
        let b_call_id = format!("{}-{}", self.random_hex(), token_safe(&self.config.node_id));
        let b_tag = self.random_hex();
        let id = self.next_call;
        self.next_call += 1;

        let mut forks = Vec::with_capacity(dests.len());
        let mut sends = Vec::with_capacity(dests.len());
        for (target, ruri, path, to) in dests {
            let mut inv = Message::request(Method::Invite, &ruri)
                .with(HeaderName::Via, &self.via(&target))
                .with(HeaderName::MaxForwards, &max_forwards.to_string());
            for p in &path {
                inv.push(Header::new(HeaderName::Route, p));
            }
            inv = inv
                .with(HeaderName::From, &format!("{from};tag={b_tag}"))
                .with(HeaderName::To, &format!("<{to}>"))
                .with(HeaderName::CallId, &b_call_id)
                .with(HeaderName::CSeq, "1 INVITE")
                .with(HeaderName::Contact, &self.contact())
                .with(HeaderName::Allow, ALLOW);
            Self::copy_body(&msg, &mut inv);
            let Ok(fkey) = TxnKey::client(&inv) else {
                continue;
            };
            forks.push(Fork {
                key: fkey.clone(),
                invite: inv.clone(),
                target: target.clone(),
                done: false,
                provisional: false,
                cancel_wanted: false,
                cancel_sent: false,
                acks: Vec::new(),
            });
            sends.push((fkey, target, inv));
        }
        self.dialogs
            .insert((a_dialog.id.call_id.clone(), a_tag.clone()), (id, Leg::A));
        self.dialogs
            .insert((b_call_id.clone(), b_tag.clone()), (id, Leg::B));
        self.servers.insert(key.clone(), id);
        self.calls.insert(
            id,
            Call {
                phase: Phase::Proceeding,
                a_key: key,
                a_invite: msg,
                a_flow: flow,
                a_dialog,
                b_call_id,
                b_tag,
                forks,
                winner: None,
                b_dialog: None,
                caller,
                callee,
                start_ms: now.unix_ms,
                answer_ms: None,
                a_ok: None,
                interval: self.config.t1,
                timers: Timers::default(),
                best: None,
                invite_relay: false,
                clients: Vec::new(),
            },
        );
        for (i, (_, target, inv)) in sends.into_iter().enumerate() {
            self.send_request(id, target, inv, Client::Fork(i));
        }
        Ok(())
    }

    fn in_dialog(
        &mut self,
        now: Now,
        key: TxnKey,
        method: Method,
        msg: Message,
    ) -> Result<(), B2buaError> {
        let call_id = msg.call_id().unwrap_or_default().to_string();
        let to_tag = msg.to()?.tag().unwrap_or_default().to_string();
        let from_tag = msg.from()?.tag().unwrap_or_default().to_string();
        let seq = msg.cseq()?.seq;
        let found = self.dialogs.get(&(call_id, to_tag)).copied();
        let Some((id, leg)) = found else {
            self.respond(
                key,
                msg.response(481, "Call/Transaction Does Not Exist", None),
            );
            return Ok(());
        };
        let Some(call) = self.calls.get_mut(&id) else {
            self.respond(
                key,
                msg.response(481, "Call/Transaction Does Not Exist", None),
            );
            return Ok(());
        };
        let dialog = match leg {
            Leg::A => Some(&mut call.a_dialog),
            Leg::B => call.b_dialog.as_mut(),
        };
        let Some(dialog) = dialog.filter(|d| d.id.remote_tag == from_tag) else {
            self.respond(
                key,
                msg.response(481, "Call/Transaction Does Not Exist", None),
            );
            return Ok(());
        };
        if !dialog.accept_remote_seq(seq) {
            self.respond(key, msg.response(500, "Server Internal Error", None));
            return Ok(());
        }
        let phase = call.phase;
        if method == Method::Bye {
            self.respond(key, msg.response(200, "OK", None));
            match phase {
                Phase::Proceeding => self.abandon(now, id, EndReason::Cancelled),
                Phase::Answered | Phase::Confirmed => {
                    let reason = match leg {
                        Leg::A => EndReason::CallerHangup,
                        Leg::B => EndReason::CalleeHangup,
                    };
                    self.hang_up(now, id, Some(leg), reason);
                }
                Phase::Ended => {}
            }
            return Ok(());
        }
        if !matches!(phase, Phase::Answered | Phase::Confirmed) {
            self.respond(
                key,
                msg.response(481, "Call/Transaction Does Not Exist", None),
            );
            return Ok(());
        }
        self.relay(id, key, leg, method, msg);
        Ok(())
    }

    /// Relays an in-dialog request from `from` on the other leg.
    fn relay(&mut self, id: u64, key: TxnKey, from: Leg, method: Method, msg: Message) {
        let contact = self.contact();
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if method == Method::Invite {
            if call.invite_relay {
                let r = msg
                    .response(491, "Request Pending", None)
                    .with(HeaderName::RetryAfter, "1");
                self.respond(key, r);
                return;
            }
            call.invite_relay = true;
        }
        let refresh = matches!(method, Method::Invite | Method::Update);
        if refresh {
            match from {
                Leg::A => call.a_dialog.refresh_target(&msg),
                Leg::B => {
                    if let Some(d) = call.b_dialog.as_mut() {
                        d.refresh_target(&msg);
                    }
                }
            }
        }
        let (target, other) = match from {
            Leg::A => (call.b_target(), Leg::B),
            Leg::B => (Some(Target::Peer { flow: call.a_flow }), Leg::A),
        };
        let Some(target) = target else {
            return;
        };
        let via = self.via(&target);
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let dialog = match other {
            Leg::A => Some(&mut call.a_dialog),
            Leg::B => call.b_dialog.as_mut(),
        };
        let Some(dialog) = dialog else {
            return;
        };
        let mut out = dialog.request(method, &via);
        if refresh {
            out.push(Header::new(HeaderName::Contact, &contact));
        }
        Self::copy_body(&msg, &mut out);
        let relay = Relay {
            server_key: key,
            request: msg,
            from,
            sent: out.clone(),
        };
        self.send_request(id, target, out, Client::Relay(Box::new(relay)));
    }

    fn ack(&mut self, now: Now, msg: Message) -> Result<(), B2buaError> {
        let call_id = msg.call_id().unwrap_or_default().to_string();
        let to_tag = msg.to()?.tag().unwrap_or_default().to_string();
        let seq = msg.cseq()?.seq;
        let (id, leg) = *self
            .dialogs
            .get(&(call_id, to_tag))
            .ok_or(B2buaError::UnknownCall)?;
        let call = self.calls.get_mut(&id).ok_or(B2buaError::UnknownCall)?;
        if leg != Leg::A || call.phase != Phase::Answered {
            // ACKs for relayed re-INVITEs were already sent by the core.
            return Ok(());
        }
        if call.a_invite.cseq().is_ok_and(|c| c.seq != seq) {
            return Ok(());
        }
        call.phase = Phase::Confirmed;
        call.timers = Timers::default();
        call.a_ok = None;
        self.timed.remove(&id);
        if let Some(rec) = self.record(id) {
            self.propose(
                now,
                Command::PutCall {
                    call: Box::new(rec),
                },
            );
        }
        Ok(())
    }

    // ---- responses ----

    fn response(&mut self, now: Now, key: TxnKey, msg: Message) -> Result<(), B2buaError> {
        let code = msg.status().ok_or(B2buaError::Unexpected)?;
        let (id, role) = self
            .clients
            .get(&key)
            .cloned()
            .ok_or_else(|| B2buaError::UnknownTransaction(key.clone()))?;
        match role {
            Client::Fork(i) => self.fork_response(now, id, i, code, msg),
            Client::Bye => {
                if code >= 200 {
                    self.clients.remove(&key);
                }
                Ok(())
            }
            Client::Relay(relay) => {
                if code >= 200 {
                    self.clients.remove(&key);
                }
                self.relay_response(now, id, *relay, code, msg);
                Ok(())
            }
        }
    }

    fn fork_response(
        &mut self,
        now: Now,
        id: u64,
        i: usize,
        code: u16,
        msg: Message,
    ) -> Result<(), B2buaError> {
        let contact = self.contact();
        let call = self.calls.get_mut(&id).ok_or(B2buaError::UnknownCall)?;
        let fork = call.forks.get_mut(i).ok_or(B2buaError::UnknownCall)?;
        match code {
            100..=199 => {
                fork.provisional = true;
                if fork.cancel_wanted && !fork.cancel_sent && !fork.done {
                    fork.cancel_sent = true;
                    let key = fork.key.clone();
                    self.out.push_back(Output::Cancel { key });
                }
                if call.phase == Phase::Proceeding && code > 100 {
                    let mut r = call.a_invite.response(
                        code,
                        msg.reason().unwrap_or_default(),
                        Some(&call.a_dialog.id.local_tag),
                    );
                    r.push(Header::new(HeaderName::Contact, &contact));
                    Self::copy_body(&msg, &mut r);
                    let key = call.a_key.clone();
                    self.respond(key, r);
                }
                Ok(())
            }
            200..=299 => self.fork_2xx(now, id, i, msg),
            _ => {
                let fin = Final {
                    code,
                    reason: msg.reason().unwrap_or_default().to_string(),
                    headers: msg
                        .headers()
                        .iter()
                        .filter(|h| {
                            matches!(h.name(), HeaderName::RetryAfter | HeaderName::Warning)
                                || (code < 400 && h.name() == HeaderName::Contact)
                        })
                        .cloned()
                        .collect(),
                };
                self.fork_failed(now, id, i, fin);
                Ok(())
            }
        }
    }

    fn fork_2xx(&mut self, now: Now, id: u64, i: usize, msg: Message) -> Result<(), B2buaError> {
        let call = self.calls.get(&id).ok_or(B2buaError::UnknownCall)?;
        let fork = call.forks.get(i).ok_or(B2buaError::UnknownCall)?;
        let remote_tag = msg.to()?.tag().unwrap_or_default().to_string();
        if let Some((_, ack)) = fork.acks.iter().find(|(t, _)| *t == remote_tag) {
            // A retransmitted 2xx: the same ACK again (RFC 3261 §13.2.2.4).
            let (target, ack) = (fork.target.clone(), ack.clone());
            self.out.push_back(Output::SendAck { target, msg: ack });
            return Ok(());
        }
        let mut dialog = Dialog::uac(&fork.invite, &msg)?;
        let target = fork.target.clone();
        let invite_seq = fork.invite.cseq()?.seq;
        let wins = call.phase == Phase::Proceeding;
        let ack_via = self.via(&target);
        let ack = dialog.ack(invite_seq, &ack_via);
        let bye = if wins {
            None
        } else {
            let via = self.via(&target);
            Some(dialog.request(Method::Bye, &via))
        };
        let contact = self.contact();
        let t1 = self.config.t1;
        let Some(call) = self.calls.get_mut(&id) else {
            return Ok(());
        };
        let fork = &mut call.forks[i];
        fork.done = true;
        fork.acks.push((remote_tag, ack.clone()));
        self.out.push_back(Output::SendAck {
            target: target.clone(),
            msg: ack,
        });
        if let Some(bye) = bye {
            tracing::debug!(call_id = %call.a_call_id(), fork = i, "late 2xx from a losing fork: BYE");
            self.send_request(id, target, bye, Client::Bye);
            self.maybe_forget(id);
            return Ok(());
        }
        call.winner = Some(i);
        call.b_dialog = Some(dialog);
        call.phase = Phase::Answered;
        call.answer_ms = Some(now.unix_ms);
        let mut ok = call.a_invite.response(
            msg.status().unwrap_or(200),
            msg.reason().unwrap_or("OK"),
            Some(&call.a_dialog.id.local_tag),
        );
        ok.push(Header::new(HeaderName::Contact, &contact));
        ok.push(Header::new(HeaderName::Allow, ALLOW));
        Self::copy_body(&msg, &mut ok);
        call.a_ok = Some(ok.clone());
        call.interval = t1;
        call.timers = Timers {
            retransmit_2xx: Some(now.instant + t1),
            ack_wait: Some(now.instant + t1 * 64),
        };
        let key = call.a_key.clone();
        self.timed.insert(id);
        self.respond(key, ok);
        self.cancel_forks(id);
        Ok(())
    }

    fn fork_failed(&mut self, now: Now, id: u64, i: usize, fin: Final) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let Some(fork) = call.forks.get_mut(i) else {
            return;
        };
        if fork.done {
            return;
        }
        fork.done = true;
        if call.phase != Phase::Proceeding {
            self.maybe_forget(id);
            return;
        }
        let six = fin.code >= 600;
        if call
            .best
            .as_ref()
            .is_none_or(|b| rank(fin.code) < rank(b.code))
        {
            call.best = Some(fin);
        }
        if six || call.forks.iter().all(|f| f.done) {
            self.reject(now, id);
        }
    }

    /// Sends the best final response to A and ends the call.
    fn reject(&mut self, now: Now, id: u64) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let fin = call.best.take().unwrap_or(Final {
            code: 408,
            reason: "Request Timeout".into(),
            headers: Vec::new(),
        });
        let (code, reason) = match fin.code {
            503 => (500, "Server Internal Error"),
            c => (c, fin.reason.as_str()),
        };
        let mut r = call
            .a_invite
            .response(code, reason, Some(&call.a_dialog.id.local_tag));
        for h in fin.headers {
            r.push(h);
        }
        let key = call.a_key.clone();
        self.respond(key, r);
        self.cancel_forks(id);
        self.end(now, id, EndReason::Rejected { code });
    }

    fn relay_response(&mut self, now: Now, id: u64, relay: Relay, code: u16, msg: Message) {
        let contact = self.contact();
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if code == 100 {
            return;
        }
        let method = relay.request.method().unwrap_or(Method::Invite);
        let mut r = relay
            .request
            .response(code, msg.reason().unwrap_or_default(), None);
        let ok = (200..300).contains(&code);
        let refresh = matches!(method, Method::Invite | Method::Update);
        if ok && refresh {
            r.push(Header::new(HeaderName::Contact, &contact));
        }
        Self::copy_body(&msg, &mut r);
        let mut ack = None;
        if code >= 200 && method == Method::Invite {
            call.invite_relay = false;
        }
        if ok && refresh {
            let other = match relay.from {
                Leg::A => call.b_dialog.as_mut(),
                Leg::B => Some(&mut call.a_dialog),
            };
            if let Some(d) = other {
                d.refresh_target(&msg);
                if method == Method::Invite {
                    ack = Some((d.clone(), relay.sent.cseq().map_or(0, |c| c.seq)));
                }
            }
        }
        let target = match relay.from {
            Leg::A => call.b_target(),
            Leg::B => Some(Target::Peer { flow: call.a_flow }),
        };
        let confirmed = call.phase == Phase::Confirmed;
        self.respond(relay.server_key, r);
        if let (Some((d, seq)), Some(target)) = (ack, target) {
            let via = self.via(&target);
            self.out.push_back(Output::SendAck {
                target,
                msg: d.ack(seq, &via),
            });
        }
        if ok
            && refresh
            && confirmed
            && let Some(rec) = self.record(id)
        {
            self.propose(
                now,
                Command::PutCall {
                    call: Box::new(rec),
                },
            );
        }
    }

    // ---- timeouts ----

    fn timeout(&mut self, now: Now, key: TxnKey) -> Result<(), B2buaError> {
        let (id, role) = self
            .clients
            .remove(&key)
            .ok_or_else(|| B2buaError::UnknownTransaction(key.clone()))?;
        match role {
            Client::Fork(i) => {
                let fin = Final {
                    code: 408,
                    reason: "Request Timeout".into(),
                    headers: Vec::new(),
                };
                self.fork_failed(now, id, i, fin);
            }
            Client::Bye => {}
            Client::Relay(relay) => {
                if let Some(call) = self.calls.get_mut(&id)
                    && relay.request.is_method(&Method::Invite)
                {
                    call.invite_relay = false;
                }
                let r = relay.request.response(408, "Request Timeout", None);
                self.respond(relay.server_key, r);
            }
        }
        Ok(())
    }

    // ---- ending ----

    fn cancel_forks(&mut self, id: u64) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        for fork in call.forks.iter_mut().filter(|f| !f.done && !f.cancel_sent) {
            if fork.provisional {
                fork.cancel_sent = true;
                self.out.push_back(Output::Cancel {
                    key: fork.key.clone(),
                });
            } else {
                fork.cancel_wanted = true;
            }
        }
    }

    /// Ends an unanswered call: 487 to A, CANCEL every fork.
    fn abandon(&mut self, now: Now, id: u64, reason: EndReason) {
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        if call.phase != Phase::Proceeding {
            return;
        }
        let r =
            call.a_invite
                .response(487, "Request Terminated", Some(&call.a_dialog.id.local_tag));
        let key = call.a_key.clone();
        self.respond(key, r);
        self.cancel_forks(id);
        self.end(now, id, reason);
    }

    /// Ends an answered call: BYE on each leg but `except` (the leg that
    /// sent BYE).
    fn hang_up(&mut self, now: Now, id: u64, except: Option<Leg>, reason: EndReason) {
        for leg in [Leg::A, Leg::B] {
            if Some(leg) == except {
                continue;
            }
            let Some(call) = self.calls.get(&id) else {
                return;
            };
            let target = match leg {
                Leg::A => Some(Target::Peer { flow: call.a_flow }),
                Leg::B => call.b_target(),
            };
            let Some(target) = target else {
                continue;
            };
            let via = self.via(&target);
            let Some(call) = self.calls.get_mut(&id) else {
                return;
            };
            let dialog = match leg {
                Leg::A => Some(&mut call.a_dialog),
                Leg::B => call.b_dialog.as_mut(),
            };
            if let Some(d) = dialog {
                let bye = d.request(Method::Bye, &via);
                self.send_request(id, target, bye, Client::Bye);
            }
        }
        self.end(now, id, reason);
    }

    /// Marks the call ended: CDR proposed, dialogs and deadlines dropped,
    /// pending relays answered 487. The call stays until its forks are done.
    fn end(&mut self, now: Now, id: u64, reason: EndReason) {
        let owner = self.config.node_id.clone();
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if call.phase == Phase::Ended {
            return;
        }
        call.phase = Phase::Ended;
        call.timers = Timers::default();
        call.a_ok = None;
        self.timed.remove(&id);
        self.servers.remove(&call.a_key);
        self.dialogs.remove(&(
            call.a_dialog.id.call_id.clone(),
            call.a_dialog.id.local_tag.clone(),
        ));
        self.dialogs
            .remove(&(call.b_call_id.clone(), call.b_tag.clone()));
        let cdr = Cdr {
            call_id: call.a_call_id().to_string(),
            caller: call.caller.clone(),
            callee: call.callee.clone(),
            owner,
            start_unix_ms: call.start_ms,
            answer_unix_ms: call.answer_ms,
            end_unix_ms: now.unix_ms,
            duration_ms: call.answer_ms.map_or(0, |a| now.unix_ms.saturating_sub(a)),
            reason,
        };
        let call_id = cdr.call_id.clone();
        // Requests relayed on this call will not be answered any more.
        let mut pending = Vec::new();
        for key in &call.clients {
            if let Some((_, Client::Relay(r))) = self.clients.get(key) {
                pending.push((key.clone(), r.server_key.clone(), r.request.clone()));
            }
        }
        for (key, server, req) in pending {
            self.clients.remove(&key);
            self.respond(server, req.response(487, "Request Terminated", None));
        }
        tracing::debug!(call_id = %call_id, ?reason, "call ended");
        self.propose(now, Command::EndCall { call_id, cdr });
        self.maybe_forget(id);
    }

    /// Drops an ended call once none of its forks can still answer.
    fn maybe_forget(&mut self, id: u64) {
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        if call.phase != Phase::Ended || call.forks.iter().any(|f| !f.done) {
            return;
        }
        if let Some(call) = self.calls.remove(&id) {
            for key in call.clients {
                // BYEs may still be answered; their answers are dropped.
                self.clients.remove(&key);
            }
        }
    }

    // ---- records ----

    fn record(&self, id: u64) -> Option<CallRecord> {
        let call = self.calls.get(&id)?;
        let b = call.b_dialog.as_ref()?;
        let target = call.b_target()?;
        Some(CallRecord {
            call_id: call.a_call_id().to_string(),
            owner: self.config.node_id.clone(),
            caller: call.caller.clone(),
            callee: call.callee.clone(),
            a: leg_record(
                &call.a_dialog,
                Target::Peer { flow: call.a_flow }.received(),
                Vec::new(),
            ),
            b: leg_record(b, target.received(), target.path()),
            start_unix_ms: call.start_ms,
            answer_unix_ms: call.answer_ms.unwrap_or(call.start_ms),
        })
    }
}

/// The replicable form of one leg's dialog.
pub fn leg_record(d: &Dialog, received: Option<String>, path: Vec<String>) -> LegRecord {
    LegRecord {
        call_id: d.id.call_id.clone(),
        local_tag: d.id.local_tag.clone(),
        remote_tag: d.id.remote_tag.clone(),
        local: d.local.clone(),
        remote: d.remote.clone(),
        local_seq: d.local_seq,
        remote_seq: d.remote_seq,
        remote_target: d.remote_target.clone(),
        route_set: d.route_set.clone(),
        secure: d.secure,
        received,
        path,
    }
}

/// The dialog a node continues from a replicated leg (DESIGN §5).
pub fn leg_dialog(r: &LegRecord) -> Dialog {
    Dialog {
        id: DialogId {
            call_id: r.call_id.clone(),
            local_tag: r.local_tag.clone(),
            remote_tag: r.remote_tag.clone(),
        },
        local: r.local.clone(),
        remote: r.remote.clone(),
        local_seq: r.local_seq,
        remote_seq: r.remote_seq,
        remote_target: r.remote_target.clone(),
        route_set: r.route_set.clone(),
        secure: r.secure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Applied, Binding};
    use bytes::Bytes;
    use sip::msg::{Framing, Limits};

    const SDP_A: &str = "v=0\r\no=a 1 1 IN IP4 192.0.2.10\r\n";
    const SDP_B: &str = "v=0\r\no=b 7 7 IN IP4 192.0.2.20\r\n";

    fn parse(s: &str) -> Message {
        Message::parse(
            Bytes::from(s.replace("\r\n", "\n").replace('\n', "\r\n")),
            Framing::Datagram,
            &Limits::default(),
        )
        .unwrap()
    }

    /// Through the wire and back, as the driver would deliver it.
    fn wire(m: &Message) -> Message {
        Message::parse(m.to_bytes(), Framing::Datagram, &Limits::default()).unwrap()
    }

    fn invite_a() -> Message {
        let text = format!(
            "INVITE sip:1001@10.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKa1;received=192.0.2.10;rport=5062
Via: SIP/2.0/UDP lb.example;branch=z9hG4bKlb
Max-Forwards: 70
Record-Route: <sip:lb.example;lr>
From: \"Alice\" <sip:1000@realm>;tag=atag
To: <sip:1001@realm>
Call-ID: a-call
CSeq: 10 INVITE
Contact: <sip:1000@192.0.2.10:5062>
Content-Type: application/sdp
Content-Length: {}

{SDP_A}",
            SDP_A.len()
        );
        Message::parse(
            Bytes::from(text.replace("\r\n", "\n").replace('\n', "\r\n")),
            Framing::Datagram,
            &Limits::default(),
        )
        .unwrap()
    }

    fn binding(contact: &str, path: Vec<&str>, received: Option<&str>) -> Binding {
        Binding {
            contact: contact.into(),
            expires_at_unix: 10_000,
            q: None,
            call_id: format!("reg-{contact}"),
            cseq: 1,
            path: path.into_iter().map(String::from).collect(),
            instance: None,
            reg_id: None,
            received: received.map(String::from),
            node: "n1".into(),
        }
    }

    fn state_with(bindings: Vec<Binding>) -> State {
        let mut s = State::new();
        let aor = Aor::parse("sip:1001@realm").unwrap();
        let cmds = bindings
            .into_iter()
            .map(|b| Command::UpsertBinding {
                aor: aor.clone(),
                binding: b,
            })
            .collect();
        s.apply(&Entry {
            id: ProposalId(1),
            at_unix: 1_000,
            cmds,
        });
        s
    }

    fn two_bindings() -> State {
        state_with(vec![
            binding(
                "sip:1001@192.0.2.20:5070",
                vec!["<sip:token@lb.example;lr;ob>"],
                None,
            ),
            binding(
                "sip:1001@192.0.2.21:5071",
                vec![],
                Some("tcp:192.0.2.21:40000"),
            ),
        ])
    }

    struct T {
        b: B2bua,
        t0: Instant,
        state: State,
    }

    impl T {
        fn new(state: State) -> T {
            let mut n = 0u64;
            let rng: Random = Box::new(move || {
                n += 1;
                n.to_be_bytes()
            });
            let cfg = B2buaConfig::new("n1", "realm", "sip:n1@10.0.0.1:5060", "10.0.0.1:5060");
            T {
                b: B2bua::new(cfg, rng),
                t0: base_instant(),
                state,
            }
        }

        fn at(&self, ms: u64) -> Now {
            Now {
                instant: self.t0 + Duration::from_millis(ms),
                unix_ms: 1_000_000 + ms,
            }
        }

        fn input(&mut self, ms: u64, input: Input) -> Vec<Output> {
            let now = self.at(ms);
            self.b.handle(now, input, &self.state).unwrap();
            self.drain()
        }

        fn drain(&mut self) -> Vec<Output> {
            std::iter::from_fn(|| self.b.poll_output()).collect()
        }

        fn request(&mut self, ms: u64, msg: Message) -> Vec<Output> {
            let key = TxnKey::server(&msg).unwrap();
            self.input(
                ms,
                Input::Request {
                    key,
                    flow: flow_a(),
                    msg,
                },
            )
        }

        /// Starts a call; returns the fork INVITEs (key, target, msg).
        fn start(&mut self) -> Vec<(TxnKey, Target, Message)> {
            let out = self.request(0, invite_a());
            out.into_iter()
                .map(|o| match o {
                    Output::SendRequest { target, msg } => {
                        (TxnKey::client(&msg).unwrap(), target, msg)
                    }
                    other => panic!("unexpected {other:?}"),
                })
                .collect()
        }

        fn respond_fork(
            &mut self,
            ms: u64,
            fork: &(TxnKey, Target, Message),
            r: Message,
        ) -> Vec<Output> {
            self.input(
                ms,
                Input::Response {
                    key: fork.0.clone(),
                    msg: wire(&r),
                },
            )
        }
    }

    /// The origin of virtual time; only offsets from it are used.
    #[allow(clippy::disallowed_methods)]
    fn base_instant() -> Instant {
        Instant::now()
    }

    fn flow_a() -> Flow {
        Flow::to(Transport::Udp, "192.0.2.10:5062".parse().unwrap())
    }

    fn answer(inv: &Message, code: u16, tag: &str, contact: &str) -> Message {
        let mut r = inv.response(code, "X", Some(tag));
        if code < 300 {
            r.push(Header::new(HeaderName::Contact, contact));
            r.push(Header::new(HeaderName::RecordRoute, "<sip:lb.example;lr>"));
            if code >= 180 {
                r.set_body(
                    Some("application/sdp"),
                    Bytes::from_static(SDP_B.as_bytes()),
                );
            }
        }
        r
    }

    fn responses(out: &[Output]) -> Vec<&Message> {
        out.iter()
            .filter_map(|o| match o {
                Output::SendResponse { msg, .. } => Some(msg),
                _ => None,
            })
            .collect()
    }

    fn requests(out: &[Output]) -> Vec<(&Target, &Message)> {
        out.iter()
            .filter_map(|o| match o {
                Output::SendRequest { target, msg } => Some((target, msg)),
                _ => None,
            })
            .collect()
    }

    fn acks(out: &[Output]) -> Vec<&Message> {
        out.iter()
            .filter_map(|o| match o {
                Output::SendAck { msg, .. } => Some(msg),
                _ => None,
            })
            .collect()
    }

    fn cancels(out: &[Output]) -> Vec<&TxnKey> {
        out.iter()
            .filter_map(|o| match o {
                Output::Cancel { key } => Some(key),
                _ => None,
            })
            .collect()
    }

    fn proposals(out: &[Output]) -> Vec<&Command> {
        out.iter()
            .filter_map(|o| match o {
                Output::Propose(e) => Some(&e.cmds[0]),
                _ => None,
            })
            .collect()
    }

    /// A call answered by fork 0 and ACKed by A.
    fn confirmed() -> (T, Vec<(TxnKey, Target, Message)>, String) {
        let mut t = T::new(two_bindings());
        let forks = t.start();
        let out = t.respond_fork(
            100,
            &forks[0],
            answer(&forks[0].2, 200, "btag", "<sip:1001@192.0.2.20:5070>"),
        );
        let ok = responses(&out)[0].clone();
        let a_tag = ok.to().unwrap().tag().unwrap().to_string();
        let ack = parse(&format!(
            "ACK sip:n1@10.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKack
Max-Forwards: 70
From: \"Alice\" <sip:1000@realm>;tag=atag
To: <sip:1001@realm>;tag={a_tag}
Call-ID: a-call
CSeq: 10 ACK
Content-Length: 0

"
        ));
        let out = t.input(200, Input::Ack { msg: ack });
        assert!(matches!(proposals(&out)[..], [Command::PutCall { .. }]));
        (t, forks, a_tag)
    }

    fn in_dialog_from_a(method: &str, seq: u32, a_tag: &str, body: &str) -> Message {
        parse(&format!(
            "{method} sip:n1@10.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK{method}{seq}
Max-Forwards: 70
From: \"Alice\" <sip:1000@realm>;tag=atag
To: <sip:1001@realm>;tag={a_tag}
Call-ID: a-call
CSeq: {seq} {method}
Contact: <sip:1000@192.0.2.10:5062>
Content-Length: {}

{body}",
            body.len()
        ))
    }

    #[test]
    fn initial_invite_rejections() {
        let mut t = T::new(two_bindings());
        let mut mf0 = invite_a();
        mf0.set(HeaderName::MaxForwards, "0");
        assert_eq!(responses(&t.request(0, mf0))[0].status(), Some(483));

        let mut looped = invite_a();
        let via = format!("SIP/2.0/UDP lb.example;branch={}77", t.b.branch_prefix());
        looped.push(Header::new(HeaderName::Via, &via));
        assert_eq!(responses(&t.request(0, looped))[0].status(), Some(482));

        let mut no_user = invite_a();
        no_user.set_request_uri("sip:10.0.0.1:5060");
        assert_eq!(responses(&t.request(0, no_user))[0].status(), Some(404));

        // RFC 2543 style, no Contact: the call goes ahead (From is the target)
        let mut no_contact = invite_a();
        no_contact.remove(HeaderName::Contact);
        let out = t.request(0, no_contact);
        assert!(responses(&out).iter().all(|r| r.status() != Some(400)));
        assert!(out.iter().any(|o| matches!(o, Output::SendRequest { .. })));

        let mut t = T::new(State::new());
        let out = t.request(0, invite_a());
        let r = responses(&out)[0];
        assert_eq!(r.status(), Some(480));
        assert!(r.to().unwrap().tag().is_some());
        assert_eq!(t.b.call_count(), 0);
        assert!(t.b.poll_timeout().is_none());
    }

    #[test]
    fn a_number_that_is_not_local_goes_to_the_outbound_next_hop() {
        // no bindings at all: the location lookup is not consulted
        let mut t = T::new(State::new());
        let hop = Flow::to(Transport::Udp, "192.0.2.99:5080".parse().unwrap());
        let msg = invite_a();
        let key = TxnKey::server(&msg).unwrap();
        let out = t.input(
            0,
            Input::Outbound {
                key,
                flow: flow_a(),
                msg,
                next_hop: hop,
            },
        );
        let sent: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::SendRequest { target, msg } => Some((target, msg)),
                _ => None,
            })
            .collect();
        assert_eq!(sent.len(), 1);
        let (target, inv) = sent[0];
        assert_eq!(*target, Target::Peer { flow: hop });
        assert_eq!(inv.request_uri_str(), Some("sip:1001@192.0.2.99:5080"));
        assert_eq!(
            inv.header(HeaderName::To),
            Some("<sip:1001@192.0.2.99:5080>")
        );
        assert!(inv.header(HeaderName::Route).is_none());
        assert_eq!(t.b.call_count(), 1);
    }

    #[test]
    fn forks_one_new_dialog_invite_per_binding() {
        let mut t = T::new(two_bindings());
        let forks = t.start();
        assert_eq!(forks.len(), 2);
        let (k0, t0, m0) = &forks[0];
        let (k1, t1, m1) = &forks[1];
        assert_ne!(k0, k1);
        assert_eq!(m0.request_uri_str(), Some("sip:1001@192.0.2.20:5070"));
        assert_eq!(m1.request_uri_str(), Some("sip:1001@192.0.2.21:5071"));
        assert_eq!(
            m0.values(HeaderName::Route).collect::<Vec<_>>(),
            ["<sip:token@lb.example;lr;ob>"]
        );
        assert_eq!(m1.values(HeaderName::Route).count(), 0);
        assert!(
            matches!(t1, Target::Binding { received: Some(r), .. } if r == "tcp:192.0.2.21:40000")
        );
        assert_eq!(t1.transport(), Transport::Tcp);
        assert_eq!(t0.transport(), Transport::Udp);
        assert!(
            m1.values(HeaderName::Via)
                .next()
                .unwrap()
                .starts_with("SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bK-sz-n1-")
        );
        for m in [m0, m1] {
            let m = wire(m);
            assert_eq!(m.values(HeaderName::Via).count(), 1);
            assert_eq!(m.values(HeaderName::RecordRoute).count(), 0);
            assert_ne!(m.call_id(), Some("a-call"));
            assert_eq!(m.call_id(), m0.call_id());
            assert_eq!(m.max_forwards(), Some(69));
            assert_eq!(m.header(HeaderName::To), Some("<sip:1001@realm>"));
            let from = m.from().unwrap();
            assert_eq!(from.uri_raw, "sip:1000@realm");
            assert_eq!(from.display, Some("\"Alice\""));
            assert_ne!(from.tag(), Some("atag"));
            assert_eq!(
                m.header(HeaderName::Contact),
                Some("<sip:n1@10.0.0.1:5060>")
            );
            assert_eq!(m.body().as_ref(), SDP_A.as_bytes());
            assert_eq!(m.header(HeaderName::ContentType), Some("application/sdp"));
            assert_eq!(m.cseq().unwrap().seq, 1);
        }
    }

    #[test]
    fn relays_18x_first_2xx_wins_and_late_2xx_gets_ack_and_bye() {
        let mut t = T::new(two_bindings());
        let forks = t.start();
        let out = t.respond_fork(10, &forks[0], answer(&forks[0].2, 180, "b0", "<sip:x@h>"));
        let r180 = responses(&out)[0].clone();
        assert_eq!(r180.status(), Some(180));
        let a_tag = r180.to().unwrap().tag().unwrap().to_string();
        assert_eq!(r180.call_id(), Some("a-call"));
        assert_eq!(r180.body().as_ref(), SDP_B.as_bytes());
        let out = t.respond_fork(20, &forks[1], answer(&forks[1].2, 183, "b1", "<sip:x@h>"));
        let r183 = responses(&out)[0];
        assert_eq!(r183.to().unwrap().tag(), Some(a_tag.as_str()));
        // 100 from a fork is not relayed.
        let out = t.respond_fork(25, &forks[1], forks[1].2.response(100, "Trying", None));
        assert!(out.is_empty());

        let out = t.respond_fork(
            30,
            &forks[1],
            answer(&forks[1].2, 200, "b1", "<sip:1001@192.0.2.21:5071>"),
        );
        let ack = acks(&out)[0].clone();
        assert_eq!(ack.request_uri_str(), Some("sip:1001@192.0.2.21:5071"));
        assert_eq!(ack.to().unwrap().tag(), Some("b1"));
        assert_eq!(ack.cseq().unwrap().seq, 1);
        let ok = responses(&out)[0];
        assert_eq!(ok.status(), Some(200));
        assert_eq!(ok.to().unwrap().tag(), Some(a_tag.as_str()));
        assert_eq!(ok.body().as_ref(), SDP_B.as_bytes());
        assert_eq!(
            ok.header(HeaderName::Contact),
            Some("<sip:n1@10.0.0.1:5060>")
        );
        assert_eq!(cancels(&out), [&forks[0].0]);

        // The same 2xx again: the same ACK again, nothing else.
        let out = t.respond_fork(
            40,
            &forks[1],
            answer(&forks[1].2, 200, "b1", "<sip:1001@192.0.2.21:5071>"),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(acks(&out)[0], &ack);

        // The cancelled fork answers anyway: ACK and BYE it.
        let out = t.respond_fork(
            50,
            &forks[0],
            answer(&forks[0].2, 200, "b0", "<sip:1001@192.0.2.20:5070>"),
        );
        assert_eq!(acks(&out)[0].to().unwrap().tag(), Some("b0"));
        let byes = requests(&out);
        assert_eq!(byes.len(), 1);
        assert!(byes[0].1.is_method(&Method::Bye));
        assert_eq!(byes[0].1.to().unwrap().tag(), Some("b0"));
        assert_eq!(byes[0].1.cseq().unwrap().seq, 2);
        assert!(responses(&out).is_empty());
    }

    #[test]
    fn cancel_waits_for_a_provisional() {
        let mut t = T::new(two_bindings());
        let forks = t.start();
        let out = t.respond_fork(
            10,
            &forks[0],
            answer(&forks[0].2, 200, "b0", "<sip:1001@192.0.2.20:5070>"),
        );
        // Fork 1 sent nothing yet: no CANCEL before its provisional (§9.1).
        assert!(cancels(&out).is_empty());
        let out = t.respond_fork(20, &forks[1], forks[1].2.response(100, "Trying", None));
        assert_eq!(cancels(&out), [&forks[1].0]);
        // Its 487 ends it quietly.
        let out = t.respond_fork(
            30,
            &forks[1],
            forks[1].2.response(487, "Request Terminated", Some("b1")),
        );
        assert!(out.is_empty());
    }

    #[test]
    fn retransmits_2xx_until_ack_then_gives_up_with_bye_both() {
        let mut t = T::new(two_bindings());
        let forks = t.start();
        t.respond_fork(
            0,
            &forks[0],
            answer(&forks[0].2, 200, "b0", "<sip:1001@192.0.2.20:5070>"),
        );
        let mut fired = Vec::new();
        let now_ms = loop {
            let due = t.b.poll_timeout().unwrap();
            let now_ms = (due - t.t0).as_millis() as u64;
            t.b.handle_timeout(t.at(now_ms));
            let out = t.drain();
            if responses(&out).len() == 1 {
                assert_eq!(responses(&out)[0].status(), Some(200));
                fired.push(now_ms);
                continue;
            }
            let byes = requests(&out);
            assert_eq!(byes.len(), 2);
            assert!(byes.iter().all(|(_, m)| m.is_method(&Method::Bye)));
            assert!(matches!(byes[0].0, Target::Peer { .. }));
            assert_eq!(
                byes[0].1.request_uri_str(),
                Some("sip:1000@192.0.2.10:5062")
            );
            assert_eq!(
                byes[0].1.values(HeaderName::Route).next(),
                Some("<sip:lb.example;lr>")
            );
            assert_eq!(byes[1].1.to().unwrap().tag(), Some("b0"));
            match proposals(&out)[..] {
                [Command::EndCall { cdr, .. }] => {
                    assert_eq!(cdr.reason, EndReason::AckTimeout);
                    assert_eq!(cdr.answer_unix_ms, Some(1_000_000));
                }
                ref other => panic!("{other:?}"),
            }
            break now_ms;
        };
        assert_eq!(fired[..5], [500, 1500, 3500, 7500, 11500]);
        assert_eq!(now_ms, 32_000);
        assert!(t.b.poll_timeout().is_none());
    }

    #[test]
    fn best_response_when_every_fork_fails() {
        let cases: [(&[u16], u16); 4] = [
            (&[480, 486], 486),
            (&[503, 503], 500),
            (&[404, 302], 302),
            (&[0, 0], 408), // 0: the fork timed out
        ];
        for (codes, want) in cases {
            let mut t = T::new(two_bindings());
            let forks = t.start();
            let mut last = Vec::new();
            for (f, code) in forks.iter().zip(codes) {
                last = if *code == 0 {
                    t.input(10, Input::Timeout { key: f.0.clone() })
                } else {
                    t.respond_fork(
                        10,
                        f,
                        f.2.response(*code, "X", Some("t"))
                            .with(HeaderName::Contact, "<sip:else@h>"),
                    )
                };
            }
            let r = responses(&last)[0];
            assert_eq!(r.status(), Some(want), "{codes:?}");
            assert_eq!(r.header(HeaderName::Contact).is_some(), want == 302);
            match proposals(&last)[..] {
                [Command::EndCall { cdr, .. }] => {
                    assert_eq!(cdr.reason, EndReason::Rejected { code: want });
                    assert_eq!(cdr.duration_ms, 0);
                }
                ref other => panic!("{other:?}"),
            }
            assert_eq!(t.b.call_count(), 0);
        }
        // A 6xx answers at once and cancels the others.
        let mut t = T::new(two_bindings());
        let forks = t.start();
        t.respond_fork(
            5,
            &forks[1],
            forks[1].2.response(180, "Ringing", Some("b1")),
        );
        let out = t.respond_fork(
            10,
            &forks[0],
            forks[0].2.response(603, "Decline", Some("b0")),
        );
        assert_eq!(responses(&out)[0].status(), Some(603));
        assert_eq!(cancels(&out), [&forks[1].0]);
    }

    #[test]
    fn cancel_from_a_answers_487_and_cancels_forks() {
        let mut t = T::new(two_bindings());
        let forks = t.start();
        t.respond_fork(
            5,
            &forks[0],
            forks[0].2.response(180, "Ringing", Some("b0")),
        );
        let invite = TxnKey::server(&invite_a()).unwrap();
        let out = t.input(10, Input::Cancelled { invite });
        assert_eq!(responses(&out)[0].status(), Some(487));
        assert_eq!(cancels(&out), [&forks[0].0]);
        match proposals(&out)[..] {
            [Command::EndCall { call_id, cdr }] => {
                assert_eq!(call_id, "a-call");
                assert_eq!(cdr.reason, EndReason::Cancelled);
                assert_eq!(cdr.answer_unix_ms, None);
                assert_eq!(cdr.callee, "sip:1001@realm");
                assert_eq!(cdr.caller, "sip:1000@realm");
            }
            ref other => panic!("{other:?}"),
        }
        // Fork 1 gets its CANCEL with its first provisional.
        let out = t.respond_fork(20, &forks[1], forks[1].2.response(100, "Trying", None));
        assert_eq!(cancels(&out), [&forks[1].0]);
        for f in &forks {
            t.respond_fork(30, f, f.2.response(487, "Request Terminated", Some("x")));
        }
        assert_eq!(t.b.call_count(), 0);
    }

    #[test]
    fn confirmed_call_is_proposed_with_both_legs() {
        let (t, forks, a_tag) = confirmed();
        let _ = t;
        let mut t2 = T::new(two_bindings());
        let f2 = t2.start();
        assert_eq!(forks[0].2.call_id(), f2[0].2.call_id());
        // Re-run to inspect the record itself.
        let out = t2.respond_fork(
            100,
            &f2[0],
            answer(&f2[0].2, 200, "btag", "<sip:1001@192.0.2.20:5070>"),
        );
        assert_eq!(responses(&out)[0].to().unwrap().tag(), Some(a_tag.as_str()));
        let ack = in_dialog_from_a("ACK", 10, &a_tag, "");
        let out = t2.input(200, Input::Ack { msg: ack });
        let Command::PutCall { call } = proposals(&out)[0].clone() else {
            panic!("no PutCall");
        };
        assert_eq!(call.call_id, "a-call");
        assert_eq!(call.owner, "n1");
        assert_eq!(call.a.local_tag, a_tag);
        assert_eq!(call.a.remote_tag, "atag");
        assert_eq!(call.a.remote_target, "sip:1000@192.0.2.10:5062");
        assert_eq!(call.a.route_set, ["<sip:lb.example;lr>"]);
        assert_eq!(call.a.received.as_deref(), Some("udp:192.0.2.10:5062"));
        assert_eq!(call.b.remote_tag, "btag");
        assert_eq!(call.b.local_seq, 1);
        assert_eq!(call.b.remote_target, "sip:1001@192.0.2.20:5070");
        assert_eq!(call.b.path, ["<sip:token@lb.example;lr;ob>"]);
        assert_eq!(call.answer_unix_ms, 1_000_100);
        assert!(t2.b.poll_timeout().is_none());
        // The record applies to the state and converts back to the dialog.
        let mut s = State::new();
        s.apply(&Entry {
            id: ProposalId(1),
            at_unix: 1,
            cmds: vec![Command::PutCall { call: call.clone() }],
        });
        assert_eq!(s.call("a-call"), Some(&*call));
        assert_eq!(
            leg_record(
                &leg_dialog(&call.b),
                call.b.received.clone(),
                call.b.path.clone()
            ),
            call.b
        );
    }

    #[test]
    fn bye_from_either_side_ends_the_call_with_a_cdr() {
        // From A.
        let (mut t, forks_a, a_tag) = confirmed();
        let out = t.request(5_000, in_dialog_from_a("BYE", 11, &a_tag, ""));
        assert_eq!(responses(&out)[0].status(), Some(200));
        let byes = requests(&out);
        assert_eq!(byes.len(), 1);
        let bye = byes[0].1;
        assert!(bye.is_method(&Method::Bye));
        assert_eq!(bye.request_uri_str(), Some("sip:1001@192.0.2.20:5070"));
        assert_eq!(bye.to().unwrap().tag(), Some("btag"));
        assert_eq!(bye.cseq().unwrap().seq, 2);
        assert_eq!(
            bye.values(HeaderName::Route).next(),
            Some("<sip:lb.example;lr>")
        );
        let mut state = State::new();
        match proposals(&out)[..] {
            [cmd @ Command::EndCall { cdr, .. }] => {
                assert_eq!(cdr.reason, EndReason::CallerHangup);
                assert_eq!(cdr.start_unix_ms, 1_000_000);
                assert_eq!(cdr.end_unix_ms, 1_005_000);
                assert_eq!(cdr.duration_ms, 4_900);
                assert_eq!(
                    state.apply(&Entry {
                        id: ProposalId(9),
                        at_unix: 1,
                        cmds: vec![cmd.clone()],
                    }),
                    Applied::Done {
                        upserted: 0,
                        removed: 0
                    }
                );
                assert!(state.cdr("a-call").is_some());
            }
            ref other => panic!("{other:?}"),
        }
        // The BYE's answer is dropped quietly; the dialog is gone.
        let key = TxnKey::client(bye).unwrap();
        let ok = wire(&bye.response(200, "OK", None));
        t.input(5_100, Input::Response { key, msg: ok });
        let out = t.request(5_200, in_dialog_from_a("BYE", 12, &a_tag, ""));
        assert_eq!(responses(&out)[0].status(), Some(481));
        // The call lingers until fork 1 (never answered, CANCEL pending) ends.
        assert_eq!(t.b.call_count(), 1);
        let out = t.input(
            40_000,
            Input::Timeout {
                key: forks_a[1].0.clone(),
            },
        );
        assert!(out.is_empty());
        assert_eq!(t.b.call_count(), 0);

        // From B.
        let (mut t, forks, a_tag) = confirmed();
        let b_call_id = forks[0].2.call_id().unwrap().to_string();
        let b_from_tag = forks[0].2.from().unwrap().tag().unwrap().to_string();
        let bye_b = parse(&format!(
            "BYE sip:n1@10.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.20:5070;branch=z9hG4bKbb
Max-Forwards: 70
From: <sip:1001@realm>;tag=btag
To: <sip:1000@realm>;tag={b_from_tag}
Call-ID: {b_call_id}
CSeq: 1 BYE
Content-Length: 0

"
        ));
        let out = t.request(3_000, bye_b);
        assert_eq!(responses(&out)[0].status(), Some(200));
        let (target, bye) = requests(&out)[0];
        assert!(matches!(target, Target::Peer { .. }));
        assert_eq!(bye.call_id(), Some("a-call"));
        assert_eq!(bye.from().unwrap().tag(), Some(a_tag.as_str()));
        assert_eq!(bye.to().unwrap().tag(), Some("atag"));
        assert!(matches!(
            proposals(&out)[..],
            [Command::EndCall {
                cdr: Cdr {
                    reason: EndReason::CalleeHangup,
                    ..
                },
                ..
            }]
        ));
    }

    #[test]
    fn in_dialog_requests_are_relayed_and_guarded() {
        let (mut t, forks, a_tag) = confirmed();
        // Unknown dialog and stale CSeq.
        let out = t.request(1_000, in_dialog_from_a("INFO", 11, "nope", ""));
        assert_eq!(responses(&out)[0].status(), Some(481));
        let out = t.request(1_000, in_dialog_from_a("INFO", 3, &a_tag, ""));
        assert_eq!(responses(&out)[0].status(), Some(500));

        // A re-INVITE from A goes to B as a request of B's dialog.
        let sdp = "v=0\r\no=a 1 2 IN IP4 192.0.2.10\r\n";
        let reinvite = in_dialog_from_a("INVITE", 12, &a_tag, sdp);
        let out = t.request(2_000, reinvite.clone());
        let (target, to_b) = requests(&out)[0];
        let to_b = to_b.clone();
        assert!(matches!(target, Target::Binding { .. }));
        assert_eq!(to_b.call_id(), forks[0].2.call_id());
        assert_eq!(to_b.cseq().unwrap().seq, 2);
        assert_eq!(to_b.body().as_ref(), sdp.as_bytes());
        assert_eq!(
            to_b.header(HeaderName::Contact),
            Some("<sip:n1@10.0.0.1:5060>")
        );
        // Glare: another re-INVITE meanwhile gets 491.
        let out = t.request(2_010, in_dialog_from_a("INVITE", 13, &a_tag, sdp));
        assert_eq!(responses(&out)[0].status(), Some(491));

        // B answers: 200 to A with B's SDP, ACK to B, the change proposed.
        let key = TxnKey::client(&to_b).unwrap();
        let mut ok = to_b.response(200, "OK", None);
        ok.push(Header::new(
            HeaderName::Contact,
            "<sip:1001@192.0.2.99:5070>",
        ));
        ok.set_body(
            Some("application/sdp"),
            Bytes::from_static(SDP_B.as_bytes()),
        );
        let out = t.input(
            2_100,
            Input::Response {
                key,
                msg: wire(&ok),
            },
        );
        let r = responses(&out)[0];
        assert_eq!(r.status(), Some(200));
        assert_eq!(r.cseq().unwrap().seq, 12);
        assert_eq!(r.body().as_ref(), SDP_B.as_bytes());
        let ack = acks(&out)[0];
        assert_eq!(ack.cseq().unwrap().seq, 2);
        assert_eq!(ack.request_uri_str(), Some("sip:1001@192.0.2.99:5070"));
        let Command::PutCall { call } = proposals(&out)[0] else {
            panic!("no PutCall");
        };
        assert_eq!(call.b.local_seq, 2);
        assert_eq!(call.a.remote_seq, Some(13));

        // An INFO from B to A whose relay times out: 408 back to B.
        let b_call_id = forks[0].2.call_id().unwrap();
        let b_from_tag = forks[0].2.from().unwrap().tag().unwrap();
        let info = parse(&format!(
            "INFO sip:n1@10.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.20:5070;branch=z9hG4bKinfo
Max-Forwards: 70
From: <sip:1001@realm>;tag=btag
To: <sip:1000@realm>;tag={b_from_tag}
Call-ID: {b_call_id}
CSeq: 5 INFO
Content-Length: 0

"
        ));
        let out = t.request(3_000, info);
        let to_a = requests(&out)[0].1.clone();
        assert_eq!(to_a.call_id(), Some("a-call"));
        assert_eq!(to_a.cseq().unwrap().seq, 1);
        let out = t.input(
            35_000,
            Input::Timeout {
                key: TxnKey::client(&to_a).unwrap(),
            },
        );
        assert_eq!(responses(&out)[0].status(), Some(408));
        assert_eq!(responses(&out)[0].cseq().unwrap().method, Method::Info);
    }

    #[test]
    fn refused_inputs_change_nothing() {
        let mut t = T::new(two_bindings());
        let forks = t.start();
        let before = t.b.clients.len();
        let bogus = TxnKey::Client {
            branch: "z9hG4bKnone".into(),
            method: Method::Invite,
        };
        let r = t.b.handle(
            t.at(1),
            Input::Response {
                key: bogus.clone(),
                msg: forks[0].2.response(180, "Ringing", Some("x")),
            },
            &t.state,
        );
        assert_eq!(r, Err(B2buaError::UnknownTransaction(bogus)));
        let r = t.b.handle(
            t.at(1),
            Input::Cancelled {
                invite: forks[0].0.clone(),
            },
            &t.state,
        );
        assert_eq!(r, Err(B2buaError::UnknownCall));
        assert!(t.b.poll_output().is_none());
        assert_eq!(t.b.clients.len(), before);
    }
}
