//! The replicated state machine behind the [`Store`]: registrations
//! (RFC 3261 §10, RFC 3327 Path, RFC 5626 flows), keyed by address-of-record
//! so the state can later be split into several Raft groups (DESIGN §7).
//!
//! Cores never write state directly: they build an [`Entry`] (a batch of
//! [`Command`]s carrying a [`ProposalId`]), hand it to the store with
//! [`Store::propose`], and act when the store reports the id committed.
//! [`State::apply_at`] is deterministic (it reads no clock: time comes from
//! [`Entry::at_unix`]) and idempotent twice over: an entry at a log index
//! already applied is skipped, so a replica that crashed can replay its log
//! over a state that already holds part of it; and an entry whose proposal
//! (its [`Origin`] and [`ProposalId`]) was already applied is skipped, so a
//! proposer may re-propose an entry whose commit it did not see (a proposal
//! forwarded to a leader that died) without it taking effect twice.
//!
//! ```text
//!   core ──propose(Entry{id,..})──▶ Store ──(Raft log / at once)──▶ State::apply
//!     ▲                                │
//!     └────── Committed(id) ◀──────────┘  (drained by the driver, matched by id)
//! ```
//!
//! Binding identity (RFC 3261 §10.3 step 7, RFC 5626 §6): a binding that
//! carries both `+sip.instance` and `reg-id` is keyed by that pair (a new flow
//! of the same instance and reg-id replaces the old one, whatever its Contact
//! URI); any other binding is keyed by its Contact URI, compared with the
//! RFC 3261 §19.1.4 rules ([`same_contact`]). An update from the same Call-ID
//! must carry a higher CSeq than the binding it changes, otherwise the whole
//! entry is rejected and leaves the state untouched.
//!
//! Calls (DESIGN §4, §5): [`Command::PutCall`] stores a confirmed B2BUA call
//! (both legs' dialog state, [`CallRecord`]) by its A-leg Call-ID, replacing
//! the previous version; [`Command::EndCall`] removes it and stores its
//! [`Cdr`]. A call with a CDR is never stored again. Call commands cannot be
//! refused; they are applied after the binding commands of their entry, so
//! an entry refused for a binding changes no call either.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sip::msg::{Host, SipUri, Uri};

/// A normalized address-of-record, `sip:user@domain` with the host lower-cased
/// (the registrar key of RFC 3261 §10.3, built by [`SipUri::aor`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Aor(String);

impl Aor {
    /// The AOR of a SIP or SIPS URI (scheme and host lower-cased, no port,
    /// parameters or headers).
    pub fn from_uri(uri: &SipUri<'_>) -> Aor {
        Aor(uri.aor())
    }

    /// Parses a URI text and takes its AOR; `None` unless it is a SIP or SIPS URI.
    pub fn parse(uri: &str) -> Option<Aor> {
        match Uri::parse(uri).ok()? {
            Uri::Sip(u) => Some(Aor::from_uri(&u)),
            _ => None,
        }
    }

    /// The AOR text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Aor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id a core gives an [`Entry`], returned by the store once the entry is
/// committed. Ids increase in the order entries are applied (see
/// [`State::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProposalId(pub u64);

impl fmt::Display for ProposalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// One registered contact of an AOR (RFC 3261 §10.3 step 7, RFC 3327 §5.3,
/// RFC 5626 §6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The Contact URI as registered, URI parameters kept (header parameters
    /// such as `expires`, `q`, `+sip.instance` are the fields below).
    pub contact: String,
    /// Unix second at which the binding expires.
    pub expires_at_unix: u64,
    /// The `q` value times 1000 (0..=1000), when given.
    pub q: Option<u16>,
    /// Call-ID of the REGISTER that wrote the binding.
    pub call_id: String,
    /// CSeq number of the REGISTER that wrote the binding.
    pub cseq: u32,
    /// The Path header values of that REGISTER, top first (RFC 3327).
    pub path: Vec<String>,
    /// The `+sip.instance` value, quotes removed (RFC 5626 §4.1).
    pub instance: Option<String>,
    /// The `reg-id` value (RFC 5626 §4.2), only kept when outbound applies.
    pub reg_id: Option<u32>,
    /// Where the REGISTER came from, `transport:address:port`
    /// (e.g. `udp:127.0.0.1:5062`), to reach the contact without Path.
    pub received: Option<String>,
    /// The node that accepted the REGISTER.
    pub node: String,
}

impl Binding {
    /// A binding as a plain REGISTER makes it: no q, Path, instance, flow or
    /// `received` address.
    pub fn plain(
        contact: impl Into<String>,
        expires_at_unix: u64,
        call_id: impl Into<String>,
        cseq: u32,
        node: impl Into<String>,
    ) -> Binding {
        Binding {
            contact: contact.into(),
            expires_at_unix,
            q: None,
            call_id: call_id.into(),
            cseq,
            path: vec![],
            instance: None,
            reg_id: None,
            received: None,
            node: node.into(),
        }
    }

    /// True when this binding is keyed by instance and reg-id (RFC 5626 §6).
    pub fn is_flow(&self) -> bool {
        self.instance.is_some() && self.reg_id.is_some()
    }

    /// True when a registration of (`contact`, `instance`, `reg_id`) refers to
    /// this binding: same instance and reg-id for RFC 5626 flows, else an
    /// equivalent Contact URI (RFC 3261 §10.3 step 7, §19.1.4).
    pub fn matches(&self, contact: &str, instance: Option<&str>, reg_id: Option<u32>) -> bool {
        match (instance, reg_id) {
            (Some(i), Some(r)) => {
                self.is_flow() && self.instance.as_deref() == Some(i) && self.reg_id == Some(r)
            }
            _ => !self.is_flow() && same_contact(&self.contact, contact),
        }
    }

    /// Seconds left at `now_unix` (0 once expired).
    pub fn remaining(&self, now_unix: u64) -> u64 {
        self.expires_at_unix.saturating_sub(now_unix)
    }

    /// The q value used for ordering: an absent q counts as 1.0.
    pub fn q_or_default(&self) -> u16 {
        self.q.unwrap_or(1000)
    }
}

/// The Call-ID and CSeq of the REGISTER a removal comes from, for the
/// RFC 3261 §10.3 step 7 ordering rule. Removals made by an operator carry none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSeq {
    /// Call-ID of the REGISTER.
    pub call_id: String,
    /// CSeq number of the REGISTER.
    pub cseq: u32,
}

