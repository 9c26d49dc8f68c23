//! The RFC 3261 §17 transaction layer, sans-IO, with the RFC 6026 Accepted
//! states.
//!
//! [`TxnTable`] owns every client and server transaction of one element: it
//! matches messages to transactions (§17.1.3, §17.2.3, with RFC 2543 matching
//! for requests whose branch lacks the `z9hG4bK` cookie), retransmits over
//! UDP, absorbs retransmissions, generates the ACK for non-2xx finals
//! (§17.1.1.3) and the automatic 100 Trying (§17.2.1), answers CANCEL
//! (§9.2), detects merged requests (§8.2.2.2) and bounds its own size. It
//! never touches a socket or a clock: the driver feeds [`Input`]s with `now`,
//! calls [`TxnTable::handle_timeout`] at [`TxnTable::poll_timeout`], and
//! drains [`Output`]s.
//!
//! Client INVITE (§17.1.1, RFC 6026 §8.4):
//!
//! ```text
//!                    |INVITE from TU, INVITE sent
//!   Timer A fires    V     Timer B fires / transport err: inform TU
//!   INVITE sent +-----------+---------------------------------------+
//!        +------|  Calling  |                                       |
//!        +----->+-----------+  2xx: to TU                           |
//!                 |   |   +--------------------------------+        |
//!      300-699:   |   |1xx: to TU                          |        |
//!      ACK sent,  |   V                                    V        |
//!      to TU      | +------------+ 2xx: to TU      +----------+     |
//!                 | | Proceeding |---------------->| Accepted |--+  |
//!                 | +------------+                 +----------+  |  |
//!                 |   | 1xx: to TU          2xx: to TU  ^   |    |  |
//!                 |   | 300-699: ACK sent, to TU        +---+    |  |
//!                 V   V                                  Timer M |  |
//!   300-699   +-----------+ Timer D                              |  |
//!   ACK sent  | Completed |--------------> Terminated <----------+--+
//!        +----+-----------+
//! ```
//!
//! Server INVITE (§17.2.1, RFC 6026 §7.1):
//!
//! ```text
//!                 |INVITE: to TU (100 Trying after `Timers::trying`)
//!                 V
//!   INVITE    +------------+ 2xx from TU: sent    +----------+ Timer L
//!   last 1xx  | Proceeding |--------------------->| Accepted |---------+
//!   resent +--+------------+                      +----------+         |
//!                 | 300-699 from TU: sent   INVITE: absorbed;          |
//!                 V                         ACK, 2xx from TU: passed   |
//!   INVITE    +-----------+ Timer H: TU told                           |
//!   final  +--| Completed |-------------------------------> Terminated |
//!   resent    +-----------+ (Timer G: final resent, UDP)        ^  ^---+
//!                 | ACK: absorbed                               |
//!                 V                                             |
//!             +-----------+ Timer I                             |
//!             | Confirmed |-------------------------------------+
//!             +-----------+
//! ```
//!
//! Non-INVITE client (§17.1.2.2) and server (§17.2.2):
//!
//! ```text
//!   client: Trying --1xx--> Proceeding --final--> Completed --K--> Terminated
//!           (E retransmits over UDP, F times out in Trying and Proceeding)
//!   server: Trying --1xx--> Proceeding --final--> Completed --J--> Terminated
//!           (retransmissions answered from the last response sent)
//! ```
//!
//! Decisions this module takes:
//!
//! - **100 Trying** is sent [`Timers::trying`] (200 ms) after an INVITE
//!   arrives unless the TU responded first; zero sends it at once. A
//!   retransmitted INVITE arriving before any response gets 100 at once.
//! - **CANCEL** (§9.2): the table answers a CANCEL that matches a server
//!   INVITE transaction with 200 itself, on the CANCEL's own server
//!   transaction, and gives the TU [`Event::Cancelled`] naming the INVITE
//!   transaction when that one has no final response yet; the TU answers the
//!   INVITE with 487. A CANCEL matching nothing gets 481 from the table, or
//!   reaches the TU as an ordinary request when
//!   [`Config::answer_unmatched_cancel`] is off (a proxy forwards it, §16.10).
//! - **Generated responses** (482, 481, 503, 200 to CANCEL) carry the To tag
//!   [`TxnTable::local_tag`] derives from the key and the injected
//!   [`Config::tag_seed`].
//! - **Responses go back on the flow the request arrived on** (the latest
//!   retransmission's flow): symmetric response routing as with RFC 3581.
//! - **Timer C** (a proxy timer in §16.6, used here for every client INVITE)
//!   bounds the Proceeding state: if no final arrives [`Timers::c`] after the
//!   last provisional, or 64*T1 after the TU sent a CANCEL for it (§9.1), the
//!   TU gets a timeout and the transaction ends. Without it a silent peer
//!   would pin the transaction forever.
//! - **Capacity**: when [`Config::max_transactions`] are live, new requests
//!   get a stateless 503 with Retry-After and TU requests fail with
//!   [`TxnError::Full`].

pub mod build;
pub mod key;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use crate::flow::Flow;
use crate::msg::{HeaderName, Message, Method, ParseError};

pub use build::{build_ack, build_cancel};
pub use key::{Rfc2543Key, TxnKey, new_branch};

/// The RFC 3261 timer base values (§17.1.1.1, Table 4) and the few delays
/// derived from them that the RFC leaves to the implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// T1, the RTT estimate (default 500 ms). A, E, G start at T1; B, F, H,
    /// J, L, M are 64*T1. Raised to 1 ms if smaller (a zero T1 would
    /// retransmit without end).
    pub t1: Duration,
    /// T2, the longest retransmit interval for non-INVITE requests and
    /// INVITE responses (default 4 s; at least T1).
    pub t2: Duration,
    /// T4, how long a message may stay in the network (default 5 s): timers
    /// I and K over UDP.
    pub t4: Duration,
    /// Timer D over UDP (default 32 s, the RFC's minimum).
    pub d: Duration,
    /// Timer C: how long a client INVITE may stay in Proceeding without a
    /// new provisional (default 181 s; §16.6 asks for more than 3 minutes).
    pub c: Duration,
    /// How long a server INVITE transaction waits for the TU before sending
    /// 100 Trying itself (default 200 ms, §17.2.1); zero sends it at once.
    pub trying: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            d: Duration::from_secs(32),
            c: Duration::from_secs(181),
            trying: Duration::from_millis(200),
        }
    }
}

impl Timers {
    fn t1x64(&self) -> Duration {
        self.t1 * 64
    }
}

/// The transaction timers, named as in RFC 3261 §17 and RFC 6026.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimerId {
    /// Client INVITE retransmission (UDP), doubling from T1.
    A,
    /// Client INVITE timeout in Calling, 64*T1.
    B,
    /// Client INVITE limit in Proceeding (§16.6, §9.1), see [`Timers::c`].
    C,
    /// Client INVITE wait for final-response retransmissions in Completed.
    D,
    /// Client non-INVITE retransmission (UDP), doubling up to T2.
    E,
    /// Client non-INVITE timeout, 64*T1.
    F,
    /// Server INVITE final-response retransmission (UDP), doubling up to T2.
    G,
    /// Server INVITE wait for ACK, 64*T1.
    H,
    /// Server INVITE wait for ACK retransmissions in Confirmed.
    I,
    /// Server non-INVITE wait for request retransmissions in Completed.
    J,
    /// Client non-INVITE wait for response retransmissions in Completed.
    K,
    /// Server INVITE Accepted state, 64*T1 (RFC 6026).
    L,
    /// Client INVITE Accepted state, 64*T1 (RFC 6026).
    M,
    /// Not an RFC letter: the §17.2.1 delay before the automatic 100 Trying.
    Trying,
}

/// Table parameters.
///
/// | name | type | meaning | default |
/// |---|---|---|---|
/// | `timers` | [`Timers`] | T1, T2, T4, D, C, Trying delay | RFC values |
/// | `max_transactions` | `usize` | live transactions before new requests get 503 | 65 536 |
/// | `retry_after` | `u32` | Retry-After seconds in that 503 | 5 |
/// | `detect_merged` | `bool` | answer merged requests with 482 (§8.2.2.2); turn off in proxies, where spirals are legitimate | true |
/// | `answer_unmatched_cancel` | `bool` | answer a CANCEL matching nothing with 481; off passes it to the TU | true |
/// | `tag_seed` | `u64` | secret mixed into generated To tags; seed from a random source | 0 |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Timer values.
    pub timers: Timers,
    /// Most live transactions (client and server together).
    pub max_transactions: usize,
    /// Retry-After seconds in the 503 sent when full.
    pub retry_after: u32,
    /// Answer merged requests with 482 Loop Detected (a UAS rule, §8.2.2.2).
    pub detect_merged: bool,
    /// Answer a CANCEL that matches no transaction with 481 here.
    pub answer_unmatched_cancel: bool,
    /// Secret mixed into the To tags of generated responses.
    pub tag_seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timers: Timers::default(),
            max_transactions: 65_536,
            retry_after: 5,
            detect_merged: true,
            answer_unmatched_cancel: true,
            tag_seed: 0,
        }
    }
}

/// What the driver and the TU feed the table.
#[derive(Debug, Clone)]
pub enum Input {
    /// A parsed message from the transport and the flow it arrived on.
    Received {
        /// The flow it arrived on.
        flow: Flow,
        /// The message.
        msg: Message,
    },
    /// The TU sends a request (not ACK) on a new client transaction. The top
    /// Via, with its branch, is already in the message.
    SendRequest {
        /// The flow to send on.
        flow: Flow,
        /// The request.
        msg: Message,
    },
    /// The TU sends a response on the server transaction `key`.
    SendResponse {
        /// The server transaction.
        key: TxnKey,
        /// The response.
        msg: Message,
    },
    /// The transport failed to send for transaction `key` (§17.1.4, §17.2.4).
    TransportError {
        /// The transaction whose message could not be sent.
        key: TxnKey,
    },
    /// A flow failed (connection closed or ICMP error): every transaction
    /// using it gets a transport error. Flows with a connection match on the
    /// connection, others on transport and remote address.
    FlowFailed {
        /// The failed flow.
        flow: Flow,
    },
}

