//! The registrar (RFC 3261 §10.3) as a sans-IO core: digest authentication
//! with lockout, binding decisions, and the 200 OK once the bindings are
//! committed to the replicated state.
//!
//! ```text
//!   REGISTER ─▶ handle(now, random, source, transport, req, state)
//!                 ├─ Outcome::Respond(401 / 403 / 404 / 423 / 429 / 439 / 4xx / 500 / 200 query)
//!                 └─ Outcome::Propose { entry, pending }
//!                        driver: store.propose(entry) ... Committed(entry.id)
//!                        ─▶ committed(pending, state) ─▶ 200 OK (all bindings, RFC 3261 §10.3 step 8)
//! ```
//!
//! A REGISTER that changes bindings is answered 200 **only after** its entry
//! is committed, so a registration acknowledged by any node survives the loss
//! of any zone (DESIGN §5). The driver keeps each [`Pending`] under its
//! [`Pending::id`] and matches commits by id, never by order.
//!
//! Steps, in order (RFC 3261 §10.3 numbering where it applies):
//!
//! | check | answer |
//! |---|---|
//! | not a REGISTER | 405 with `Allow: REGISTER` |
//! | source locked out | 429 Too Many Requests, `Retry-After` |
//! | To / Contact syntax, `*` without `Expires: 0` (`check_register`) | 400 |
//! | Request-URI or To host is not the realm (steps 1, 5) | 404 Not Found (RFC 3261 §21.4.5: domain not handled here) |
//! | malformed `Authorization` | 400 |
//! | no credentials for the realm | 401, `WWW-Authenticate` SHA-256 then MD5 (RFC 8760) |
//! | user locked out | 403 Forbidden (locked out) |
//! | digest-uri is not the Request-URI | 400 |
//! | unknown user, wrong password | 401 with a fresh challenge, counted as a failure |
//! | nonce expired (digest right) | 401 with `stale=true`, not a failure |
//! | forged nonce, replayed nonce count, no qop | 401 fresh challenge, not a failure |
//! | authenticated user is not the To user (step 4) | 403 Forbidden |
//! | malformed `Expires`, `expires`, `q`, `reg-id`, Path | 400 |
//! | `reg-id` without `+sip.instance` | 400 |
//! | `reg-id` through an edge without `;ob`, UA supports outbound | 439 First Hop Lacks Outbound Support (RFC 5626 §6); without `Supported: outbound` the reg-id is ignored |
//! | expiry below `min_expires` and not 0 | 423 Interval Too Brief, `Min-Expires` |
//! | same Call-ID and CSeq not higher than a binding's (step 7) | 500 Server Internal Error: the RFC says the request fails; no binding changes |
//! | more than `max_contacts_per_aor` bindings afterwards | 403 Forbidden (too many contacts): a policy refusal, not an overload (503 would send the UA to another node that shares the same state) |
//! | no Contact (a query) | 200 listing the bindings at once, no proposal (from the local applied state, which on a Raft follower may lag the leader by the commit latency) |
//! | otherwise | `Propose`; 200 after commit |
//!
//! Expiry per contact: the `expires` parameter, else the `Expires` header,
//! else `default_expires`; 0 removes the binding; above `max_expires` it is
//! clamped. `Contact: *` with `Expires: 0` removes every binding of the AOR
//! (step 6). Bindings are keyed per [`crate::state`]: the Contact URI, or the
//! `+sip.instance` and `reg-id` pair when RFC 5626 outbound applies, in which
//! case the 200 carries `Require: outbound`. Outbound applies when the UA is
//! directly connected (one Via) or the first hop's Path URI (the bottom one)
//! carries `;ob`. The 200 echoes the Path header when the UA sent
//! `Supported: path` (RFC 3327 §5.3) and always carries
//! `Supported: path, outbound` and `Date`.
//!
//! Lockout (DESIGN §8): `max_failures` failures within `window_secs` lock the
//! user name for `lockout_secs` (answered 403, checked before the password, so
//! guessing stops), and, counted separately, the source address (IPv6 by /64
//! prefix; answered 429 Too Many Requests with `Retry-After`). Note that SIP's
//! registry gives 429 to "Provide Referrer Identity" (RFC 3892); clients
//! treat it as a generic 4xx. Each table holds at most [`MAX_TRACKED`]
//! entries and evicts the least recently failed one when full. A successful
//! authentication clears the user's count, not the source's. The tables are
//! local to the node: an attacker spreading requests over several nodes gets
//! `max_failures` tries per node.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use sip::auth::{
    Algorithm, Credentials, NcTracker, NonceKey, Rejection as AuthRejection, Verifier,
};
use sip::msg::check::check_register;
use sip::msg::{
    Contacts, Header, HeaderName, Host, Message, Method, NameAddr, Uri, parse_bounded,
    parse_delta_seconds,
};

use crate::directory::Directory;
use crate::state::{Aor, Binding, Command, Entry, ProposalId, RequestSeq, State, same_contact};

/// Most entries each lockout table (users, sources) holds.
pub const MAX_TRACKED: usize = 100_000;

/// Nonces whose nonce counts the verifier tracks (replay protection).
const NONCE_TRACKER_CAPACITY: usize = 65_536;

/// User names longer than this are tracked by their prefix, so a lockout
/// entry stays small whatever the request carries.
const MAX_USER_KEY: usize = 128;

/// Stands in for an unknown user's HA1 (sliced to the algorithm's length).
const DUMMY_HA1: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Largest `reg-id` (RFC 5626 §4.2: 1 to 2**31-1).
const MAX_REG_ID: u64 = (1 << 31) - 1;

/// Lockout after repeated authentication failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockoutConfig {
    /// Failures within `window_secs` that lock a user or a source (default 5;
    /// 0 disables lockout).
    pub max_failures: u32,
    /// Window, from the first failure, in which failures add up (default 60 s).
    pub window_secs: u64,
    /// How long a lockout lasts (default 300 s).
    pub lockout_secs: u64,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            max_failures: 5,
            window_secs: 60,
            lockout_secs: 300,
        }
    }
}

/// Registrar parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrarConfig {
    /// Digest realm, and the only domain registered here.
    pub realm: String,
    /// Shortest non-zero expiry accepted; shorter gets 423 (default 60 s).
    pub min_expires: u32,
    /// Longest expiry granted; longer is clamped (default 3600 s).
    pub max_expires: u32,
    /// Expiry when the request gives none (default 3600 s).
    pub default_expires: u32,
    /// Nonce lifetime before it is stale (default 300 s).
    pub nonce_max_age_secs: u64,
    /// Most bindings per AOR (default 10).
    pub max_contacts_per_aor: usize,
    /// Failure lockout.
    pub lockout: LockoutConfig,
    /// This node's id, written into the bindings it accepts.
    pub node_id: String,
    /// This node's SIP listen addresses. A digest-uri naming one of them
    /// (`sip:127.0.0.1:5060`, as SIPp and some phones send) designates this
    /// registrar as the Request-URI does, and is accepted (RFC 2617 §3.2.2.5
    /// asks for the same resource, not the same text).
    pub local_addrs: Vec<SocketAddr>,
    /// Digest algorithms offered, in order of preference: one challenge each
    /// in this order (RFC 8760 §2.4), and answers in any other algorithm are
    /// refused. Default SHA-256 then MD5.
    pub algorithms: Vec<Algorithm>,
}

impl RegistrarConfig {
    /// The defaults above for `realm` on node `node_id`.
    pub fn new(realm: impl Into<String>, node_id: impl Into<String>) -> RegistrarConfig {
        RegistrarConfig {
            realm: realm.into(),
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            nonce_max_age_secs: 300,
            max_contacts_per_aor: 10,
            lockout: LockoutConfig::default(),
            node_id: node_id.into(),
            algorithms: vec![Algorithm::Sha256, Algorithm::Md5],
            local_addrs: Vec::new(),
        }
    }
}

/// A REGISTER waiting for its entry to commit; give it back to
/// [`Registrar::committed`] when [`Pending::id`] is reported committed.
#[derive(Debug, Clone)]
pub struct Pending {
    id: ProposalId,
    request: Message,
    aor: Aor,
    at_unix: u64,
    to_tag: String,
    /// Path values to echo (empty when the UA did not ask).
    echo_path: Vec<String>,
    outbound: bool,
}

impl Pending {
    /// The id of the proposed entry.
    pub fn id(&self) -> ProposalId {
        self.id
    }

    /// The AOR being registered.
    pub fn aor(&self) -> &Aor {
        &self.aor
    }

    /// The REGISTER waiting for its answer.
    pub fn request(&self) -> &Message {
        &self.request
    }
}

