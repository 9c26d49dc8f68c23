//! The B2BUA core of the call switch (DESIGN §4), sans-IO: calls between
//! registered users, forked to every binding of the callee, and pager-mode
//! MESSAGEs (RFC 3428) forked the same way.
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
//!     | PRACK (RAck: our RSeq) ───── PRACK (RAck: Bi's RSeq) ─▶ Bi (100rel only)
//!     | ◀── 200 (B's SDP) Answered ◀── first 2xx ───────────── | ──▶ ACK it,
//!     |      (resent T1..T2)         CANCEL the other forks      later 2xx: ACK+BYE
//!     | ACK ──────────▶ Confirmed ── Propose(PutCall)
//!     | ◀── re-INVITE/UPDATE ─ every interval/2 ─ re-INVITE/UPDATE ──▶ B (RFC 4028)
//!     | BYE ──────────▶ 200, BYE ──────────────────────────▶ B ── Propose(EndCall{cdr})
//! ```
//!
//! Call phases:
//!
//! ```text
//!   Proceeding --first 2xx--> Answered --A's ACK--> Confirmed --BYE--> Ended
//!       |                        |  64*T1 without ACK: BYE both --------^
//!       |                        +-- session refresh 408/481/no answer, -^
//!       |                            or a far-end refresher silent: BYE both
//!       +--all forks failed / 6xx / CANCEL / early BYE / no PRACK------^
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
//! | initial non-INVITE other than MESSAGE | 405 Method Not Allowed |
//! | in-dialog request for no dialog, or from a losing fork | 481 |
//! | in-dialog CSeq lower than the last (RFC 3261 §12.2.2) | 500 |
//! | re-INVITE while one is being relayed, or a refresh of the core runs, on the call | 491 Request Pending |
//! | Session-Expires below `min_se` (RFC 4028 §8.1) | 422 with `Min-SE` |
//! | malformed Session-Expires or Min-SE | 400 Bad Request |
//! | PRACK whose RAck is not the unacknowledged reliable provisional (RFC 3262 §3) | 481 |
//! | PRACK after the answer for an RSeq the core sent | 200 (the 2xx overtook it) |
//! | PRACK from the callee's leg | 481 (the core sends B nothing reliably) |
//! | A's UPDATE before any callee early dialog exists | 500 with Retry-After (RFC 3311 §5.2) |
//! | no PRACK for a reliable provisional within 64*T1 | 500 to A, forks cancelled |
//! | 422 from a fork with a larger Min-SE | that fork retried (same Call-ID, next CSeq, its Min-SE as interval) |
//! | MESSAGE: first 2xx of a fork | relayed at once; later answers absorbed |
//! | MESSAGE: every fork failed | the best response, as for INVITE |
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
//! one To tag chosen per call.
//!
//! Reliable provisionals (RFC 3262) pass through per leg. A's
//! `Supported: 100rel` or `Require: 100rel` is put on the B legs the same
//! way. A's leg is one early dialog of the core, so the core numbers the
//! reliable provisionals it sends A itself (RSeq from a random start, one
//! at a time: a reliable 18x from another fork waits for the PRACK of the
//! one before), retransmits them T1, 2*T1, ... until A's PRACK and answers
//! 500 after 64*T1 without it. A's PRACK goes to the fork and early dialog
//! (To tag) that sent the provisional, with `RAck` rewritten to that fork's
//! RSeq and INVITE CSeq; its 200 comes back. B's retransmissions of a
//! reliable 18x are absorbed (the core retransmits towards A). When A
//! required 100rel and B's 18x was unreliable, the core sends it reliably
//! and answers A's PRACK itself. When A named no 100rel, nothing about it
//! goes on the B legs; a callee that sends a reliable 18x anyway is PRACKed
//! by the core and the 18x relayed without `Require`/`RSeq`; a callee that
//! requires 100rel answers 421 (420 when A required it and B lacks it),
//! which counts as that fork's failure and, if it is the best response,
//! reaches A with its `Require`/`Unsupported` so A can retry — the core does
//! not retry the fork with 100rel on A's behalf. UPDATE before the answer
//! (RFC 3311) is relayed between A's early dialog and the early dialog of
//! the last provisional relayed to A; the callee's UPDATE goes to A. When
//! the answer arrives the callee's early dialog becomes the confirmed one,
//! CSeq numbers carrying on.
//!
//! Session timers (RFC 4028), the core refreshing both legs: A's
//! Session-Expires is honoured (422 with our `min_se` when below it) and
//! capped at `session_expires`; the B legs get that interval with
//! `refresher=uac`, the larger Min-SE and `Supported: timer`, and a fork's
//! 422 is retried with its Min-SE. The 2xx to A carries the interval with
//! `refresher=uas` (and `Require: timer` when A supports timers) unless A
//! asked `refresher=uac`, which RFC 4028 §9 obliges the core to keep. On
//! B's leg the 2xx's `refresher` is followed (a compliant callee keeps our
//! `uac`); without Session-Expires in it, the core refreshes alone (§7.2).
//! At half the interval the core sends the refresh on each leg it
//! refreshes: UPDATE without a body when the far end's Allow (A's INVITE,
//! B's 2xx) lists UPDATE, else a re-INVITE offering the last SDP the core
//! sent on that leg (an UPDATE answered 405/501 is redone as re-INVITE; a
//! 422 is redone with its Min-SE; 491 is retried after T2; other failures a
//! quarter interval later). A refresh answered 408 or 481, or unanswered,
//! ends the call (BYE both legs, CDR `RefreshFailed`). A leg whose far end
//! is the refresher must see a refresh before the interval ends (the core
//! acts the smaller of 32 s and a third of the interval early, §10), else
//! BYE both legs, CDR `SessionExpired`. A relayed re-INVITE or UPDATE that
//! succeeds refreshes both legs and carries each leg's Session-Expires.
//! Every refresh that succeeds is proposed (the CSeq changed), and each
//! leg's interval and refresher are in its [`LegRecord`] for a node that
//! takes the call over.
//!
//! MESSAGE (RFC 3428) outside a dialog: after the same checks as an INVITE
//! (the driver authenticates the sender and answers 404 for unknown
//! users), one MESSAGE per binding (new Call-ID, no Contact, body and
//! Content-Type unchanged); no call, record or CDR. A fork's timeout
//! (Timer F, 64*T1) counts as 408.
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
//! when a relayed re-INVITE or UPDATE or a session refresh of the core
//! succeeds; [`Command::EndCall`] with the
//! CDR when a call ends, answered or not. The core does not wait for their
//! commits.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;

use sip::dialog::{Dialog, DialogError, DialogId};
use sip::flow::{Flow, Transport};
use sip::msg::{BRANCH_COOKIE, Header, HeaderName, Message, Method, ParseError, Uri};
use sip::txn::TxnKey;

use crate::state::{
    Aor, Binding, CallRecord, Cdr, Command, EndReason, Entry, LegRecord, ProposalId, Refresher,
    SessionTimer, State,
};

/// Methods the B2BUA handles (for `Allow`).
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, PRACK, UPDATE, INFO, MESSAGE, OPTIONS";

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
/// | `session_expires` | `u32` | RFC 4028 session interval asked for, seconds | 1800 |
/// | `min_se` | `u32` | RFC 4028 smallest interval accepted (422 below), seconds | 90 |
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
    /// RFC 4028 session interval asked for when the caller asks for none
    /// or a longer one, seconds.
    pub session_expires: u32,
    /// RFC 4028 Min-SE of this node, seconds.
    pub min_se: u32,
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
            session_expires: 1800,
            min_se: 90,
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
    /// Early dialogs (RFC 3261 §12.1.2) its provisionals created, one per
    /// To tag: PRACK and UPDATE go to the callee inside them.
    early: Vec<Dialog>,
    /// Reliable provisionals seen from it, (To tag, RSeq): a repeated one
    /// is a retransmission (RFC 3262 §4).
    reliable_seen: Vec<(String, u32)>,
    /// The Session-Expires of its INVITE, seconds (grows on 422).
    session_expires: u32,
}

impl Fork {
    fn early_mut(&mut self, tag: &str) -> Option<&mut Dialog> {
        self.early.iter_mut().find(|d| d.id.remote_tag == tag)
    }
}

/// A relayed in-dialog request waiting for the other leg's response.
#[derive(Debug, Clone)]
struct Relay {
    server_key: TxnKey,
    request: Message,
    from: Leg,
    sent: Message,
    /// The callee's early dialog (fork, To tag) it was relayed to or came
    /// from, before the answer.
    early: Option<(usize, String)>,
}

#[derive(Debug, Clone)]
enum Client {
    Fork(usize),
    Bye,
    Relay(Box<Relay>),
    /// A request of the core's own whose answer only needs absorbing (the
    /// PRACK for a reliable provisional the caller did not ask for).
    Own,
    /// A session refresh of the core on this leg (RFC 4028 §7.4, §9).
    Refresh(Leg, Box<Message>),
    /// One fork of a MESSAGE (index into the pager's forks).
    Pager(usize),
}

/// A final response kept for the best-response choice.
#[derive(Debug, Clone)]
struct Final {
    code: u16,
    reason: String,
    headers: Vec<Header>,
}

/// The named deadlines of a call (RFC 3261 §13.3.1.4, RFC 3262 §3,
/// RFC 4028 §10).
#[derive(Debug, Clone, Copy, Default)]
struct Timers {
    /// Next retransmission of the 2xx to A.
    retransmit_2xx: Option<Instant>,
    /// Give up waiting for A's ACK (64*T1 after the 2xx).
    ack_wait: Option<Instant>,
    /// Next retransmission of the reliable provisional A has not PRACKed.
    retransmit_1xx: Option<Instant>,
    /// Give up waiting for that PRACK (64*T1 after the first sending).
    prack_wait: Option<Instant>,
    /// RFC 4028 deadline on A's leg: our refresh, or the far end's expiry.
    session_a: Option<Instant>,
    /// The same on B's leg.
    session_b: Option<Instant>,
}

impl Timers {
    fn earliest(&self) -> Option<Instant> {
        [
            self.retransmit_2xx,
            self.ack_wait,
            self.retransmit_1xx,
            self.prack_wait,
            self.session_a,
            self.session_b,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn session_at(&self, leg: Leg) -> Option<Instant> {
        match leg {
            Leg::A => self.session_a,
            Leg::B => self.session_b,
        }
    }

    fn session(&mut self, leg: Leg) -> &mut Option<Instant> {
        match leg {
            Leg::A => &mut self.session_a,
            Leg::B => &mut self.session_b,
        }
    }
}

/// What the caller's INVITE said about reliable provisionals (RFC 3262).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rel100 {
    /// Neither Supported nor Require named `100rel`.
    No,
    /// `Supported: 100rel`: a provisional goes reliably when the callee's did.
    Supported,
    /// `Require: 100rel`: every provisional but 100 goes reliably.
    Required,
}

/// Where a reliable provisional sent to A came from: fork, To tag, RSeq.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RelSource {
    fork: usize,
    tag: String,
    rseq: u32,
}

/// Reliable provisionals towards A (RFC 3262 §3): one unacknowledged at a
/// time, RSeq growing by one.
#[derive(Debug, Clone, Default)]
struct RelState {
    /// The RSeq of the next one.
    next_rseq: u32,
    /// The one A has not PRACKed yet: its RSeq and the response.
    outstanding: Option<(u32, Message)>,
    /// Retransmission interval of the outstanding one (T1 doubling).
    interval: Duration,
    /// Reliable provisionals waiting for that PRACK.
    queued: VecDeque<(Message, Option<RelSource>)>,
    /// Every RSeq sent to A and where it came from (`None`: the callee's
    /// provisional was unreliable, so the core answers the PRACK itself).
    sent: Vec<(u32, Option<RelSource>)>,
}