/// What the table asks of the driver.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send `msg` on `flow`.
    Send {
        /// Where to send.
        flow: Flow,
        /// What to send.
        msg: Message,
    },
    /// Tell the TU.
    ToTu(Event),
    /// The transaction is gone; its key may be reused. Also reported for
    /// transactions the table answered itself (482, 481, CANCEL).
    Terminated(TxnKey),
}

/// What the TU learns from the table.
#[derive(Debug, Clone)]
pub enum Event {
    /// A new request created server transaction `key`; answer with
    /// [`Input::SendResponse`].
    Request {
        /// The new server transaction.
        key: TxnKey,
        /// The flow it arrived on.
        flow: Flow,
        /// The request.
        msg: Message,
    },
    /// A response for client transaction `key`. Every 2xx is passed,
    /// retransmissions included (RFC 6026): the TU ACKs each.
    Response {
        /// The client transaction.
        key: TxnKey,
        /// The flow it arrived on.
        flow: Flow,
        /// The response.
        msg: Message,
    },
    /// The transaction timed out: B or F (no final response), H (no ACK for
    /// a non-2xx final), C (client INVITE stuck in Proceeding).
    Timeout {
        /// The transaction, now terminated.
        key: TxnKey,
        /// The timer that fired.
        timer: TimerId,
    },
    /// The transport reported a failure for the transaction, now terminated.
    TransportError {
        /// The transaction.
        key: TxnKey,
    },
    /// A CANCEL matched server INVITE transaction `invite` that has no final
    /// response yet; the table already answered the CANCEL with 200. Answer
    /// the INVITE with 487 (§9.2).
    Cancelled {
        /// The INVITE transaction to answer with 487.
        invite: TxnKey,
        /// The CANCEL's own (completed) server transaction.
        cancel: TxnKey,
        /// The CANCEL (Reason headers, RFC 3326).
        msg: Message,
    },
    /// An ACK that is not absorbed by a transaction: the ACK for a 2xx (a
    /// request of its own, §17.1.1.3) or one matching nothing (which includes
    /// the ACK for a stateless 503 sent while the table was full).
    Ack {
        /// The server INVITE transaction in Accepted it matched, if any.
        invite: Option<TxnKey>,
        /// The flow it arrived on.
        flow: Flow,
        /// The ACK.
        msg: Message,
    },
    /// A response matching no client transaction (RFC 6026 §8.1: a 2xx
    /// retransmission after Timer M, or one for a proxy to forward).
    StrayResponse {
        /// The flow it arrived on.
        flow: Flow,
        /// The response.
        msg: Message,
    },
}

/// A transaction state (RFC 3261 §17, RFC 6026). Terminated transactions
/// are removed from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Client INVITE before any response.
    Calling,
    /// Non-INVITE (client or server) before any response.
    Trying,
    /// A provisional response was received (client) or the request was
    /// passed to the TU (server INVITE) or a provisional sent (non-INVITE).
    Proceeding,
    /// A final response (non-2xx for INVITE) was received or sent.
    Completed,
    /// Server INVITE: the ACK for the non-2xx final arrived.
    Confirmed,
    /// INVITE: a 2xx was received or sent (RFC 6026).
    Accepted,
}

/// Why the table refused an input. A refused input leaves the table as it
/// was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// A request was expected.
    #[error("not a request")]
    NotRequest,
    /// A response was expected.
    #[error("not a response")]
    NotResponse,
    /// An INVITE (request or transaction) was expected.
    #[error("not an INVITE")]
    NotInvite,
    /// ACK is never sent on a client transaction: the one for a non-2xx is
    /// generated here, the one for a 2xx is sent by the TU directly.
    #[error("ACK is not sent on a client transaction")]
    Ack,
    /// A header the transaction layer needs is missing or malformed.
    #[error("malformed message: {0}")]
    Malformed(#[from] ParseError),
    /// The top Via has no branch, so no client transaction can be keyed.
    #[error("top Via has no branch")]
    NoBranch,
    /// A client transaction with this key already exists.
    #[error("transaction {0} already exists")]
    Exists(TxnKey),
    /// No transaction of the needed kind has this key.
    #[error("no such transaction: {0}")]
    NoTxn(TxnKey),
    /// The table holds [`Config::max_transactions`] transactions.
    #[error("transaction table full")]
    Full,
    /// The response's CSeq method is not the transaction's.
    #[error("response does not belong to the transaction")]
    Mismatch,
    /// The operation is not allowed in the transaction's state (a response
    /// after the final, CANCEL before a provisional).
    #[error("not allowed in state {state:?} (status {status:?})")]
    State {
        /// The transaction's state.
        state: State,
        /// The response status refused, if a response was.
        status: Option<u16>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    InviteClient,
    NonInviteClient,
    InviteServer,
    NonInviteServer,
}

/// From tag, Call-ID and CSeq of a request without To tag (§8.2.2.2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MergeKey {
    from_tag: Box<str>,
    call_id: Box<str>,
    cseq: u32,
    method: Method,
}

type Slot = (Instant, u64);

#[derive(Debug)]
struct Txn {
    role: Role,
    state: State,
    flow: Flow,
    /// Creation order, for deterministic iteration.
    seq: u64,
    request: Message,
    /// Server: the last response sent. Unused by clients.
    last_response: Option<Message>,
    /// Client INVITE: the ACK sent for the non-2xx final.
    ack: Option<Message>,
    /// The current A/E/G retransmission interval.
    interval: Duration,
    /// Client INVITE: a CANCEL was sent, Timer C no longer resets.
    cancelled: bool,
    timers: Vec<(TimerId, Slot)>,
    merge: Option<MergeKey>,
}

impl Txn {
    fn new(role: Role, state: State, flow: Flow, seq: u64, request: Message) -> Txn {
        Txn {
            role,
            state,
            flow,
            seq,
            request,
            last_response: None,
            ack: None,
            interval: Duration::ZERO,
            cancelled: false,
            timers: Vec::new(),
            merge: None,
        }
    }

    fn reliable(&self) -> bool {
        self.flow.transport.is_reliable()
    }

    fn deadline(&self, id: TimerId) -> Option<Instant> {
        self.timers.iter().find(|(i, _)| *i == id).map(|(_, s)| s.0)
    }
}

/// Deadlines ordered by time then arming order; each transaction keeps the
/// slots of its timers so disarming is exact (no lazy deletion).
#[derive(Debug, Default)]
struct Queue {
    map: BTreeMap<Slot, (TxnKey, TimerId)>,
    seq: u64,
}

impl Queue {
    fn arm(&mut self, key: &TxnKey, t: &mut Txn, id: TimerId, at: Instant) {
        self.disarm(t, id);
        let slot = (at, self.seq);
        self.seq = self.seq.wrapping_add(1);
        self.map.insert(slot, (key.clone(), id));
        t.timers.push((id, slot));
    }

    fn disarm(&mut self, t: &mut Txn, id: TimerId) {
        t.timers.retain(|(i, slot)| {
            if *i == id {
                self.map.remove(slot);
                false
            } else {
                true
            }
        });
    }

    fn disarm_all(&mut self, t: &mut Txn) {
        for (_, slot) in t.timers.drain(..) {
            self.map.remove(&slot);
        }
    }
}

fn enter(key: &TxnKey, t: &mut Txn, state: State) {
    tracing::debug!(txn = %key, from = ?t.state, to = ?state, "transaction state");
    t.state = state;
}

/// Every transaction of one element, and their timers.
#[derive(Debug)]
pub struct TxnTable {
    cfg: Config,
    txns: HashMap<TxnKey, Txn>,
    merged: HashMap<MergeKey, TxnKey>,
    queue: Queue,
    out: VecDeque<Output>,
    next_seq: u64,
}

impl TxnTable {
    /// A table with these timers and the default [`Config`] otherwise.
    pub fn new(timers: Timers) -> Self {
        Self::with_config(Config {
            timers,
            ..Config::default()
        })
    }