/// What to do with a REGISTER.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Send this response now.
    Respond(Message),
    /// Propose `entry`; answer with [`Registrar::committed`] once it commits.
    Propose {
        /// The bindings to write.
        entry: Entry,
        /// What the 200 needs, kept by the driver under `entry.id`.
        pending: Pending,
    },
}

/// Counters the driver exports as metrics (monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistrarStats {
    /// 401 challenges sent (first, stale and after failures).
    pub challenges: u64,
    /// Authentication failures: unknown user or wrong password.
    pub auth_failures: u64,
    /// Lockouts started (users and sources).
    pub lockouts: u64,
    /// Requests refused because their user or source was locked out.
    pub locked_out: u64,
    /// Entries proposed.
    pub proposals: u64,
    /// 200 OKs built after a commit.
    pub registered: u64,
}

/// The RFC 3261 §10.3 registrar core of one node.
#[derive(Debug)]
pub struct Registrar {
    config: RegistrarConfig,
    directory: Directory,
    verifier: Verifier,
    users: FailureTable<String>,
    sources: FailureTable<IpAddr>,
    next_id: u64,
    stats: RegistrarStats,
}

/// The inputs of one `handle` call.
struct Ctx<'a> {
    now: u64,
    random: [u8; 8],
    /// Proxy authentication (407, Proxy-Authenticate/-Authorization) for a
    /// caller, rather than 401 for a REGISTER.
    proxy: bool,
    source: SocketAddr,
    transport: &'a str,
    req: &'a Message,
    state: &'a State,
    tag: String,
}

/// A response decided before any proposal.
struct Reply {
    code: u16,
    reason: &'static str,
    headers: Vec<Header>,
}

impl Reply {
    fn new(code: u16, reason: &'static str) -> Reply {
        Reply {
            code,
            reason,
            headers: Vec::new(),
        }
    }

    fn bad(reason: &'static str) -> Reply {
        Reply::new(400, reason)
    }

    fn with(mut self, name: HeaderName, value: &str) -> Reply {
        self.headers.push(Header::new(name, value));
        self
    }

    fn into_response(self, req: &Message, tag: &str) -> Message {
        let mut r = req.response(self.code, self.reason, Some(tag));
        for h in self.headers {
            r.push(h);
        }
        r
    }
}

impl Registrar {
    /// True when `uri` is a SIP URI for the realm or for one of this
    /// node's listen addresses (no user part): another name of this registrar.
    fn names_this_registrar(&self, uri: &str) -> bool {
        let Ok(sip::msg::Uri::Sip(u)) = sip::msg::Uri::parse(uri) else {
            return false;
        };
        if u.user.is_some() {
            return false;
        }
        match u.host.ip() {
            None => u.host.to_string().eq_ignore_ascii_case(&self.config.realm),
            Some(ip) => {
                let port = u.port.unwrap_or(if u.secure { 5061 } else { 5060 });
                self.config
                    .local_addrs
                    .iter()
                    .any(|a| a.ip() == ip && a.port() == port)
            }
        }
    }