/// The RFC 4028 negotiation of a call, from A's INVITE.
#[derive(Debug, Clone, Copy)]
struct SessionPlan {
    /// The interval of A's leg and the one asked of B, seconds.
    interval: u32,
    /// The Min-SE put on requests: the larger of ours and A's.
    min_se: u32,
    /// A asked to refresh itself (`refresher=uac` in its INVITE).
    a_refreshes: bool,
    /// A supports session timers (`Require: timer` goes in its 2xx).
    a_supports: bool,
}

/// What the core knows of one leg beyond the dialog.
#[derive(Debug, Clone, Default)]
struct LegState {
    /// The running session timer.
    timer: Option<SessionTimer>,
    /// The far end's Allow lists UPDATE (refresh without SDP).
    allows_update: bool,
    /// The last body (SDP) the core sent on the leg, with its
    /// Content-Type: the offer of a re-INVITE refresh.
    last_sdp: Option<(String, Bytes)>,
    /// A refresh of the core is in flight on the leg.
    refreshing: bool,
}

impl LegState {
    fn remember_sdp(&mut self, msg: &Message) {
        if !msg.body().is_empty() {
            let ct = msg
                .header(HeaderName::ContentType)
                .unwrap_or("application/sdp");
            self.last_sdp = Some((ct.to_string(), msg.body().clone()));
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
    /// A relayed re-INVITE is in progress (glare guard, with the legs'
    /// `refreshing`).
    invite_relay: bool,
    /// Client transactions of this call (forks, BYEs, relays).
    clients: Vec<TxnKey>,
    /// A's 100rel wish.
    a_100rel: Rel100,
    /// Reliable provisionals towards A.
    rel: RelState,
    /// The callee's early dialog that A's early dialog is paired with: the
    /// fork and To tag of the last provisional relayed to A.
    early_peer: Option<(usize, String)>,
    /// RFC 4028 negotiation.
    session: SessionPlan,
    /// A's leg beyond its dialog.
    a_leg: LegState,
    /// B's leg beyond its dialog.
    b_leg: LegState,
}

impl Call {
    fn a_call_id(&self) -> &str {
        &self.a_dialog.id.call_id
    }

    fn b_target(&self) -> Option<Target> {
        self.winner.map(|w| self.forks[w].target.clone())
    }

    fn leg(&mut self, leg: Leg) -> &mut LegState {
        match leg {
            Leg::A => &mut self.a_leg,
            Leg::B => &mut self.b_leg,
        }
    }

    fn target(&self, leg: Leg) -> Option<Target> {
        match leg {
            Leg::A => Some(Target::Peer { flow: self.a_flow }),
            Leg::B => self.b_target(),
        }
    }

    fn dialog_mut(&mut self, leg: Leg) -> Option<&mut Dialog> {
        match leg {
            Leg::A => Some(&mut self.a_dialog),
            Leg::B => self.b_dialog.as_mut(),
        }
    }

    /// Restarts both legs' session deadlines after a refresh passed
    /// through the call (a relayed re-INVITE or UPDATE that succeeded).
    fn session_refreshed(&mut self, now: Instant) {
        for leg in [Leg::A, Leg::B] {
            if let Some(t) = self.leg(leg).timer {
                *self.timers.session(leg) = Some(session_deadline(now, t));
            }
        }
    }
}

/// Where one B-leg request goes.
#[derive(Debug, Clone)]
struct Dest {
    target: Target,
    ruri: String,
    /// Route set (a binding's Path).
    path: Vec<String>,
    /// The To URI.
    to: String,
}

/// A MESSAGE (RFC 3428) forked to every binding of the callee.
#[derive(Debug, Clone)]
struct Pager {
    key: TxnKey,
    request: Message,
    tag: String,
    /// Per fork: its transaction ended.
    done: Vec<bool>,
    best: Option<Final>,
    answered: bool,
    clients: Vec<TxnKey>,
}

/// When the core acts next on a leg with session timer `t` refreshed at
/// `now`: at half the interval when it refreshes, else shortly before the
/// interval ends (RFC 4028 §10: the smaller of 32 s and a third of it).
fn session_deadline(now: Instant, t: SessionTimer) -> Instant {
    let secs = u64::from(t.interval_secs);
    match t.refresher {
        Refresher::B2bua => now + Duration::from_secs(secs) / 2,
        Refresher::Peer => now + Duration::from_secs(secs - (secs / 3).min(32)),
    }
}

/// True when list header `name` has `token` (case-insensitive).
fn has_token(msg: &Message, name: HeaderName, token: &str) -> bool {
    msg.values(name)
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// A delta-seconds value (RFC 3261 §25.1).
fn delta_seconds(v: &str) -> Option<u32> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// RFC 4028 `Session-Expires`: the interval and the `refresher`
/// parameter (`Some(true)` for `uac`, `Some(false)` for `uas`). `Err` when
/// the header is there but malformed.
fn session_expires(msg: &Message) -> Result<Option<(u32, Option<bool>)>, HeaderName> {
    let Some(v) = msg.header(HeaderName::SessionExpires) else {
        return Ok(None);
    };
    let mut parts = v.split(';');
    let secs = parts
        .next()
        .and_then(delta_seconds)
        .ok_or(HeaderName::SessionExpires)?;
    let mut refresher = None;
    for p in parts {
        if let Some((k, val)) = p.split_once('=')
            && k.trim().eq_ignore_ascii_case("refresher")
        {
            refresher = match val.trim().to_ascii_lowercase().as_str() {
                "uac" => Some(true),
                "uas" => Some(false),
                _ => return Err(HeaderName::SessionExpires),
            };
        }
    }
    Ok(Some((secs, refresher)))
}

/// RFC 4028 `Min-SE`; `Err` when there but malformed.
fn min_se(msg: &Message) -> Result<Option<u32>, HeaderName> {
    match msg.header(HeaderName::MinSe) {
        None => Ok(None),
        Some(v) => v
            .split(';')
            .next()
            .and_then(delta_seconds)
            .map(Some)
            .ok_or(HeaderName::MinSe),
    }
}

/// RFC 3262 `RAck`: response number, CSeq number, method.
fn rack(msg: &Message) -> Option<(u32, u32, Method)> {
    let mut it = msg.header(HeaderName::RAck)?.split_ascii_whitespace();
    let rseq = delta_seconds(it.next()?)?;
    let cseq = delta_seconds(it.next()?)?;
    let method = Method::from_token(it.next()?);
    Some((rseq, cseq, method))
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
    /// MESSAGEs being forked, by their own counter.
    pagers: HashMap<u64, Pager>,
    next_pager: u64,
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
            pagers: HashMap::new(),
            next_pager: 1,
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

    /// MESSAGEs whose forks are still running.
    pub fn message_count(&self) -> usize {
        self.pagers.len()
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
                if msg.to()?.tag().is_some() {
                    return Err(B2buaError::Unexpected);
                }
                match msg.method() {
                    Some(Method::Invite) => self.invite(now, key, flow, msg, state, Some(next_hop)),
                    Some(Method::Message) => {
                        self.message(now, key, msg, state, Some(next_hop));
                        Ok(())
                    }
                    _ => Err(B2buaError::Unexpected),
                }
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
        let is_due = |t: Option<Instant>| t.is_some_and(|t| t <= now.instant);
        for id in due {
            let t1 = self.config.t1;
            let t2 = self.config.t2;
            let Some(call) = self.calls.get_mut(&id) else {
                continue;
            };
            if is_due(call.timers.ack_wait) {
                tracing::debug!(call_id = %call.a_call_id(), "no ACK for the 2xx: BYE both legs");
                self.hang_up(now, id, None, EndReason::AckTimeout);
                continue;
            }
            if is_due(call.timers.prack_wait) {
                // RFC 3262 §3: no PRACK within 64*T1, the INVITE gets a 5xx.
                tracing::debug!(call_id = %call.a_call_id(), "no PRACK: 500 to the caller");
                call.rel.outstanding = None;
                call.timers.retransmit_1xx = None;
                call.timers.prack_wait = None;
                call.best = Some(Final {
                    code: 500,
                    reason: "Provisional Response Not Acknowledged".into(),
                    headers: Vec::new(),
                });
                self.reject(now, id);
                continue;
            }
            if is_due(call.timers.retransmit_2xx) {
                call.interval = (call.interval * 2).min(t2);
                call.timers.retransmit_2xx = Some(now.instant + call.interval);
                if let Some(ok) = call.a_ok.clone() {
                    self.out.push_back(Output::SendResponse {
                        key: call.a_key.clone(),
                        msg: ok,
                    });
                }
            }
            if is_due(call.timers.retransmit_1xx) {
                // RFC 3262 §3: T1, doubling, until the PRACK.
                call.rel.interval = (call.rel.interval * 2).max(t1);
                call.timers.retransmit_1xx = Some(now.instant + call.rel.interval);
                if let Some((_, msg)) = call.rel.outstanding.clone() {
                    self.out.push_back(Output::SendResponse {
                        key: call.a_key.clone(),
                        msg,
                    });
                }
            }
            for leg in [Leg::A, Leg::B] {
                let due = self
                    .calls
                    .get(&id)
                    .is_some_and(|c| is_due(c.timers.session_at(leg)));
                if due {
                    self.session_due(now, id, leg);
                }
            }
            self.rearm(id);
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

    /// Keeps `timed` in step with the call's deadlines.
    fn rearm(&mut self, id: u64) {
        match self.calls.get(&id).and_then(|c| c.timers.earliest()) {
            Some(_) => {
                self.timed.insert(id);
            }
            None => {
                self.timed.remove(&id);
            }
        }
    }

    /// Proposes the call's current record (after its dialogs changed).
    fn put_call(&mut self, now: Now, id: u64) {
        if let Some(rec) = self.record(id) {
            self.propose(
                now,
                Command::PutCall {
                    call: Box::new(rec),
                },
            );
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
        match method {
            Method::Invite => self.invite(now, key, flow, msg, state, None),
            Method::Message => {
                self.message(now, key, msg, state, None);
                Ok(())
            }
            _ => {
                let tag = self.random_hex();
                let r = msg
                    .response(405, "Method Not Allowed", Some(&tag))
                    .with(HeaderName::Allow, ALLOW);
                self.respond(key, r);
                Ok(())
            }
        }
    }

    /// The checks every initial request passes (483, 482, 404, 480) and
    /// where its B legs go: every live binding of the local callee, or the
    /// outbound next hop for a number that is not a local user. Answers a
    /// refused request itself; otherwise returns the To tag for A and the
    /// destinations.
    fn destinations(
        &mut self,
        now: Now,
        key: &TxnKey,
        msg: &Message,
        state: &State,
        outbound: Option<Flow>,
    ) -> Option<(String, Vec<Dest>)> {
        let a_tag = self.random_hex();
        let reject = |code: u16, reason: &str| msg.response(code, reason, Some(&a_tag));
        if msg.max_forwards() == Some(0) {
            let r = reject(483, "Too Many Hops");
            self.respond(key.clone(), r);
            return None;
        }
        if msg.vias().filter_map(Result::ok).any(|v| {
            v.branch()
                .is_some_and(|b| b.starts_with(&self.branch_prefix))
        }) {
            let r = reject(482, "Loop Detected");
            self.respond(key.clone(), r);
            return None;
        }
        let user = msg
            .request_uri()
            .and_then(|u| u.as_sip().and_then(|s| s.user_decoded()))
            .map(|u| String::from_utf8_lossy(&u).into_owned());
        let Some(user) = user else {
            let r = reject(404, "Not Found");
            self.respond(key.clone(), r);
            return None;
        };
        let dests: Vec<Dest> = match outbound {
            Some(hop) => {
                let ruri = format!("sip:{user}@{}", hop.remote);
                vec![Dest {
                    target: Target::Peer { flow: hop },
                    ruri: ruri.clone(),
                    path: Vec::new(),
                    to: ruri,
                }]
            }
            None => {
                let Some(aor) = Aor::parse(&format!("sip:{user}@{}", self.config.realm)) else {
                    let r = reject(404, "Not Found");
                    self.respond(key.clone(), r);
                    return None;
                };
                state
                    .bindings(&aor, now.unix_secs())
                    .into_iter()
                    .map(|b| Dest {
                        target: Target::binding(b),
                        ruri: b.contact.clone(),
                        path: b.path.clone(),
                        to: aor.to_string(),
                    })
                    .collect()
            }
        };
        if dests.is_empty() {
            let r = reject(480, "Temporarily Unavailable");
            self.respond(key.clone(), r);
            return None;
        }
        Some((a_tag, dests))
    }

    /// The first lines of a B-leg request to `dest`: Request-URI, Via,
    /// Max-Forwards, Route (the binding's Path), From, To, Call-ID, CSeq.
    fn new_b_request(
        &mut self,
        method: Method,
        dest: &Dest,
        max_forwards: u8,
        from: &str,
        call_id: &str,
    ) -> Message {
        let mut m = Message::request(method.clone(), &dest.ruri)
            .with(HeaderName::Via, &self.via(&dest.target))
            .with(HeaderName::MaxForwards, &max_forwards.to_string());
        for p in &dest.path {
            m.push(Header::new(HeaderName::Route, p));
        }
        m.with(HeaderName::From, from)
            .with(HeaderName::To, &format!("<{}>", dest.to))
            .with(HeaderName::CallId, call_id)
            .with(HeaderName::CSeq, &format!("1 {method}"))
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
        let Some((a_tag, dests)) = self.destinations(now, &key, &msg, state, outbound) else {
            return Ok(());
        };
        let reject = |code: u16, reason: &str| msg.response(code, reason, Some(&a_tag));
        // RFC 4028 §8.1: the caller's Session-Expires may not be below our
        // Min-SE (422); the interval asked of B is the caller's, capped at
        // ours, and never below either Min-SE.
        let (a_se, a_min) = match (session_expires(&msg), min_se(&msg)) {
            (Ok(se), Ok(min)) => (se, min.unwrap_or(0)),
            _ => {
                let r = reject(400, "Bad Request (Session-Expires or Min-SE)");
                self.respond(key, r);
                return Ok(());
            }
        };
        if let Some((se, _)) = a_se
            && se < self.config.min_se
        {
            let r = reject(422, "Session Interval Too Small")
                .with(HeaderName::MinSe, &self.config.min_se.to_string());
            self.respond(key, r);
            return Ok(());
        }
        let floor = self.config.min_se.max(a_min);
        let session = SessionPlan {
            interval: a_se
                .map_or(self.config.session_expires, |(se, _)| {
                    se.min(self.config.session_expires)
                })
                .max(floor),
            min_se: floor,
            a_refreshes: a_se.is_some_and(|(_, r)| r == Some(true)),
            a_supports: has_token(&msg, HeaderName::Supported, "timer")
                || has_token(&msg, HeaderName::Require, "timer"),
        };
        let a_100rel = if has_token(&msg, HeaderName::Require, "100rel") {
            Rel100::Required
        } else if has_token(&msg, HeaderName::Supported, "100rel") {
            Rel100::Supported
        } else {
            Rel100::No
        };
        let callee = dests[0].to.clone();
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
        let supported = match a_100rel {
            Rel100::No => "timer",
            _ => "100rel, timer",
        };

        let mut forks = Vec::with_capacity(dests.len());
        let mut sends = Vec::with_capacity(dests.len());
        for dest in dests {
            let mut inv = self
                .new_b_request(
                    Method::Invite,
                    &dest,
                    max_forwards,
                    &format!("{from};tag={b_tag}"),
                    &b_call_id,
                )
                .with(HeaderName::Contact, &self.contact())
                .with(HeaderName::Allow, ALLOW)
                .with(HeaderName::Supported, supported);
            if a_100rel == Rel100::Required {
                inv.push(Header::new(HeaderName::Require, "100rel"));
            }
            inv.push(Header::new(
                HeaderName::SessionExpires,
                &format!("{};refresher=uac", session.interval),
            ));
            inv.push(Header::new(HeaderName::MinSe, &session.min_se.to_string()));
            Self::copy_body(&msg, &mut inv);
            let Ok(fkey) = TxnKey::client(&inv) else {
                continue;
            };
            forks.push(Fork {
                key: fkey.clone(),
                invite: inv.clone(),
                target: dest.target.clone(),
                done: false,
                provisional: false,
                cancel_wanted: false,
                cancel_sent: false,
                acks: Vec::new(),
                early: Vec::new(),
                reliable_seen: Vec::new(),
                session_expires: session.interval,
            });
            sends.push((dest.target, inv));
        }
        self.dialogs
            .insert((a_dialog.id.call_id.clone(), a_tag.clone()), (id, Leg::A));
        self.dialogs
            .insert((b_call_id.clone(), b_tag.clone()), (id, Leg::B));
        self.servers.insert(key.clone(), id);
        let first_rseq = {
            let r = (self.rng)();
            (u32::from_be_bytes([r[0], r[1], r[2], r[3]]) & 0x3fff_ffff) + 1
        };
        let a_leg = LegState {
            allows_update: has_token(&msg, HeaderName::Allow, "UPDATE"),
            ..LegState::default()
        };
        let mut b_leg = LegState::default();
        b_leg.remember_sdp(&msg);
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
                a_100rel,
                rel: RelState {
                    next_rseq: first_rseq,
                    ..RelState::default()
                },
                early_peer: None,
                session,
                a_leg,
                b_leg,
            },
        );
        for (i, (target, inv)) in sends.into_iter().enumerate() {
            self.send_request(id, target, inv, Client::Fork(i));
        }
        Ok(())
    }

    /// An out-of-dialog MESSAGE (RFC 3428): forked in parallel like an
    /// INVITE, without a call or CDR.
    fn message(
        &mut self,
        now: Now,
        key: TxnKey,
        msg: Message,
        state: &State,
        outbound: Option<Flow>,
    ) {
        let Some((tag, dests)) = self.destinations(now, &key, &msg, state, outbound) else {
            return;
        };
        let Some(from) = msg.header(HeaderName::From).and_then(addr_without_params) else {
            let r = msg.response(400, "Bad Request", Some(&tag));
            self.respond(key, r);
            return;
        };
        let max_forwards = msg.max_forwards().map_or(70, |n| n.saturating_sub(1));
        let call_id = format!("{}-{}", self.random_hex(), token_safe(&self.config.node_id));
        let from_tag = self.random_hex();
        let id = self.next_pager;
        self.next_pager += 1;
        let mut pager = Pager {
            key,
            request: msg.clone(),
            tag,
            done: Vec::new(),
            best: None,
            answered: false,
            clients: Vec::new(),
        };
        for dest in &dests {
            let mut m = self.new_b_request(
                Method::Message,
                dest,
                max_forwards,
                &format!("{from};tag={from_tag}"),
                &call_id,
            );
            Self::copy_body(&msg, &mut m);
            let Ok(fkey) = TxnKey::client(&m) else {
                continue;
            };
            self.clients
                .insert(fkey.clone(), (id, Client::Pager(pager.done.len())));
            pager.clients.push(fkey);
            pager.done.push(false);
            self.out.push_back(Output::SendRequest {
                target: dest.target.clone(),
                msg: m,
            });
        }
        self.pagers.insert(id, pager);
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
        let no_dialog = |msg: &Message| msg.response(481, "Call/Transaction Does Not Exist", None);
        let found = self.dialogs.get(&(call_id, to_tag)).copied();
        let Some((id, leg)) = found else {
            self.respond(key, no_dialog(&msg));
            return Ok(());
        };
        let Some(call) = self.calls.get_mut(&id) else {
            self.respond(key, no_dialog(&msg));
            return Ok(());
        };
        if call.phase == Phase::Proceeding && matches!(method, Method::Prack | Method::Update) {
            return self.early_request(now, id, leg, key, method, msg, &from_tag, seq);
        }
        let dialog = call.dialog_mut(leg);
        let Some(dialog) = dialog.filter(|d| d.id.remote_tag == from_tag) else {
            self.respond(key, no_dialog(&msg));
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
            self.respond(key, no_dialog(&msg));
            return Ok(());
        }
        if method == Method::Prack {
            // After the answer a PRACK only acknowledges a provisional that
            // no longer matters (RFC 3262 §3 lets the 2xx overtake it): 200
            // when the core sent that RSeq to A, else 481. The callee never
            // gets reliable provisionals from the core, so never PRACKs.
            let known = leg == Leg::A
                && rack(&msg).is_some_and(|(r, _, _)| call.rel.sent.iter().any(|(s, _)| *s == r));
            let r = if known {
                msg.response(200, "OK", None)
            } else {
                no_dialog(&msg)
            };
            self.respond(key, r);
            return Ok(());
        }
        self.relay(now, id, key, leg, method, msg);
        Ok(())
    }

    /// PRACK and UPDATE before the answer (RFC 3262, RFC 3311 §5.1): A's
    /// go to the callee's early dialog they belong to, the callee's UPDATE
    /// goes to A's early dialog.
    #[allow(clippy::too_many_arguments)]
    fn early_request(
        &mut self,
        now: Now,
        id: u64,
        leg: Leg,
        key: TxnKey,
        method: Method,
        msg: Message,
        from_tag: &str,
        seq: u32,
    ) -> Result<(), B2buaError> {
        let no_dialog = |msg: &Message| msg.response(481, "Call/Transaction Does Not Exist", None);
        let Some(call) = self.calls.get_mut(&id) else {
            self.respond(key, no_dialog(&msg));
            return Ok(());
        };
        match leg {
            Leg::A => {
                if call.a_dialog.id.remote_tag != from_tag {
                    self.respond(key, no_dialog(&msg));
                    return Ok(());
                }
                if !call.a_dialog.accept_remote_seq(seq) {
                    self.respond(key, msg.response(500, "Server Internal Error", None));
                    return Ok(());
                }
                if method == Method::Prack {
                    self.prack_from_a(now, id, key, msg);
                    return Ok(());
                }
                call.a_dialog.refresh_target(&msg);
                let peer = call
                    .early_peer
                    .clone()
                    .filter(|(f, _)| call.forks.get(*f).is_some_and(|f| !f.done));
                let Some((fork, tag)) = peer else {
                    // No callee early dialog to take the UPDATE to yet: try
                    // again later (RFC 3311 §5.2 uses 500 + Retry-After).
                    let r = msg
                        .response(500, "Server Internal Error", None)
                        .with(HeaderName::RetryAfter, "1");
                    self.respond(key, r);
                    return Ok(());
                };
                self.relay_early(id, key, Leg::A, method, msg, fork, tag);
            }
            Leg::B => {
                let found = call
                    .forks
                    .iter_mut()
                    .enumerate()
                    .find_map(|(i, f)| f.early_mut(from_tag).map(|d| (i, d)));
                let Some((fork, d)) = found.filter(|_| method == Method::Update) else {
                    self.respond(key, no_dialog(&msg));
                    return Ok(());
                };
                if !d.accept_remote_seq(seq) {
                    self.respond(key, msg.response(500, "Server Internal Error", None));
                    return Ok(());
                }
                d.refresh_target(&msg);
                self.relay_early(id, key, Leg::B, method, msg, fork, from_tag.to_string());
            }
        }
        Ok(())
    }

    /// A's PRACK before the answer: it must acknowledge the outstanding
    /// reliable provisional (else 481, RFC 3262 §3); it goes on to the fork
    /// that sent that provisional with the fork's own RSeq in RAck, or is
    /// answered here when the callee's provisional was not reliable. The
    /// next queued reliable provisional follows.
    fn prack_from_a(&mut self, now: Now, id: u64, key: TxnKey, msg: Message) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let invite_seq = call.a_invite.cseq().map_or(0, |c| c.seq);
        let outstanding = call.rel.outstanding.as_ref().map(|(r, _)| *r);
        let acked = match rack(&msg) {
            Some((r, c, Method::Invite)) if c == invite_seq && Some(r) == outstanding => r,
            _ => {
                let r = msg.response(481, "Call/Transaction Does Not Exist", None);
                self.respond(key, r);
                return;
            }
        };
        call.rel.outstanding = None;
        call.timers.retransmit_1xx = None;
        call.timers.prack_wait = None;
        let source = call
            .rel
            .sent
            .iter()
            .find(|(r, _)| *r == acked)
            .and_then(|(_, s)| s.clone());
        let next = call.rel.queued.pop_front();
        match source {
            None => self.respond(key, msg.response(200, "OK", None)),
            Some(src) => {
                let live = call
                    .forks
                    .get_mut(src.fork)
                    .filter(|f| !f.done)
                    .and_then(|f| f.early_mut(&src.tag))
                    .is_some();
                if live {
                    self.relay_early(id, key, Leg::A, Method::Prack, msg, src.fork, src.tag);
                } else {
                    let r = msg.response(481, "Call/Transaction Does Not Exist", None);
                    self.respond(key, r);
                }
            }
        }
        if let Some((m, s)) = next {
            self.send_reliable(now, id, m, s);
        }
        self.rearm(id);
    }

    /// Relays an early-dialog request between A's early dialog and the
    /// callee's early dialog (`fork`, `tag`). A PRACK gets the fork's RAck.
    #[allow(clippy::too_many_arguments)]
    fn relay_early(
        &mut self,
        id: u64,
        key: TxnKey,
        from: Leg,
        method: Method,
        msg: Message,
        fork: usize,
        tag: String,
    ) {
        let contact = self.contact();
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let target = match from {
            Leg::A => call.forks.get(fork).map(|f| f.target.clone()),
            Leg::B => Some(Target::Peer { flow: call.a_flow }),
        };
        let Some(target) = target else {
            return;
        };
        let via = self.via(&target);
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let mut out = match from {
            Leg::A => {
                let Some(f) = call.forks.get_mut(fork) else {
                    return;
                };
                let invite_seq = f.invite.cseq().map_or(1, |c| c.seq);
                let rseq = call
                    .rel
                    .sent
                    .iter()
                    .filter_map(|(_, s)| s.as_ref())
                    .filter(|s| s.fork == fork && s.tag == tag)
                    .map(|s| s.rseq)
                    .next_back();
                let Some(d) = f.early_mut(&tag) else {
                    return;
                };
                let mut m = d.request(method.clone(), &via);
                if method == Method::Prack
                    && let Some(rseq) = rseq
                {
                    m.push(Header::new(
                        HeaderName::RAck,
                        &format!("{rseq} {invite_seq} INVITE"),
                    ));
                }
                m
            }
            Leg::B => call.a_dialog.request(method.clone(), &via),
        };
        if method == Method::Update {
            out.push(Header::new(HeaderName::Contact, &contact));
        }
        Self::copy_body(&msg, &mut out);
        match from {
            Leg::A => call.b_leg.remember_sdp(&out),
            Leg::B => call.a_leg.remember_sdp(&out),
        }
        let relay = Relay {
            server_key: key,
            request: msg,
            from,
            sent: out.clone(),
            early: Some((fork, tag)),
        };
        self.send_request(id, target, out, Client::Relay(Box::new(relay)));
    }

    /// Relays an in-dialog request from `from` on the other leg.
    fn relay(&mut self, _now: Now, id: u64, key: TxnKey, from: Leg, method: Method, msg: Message) {
        let contact = self.contact();
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if method == Method::Invite {
            if call.invite_relay || call.a_leg.refreshing || call.b_leg.refreshing {
                let r = msg
                    .response(491, "Request Pending", None)
                    .with(HeaderName::RetryAfter, "1");
                self.respond(key, r);
                return;
            }
            call.invite_relay = true;
        }
        let refresh = matches!(method, Method::Invite | Method::Update);
        if refresh && let Some(d) = call.dialog_mut(from) {
            d.refresh_target(&msg);
        }
        let other = match from {
            Leg::A => Leg::B,
            Leg::B => Leg::A,
        };
        let Some(target) = call.target(other) else {
            return;
        };
        let via = self.via(&target);
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let timer = call.leg(other).timer;
        let Some(dialog) = call.dialog_mut(other) else {
            return;
        };
        let mut out = dialog.request(method, &via);
        if refresh {
            out.push(Header::new(HeaderName::Contact, &contact));
            // The relayed request refreshes the other leg's session too,
            // with the refresher that leg agreed on (we are its UAC now).
            if let Some(t) = timer {
                let who = match t.refresher {
                    Refresher::B2bua => "uac",
                    Refresher::Peer => "uas",
                };
                out.push(Header::new(HeaderName::Supported, "timer"));
                out.push(Header::new(
                    HeaderName::SessionExpires,
                    &format!("{};refresher={who}", t.interval_secs),
                ));
            }
        }
        Self::copy_body(&msg, &mut out);
        call.leg(other).remember_sdp(&out);
        let relay = Relay {
            server_key: key,
            request: msg,
            from,
            sent: out.clone(),
            early: None,
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
        call.timers.retransmit_2xx = None;
        call.timers.ack_wait = None;
        call.a_ok = None;
        self.rearm(id);
        self.put_call(now, id);
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
        if code >= 200 && !matches!(role, Client::Fork(_)) {
            self.clients.remove(&key);
        }
        match role {
            Client::Fork(i) => self.fork_response(now, id, i, code, msg),
            Client::Bye | Client::Own => Ok(()),
            Client::Relay(relay) => {
                self.relay_response(now, id, *relay, code, msg);
                Ok(())
            }
            Client::Refresh(leg, sent) => {
                if code >= 200 {
                    self.refresh_response(now, id, leg, *sent, code, &msg);
                }
                Ok(())
            }
            Client::Pager(i) => {
                if code >= 200 {
                    let fin = Final {
                        code,
                        reason: msg.reason().unwrap_or_default().to_string(),
                        headers: Vec::new(),
                    };
                    self.pager_final(id, i, fin, Some(&msg));
                }
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
                if code > 100 {
                    self.fork_provisional(now, id, i, code, &msg);
                }
                Ok(())
            }
            200..=299 => self.fork_2xx(now, id, i, msg),
            422 if self.retry_422(id, i, &msg) => Ok(()),
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
                                || (matches!(code, 420 | 421)
                                    && matches!(
                                        h.name(),
                                        HeaderName::Unsupported | HeaderName::Require
                                    ))
                        })
                        .cloned()
                        .collect(),
                };
                self.fork_failed(now, id, i, fin);
                Ok(())
            }
        }
    }