/// A change to the replicated state. Every command of an [`Entry`] is applied,
/// or none is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds the binding, or replaces the one it matches ([`Binding::matches`]).
    UpsertBinding {
        /// The address-of-record.
        aor: Aor,
        /// The new binding (its Call-ID and CSeq are checked against the old).
        binding: Binding,
    },
    /// Removes the binding matching `contact` / `instance` + `reg_id`, if any.
    RemoveBinding {
        /// The address-of-record.
        aor: Aor,
        /// The Contact URI as sent in the removing REGISTER.
        contact: String,
        /// Its `+sip.instance`, when present.
        instance: Option<String>,
        /// Its `reg-id`, when outbound applies.
        reg_id: Option<u32>,
        /// The REGISTER's Call-ID and CSeq, checked against the binding's.
        seq: Option<RequestSeq>,
    },
    /// Removes every binding of the AOR (`Contact: *`, RFC 3261 §10.3 step 6).
    ClearAor {
        /// The address-of-record.
        aor: Aor,
        /// The REGISTER's Call-ID and CSeq, checked against every binding's.
        seq: Option<RequestSeq>,
    },
    /// Drops every binding expired at `now_unix` (proposed periodically by
    /// the leader, so that all replicas drop the same bindings). Applied after
    /// the other commands of its entry.
    Expire {
        /// Bindings with `expires_at_unix <= now_unix` go.
        now_unix: u64,
    },
    /// Stores (or replaces) a confirmed call, keyed by its A-leg Call-ID.
    /// Ignored when that call already has a CDR: an ended call never comes
    /// back.
    PutCall {
        /// Both legs' dialog state and the owner (boxed: far larger than
        /// the other commands).
        call: Box<CallRecord>,
    },
    /// Ends a call: removes it from the active calls (if it was there) and
    /// stores its CDR (replacing one with the same Call-ID).
    EndCall {
        /// The A-leg Call-ID.
        call_id: String,
        /// The call detail record.
        cdr: Cdr,
    },
    /// Moves a call from node `from` to node `to` (DESIGN §5, call takeover).
    /// Applied only while `from` still owns it: a reassignment planned on
    /// stale state changes nothing.
    Reassign {
        /// The A-leg Call-ID.
        call_id: String,
        /// The owner the proposer saw.
        from: String,
        /// The new owner.
        to: String,
    },
    /// Adds or replaces a directory user (HA1 values only, never a
    /// password).
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
    /// Records (or updates) a member of the region under its Raft id.
    PutMember {
        /// The member's Raft id.
        raft_id: u64,
        /// What it is.
        member: MemberRecord,
    },
}

/// A member of the region as the replicated state knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The node id (`a1`), the name call owners are recorded under.
    pub name: String,
    /// The zone label.
    pub zone: String,
    /// True for a witness (a voter that serves no SIP and owns no call).
    pub witness: bool,
    /// Its Raft listener, so every replica can reach it after a restart.
    #[serde(default)]
    pub raft_addr: Option<std::net::SocketAddr>,
}

impl Command {
    /// The AOR this command changes (`None` for [`Command::Expire`]).
    pub fn aor(&self) -> Option<&Aor> {
        match self {
            Command::UpsertBinding { aor, .. }
            | Command::RemoveBinding { aor, .. }
            | Command::ClearAor { aor, .. } => Some(aor),
            Command::Expire { .. }
            | Command::PutCall { .. }
            | Command::EndCall { .. }
            | Command::Reassign { .. }
            | Command::PutUser { .. }
            | Command::RemoveUser { .. }
            | Command::PutMember { .. } => None,
        }
    }
}

/// One leg of a call as a B2BUA holds it: the RFC 3261 §12 dialog state as
/// plain data, so another node can continue the dialog (DESIGN §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegRecord {
    /// The Call-ID of this leg.
    pub call_id: String,
    /// Our tag on this leg.
    pub local_tag: String,
    /// The peer's tag on this leg.
    pub remote_tag: String,
    /// Our address as it goes in From of our requests (tag included).
    pub local: String,
    /// The peer's address as it goes in To of our requests (tag included).
    pub remote: String,
    /// The CSeq number of our last request on this leg.
    pub local_seq: u32,
    /// The CSeq number of the peer's last request, once one was seen.
    pub remote_seq: Option<u32>,
    /// The peer's Contact URI: the Request-URI of our requests.
    pub remote_target: String,
    /// Route set, in the order our requests carry it.
    pub route_set: Vec<String>,
    /// True for a SIPS dialog.
    pub secure: bool,
    /// Where the peer's requests came from, `transport:address:port` (as in
    /// [`Binding::received`]), to reach it when the route set is empty.
    pub received: Option<String>,
    /// The Path of the binding this leg was set up through, top first.
    pub path: Vec<String>,
    /// The RFC 4028 session timer of this leg, when one runs on it: a node
    /// that takes the call over keeps refreshing (or policing) it.
    #[serde(default)]
    pub session_timer: Option<SessionTimer>,
}

/// The negotiated RFC 4028 session timer of one leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTimer {
    /// The session interval (Session-Expires), seconds.
    pub interval_secs: u32,
    /// Who sends the refreshes on this leg.
    pub refresher: Refresher,
}

/// The side that refreshes a leg's session (RFC 4028 §7, §9); the UAC/UAS
/// names of the RFC change with every transaction, so the record names the
/// party.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refresher {
    /// The B2BUA (the node owning the call) refreshes at half the interval.
    B2bua,
    /// The far end refreshes; the B2BUA ends the call when it does not.
    Peer,
}

/// A confirmed B2BUA call (both legs), keyed by its A-leg Call-ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The A-leg Call-ID (the key).
    pub call_id: String,
    /// The node acting for the call; only a Raft entry moves it (DESIGN §5).
    pub owner: String,
    /// The caller (A's From URI).
    pub caller: String,
    /// The callee's address-of-record.
    pub callee: String,
    /// The caller's leg (we are its UAS).
    pub a: LegRecord,
    /// The callee's leg (we are its UAC).
    pub b: LegRecord,
    /// Unix milliseconds at which the INVITE arrived.
    pub start_unix_ms: u64,
    /// Unix milliseconds at which the callee answered.
    pub answer_unix_ms: u64,
}

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// The caller sent BYE.
    CallerHangup,
    /// The callee sent BYE.
    CalleeHangup,
    /// The caller cancelled before the answer.
    Cancelled,
    /// Every fork failed; `code` was relayed to the caller.
    Rejected {
        /// The final status sent to the caller.
        code: u16,
    },
    /// The caller never acknowledged the 2xx (RFC 3261 §13.3.1.4).
    AckTimeout,
    /// A session refresh of the B2BUA failed (RFC 4028 §10): 408 or 481,
    /// or 408 when it got no answer at all.
    RefreshFailed {
        /// The final status of the refresh.
        code: u16,
    },
    /// A far end that was the refresher let the session interval pass
    /// without a refresh (RFC 4028 §10).
    SessionExpired,
}

/// A call detail record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cdr {
    /// The A-leg Call-ID.
    pub call_id: String,
    /// The caller (A's From URI).
    pub caller: String,
    /// The callee's address-of-record.
    pub callee: String,
    /// The node that handled the call last.
    pub owner: String,
    /// Unix milliseconds at which the INVITE arrived.
    pub start_unix_ms: u64,
    /// Unix milliseconds at which the callee answered, if it did.
    pub answer_unix_ms: Option<u64>,
    /// Unix milliseconds at which the call ended.
    pub end_unix_ms: u64,
    /// Answered time in milliseconds (0 when unanswered).
    pub duration_ms: u64,
    /// Why it ended.
    pub reason: EndReason,
}