    /// A registrar for `config.realm`, authenticating against `directory`
    /// with cluster nonces from `nonce_key`.
    pub fn new(config: RegistrarConfig, directory: Directory, nonce_key: NonceKey) -> Registrar {
        let verifier = Verifier::new(
            nonce_key,
            config.realm.clone(),
            config.nonce_max_age_secs,
            NcTracker::new(NONCE_TRACKER_CAPACITY),
        );
        Registrar {
            config,
            directory,
            verifier,
            users: FailureTable::new(MAX_TRACKED),
            sources: FailureTable::new(MAX_TRACKED),
            next_id: 1,
            stats: RegistrarStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RegistrarConfig {
        &self.config
    }

    /// The users.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The users, to add or remove some.
    pub fn directory_mut(&mut self) -> &mut Directory {
        &mut self.directory
    }

    /// The counters.
    pub fn stats(&self) -> RegistrarStats {
        self.stats
    }

    /// The digest verifier (e.g. to raise the nonce-count floor at start).
    pub fn verifier_mut(&mut self) -> &mut Verifier {
        &mut self.verifier
    }

    /// Sets the id of the next proposal (ids are de-duplicated per
    /// [`crate::state::Origin`], so any start value works for a new origin).
    pub fn set_next_proposal_id(&mut self, next: ProposalId) {
        self.next_id = next.0;
    }

    /// Number of (users, sources) in the lockout tables.
    pub fn tracked(&self) -> (usize, usize) {
        (self.users.len(), self.sources.len())
    }

    /// Forgets failure records whose window and lockout are over at `now_unix`
    /// (call it periodically, e.g. every `window_secs`).
    pub fn purge(&mut self, now_unix: u64) {
        self.users.purge(now_unix, &self.config.lockout);
        self.sources.purge(now_unix, &self.config.lockout);
    }

    /// Decides on a REGISTER received from `source` over `transport` (`udp`,
    /// `tcp`, `tls`), against the applied `state`. `random` seeds the nonce and
    /// the To tag.
    pub fn handle(
        &mut self,
        now_unix: u64,
        random: [u8; 8],
        source: SocketAddr,
        transport: &str,
        req: &Message,
        state: &State,
    ) -> Outcome {
        let ctx = Ctx {
            now: now_unix,
            random,
            proxy: false,
            source,
            transport,
            req,
            state,
            tag: hex::encode(random),
        };
        match self.decide(&ctx) {
            Ok(outcome) => outcome,
            Err(reply) => Outcome::Respond(reply.into_response(req, &ctx.tag)),
        }
    }

    /// Authenticates a caller: an initial request other than REGISTER (an
    /// INVITE) must carry `Proxy-Authorization` digest credentials of the
    /// user named in its From, under the same nonces, algorithms and lockout
    /// as registrations (RFC 3261 §22.3). `Err` is the response to send:
    /// 407 with `Proxy-Authenticate` challenges, 403 when the credentials
    /// belong to another user or the user is locked out, 429 when the source
    /// is, 400 for malformed credentials.
    pub fn authenticate_caller(
        &mut self,
        now_unix: u64,
        random: [u8; 8],
        source: SocketAddr,
        transport: &str,
        req: &Message,
        state: &State,
    ) -> Result<(), Box<Message>> {
        let ctx = Ctx {
            now: now_unix,
            random,
            proxy: true,
            source,
            transport,
            req,
            state,
            tag: hex::encode(random),
        };
        let src = source_key(source.ip());
        let decided = if let Some(until) = self.sources.locked_until(&src, now_unix) {
            self.stats.locked_out += 1;
            Err(too_many(until - now_unix))
        } else {
            let from_user = req
                .from()
                .ok()
                .and_then(|f| f.uri.as_sip().and_then(|u| u.user_decoded()))
                .and_then(|u| String::from_utf8(u).ok());
            match from_user {
                Some(user) => self.authenticate(&ctx, src, &user),
                None => Err(Reply::new(403, "Forbidden (no user in From)")),
            }
        };
        decided.map_err(|reply| Box::new(reply.into_response(req, &ctx.tag)))
    }

    /// The 200 OK for a REGISTER whose entry committed: every current binding
    /// of the AOR with its remaining expiry, as of the request's time. If
    /// apply refused the entry (a REGISTER with the same Call-ID and a higher
    /// CSeq overtook it between proposal and commit), the 200 still lists the
    /// bindings as they are, which the newer REGISTER wrote.
    pub fn committed(&mut self, pending: Pending, state: &State) -> Message {
        self.stats.registered += 1;
        self.ok(
            &pending.request,
            &pending.to_tag,
            &pending.aor,
            pending.at_unix,
            state,
            &pending.echo_path,
            pending.outbound,
        )
    }

    fn decide(&mut self, ctx: &Ctx<'_>) -> Result<Outcome, Reply> {
        let req = ctx.req;
        if !req.is_request() || !req.is_method(&Method::Register) {
            return Err(Reply::new(405, "Method Not Allowed").with(HeaderName::Allow, "REGISTER"));
        }
        let src = source_key(ctx.source.ip());
        if let Some(until) = self.sources.locked_until(&src, ctx.now) {
            self.stats.locked_out += 1;
            return Err(too_many(until - ctx.now));
        }
        check_register(req).map_err(|r| Reply {
            code: r.code,
            reason: r.reason,
            headers: r.headers,
        })?;
        let ruri_ok = matches!(req.request_uri(), Some(Uri::Sip(u)) if self.serves(&u.host));
        if !ruri_ok {
            return Err(Reply::new(404, "Not Found (domain not served here)"));
        }
        let to = req.to().map_err(|_| Reply::bad("Bad Request (To)"))?;
        let Some(to_uri) = to.uri.as_sip() else {
            return Err(Reply::bad("Bad Request (To)"));
        };
        if !self.serves(&to_uri.host) {
            return Err(Reply::new(404, "Not Found (domain not served here)"));
        }
        let Some(to_user) = to_uri
            .user_decoded()
            .and_then(|u| String::from_utf8(u).ok())
        else {
            return Err(Reply::new(404, "Not Found (no user in To)"));
        };
        self.authenticate(ctx, src, &to_user)?;

        let aor = Aor::from_uri(to_uri);
        let seq = RequestSeq {
            call_id: req.call_id().unwrap_or_default().to_owned(),
            cseq: req
                .cseq()
                .map_err(|_| Reply::bad("Bad Request (CSeq)"))?
                .seq,
        };
        let header_expires = match req.header(HeaderName::Expires) {
            None => None,
            Some(_) => Some(
                req.expires()
                    .ok_or_else(|| Reply::bad("Bad Request (Expires)"))?,
            ),
        };
        let path_addrs = req
            .name_addrs(HeaderName::Path)
            .map_err(|_| Reply::bad("Bad Request (Path)"))?;
        let path: Vec<String> = req
            .values(HeaderName::Path)
            .map(|v| v.trim().to_owned())
            .collect();
        let echo_path = if supports(req, "path") {
            path.clone()
        } else {
            Vec::new()
        };

        let contacts = match req.contacts() {
            Ok(Contacts::Star) => None,
            Ok(Contacts::List(list)) if list.is_empty() => {
                // A query (RFC 3261 §10.2.3): nothing to write.
                return Ok(Outcome::Respond(
                    self.ok(req, &ctx.tag, &aor, ctx.now, ctx.state, &echo_path, false),
                ));
            }
            Ok(Contacts::List(list)) => Some(list),
            Err(_) => return Err(Reply::bad("Bad Request (Contact)")),
        };

        let mut outbound = false;
        let cmds = match contacts {
            None => vec![Command::ClearAor {
                aor: aor.clone(),
                seq: Some(seq.clone()),
            }],
            Some(list) => {
                // RFC 5626 §6: outbound needs a first hop that keeps the flow:
                // this node (one Via) or an edge whose Path URI carries ;ob.
                let first_hop = req.values(HeaderName::Via).count() == 1;
                let edge_ob = path_addrs
                    .last()
                    .and_then(|p| p.uri.as_sip())
                    .is_some_and(|u| u.params.has("ob"));
                let outbound_ok = first_hop || edge_ob;
                let mut cmds = Vec::with_capacity(list.len());
                for na in &list {
                    let c = self.contact(na, header_expires)?;
                    let reg_id = match c.reg_id {
                        Some(_) if !outbound_ok && supports(req, "outbound") => {
                            return Err(Reply::new(439, "First Hop Lacks Outbound Support"));
                        }
                        Some(_) if !outbound_ok => None,
                        r => r,
                    };
                    outbound |= reg_id.is_some();
                    if c.expires == 0 {
                        cmds.push(Command::RemoveBinding {
                            aor: aor.clone(),
                            contact: c.uri,
                            instance: c.instance,
                            reg_id,
                            seq: Some(seq.clone()),
                        });
                        continue;
                    }
                    cmds.push(Command::UpsertBinding {
                        aor: aor.clone(),
                        binding: Binding {
                            contact: c.uri,
                            expires_at_unix: ctx.now + u64::from(c.expires),
                            q: c.q,
                            call_id: seq.call_id.clone(),
                            cseq: seq.cseq,
                            path: path.clone(),
                            instance: c.instance,
                            reg_id,
                            received: Some(format!(
                                "{}:{}",
                                ctx.transport.to_ascii_lowercase(),
                                ctx.source
                            )),
                            node: self.config.node_id.clone(),
                        },
                    });
                }
                cmds
            }
        };

        let before = ctx.state.bindings(&aor, ctx.now).len();
        let after = ctx
            .state
            .preview(&aor, ctx.now, &cmds)
            .map_err(|_| Reply::new(500, "Server Internal Error (CSeq out of order)"))?
            .len();
        if after > self.config.max_contacts_per_aor && after > before {
            return Err(Reply::new(403, "Forbidden (too many contacts)"));
        }

        let id = ProposalId(self.next_id);
        self.next_id += 1;
        self.stats.proposals += 1;
        let entry = Entry {
            id,
            at_unix: ctx.now,
            cmds,
        };
        let pending = Pending {
            id,
            request: req.clone(),
            aor,
            at_unix: ctx.now,
            to_tag: ctx.tag.clone(),
            echo_path,
            outbound,
        };
        Ok(Outcome::Propose { entry, pending })
    }

    /// RFC 3261 §10.3 steps 3–4: digest credentials for this realm, checked
    /// against the directory, with lockout.
    /// Checks the request's digest credentials for `to_user` (the AOR's
    /// user for a REGISTER, the From user for a caller).
    fn authenticate(&mut self, ctx: &Ctx<'_>, src: IpAddr, to_user: &str) -> Result<(), Reply> {
        let req = ctx.req;
        let mut malformed = false;
        let mut creds = None;
        let header = if ctx.proxy {
            HeaderName::ProxyAuthorization
        } else {
            HeaderName::Authorization
        };
        for v in req.values(header) {
            match Credentials::parse(v) {
                Ok(Credentials::Digest(c)) if c.realm == self.config.realm => {
                    creds = Some(c);
                    break;
                }
                Ok(_) => {}
                Err(_) => malformed = true,
            }
        }
        let Some(creds) = creds else {
            if malformed {
                return Err(Reply::bad("Bad Request (Authorization)"));
            }
            if self
                .users
                .locked_until(&user_key(to_user), ctx.now)
                .is_some()
            {
                self.stats.locked_out += 1;
                return Err(Reply::new(403, "Forbidden (locked out)"));
            }
            return Err(self.challenge(ctx, false));
        };
        let ukey = user_key(&creds.username);
        if self.users.locked_until(&ukey, ctx.now).is_some() {
            self.stats.locked_out += 1;
            return Err(Reply::new(403, "Forbidden (locked out)"));
        }
        if !req
            .request_uri_str()
            .is_some_and(|r| r == creds.uri || same_contact(&creds.uri, r))
            && !self.names_this_registrar(&creds.uri)
        {
            return Err(Reply::bad("Bad Request (digest uri does not match)"));
        }
        // Hashed user names (RFC 7616 §3.4.4) are never asked for here. An
        // unknown user is verified against a dummy HA1, so it costs the same
        // work and meets the same nonce checks as a wrong password.
        let user = if creds.userhash {
            None
        } else {
            self.directory.user(&creds.username)
        };
        // An algorithm the policy does not offer is answered with a new
        // challenge, never verified (no downgrade to MD5 when only SHA-256
        // is allowed).
        if !self.config.algorithms.contains(&creds.algorithm) {
            return Err(self.challenge(ctx, false));
        }
        let known = user.is_some();
        let ha1 = match user {
            Some(u) => u.ha1(creds.algorithm),
            None => &DUMMY_HA1[..creds.algorithm.hex_len()],
        };
        let method = req.method().map(|m| m.to_string()).unwrap_or_default();
        match self.verifier.verify(ctx.now, &method, &creds, ha1) {
            Ok(_) if known => {}
            Ok(_) | Err(AuthRejection::BadResponse) => return Err(self.failure(ctx, src, ukey)),
            Err(AuthRejection::StoredHa1Mismatch) => {
                tracing::warn!(user = %creds.username, "stored HA1 unusable for the client's algorithm");
                return Err(Reply::new(500, "Server Internal Error"));
            }
            Err(r) => {
                tracing::debug!(user = %creds.username, reason = %r, "credentials refused, challenging again");
                return Err(self.challenge(ctx, r.is_stale()));
            }
        }
        self.users.clear(&ukey);
        if creds.username != to_user {
            return Err(Reply::new(403, "Forbidden (not your address-of-record)"));
        }
        Ok(())
    }

    fn challenge(&mut self, ctx: &Ctx<'_>, stale: bool) -> Reply {
        self.stats.challenges += 1;
        let (mut r, header) = if ctx.proxy {
            (
                Reply::new(407, "Proxy Authentication Required"),
                HeaderName::ProxyAuthenticate,
            )
        } else {
            (Reply::new(401, "Unauthorized"), HeaderName::WwwAuthenticate)
        };
        let offered = self.verifier.challenges(ctx.now, ctx.random, stale);
        for alg in &self.config.algorithms {
            for c in offered.iter().filter(|c| c.algorithm == *alg) {
                r = r.with(header, &c.to_header_value());
            }
        }
        r
    }

    /// Counts a failed authentication against the user and the source; the
    /// failure that locks either is answered with the lockout.
    fn failure(&mut self, ctx: &Ctx<'_>, src: IpAddr, ukey: String) -> Reply {
        self.stats.auth_failures += 1;
        let lockout = &self.config.lockout;
        let src_locked = self.sources.record_failure(src, ctx.now, lockout);
        let user_locked = self.users.record_failure(ukey, ctx.now, lockout);
        self.stats.lockouts += u64::from(src_locked) + u64::from(user_locked);
        if src_locked {
            tracing::warn!(source = %src, "source locked out after repeated authentication failures");
            return too_many(lockout.lockout_secs);
        }
        if user_locked {
            tracing::warn!("user locked out after repeated authentication failures");
            return Reply::new(403, "Forbidden (locked out)");
        }
        self.challenge(ctx, false)
    }

    /// Reads one Contact's expiry, q, instance and reg-id.
    fn contact(&self, na: &NameAddr<'_>, header_expires: Option<u32>) -> Result<ContactReq, Reply> {
        let expires = match na.params.get("expires") {
            None => header_expires.unwrap_or(self.config.default_expires),
            Some(Some(v)) => {
                parse_delta_seconds(v).map_err(|_| Reply::bad("Bad Request (expires)"))?
            }
            Some(None) => return Err(Reply::bad("Bad Request (expires)")),
        };
        if expires != 0 && expires < self.config.min_expires {
            return Err(Reply::new(423, "Interval Too Brief")
                .with(HeaderName::MinExpires, &self.config.min_expires.to_string()));
        }
        let q = match na.params.get("q") {
            None => None,
            Some(v) => Some(
                v.and_then(parse_q)
                    .ok_or_else(|| Reply::bad("Bad Request (q)"))?,
            ),
        };
        let instance = match na.params.get("+sip.instance") {
            None => None,
            Some(None) => return Err(Reply::bad("Bad Request (+sip.instance)")),
            Some(Some(_)) => na.params.get_unquoted("+sip.instance").map(str::to_owned),
        };
        let reg_id = match na.params.get("reg-id") {
            None => None,
            Some(v) => Some(
                v.and_then(|v| parse_bounded(v, MAX_REG_ID).ok())
                    .filter(|r| *r > 0)
                    .ok_or_else(|| Reply::bad("Bad Request (reg-id)"))? as u32,
            ),
        };
        if reg_id.is_some() && instance.is_none() {
            return Err(Reply::bad("Bad Request (reg-id without +sip.instance)"));
        }
        Ok(ContactReq {
            uri: na.uri_raw.to_owned(),
            expires: expires.min(self.config.max_expires),
            q,
            instance,
            reg_id,
        })
    }

    /// True when `host` is the realm's domain.
    fn serves(&self, host: &Host<'_>) -> bool {
        host.to_string().eq_ignore_ascii_case(&self.config.realm)
    }

    /// A 200 listing `aor`'s bindings as of `now` (RFC 3261 §10.3 step 8).
    #[allow(clippy::too_many_arguments)]
    fn ok(
        &self,
        req: &Message,
        tag: &str,
        aor: &Aor,
        now: u64,
        state: &State,
        echo_path: &[String],
        outbound: bool,
    ) -> Message {
        let mut r = req.response(200, "OK", Some(tag));
        for b in state.bindings(aor, now) {
            r = r.with(HeaderName::Contact, &contact_value(b, now));
        }
        if !echo_path.is_empty() {
            r = r.with(HeaderName::Path, &echo_path.join(", "));
        }
        if outbound {
            r = r.with(HeaderName::Require, "outbound");
        }
        r.with(HeaderName::Supported, "path, outbound")
            .with(HeaderName::Date, &http_date(now))
    }
}

/// One Contact of a REGISTER, read and checked.
struct ContactReq {
    uri: String,
    expires: u32,
    q: Option<u16>,
    instance: Option<String>,
    reg_id: Option<u32>,
}

fn too_many(retry_after: u64) -> Reply {
    Reply::new(429, "Too Many Requests").with(HeaderName::RetryAfter, &retry_after.to_string())
}

/// True when the request lists `tag` in Supported.
fn supports(req: &Message, tag: &str) -> bool {
    req.values(HeaderName::Supported)
        .any(|t| t.trim().eq_ignore_ascii_case(tag))
}

/// The lockout key of a source: the address, IPv6 by /64 (one subscriber's
/// prefix), IPv4-mapped IPv6 as IPv4.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The lockout key of a user name: at most [`MAX_USER_KEY`] bytes of it.
fn user_key(name: &str) -> String {
    let mut end = name.len().min(MAX_USER_KEY);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// Parses a `qvalue` (RFC 3261 §25.1) into thousandths.
fn parse_q(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = if frac.is_empty() {
        0
    } else {
        frac.parse::<u16>().ok()? * 10u16.pow(3 - frac.len() as u32)
    };
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Formats thousandths as a qvalue (`1`, `0.5`, `0.125`).
fn format_q(q: u16) -> String {
    if q >= 1000 {
        return "1".to_owned();
    }
    let s = format!("0.{q:03}");
    let s = s.trim_end_matches('0');
    if s.ends_with('.') {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// A Contact value of the 200: the URI with its remaining expiry.
fn contact_value(b: &Binding, now: u64) -> String {
    let mut v = format!("<{}>;expires={}", b.contact, b.remaining(now));
    if let Some(q) = b.q {
        v.push_str(";q=");
        v.push_str(&format_q(q));
    }
    if let Some(i) = &b.instance {
        v.push_str(&format!(";+sip.instance=\"{i}\""));
    }
    if let Some(r) = b.reg_id {
        v.push_str(&format!(";reg-id={r}"));
    }
    v
}

/// An RFC 1123 date (RFC 3261 §20.17), e.g. `Sat, 13 Nov 2010 23:29:00 GMT`.
fn http_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from a day count (H. Hinnant's algorithm), day 0 = 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[((days + 4) % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

/// Failure counts per key with lockout, bounded: when full, the least
/// recently failed key is forgotten.
#[derive(Debug)]
struct FailureTable<K> {
    records: HashMap<K, Record>,
    /// Keys by the sequence number of their last failure, oldest first.
    order: BTreeMap<u64, K>,
    next_seq: u64,
    capacity: usize,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    window_start: u64,
    failures: u32,
    locked_until: Option<u64>,
    seq: u64,
}

impl<K: Hash + Eq + Clone> FailureTable<K> {
    fn new(capacity: usize) -> Self {
        FailureTable {
            records: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            capacity: capacity.max(1),
        }
    }

    fn len(&self) -> usize {
        self.records.len()
    }

    /// When `key` is locked at `now`, the end of its lockout.
    fn locked_until(&self, key: &K, now: u64) -> Option<u64> {
        self.records
            .get(key)?
            .locked_until
            .filter(|until| *until > now)
    }

    /// Counts one failure; true when it starts a lockout.
    fn record_failure(&mut self, key: K, now: u64, cfg: &LockoutConfig) -> bool {
        if cfg.max_failures == 0 {
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(old) = self.records.get(&key) {
            self.order.remove(&old.seq);
        } else {
            while self.records.len() >= self.capacity {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.records.remove(&oldest);
            }
        }
        self.order.insert(seq, key.clone());
        let rec = self.records.entry(key).or_insert(Record {
            window_start: now,
            failures: 0,
            locked_until: None,
            seq,
        });
        rec.seq = seq;
        let lock_over = rec.locked_until.is_some_and(|until| until <= now);
        if lock_over || now.saturating_sub(rec.window_start) >= cfg.window_secs {
            *rec = Record {
                window_start: now,
                failures: 0,
                locked_until: None,
                seq,
            };
        }
        if rec.locked_until.is_some() {
            return false;
        }
        rec.failures += 1;
        if rec.failures >= cfg.max_failures {
            rec.locked_until = Some(now.saturating_add(cfg.lockout_secs));
            return true;
        }
        false
    }

    fn clear(&mut self, key: &K) {
        if let Some(r) = self.records.remove(key) {
            self.order.remove(&r.seq);
        }
    }

    /// Drops records whose window and lockout are over.
    fn purge(&mut self, now: u64, cfg: &LockoutConfig) {
        let order = &mut self.order;
        self.records.retain(|_, r| {
            let live = match r.locked_until {
                Some(until) => until > now,
                None => now.saturating_sub(r.window_start) < cfg.window_secs,
            };
            if !live {
                order.remove(&r.seq);
            }
            live
        });
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use sip::auth::{Algorithm, Challenge};
    use sip::msg::{Framing, Limits};

    use super::*;
    use crate::state::{Applied, MemStore, Store};

    const REALM: &str = "sipzone.local";
    const UA: &str = "127.0.0.1:5062";
    const T0: u64 = 1_700_000_000;

    /// A REGISTER under construction.
    struct Req {
        user: String,
        call_id: String,
        cseq: u32,
        headers: Vec<String>,
        proxied: bool,
    }

    impl Req {
        fn new(user: &str) -> Req {
            Req {
                user: user.into(),
                call_id: format!("{user}-call@ua"),
                cseq: 1,
                headers: Vec::new(),
                proxied: false,
            }
        }

        fn h(mut self, line: &str) -> Req {
            self.headers.push(line.into());
            self
        }

        fn proxied(mut self) -> Req {
            self.proxied = true;
            self
        }

        fn msg(&self, auth: Option<&str>) -> Message {
            let mut s = format!("REGISTER sip:{REALM} SIP/2.0\r\n");
            if self.proxied {
                s += &format!(
                    "Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKlb{}\r\n",
                    self.cseq
                );
            }
            s += &format!(
                "Via: SIP/2.0/UDP {UA};branch=z9hG4bKua{}\r\n\
                 Max-Forwards: 70\r\n\
                 From: <sip:{u}@{REALM}>;tag=ft\r\n\
                 To: <sip:{u}@{REALM}>\r\n\
                 Call-ID: {}\r\n\
                 CSeq: {} REGISTER\r\n",
                self.cseq,
                self.call_id,
                self.cseq,
                u = self.user
            );
            for h in &self.headers {
                s += h;
                s += "\r\n";
            }
            if let Some(a) = auth {
                s += &format!("Authorization: {a}\r\n");
            }
            s += "Content-Length: 0\r\n\r\n";
            Message::parse(Bytes::from(s), Framing::Datagram, &Limits::default()).unwrap()
        }
    }

    struct H {
        reg: Registrar,
        store: MemStore,
        now: u64,
        rnd: u64,
    }

    fn config() -> RegistrarConfig {
        RegistrarConfig::new(REALM, "n1")
    }

    impl H {
        fn new() -> H {
            H::with(config())
        }

        fn with(cfg: RegistrarConfig) -> H {
            let mut d = Directory::new();
            d.add_with_password("alice", REALM, "alice-pw");
            d.add_with_password("bob", REALM, "bob-pw");
            let key = NonceKey::new(b"a test cluster secret").unwrap();
            H {
                reg: Registrar::new(cfg, d, key),
                store: MemStore::new(),
                now: T0,
                rnd: 0,
            }
        }

        fn send_from(&mut self, src: &str, msg: &Message) -> Outcome {
            self.rnd += 1;
            let random = self.rnd.to_be_bytes();
            let src: SocketAddr = src.parse().unwrap();
            self.reg
                .handle(self.now, random, src, "UDP", msg, self.store.state())
        }

        /// Sends and, for a proposal, commits it and returns the 200.
        fn exchange(&mut self, src: &str, msg: &Message) -> Message {
            match self.send_from(src, msg) {
                Outcome::Respond(m) => m,
                Outcome::Propose { entry, pending } => {
                    let id = entry.id;
                    assert_eq!(pending.id(), id);
                    self.store.propose(entry);
                    assert_eq!(self.store.take_committed(), vec![id]);
                    self.reg.committed(pending, self.store.state())
                }
            }
        }

        /// Gets a challenge for `req` (bumping its CSeq) and returns it for `alg`.
        fn challenge(&mut self, src: &str, req: &mut Req, alg: Algorithm) -> Challenge {
            let r = self.exchange(src, &req.msg(None));
            req.cseq += 1;
            assert_eq!(r.status(), Some(401), "{r}");
            challenges(&r)
                .into_iter()
                .find(|c| c.algorithm == alg)
                .unwrap()
        }

        /// Sends `req` answering `ch` as `user`/`pw` (bumping its CSeq).
        fn answer(
            &mut self,
            src: &str,
            req: &mut Req,
            ch: &Challenge,
            user: &str,
            pw: &str,
            nc: u32,
        ) -> Message {
            let a = authz(ch, user, pw, nc);
            let r = self.exchange(src, &req.msg(Some(&a)));
            req.cseq += 1;
            r
        }

        /// Challenge then answer.
        fn register(&mut self, src: &str, req: &mut Req, user: &str, pw: &str) -> Message {
            let ch = self.challenge(src, req, Algorithm::Sha256);
            self.answer(src, req, &ch, user, pw, 1)
        }

        fn bindings(&self, user: &str) -> Vec<Binding> {
            let aor = Aor::parse(&format!("sip:{user}@{REALM}")).unwrap();
            self.store
                .state()
                .bindings(&aor, self.now)
                .into_iter()
                .cloned()
                .collect()
        }
    }

    fn authz(ch: &Challenge, user: &str, pw: &str, nc: u32) -> String {
        sip::auth::respond(
            ch,
            "REGISTER",
            &format!("sip:{REALM}"),
            user,
            pw,
            "cn0nce",
            nc,
        )
        .unwrap()
    }

    fn challenges(r: &Message) -> Vec<Challenge> {
        r.values(HeaderName::WwwAuthenticate)
            .map(|v| Challenge::parse(v).unwrap())
            .collect()
    }

    fn contacts(r: &Message) -> Vec<String> {
        r.values(HeaderName::Contact).map(str::to_owned).collect()
    }

    #[test]
    fn challenge_then_success_sha256_and_md5() {
        for alg in [Algorithm::Sha256, Algorithm::Md5] {
            let mut h = H::new();
            let mut req = Req::new("alice").h("Contact: <sip:alice@127.0.0.1:5062>");
            let first = h.exchange(UA, &req.msg(None));
            assert_eq!(first.status(), Some(401));
            assert!(first.to().unwrap().tag().is_some());
            let chs = challenges(&first);
            assert_eq!(
                chs.iter().map(|c| c.algorithm).collect::<Vec<_>>(),
                [Algorithm::Sha256, Algorithm::Md5]
            );
            assert!(chs.iter().all(|c| c.realm == REALM && !c.stale));
            req.cseq += 1;
            let ch = chs.into_iter().find(|c| c.algorithm == alg).unwrap();
            let ok = h.answer(UA, &mut req, &ch, "alice", "alice-pw", 1);
            assert_eq!(ok.status(), Some(200), "{alg}: {ok}");
            assert_eq!(h.bindings("alice").len(), 1);
            let s = h.reg.stats();
            assert_eq!((s.challenges, s.auth_failures, s.registered), (1, 0, 1));
        }
    }

    #[test]
    fn digest_uri_may_name_this_registrar_by_address_or_realm_only() {
        let mut cfg = config();
        cfg.local_addrs = vec!["127.0.0.1:5060".parse().unwrap()];
        cfg.algorithms = vec![Algorithm::Md5, Algorithm::Sha256];
        let mut h = H::with(cfg);
        let mut req = Req::new("alice").h("Contact: <sip:alice@127.0.0.1:5062>");
        let first = h.exchange(UA, &req.msg(None));
        let chs = challenges(&first);
        // the configured order is the challenge order
        assert_eq!(chs[0].algorithm, Algorithm::Md5);
        req.cseq += 1;
        for (uri, ok) in [
            ("sip:127.0.0.1:5060", true),
            ("sip:127.0.0.1:5070", false),
            ("sip:alice@127.0.0.1:5060", false),
            ("sip:elsewhere.example", false),
        ] {
            let a =
                sip::auth::respond(&chs[0], "REGISTER", uri, "alice", "alice-pw", "c", 1).unwrap();
            let r = h.exchange(UA, &req.msg(Some(&a)));
            req.cseq += 1;
            assert_eq!(r.status() == Some(200), ok, "{uri}: {r}");
        }
    }

    #[test]
    fn callers_authenticate_with_proxy_authorization_as_their_from_user() {
        let mut h = H::new();
        let invite = |from: &str, auth: Option<String>| {
            let mut text = format!(
                "INVITE sip:bob@{REALM} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKc1\r\n\
                 From: <sip:{from}@{REALM}>;tag=f1\r\nTo: <sip:bob@{REALM}>\r\nCall-ID: c1\r\n\
                 CSeq: 1 INVITE\r\nContact: <sip:{from}@127.0.0.1:5062>\r\nMax-Forwards: 70\r\n"
            );
            if let Some(a) = auth {
                text += &format!("Proxy-Authorization: {a}\r\n");
            }
            text += "Content-Length: 0\r\n\r\n";
            Message::parse(
                bytes::Bytes::from(text),
                sip::msg::Framing::Datagram,
                &Default::default(),
            )
            .unwrap()
        };
        let src: SocketAddr = UA.parse().unwrap();
        let state = State::new();
        // no credentials: 407 with Proxy-Authenticate, one challenge per algorithm
        let r = h
            .reg
            .authenticate_caller(h.now, [1; 8], src, "UDP", &invite("alice", None), &state)
            .unwrap_err();
        assert_eq!(r.status(), Some(407));
        let chs: Vec<Challenge> = r
            .values(HeaderName::ProxyAuthenticate)
            .map(|v| Challenge::parse(v).unwrap())
            .collect();
        assert_eq!(chs.len(), 2);
        let answer = |user: &str, pw: &str, nc: u32| {
            sip::auth::respond(
                &chs[0],
                "INVITE",
                &format!("sip:bob@{REALM}"),
                user,
                pw,
                "cn",
                nc,
            )
            .unwrap()
        };
        // the right password for the From user: accepted
        let ok = h.reg.authenticate_caller(
            h.now,
            [2; 8],
            src,
            "UDP",
            &invite("alice", Some(answer("alice", "alice-pw", 1))),
            &state,
        );
        assert!(ok.is_ok(), "{ok:?}");
        // bob's valid credentials cannot call as alice
        let r = h
            .reg
            .authenticate_caller(
                h.now,
                [3; 8],
                src,
                "UDP",
                &invite("alice", Some(answer("bob", "bob-pw", 2))),
                &state,
            )
            .unwrap_err();
        assert_eq!(r.status(), Some(403));
        // a wrong password is challenged again and counted
        let before = h.reg.stats().auth_failures;
        let r = h
            .reg
            .authenticate_caller(
                h.now,
                [4; 8],
                src,
                "UDP",
                &invite("alice", Some(answer("alice", "nope", 3))),
                &state,
            )
            .unwrap_err();
        assert_eq!(r.status(), Some(407));
        assert_eq!(h.reg.stats().auth_failures, before + 1);
    }

    #[test]
    fn an_algorithm_not_offered_is_not_verified() {
        let mut cfg = config();
        cfg.algorithms = vec![Algorithm::Sha256];
        let mut h = H::with(cfg);
        let mut req = Req::new("alice").h("Contact: <sip:alice@127.0.0.1:5062>");
        let first = h.exchange(UA, &req.msg(None));
        let chs = challenges(&first);
        assert_eq!(chs.len(), 1);
        req.cseq += 1;
        let md5 = Challenge {
            algorithm: Algorithm::Md5,
            ..chs[0].clone()
        };
        let r = h.exchange(UA, &req.msg(Some(&authz(&md5, "alice", "alice-pw", 1))));
        assert_eq!(r.status(), Some(401));
        assert_eq!(h.bindings("alice").len(), 0);
    }

    #[test]
    fn ok_only_after_commit() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@127.0.0.1:5062>;expires=600");
        let ch = h.challenge(UA, &mut req, Algorithm::Sha256);
        let msg = req.msg(Some(&authz(&ch, "alice", "alice-pw", 1)));
        let Outcome::Propose { entry, pending } = h.send_from(UA, &msg) else {
            panic!("expected a proposal");
        };
        // Nothing is written until the store applies the entry.
        assert_eq!(h.store.state().binding_count(), 0);
        assert_eq!(pending.id(), entry.id);
        assert_eq!(pending.aor().as_str(), "sip:alice@sipzone.local");
        let [Command::UpsertBinding { binding, .. }] = entry.cmds.as_slice() else {
            panic!("one upsert expected: {entry:?}");
        };
        assert_eq!(binding.received.as_deref(), Some("udp:127.0.0.1:5062"));
        assert_eq!(binding.node, "n1");
        assert_eq!(binding.expires_at_unix, T0 + 600);
        // A second client's proposal commits first: answers follow ids, not order.
        let mut bob = Req::new("bob").h("Contact: <sip:bob@127.0.0.1:5070>");
        let ch = h.challenge("127.0.0.1:5070", &mut bob, Algorithm::Md5);
        let bmsg = bob.msg(Some(&authz(&ch, "bob", "bob-pw", 1)));
        let Outcome::Propose {
            entry: bentry,
            pending: bpending,
        } = h.send_from("127.0.0.1:5070", &bmsg)
        else {
            panic!("expected a proposal");
        };
        assert_ne!(bentry.id, entry.id);
        h.store.propose(entry);
        h.store.propose(bentry);
        let mut waiting: HashMap<ProposalId, Pending> =
            [(pending.id(), pending), (bpending.id(), bpending)].into();
        let mut answers = Vec::new();
        for id in h.store.take_committed().into_iter().rev() {
            let p = waiting.remove(&id).unwrap();
            answers.push(h.reg.committed(p, h.store.state()));
        }
        assert_eq!(answers[0].to().unwrap().uri_raw, "sip:bob@sipzone.local");
        assert_eq!(
            contacts(&answers[0]),
            ["<sip:bob@127.0.0.1:5070>;expires=3600"]
        );
        assert_eq!(
            contacts(&answers[1]),
            ["<sip:alice@127.0.0.1:5062>;expires=600"]
        );
        assert!(answers.iter().all(|a| a.status() == Some(200)));
        assert_eq!(
            answers[1].header(HeaderName::Date),
            Some("Tue, 14 Nov 2023 22:13:20 GMT")
        );
    }

    #[test]
    fn ok_lists_every_binding_with_remaining_expiry() {
        let mut h = H::new();
        let mut a = Req::new("alice")
            .h("Contact: <sip:alice@10.0.0.1:5060>")
            .h("Expires: 600");
        assert_eq!(
            h.register(UA, &mut a, "alice", "alice-pw").status(),
            Some(200)
        );
        h.now += 100;
        let mut b = Req::new("alice")
            .h("Contact: <sip:alice@10.0.0.2:5060>;expires=300")
            .h("Expires: 600");
        b.call_id = "other-phone".into();
        let ok = h.register(UA, &mut b, "alice", "alice-pw");
        assert_eq!(
            contacts(&ok),
            [
                "<sip:alice@10.0.0.1:5060>;expires=500",
                "<sip:alice@10.0.0.2:5060>;expires=300"
            ]
        );
        assert_eq!(ok.header(HeaderName::Supported), Some("path, outbound"));
        assert!(ok.header(HeaderName::Require).is_none());
    }

    #[test]
    fn refresh_updates_the_binding() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@10.0.0.1:5060;transport=udp>");
        let ch = h.challenge(UA, &mut req, Algorithm::Sha256);
        assert_eq!(
            h.answer(UA, &mut req, &ch, "alice", "alice-pw", 1).status(),
            Some(200)
        );
        h.now += 200;
        // Same Call-ID, higher CSeq, same (still fresh) nonce with the next count.
        let ok = h.answer(UA, &mut req, &ch, "alice", "alice-pw", 2);
        assert_eq!(ok.status(), Some(200), "{ok}");
        let list = h.bindings("alice");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].expires_at_unix, h.now + 3600);
        assert_eq!(list[0].cseq, 3);
        assert_eq!(
            contacts(&ok),
            ["<sip:alice@10.0.0.1:5060;transport=udp>;expires=3600"]
        );
    }

    #[test]
    fn same_call_id_without_higher_cseq_fails_with_500() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@10.0.0.1>");
        req.cseq = 10;
        let ch = h.challenge(UA, &mut req, Algorithm::Sha256);
        assert_eq!(
            h.answer(UA, &mut req, &ch, "alice", "alice-pw", 1).status(),
            Some(200)
        );
        req.cseq = 5;
        let r = h.answer(UA, &mut req, &ch, "alice", "alice-pw", 2);
        assert_eq!(r.status(), Some(500));
        assert_eq!(h.bindings("alice")[0].cseq, 11);
    }

    #[test]
    fn expires_zero_removes_one_binding() {
        let mut h = H::new();
        let mut req = Req::new("alice")
            .h("Contact: <sip:alice@10.0.0.1>, <sip:alice@10.0.0.2>")
            .h("Expires: 600");
        assert_eq!(
            h.register(UA, &mut req, "alice", "alice-pw").status(),
            Some(200)
        );
        assert_eq!(h.bindings("alice").len(), 2);
        req.headers = vec!["Contact: <sip:alice@10.0.0.1>;expires=0".into()];
        let ok = h.register(UA, &mut req, "alice", "alice-pw");
        assert_eq!(contacts(&ok), ["<sip:alice@10.0.0.2>;expires=600"]);
        assert_eq!(h.store.state().binding_count(), 1);
    }

    #[test]
    fn star_removes_every_binding() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@10.0.0.1>, <sip:alice@10.0.0.2>");
        assert_eq!(
            h.register(UA, &mut req, "alice", "alice-pw").status(),
            Some(200)
        );
        req.headers = vec!["Contact: *".into(), "Expires: 0".into()];
        let ok = h.register(UA, &mut req, "alice", "alice-pw");
        assert_eq!(ok.status(), Some(200));
        assert!(contacts(&ok).is_empty());
        assert_eq!(h.store.state().binding_count(), 0);
        // `*` with a non-zero expiry is malformed.
        req.headers = vec!["Contact: *".into(), "Expires: 60".into()];
        assert_eq!(h.exchange(UA, &req.msg(None)).status(), Some(400));
    }

    #[test]
    fn too_brief_is_423_and_too_long_is_clamped() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@10.0.0.1>;expires=30");
        let r = h.register(UA, &mut req, "alice", "alice-pw");
        assert_eq!(r.status(), Some(423));
        assert_eq!(r.header(HeaderName::MinExpires), Some("60"));
        assert_eq!(h.reg.stats().proposals, 0);
        req.headers = vec![
            "Contact: <sip:alice@10.0.0.1>".into(),
            "Expires: 7200".into(),
        ];
        let ok = h.register(UA, &mut req, "alice", "alice-pw");
        assert_eq!(contacts(&ok), ["<sip:alice@10.0.0.1>;expires=3600"]);
    }

    #[test]
    fn bindings_ordered_by_q() {
        let mut h = H::new();
        let mut req = Req::new("alice")
            .h("Contact: <sip:low@10.0.0.1>;q=0.1")
            .h("Contact: <sip:none@10.0.0.2>, <sip:high@10.0.0.3>;q=0.9");
        let ok = h.register(UA, &mut req, "alice", "alice-pw");
        assert_eq!(
            contacts(&ok),
            [
                "<sip:none@10.0.0.2>;expires=3600",
                "<sip:high@10.0.0.3>;expires=3600;q=0.9",
                "<sip:low@10.0.0.1>;expires=3600;q=0.1"
            ]
        );
        req.headers = vec!["Contact: <sip:x@10.0.0.1>;q=1.5".into()];
        assert_eq!(
            h.register(UA, &mut req, "alice", "alice-pw").status(),
            Some(400)
        );
    }

    #[test]
    fn path_is_stored_and_echoed() {
        let mut h = H::new();
        let mut req = Req::new("alice")
            .proxied()
            .h("Path: <sip:tok@lb1.sipzone.local;lr>")
            .h("Supported: path")
            .h("Contact: <sip:alice@10.0.0.1>");
        let ok = h.register("192.0.2.10:5060", &mut req, "alice", "alice-pw");
        assert_eq!(
            ok.header(HeaderName::Path),
            Some("<sip:tok@lb1.sipzone.local;lr>")
        );
        let b = &h.bindings("alice")[0];
        assert_eq!(b.path, ["<sip:tok@lb1.sipzone.local;lr>"]);
        assert_eq!(b.received.as_deref(), Some("udp:192.0.2.10:5060"));
        // Without Supported: path the Path is kept but not echoed.
        req.headers.retain(|l| !l.starts_with("Supported"));
        let ok = h.register("192.0.2.10:5060", &mut req, "alice", "alice-pw");
        assert_eq!(ok.status(), Some(200));
        assert!(ok.header(HeaderName::Path).is_none());
    }

    #[test]
    fn instance_and_reg_id_replace_the_old_flow() {
        let mut h = H::new();
        let inst = "+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\"";
        let mut req = Req::new("alice")
            .proxied()
            .h("Path: <sip:tok1@lb1.sipzone.local;lr;ob>")
            .h("Supported: path, outbound")
            .h(&format!(
                "Contact: <sip:alice@10.0.0.1:5060;ob>;{inst};reg-id=1"
            ));
        let ok = h.register("192.0.2.10:5060", &mut req, "alice", "alice-pw");
        assert_eq!(ok.status(), Some(200), "{ok}");
        assert_eq!(ok.header(HeaderName::Require), Some("outbound"));
        assert_eq!(
            contacts(&ok),
            [format!(
                "<sip:alice@10.0.0.1:5060;ob>;expires=3600;{inst};reg-id=1"
            )]
        );
        // The same instance and reg-id over a new flow, from another address.
        req.headers = vec![
            "Path: <sip:tok2@lb2.sipzone.local;lr;ob>".into(),
            "Supported: path, outbound".into(),
            format!("Contact: <sip:alice@10.0.0.9:6000;ob>;{inst};reg-id=1"),
        ];
        h.register("192.0.2.11:5060", &mut req, "alice", "alice-pw");
        let list = h.bindings("alice");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].contact, "sip:alice@10.0.0.9:6000;ob");
        assert_eq!(list[0].path, ["<sip:tok2@lb2.sipzone.local;lr;ob>"]);
        assert_eq!(list[0].reg_id, Some(1));
        // A second reg-id is a second flow.
        req.headers[2] = format!("Contact: <sip:alice@10.0.0.9:6001;ob>;{inst};reg-id=2");
        h.register("192.0.2.11:5060", &mut req, "alice", "alice-pw");
        assert_eq!(h.bindings("alice").len(), 2);
    }