    /// RFC 4028 §7.4 / §8.2: a 422 from a fork is retried on the same fork
    /// (same Call-ID, next CSeq) with its Min-SE as the interval, when that
    /// is larger than what was asked. Returns false when it is not retried.
    fn retry_422(&mut self, id: u64, i: usize, msg: &Message) -> bool {
        let Some(call) = self.calls.get(&id) else {
            return false;
        };
        let Some(fork) = call.forks.get(i) else {
            return false;
        };
        let wanted = match min_se(msg) {
            Ok(Some(n)) if n > fork.session_expires => n,
            _ => return false,
        };
        if call.phase != Phase::Proceeding || fork.done || fork.cancel_wanted || fork.cancel_sent {
            return false;
        }
        let target = fork.target.clone();
        let mut inv = fork.invite.clone();
        let seq = inv.cseq().map_or(1, |c| c.seq).wrapping_add(1);
        let via = self.via(&target);
        inv.set(HeaderName::Via, &via);
        inv.set(HeaderName::CSeq, &format!("{seq} INVITE"));
        inv.set(
            HeaderName::SessionExpires,
            &format!("{wanted};refresher=uac"),
        );
        inv.set(HeaderName::MinSe, &wanted.to_string());
        let Ok(key) = TxnKey::client(&inv) else {
            return false;
        };
        let Some(call) = self.calls.get_mut(&id) else {
            return false;
        };
        let fork = &mut call.forks[i];
        self.clients.remove(&fork.key);
        fork.key = key;
        fork.invite = inv.clone();
        fork.provisional = false;
        fork.session_expires = wanted;
        tracing::debug!(call_id = %call.a_call_id(), fork = i, wanted, "422 from a fork: retried");
        self.send_request(id, target, inv, Client::Fork(i));
        true
    }