/// Who proposed an entry: the Raft id of the replica and a nonce it draws at
/// each start, so a restarted node may number its proposals from 1 again
/// without its new ids being taken for the old ones.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Origin {
    /// The proposer's Raft id (0 for the single-node store).
    pub node: u64,
    /// The proposer's start nonce.
    pub boot: u64,
}

impl Origin {
    /// The origin of the single-node [`MemStore`].
    pub const LOCAL: Origin = Origin { node: 0, boot: 0 };
}

/// How many recent proposal ids per origin are remembered for de-duplication
/// (a re-proposal older than this is taken as already applied). The ids of
/// one origin must therefore come from one increasing sequence: an id far
/// below the highest seen counts as applied.
pub const DEDUP_WINDOW: u64 = 16_384;
/// How many starts (boots) per node keep their de-duplication window.
const BOOTS_KEPT: usize = 4;

/// The proposal ids of one origin applied recently: a ring of
/// [`DEDUP_WINDOW`] bits below the highest id seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// The proposer's start nonce.
    boot: u64,
    /// The highest id applied.
    high: u64,
    /// Bit `id % DEDUP_WINDOW` is set when `id` (within the window) was applied.
    bits: Vec<u64>,
}

impl Seen {
    fn new(boot: u64) -> Seen {
        Seen {
            boot,
            high: 0,
            bits: vec![0; (DEDUP_WINDOW / 64) as usize],
        }
    }

    /// Marks `id` applied; false when it already was (or is below the window).
    fn mark(&mut self, id: u64) -> bool {
        if self.high >= DEDUP_WINDOW && id <= self.high - DEDUP_WINDOW {
            return false;
        }
        let bit = |i: u64| (((i % DEDUP_WINDOW) / 64) as usize, 1u64 << (i % 64));
        if id > self.high {
            if id - self.high >= DEDUP_WINDOW {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for i in self.high + 1..=id {
                    let (w, b) = bit(i);
                    self.bits[w] &= !b;
                }
            }
            self.high = id;
        }
        let (w, b) = bit(id);
        if self.bits[w] & b != 0 {
            return false;
        }
        self.bits[w] |= b;
        true
    }
}

/// A key of the applied state, as the persistent copy of it (the replica's
/// state database) stores it: what [`State::take_dirty`] reports changed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// The bindings of an AOR.
    Bindings(Aor),
    /// An active call, by A-leg Call-ID.
    Call(String),
    /// A CDR, by A-leg Call-ID.
    Cdr(String),
    /// The de-duplication windows of a proposer node.
    Seen(u64),
    /// A member, by Raft id.
    Member(u64),
    /// A directory user, by name.
    User(String),
}

/// A batch of commands from one request, applied atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The proposer's id, reported back on commit.
    pub id: ProposalId,
    /// Unix second at which the proposer built the entry: the "now" of apply.
    pub at_unix: u64,
    /// The commands, in order.
    pub cmds: Vec<Command>,
}

/// Why [`State::apply`] refused an entry (deterministically: every replica
/// refuses it alike).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// RFC 3261 §10.3 step 7: a binding written from the same Call-ID already
    /// has this CSeq or a higher one.
    #[error("out-of-order CSeq {cseq} for Call-ID {call_id} on {aor}")]
    OutOfOrder {
        /// The address-of-record.
        aor: Aor,
        /// The shared Call-ID.
        call_id: String,
        /// The CSeq of the refused command.
        cseq: u32,
    },
}

/// What [`State::apply`] did with an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The entry was applied.
    Done {
        /// Bindings added or replaced.
        upserted: usize,
        /// Bindings removed (expired ones included).
        removed: usize,
    },
    /// The id was already applied: nothing changed.
    Duplicate,
    /// The entry was refused as a whole: no binding changed (its id counts as
    /// applied).
    Rejected(ApplyError),
}

/// The applied state: bindings per AOR, calls, CDRs, the log index of the
/// last applied entry and the recent proposal ids of every proposer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Bindings per AOR, in registration order (never empty vectors).
    bindings: BTreeMap<Aor, Vec<Binding>>,
    /// Total number of bindings, expired ones not yet dropped included.
    count: usize,
    /// The log index of the last applied entry (0: none, or no log).
    applied_index: u64,
    /// Recently applied proposal ids by proposer node, newest boot last.
    seen: BTreeMap<u64, Vec<Seen>>,
    /// Confirmed calls by A-leg Call-ID.
    calls: BTreeMap<String, CallRecord>,
    /// CDRs of ended calls by A-leg Call-ID (no retention bound yet).
    cdrs: BTreeMap<String, Cdr>,
    /// Members of the region by Raft id.
    #[serde(default)]
    members: BTreeMap<u64, MemberRecord>,
    /// Directory users by name (they add to, and override, the users of
    /// each node's configuration).
    #[serde(default)]
    users: BTreeMap<String, crate::directory::User>,
    /// Bumped at every change of `users`, so a driver sees when to reload.
    #[serde(default)]
    users_version: u64,
    /// Keys changed since the last [`State::take_dirty`], when tracked.
    #[serde(skip)]
    dirty: Option<std::collections::BTreeSet<Key>>,
}

impl State {
    /// An empty state.
    pub fn new() -> State {
        State::default()
    }

    /// The log index of the last applied entry (0 before any, and always 0
    /// for the single-node store, which has no log).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Starts (or stops) recording the keys each apply changes, for
    /// [`State::take_dirty`].
    pub fn track_dirty(&mut self, on: bool) {
        self.dirty = on.then(Default::default);
    }

    /// The keys changed since the last call (empty when not tracked).
    pub fn take_dirty(&mut self) -> Vec<Key> {
        self.dirty
            .as_mut()
            .map(|d| std::mem::take(d).into_iter().collect())
            .unwrap_or_default()
    }

    fn touch(&mut self, key: impl FnOnce() -> Key) {
        if let Some(d) = self.dirty.as_mut() {
            d.insert(key());
        }
    }

    /// Applies `entry` as the single-node store does: no log index, origin
    /// [`Origin::LOCAL`]. See [`State::apply_at`].
    pub fn apply(&mut self, entry: &Entry) -> Applied {
        self.apply_at(0, Origin::LOCAL, entry)
    }