    #[test]
    fn reg_id_through_an_edge_without_ob() {
        let mut h = H::new();
        let contact = "Contact: <sip:alice@10.0.0.1>;+sip.instance=\"<urn:uuid:1>\";reg-id=1";
        let mut req = Req::new("alice")
            .proxied()
            .h("Path: <sip:lb1.sipzone.local;lr>")
            .h("Supported: path, outbound")
            .h(contact);
        let r = h.register("192.0.2.10:5060", &mut req, "alice", "alice-pw");
        assert_eq!(r.status(), Some(439));
        // A UA that does not claim outbound: the reg-id is ignored.
        req.headers = vec!["Path: <sip:lb1.sipzone.local;lr>".into(), contact.into()];
        let ok = h.register("192.0.2.10:5060", &mut req, "alice", "alice-pw");
        assert_eq!(ok.status(), Some(200));
        assert!(ok.header(HeaderName::Require).is_none());
        assert_eq!(h.bindings("alice")[0].reg_id, None);
        // reg-id without an instance is malformed.
        req.headers = vec!["Contact: <sip:alice@10.0.0.1>;reg-id=1".into()];
        assert_eq!(
            h.register(UA, &mut req, "alice", "alice-pw").status(),
            Some(400)
        );
    }

    #[test]
    fn wrong_password_is_401_and_counted() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@10.0.0.1>");
        let r = h.register(UA, &mut req, "alice", "wrong");
        assert_eq!(r.status(), Some(401));
        assert!(challenges(&r).iter().all(|c| !c.stale));
        assert_eq!(h.reg.stats().auth_failures, 1);
        assert_eq!(h.store.state().binding_count(), 0);
        assert_eq!(h.reg.tracked(), (1, 1));
        // Success clears the user's count, not the source's.
        assert_eq!(
            h.register(UA, &mut req, "alice", "alice-pw").status(),
            Some(200)
        );
        assert_eq!(h.reg.tracked(), (0, 1));
    }

    #[test]
    fn unknown_user_is_401_like_a_wrong_password() {
        let mut h = H::new();
        let mut req = Req::new("mallory").h("Contact: <sip:m@10.0.0.1>");
        let r = h.register(UA, &mut req, "mallory", "guess");
        assert_eq!(r.status(), Some(401));
        assert_eq!(r.reason(), Some("Unauthorized"));
        assert!(challenges(&r).iter().all(|c| !c.stale));
        assert_eq!(h.reg.stats().auth_failures, 1);
        // A forged nonce is answered alike for known and unknown users: a new
        // challenge, no failure counted.
        let forged = Challenge {
            nonce: "ab".repeat(32),
            ..challenges(&r)[0].clone()
        };
        for user in ["mallory", "alice"] {
            let mut req = Req::new(user).h("Contact: <sip:m@10.0.0.1>");
            let r = h.answer(UA, &mut req, &forged, user, "guess", 1);
            assert_eq!(r.status(), Some(401));
        }
        assert_eq!(h.reg.stats().auth_failures, 1);
    }

    #[test]
    fn user_lockout_is_403_while_others_register() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@10.0.0.1>");
        // Five failures from five addresses: the user locks, no source does.
        for i in 1..=5 {
            let src = format!("198.51.100.{i}:5060");
            let r = h.register(&src, &mut req, "alice", "wrong");
            let want = if i < 5 { 401 } else { 403 };
            assert_eq!(r.status(), Some(want), "attempt {i}");
        }
        assert_eq!(h.reg.stats().lockouts, 1);
        // The right password does not help while locked, from anywhere (a
        // locked user is not even challenged: take a nonce from bob's request).
        let mut bob = Req::new("bob").h("Contact: <sip:bob@10.0.0.2>");
        let ch = h.challenge("203.0.113.7:5060", &mut bob, Algorithm::Sha256);
        let r = h.answer("203.0.113.7:5060", &mut req, &ch, "alice", "alice-pw", 1);
        assert_eq!(r.status(), Some(403));
        assert_eq!(r.reason(), Some("Forbidden (locked out)"));
        let r = h.exchange("203.0.113.7:5060", &req.msg(None));
        assert_eq!(r.status(), Some(403));
        // Another user from another address still registers.
        assert_eq!(
            h.register("203.0.113.8:5060", &mut bob, "bob", "bob-pw")
                .status(),
            Some(200)
        );
        // The lockout ends after lockout_secs.
        h.now += 301;
        assert_eq!(
            h.register(UA, &mut req, "alice", "alice-pw").status(),
            Some(200)
        );
    }

    #[test]
    fn source_lockout_is_429_with_retry_after() {
        let mut h = H::new();
        let attacker = "198.51.100.66:5060";
        let users = ["alice", "bob", "carol", "dave", "erin"];
        for (i, u) in users.iter().enumerate() {
            let mut req = Req::new(u).h("Contact: <sip:x@10.0.0.1>");
            let r = h.register(attacker, &mut req, u, "guess");
            let want = if i < 4 { 401 } else { 429 };
            assert_eq!(r.status(), Some(want), "attempt {i}");
        }
        h.now += 100;
        let mut req = Req::new("alice").h("Contact: <sip:x@10.0.0.1>");
        let r = h.exchange(attacker, &req.msg(None));
        assert_eq!(r.status(), Some(429));
        assert_eq!(r.header(HeaderName::RetryAfter), Some("200"));
        // Other sources are unaffected.
        assert_eq!(
            h.register(UA, &mut req, "alice", "alice-pw").status(),
            Some(200)
        );
        assert_eq!(h.reg.stats().locked_out, 1);
        assert_eq!(h.reg.stats().lockouts, 1);
    }

    #[test]
    fn ipv6_sources_lock_by_prefix() {
        assert_eq!(
            source_key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            source_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn stale_nonce_is_401_stale_and_not_a_failure() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@10.0.0.1>");
        let ch = h.challenge(UA, &mut req, Algorithm::Sha256);
        h.now += 301;
        let r = h.answer(UA, &mut req, &ch, "alice", "alice-pw", 1);
        assert_eq!(r.status(), Some(401));
        let chs = challenges(&r);
        assert_eq!(chs.len(), 2);
        assert!(chs.iter().all(|c| c.stale));
        assert_eq!(h.reg.stats().auth_failures, 0);
        // The fresh nonce works.
        let ok = h.answer(UA, &mut req, &chs[0], "alice", "alice-pw", 1);
        assert_eq!(ok.status(), Some(200));
    }

    #[test]
    fn query_without_contact_answers_at_once() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@10.0.0.1>;expires=120");
        let ch = h.challenge(UA, &mut req, Algorithm::Sha256);
        assert_eq!(
            h.answer(UA, &mut req, &ch, "alice", "alice-pw", 1).status(),
            Some(200)
        );
        h.now += 20;
        req.headers.clear();
        let msg = req.msg(Some(&authz(&ch, "alice", "alice-pw", 2)));
        let Outcome::Respond(ok) = h.send_from(UA, &msg) else {
            panic!("a query proposes nothing");
        };
        assert_eq!(ok.status(), Some(200));
        assert_eq!(contacts(&ok), ["<sip:alice@10.0.0.1>;expires=100"]);
        assert_eq!(h.reg.stats().proposals, 1);
    }

    #[test]
    fn idempotent_apply_of_the_same_entry() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@10.0.0.1>");
        let ch = h.challenge(UA, &mut req, Algorithm::Sha256);
        let msg = req.msg(Some(&authz(&ch, "alice", "alice-pw", 1)));
        let Outcome::Propose { entry, .. } = h.send_from(UA, &msg) else {
            panic!("expected a proposal");
        };
        let mut state = State::new();
        assert!(matches!(
            state.apply(&entry),
            Applied::Done { upserted: 1, .. }
        ));
        let once = state.clone();
        assert_eq!(state.apply(&entry), Applied::Duplicate);
        assert_eq!(state, once);
    }

    #[test]
    fn expired_bindings_disappear_and_are_dropped() {
        let mut h = H::new();
        let mut req = Req::new("alice").h("Contact: <sip:alice@10.0.0.1>;expires=60");
        assert_eq!(
            h.register(UA, &mut req, "alice", "alice-pw").status(),
            Some(200)
        );
        h.now += 60;
        assert!(h.bindings("alice").is_empty());
        assert_eq!(h.store.state().binding_count(), 1);
        assert_eq!(h.store.expire(h.now), 1);
        assert_eq!(h.store.state().binding_count(), 0);
    }

    #[test]
    fn domain_and_ownership_checks() {
        let mut h = H::new();
        let msg = Req::new("alice")
            .h("Contact: <sip:alice@10.0.0.1>")
            .msg(None)
            .to_string()
            .replace(
                "REGISTER sip:sipzone.local",
                "REGISTER sip:elsewhere.example",
            );
        let msg = Message::parse(Bytes::from(msg), Framing::Datagram, &Limits::default()).unwrap();
        assert_eq!(h.exchange(UA, &msg).status(), Some(404));
        // alice's credentials do not register bob.
        let mut req = Req::new("bob").h("Contact: <sip:alice@10.0.0.1>");
        let r = h.register(UA, &mut req, "alice", "alice-pw");
        assert_eq!(r.status(), Some(403));
        assert_eq!(h.store.state().binding_count(), 0);
        // Garbage credentials are a 400, not a failure.
        let msg = Req::new("alice").msg(Some("Digest username=\"alice"));
        assert_eq!(h.exchange(UA, &msg).status(), Some(400));
        assert_eq!(h.reg.stats().auth_failures, 0);
    }

    #[test]
    fn contact_limit_is_403() {
        let mut cfg = config();
        cfg.max_contacts_per_aor = 2;
        let mut h = H::with(cfg);
        let mut req = Req::new("alice").h("Contact: <sip:a@10.0.0.1>, <sip:b@10.0.0.2>");
        assert_eq!(
            h.register(UA, &mut req, "alice", "alice-pw").status(),
            Some(200)
        );
        req.headers = vec!["Contact: <sip:c@10.0.0.3>".into()];
        let r = h.register(UA, &mut req, "alice", "alice-pw");
        assert_eq!(r.status(), Some(403));
        // Replacing one while adding one stays within the limit.
        req.headers = vec!["Contact: <sip:a@10.0.0.1>;expires=0, <sip:c@10.0.0.3>".into()];
        assert_eq!(
            h.register(UA, &mut req, "alice", "alice-pw").status(),
            Some(200)
        );
        assert_eq!(h.bindings("alice").len(), 2);
    }

    #[test]
    fn failure_table_is_bounded_and_purged() {
        let cfg = LockoutConfig::default();
        let mut t: FailureTable<u32> = FailureTable::new(3);
        for k in 0..5 {
            t.record_failure(k, 100 + u64::from(k), &cfg);
        }
        assert_eq!(t.len(), 3);
        assert!(!t.records.contains_key(&0) && !t.records.contains_key(&1));
        assert_eq!(t.order.len(), 3);
        for _ in 0..4 {
            t.record_failure(2, 110, &cfg);
        }
        assert_eq!(t.locked_until(&2, 110), Some(410));
        t.purge(170, &cfg);
        assert_eq!(t.len(), 1);
        t.purge(410, &cfg);
        assert_eq!(t.len(), 0);
        assert!(t.order.is_empty());
    }

    #[test]
    fn formats() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(1_289_690_940), "Sat, 13 Nov 2010 23:29:00 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("1.000"), Some(1000));
        assert_eq!(parse_q("0."), Some(0));
        assert_eq!(parse_q("0.1234"), None);
        assert_eq!(parse_q("1.1"), None);
        assert_eq!(format_q(500), "0.5");
        assert_eq!(format_q(125), "0.125");
        assert_eq!(format_q(0), "0");
        assert_eq!(user_key(&"é".repeat(100)).len(), 128);
    }
}