    /// A table with a full configuration.
    pub fn with_config(mut cfg: Config) -> Self {
        let t = &mut cfg.timers;
        t.t1 = t.t1.max(Duration::from_millis(1));
        t.t2 = t.t2.max(t.t1);
        TxnTable {
            cfg,
            txns: HashMap::new(),
            merged: HashMap::new(),
            queue: Queue::default(),
            out: VecDeque::new(),
            next_seq: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Live transactions.
    pub fn len(&self) -> usize {
        self.txns.len()
    }

    /// True when no transaction is live.
    pub fn is_empty(&self) -> bool {
        self.txns.is_empty()
    }

    /// The state of transaction `key`, `None` once terminated.
    pub fn state(&self, key: &TxnKey) -> Option<State> {
        self.txns.get(key).map(|t| t.state)
    }

    /// The To tag the table puts in responses it generates for transaction
    /// `key` (482, 481, 503, 200 to CANCEL). A TU may reuse it for its own
    /// responses so the 200 to a CANCEL and the 487 carry the same tag (§9.2).
    pub fn local_tag(&self, key: &TxnKey) -> String {
        let mut h = DefaultHasher::new();
        self.cfg.tag_seed.hash(&mut h);
        key.hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// Builds the CANCEL for client INVITE transaction `key` (§9.1) and the
    /// flow to send it on; send it with [`Input::SendRequest`]. Refused
    /// before a provisional response arrived (§9.1: wait for one) and after
    /// a final.
    pub fn cancel(&self, key: &TxnKey) -> Result<(Flow, Message), TxnError> {
        let t = self
            .txns
            .get(key)
            .ok_or_else(|| TxnError::NoTxn(key.clone()))?;
        if t.role != Role::InviteClient {
            return Err(TxnError::NotInvite);
        }
        if t.state != State::Proceeding {
            return Err(TxnError::State {
                state: t.state,
                status: None,
            });
        }
        Ok((t.flow, build_cancel(&t.request)?))
    }

    /// Feeds one input. On error nothing changed and nothing was output
    /// (unlike the bare shape in STYLE.md, TU inputs can be refused, so this
    /// returns a `Result`).
    /// Received messages that cannot be keyed (no usable top Via or CSeq)
    /// are refused so the driver can count them; they are otherwise dropped.
    pub fn handle(&mut self, now: Instant, input: Input) -> Result<(), TxnError> {
        match input {
            Input::Received { flow, msg } if msg.is_request() => self.on_request(now, flow, msg),
            Input::Received { flow, msg } => self.on_response(now, flow, msg),
            Input::SendRequest { flow, msg } => self.send_request(now, flow, msg),
            Input::SendResponse { key, msg } => self.respond(now, &key, msg),
            Input::TransportError { key } => {
                if !self.txns.contains_key(&key) {
                    return Err(TxnError::NoTxn(key));
                }
                self.transport_error(key);
                Ok(())
            }
            Input::FlowFailed { flow } => {
                let mut hit: Vec<(u64, TxnKey)> = self
                    .txns
                    .iter()
                    .filter(|(_, t)| match flow.conn {
                        Some(c) => t.flow.conn == Some(c),
                        None => t.flow.transport == flow.transport && t.flow.remote == flow.remote,
                    })
                    .map(|(k, t)| (t.seq, k.clone()))
                    .collect();
                hit.sort_by_key(|(seq, _)| *seq);
                for (_, key) in hit {
                    self.transport_error(key);
                }
                Ok(())
            }
        }
    }

    /// Fires every timer due at `now`, in deadline order.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(entry) = self.queue.map.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (slot, (key, id)) = entry.remove_entry();
            if let Some(t) = self.txns.get_mut(&key) {
                t.timers.retain(|(_, s)| *s != slot);
            }
            self.on_timer(slot.0, key, id);
        }
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest timer deadline, if any timer is armed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.map.first_key_value().map(|(slot, _)| slot.0)
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        s
    }

    fn terminate(&mut self, key: &TxnKey) {
        if let Some(mut t) = self.txns.remove(key) {
            self.queue.disarm_all(&mut t);
            if let Some(mk) = t.merge
                && self.merged.get(&mk) == Some(key)
            {
                self.merged.remove(&mk);
            }
            tracing::debug!(txn = %key, from = ?t.state, "transaction terminated");
            self.out.push_back(Output::Terminated(key.clone()));
        }
    }

    fn timeout(&mut self, key: TxnKey, timer: TimerId) {
        tracing::debug!(txn = %key, ?timer, "transaction timed out");
        self.out.push_back(Output::ToTu(Event::Timeout {
            key: key.clone(),
            timer,
        }));
        self.terminate(&key);
    }

    fn transport_error(&mut self, key: TxnKey) {
        tracing::debug!(txn = %key, "transport error");
        self.out
            .push_back(Output::ToTu(Event::TransportError { key: key.clone() }));
        self.terminate(&key);
    }

    // ---- client side (§17.1) ----

    fn send_request(&mut self, now: Instant, flow: Flow, msg: Message) -> Result<(), TxnError> {
        let method = match msg.start_line() {
            crate::msg::StartLine::Request { method, .. } => method.clone(),
            crate::msg::StartLine::Response { .. } => return Err(TxnError::NotRequest),
        };
        if method == Method::Ack {
            return Err(TxnError::Ack);
        }
        let key = TxnKey::client(&msg)?;
        if self.txns.contains_key(&key) {
            return Err(TxnError::Exists(key));
        }
        if self.txns.len() >= self.cfg.max_transactions {
            return Err(TxnError::Full);
        }
        let timers = self.cfg.timers;
        let invite = method == Method::Invite;
        let (role, state, retransmit, timeout) = if invite {
            (Role::InviteClient, State::Calling, TimerId::A, TimerId::B)
        } else {
            (Role::NonInviteClient, State::Trying, TimerId::E, TimerId::F)
        };
        let seq = self.next_seq();
        let mut t = Txn::new(role, state, flow, seq, msg.clone());
        t.interval = timers.t1;
        if !t.reliable() {
            self.queue.arm(&key, &mut t, retransmit, now + timers.t1);
        }
        self.queue.arm(&key, &mut t, timeout, now + timers.t1x64());
        tracing::debug!(txn = %key, ?state, "client transaction created");
        self.txns.insert(key.clone(), t);
        self.out.push_back(Output::Send { flow, msg });
        if method == Method::Cancel {
            // §9.1: the INVITE is given up 64*T1 after the CANCEL if no
            // final response arrives.
            let ik = key.with_method(Method::Invite);
            if let Some(inv) = self.txns.get_mut(&ik)
                && inv.role == Role::InviteClient
                && matches!(inv.state, State::Calling | State::Proceeding)
            {
                inv.cancelled = true;
                let at = now + timers.t1x64();
                if inv.deadline(TimerId::C).is_none_or(|c| c > at) {
                    self.queue.arm(&ik, inv, TimerId::C, at);
                }
            }
        }
        Ok(())
    }

    fn on_response(&mut self, now: Instant, flow: Flow, msg: Message) -> Result<(), TxnError> {
        let status = msg.status().ok_or(TxnError::NotResponse)?;
        let key = match TxnKey::client(&msg) {
            Ok(k) => k,
            Err(TxnError::NoBranch) => {
                self.stray(flow, msg);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let Some(t) = self.txns.get_mut(&key) else {
            self.stray(flow, msg);
            return Ok(());
        };
        tracing::trace!(txn = %key, status, "response received");
        let timers = self.cfg.timers;
        let to_tu = |key: &TxnKey, msg: Message| {
            Output::ToTu(Event::Response {
                key: key.clone(),
                flow,
                msg,
            })
        };
        match t.role {
            Role::InviteClient => match (t.state, status) {
                (State::Calling | State::Proceeding, 0..=199) => {
                    if t.state == State::Calling {
                        enter(&key, t, State::Proceeding);
                        self.queue.disarm(t, TimerId::A);
                        self.queue.disarm(t, TimerId::B);
                        if !t.cancelled {
                            self.queue.arm(&key, t, TimerId::C, now + timers.c);
                        }
                    } else if status > 100 && !t.cancelled {
                        self.queue.arm(&key, t, TimerId::C, now + timers.c);
                    }
                    self.out.push_back(to_tu(&key, msg));
                }
                (State::Calling | State::Proceeding, 200..=299) => {
                    enter(&key, t, State::Accepted);
                    self.queue.disarm_all(t);
                    self.queue.arm(&key, t, TimerId::M, now + timers.t1x64());
                    self.out.push_back(to_tu(&key, msg));
                }
                (State::Calling | State::Proceeding, _) => {
                    enter(&key, t, State::Completed);
                    self.queue.disarm_all(t);
                    match build_ack(&t.request, &msg) {
                        Ok(ack) => {
                            self.out.push_back(Output::Send {
                                flow: t.flow,
                                msg: ack.clone(),
                            });
                            t.ack = Some(ack);
                        }
                        Err(e) => tracing::warn!(txn = %key, error = %e, "cannot build ACK"),
                    }
                    let reliable = t.reliable();
                    if !reliable {
                        self.queue.arm(&key, t, TimerId::D, now + timers.d);
                    }
                    self.out.push_back(to_tu(&key, msg));
                    if reliable {
                        self.terminate(&key);
                    }
                }
                (State::Completed, 300..) => {
                    if let Some(ack) = &t.ack {
                        self.out.push_back(Output::Send {
                            flow: t.flow,
                            msg: ack.clone(),
                        });
                    }
                }
                (State::Completed | State::Accepted, 200..=299) => {
                    self.out.push_back(to_tu(&key, msg));
                }
                _ => tracing::trace!(txn = %key, status, "response absorbed"),
            },
            Role::NonInviteClient => match (t.state, status) {
                (State::Trying | State::Proceeding, 0..=199) => {
                    if t.state == State::Trying {
                        enter(&key, t, State::Proceeding);
                    }
                    self.out.push_back(to_tu(&key, msg));
                }
                (State::Trying | State::Proceeding, _) => {
                    enter(&key, t, State::Completed);
                    self.queue.disarm_all(t);
                    let reliable = t.reliable();
                    if !reliable {
                        self.queue.arm(&key, t, TimerId::K, now + timers.t4);
                    }
                    self.out.push_back(to_tu(&key, msg));
                    if reliable {
                        self.terminate(&key);
                    }
                }
                _ => tracing::trace!(txn = %key, status, "response absorbed"),
            },
            Role::InviteServer | Role::NonInviteServer => self.stray(flow, msg),
        }
        Ok(())
    }

    fn stray(&mut self, flow: Flow, msg: Message) {
        tracing::trace!(status = ?msg.status(), "stray response");
        self.out
            .push_back(Output::ToTu(Event::StrayResponse { flow, msg }));
    }

    // ---- server side (§17.2) ----

    fn on_request(&mut self, now: Instant, flow: Flow, msg: Message) -> Result<(), TxnError> {
        let method = msg.method().ok_or(TxnError::NotRequest)?;
        let key = TxnKey::server(&msg)?;
        tracing::trace!(txn = %key, "request received");
        if method == Method::Ack {
            self.on_ack(now, key, flow, msg);
            return Ok(());
        }
        if let Some(t) = self.txns.get_mut(&key) {
            t.flow = flow;
            self.on_retransmission(&key);
            return Ok(());
        }
        if method == Method::Cancel && self.on_cancel(now, &key, flow, &msg) {
            return Ok(());
        }
        let merge = if method == Method::Cancel {
            None
        } else {
            self.merge_key(&msg)
        };
        if let Some(mk) = &merge
            && self.merged.get(mk).is_some_and(|other| *other != key)
        {
            tracing::debug!(txn = %key, "merged request");
            let resp = msg.response(482, "Loop Detected", Some(&self.local_tag(&key)));
            self.answer_locally(now, key, flow, msg, resp);
            return Ok(());
        }
        if self.txns.len() >= self.cfg.max_transactions {
            tracing::warn!(txn = %key, "transaction table full, 503");
            let mut resp = msg.response(503, "Service Unavailable", Some(&self.local_tag(&key)));
            resp.set(HeaderName::RetryAfter, &self.cfg.retry_after.to_string());
            self.out.push_back(Output::Send { flow, msg: resp });
            return Ok(());
        }
        let invite = method == Method::Invite;
        let (role, state) = if invite {
            (Role::InviteServer, State::Proceeding)
        } else {
            (Role::NonInviteServer, State::Trying)
        };
        let seq = self.next_seq();
        let mut t = Txn::new(role, state, flow, seq, msg.clone());
        if let Some(mk) = merge {
            self.merged.insert(mk.clone(), key.clone());
            t.merge = Some(mk);
        }
        tracing::debug!(txn = %key, ?state, "server transaction created");
        self.out.push_back(Output::ToTu(Event::Request {
            key: key.clone(),
            flow,
            msg,
        }));
        if invite {
            let trying = self.cfg.timers.trying;
            if trying.is_zero() {
                let r = t.request.response(100, "Trying", None);
                self.out.push_back(Output::Send {
                    flow,
                    msg: r.clone(),
                });
                t.last_response = Some(r);
            } else {
                self.queue.arm(&key, &mut t, TimerId::Trying, now + trying);
            }
        }
        self.txns.insert(key, t);
        Ok(())
    }

    fn merge_key(&self, msg: &Message) -> Option<MergeKey> {
        if !self.cfg.detect_merged || msg.to().ok()?.tag().is_some() {
            return None;
        }
        let cseq = msg.cseq().ok()?;
        Some(MergeKey {
            from_tag: msg.from().ok()?.tag()?.into(),
            call_id: msg.call_id()?.into(),
            cseq: cseq.seq,
            method: cseq.method,
        })
    }

    /// A request retransmission (§17.2.1, §17.2.2): answered from the last
    /// response, or absorbed.
    fn on_retransmission(&mut self, key: &TxnKey) {
        let Some(t) = self.txns.get_mut(key) else {
            return;
        };
        let resend = match (t.role, t.state) {
            (Role::InviteServer, State::Proceeding) => {
                if t.last_response.is_none() {
                    // The client is already retransmitting: no point waiting
                    // for the Trying delay.
                    self.queue.disarm(t, TimerId::Trying);
                    t.last_response = Some(t.request.response(100, "Trying", None));
                }
                true
            }
            (Role::InviteServer, State::Completed) => true,
            (Role::NonInviteServer, State::Proceeding | State::Completed) => true,
            _ => false,
        };
        match (&t.last_response, resend) {
            (Some(r), true) => self.out.push_back(Output::Send {
                flow: t.flow,
                msg: r.clone(),
            }),
            _ => tracing::trace!(txn = %key, state = ?t.state, "retransmission absorbed"),
        }
    }

    fn on_ack(&mut self, now: Instant, key: TxnKey, flow: Flow, msg: Message) {
        let t4 = self.cfg.timers.t4;
        let Some(t) = self
            .txns
            .get_mut(&key)
            .filter(|t| t.role == Role::InviteServer)
        else {
            self.out.push_back(Output::ToTu(Event::Ack {
                invite: None,
                flow,
                msg,
            }));
            return;
        };
        match t.state {
            State::Completed => {
                enter(&key, t, State::Confirmed);
                self.queue.disarm_all(t);
                if t.reliable() {
                    self.terminate(&key);
                } else {
                    self.queue.arm(&key, t, TimerId::I, now + t4);
                }
            }
            State::Accepted => self.out.push_back(Output::ToTu(Event::Ack {
                invite: Some(key),
                flow,
                msg,
            })),
            _ => tracing::trace!(txn = %key, state = ?t.state, "ACK absorbed"),
        }
    }

    /// A CANCEL with no transaction of its own yet (§9.2). Returns false
    /// when it should become an ordinary request for the TU.
    fn on_cancel(&mut self, now: Instant, key: &TxnKey, flow: Flow, msg: &Message) -> bool {
        let ik = key.with_method(Method::Invite);
        let Some(inv) = self.txns.get(&ik).filter(|t| t.role == Role::InviteServer) else {
            if !self.cfg.answer_unmatched_cancel {
                return false;
            }
            let resp = msg.response(
                481,
                "Call/Transaction Does Not Exist",
                Some(&self.local_tag(key)),
            );
            self.answer_locally(now, key.clone(), flow, msg.clone(), resp);
            return true;
        };
        let pending = inv.state == State::Proceeding;
        let tag = inv
            .last_response
            .as_ref()
            .and_then(|r| r.to().ok().and_then(|to| to.tag().map(str::to_owned)))
            .unwrap_or_else(|| self.local_tag(&ik));
        let resp = msg.response(200, "OK", Some(&tag));
        self.answer_locally(now, key.clone(), flow, msg.clone(), resp);
        if pending {
            self.out.push_back(Output::ToTu(Event::Cancelled {
                invite: ik,
                cancel: key.clone(),
                msg: msg.clone(),
            }));
        }
        true
    }

    /// Answers `req` from the table on a server transaction of its own, so
    /// retransmissions get the same answer; statelessly when full.
    fn answer_locally(
        &mut self,
        now: Instant,
        key: TxnKey,
        flow: Flow,
        req: Message,
        resp: Message,
    ) {
        if self.txns.len() >= self.cfg.max_transactions {
            self.out.push_back(Output::Send { flow, msg: resp });
            return;
        }
        let (role, state) = if req.is_method(&Method::Invite) {
            (Role::InviteServer, State::Proceeding)
        } else {
            (Role::NonInviteServer, State::Trying)
        };
        let seq = self.next_seq();
        self.txns
            .insert(key.clone(), Txn::new(role, state, flow, seq, req));
        if let Err(e) = self.respond(now, &key, resp) {
            tracing::warn!(txn = %key, error = %e, "local answer refused");
            self.terminate(&key);
        }
    }

    /// The TU (or the table) sends a response on a server transaction.
    fn respond(&mut self, now: Instant, key: &TxnKey, msg: Message) -> Result<(), TxnError> {
        let status = msg.status().ok_or(TxnError::NotResponse)?;
        let timers = self.cfg.timers;
        let t = self
            .txns
            .get_mut(key)
            .filter(|t| matches!(t.role, Role::InviteServer | Role::NonInviteServer))
            .ok_or_else(|| TxnError::NoTxn(key.clone()))?;
        if Some(msg.cseq()?.method) != t.request.method() {
            return Err(TxnError::Mismatch);
        }
        let send = Output::Send {
            flow: t.flow,
            msg: msg.clone(),
        };
        let mut terminate = false;
        match (t.role, t.state) {
            (Role::InviteServer, State::Proceeding) => {
                self.queue.disarm(t, TimerId::Trying);
                if status >= 300 {
                    enter(key, t, State::Completed);
                    t.interval = timers.t1;
                    if !t.reliable() {
                        self.queue.arm(key, t, TimerId::G, now + timers.t1);
                    }
                    self.queue.arm(key, t, TimerId::H, now + timers.t1x64());
                } else if status >= 200 {
                    enter(key, t, State::Accepted);
                    self.queue.arm(key, t, TimerId::L, now + timers.t1x64());
                }
            }
            // RFC 6026 §7.1: the TU retransmits its 2xx through the transaction.
            (Role::InviteServer, State::Accepted) if (200..300).contains(&status) => {}
            (Role::NonInviteServer, State::Trying | State::Proceeding) => {
                if status < 200 {
                    if t.state == State::Trying {
                        enter(key, t, State::Proceeding);
                    }
                } else {
                    enter(key, t, State::Completed);
                    if t.reliable() {
                        terminate = true;
                    } else {
                        self.queue.arm(key, t, TimerId::J, now + timers.t1x64());
                    }
                }
            }
            (_, state) => {
                return Err(TxnError::State {
                    state,
                    status: Some(status),
                });
            }
        }
        t.last_response = Some(msg);
        self.out.push_back(send);
        if terminate {
            self.terminate(key);
        }
        Ok(())
    }

    // ---- timers ----

    fn on_timer(&mut self, at: Instant, key: TxnKey, id: TimerId) {
        let timers = self.cfg.timers;
        let Some(t) = self.txns.get_mut(&key) else {
            return;
        };
        tracing::trace!(txn = %key, timer = ?id, "timer fired");
        match (id, t.state) {
            (TimerId::A, State::Calling) => {
                self.out.push_back(Output::Send {
                    flow: t.flow,
                    msg: t.request.clone(),
                });
                t.interval *= 2;
                let next = at + t.interval;
                self.queue.arm(&key, t, TimerId::A, next);
            }
            (TimerId::E, State::Trying | State::Proceeding) => {
                self.out.push_back(Output::Send {
                    flow: t.flow,
                    msg: t.request.clone(),
                });
                t.interval = if t.state == State::Proceeding {
                    timers.t2
                } else {
                    (t.interval * 2).min(timers.t2)
                };
                let next = at + t.interval;
                self.queue.arm(&key, t, TimerId::E, next);
            }
            (TimerId::G, State::Completed) => {
                if let Some(r) = &t.last_response {
                    self.out.push_back(Output::Send {
                        flow: t.flow,
                        msg: r.clone(),
                    });
                }
                t.interval = (t.interval * 2).min(timers.t2);
                let next = at + t.interval;
                self.queue.arm(&key, t, TimerId::G, next);
            }
            (TimerId::Trying, State::Proceeding) if t.last_response.is_none() => {
                let r = t.request.response(100, "Trying", None);
                self.out.push_back(Output::Send {
                    flow: t.flow,
                    msg: r.clone(),
                });
                t.last_response = Some(r);
            }
            (TimerId::B, State::Calling)
            | (TimerId::C, State::Calling | State::Proceeding)
            | (TimerId::F, State::Trying | State::Proceeding)
            | (TimerId::H, State::Completed) => self.timeout(key, id),
            (TimerId::D | TimerId::I | TimerId::J | TimerId::K | TimerId::L | TimerId::M, _) => {
                self.terminate(&key)
            }
            _ => tracing::trace!(txn = %key, timer = ?id, "stale timer ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{ConnId, Transport};
    use crate::msg::{Framing, Limits};
    use bytes::Bytes;

    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn udp() -> Flow {
        Flow::to(Transport::Udp, "192.0.2.1:5060".parse().unwrap())
    }

    fn tcp(conn: u64) -> Flow {
        Flow {
            conn: Some(ConnId(conn)),
            ..Flow::to(Transport::Tcp, "192.0.2.1:5060".parse().unwrap())
        }
    }

    fn parse(s: &str) -> Message {
        Message::parse(
            Bytes::from(s.to_owned()),
            Framing::Datagram,
            &Limits::default(),
        )
        .unwrap()
    }

    /// A request as the client (or the TU) writes it.
    fn req(method: &str, branch: &str, transport: &str) -> Message {
        req_call(method, branch, transport, "call-1")
    }

    fn req_call(method: &str, branch: &str, transport: &str, call: &str) -> Message {
        let via = if branch.is_empty() {
            String::new()
        } else {
            format!(";branch={branch}")
        };
        parse(&format!(
            "{method} sip:bob@b.example SIP/2.0\r\n\
Via: SIP/2.0/{transport} a.example:5060{via}\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@a.example>;tag=ft\r\n\
To: <sip:bob@b.example>\r\n\
Call-ID: {call}\r\n\
CSeq: 1 {method}\r\n\
Route: <sip:p.example;lr>\r\n\r\n"
        ))
    }

    /// The ACK a UAC sends for a non-2xx final: same branch, To with tag.
    fn ack_for(invite: &Message, to_tag: &str) -> Message {
        let text = String::from_utf8(invite.to_bytes().to_vec())
            .unwrap()
            .replace("INVITE", "ACK")
            .replace(
                "To: <sip:bob@b.example>",
                &format!("To: <sip:bob@b.example>;tag={to_tag}"),
            );
        parse(&text)
    }

    fn drain(t: &mut TxnTable) -> Vec<Output> {
        std::iter::from_fn(|| t.poll_output()).collect()
    }

    fn sent(out: &[Output]) -> Vec<&Message> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { msg, .. } => Some(msg),
                _ => None,
            })
            .collect()
    }

    fn statuses(out: &[Output]) -> Vec<u16> {
        sent(out).iter().filter_map(|m| m.status()).collect()
    }

    fn recv(t: &mut TxnTable, now: Instant, flow: Flow, msg: Message) -> Vec<Output> {
        t.handle(now, Input::Received { flow, msg }).unwrap();
        drain(t)
    }

    fn send_req(t: &mut TxnTable, now: Instant, flow: Flow, msg: Message) -> Vec<Output> {
        t.handle(now, Input::SendRequest { flow, msg }).unwrap();
        drain(t)
    }

    fn respond(t: &mut TxnTable, now: Instant, key: &TxnKey, msg: Message) -> Vec<Output> {
        t.handle(
            now,
            Input::SendResponse {
                key: key.clone(),
                msg,
            },
        )
        .unwrap();
        drain(t)
    }

    /// Fires timers up to `base + until`, logging each output with the
    /// offset of the deadline that produced it.
    fn run(t: &mut TxnTable, base: Instant, until: Duration) -> Vec<(Duration, Output)> {
        let mut log = Vec::new();
        while let Some(at) = t.poll_timeout() {
            if at > base + until {
                break;
            }
            t.handle_timeout(at);
            log.extend(drain(t).into_iter().map(|o| (at - base, o)));
        }
        log
    }

    fn send_times(log: &[(Duration, Output)]) -> Vec<Duration> {
        log.iter()
            .filter(|(_, o)| matches!(o, Output::Send { .. }))
            .map(|(d, _)| *d)
            .collect()
    }

    fn timeout_at(log: &[(Duration, Output)], key: &TxnKey, timer: TimerId) -> Option<Duration> {
        log.iter().find_map(|(d, o)| match o {
            Output::ToTu(Event::Timeout { key: k, timer: id }) if k == key && *id == timer => {
                Some(*d)
            }
            _ => None,
        })
    }

    fn terminated(out: &[Output], key: &TxnKey) -> bool {
        out.iter()
            .any(|o| matches!(o, Output::Terminated(k) if k == key))
    }

    fn request_key(out: &[Output]) -> TxnKey {
        out.iter()
            .find_map(|o| match o {
                Output::ToTu(Event::Request { key, .. }) => Some(key.clone()),
                _ => None,
            })
            .expect("a Request event")
    }

    fn to_tu_responses(out: &[Output]) -> Vec<u16> {
        out.iter()
            .filter_map(|o| match o {
                Output::ToTu(Event::Response { msg, .. }) => msg.status(),
                _ => None,
            })
            .collect()
    }

    // ---- client INVITE ----

    #[test]
    fn timer_a_doubles_over_udp_and_b_times_out() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKa", "UDP");
        let key = TxnKey::client(&inv).unwrap();
        let out = send_req(&mut t, base, udp(), inv.clone());
        assert_eq!(sent(&out), [&inv]);
        assert_eq!(t.state(&key), Some(State::Calling));
        assert_eq!(t.poll_timeout(), Some(base + ms(500)));
        let log = run(&mut t, base, Duration::from_secs(60));
        assert_eq!(
            send_times(&log),
            [500, 1500, 3500, 7500, 15500, 31500].map(ms)
        );
        assert_eq!(timeout_at(&log, &key, TimerId::B), Some(ms(32_000)));
        assert!(terminated(
            &log.into_iter().map(|x| x.1).collect::<Vec<_>>(),
            &key
        ));
        assert!(t.is_empty());
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn late_timeout_call_fires_every_due_timer_in_order() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKa", "UDP");
        send_req(&mut t, base, udp(), inv);
        t.handle_timeout(base + Duration::from_secs(40));
        let out = drain(&mut t);
        assert_eq!(sent(&out).len(), 6);
        assert!(matches!(
            out[6],
            Output::ToTu(Event::Timeout {
                timer: TimerId::B,
                ..
            })
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn no_timer_a_over_tcp() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKa", "TCP");
        let key = TxnKey::client(&inv).unwrap();
        send_req(&mut t, base, tcp(1), inv);
        assert_eq!(t.poll_timeout(), Some(base + ms(32_000)));
        let log = run(&mut t, base, Duration::from_secs(60));
        assert!(send_times(&log).is_empty());
        assert_eq!(timeout_at(&log, &key, TimerId::B), Some(ms(32_000)));
    }

    #[test]
    fn non_2xx_is_acked_and_timer_d_absorbs_retransmissions() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKa", "UDP");
        let key = TxnKey::client(&inv).unwrap();
        send_req(&mut t, base, udp(), inv.clone());

        let out = recv(
            &mut t,
            base + ms(100),
            udp(),
            inv.response(180, "Ringing", Some("tt")),
        );
        assert_eq!(to_tu_responses(&out), [180]);
        assert_eq!(t.state(&key), Some(State::Proceeding));
        // A and B stop; only Timer C remains.
        assert_eq!(t.poll_timeout(), Some(base + ms(100) + Timers::default().c));

        let busy = inv.response(486, "Busy Here", Some("tt"));
        let out = recv(&mut t, base + ms(200), udp(), busy.clone());
        assert_eq!(to_tu_responses(&out), [486]);
        let acks = sent(&out);
        assert_eq!(acks.len(), 1);
        let ack = parse(std::str::from_utf8(&acks[0].to_bytes()).unwrap());
        assert_eq!(ack.method(), Some(Method::Ack));
        assert_eq!(ack.request_uri_str(), Some("sip:bob@b.example"));
        assert_eq!(ack.top_via().unwrap().branch(), Some("z9hG4bKa"));
        assert_eq!(ack.to().unwrap().tag(), Some("tt"));
        assert_eq!(ack.header(HeaderName::CSeq), Some("1 ACK"));
        assert_eq!(ack.header(HeaderName::Route), Some("<sip:p.example;lr>"));
        assert_eq!(t.state(&key), Some(State::Completed));
        assert_eq!(t.poll_timeout(), Some(base + ms(32_200)));

        // A retransmitted final: ACK again, the TU hears nothing.
        let out = recv(&mut t, base + ms(700), udp(), busy);
        assert_eq!(out.len(), 1);
        assert_eq!(sent(&out)[0].method(), Some(Method::Ack));

        let log = run(&mut t, base, Duration::from_secs(60));
        assert_eq!(log.len(), 1);
        assert!(matches!(&log[0], (d, Output::Terminated(k)) if *d == ms(32_200) && *k == key));
    }

    #[test]
    fn timer_d_is_zero_over_tcp() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKa", "TCP");
        let key = TxnKey::client(&inv).unwrap();
        send_req(&mut t, base, tcp(1), inv.clone());
        let out = recv(
            &mut t,
            base,
            tcp(1),
            inv.response(404, "Not Found", Some("x")),
        );
        assert_eq!(sent(&out)[0].method(), Some(Method::Ack));
        assert_eq!(to_tu_responses(&out), [404]);
        assert!(terminated(&out, &key));
        assert!(t.is_empty());
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn timer_m_passes_every_2xx_then_strays() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKa", "UDP");
        let key = TxnKey::client(&inv).unwrap();
        send_req(&mut t, base, udp(), inv.clone());
        let ok = inv.response(200, "OK", Some("fork1"));
        let out = recv(&mut t, base + ms(100), udp(), ok.clone());
        assert_eq!(to_tu_responses(&out), [200]);
        assert!(
            sent(&out).is_empty(),
            "the TU ACKs 2xx, not the transaction"
        );
        assert_eq!(t.state(&key), Some(State::Accepted));
        assert_eq!(t.poll_timeout(), Some(base + ms(32_100)));
        // retransmission and a second fork both reach the TU
        let out = recv(&mut t, base + ms(600), udp(), ok.clone());
        assert_eq!(to_tu_responses(&out), [200]);
        let out = recv(
            &mut t,
            base + ms(700),
            udp(),
            inv.response(200, "OK", Some("fork2")),
        );
        assert_eq!(to_tu_responses(&out), [200]);
        // a late non-2xx is absorbed
        assert!(
            recv(
                &mut t,
                base + ms(800),
                udp(),
                inv.response(486, "Busy", Some("f3"))
            )
            .is_empty()
        );
        let log = run(&mut t, base, Duration::from_secs(60));
        assert!(matches!(&log[..], [(d, Output::Terminated(_))] if *d == ms(32_100)));
        let out = recv(&mut t, base + ms(40_000), udp(), ok);
        assert!(matches!(
            &out[..],
            [Output::ToTu(Event::StrayResponse { .. })]
        ));
    }

    // ---- client non-INVITE ----

    #[test]
    fn timer_e_caps_at_t2_and_f_times_out() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let opt = req("OPTIONS", "z9hG4bKo", "UDP");
        let key = TxnKey::client(&opt).unwrap();
        send_req(&mut t, base, udp(), opt);
        assert_eq!(t.state(&key), Some(State::Trying));
        let log = run(&mut t, base, Duration::from_secs(60));
        assert_eq!(
            send_times(&log),
            [
                500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
            ]
            .map(ms)
        );
        assert_eq!(timeout_at(&log, &key, TimerId::F), Some(ms(32_000)));
        assert!(t.is_empty());
    }

    #[test]
    fn timer_e_stays_at_t2_after_a_provisional() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let opt = req("OPTIONS", "z9hG4bKo", "UDP");
        let key = TxnKey::client(&opt).unwrap();
        send_req(&mut t, base, udp(), opt.clone());
        let log = run(&mut t, base, ms(600));
        assert_eq!(send_times(&log), [ms(500)]);
        let out = recv(
            &mut t,
            base + ms(600),
            udp(),
            opt.response(100, "Trying", None),
        );
        assert_eq!(to_tu_responses(&out), [100]);
        assert_eq!(t.state(&key), Some(State::Proceeding));
        let log = run(&mut t, base, Duration::from_secs(60));
        // the E armed before the provisional (1.5 s) fires, then every T2
        assert_eq!(
            send_times(&log),
            [1500, 5500, 9500, 13500, 17500, 21500, 25500, 29500].map(ms)
        );
        assert_eq!(timeout_at(&log, &key, TimerId::F), Some(ms(32_000)));
    }