    /// Applies `entry`, found at log index `index` (0: not from a log) and
    /// proposed by `origin`. An index at or below the last applied one, or a
    /// proposal (origin and id) already applied, is a no-op
    /// ([`Applied::Duplicate`]). Entries must come in log order.
    pub fn apply_at(&mut self, index: u64, origin: Origin, entry: &Entry) -> Applied {
        if index != 0 {
            if index <= self.applied_index {
                return Applied::Duplicate;
            }
            self.applied_index = index;
        }
        if !self.mark_seen(origin, entry.id) {
            return Applied::Duplicate;
        }
        // Work on copies of the touched AORs so a refused entry changes nothing.
        let mut work: BTreeMap<Aor, Vec<Binding>> = BTreeMap::new();
        let mut upserted = 0;
        let mut removed = 0;
        let mut expire_at = None;
        let mut call_cmds = Vec::new();
        for cmd in &entry.cmds {
            let Some(aor) = cmd.aor() else {
                match cmd {
                    Command::Expire { now_unix } => {
                        expire_at = Some(expire_at.map_or(*now_unix, |t: u64| t.max(*now_unix)));
                    }
                    // Call commands cannot fail: applied once the binding
                    // commands of the entry are known to succeed.
                    _ => call_cmds.push(cmd),
                }
                continue;
            };
            let list = work.entry(aor.clone()).or_insert_with(|| {
                let mut v = self.bindings.get(aor).cloned().unwrap_or_default();
                let before = v.len();
                v.retain(|b| b.expires_at_unix > entry.at_unix);
                removed += before - v.len();
                v
            });
            match apply_command(list, cmd) {
                Ok((u, r)) => {
                    upserted += u;
                    removed += r;
                }
                Err(e) => return Applied::Rejected(e),
            }
        }
        for (aor, list) in work {
            self.touch(|| Key::Bindings(aor.clone()));
            let old = self.bindings.get(&aor).map_or(0, Vec::len);
            self.count = self.count - old + list.len();
            if list.is_empty() {
                self.bindings.remove(&aor);
            } else {
                self.bindings.insert(aor, list);
            }
        }
        if let Some(now) = expire_at {
            removed += self.expire(now);
        }
        for cmd in call_cmds {
            self.apply_call(cmd);
        }
        Applied::Done { upserted, removed }
    }

    /// Records that `origin` applied proposal `id`; false if it already had.
    fn mark_seen(&mut self, origin: Origin, id: ProposalId) -> bool {
        let boots = self.seen.entry(origin.node).or_default();
        let i = match boots.iter().position(|s| s.boot == origin.boot) {
            Some(i) => i,
            None => {
                if boots.len() == BOOTS_KEPT {
                    boots.remove(0);
                }
                boots.push(Seen::new(origin.boot));
                boots.len() - 1
            }
        };
        let fresh = boots[i].mark(id.0);
        if fresh {
            self.touch(|| Key::Seen(origin.node));
        }
        fresh
    }

    fn apply_call(&mut self, cmd: &Command) {
        match cmd {
            // Fencing: only the owner updates a call; a node that lost it
            // (reassigned while it was cut off) cannot take it back.
            Command::PutCall { call }
                if !self.cdrs.contains_key(&call.call_id)
                    && self
                        .calls
                        .get(&call.call_id)
                        .is_none_or(|c| c.owner == call.owner) =>
            {
                self.touch(|| Key::Call(call.call_id.clone()));
                self.calls.insert(call.call_id.clone(), (**call).clone());
            }
            Command::Reassign { call_id, from, to } => {
                if let Some(c) = self.calls.get_mut(call_id)
                    && c.owner == *from
                {
                    c.owner = to.clone();
                    self.touch(|| Key::Call(call_id.clone()));
                }
            }
            Command::PutUser { name, user } => {
                self.users.insert(name.clone(), user.clone());
                self.users_version += 1;
                self.touch(|| Key::User(name.clone()));
            }
            Command::RemoveUser { name } if self.users.remove(name).is_some() => {
                self.users_version += 1;
                self.touch(|| Key::User(name.clone()));
            }
            Command::PutMember { raft_id, member } if self.members.get(raft_id) != Some(member) => {
                self.members.insert(*raft_id, member.clone());
                self.touch(|| Key::Member(*raft_id));
            }
            Command::EndCall { call_id, cdr } => {
                self.touch(|| Key::Call(call_id.clone()));
                self.touch(|| Key::Cdr(call_id.clone()));
                self.calls.remove(call_id);
                self.cdrs.insert(call_id.clone(), cdr.clone());
            }
            _ => {}
        }
    }

    /// The stored value of `key` as JSON (`None`: the key is absent), for
    /// the replica's state database.
    pub fn export(&self, key: &Key) -> Option<Vec<u8>> {
        let json = match key {
            Key::Bindings(a) => self.bindings.get(a).map(serde_json::to_vec),
            Key::Call(id) => self.calls.get(id).map(serde_json::to_vec),
            Key::Cdr(id) => self.cdrs.get(id).map(serde_json::to_vec),
            Key::Seen(n) => self.seen.get(n).map(serde_json::to_vec),
            Key::Member(n) => self.members.get(n).map(serde_json::to_vec),
            Key::User(n) => self.users.get(n).map(serde_json::to_vec),
        };
        // Serializing these plain data types cannot fail.
        json.and_then(Result::ok)
    }

    /// Sets `key` from a value [`State::export`] produced (used when loading
    /// the state database); a value that does not decode is an error.
    pub fn import(&mut self, key: Key, value: &[u8]) -> Result<(), serde_json::Error> {
        match key {
            Key::Bindings(a) => {
                let list: Vec<Binding> = serde_json::from_slice(value)?;
                let old = self.bindings.get(&a).map_or(0, Vec::len);
                self.count = self.count - old + list.len();
                self.bindings.insert(a, list);
            }
            Key::Call(id) => {
                self.calls.insert(id, serde_json::from_slice(value)?);
            }
            Key::Cdr(id) => {
                self.cdrs.insert(id, serde_json::from_slice(value)?);
            }
            Key::Seen(n) => {
                self.seen.insert(n, serde_json::from_slice(value)?);
            }
            Key::Member(n) => {
                self.members.insert(n, serde_json::from_slice(value)?);
            }
            Key::User(n) => {
                self.users.insert(n, serde_json::from_slice(value)?);
                self.users_version += 1;
            }
        }
        Ok(())
    }

    /// Every key the state holds (for writing it whole).
    pub fn keys(&self) -> Vec<Key> {
        let b = self.bindings.keys().map(|a| Key::Bindings(a.clone()));
        let c = self.calls.keys().map(|id| Key::Call(id.clone()));
        let d = self.cdrs.keys().map(|id| Key::Cdr(id.clone()));
        let s = self.seen.keys().map(|n| Key::Seen(*n));
        let m = self.members.keys().map(|n| Key::Member(*n));
        let u = self.users.keys().map(|n| Key::User(n.clone()));
        b.chain(c).chain(d).chain(s).chain(m).chain(u).collect()
    }

    /// Sets the log index of the last applied entry (when loading the state
    /// database or installing a snapshot).
    pub fn set_applied_index(&mut self, index: u64) {
        self.applied_index = index;
    }

    /// Directory users by name, and a version bumped at each change.
    pub fn users(&self) -> (&BTreeMap<String, crate::directory::User>, u64) {
        (&self.users, self.users_version)
    }