    /// A provisional (not 100) from fork `i`: relayed to A while the call
    /// rings, reliably when A asked for it (RFC 3262), with the fork's
    /// early dialog remembered for PRACK and UPDATE.
    fn fork_provisional(&mut self, now: Now, id: u64, i: usize, code: u16, msg: &Message) {
        let contact = self.contact();
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if call.phase != Phase::Proceeding {
            return;
        }
        let Some(fork) = call.forks.get_mut(i) else {
            return;
        };
        let tag = msg.to().ok().and_then(|t| t.tag()).map(str::to_string);
        if let Some(tag) = &tag {
            match fork.early_mut(tag) {
                Some(d) => d.refresh_target(msg),
                None => {
                    if let Ok(d) = Dialog::uac(&fork.invite, msg) {
                        fork.early.push(d);
                    }
                }
            }
        }
        let rseq = msg
            .header(HeaderName::RSeq)
            .and_then(delta_seconds)
            .filter(|_| has_token(msg, HeaderName::Require, "100rel"));
        let source = match (rseq, &tag) {
            (Some(rseq), Some(tag)) if fork.early_mut(tag).is_some() => Some(RelSource {
                fork: i,
                tag: tag.clone(),
                rseq,
            }),
            _ => None,
        };
        if let Some(s) = &source {
            let seen = (s.tag.clone(), s.rseq);
            if fork.reliable_seen.contains(&seen) {
                // A retransmission: the core retransmits towards A itself.
                return;
            }
            fork.reliable_seen.push(seen);
        }
        if let Some(tag) = tag.filter(|t| fork.early.iter().any(|d| d.id.remote_tag == *t)) {
            call.early_peer = Some((i, tag));
        }
        let mut r = call.a_invite.dialog_response(
            code,
            msg.reason().unwrap_or_default(),
            Some(&call.a_dialog.id.local_tag),
        );
        r.push(Header::new(HeaderName::Contact, &contact));
        Self::copy_body(msg, &mut r);
        let reliable = match call.a_100rel {
            Rel100::No => false,
            Rel100::Supported => source.is_some(),
            Rel100::Required => true,
        };
        let a_key = call.a_key.clone();
        let a_100rel = call.a_100rel;
        if a_100rel == Rel100::No
            && let Some(src) = &source
        {
            // The callee made it reliable though not asked to: the core
            // acknowledges it itself and relays it unreliably.
            self.own_prack(id, src);
        }
        if !reliable {
            self.respond(a_key, r);
            return;
        }
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if call.rel.outstanding.is_some() {
            call.rel.queued.push_back((r, source));
        } else {
            self.send_reliable(now, id, r, source);
            self.rearm(id);
        }
    }