    #[test]
    fn no_timer_e_over_tcp() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let opt = req("OPTIONS", "z9hG4bKo", "TCP");
        let key = TxnKey::client(&opt).unwrap();
        send_req(&mut t, base, tcp(1), opt);
        let log = run(&mut t, base, Duration::from_secs(60));
        assert!(send_times(&log).is_empty());
        assert_eq!(timeout_at(&log, &key, TimerId::F), Some(ms(32_000)));
    }

    #[test]
    fn timer_k_absorbs_final_retransmissions() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let opt = req("OPTIONS", "z9hG4bKo", "UDP");
        let key = TxnKey::client(&opt).unwrap();
        send_req(&mut t, base, udp(), opt.clone());
        let ok = opt.response(200, "OK", Some("x"));
        let out = recv(&mut t, base + ms(100), udp(), ok.clone());
        assert_eq!(to_tu_responses(&out), [200]);
        assert_eq!(t.state(&key), Some(State::Completed));
        assert_eq!(t.poll_timeout(), Some(base + ms(5_100)));
        assert!(recv(&mut t, base + ms(200), udp(), ok).is_empty());
        let log = run(&mut t, base, Duration::from_secs(60));
        assert!(matches!(&log[..], [(d, Output::Terminated(_))] if *d == ms(5_100)));

        // over TCP, K is zero
        let opt = req("OPTIONS", "z9hG4bKt", "TCP");
        let key = TxnKey::client(&opt).unwrap();
        send_req(&mut t, base, tcp(1), opt.clone());
        let out = recv(&mut t, base, tcp(1), opt.response(200, "OK", Some("x")));
        assert_eq!(to_tu_responses(&out), [200]);
        assert!(terminated(&out, &key));
        assert!(t.is_empty());
    }

    // ---- server INVITE ----

    #[test]
    fn trying_sent_after_200ms_unless_the_tu_answers() {
        let base = t0();
        let inv = req("INVITE", "z9hG4bKs", "UDP");

        let mut t = TxnTable::new(Timers::default());
        let out = recv(&mut t, base, udp(), inv.clone());
        let key = request_key(&out);
        assert!(sent(&out).is_empty());
        assert_eq!(t.state(&key), Some(State::Proceeding));
        assert_eq!(t.poll_timeout(), Some(base + ms(200)));
        let log = run(&mut t, base, ms(300));
        let msgs: Vec<_> = log.iter().map(|(d, o)| (*d, o)).collect();
        assert!(matches!(&msgs[..], [(d, Output::Send { msg, .. })]
            if *d == ms(200) && msg.status() == Some(100) && msg.to().unwrap().tag().is_none()));

        let mut t = TxnTable::new(Timers::default());
        let key = request_key(&recv(&mut t, base, udp(), inv.clone()));
        let out = respond(
            &mut t,
            base + ms(50),
            &key,
            inv.response(180, "Ringing", Some("u")),
        );
        assert_eq!(statuses(&out), [180]);
        assert_eq!(t.poll_timeout(), None);

        let mut t = TxnTable::new(Timers {
            trying: Duration::ZERO,
            ..Timers::default()
        });
        let out = recv(&mut t, base, udp(), inv);
        assert_eq!(statuses(&out), [100]);
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn server_invite_retransmissions_in_every_state() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKs", "UDP");
        let key = request_key(&recv(&mut t, base, udp(), inv.clone()));
        // Proceeding, nothing sent yet: answer with 100 at once
        let out = recv(&mut t, base + ms(50), udp(), inv.clone());
        assert_eq!(statuses(&out), [100]);
        assert_eq!(out.len(), 1, "not passed to the TU again");
        assert_eq!(t.poll_timeout(), None, "Trying timer disarmed");
        // Proceeding after a provisional: the last provisional
        respond(
            &mut t,
            base + ms(60),
            &key,
            inv.response(180, "Ringing", Some("u")),
        );
        assert_eq!(
            statuses(&recv(&mut t, base + ms(70), udp(), inv.clone())),
            [180]
        );
        // Completed: the final
        respond(
            &mut t,
            base + ms(80),
            &key,
            inv.response(486, "Busy Here", Some("u")),
        );
        assert_eq!(t.state(&key), Some(State::Completed));
        assert_eq!(
            statuses(&recv(&mut t, base + ms(90), udp(), inv.clone())),
            [486]
        );
        // Confirmed: the ACK for the non-2xx is absorbed, then everything is
        let ack = ack_for(&inv, "u");
        assert!(recv(&mut t, base + ms(100), udp(), ack.clone()).is_empty());
        assert_eq!(t.state(&key), Some(State::Confirmed));
        assert!(recv(&mut t, base + ms(110), udp(), inv).is_empty());
        assert!(recv(&mut t, base + ms(120), udp(), ack).is_empty());
        // Timer I = T4 over UDP
        assert_eq!(t.poll_timeout(), Some(base + ms(5_100)));
        let log = run(&mut t, base, Duration::from_secs(60));
        assert!(matches!(&log[..], [(d, Output::Terminated(k))] if *d == ms(5_100) && *k == key));
    }

    #[test]
    fn timer_g_retransmits_and_h_reports_missing_ack() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKs", "UDP");
        let key = request_key(&recv(&mut t, base, udp(), inv.clone()));
        let out = respond(
            &mut t,
            base,
            &key,
            inv.response(486, "Busy Here", Some("u")),
        );
        assert_eq!(statuses(&out), [486]);
        let log = run(&mut t, base, Duration::from_secs(60));
        assert_eq!(
            send_times(&log),
            [
                500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
            ]
            .map(ms)
        );
        assert!(log.iter().all(|(_, o)| match o {
            Output::Send { msg, .. } => msg.status() == Some(486),
            _ => true,
        }));
        assert_eq!(timeout_at(&log, &key, TimerId::H), Some(ms(32_000)));
        assert!(t.is_empty());

        // over TCP: no G, H still applies
        let inv = req("INVITE", "z9hG4bKt", "TCP");
        let key = request_key(&recv(&mut t, base, tcp(3), inv.clone()));
        respond(
            &mut t,
            base,
            &key,
            inv.response(486, "Busy Here", Some("u")),
        );
        let log = run(&mut t, base, Duration::from_secs(60));
        assert!(send_times(&log).is_empty());
        assert_eq!(timeout_at(&log, &key, TimerId::H), Some(ms(32_000)));
    }

    #[test]
    fn timer_i_is_zero_over_tcp() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKt", "TCP");
        let key = request_key(&recv(&mut t, base, tcp(3), inv.clone()));
        respond(
            &mut t,
            base,
            &key,
            inv.response(486, "Busy Here", Some("u")),
        );
        let out = recv(&mut t, base + ms(10), tcp(3), ack_for(&inv, "u"));
        assert!(matches!(&out[..], [Output::Terminated(k)] if *k == key));
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn timer_l_absorbs_invite_retransmissions_after_2xx() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKs", "UDP");
        let key = request_key(&recv(&mut t, base, udp(), inv.clone()));
        let ok = inv.response(200, "OK", Some("u"));
        assert_eq!(
            statuses(&respond(&mut t, base + ms(10), &key, ok.clone())),
            [200]
        );
        assert_eq!(t.state(&key), Some(State::Accepted));
        assert_eq!(t.poll_timeout(), Some(base + ms(32_010)));
        // the INVITE retransmission is absorbed: 2xx retransmission is the TU's job
        assert!(recv(&mut t, base + ms(500), udp(), inv.clone()).is_empty());
        // the TU retransmits its 2xx through the transaction
        assert_eq!(statuses(&respond(&mut t, base + ms(510), &key, ok)), [200]);
        // a non-2xx after the 2xx is refused and changes nothing
        let err = t
            .handle(
                base + ms(520),
                Input::SendResponse {
                    key: key.clone(),
                    msg: inv.response(486, "Busy", Some("u")),
                },
            )
            .unwrap_err();
        assert!(matches!(
            err,
            TxnError::State {
                state: State::Accepted,
                status: Some(486)
            }
        ));
        assert!(drain(&mut t).is_empty());
        assert_eq!(t.state(&key), Some(State::Accepted));
        // the ACK for the 2xx (new branch) goes to the TU unmatched...
        let ack2xx = ack_for(&req("INVITE", "z9hG4bKack", "UDP"), "u");
        let out = recv(&mut t, base + ms(600), udp(), ack2xx);
        assert!(matches!(
            &out[..],
            [Output::ToTu(Event::Ack { invite: None, .. })]
        ));
        // ...and one reusing the INVITE's branch is passed too, naming it
        let out = recv(&mut t, base + ms(700), udp(), ack_for(&inv, "u"));
        assert!(
            matches!(&out[..], [Output::ToTu(Event::Ack { invite: Some(k), .. })] if *k == key)
        );
        let log = run(&mut t, base, Duration::from_secs(60));
        assert!(matches!(&log[..], [(d, Output::Terminated(_))] if *d == ms(32_010)));
    }

    // ---- server non-INVITE ----

    #[test]
    fn server_non_invite_states_and_timer_j() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let opt = req("OPTIONS", "z9hG4bKn", "UDP");
        let key = request_key(&recv(&mut t, base, udp(), opt.clone()));
        assert_eq!(t.state(&key), Some(State::Trying));
        assert_eq!(t.poll_timeout(), None, "no 100 Trying for non-INVITE");
        // Trying: retransmission absorbed silently
        assert!(recv(&mut t, base + ms(500), udp(), opt.clone()).is_empty());
        // Proceeding: last provisional
        respond(
            &mut t,
            base + ms(600),
            &key,
            opt.response(100, "Trying", None),
        );
        assert_eq!(t.state(&key), Some(State::Proceeding));
        assert_eq!(
            statuses(&recv(&mut t, base + ms(700), udp(), opt.clone())),
            [100]
        );
        // Completed: the final
        respond(
            &mut t,
            base + ms(800),
            &key,
            opt.response(200, "OK", Some("u")),
        );
        assert_eq!(t.state(&key), Some(State::Completed));
        assert_eq!(
            statuses(&recv(&mut t, base + ms(900), udp(), opt.clone())),
            [200]
        );
        assert!(matches!(
            t.handle(
                base + ms(950),
                Input::SendResponse {
                    key: key.clone(),
                    msg: opt.response(500, "Oops", Some("u"))
                }
            ),
            Err(TxnError::State {
                state: State::Completed,
                ..
            })
        ));
        assert!(drain(&mut t).is_empty());
        let log = run(&mut t, base, Duration::from_secs(60));
        assert!(matches!(&log[..], [(d, Output::Terminated(_))] if *d == ms(32_800)));

        // over TCP, J is zero
        let opt = req("OPTIONS", "z9hG4bKt", "TCP");
        let key = request_key(&recv(&mut t, base, tcp(2), opt.clone()));
        let out = respond(&mut t, base, &key, opt.response(200, "OK", Some("u")));
        assert_eq!(statuses(&out), [200]);
        assert!(terminated(&out, &key));
        assert!(t.is_empty());
    }

    // ---- CANCEL ----

    #[test]
    fn cancel_matching_a_server_invite() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKs", "UDP");
        let ikey = request_key(&recv(&mut t, base, udp(), inv.clone()));
        respond(
            &mut t,
            base,
            &ikey,
            inv.response(180, "Ringing", Some("uas")),
        );
        let cancel = req("CANCEL", "z9hG4bKs", "UDP");
        let out = recv(&mut t, base + ms(100), udp(), cancel.clone());
        let ok = sent(&out);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].status(), Some(200));
        assert_eq!(ok[0].header(HeaderName::CSeq), Some("1 CANCEL"));
        assert_eq!(
            ok[0].to().unwrap().tag(),
            Some("uas"),
            "same To tag as the INVITE's responses"
        );
        let ckey = match &out[1] {
            Output::ToTu(Event::Cancelled { invite, cancel, .. }) => {
                assert_eq!(*invite, ikey);
                cancel.clone()
            }
            o => panic!("expected Cancelled, got {o:?}"),
        };
        assert_ne!(ckey, ikey);
        assert_eq!(t.state(&ckey), Some(State::Completed));
        // the TU answers the INVITE with 487
        let out = respond(
            &mut t,
            base + ms(110),
            &ikey,
            inv.response(487, "Request Terminated", Some("uas")),
        );
        assert_eq!(statuses(&out), [487]);
        // a CANCEL retransmission gets the 200 again, no new event
        let out = recv(&mut t, base + ms(600), udp(), cancel.clone());
        assert_eq!(statuses(&out), [200]);
        assert_eq!(out.len(), 1);

        // a CANCEL after the final: 200 but nothing for the TU
        let mut t = TxnTable::new(Timers::default());
        let ikey = request_key(&recv(&mut t, base, udp(), inv.clone()));
        respond(&mut t, base, &ikey, inv.response(486, "Busy", Some("uas")));
        let out = recv(&mut t, base + ms(100), udp(), cancel.clone());
        assert_eq!(statuses(&out), [200]);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn unmatched_cancel_gets_481_or_reaches_the_tu() {
        let base = t0();
        let cancel = req("CANCEL", "z9hG4bKnone", "UDP");
        let mut t = TxnTable::new(Timers::default());
        let out = recv(&mut t, base, udp(), cancel.clone());
        assert_eq!(statuses(&out), [481]);
        assert!(sent(&out)[0].to().unwrap().tag().is_some());

        let mut t = TxnTable::with_config(Config {
            answer_unmatched_cancel: false,
            ..Config::default()
        });
        let out = recv(&mut t, base, udp(), cancel);
        let key = request_key(&out);
        assert_eq!(key.method(), &Method::Cancel);
        assert!(sent(&out).is_empty());
    }

    #[test]
    fn client_cancel_and_timer_c() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKc", "UDP");
        let ikey = TxnKey::client(&inv).unwrap();
        send_req(&mut t, base, udp(), inv.clone());
        // §9.1: not before a provisional
        assert!(matches!(
            t.cancel(&ikey),
            Err(TxnError::State {
                state: State::Calling,
                ..
            })
        ));
        recv(
            &mut t,
            base + ms(100),
            udp(),
            inv.response(180, "Ringing", Some("u")),
        );
        let (flow, cancel) = t.cancel(&ikey).unwrap();
        assert_eq!(flow, udp());
        assert_eq!(cancel.top_via().unwrap().branch(), Some("z9hG4bKc"));
        assert_eq!(cancel.header(HeaderName::CSeq), Some("1 CANCEL"));
        let ckey = TxnKey::client(&cancel).unwrap();
        assert_eq!(ckey, ikey.with_method(Method::Cancel));
        let out = send_req(&mut t, base + ms(1_000), flow, cancel.clone());
        assert_eq!(sent(&out), [&cancel]);
        // the 200 for the CANCEL finds the CANCEL transaction
        let out = recv(
            &mut t,
            base + ms(1_100),
            udp(),
            cancel.response(200, "OK", Some("u")),
        );
        assert!(matches!(&out[..], [Output::ToTu(Event::Response { key, .. })] if *key == ckey));
        // a later provisional does not push Timer C back after a CANCEL
        recv(
            &mut t,
            base + ms(2_000),
            udp(),
            inv.response(183, "Progress", Some("u")),
        );
        // no 487 ever comes: the INVITE is given up 64*T1 after the CANCEL
        let log = run(&mut t, base, Duration::from_secs(60));
        assert_eq!(timeout_at(&log, &ikey, TimerId::C), Some(ms(33_000)));
        assert_eq!(t.state(&ikey), None);
    }

    #[test]
    fn timer_c_bounds_proceeding_and_resets_on_provisionals() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKc", "UDP");
        let key = TxnKey::client(&inv).unwrap();
        send_req(&mut t, base, udp(), inv.clone());
        recv(
            &mut t,
            base + ms(100),
            udp(),
            inv.response(100, "Trying", None),
        );
        recv(
            &mut t,
            base + ms(10_000),
            udp(),
            inv.response(180, "Ringing", Some("u")),
        );
        let c = Timers::default().c;
        assert_eq!(t.poll_timeout(), Some(base + ms(10_000) + c));
        let log = run(&mut t, base, Duration::from_secs(600));
        assert_eq!(timeout_at(&log, &key, TimerId::C), Some(ms(10_000) + c));
    }

    // ---- matching edge cases ----

    #[test]
    fn merged_request_gets_482() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let first = req("INVITE", "z9hG4bK1", "UDP");
        request_key(&recv(&mut t, base, udp(), first));
        // the same request forked back to us along another path
        let other = req("INVITE", "z9hG4bK2", "UDP");
        let out = recv(&mut t, base + ms(10), udp(), other.clone());
        assert_eq!(statuses(&out), [482]);
        assert_eq!(out.len(), 1, "the TU never sees it");
        // its retransmission gets the 482 again
        assert_eq!(
            statuses(&recv(&mut t, base + ms(20), udp(), other.clone())),
            [482]
        );
        // and its ACK is absorbed
        assert!(recv(&mut t, base + ms(30), udp(), ack_for(&other, "x")).is_empty());

        let mut t = TxnTable::with_config(Config {
            detect_merged: false,
            ..Config::default()
        });
        recv(&mut t, base, udp(), req("INVITE", "z9hG4bK1", "UDP"));
        request_key(&recv(&mut t, base, udp(), other));
    }

    #[test]
    fn full_table_answers_503_and_refuses_tu_requests() {
        let base = t0();
        let mut t = TxnTable::with_config(Config {
            max_transactions: 1,
            ..Config::default()
        });
        request_key(&recv(&mut t, base, udp(), req("INVITE", "z9hG4bK1", "UDP")));
        let out = recv(
            &mut t,
            base,
            udp(),
            req_call("INVITE", "z9hG4bK2", "UDP", "call-2"),
        );
        assert_eq!(statuses(&out), [503]);
        assert_eq!(sent(&out)[0].header(HeaderName::RetryAfter), Some("5"));
        assert_eq!(out.len(), 1);
        assert_eq!(t.len(), 1);
        let err = t.handle(
            base,
            Input::SendRequest {
                flow: udp(),
                msg: req_call("OPTIONS", "z9hG4bK3", "UDP", "call-3"),
            },
        );
        assert_eq!(err, Err(TxnError::Full));
        assert!(drain(&mut t).is_empty());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn rfc2543_requests_are_matched_without_the_cookie() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "1234", "UDP");
        let key = request_key(&recv(&mut t, base, udp(), inv.clone()));
        assert!(matches!(key, TxnKey::Rfc2543(_)));
        // retransmission: absorbed (with an immediate 100), not a new request
        let out = recv(&mut t, base + ms(10), udp(), inv.clone());
        assert_eq!(statuses(&out), [100]);
        respond(
            &mut t,
            base + ms(20),
            &key,
            inv.response(486, "Busy", Some("u")),
        );
        // the ACK, with the To tag, matches the INVITE transaction
        assert!(recv(&mut t, base + ms(30), udp(), ack_for(&inv, "u")).is_empty());
        assert_eq!(t.state(&key), Some(State::Confirmed));
        // no branch at all is handled the same way
        let bare = req_call("OPTIONS", "", "UDP", "call-9");
        let key = request_key(&recv(&mut t, base, udp(), bare.clone()));
        assert!(recv(&mut t, base, udp(), bare.clone()).is_empty());
        let out = respond(&mut t, base, &key, bare.response(200, "OK", Some("u")));
        assert_eq!(statuses(&out), [200]);
    }

    #[test]
    fn stray_responses_and_acks_go_to_the_tu() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKzz", "UDP");
        let out = recv(&mut t, base, udp(), inv.response(200, "OK", Some("u")));
        assert!(matches!(
            &out[..],
            [Output::ToTu(Event::StrayResponse { .. })]
        ));
        let out = recv(&mut t, base, udp(), ack_for(&inv, "u"));
        assert!(matches!(
            &out[..],
            [Output::ToTu(Event::Ack { invite: None, .. })]
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn refused_inputs_leave_the_table_untouched() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKa", "UDP");
        send_req(&mut t, base, udp(), inv.clone());
        let before = t.poll_timeout();
        let ack = ack_for(&inv, "x");
        let cases = [
            (
                Input::SendRequest {
                    flow: udp(),
                    msg: ack,
                },
                TxnError::Ack,
            ),
            (
                Input::SendRequest {
                    flow: udp(),
                    msg: inv.clone(),
                },
                TxnError::Exists(TxnKey::client(&inv).unwrap()),
            ),
            (
                Input::SendRequest {
                    flow: udp(),
                    msg: inv.response(200, "OK", None),
                },
                TxnError::NotRequest,
            ),
            (
                Input::SendRequest {
                    flow: udp(),
                    msg: req("OPTIONS", "", "UDP"),
                },
                TxnError::NoBranch,
            ),
            (
                Input::SendResponse {
                    key: TxnKey::client(&inv).unwrap(),
                    msg: inv.response(200, "OK", None),
                },
                TxnError::NoTxn(TxnKey::client(&inv).unwrap()),
            ),
            (
                Input::TransportError {
                    key: TxnKey::client(&req("BYE", "z9hG4bKq", "UDP")).unwrap(),
                },
                TxnError::NoTxn(TxnKey::client(&req("BYE", "z9hG4bKq", "UDP")).unwrap()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(t.handle(base, input), Err(want));
            assert!(drain(&mut t).is_empty());
            assert_eq!(t.len(), 1);
            assert_eq!(t.poll_timeout(), before);
        }
        // a response whose CSeq method is not the server transaction's
        let opt = req("OPTIONS", "z9hG4bKs", "UDP");
        let key = request_key(&recv(&mut t, base, udp(), opt.clone()));
        let wrong = req("BYE", "z9hG4bKs", "UDP").response(200, "OK", None);
        assert_eq!(
            t.handle(
                base,
                Input::SendResponse {
                    key: key.clone(),
                    msg: wrong
                }
            ),
            Err(TxnError::Mismatch)
        );
        assert_eq!(
            t.handle(
                base,
                Input::SendResponse {
                    key: key.clone(),
                    msg: opt.clone()
                }
            ),
            Err(TxnError::NotResponse)
        );
        assert!(drain(&mut t).is_empty());
        assert_eq!(t.state(&key), Some(State::Trying));
    }

    #[test]
    fn transport_errors_end_transactions() {
        let base = t0();
        let mut t = TxnTable::new(Timers::default());
        let inv = req("INVITE", "z9hG4bKa", "UDP");
        let key = TxnKey::client(&inv).unwrap();
        send_req(&mut t, base, udp(), inv);
        t.handle(base, Input::TransportError { key: key.clone() })
            .unwrap();
        let out = drain(&mut t);
        assert!(
            matches!(&out[..], [Output::ToTu(Event::TransportError { key: k }), Output::Terminated(k2)] if *k == key && *k2 == key)
        );
        assert_eq!(t.poll_timeout(), None);

        // a failed connection takes down the transactions using it, in creation order
        let a = req("OPTIONS", "z9hG4bK1", "TCP");
        let b = req_call("INVITE", "z9hG4bK2", "TCP", "call-2");
        let c = req_call("OPTIONS", "z9hG4bK3", "TCP", "call-3");
        send_req(&mut t, base, tcp(7), a.clone());
        let bkey = request_key(&recv(&mut t, base, tcp(7), b));
        send_req(&mut t, base, tcp(8), c);
        t.handle(base, Input::FlowFailed { flow: tcp(7) }).unwrap();
        let errs: Vec<_> = drain(&mut t)
            .into_iter()
            .filter_map(|o| match o {
                Output::ToTu(Event::TransportError { key }) => Some(key),
                _ => None,
            })
            .collect();
        assert_eq!(errs, [TxnKey::client(&a).unwrap(), bkey]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn zero_t1_is_raised_so_retransmission_ends() {
        let base = t0();
        let mut t = TxnTable::new(Timers {
            t1: Duration::ZERO,
            t2: Duration::ZERO,
            ..Timers::default()
        });
        assert_eq!(t.config().timers.t1, ms(1));
        let opt = req("OPTIONS", "z9hG4bKo", "UDP");
        let key = TxnKey::client(&opt).unwrap();
        send_req(&mut t, base, udp(), opt);
        let log = run(&mut t, base, Duration::from_secs(1));
        assert_eq!(send_times(&log).len(), 63);
        assert_eq!(timeout_at(&log, &key, TimerId::F), Some(ms(64)));
    }

    #[test]
    fn generated_tags_depend_on_the_seed() {
        let k = TxnKey::client(&req("INVITE", "z9hG4bKa", "UDP")).unwrap();
        let a = TxnTable::new(Timers::default());
        let b = TxnTable::with_config(Config {
            tag_seed: 42,
            ..Config::default()
        });
        assert_eq!(a.local_tag(&k), a.local_tag(&k));
        assert_ne!(a.local_tag(&k), b.local_tag(&k));
        assert_eq!(a.local_tag(&k).len(), 16);
    }
}