    /// The members of the region by Raft id.
    pub fn members(&self) -> &BTreeMap<u64, MemberRecord> {
        &self.members
    }

    /// The active call with A-leg Call-ID `call_id`.
    pub fn call(&self, call_id: &str) -> Option<&CallRecord> {
        self.calls.get(call_id)
    }

    /// Every active call, by A-leg Call-ID.
    pub fn calls(&self) -> impl Iterator<Item = &CallRecord> {
        self.calls.values()
    }

    /// Number of active calls.
    pub fn call_count(&self) -> usize {
        self.calls.len()
    }

    /// The CDR of the ended call with A-leg Call-ID `call_id`.
    pub fn cdr(&self, call_id: &str) -> Option<&Cdr> {
        self.cdrs.get(call_id)
    }

    /// Every stored CDR, by A-leg Call-ID.
    pub fn cdrs(&self) -> impl Iterator<Item = &Cdr> {
        self.cdrs.values()
    }

    /// The result of applying `cmds` to `aor`'s bindings at `at_unix`, without
    /// changing the state (commands for other AORs are skipped). Cores use it
    /// to check a request before proposing it.
    pub fn preview(
        &self,
        aor: &Aor,
        at_unix: u64,
        cmds: &[Command],
    ) -> Result<Vec<Binding>, ApplyError> {
        let mut list: Vec<Binding> = self
            .bindings
            .get(aor)
            .map(|v| {
                v.iter()
                    .filter(|b| b.expires_at_unix > at_unix)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for cmd in cmds.iter().filter(|c| c.aor() == Some(aor)) {
            apply_command(&mut list, cmd)?;
        }
        Ok(list)
    }

    /// The bindings of `aor` unexpired at `now_unix`, by q descending (an
    /// absent q counts as 1.0), then in registration order.
    pub fn bindings(&self, aor: &Aor, now_unix: u64) -> Vec<&Binding> {
        let mut out: Vec<&Binding> = self
            .bindings
            .get(aor)
            .map(|v| v.iter().filter(|b| b.expires_at_unix > now_unix).collect())
            .unwrap_or_default();
        out.sort_by_key(|b| std::cmp::Reverse(b.q_or_default()));
        out
    }

    /// True when some stored binding is expired at `now_unix`.
    pub fn has_expired(&self, now_unix: u64) -> bool {
        self.bindings
            .values()
            .flatten()
            .any(|b| b.expires_at_unix <= now_unix)
    }

    /// Number of stored bindings, expired ones not yet dropped included.
    pub fn binding_count(&self) -> usize {
        self.count
    }

    /// Number of AORs with at least one stored binding.
    pub fn aor_count(&self) -> usize {
        self.bindings.len()
    }

    /// Drops every binding expired at `now_unix`; returns how many went.
    ///
    /// Local housekeeping for the in-memory store; a replicated store proposes
    /// [`Command::Expire`] instead so every replica drops the same bindings.
    pub fn expire(&mut self, now_unix: u64) -> usize {
        let mut gone = 0;
        let dirty = &mut self.dirty;
        self.bindings.retain(|aor, list| {
            let before = list.len();
            list.retain(|b| b.expires_at_unix > now_unix);
            if list.len() != before
                && let Some(d) = dirty.as_mut()
            {
                d.insert(Key::Bindings(aor.clone()));
            }
            gone += before - list.len();
            !list.is_empty()
        });
        self.count -= gone;
        gone
    }
}

/// Refuses a change to `b` from the same Call-ID without a higher CSeq.
fn check_order(aor: &Aor, b: &Binding, call_id: &str, cseq: u32) -> Result<(), ApplyError> {
    if b.call_id == call_id && cseq <= b.cseq {
        return Err(ApplyError::OutOfOrder {
            aor: aor.clone(),
            call_id: call_id.to_owned(),
            cseq,
        });
    }
    Ok(())
}

/// Applies one AOR command to `list`; returns (upserted, removed). On error
/// `list` may be half changed: callers work on a copy.
fn apply_command(list: &mut Vec<Binding>, cmd: &Command) -> Result<(usize, usize), ApplyError> {
    match cmd {
        Command::UpsertBinding { aor, binding } => {
            let (contact, instance, reg_id) = (
                binding.contact.as_str(),
                binding.instance.as_deref(),
                binding.reg_id,
            );
            let reg_id = if instance.is_some() { reg_id } else { None };
            for b in list.iter().filter(|b| b.matches(contact, instance, reg_id)) {
                check_order(aor, b, &binding.call_id, binding.cseq)?;
            }
            match list
                .iter()
                .position(|b| b.matches(contact, instance, reg_id))
            {
                Some(i) => {
                    list[i] = binding.clone();
                    let mut n = 0;
                    let mut extra = 0;
                    list.retain(|b| {
                        let keep = n <= i || !b.matches(contact, instance, reg_id);
                        n += 1;
                        extra += usize::from(!keep);
                        keep
                    });
                    Ok((1, extra))
                }
                None => {
                    list.push(binding.clone());
                    Ok((1, 0))
                }
            }
        }
        Command::RemoveBinding {
            aor,
            contact,
            instance,
            reg_id,
            seq,
        } => {
            let reg_id = if instance.is_some() { *reg_id } else { None };
            let hit = |b: &Binding| b.matches(contact, instance.as_deref(), reg_id);
            if let Some(s) = seq {
                for b in list.iter().filter(|b| hit(b)) {
                    check_order(aor, b, &s.call_id, s.cseq)?;
                }
            }
            let before = list.len();
            list.retain(|b| !hit(b));
            Ok((0, before - list.len()))
        }
        Command::ClearAor { aor, seq } => {
            if let Some(s) = seq {
                for b in list.iter() {
                    check_order(aor, b, &s.call_id, s.cseq)?;
                }
            }
            let n = list.len();
            list.clear();
            Ok((0, n))
        }
        Command::Expire { .. }
        | Command::PutCall { .. }
        | Command::EndCall { .. }
        | Command::Reassign { .. }
        | Command::PutUser { .. }
        | Command::RemoveUser { .. }
        | Command::PutMember { .. } => Ok((0, 0)),
    }
}

/// URI parameters that must match when present in either URI (RFC 3261 §19.1.4).
const STRICT_PARAMS: [&str; 5] = ["user", "ttl", "method", "maddr", "transport"];

/// True when two Contact URIs are equivalent under RFC 3261 §19.1.4: scheme,
/// user and password (escapes decoded, case-sensitive), host (case-insensitive)
/// and port equal; `user`, `ttl`, `method`, `maddr`, `transport` equal when in
/// either; other parameters equal when in both; headers equal. Non-SIP URIs
/// compare as text with a case-insensitive scheme.
pub fn same_contact(a: &str, b: &str) -> bool {
    match (Uri::parse(a), Uri::parse(b)) {
        (Ok(Uri::Sip(x)), Ok(Uri::Sip(y))) => same_sip_uri(&x, &y),
        _ => match (a.split_once(':'), b.split_once(':')) {
            (Some((sa, ra)), Some((sb, rb))) => sa.eq_ignore_ascii_case(sb) && ra == rb,
            _ => a == b,
        },
    }
}

fn same_sip_uri(x: &SipUri<'_>, y: &SipUri<'_>) -> bool {
    let host_eq = match (x.host, y.host) {
        (Host::Name(a), Host::Name(b)) => a.eq_ignore_ascii_case(b),
        (a, b) => a == b,
    };
    if x.secure != y.secure
        || !host_eq
        || x.port != y.port
        || x.user_decoded() != y.user_decoded()
        || x.password.map(sip::msg::scan::percent_decode)
            != y.password.map(sip::msg::scan::percent_decode)
        || x.headers != y.headers
    {
        return false;
    }
    let eq = |a: Option<&str>, b: Option<&str>| match (a, b) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        (a, b) => a == b,
    };
    for name in STRICT_PARAMS {
        match (x.params.get(name), y.params.get(name)) {
            (None, None) => {}
            (Some(a), Some(b)) if eq(a, b) => {}
            _ => return false,
        }
    }
    x.params
        .iter()
        .filter(|(n, _)| !STRICT_PARAMS.iter().any(|s| s.eq_ignore_ascii_case(n)))
        .all(|(n, v)| y.params.get(n).is_none_or(|w| eq(v, w)))
}

/// Where cores send their entries: applies them (at once, or once a Raft
/// majority holds them) and reports each committed [`ProposalId`].
pub trait Store {
    /// Submits an entry; its id comes back from [`Store::take_committed`] once
    /// the entry is applied.
    fn propose(&mut self, entry: Entry);
    /// The applied state.
    fn state(&self) -> &State;
    /// Ids committed since the last call, in commit order.
    fn take_committed(&mut self) -> Vec<ProposalId>;
}

/// A single-node store that applies each entry at once, and queues its id
/// for the driver, as the Raft store will do asynchronously.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    state: State,
    committed: Vec<ProposalId>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Ids committed since the last call, in commit order.
    pub fn take_committed(&mut self) -> Vec<ProposalId> {
        std::mem::take(&mut self.committed)
    }