    /// Sends reliable provisional `r` to A: next RSeq, `Require: 100rel`,
    /// retransmitted from T1 doubling until A's PRACK (RFC 3262 §3).
    fn send_reliable(&mut self, now: Now, id: u64, mut r: Message, source: Option<RelSource>) {
        let t1 = self.config.t1;
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let rseq = call.rel.next_rseq;
        call.rel.next_rseq = rseq.wrapping_add(1);
        r.push(Header::new(HeaderName::Require, "100rel"));
        r.push(Header::new(HeaderName::RSeq, &rseq.to_string()));
        call.rel.sent.push((rseq, source));
        call.rel.outstanding = Some((rseq, r.clone()));
        call.rel.interval = t1;
        call.timers.retransmit_1xx = Some(now.instant + t1);
        call.timers.prack_wait = Some(now.instant + t1 * 64);
        let key = call.a_key.clone();
        self.respond(key, r);
    }

    /// The core's own PRACK for reliable provisional `src` (absorbed).
    fn own_prack(&mut self, id: u64, src: &RelSource) {
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        let Some(target) = call.forks.get(src.fork).map(|f| f.target.clone()) else {
            return;
        };
        let via = self.via(&target);
        let Some(fork) = self
            .calls
            .get_mut(&id)
            .and_then(|c| c.forks.get_mut(src.fork))
        else {
            return;
        };
        let invite_seq = fork.invite.cseq().map_or(1, |c| c.seq);
        let Some(d) = fork.early_mut(&src.tag) else {
            return;
        };
        let prack = d.request(Method::Prack, &via).with(
            HeaderName::RAck,
            &format!("{} {invite_seq} INVITE", src.rseq),
        );
        self.send_request(id, target, prack, Client::Own);
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
        // The early dialog becomes the confirmed one: CSeq numbers used in it
        // (PRACK, UPDATE) carry on (RFC 3261 §12.1).
        if let Some(early) = fork.early.iter().find(|d| d.id.remote_tag == remote_tag) {
            dialog.local_seq = dialog.local_seq.max(early.local_seq);
            dialog.remote_seq = early.remote_seq;
        }
        let target = fork.target.clone();
        let invite_seq = fork.invite.cseq()?.seq;
        let fork_se = fork.session_expires;
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
        // Reliable provisionals still unacknowledged are overtaken by the
        // answer (RFC 3262 §3).
        call.rel.outstanding = None;
        call.rel.queued.clear();
        call.timers.retransmit_1xx = None;
        call.timers.prack_wait = None;
        // RFC 4028: B's 2xx names the refresher of B's leg (we asked to be
        // it); without Session-Expires B does not do timers and the core
        // refreshes alone (§7.2). A's leg is refreshed by the core unless A
        // asked to refresh itself.
        let b_timer = match session_expires(&msg) {
            // A UAS may shorten the interval it was offered, never lengthen
            // it (RFC 4028 §9): a longer one is held to the offer.
            Ok(Some((secs, who))) => SessionTimer {
                interval_secs: secs.clamp(1, fork_se.max(1)),
                refresher: if who == Some(false) {
                    Refresher::Peer
                } else {
                    Refresher::B2bua
                },
            },
            _ => SessionTimer {
                interval_secs: fork_se,
                refresher: Refresher::B2bua,
            },
        };
        let a_timer = SessionTimer {
            interval_secs: call.session.interval,
            refresher: if call.session.a_refreshes {
                Refresher::Peer
            } else {
                Refresher::B2bua
            },
        };
        call.b_leg.timer = Some(b_timer);
        call.b_leg.allows_update = has_token(&msg, HeaderName::Allow, "UPDATE");
        call.a_leg.timer = Some(a_timer);
        call.timers.session_a = Some(session_deadline(now.instant, a_timer));
        call.timers.session_b = Some(session_deadline(now.instant, b_timer));
        let mut ok = call.a_invite.dialog_response(
            msg.status().unwrap_or(200),
            msg.reason().unwrap_or("OK"),
            Some(&call.a_dialog.id.local_tag),
        );
        ok.push(Header::new(HeaderName::Contact, &contact));
        ok.push(Header::new(HeaderName::Allow, ALLOW));
        let who = if call.session.a_refreshes {
            "uac"
        } else {
            "uas"
        };
        if call.session.a_supports {
            ok.push(Header::new(HeaderName::Require, "timer"));
        }
        ok.push(Header::new(
            HeaderName::SessionExpires,
            &format!("{};refresher={who}", a_timer.interval_secs),
        ));
        Self::copy_body(&msg, &mut ok);
        call.a_leg.remember_sdp(&ok);
        call.a_ok = Some(ok.clone());
        call.interval = t1;
        call.timers.retransmit_2xx = Some(now.instant + t1);
        call.timers.ack_wait = Some(now.instant + t1 * 64);
        let key = call.a_key.clone();
        self.rearm(id);
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
            // The originator's leg is refreshed by this transaction too:
            // its 2xx names that leg's refresher (we are its UAS now).
            if let Some(t) = call.leg(relay.from).timer {
                let who = match t.refresher {
                    Refresher::B2bua => "uas",
                    Refresher::Peer => "uac",
                };
                if has_token(&relay.request, HeaderName::Supported, "timer") {
                    r.push(Header::new(HeaderName::Require, "timer"));
                }
                r.push(Header::new(
                    HeaderName::SessionExpires,
                    &format!("{};refresher={who}", t.interval_secs),
                ));
            }
        }
        Self::copy_body(&msg, &mut r);
        call.leg(relay.from).remember_sdp(&r);
        let mut ack = None;
        if code >= 200 && method == Method::Invite {
            call.invite_relay = false;
        }
        if ok && refresh {
            let other = match (relay.from, &relay.early) {
                (Leg::A, Some((f, tag))) => call.forks.get_mut(*f).and_then(|f| f.early_mut(tag)),
                (Leg::A, None) => call.b_dialog.as_mut(),
                (Leg::B, _) => Some(&mut call.a_dialog),
            };
            if let Some(d) = other {
                d.refresh_target(&msg);
                if method == Method::Invite {
                    ack = Some((d.clone(), relay.sent.cseq().map_or(0, |c| c.seq)));
                }
            }
            if relay.early.is_none() {
                call.session_refreshed(now.instant);
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
        if ok && refresh && relay.early.is_none() {
            self.rearm(id);
        }
        if ok && refresh && confirmed {
            self.put_call(now, id);
        }
    }

    /// A fork of a MESSAGE ended with `fin` (`msg`: the response, `None`
    /// for a timeout). The first 2xx is relayed at once; otherwise the best
    /// final response once every fork is done, a 6xx at once.
    fn pager_final(&mut self, id: u64, i: usize, fin: Final, msg: Option<&Message>) {
        let Some(p) = self.pagers.get_mut(&id) else {
            return;
        };
        let Some(done) = p.done.get_mut(i) else {
            return;
        };
        if *done {
            return;
        }
        *done = true;
        let mut answer = None;
        if !p.answered {
            if (200..300).contains(&fin.code) || fin.code >= 600 {
                answer = Some((fin, msg));
            } else {
                if p.best
                    .as_ref()
                    .is_none_or(|b| rank(fin.code) < rank(b.code))
                {
                    p.best = Some(fin);
                }
                if p.done.iter().all(|d| *d) {
                    let best = p.best.take().unwrap_or(Final {
                        code: 408,
                        reason: "Request Timeout".into(),
                        headers: Vec::new(),
                    });
                    answer = Some((best, None));
                }
            }
        }
        if let Some((fin, msg)) = answer {
            p.answered = true;
            let (code, reason) = match fin.code {
                503 => (500, "Server Internal Error"),
                c => (c, fin.reason.as_str()),
            };
            let mut r = p.request.response(code, reason, Some(&p.tag));
            if let Some(m) = msg {
                for h in m.headers().iter().filter(|h| {
                    matches!(
                        h.name(),
                        HeaderName::RetryAfter | HeaderName::Warning | HeaderName::Expires
                    )
                }) {
                    r.push(h.clone());
                }
                Self::copy_body(m, &mut r);
            }
            let key = p.key.clone();
            self.respond(key, r);
        }
        let Some(p) = self.pagers.get(&id) else {
            return;
        };
        if p.done.iter().all(|d| *d)
            && let Some(p) = self.pagers.remove(&id)
        {
            for key in p.clients {
                self.clients.remove(&key);
            }
        }
    }

    // ---- session timers (RFC 4028) ----

    /// The session deadline of `leg` passed: refresh it, or end the call
    /// when the far end was to refresh it and did not.
    fn session_due(&mut self, now: Now, id: u64, leg: Leg) {
        let t2 = self.config.t2;
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        *call.timers.session(leg) = None;
        if !matches!(call.phase, Phase::Answered | Phase::Confirmed) {
            return;
        }
        let Some(timer) = call.leg(leg).timer else {
            return;
        };
        match timer.refresher {
            Refresher::Peer => {
                tracing::debug!(call_id = %call.a_call_id(), ?leg, "session not refreshed: BYE both legs");
                self.hang_up(now, id, None, EndReason::SessionExpired);
            }
            Refresher::B2bua => {
                let update = call.leg(leg).allows_update;
                if call.leg(leg).refreshing || call.invite_relay {
                    // A re-INVITE is under way: it refreshes, or we retry.
                    *call.timers.session(leg) = Some(now.instant + t2);
                    return;
                }
                self.send_refresh(id, leg, update);
            }
        }
    }

    /// Sends a session refresh on `leg` (RFC 4028 §7.4, §9): UPDATE without
    /// a body, or a re-INVITE offering the last SDP sent on the leg.
    fn send_refresh(&mut self, id: u64, leg: Leg, update: bool) {
        let contact = self.contact();
        let Some(target) = self.calls.get(&id).and_then(|c| c.target(leg)) else {
            return;
        };
        let via = self.via(&target);
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let Some(timer) = call.leg(leg).timer else {
            return;
        };
        let min_se = call.session.min_se;
        let sdp = call.leg(leg).last_sdp.clone();
        let Some(dialog) = call.dialog_mut(leg) else {
            return;
        };
        let method = if update {
            Method::Update
        } else {
            Method::Invite
        };
        let mut req = dialog
            .request(method, &via)
            .with(HeaderName::Contact, &contact)
            .with(HeaderName::Supported, "timer")
            .with(
                HeaderName::SessionExpires,
                &format!("{};refresher=uac", timer.interval_secs),
            )
            .with(HeaderName::MinSe, &min_se.to_string());
        if !update && let Some((ct, body)) = sdp {
            req.set_body(Some(&ct), body);
        }
        call.leg(leg).refreshing = true;
        tracing::debug!(call_id = %call.a_call_id(), ?leg, update, "session refresh");
        self.send_request(id, target, req.clone(), Client::Refresh(leg, Box::new(req)));
    }

    /// The final response to a session refresh of the core.
    fn refresh_response(
        &mut self,
        now: Now,
        id: u64,
        leg: Leg,
        sent: Message,
        code: u16,
        msg: &Message,
    ) {
        let t2 = self.config.t2;
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if matches!(call.phase, Phase::Ended) {
            return;
        }
        let invite = sent.is_method(&Method::Invite);
        call.leg(leg).refreshing = false;
        let Some(mut timer) = call.leg(leg).timer else {
            return;
        };
        match code {
            200..=299 => {
                let mut ack = None;
                if let Some(d) = call.dialog_mut(leg) {
                    d.refresh_target(msg);
                    if invite {
                        ack = Some((d.clone(), sent.cseq().map_or(0, |c| c.seq)));
                    }
                }
                if let Ok(Some((secs, who))) = session_expires(msg) {
                    timer.interval_secs = secs.clamp(1, timer.interval_secs.max(1));
                    timer.refresher = if who == Some(false) {
                        Refresher::Peer
                    } else {
                        Refresher::B2bua
                    };
                }
                call.leg(leg).timer = Some(timer);
                *call.timers.session(leg) = Some(session_deadline(now.instant, timer));
                let confirmed = call.phase == Phase::Confirmed;
                if let (Some((d, seq)), Some(target)) = (ack, call.target(leg)) {
                    let via = self.via(&target);
                    self.out.push_back(Output::SendAck {
                        target,
                        msg: d.ack(seq, &via),
                    });
                }
                self.rearm(id);
                if confirmed {
                    // Another node continuing the call needs the new CSeq.
                    self.put_call(now, id);
                }
            }
            408 | 481 => {
                tracing::debug!(call_id = %call.a_call_id(), ?leg, code, "session refresh failed: BYE both legs");
                self.hang_up(now, id, None, EndReason::RefreshFailed { code });
            }
            422 => match min_se(msg) {
                Ok(Some(n)) if n > timer.interval_secs => {
                    timer.interval_secs = n;
                    call.leg(leg).timer = Some(timer);
                    call.session.min_se = call.session.min_se.max(n);
                    self.send_refresh(id, leg, !invite);
                }
                _ => self.retry_refresh_later(now, id, leg, timer),
            },
            405 | 501 if !invite => {
                call.leg(leg).allows_update = false;
                self.send_refresh(id, leg, false);
            }
            491 => {
                *call.timers.session(leg) = Some(now.instant + t2);
                self.rearm(id);
            }
            _ => self.retry_refresh_later(now, id, leg, timer),
        }
    }

    /// A refresh failed in a way that does not end the session: try again
    /// after a quarter of the interval.
    fn retry_refresh_later(&mut self, now: Now, id: u64, leg: Leg, timer: SessionTimer) {
        if let Some(call) = self.calls.get_mut(&id) {
            let quarter = Duration::from_secs(u64::from(timer.interval_secs)) / 4;
            *call.timers.session(leg) = Some(now.instant + quarter);
        }
        self.rearm(id);
    }

    // ---- timeouts ----

    fn timeout(&mut self, now: Now, key: TxnKey) -> Result<(), B2buaError> {
        let (id, role) = self
            .clients
            .remove(&key)
            .ok_or_else(|| B2buaError::UnknownTransaction(key.clone()))?;
        let timed_out = || Final {
            code: 408,
            reason: "Request Timeout".into(),
            headers: Vec::new(),
        };
        match role {
            Client::Fork(i) => self.fork_failed(now, id, i, timed_out()),
            Client::Bye | Client::Own => {}
            Client::Relay(relay) => {
                if let Some(call) = self.calls.get_mut(&id)
                    && relay.request.is_method(&Method::Invite)
                {
                    call.invite_relay = false;
                }
                let r = relay.request.response(408, "Request Timeout", None);
                self.respond(relay.server_key, r);
            }
            Client::Refresh(_, _) => {
                if self
                    .calls
                    .get(&id)
                    .is_some_and(|c| matches!(c.phase, Phase::Answered | Phase::Confirmed))
                {
                    tracing::debug!("session refresh unanswered: BYE both legs");
                    self.hang_up(now, id, None, EndReason::RefreshFailed { code: 408 });
                }
            }
            Client::Pager(i) => self.pager_final(id, i, timed_out(), None),
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
                call.a_leg.timer,
            ),
            b: leg_record(b, target.received(), target.path(), call.b_leg.timer),
            start_unix_ms: call.start_ms,
            answer_unix_ms: call.answer_ms.unwrap_or(call.start_ms),
        })
    }
}