    /// Drops expired bindings (see [`State::expire`]); returns how many went.
    pub fn expire(&mut self, now_unix: u64) -> usize {
        self.state.expire(now_unix)
    }
}

impl Store for MemStore {
    fn propose(&mut self, entry: Entry) {
        match self.state.apply(&entry) {
            Applied::Rejected(e) => tracing::debug!(id = %entry.id, error = %e, "entry refused"),
            Applied::Duplicate => tracing::debug!(id = %entry.id, "entry already applied"),
            Applied::Done { .. } => {}
        }
        self.committed.push(entry.id);
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn take_committed(&mut self) -> Vec<ProposalId> {
        MemStore::take_committed(self)
    }
}

/// For tests in this crate: entry `id` registering `sip:USER@sipzone.local`
/// at `sip:USER@127.0.0.1:5070` (Call-ID `c-USER`, CSeq `cseq`).
#[cfg(test)]
pub(crate) fn test_register(id: u64, user: &str, cseq: u32) -> Entry {
    Entry {
        id: ProposalId(id),
        at_unix: 100,
        cmds: vec![Command::UpsertBinding {
            aor: Aor(format!("sip:{user}@sipzone.local")),
            binding: Binding::plain(
                format!("sip:{user}@127.0.0.1:5070"),
                4000,
                format!("c-{user}"),
                cseq,
                "a1",
            ),
        }],
    }
}

/// A leg record for tests in this crate.
#[cfg(test)]
pub(crate) fn test_leg(call_id: &str) -> LegRecord {
    LegRecord {
        call_id: call_id.into(),
        local_tag: "l".into(),
        remote_tag: "r".into(),
        local: "<sip:n@h>;tag=l".into(),
        remote: "<sip:p@h>;tag=r".into(),
        local_seq: 1,
        remote_seq: Some(1),
        remote_target: "sip:p@192.0.2.1".into(),
        route_set: vec![],
        secure: false,
        received: None,
        path: vec![],
        session_timer: None,
    }
}

/// A call record for tests in this crate.
#[cfg(test)]
pub(crate) fn test_call(id: &str) -> CallRecord {
    CallRecord {
        call_id: id.into(),
        owner: "n1".into(),
        caller: "sip:1000@realm".into(),
        callee: "sip:1001@realm".into(),
        a: test_leg(id),
        b: test_leg("b-leg"),
        start_unix_ms: 1_000,
        answer_unix_ms: 2_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aor(s: &str) -> Aor {
        Aor::parse(s).unwrap()
    }

    fn binding(contact: &str, exp: u64, call_id: &str, cseq: u32) -> Binding {
        Binding {
            received: Some("udp:127.0.0.1:5062".into()),
            ..Binding::plain(contact, exp, call_id, cseq, "n1")
        }
    }

    fn upsert(a: &Aor, b: Binding) -> Command {
        Command::UpsertBinding {
            aor: a.clone(),
            binding: b,
        }
    }

    fn entry(id: u64, at: u64, cmds: Vec<Command>) -> Entry {
        Entry {
            id: ProposalId(id),
            at_unix: at,
            cmds,
        }
    }

    #[test]
    fn aor_is_normalized() {
        assert_eq!(
            aor("sip:Alice@SipZone.LOCAL:5060;transport=tcp").as_str(),
            "sip:Alice@sipzone.local"
        );
        assert!(Aor::parse("tel:+123").is_none());
    }

    #[test]
    fn contact_equivalence_follows_rfc3261_19_1_4() {
        assert!(same_contact(
            "sip:a@HOST.example:5060",
            "sip:a@host.example:5060"
        ));
        assert!(!same_contact("sip:a@host", "sip:A@host"));
        assert!(!same_contact("sip:a@host", "sip:a@host:5060"));
        assert!(!same_contact("sip:a@host;transport=tcp", "sip:a@host"));
        assert!(same_contact(
            "sip:a@host;transport=TCP",
            "sip:a@host;transport=tcp"
        ));
        assert!(same_contact("sip:a@host;ob", "sip:a@host"));
        assert!(!same_contact("sip:a@host;x=1", "sip:a@host;x=2"));
        assert!(same_contact("sip:%61@host", "sip:a@host"));
        assert!(!same_contact("sips:a@host", "sip:a@host"));
        assert!(same_contact("TEL:+1", "tel:+1"));
    }

    #[test]
    fn apply_is_idempotent_and_in_order() {
        let a = aor("sip:alice@sipzone.local");
        let mut s = State::new();
        let e = entry(1, 100, vec![upsert(&a, binding("sip:a@h", 200, "c", 1))]);
        assert_eq!(
            s.apply(&e),
            Applied::Done {
                upserted: 1,
                removed: 0
            }
        );
        let before = s.clone();
        assert_eq!(s.apply(&e), Applied::Duplicate);
        assert_eq!(s, before);
        // A log index already applied is skipped whatever its proposal.
        let clear = entry(
            7,
            100,
            vec![Command::ClearAor {
                aor: a.clone(),
                seq: None,
            }],
        );
        let o = Origin { node: 2, boot: 9 };
        assert!(matches!(s.apply_at(5, o, &clear), Applied::Done { .. }));
        s.apply_at(6, o, &e);
        assert_eq!(s.apply_at(6, o, &e), Applied::Duplicate);
        assert_eq!(s.apply_at(3, Origin::LOCAL, &e), Applied::Duplicate);
        assert_eq!(s.binding_count(), 1);
        assert_eq!(s.applied_index(), 6);
        // The same proposal re-proposed lands at a new index: skipped.
        let before = s.clone();
        assert_eq!(s.apply_at(8, o, &clear), Applied::Duplicate);
        assert_eq!(s.bindings, before.bindings);
    }

    #[test]
    fn dedup_window_tracks_ids_per_origin_and_boot() {
        let mut w = Seen::new(1);
        assert!(w.mark(5));
        assert!(!w.mark(5));
        assert!(w.mark(3), "an older id not yet applied is applied");
        assert!(w.mark(5 + DEDUP_WINDOW - 1));
        assert!(!w.mark(3), "ids below the window count as applied");
        assert!(w.mark(10 * DEDUP_WINDOW));
        assert!(!w.mark(10 * DEDUP_WINDOW));
        assert!(
            w.mark(10 * DEDUP_WINDOW - 1),
            "its bit was cleared on the jump"
        );
        let mut s = State::new();
        let e = entry(1, 10, vec![]);
        for boot in 0..6 {
            let o = Origin { node: 4, boot };
            assert!(matches!(s.apply_at(0, o, &e), Applied::Done { .. }));
            assert_eq!(s.apply_at(0, o, &e), Applied::Duplicate);
        }
        assert_eq!(s.seen[&4].len(), BOOTS_KEPT);
    }

    #[test]
    fn dirty_keys_export_and_import_rebuild_the_state() {
        let a = aor("sip:alice@sipzone.local");
        let mut s = State::new();
        s.track_dirty(true);
        s.apply_at(
            1,
            Origin { node: 1, boot: 1 },
            &entry(1, 100, vec![upsert(&a, binding("sip:a@h", 200, "c", 1))]),
        );
        let keys = s.take_dirty();
        assert_eq!(keys, vec![Key::Bindings(a.clone()), Key::Seen(1)]);
        let mut t = State::new();
        for k in keys {
            t.import(k.clone(), &s.export(&k).unwrap()).unwrap();
        }
        t.set_applied_index(s.applied_index());
        t.track_dirty(true);
        assert_eq!(t, s);
        assert!(t.import(Key::Call("x".into()), b"not json").is_err());
        s.expire(300);
        assert_eq!(s.take_dirty(), vec![Key::Bindings(a.clone())]);
        assert_eq!(s.export(&Key::Bindings(a)), None);
    }

    #[test]
    fn refresh_replaces_and_stale_cseq_rejects_whole_entry() {
        let a = aor("sip:alice@sipzone.local");
        let mut s = State::new();
        s.apply(&entry(
            1,
            100,
            vec![
                upsert(&a, binding("sip:a@h", 200, "c", 5)),
                upsert(&a, binding("sip:b@h", 200, "c", 5)),
            ],
        ));
        s.apply(&entry(
            2,
            110,
            vec![upsert(&a, binding("sip:a@H", 300, "c", 6))],
        ));
        let now = s.bindings(&a, 110);
        assert_eq!(now.len(), 2);
        assert_eq!(now[0].expires_at_unix, 300);
        // Same Call-ID, CSeq not higher: the whole entry is refused.
        let before = s.clone();
        let r = s.apply(&entry(
            3,
            120,
            vec![
                Command::RemoveBinding {
                    aor: a.clone(),
                    contact: "sip:b@h".into(),
                    instance: None,
                    reg_id: None,
                    seq: Some(RequestSeq {
                        call_id: "c".into(),
                        cseq: 7,
                    }),
                },
                upsert(&a, binding("sip:a@h", 400, "c", 6)),
            ],
        ));
        assert!(matches!(
            r,
            Applied::Rejected(ApplyError::OutOfOrder { cseq: 6, .. })
        ));
        assert_eq!(s.bindings, before.bindings);
        // Another Call-ID may update whatever its CSeq.
        s.apply(&entry(
            4,
            120,
            vec![upsert(&a, binding("sip:a@h", 400, "other", 1))],
        ));
        assert_eq!(s.bindings(&a, 120)[0].call_id, "other");
    }

    #[test]
    fn flow_bindings_replace_by_instance_and_reg_id() {
        let a = aor("sip:alice@sipzone.local");
        let mut s = State::new();
        let flow = |contact: &str, reg_id, cseq| Binding {
            instance: Some("<urn:uuid:1>".into()),
            reg_id: Some(reg_id),
            ..binding(contact, 500, "c", cseq)
        };
        s.apply(&entry(
            1,
            100,
            vec![upsert(&a, flow("sip:a@10.0.0.1:1", 1, 1))],
        ));
        s.apply(&entry(
            2,
            100,
            vec![upsert(&a, flow("sip:a@10.0.0.1:2", 2, 2))],
        ));
        assert_eq!(s.binding_count(), 2);
        s.apply(&entry(
            3,
            100,
            vec![upsert(&a, flow("sip:a@10.0.0.9:7", 1, 3))],
        ));
        let list = s.bindings(&a, 100);
        assert_eq!(list.len(), 2);
        assert!(list.iter().any(|b| b.contact == "sip:a@10.0.0.9:7"));
        assert!(!list.iter().any(|b| b.contact == "sip:a@10.0.0.1:1"));
    }

    #[test]
    fn bindings_sorted_by_q_and_expired_hidden_then_dropped() {
        let a = aor("sip:alice@sipzone.local");
        let mut s = State::new();
        let with_q = |c: &str, q, exp| Binding {
            q,
            ..binding(c, exp, "c", 1)
        };
        s.apply(&entry(
            1,
            100,
            vec![
                upsert(&a, with_q("sip:low@h", Some(100), 500)),
                upsert(&a, with_q("sip:none@h", None, 500)),
                upsert(&a, with_q("sip:mid@h", Some(500), 150)),
            ],
        ));
        let order: Vec<&str> = s
            .bindings(&a, 100)
            .iter()
            .map(|b| b.contact.as_str())
            .collect();
        assert_eq!(order, ["sip:none@h", "sip:mid@h", "sip:low@h"]);
        assert_eq!(s.bindings(&a, 150).len(), 2);
        assert_eq!(s.binding_count(), 3);
        assert_eq!(s.expire(150), 1);
        assert_eq!(s.binding_count(), 2);
        assert_eq!(s.expire(500), 2);
        assert_eq!(s.binding_count(), 0);
        assert_eq!(s.aor_count(), 0);
    }

    #[test]
    fn expire_command_and_expired_bindings_never_conflict() {
        let a = aor("sip:alice@sipzone.local");
        let mut s = State::new();
        s.apply(&entry(
            1,
            100,
            vec![upsert(&a, binding("sip:a@h", 150, "c", 9))],
        ));
        // Expired at apply time: the same Call-ID with a lower CSeq is no conflict.
        let r = s.apply(&entry(
            2,
            200,
            vec![upsert(&a, binding("sip:a@h", 300, "c", 1))],
        ));
        assert_eq!(
            r,
            Applied::Done {
                upserted: 1,
                removed: 1
            }
        );
        let r = s.apply(&entry(3, 300, vec![Command::Expire { now_unix: 300 }]));
        assert_eq!(
            r,
            Applied::Done {
                upserted: 0,
                removed: 1
            }
        );
        assert_eq!(s.binding_count(), 0);
    }

    #[test]
    fn mem_store_applies_and_reports_commits() {
        let a = aor("sip:alice@sipzone.local");
        let mut st = MemStore::new();
        st.propose(entry(
            7,
            100,
            vec![upsert(&a, binding("sip:a@h", 200, "c", 1))],
        ));
        st.propose(entry(
            8,
            100,
            vec![Command::ClearAor {
                aor: a.clone(),
                seq: None,
            }],
        ));
        assert_eq!(st.take_committed(), vec![ProposalId(7), ProposalId(8)]);
        assert!(st.take_committed().is_empty());
        assert_eq!(st.state().binding_count(), 0);
        assert_eq!(st.expire(1000), 0);
    }

    fn call(id: &str) -> CallRecord {
        test_call(id)
    }

    fn cdr(id: &str) -> Cdr {
        Cdr {
            call_id: id.into(),
            caller: "sip:1000@realm".into(),
            callee: "sip:1001@realm".into(),
            owner: "n1".into(),
            start_unix_ms: 1_000,
            answer_unix_ms: Some(2_000),
            end_unix_ms: 5_000,
            duration_ms: 3_000,
            reason: EndReason::CallerHangup,
        }
    }

    #[test]
    fn ownership_moves_only_by_reassign_and_fences_the_old_owner() {
        let mut s = State::new();
        s.track_dirty(true);
        let mut c = call("c1");
        c.owner = "a1".into();
        let put = |id, c: &CallRecord| {
            entry(
                id,
                10,
                vec![Command::PutCall {
                    call: Box::new(c.clone()),
                }],
            )
        };
        s.apply(&put(1, &c));
        let reassign = |id, from: &str, to: &str| {
            entry(
                id,
                11,
                vec![Command::Reassign {
                    call_id: "c1".into(),
                    from: from.into(),
                    to: to.into(),
                }],
            )
        };
        // Planned on stale state (the owner is not b9): nothing moves.
        s.apply(&reassign(2, "b9", "b1"));
        assert_eq!(s.call("c1").unwrap().owner, "a1");
        s.apply(&reassign(3, "a1", "b1"));
        assert_eq!(s.call("c1").unwrap().owner, "b1");
        s.take_dirty();
        // The old owner, back from a partition, cannot write the call back.
        let mut stale = c.clone();
        stale.a.local_seq = 9;
        s.apply(&put(4, &stale));
        assert_eq!(s.call("c1").unwrap().owner, "b1");
        assert_eq!(s.call("c1").unwrap().a.local_seq, c.a.local_seq);
        assert!(s.take_dirty().iter().all(|k| !matches!(k, Key::Call(_))));
        // The new owner can.
        let mut mine = c.clone();
        mine.owner = "b1".into();
        mine.a.local_seq = 10;
        s.apply(&put(5, &mine));
        assert_eq!(s.call("c1").unwrap().a.local_seq, 10);
        // Members are recorded by Raft id.
        let m = MemberRecord {
            name: "b1".into(),
            zone: "b".into(),
            witness: false,
            raft_addr: None,
        };
        s.apply(&entry(
            6,
            12,
            vec![Command::PutMember {
                raft_id: 3,
                member: m.clone(),
            }],
        ));
        assert_eq!(s.members().get(&3), Some(&m));
        assert!(s.take_dirty().contains(&Key::Member(3)));
    }

    #[test]
    fn calls_put_end_idempotent_and_never_resurrected() {
        let mut s = State::new();
        s.apply(&entry(
            1,
            10,
            vec![Command::PutCall {
                call: Box::new(call("c1")),
            }],
        ));
        assert_eq!(s.call_count(), 1);
        assert_eq!(s.call("c1").unwrap().b.call_id, "b-leg");
        // Replacing (a re-INVITE changed it) keeps one record.
        let mut changed = call("c1");
        changed.a.local_seq = 2;
        s.apply(&entry(
            2,
            11,
            vec![Command::PutCall {
                call: Box::new(changed),
            }],
        ));
        assert_eq!(s.call("c1").unwrap().a.local_seq, 2);
        let end = entry(
            3,
            12,
            vec![Command::EndCall {
                call_id: "c1".into(),
                cdr: cdr("c1"),
            }],
        );
        s.apply(&end);
        assert_eq!(s.call_count(), 0);
        assert_eq!(s.cdr("c1").unwrap().duration_ms, 3_000);
        let before = s.clone();
        assert_eq!(s.apply(&end), Applied::Duplicate);
        assert_eq!(s, before);
        // A late PutCall for an ended call is ignored, deterministically.
        s.apply(&entry(
            4,
            13,
            vec![Command::PutCall {
                call: Box::new(call("c1")),
            }],
        ));
        assert_eq!(s.call_count(), 0);
        assert_eq!(s.cdrs().count(), 1);
        // EndCall for a call never confirmed (cancelled) just stores the CDR.
        s.apply(&entry(
            5,
            14,
            vec![Command::EndCall {
                call_id: "c2".into(),
                cdr: cdr("c2"),
            }],
        ));
        assert_eq!(s.cdrs().count(), 2);
        assert_eq!(s.calls().count(), 0);
    }

    #[test]
    fn call_commands_follow_entry_atomicity() {
        let a = aor("sip:alice@sipzone.local");
        let mut s = State::new();
        s.apply(&entry(
            1,
            100,
            vec![upsert(&a, binding("sip:a@h", 200, "c", 5))],
        ));
        // A refused binding command refuses the call command of its entry too.
        let r = s.apply(&entry(
            2,
            100,
            vec![
                Command::PutCall {
                    call: Box::new(call("c1")),
                },
                upsert(&a, binding("sip:a@h", 300, "c", 4)),
            ],
        ));
        assert!(matches!(r, Applied::Rejected(_)));
        assert_eq!(s.call_count(), 0);
    }

    #[test]
    fn entries_serialize() {
        fn is_serde<T: Serialize + for<'de> Deserialize<'de>>() {}
        is_serde::<Entry>();
    }
}