/// The replicable form of one leg's dialog and session timer.
pub fn leg_record(
    d: &Dialog,
    received: Option<String>,
    path: Vec<String>,
    session_timer: Option<SessionTimer>,
) -> LegRecord {
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
        session_timer,
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

        /// The far end answers `req` (a request the core sent) with
        /// `code`, no To tag added.
        fn reply(&mut self, ms: u64, req: &Message, code: u16, reason: &str) -> Vec<Output> {
            self.input(
                ms,
                Input::Response {
                    key: TxnKey::client(req).unwrap(),
                    msg: wire(&req.response(code, reason, None)),
                },
            )
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

    /// The end reason when the outputs are exactly one EndCall proposal.
    fn ended(out: &[Output]) -> Option<EndReason> {
        match proposals(out)[..] {
            [Command::EndCall { cdr, .. }] => Some(cdr.reason),
            _ => None,
        }
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
    fn responses_that_make_the_callers_dialog_echo_its_record_route() {
        // RFC 3261 §12.1.1: the balancer's Record-Route must come back in
        // the 18x and the 2xx, or the caller's BYE would bypass it.
        let mut t = T::new(two_bindings());
        let forks = t.start();
        let ringing = answer(&forks[0].2, 180, "b1", "sip:1001@192.0.2.20");
        let out = t.respond_fork(10, &forks[0], ringing);
        let r180 = responses(&out)[0];
        assert_eq!(r180.status(), Some(180));
        let rr: Vec<&str> = r180.values(HeaderName::RecordRoute).collect();
        assert_eq!(rr, vec!["<sip:lb.example;lr>"]);
        let ok = answer(&forks[0].2, 200, "b1", "sip:1001@192.0.2.20");
        let out = t.respond_fork(20, &forks[0], ok);
        let r200 = responses(&out)
            .into_iter()
            .find(|r| r.status() == Some(200))
            .unwrap();
        let rr: Vec<&str> = r200.values(HeaderName::RecordRoute).collect();
        assert_eq!(rr, vec!["<sip:lb.example;lr>"]);
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
        // RFC 4028: the core refreshes both legs, 1800 s by default.
        let st = Some(SessionTimer {
            interval_secs: 1800,
            refresher: Refresher::B2bua,
        });
        assert_eq!((call.a.session_timer, call.b.session_timer), (st, st));
        // Only the refreshes stay armed: half the interval after the answer.
        assert_eq!(
            t2.b.poll_timeout(),
            Some(t2.t0 + Duration::from_millis(100) + Duration::from_secs(900))
        );
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
                call.b.path.clone(),
                call.b.session_timer,
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
        assert_eq!(ended(&out), Some(EndReason::CalleeHangup));
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

    /// Starts a call with a modified INVITE; returns the fork INVITEs.
    fn start_with(t: &mut T, msg: Message) -> Vec<(TxnKey, Target, Message)> {
        let out = t.request(0, msg);
        requests(&out)
            .into_iter()
            .map(|(target, m)| (TxnKey::client(m).unwrap(), target.clone(), m.clone()))
            .collect()
    }

    fn invite_with(headers: &[(HeaderName, &str)]) -> Message {
        let mut m = invite_a();
        for (n, v) in headers {
            m.push(Header::new(*n, v));
        }
        wire(&m)
    }

    /// A reliable provisional from a fork (RFC 3262).
    fn reliable(inv: &Message, code: u16, tag: &str, rseq: u32) -> Message {
        answer(inv, code, tag, "<sip:1001@192.0.2.20:5070>")
            .with(HeaderName::Require, "100rel")
            .with(HeaderName::RSeq, &rseq.to_string())
    }

    fn prack_from_a(seq: u32, a_tag: &str, rack: &str) -> Message {
        let mut m = in_dialog_from_a("PRACK", seq, a_tag, "");
        m.push(Header::new(HeaderName::RAck, rack));
        wire(&m)
    }

    #[test]
    fn reliable_provisionals_pass_through_with_prack_mapped_per_fork() {
        let mut t = T::new(two_bindings());
        let forks = start_with(
            &mut t,
            invite_with(&[(HeaderName::Supported, "100rel, timer")]),
        );
        for (_, _, m) in &forks {
            assert!(has_token(m, HeaderName::Supported, "100rel"));
            assert!(!has_token(m, HeaderName::Require, "100rel"));
        }
        // Fork 0 rings reliably: relayed to A reliably, with our own RSeq.
        let out = t.respond_fork(10, &forks[0], reliable(&forks[0].2, 183, "b0", 7));
        let r183 = responses(&out)[0].clone();
        assert_eq!(r183.status(), Some(183));
        assert!(has_token(&r183, HeaderName::Require, "100rel"));
        let rseq: u32 = r183.header(HeaderName::RSeq).unwrap().parse().unwrap();
        let a_tag = r183.to().unwrap().tag().unwrap().to_string();
        assert_eq!(r183.body().as_ref(), SDP_B.as_bytes());
        // B's retransmission is absorbed; the core retransmits at T1, 2*T1.
        let out = t.respond_fork(300, &forks[0], reliable(&forks[0].2, 183, "b0", 7));
        assert!(out.is_empty());
        assert_eq!(t.b.poll_timeout(), Some(t.t0 + Duration::from_millis(510)));
        t.b.handle_timeout(t.at(510));
        let again = t.drain();
        assert_eq!(
            responses(&again)[0].header(HeaderName::RSeq),
            r183.header(HeaderName::RSeq)
        );
        assert_eq!(t.b.poll_timeout(), Some(t.t0 + Duration::from_millis(1510)));
        // Fork 1's reliable 180 waits: one unacknowledged at a time.
        let out = t.respond_fork(600, &forks[1], reliable(&forks[1].2, 180, "b1", 1));
        assert!(responses(&out).is_empty());
        // A PRACK for another RSeq: 481, nothing relayed.
        let out = t.request(
            700,
            prack_from_a(11, &a_tag, &format!("{} 10 INVITE", rseq + 5)),
        );
        assert_eq!(responses(&out)[0].status(), Some(481));
        assert!(requests(&out).is_empty());
        // The right PRACK goes to fork 0's early dialog with fork 0's RAck;
        // fork 1's 180 follows with the next RSeq.
        let out = t.request(800, prack_from_a(12, &a_tag, &format!("{rseq} 10 INVITE")));
        let (target, prack) = requests(&out)[0];
        assert!(
            matches!(target, Target::Binding { contact, .. } if contact == "sip:1001@192.0.2.20:5070")
        );
        assert!(prack.is_method(&Method::Prack));
        assert_eq!(prack.header(HeaderName::RAck), Some("7 1 INVITE"));
        assert_eq!(prack.to().unwrap().tag(), Some("b0"));
        assert_eq!(prack.cseq().unwrap().seq, 2);
        let r180 = responses(&out)[0];
        assert_eq!(r180.status(), Some(180));
        assert_eq!(
            r180.header(HeaderName::RSeq),
            Some((rseq + 1).to_string().as_str())
        );
        // B's 200 to the PRACK goes back to A's PRACK.
        let prack = prack.clone();
        let out = t.reply(850, &prack, 200, "OK");
        let ok = responses(&out)[0];
        assert_eq!(
            (ok.status(), ok.cseq().unwrap().method),
            (Some(200), Method::Prack)
        );
        // Fork 0 answers: its dialog continues the early one's CSeq, so the
        // BYE after the PRACK is 3.
        let out = t.respond_fork(
            900,
            &forks[0],
            answer(&forks[0].2, 200, "b0", "<sip:1001@192.0.2.20:5070>"),
        );
        assert_eq!(responses(&out)[0].status(), Some(200));
        let out = t.request(1_000, in_dialog_from_a("BYE", 13, &a_tag, ""));
        let bye = requests(&out)[0].1;
        assert_eq!(
            (bye.to().unwrap().tag(), bye.cseq().unwrap().seq),
            (Some("b0"), 3)
        );
    }

    #[test]
    fn required_100rel_makes_every_provisional_reliable_and_unprackd_ones_fail() {
        let mut t = T::new(two_bindings());
        let forks = start_with(&mut t, invite_with(&[(HeaderName::Require, "100rel")]));
        assert!(has_token(&forks[0].2, HeaderName::Require, "100rel"));
        // An unreliable 180 from B still goes reliably; its PRACK is ours.
        let out = t.respond_fork(
            10,
            &forks[0],
            forks[0].2.response(180, "Ringing", Some("b0")),
        );
        let r = responses(&out)[0].clone();
        assert!(has_token(&r, HeaderName::Require, "100rel"));
        let rseq = r.header(HeaderName::RSeq).unwrap().to_string();
        let a_tag = r.to().unwrap().tag().unwrap().to_string();
        let out = t.request(20, prack_from_a(11, &a_tag, &format!("{rseq} 10 INVITE")));
        assert_eq!(responses(&out)[0].status(), Some(200));
        assert!(requests(&out).is_empty());
        // The next one is never PRACKed: after 64*T1, 500 and CANCELs.
        t.respond_fork(
            30,
            &forks[1],
            forks[1].2.response(180, "Ringing", Some("b1")),
        );
        let mut last = Vec::new();
        for _ in 0..10 {
            let Some(due) = t.b.poll_timeout() else { break };
            t.b.handle_timeout(Now {
                instant: due,
                unix_ms: 1_000_000 + (due - t.t0).as_millis() as u64,
            });
            last = t.drain();
            if !proposals(&last).is_empty() {
                break;
            }
        }
        assert_eq!(responses(&last)[0].status(), Some(500));
        assert_eq!(cancels(&last).len(), 2);
        assert_eq!(ended(&last), Some(EndReason::Rejected { code: 500 }));
    }

    #[test]
    fn a_caller_without_100rel_gets_unreliable_provisionals_and_the_core_pracks() {
        let mut t = T::new(two_bindings());
        let forks = t.start();
        assert!(!has_token(&forks[0].2, HeaderName::Supported, "100rel"));
        let out = t.respond_fork(10, &forks[0], reliable(&forks[0].2, 183, "b0", 3));
        let r = responses(&out)[0];
        assert!(r.header(HeaderName::RSeq).is_none());
        assert!(r.header(HeaderName::Require).is_none());
        let (_, prack) = requests(&out)[0];
        assert!(prack.is_method(&Method::Prack));
        assert_eq!(prack.header(HeaderName::RAck), Some("3 1 INVITE"));
        // Its answer is absorbed; a retransmitted 183 is not PRACKed twice.
        let prack = prack.clone();
        let out = t.reply(20, &prack, 200, "OK");
        assert!(out.is_empty());
        let out = t.respond_fork(30, &forks[0], reliable(&forks[0].2, 183, "b0", 3));
        assert!(out.is_empty());
    }

    #[test]
    fn early_updates_are_relayed_between_the_early_dialogs() {
        let mut t = T::new(two_bindings());
        let forks = start_with(&mut t, invite_with(&[(HeaderName::Supported, "100rel")]));
        let a_tag = {
            // Before any early dialog with B: 500 + Retry-After.
            let out = t.respond_fork(5, &forks[1], forks[1].2.response(100, "Trying", None));
            assert!(out.is_empty());
            let out = t.respond_fork(
                10,
                &forks[0],
                answer(&forks[0].2, 180, "b0", "<sip:1001@192.0.2.20:5070>"),
            );
            responses(&out)[0].to().unwrap().tag().unwrap().to_string()
        };
        let out = t.request(20, in_dialog_from_a("UPDATE", 11, &a_tag, SDP_A));
        let (_, up) = requests(&out)[0];
        assert!(up.is_method(&Method::Update));
        assert_eq!(up.to().unwrap().tag(), Some("b0"));
        assert_eq!(up.body().as_ref(), SDP_A.as_bytes());
        let up = up.clone();
        let mut ok = up.response(200, "OK", None);
        ok.set_body(
            Some("application/sdp"),
            Bytes::from_static(SDP_B.as_bytes()),
        );
        let out = t.input(
            30,
            Input::Response {
                key: TxnKey::client(&up).unwrap(),
                msg: wire(&ok),
            },
        );
        let r = responses(&out)[0];
        assert_eq!((r.status(), r.cseq().unwrap().seq), (Some(200), 11));
        assert_eq!(r.body().as_ref(), SDP_B.as_bytes());
        // From B's early dialog to A.
        let b_call_id = forks[0].2.call_id().unwrap();
        let b_from_tag = forks[0].2.from().unwrap().tag().unwrap();
        let update_b = parse(&format!(
            "UPDATE sip:n1@10.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.20:5070;branch=z9hG4bKupb
Max-Forwards: 70
From: <sip:1001@realm>;tag=b0
To: <sip:1000@realm>;tag={b_from_tag}
Call-ID: {b_call_id}
CSeq: 1 UPDATE
Contact: <sip:1001@192.0.2.20:5070>
Content-Length: 0

"
        ));
        let out = t.request(40, update_b);
        let (target, to_a) = requests(&out)[0];
        assert!(matches!(target, Target::Peer { .. }));
        assert_eq!(to_a.call_id(), Some("a-call"));
        assert_eq!(to_a.from().unwrap().tag(), Some(a_tag.as_str()));
        assert_eq!(to_a.to().unwrap().tag(), Some("atag"));
        // A PRACK from B is refused: the core never sends it reliable ones.
        let prack_b = parse(&format!(
            "PRACK sip:n1@10.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.20:5070;branch=z9hG4bKprb
Max-Forwards: 70
From: <sip:1001@realm>;tag=b0
To: <sip:1000@realm>;tag={b_from_tag}
Call-ID: {b_call_id}
CSeq: 2 PRACK
RAck: 1 1 INVITE
Content-Length: 0

"
        ));
        assert_eq!(responses(&t.request(50, prack_b))[0].status(), Some(481));
    }

    fn message_a(to: &str) -> Message {
        parse(&format!(
            "MESSAGE sip:{to}@10.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKm1
Max-Forwards: 70
From: \"Alice\" <sip:1000@realm>;tag=mtag
To: <sip:{to}@realm>
Call-ID: m-call
CSeq: 1 MESSAGE
Content-Type: text/plain
Content-Length: 5

hello"
        ))
    }

    #[test]
    fn message_forks_to_every_binding_and_the_first_2xx_wins() {
        let mut t = T::new(two_bindings());
        let out = t.request(0, message_a("1001"));
        let forks: Vec<Message> = requests(&out).iter().map(|(_, m)| (*m).clone()).collect();
        assert_eq!(forks.len(), 2);
        for m in &forks {
            let m = wire(m);
            assert!(m.is_method(&Method::Message));
            assert_eq!(m.body().as_ref(), b"hello");
            assert_eq!(m.header(HeaderName::ContentType), Some("text/plain"));
            assert!(m.header(HeaderName::Contact).is_none());
            assert_ne!(m.call_id(), Some("m-call"));
            assert_eq!(m.from().unwrap().uri_raw, "sip:1000@realm");
            assert_eq!(m.max_forwards(), Some(69));
        }
        assert_eq!(forks[0].request_uri_str(), Some("sip:1001@192.0.2.20:5070"));
        let key = |m: &Message| TxnKey::client(m).unwrap();
        let out = t.input(
            10,
            Input::Response {
                key: key(&forks[1]),
                msg: wire(&forks[1].response(202, "Accepted", Some("x"))),
            },
        );
        let r = responses(&out)[0];
        assert_eq!(
            (r.status(), r.cseq().unwrap().method),
            (Some(202), Method::Message)
        );
        assert!(r.to().unwrap().tag().is_some());
        assert!(proposals(&out).is_empty());
        assert_eq!(t.b.message_count(), 1);
        // The other fork's answer is absorbed and the MESSAGE forgotten.
        let out = t.input(
            20,
            Input::Response {
                key: key(&forks[0]),
                msg: wire(&forks[0].response(200, "OK", Some("y"))),
            },
        );
        assert!(out.is_empty());
        assert_eq!((t.b.message_count(), t.b.call_count()), (0, 0));

        // Every fork fails: the best response (a timeout counts as 408).
        let mut t = T::new(two_bindings());
        let out = t.request(0, message_a("1001"));
        let forks: Vec<Message> = requests(&out).iter().map(|(_, m)| (*m).clone()).collect();
        let out = t.input(
            10,
            Input::Response {
                key: key(&forks[0]),
                msg: wire(&forks[0].response(486, "Busy Here", Some("x"))),
            },
        );
        assert!(out.is_empty());
        let out = t.input(
            32_000,
            Input::Timeout {
                key: key(&forks[1]),
            },
        );
        assert_eq!(responses(&out)[0].status(), Some(486));
        assert_eq!(t.b.message_count(), 0);

        // Nobody registered: 480; a non-INVITE other than MESSAGE: 405.
        let mut t = T::new(State::new());
        assert_eq!(
            responses(&t.request(0, message_a("1001")))[0].status(),
            Some(480)
        );
        let mut sub = message_a("1001");
        sub.set_request_uri("sip:1001@10.0.0.1:5060");
        let sub = parse(&String::from_utf8_lossy(&sub.to_bytes()).replace("MESSAGE", "SUBSCRIBE"));
        let r = responses(&t.request(0, sub))[0].clone();
        assert_eq!(r.status(), Some(405));
        assert!(has_token(&r, HeaderName::Allow, "MESSAGE"));
    }

    #[test]
    fn in_dialog_message_is_relayed_like_info() {
        let (mut t, forks, a_tag) = confirmed();
        let mut m = in_dialog_from_a("MESSAGE", 11, &a_tag, "hi");
        m.set(HeaderName::ContentType, "text/plain");
        let out = t.request(1_000, wire(&m));
        let (_, to_b) = requests(&out)[0];
        assert!(to_b.is_method(&Method::Message));
        assert_eq!(to_b.call_id(), forks[0].2.call_id());
        assert_eq!(to_b.body().as_ref(), b"hi");
        assert_eq!(to_b.header(HeaderName::ContentType), Some("text/plain"));
        let to_b = to_b.clone();
        let out = t.reply(1_100, &to_b, 200, "OK");
        let r = responses(&out)[0];
        assert_eq!(
            (r.status(), r.cseq().unwrap().method),
            (Some(200), Method::Message)
        );
    }

    #[test]
    fn session_interval_is_negotiated_on_both_legs() {
        // Below our Min-SE: 422 with it.
        let mut t = T::new(two_bindings());
        let out = t.request(0, invite_with(&[(HeaderName::SessionExpires, "60")]));
        let r = responses(&out)[0];
        assert_eq!(r.status(), Some(422));
        assert_eq!(r.header(HeaderName::MinSe), Some("90"));
        assert_eq!(t.b.call_count(), 0);
        let out = t.request(0, invite_with(&[(HeaderName::SessionExpires, "soon")]));
        assert_eq!(responses(&out)[0].status(), Some(400));
        // The caller's interval (below ours) and Min-SE go to B, with the
        // core as refresher; the 2xx to A makes the core A's refresher too.
        let forks = start_with(
            &mut t,
            invite_with(&[
                (HeaderName::Supported, "timer"),
                (HeaderName::SessionExpires, "600"),
                (HeaderName::MinSe, "120"),
            ]),
        );
        let inv = &forks[0].2;
        assert_eq!(
            inv.header(HeaderName::SessionExpires),
            Some("600;refresher=uac")
        );
        assert_eq!(inv.header(HeaderName::MinSe), Some("120"));
        assert!(has_token(inv, HeaderName::Supported, "timer"));
        // Fork 1 wants more (422, Min-SE 900): retried with CSeq 2.
        let out = t.respond_fork(
            5,
            &forks[1],
            forks[1]
                .2
                .response(422, "Session Interval Too Small", Some("b1"))
                .with(HeaderName::MinSe, "900"),
        );
        let (_, retry) = requests(&out)[0];
        assert_eq!(retry.cseq().unwrap().seq, 2);
        assert_eq!(retry.call_id(), forks[1].2.call_id());
        assert_eq!(
            retry.header(HeaderName::SessionExpires),
            Some("900;refresher=uac")
        );
        assert!(responses(&out).is_empty());
        let retry = (
            TxnKey::client(retry).unwrap(),
            forks[1].1.clone(),
            retry.clone(),
        );
        let out = t.respond_fork(
            10,
            &retry,
            answer(&retry.2, 200, "b1", "<sip:1001@192.0.2.21:5071>")
                .with(HeaderName::SessionExpires, "900;refresher=uac"),
        );
        let ok = responses(&out)[0];
        assert_eq!(
            ok.header(HeaderName::SessionExpires),
            Some("600;refresher=uas")
        );
        assert!(has_token(ok, HeaderName::Require, "timer"));
        // A wants to refresh itself: honoured (RFC 4028 §9).
        let mut t = T::new(two_bindings());
        let forks = start_with(
            &mut t,
            invite_with(&[(HeaderName::SessionExpires, "1800;refresher=uac")]),
        );
        let out = t.respond_fork(
            10,
            &forks[0],
            answer(&forks[0].2, 200, "b0", "<sip:1001@192.0.2.20:5070>"),
        );
        assert_eq!(
            responses(&out)[0].header(HeaderName::SessionExpires),
            Some("1800;refresher=uac")
        );
    }

    #[test]
    fn a_callee_cannot_lengthen_the_session_interval() {
        let mut t = T::new(two_bindings());
        let forks = t.start();
        let offered: u32 = forks[0]
            .2
            .header(HeaderName::SessionExpires)
            .and_then(|v| v.split(';').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        let ok = answer(&forks[0].2, 200, "btag", "<sip:1001@192.0.2.20:5070>")
            .with(HeaderName::SessionExpires, "86400;refresher=uac");
        let out = t.respond_fork(100, &forks[0], ok);
        let a_tag = responses(&out)[0].to().unwrap().tag().unwrap().to_string();
        let ack = in_dialog_from_a("ACK", 10, &a_tag, "");
        let out = t.input(200, Input::Ack { msg: ack });
        let Command::PutCall { call } = proposals(&out)[0] else {
            panic!("no PutCall");
        };
        let b = call.b.session_timer.unwrap();
        assert_eq!(b.interval_secs, offered, "held to the offer (RFC 4028 §9)");
    }

    /// Confirmed call whose answer (at 100 ms) carried `extra` headers.
    fn confirmed_with(extra: &[(HeaderName, &str)]) -> (T, Message, String) {
        let mut t = T::new(two_bindings());
        let forks = t.start();
        let mut ok = answer(&forks[0].2, 200, "btag", "<sip:1001@192.0.2.20:5070>");
        for (n, v) in extra {
            ok.push(Header::new(*n, v));
        }
        let out = t.respond_fork(100, &forks[0], ok);
        let a_tag = responses(&out)[0].to().unwrap().tag().unwrap().to_string();
        let ack = in_dialog_from_a("ACK", 10, &a_tag, "");
        t.input(200, Input::Ack { msg: ack });
        (t, forks[0].2.clone(), a_tag)
    }

    fn fire(t: &mut T) -> (u64, Vec<Output>) {
        let due = t.b.poll_timeout().unwrap();
        let ms = (due - t.t0).as_millis() as u64;
        t.b.handle_timeout(t.at(ms));
        (ms, t.drain())
    }

    fn reply(
        t: &mut T,
        ms: u64,
        req: &Message,
        code: u16,
        extra: &[(HeaderName, &str)],
    ) -> Vec<Output> {
        let mut r = req.response(code, "X", None);
        for (n, v) in extra {
            r.push(Header::new(*n, v));
        }
        t.input(
            ms,
            Input::Response {
                key: TxnKey::client(req).unwrap(),
                msg: wire(&r),
            },
        )
    }

    #[test]
    fn the_core_refreshes_both_legs_at_half_the_interval() {
        let (mut t, _, _) = confirmed_with(&[]);
        let (ms, out) = fire(&mut t);
        assert_eq!(ms, 900_100);
        let reqs: Vec<(Target, Message)> = requests(&out)
            .iter()
            .map(|(t, m)| ((*t).clone(), (*m).clone()))
            .collect();
        assert_eq!(reqs.len(), 2);
        // Neither peer listed UPDATE: re-INVITEs with the last SDP sent.
        let (to_a, to_b) = (&reqs[0].1, &reqs[1].1);
        assert!(matches!(reqs[0].0, Target::Peer { .. }));
        for m in [to_a, to_b] {
            assert!(m.is_method(&Method::Invite));
            assert_eq!(
                m.header(HeaderName::SessionExpires),
                Some("1800;refresher=uac")
            );
            assert_eq!(m.header(HeaderName::MinSe), Some("90"));
        }
        assert_eq!(to_a.body().as_ref(), SDP_B.as_bytes());
        assert_eq!(to_b.body().as_ref(), SDP_A.as_bytes());
        assert_eq!(to_b.cseq().unwrap().seq, 2);
        // While it runs, A's re-INVITE meets 491 (glare guard).
        // 2xx: ACKed, record proposed, next refresh 900 s later.
        let out = reply(
            &mut t,
            ms + 50,
            to_b,
            200,
            &[(HeaderName::Contact, "<sip:1001@192.0.2.20:5070>")],
        );
        assert_eq!(acks(&out)[0].cseq().unwrap().seq, 2);
        let Command::PutCall { call } = proposals(&out)[0] else {
            panic!("no PutCall")
        };
        assert_eq!(call.b.local_seq, 2);
        let out = reply(
            &mut t,
            ms + 60,
            to_a,
            200,
            &[(HeaderName::Contact, "<sip:1000@192.0.2.10:5062>")],
        );
        assert_eq!(acks(&out).len(), 1);
        let (ms2, out) = fire(&mut t);
        assert_eq!(ms2, ms + 50 + 900_000);
        // B's leg refresh now meets 481: BYE both legs, CDR says why.
        let to_b = requests(&out)[0].1.clone();
        assert_eq!(to_b.cseq().unwrap().seq, 3);
        let out = reply(&mut t, ms2 + 10, &to_b, 481, &[]);
        let byes = requests(&out);
        assert_eq!(byes.len(), 2);
        assert!(byes.iter().all(|(_, m)| m.is_method(&Method::Bye)));
        assert_eq!(ended(&out), Some(EndReason::RefreshFailed { code: 481 }));
    }

    #[test]
    fn update_is_the_refresh_when_allowed_and_no_answer_ends_the_call() {
        let (mut t, _, a_tag) = confirmed_with(&[(HeaderName::Allow, "INVITE, ACK, BYE, UPDATE")]);
        let (_, out) = fire(&mut t);
        let reqs = requests(&out);
        // A's INVITE had no Allow: re-INVITE; B allows UPDATE: no body.
        assert!(reqs[0].1.is_method(&Method::Invite));
        let to_b = reqs[1].1.clone();
        assert!(to_b.is_method(&Method::Update));
        assert!(to_b.body().is_empty());
        // B does not implement it after all: re-INVITE instead.
        let out = reply(&mut t, 900_200, &to_b, 501, &[]);
        let again = requests(&out)[0].1.clone();
        assert!(again.is_method(&Method::Invite));
        assert_eq!(again.body().as_ref(), SDP_A.as_bytes());
        // A relayed re-INVITE from A meanwhile meets 491.
        let out = t.request(900_300, in_dialog_from_a("INVITE", 11, &a_tag, SDP_A));
        assert_eq!(responses(&out)[0].status(), Some(491));
        // No answer at all: 408, BYE both.
        let out = t.input(
            932_200,
            Input::Timeout {
                key: TxnKey::client(&again).unwrap(),
            },
        );
        assert_eq!(requests(&out).len(), 2);
        assert_eq!(ended(&out), Some(EndReason::RefreshFailed { code: 408 }));
    }

    #[test]
    fn a_far_end_refresher_that_stays_silent_ends_the_call() {
        // B takes the refresher role (refresher=uas in its 2xx), 90 s.
        let (mut t, b_inv, a_tag) =
            confirmed_with(&[(HeaderName::SessionExpires, "90;refresher=uas")]);
        // A relayed re-INVITE at 50 s counts as a refresh of both legs.
        let out = t.request(50_000, in_dialog_from_a("INVITE", 11, &a_tag, SDP_A));
        let to_b = requests(&out)[0].1.clone();
        assert_eq!(
            to_b.header(HeaderName::SessionExpires),
            Some("90;refresher=uas")
        );
        let out = reply(
            &mut t,
            50_100,
            &to_b,
            200,
            &[(HeaderName::Contact, "<sip:1001@192.0.2.20:5070>")],
        );
        let r = responses(&out)[0];
        assert_eq!(
            r.header(HeaderName::SessionExpires),
            Some("1800;refresher=uas")
        );
        // B then never refreshes: 90 - 30 s after that, BYE both legs.
        let (ms, out) = fire(&mut t);
        assert_eq!(ms, 50_100 + 60_000);
        let byes = requests(&out);
        assert_eq!(byes.len(), 2);
        assert_eq!(byes[1].1.call_id(), b_inv.call_id());
        match proposals(&out)[..] {
            [Command::EndCall { cdr, .. }] => assert_eq!(cdr.reason, EndReason::SessionExpired),
            ref other => panic!("{other:?}"),
        }
        assert!(t.b.poll_timeout().is_none());
    }
}
