//! The balancer's routing core, sans-IO: every received message in, what to
//! send (or answer) out. It keeps no routing state: what a later request
//! needs is signed into the Record-Route, Path and Via values it inserts
//! ([`crate::token`]). The only state is the dispatcher (node health and
//! load) and the rate-limit buckets.
//!
//! Requests (RFC 3261 §16, stateless as §16.11 describes):
//!
//! | request | checks | goes to |
//! |---|---|---|
//! | any, User-Agent of a known scanner | | dropped |
//! | any, a Via of ours below the top | | 482 Loop Detected |
//! | any, Max-Forwards 0 | | 483 Too Many Hops |
//! | top Route ours, token does not verify | | 403, counted |
//! | top Route ours without a token (a preloaded outbound proxy) | | popped, then as below |
//! | top Route ours, from a node | | the flow in the token (a device), Record-Route added to dialog-creating requests |
//! | top Route ours, from elsewhere | | the owner node in the token if up, else an up node of another zone, else any up node |
//! | REGISTER | rate limit per source | node by hash of the AOR (To), Path added |
//! | initial INVITE | rate limit per source | node by hash of Call-ID, Record-Route added |
//! | any other (CANCEL, ACK of a non-2xx, OPTIONS, SUBSCRIBE...) | | node by hash of Call-ID (Record-Route on SUBSCRIBE, REFER) |
//! | from a node without our Route | | 403 (nodes reach devices only through a token) |
//! | no node up | | 503 with Retry-After |
//!
//! Refused requests get their response statelessly (To tag derived from the
//! request, so a retransmission gets the same answer); ACKs are never
//! answered. Rate limits answer 429 with Retry-After.
//!
//! Forwarded requests get Max-Forwards decremented and our Via on top, with
//! a branch derived from the incoming top Via (so retransmissions, the
//! CANCEL and the ACK of a non-2xx map to the branch of their INVITE at the
//! node) and the signed flow the request came from, where its responses go.
//!
//! Responses: the top Via must be ours and its token must verify; it is
//! removed and the response sent on the flow the token names (the client's
//! own TCP/TLS connection, or its UDP source address). Replies to our
//! OPTIONS probes go to the dispatcher. Anything else is dropped.
//!
//! Record-Route and Path: toward the nodes the balancer is reached on
//! `node_addr` over UDP. When the device side of a dialog uses another
//! transport or address, two Record-Route values are inserted (RFC 5658),
//! one per side, both with the same token, and both are removed when a
//! request comes back with them as Route.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use sha2::{Digest, Sha256};
use sip::dispatch::{self, DestId, DispatchConfig, Dispatcher, Health, Load, ProbeId};
use sip::flow::{Flow, Transport};
use sip::msg::{Header, HeaderName, Message, Method, NameAddr, Uri, Via};
use sip::transport::canonical;

use crate::limit::{RateConfig, RateLimiter, is_scanner};
use crate::token::{self, FlowToken, TokenKey};

/// Branch prefix of requests the balancer forwards.
const FWD_BRANCH: &str = "z9hG4bKsz-";
/// Branch prefix of the balancer's OPTIONS probes.
const PROBE_BRANCH: &str = "z9hG4bKszp";

/// One zone-node the balancer sends to.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// Its name (unique; the owner name in tokens and the hash identity).
    pub name: String,
    /// Its zone.
    pub zone: String,
    /// Its SIP address (UDP).
    pub addr: SocketAddr,
    /// Relative weight (> 0).
    pub weight: f64,
}

/// What the core needs to know.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The balancer's UDP address toward the nodes (and for UDP devices).
    pub node_addr: SocketAddr,
    /// The listen address per device transport (the first of each).
    pub device_addrs: Vec<(Transport, SocketAddr)>,
    /// The zone-nodes.
    pub nodes: Vec<NodeSpec>,
    /// Probe and selection parameters.
    pub dispatch: DispatchConfig,
    /// REGISTER rate limit per source.
    pub register_limit: RateConfig,
    /// Initial INVITE rate limit per source.
    pub invite_limit: RateConfig,
    /// User-Agent substrings that are dropped (lowercase).
    pub scanners: Vec<String>,
    /// Retry-After (seconds) on 503 when no node is up.
    pub retry_after_secs: u32,
}

/// Why the core could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A dispatcher parameter or node is unusable.
    #[error(transparent)]
    Dispatch(#[from] dispatch::DispatchError),
    /// Two nodes share an address.
    #[error("two nodes at {0}")]
    DuplicateAddr(SocketAddr),
    /// A node name is too long for a token.
    #[error("node name {0:?} is longer than 64 octets")]
    LongName(String),
}

/// What the core asks of its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `msg` (a forwarded request or response, or a probe) on `flow`.
    Send {
        /// Where.
        flow: Flow,
        /// What.
        msg: Message,
    },
    /// Answer a request that arrived on `flow` with `msg` (RFC 3261
    /// §18.2.2: the driver sends it like any response to that flow).
    Reply {
        /// The flow the request arrived on.
        flow: Flow,
        /// The response.
        msg: Message,
    },
    /// A node changed health.
    Health {
        /// Its name.
        node: String,
        /// Its zone.
        zone: String,
        /// Up or down.
        health: Health,
    },
}

/// Counters of the core's decisions (the driver turns them into metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests forwarded to a node.
    pub to_node: u64,
    /// Requests forwarded to a device.
    pub to_device: u64,
    /// Responses forwarded.
    pub responses: u64,
    /// Requests refused because their token did not verify (403).
    pub bad_tokens: u64,
    /// Responses dropped: not ours, or a Via token that did not verify.
    pub responses_dropped: u64,
    /// Requests refused by a rate limit (429).
    pub rate_limited: u64,
    /// Requests dropped for a scanner User-Agent.
    pub scanners: u64,
    /// Requests refused for a loop (482) or Max-Forwards 0 (483).
    pub loops: u64,
    /// Requests refused because no node was up (503).
    pub no_node: u64,
    /// Requests from a node without a token of ours (403).
    pub unroutable: u64,
    /// In-dialog requests sent to another node because the owner was down.
    pub rerouted: u64,
}

/// Where a request goes, decided from its Route and method.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Node(DestId),
    Device(FlowToken),
}

/// The routing core.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    key: TokenKey,
    dispatcher: Dispatcher,
    by_addr: HashMap<SocketAddr, DestId>,
    node_flows: Vec<Flow>,
    probes_sent_to: HashMap<u64, DestId>,
    register_limit: RateLimiter,
    invite_limit: RateLimiter,
    out: VecDeque<Output>,
    stats: Stats,
}

impl Core {
    /// A core for `config`, signing under `key`; nodes start down and are
    /// probed from `now` on.
    pub fn new(now: Instant, config: CoreConfig, key: TokenKey) -> Result<Core, CoreError> {
        let mut dispatcher = Dispatcher::new(config.dispatch)?;
        let mut by_addr = HashMap::new();
        let mut node_flows = Vec::new();
        for n in &config.nodes {
            if n.name.len() > 64 {
                return Err(CoreError::LongName(n.name.clone()));
            }
            let id = dispatcher.add(now, &n.name, &n.zone, n.weight)?;
            let addr = canonical(n.addr);
            if by_addr.insert(addr, id).is_some() {
                return Err(CoreError::DuplicateAddr(addr));
            }
            node_flows.push(Flow::to(Transport::Udp, addr));
        }
        Ok(Core {
            register_limit: RateLimiter::new(config.register_limit),
            invite_limit: RateLimiter::new(config.invite_limit),
            config,
            key,
            dispatcher,
            by_addr,
            node_flows,
            probes_sent_to: HashMap::new(),
            out: VecDeque::new(),
            stats: Stats::default(),
        })
    }

    /// The decision counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The dispatcher (node health, load and per-node counters).
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// The next output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The next deadline (probes).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.dispatcher.poll_timeout()
    }

    /// Fires due probe deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.dispatcher.handle_timeout(now);
        self.drain_dispatcher();
    }

    fn drain_dispatcher(&mut self) {
        while let Some(o) = self.dispatcher.poll_output() {
            match o {
                dispatch::Output::Probe { dest, probe } => {
                    // Probes in flight are bounded by timeout / interval per
                    // node; forget answered or timed-out ones.
                    let d = &self.dispatcher;
                    self.probes_sent_to
                        .retain(|p, _| d.probe_dest(ProbeId(*p)).is_some());
                    self.probes_sent_to.insert(probe.0, dest);
                    let msg = self.probe(dest, probe);
                    let flow = self.node_flows[dest.0];
                    self.out.push_back(Output::Send { flow, msg });
                }
                dispatch::Output::Health { dest, health } => {
                    let node = self.dispatcher.name(dest).unwrap_or_default().to_string();
                    let zone = self.dispatcher.zone(dest).unwrap_or_default().to_string();
                    self.out.push_back(Output::Health { node, zone, health });
                }
            }
        }
    }

    fn probe(&self, dest: DestId, probe: ProbeId) -> Message {
        let me = self.config.node_addr;
        let node = self.node_flows[dest.0].remote;
        Message::request(Method::Options, &format!("sip:{node}"))
            .with(
                HeaderName::Via,
                &format!("SIP/2.0/UDP {me};branch={PROBE_BRANCH}{:x}", probe.0),
            )
            .with(HeaderName::MaxForwards, "70")
            .with(HeaderName::From, &format!("<sip:balancer@{me}>;tag=szp"))
            .with(HeaderName::To, &format!("<sip:{node}>"))
            .with(HeaderName::CallId, &format!("szp-{:x}@{me}", probe.0))
            .with(
                HeaderName::CSeq,
                &format!("{} OPTIONS", probe.0 % 1_000_000_000),
            )
            .with(HeaderName::ContentLength, "0")
    }

    /// Handles one received message (`flow` is where it came from; the
    /// transport already stamped `received`/`rport` on a request's Via).
    pub fn handle(&mut self, now: Instant, flow: Flow, msg: Message) {
        if msg.is_request() {
            self.request(now, flow, msg);
        } else {
            self.response(now, msg);
        }
    }

    fn is_own(&self, host: &sip::msg::Host<'_>, port: Option<u16>) -> bool {
        let Some(ip) = host.ip() else {
            return false;
        };
        let own = |a: &SocketAddr| a.ip().to_canonical() == ip.to_canonical();
        let port_of = |t: Transport| port.unwrap_or(t.default_port());
        (own(&self.config.node_addr) && port_of(Transport::Udp) == self.config.node_addr.port())
            || self
                .config
                .device_addrs
                .iter()
                .any(|(t, a)| own(a) && port_of(*t) == a.port())
    }

    /// The token of a Route/Record-Route value when it is ours.
    fn own_route_token<'a>(&self, na: &NameAddr<'a>) -> Option<Option<&'a str>> {
        let Uri::Sip(u) = na.uri else {
            return None;
        };
        if !self.is_own(&u.host, u.port) {
            return None;
        }
        Some(u.params.get(token::PARAM).flatten())
    }

    fn request(&mut self, now: Instant, flow: Flow, mut msg: Message) {
        let Some(method) = msg.method() else {
            return;
        };
        let is_ack = method == Method::Ack;
        if let Some(ua) = msg.header(HeaderName::UserAgent)
            && is_scanner(ua, &self.config.scanners)
        {
            self.stats.scanners += 1;
            return;
        }
        // A Via of ours anywhere means the request came around (§16.3).
        let looped = msg
            .vias()
            .filter_map(Result::ok)
            .any(|v| v.params.has(token::PARAM) && self.is_own(&v.host, v.port));
        if looped {
            self.stats.loops += 1;
            return self.refuse(flow, &msg, 482, "Loop Detected", None);
        }
        if msg.max_forwards() == Some(0) {
            self.stats.loops += 1;
            return self.refuse(flow, &msg, 483, "Too Many Hops", None);
        }
        let from_node = self.by_addr.get(&canonical(flow.remote)).copied();
        let call_id = msg.call_id().unwrap_or_default().to_string();

        // A Route of ours: the token decides.
        let routes = msg.name_addrs(HeaderName::Route).unwrap_or_default();
        let own: Vec<Option<&str>> = routes
            .iter()
            .map_while(|r| self.own_route_token(r))
            .take(2)
            .collect();
        let tok = match own.first() {
            Some(Some(t)) => match self.key.open(t) {
                Ok(tok) => Some(tok),
                Err(e) => {
                    tracing::warn!(source = %flow.remote, error = %e, "refused a route token");
                    self.stats.bad_tokens += 1;
                    return self.refuse(flow, &msg, 403, "Forbidden (route token)", None);
                }
            },
            // Our address without a token: an outbound proxy the device
            // preloaded (RFC 3261 §8.1.2); popped, the request is routed
            // as if it had none.
            Some(None) | None => None,
        };
        let pops = own.len();
        drop(routes);
        for _ in 0..pops {
            msg.pop_front_value(HeaderName::Route);
        }

        let dialog_creating = msg.to().is_ok_and(|t| t.tag().is_none())
            && matches!(
                method,
                Method::Invite | Method::Subscribe | Method::Refer | Method::Notify
            );
        let target = match (tok, from_node) {
            (Some(tok), Some(_)) => Target::Device(tok),
            (Some(tok), None) => {
                let owner = tok.owner.as_deref().and_then(|o| self.dispatcher.find(o));
                match owner {
                    Some(o) if self.dispatcher.is_up(o) => Target::Node(o),
                    _ => {
                        let zone = owner
                            .and_then(|o| self.dispatcher.zone(o))
                            .unwrap_or_default()
                            .to_string();
                        let alt = self
                            .dispatcher
                            .pick_other_zone(call_id.as_bytes(), &zone)
                            .or_else(|| self.dispatcher.pick(call_id.as_bytes()));
                        match alt {
                            Some(n) => {
                                self.stats.rerouted += 1;
                                Target::Node(n)
                            }
                            None => return self.no_node(flow, &msg),
                        }
                    }
                }
            }
            (None, Some(_)) => {
                self.stats.unroutable += 1;
                return self.refuse(flow, &msg, 403, "Forbidden (no route token)", None);
            }
            (None, None) => {
                let source = flow.remote.ip().to_canonical();
                let key = if method == Method::Register {
                    if !self.register_limit.allow(now, source) {
                        return self.limited(flow, &msg, source, Limit::Register);
                    }
                    match msg.to() {
                        Ok(to) => match to.uri {
                            Uri::Sip(u) => u.aor(),
                            other => other.to_string(),
                        },
                        Err(_) => call_id.clone(),
                    }
                } else {
                    if method == Method::Invite
                        && msg.to().is_ok_and(|t| t.tag().is_none())
                        && !self.invite_limit.allow(now, source)
                    {
                        return self.limited(flow, &msg, source, Limit::Invite);
                    }
                    call_id.clone()
                };
                match self.dispatcher.pick(key.as_bytes()) {
                    Some(n) => Target::Node(n),
                    None => return self.no_node(flow, &msg),
                }
            }
        };

        if !is_ack && !msg.decrement_max_forwards() {
            self.stats.loops += 1;
            return self.refuse(flow, &msg, 483, "Too Many Hops", None);
        }
        if is_ack {
            let _ = msg.decrement_max_forwards();
        }
        let branch = derive_branch(&msg);
        let back = FlowToken::for_flow(&flow);
        match target {
            Target::Node(n) => {
                let owner = self.dispatcher.name(n).unwrap_or_default().to_string();
                if method == Method::Register {
                    let Ok(t) = self.key.seal(&back.clone().owned_by(&owner)) else {
                        return;
                    };
                    let uri = format!("<sip:{};transport=udp;lr;ob;sz={t}>", self.config.node_addr);
                    msg.push_front(Header::new(HeaderName::Path, &uri));
                } else if dialog_creating {
                    let Ok(t) = self.key.seal(&back.clone().owned_by(&owner)) else {
                        return;
                    };
                    // Device side below, node side on top (the node reads
                    // the list top first).
                    self.record_route(&mut msg, flow.transport, &t, true);
                }
                let Ok(vt) = self.key.seal(&back) else {
                    return;
                };
                let via = format!(
                    "SIP/2.0/UDP {};branch={branch};{}={vt}",
                    self.config.node_addr,
                    token::PARAM
                );
                msg.push_front(Header::new(HeaderName::Via, &via));
                self.stats.to_node += 1;
                let flow = self.node_flows[n.0];
                self.out.push_back(Output::Send { flow, msg });
            }
            Target::Device(tok) => {
                let owner = from_node
                    .and_then(|n| self.dispatcher.name(n))
                    .unwrap_or_default()
                    .to_string();
                if dialog_creating {
                    let Ok(t) = self.key.seal(&tok.clone().owned_by(&owner)) else {
                        return;
                    };
                    // Node side below, device side on top (the device, as
                    // UAS, reads the list top first).
                    self.record_route(&mut msg, tok.transport, &t, false);
                }
                let Ok(vt) = self.key.seal(&back) else {
                    return;
                };
                let local = self.device_addr(tok.transport);
                let via = format!(
                    "SIP/2.0/{} {local};branch={branch};{}={vt}",
                    tok.transport.via_token(),
                    token::PARAM
                );
                msg.push_front(Header::new(HeaderName::Via, &via));
                self.stats.to_device += 1;
                self.out.push_back(Output::Send {
                    flow: tok.flow(),
                    msg,
                });
            }
        }
    }

    /// The device-facing address for `t` (the node address for UDP or when
    /// that transport has no listener).
    fn device_addr(&self, t: Transport) -> SocketAddr {
        self.config
            .device_addrs
            .iter()
            .find(|(x, _)| *x == t)
            .map_or(self.config.node_addr, |(_, a)| *a)
    }

    /// Inserts our Record-Route: one value when the device side is the UDP
    /// address the nodes use too, else two (RFC 5658). `node_on_top` says
    /// which side the next hop (the UAS) reads first.
    fn record_route(&self, msg: &mut Message, device_t: Transport, tok: &str, node_on_top: bool) {
        let node_uri = format!(
            "<sip:{};transport=udp;lr;{}={tok}>",
            self.config.node_addr,
            token::PARAM
        );
        let dev = self.device_addr(device_t);
        if device_t == Transport::Udp && dev == self.config.node_addr {
            msg.push_front(Header::new(HeaderName::RecordRoute, &node_uri));
            return;
        }
        let dev_uri = format!(
            "<sip:{dev};transport={};lr;{}={tok}>",
            device_t.via_token().to_ascii_lowercase(),
            token::PARAM
        );
        let (below, top) = if node_on_top {
            (dev_uri, node_uri)
        } else {
            (node_uri, dev_uri)
        };
        msg.push_front(Header::new(HeaderName::RecordRoute, &below));
        msg.push_front(Header::new(HeaderName::RecordRoute, &top));
    }

    fn response(&mut self, now: Instant, mut msg: Message) {
        let target = {
            let Ok(via) = msg.top_via() else {
                self.stats.responses_dropped += 1;
                return;
            };
            if !self.is_own(&via.host, via.port) {
                self.stats.responses_dropped += 1;
                return;
            }
            if let Some(id) = via
                .branch()
                .and_then(|b| b.strip_prefix(PROBE_BRANCH))
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            {
                let load = msg
                    .header_named(dispatch::LOAD_HEADER)
                    .and_then(Load::parse);
                let status = msg.status().unwrap_or(500);
                if status >= 200 {
                    self.dispatcher.handle_reply(now, ProbeId(id), status, load);
                    self.drain_dispatcher();
                }
                return;
            }
            match via_token(&via).map(|t| self.key.open(t)) {
                Some(Ok(t)) => t,
                _ => {
                    tracing::warn!("dropped a response whose Via token does not verify");
                    self.stats.responses_dropped += 1;
                    return;
                }
            }
        };
        msg.pop_front_value(HeaderName::Via);
        if msg.top_via().is_err() {
            self.stats.responses_dropped += 1;
            return;
        }
        self.stats.responses += 1;
        self.out.push_back(Output::Send {
            flow: target.flow(),
            msg,
        });
    }

    fn no_node(&mut self, flow: Flow, msg: &Message) {
        self.stats.no_node += 1;
        let ra = self.config.retry_after_secs;
        self.refuse(flow, msg, 503, "Service Unavailable", Some(ra));
    }

    fn limited(&mut self, flow: Flow, msg: &Message, source: IpAddr, which: Limit) {
        self.stats.rate_limited += 1;
        let ra = match which {
            Limit::Register => self.register_limit.retry_after(source),
            Limit::Invite => self.invite_limit.retry_after(source),
        };
        self.refuse(flow, msg, 429, "Too Many Requests", Some(ra));
    }

    /// Answers a request statelessly (never an ACK).
    fn refuse(&mut self, flow: Flow, msg: &Message, code: u16, reason: &str, retry: Option<u32>) {
        if msg.is_method(&Method::Ack) {
            return;
        }
        let tag = stateless_tag(msg);
        let mut r = msg.response(code, reason, Some(&tag));
        if let Some(s) = retry {
            r.push(Header::new(HeaderName::RetryAfter, &s.to_string()));
        }
        self.out.push_back(Output::Reply { flow, msg: r });
    }
}

enum Limit {
    Register,
    Invite,
}

/// The `sz` parameter of one of our Vias.
fn via_token<'a>(via: &Via<'a>) -> Option<&'a str> {
    via.params.get(token::PARAM).flatten()
}

/// The branch of a forwarded request (RFC 3261 §16.11): a hash of the
/// incoming top Via's branch and sent-by, so a retransmission, the CANCEL
/// and the ACK of a non-2xx get the branch of their INVITE. Without an RFC
/// 3261 branch, of the Call-ID, CSeq number, From tag and top Via.
fn derive_branch(msg: &Message) -> String {
    let mut h = Sha256::new();
    match msg.top_via() {
        Ok(v) if v.is_rfc3261() => {
            h.update(v.branch().unwrap_or_default().as_bytes());
            h.update(b"|");
            h.update(v.host.to_string().as_bytes());
            h.update(v.port.unwrap_or(0).to_be_bytes());
        }
        _ => {
            h.update(msg.call_id().unwrap_or_default().as_bytes());
            h.update(msg.cseq().map(|c| c.seq).unwrap_or(0).to_be_bytes());
            if let Ok(f) = msg.from()
                && let Some(t) = f.tag()
            {
                h.update(t.as_bytes());
            }
            h.update(
                msg.values(HeaderName::Via)
                    .next()
                    .unwrap_or_default()
                    .as_bytes(),
            );
        }
    }
    format!("{FWD_BRANCH}{}", hex::encode(&h.finalize()[..10]))
}

/// A To tag for a stateless answer: the same for every retransmission.
fn stateless_tag(msg: &Message) -> String {
    let mut h = Sha256::new();
    h.update(msg.call_id().unwrap_or_default().as_bytes());
    h.update(
        msg.values(HeaderName::Via)
            .next()
            .unwrap_or_default()
            .as_bytes(),
    );
    format!("sz{}", hex::encode(&h.finalize()[..6]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sip::flow::ConnId;
    use sip::msg::{Framing, Limits};
    use std::time::Duration;

    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    const LB: &str = "127.0.0.1:5060";
    const A1: &str = "127.0.0.1:5071";
    const B1: &str = "127.0.0.1:5072";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn config() -> CoreConfig {
        let limit = RateConfig {
            per_second: 1.0,
            burst: 3.0,
            max_sources: 100,
        };
        CoreConfig {
            node_addr: sa(LB),
            device_addrs: vec![(Transport::Udp, sa(LB)), (Transport::Tcp, sa(LB))],
            nodes: vec![
                NodeSpec {
                    name: "a1".into(),
                    zone: "A".into(),
                    addr: sa(A1),
                    weight: 1.0,
                },
                NodeSpec {
                    name: "b1".into(),
                    zone: "B".into(),
                    addr: sa(B1),
                    weight: 1.0,
                },
            ],
            dispatch: DispatchConfig::default(),
            register_limit: limit,
            invite_limit: limit,
            scanners: crate::limit::DEFAULT_SCANNERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            retry_after_secs: 5,
        }
    }

    fn key() -> TokenKey {
        TokenKey::new(b"cluster-secret-for-the-unit-tests").unwrap()
    }

    fn parse(s: &str) -> Message {
        let s = s.replace('\n', "\r\n");
        Message::parse(Bytes::from(s), Framing::Datagram, &Limits::default()).unwrap()
    }

    /// A core whose two nodes answered two probes each.
    fn up(t: Instant) -> Core {
        let mut c = Core::new(t, config(), key()).unwrap();
        for step in 0..2 {
            let now = t + Duration::from_millis(100 * step);
            c.handle_timeout(now);
            answer_probes(&mut c, now, |_| true);
        }
        assert!(c.dispatcher().ids().all(|d| c.dispatcher().is_up(d)));
        c
    }

    /// Answers every probe in the outputs (200 with a load header) where
    /// `alive`; returns the other outputs.
    fn answer_probes(
        c: &mut Core,
        now: Instant,
        alive: impl Fn(SocketAddr) -> bool,
    ) -> Vec<Output> {
        let mut rest = Vec::new();
        let mut probes = Vec::new();
        while let Some(o) = c.poll_output() {
            match o {
                Output::Send { flow, msg }
                    if msg.is_method(&Method::Options) && msg.is_request() =>
                {
                    if alive(flow.remote) {
                        probes.push(msg);
                    }
                }
                other => rest.push(other),
            }
        }
        for p in probes {
            let r = p
                .response(200, "OK", Some("n"))
                .with_named("X-Sipzone-Load", "calls=3;registrations=7");
            c.handle(now, Flow::to(Transport::Udp, sa(A1)), reparse(&r));
        }
        rest
    }

    fn reparse(m: &Message) -> Message {
        Message::parse(m.to_bytes(), Framing::Datagram, &Limits::default()).unwrap()
    }

    fn outputs(c: &mut Core) -> Vec<Output> {
        std::iter::from_fn(|| c.poll_output()).collect()
    }

    fn one_send(c: &mut Core) -> (Flow, Message) {
        let out = outputs(c);
        assert_eq!(out.len(), 1, "{out:?}");
        match out.into_iter().next().unwrap() {
            Output::Send { flow, msg } => (flow, reparse(&msg)),
            o => panic!("expected a send, got {o:?}"),
        }
    }

    fn one_reply(c: &mut Core) -> (Flow, Message) {
        let out = outputs(c);
        assert_eq!(out.len(), 1, "{out:?}");
        match out.into_iter().next().unwrap() {
            Output::Reply { flow, msg } => (flow, reparse(&msg)),
            o => panic!("expected a reply, got {o:?}"),
        }
    }

    fn tcp_device() -> Flow {
        Flow {
            transport: Transport::Tcp,
            remote: sa("127.0.0.1:40001"),
            local: Some(sa(LB)),
            conn: Some(ConnId(9)),
        }
    }

    fn udp_device(ip: &str) -> Flow {
        Flow::to(Transport::Udp, sa(&format!("{ip}:5062")))
    }

    fn register(user: &str, branch: &str) -> Message {
        parse(&format!(
            "REGISTER sip:sipzone.local SIP/2.0
Via: SIP/2.0/TCP 127.0.0.1:40001;branch=z9hG4bK{branch};received=127.0.0.1;rport=40001
Max-Forwards: 70
From: <sip:{user}@sipzone.local>;tag=r1
To: <sip:{user}@sipzone.local>
Call-ID: reg-{branch}
CSeq: 1 REGISTER
Contact: <sip:{user}@127.0.0.1:40001;transport=tcp>
Content-Length: 0

"
        ))
    }

    fn invite(call_id: &str, branch: &str, source: &str) -> Message {
        parse(&format!(
            "INVITE sip:1001@sipzone.local SIP/2.0
Via: SIP/2.0/UDP {source}:5062;branch=z9hG4bK{branch}
Max-Forwards: 70
From: <sip:1000@sipzone.local>;tag=c1
To: <sip:1001@sipzone.local>
Call-ID: {call_id}
CSeq: 1 INVITE
Contact: <sip:1000@{source}:5062>
Content-Length: 0

"
        ))
    }

    fn path_or_rr_token(m: &Message, name: HeaderName, i: usize) -> String {
        let v = m.values(name).nth(i).unwrap().to_string();
        let na = NameAddr::parse(&v).unwrap();
        let Uri::Sip(u) = na.uri else { panic!() };
        u.params.get("sz").flatten().unwrap().to_string()
    }

    #[test]
    fn probes_bring_nodes_up_and_carry_their_load() {
        let t = t0();
        let mut c = Core::new(t, config(), key()).unwrap();
        assert_eq!(c.poll_timeout(), Some(t));
        c.handle_timeout(t);
        let out = outputs(&mut c);
        assert_eq!(out.len(), 2);
        let Output::Send { flow, msg } = &out[0] else {
            panic!()
        };
        assert_eq!(flow.remote, sa(A1));
        assert_eq!(msg.request_uri_str(), Some("sip:127.0.0.1:5071"));
        assert!(
            msg.top_via()
                .unwrap()
                .branch()
                .unwrap()
                .starts_with(PROBE_BRANCH)
        );
        // answer them twice
        let mut c = up(t);
        let a1 = c.dispatcher().find("a1").unwrap();
        assert_eq!(c.dispatcher().load(a1).map(|l| l.calls), Some(3));
        // health changes were reported
        let _ = outputs(&mut c);
    }

    /// REGISTER over TCP: to the node of its AOR, with a Path naming the
    /// client's connection and the node; the 200 comes back on that
    /// connection.
    #[test]
    fn register_gets_a_signed_path_and_its_response_returns_on_the_connection() {
        let t = t0();
        let mut c = up(t);
        let _ = outputs(&mut c);
        c.handle(t, tcp_device(), register("1000", "reg1"));
        let (to, fwd) = one_send(&mut c);
        let want = c
            .dispatcher
            .clone()
            .pick(b"sip:1000@sipzone.local")
            .unwrap();
        assert_eq!(to, c.node_flows[want.0]);
        assert_eq!(fwd.max_forwards(), Some(69));
        let path = fwd.header(HeaderName::Path).unwrap().to_string();
        assert!(
            path.starts_with("<sip:127.0.0.1:5060;transport=udp;lr;ob;sz="),
            "{path}"
        );
        let tok = key()
            .open(&path_or_rr_token(&fwd, HeaderName::Path, 0))
            .unwrap();
        assert_eq!(tok.flow().conn, Some(ConnId(9)));
        assert_eq!(tok.transport, Transport::Tcp);
        assert_eq!(tok.remote, sa("127.0.0.1:40001"));
        assert_eq!(tok.owner.as_deref(), c.dispatcher().name(want));
        let via = fwd.top_via().unwrap();
        assert!(via.branch().unwrap().starts_with(FWD_BRANCH));
        assert_eq!(fwd.vias().count(), 2);
        // the node answers to our Via
        let ok = fwd.response(200, "OK", Some("n1"));
        c.handle(t, to, reparse(&ok));
        let (back, resp) = one_send(&mut c);
        assert_eq!(back.conn, Some(ConnId(9)), "the client's own connection");
        assert_eq!(back.transport, Transport::Tcp);
        assert_eq!(resp.vias().count(), 1, "our Via removed");
        assert_eq!(resp.status(), Some(200));
        assert_eq!(c.stats().responses, 1);
    }

    /// The node calls the registered device: Route = the Path. The request
    /// leaves on the device's connection, with two Record-Routes (TCP toward
    /// the device, UDP toward the node).
    #[test]
    fn a_request_from_a_node_goes_out_on_the_flow_in_its_path_token() {
        let t = t0();
        let mut c = up(t);
        let _ = outputs(&mut c);
        c.handle(t, tcp_device(), register("1001", "reg2"));
        let (node_flow, fwd) = one_send(&mut c);
        let path = fwd.header(HeaderName::Path).unwrap().to_string();
        let inv = parse(&format!(
            "INVITE sip:1001@127.0.0.1:40001;transport=tcp SIP/2.0
Via: SIP/2.0/UDP {A1};branch=z9hG4bKnode1
Max-Forwards: 70
Route: {path}
From: <sip:1000@sipzone.local>;tag=b2b
To: <sip:1001@sipzone.local>
Call-ID: bleg-1
CSeq: 1 INVITE
Contact: <sip:a1@{A1}>
Content-Length: 0

"
        ));
        c.handle(t, Flow::to(Transport::Udp, sa(A1)), inv);
        let (to, out) = one_send(&mut c);
        assert_eq!(to.conn, Some(ConnId(9)));
        assert_eq!(to.transport, Transport::Tcp);
        assert!(out.header(HeaderName::Route).is_none(), "our Route popped");
        let rr: Vec<&str> = out.values(HeaderName::RecordRoute).collect();
        assert_eq!(rr.len(), 2, "{rr:?}");
        assert!(
            rr[0].contains(";transport=tcp;"),
            "device side on top: {rr:?}"
        );
        assert!(rr[1].contains(";transport=udp;"), "{rr:?}");
        let tok = key()
            .open(&path_or_rr_token(&out, HeaderName::RecordRoute, 0))
            .unwrap();
        assert_eq!(
            tok.owner.as_deref(),
            Some("a1"),
            "the sending node owns the dialog"
        );
        assert_eq!(tok.conn, Some(ConnId(9)));
        let via = out.top_via().unwrap();
        assert_eq!(via.transport, "TCP");
        assert_eq!(c.stats().to_device, 1);
        let _ = node_flow;
        // the device's BYE later carries both values as Route (reversed
        // by the device as UAS: the top one first); it goes to a1
        let bye = parse(&format!(
            "BYE sip:a1@{A1} SIP/2.0
Via: SIP/2.0/TCP 127.0.0.1:40001;branch=z9hG4bKbye1;received=127.0.0.1;rport=40001
Max-Forwards: 70
Route: {}, {}
From: <sip:1001@sipzone.local>;tag=dev
To: <sip:1000@sipzone.local>;tag=b2b
Call-ID: bleg-1
CSeq: 2 BYE
Content-Length: 0

",
            rr[0], rr[1]
        ));
        c.handle(t, tcp_device(), bye);
        let (to, out) = one_send(&mut c);
        assert_eq!(to.remote, sa(A1));
        assert!(
            out.header(HeaderName::Route).is_none(),
            "both our Routes popped"
        );
    }

    /// A device's INVITE: Record-Route with the owner; its in-dialog BYE
    /// goes to the owner while up, to the other zone once it is down.
    #[test]
    fn in_dialog_requests_follow_the_owner_or_the_other_zone() {
        let t = t0();
        let mut c = up(t);
        let _ = outputs(&mut c);
        let dev = udp_device("127.0.0.1");
        c.handle(t, dev, invite("call-42", "inv1", "127.0.0.1"));
        let (to, fwd) = one_send(&mut c);
        let owner = *c.by_addr.get(&to.remote).unwrap();
        let owner_name = c.dispatcher().name(owner).unwrap().to_string();
        let rr: Vec<String> = fwd
            .values(HeaderName::RecordRoute)
            .map(String::from)
            .collect();
        assert_eq!(rr.len(), 1, "UDP device on the node address: one value");
        let tok = key()
            .open(&path_or_rr_token(&fwd, HeaderName::RecordRoute, 0))
            .unwrap();
        assert_eq!(tok.owner.as_deref(), Some(owner_name.as_str()));
        assert_eq!(tok.remote, dev.remote);
        let bye = |branch: &str| {
            parse(&format!(
                "BYE sip:x@{A1} SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK{branch}
Max-Forwards: 70
Route: {}
From: <sip:1000@sipzone.local>;tag=c1
To: <sip:1001@sipzone.local>;tag=n
Call-ID: call-42
CSeq: 2 BYE
Content-Length: 0

",
                rr[0]
            ))
        };
        c.handle(t, dev, bye("bye1"));
        let (to2, _) = one_send(&mut c);
        assert_eq!(to2, to, "to the owner");
        // the owner stops answering: two probe timeouts
        let mut now = t + Duration::from_millis(200);
        while c.dispatcher().is_up(owner) {
            c.handle_timeout(now);
            let owner_addr = to.remote;
            let _ = answer_probes(&mut c, now, |a| a != owner_addr);
            now += Duration::from_millis(50);
            assert!(now < t + Duration::from_secs(2));
        }
        c.handle(now, dev, bye("bye2"));
        let (to3, _) = one_send(&mut c);
        assert_ne!(to3, to);
        let other = *c.by_addr.get(&to3.remote).unwrap();
        assert_ne!(c.dispatcher().zone(other), c.dispatcher().zone(owner));
        assert_eq!(c.stats().rerouted, 1);
        // new calls avoid the dead node too
        for i in 0..50 {
            c.handle(
                now,
                udp_device(&format!("127.0.1.{i}")),
                invite(&format!("n{i}"), "x", "127.0.0.1"),
            );
            let (to, _) = one_send(&mut c);
            assert_eq!(to, to3);
        }
    }

    #[test]
    fn a_tampered_or_missing_route_token_gets_403_and_is_counted() {
        let t = t0();
        let mut c = up(t);
        let _ = outputs(&mut c);
        let dev = udp_device("127.0.0.1");
        c.handle(t, dev, invite("call-7", "inv7", "127.0.0.1"));
        let (_, fwd) = one_send(&mut c);
        let good = path_or_rr_token(&fwd, HeaderName::RecordRoute, 0);
        // flip one hex digit of the token
        let mut bad = good.clone().into_bytes();
        bad[10] = if bad[10] == b'0' { b'1' } else { b'0' };
        let bad = String::from_utf8(bad).unwrap();
        for (route, method) in [
            (format!("<sip:{LB};transport=udp;lr;sz={bad}>"), "BYE"),
            (format!("<sip:{LB};transport=udp;lr;sz=00>"), "BYE"),
            (format!("<sip:{LB};transport=udp;lr;sz={bad}>"), "ACK"),
        ] {
            let req = parse(&format!(
                "{method} sip:x@{A1} SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKt{method}
Max-Forwards: 70
Route: {route}
From: <sip:1000@sipzone.local>;tag=c1
To: <sip:1001@sipzone.local>;tag=n
Call-ID: call-7
CSeq: 2 {method}
Content-Length: 0

"
            ));
            c.handle(t, dev, req);
            if method == "ACK" {
                assert!(outputs(&mut c).is_empty(), "an ACK is never answered");
            } else {
                let (back, r) = one_reply(&mut c);
                assert_eq!(back, dev);
                assert_eq!(r.status(), Some(403), "{route}");
            }
        }
        assert_eq!(c.stats().bad_tokens, 3);
        // our address without a token is a preloaded outbound proxy: popped
        let req = invite("preloaded", "p1", "127.0.0.1");
        let mut req = req;
        req.push(Header::new(HeaderName::Route, &format!("<sip:{LB};lr>")));
        c.handle(t, dev, reparse(&req));
        let (_, fwd) = one_send(&mut c);
        assert!(fwd.header(HeaderName::Route).is_none());
        // a node sending without a token of ours is refused too
        let req = invite("from-node", "n1", "127.0.0.1");
        c.handle(t, Flow::to(Transport::Udp, sa(A1)), req);
        assert_eq!(one_reply(&mut c).1.status(), Some(403));
        assert_eq!(c.stats().unroutable, 1);
    }

    #[test]
    fn retransmission_cancel_and_ack_map_to_the_invite_branch() {
        let t = t0();
        let mut c = up(t);
        let _ = outputs(&mut c);
        let dev = udp_device("127.0.0.1");
        c.handle(t, dev, invite("call-9", "same", "127.0.0.1"));
        let (to1, f1) = one_send(&mut c);
        c.handle(t, dev, invite("call-9", "same", "127.0.0.1"));
        let (to2, f2) = one_send(&mut c);
        let cancel = parse(
            "CANCEL sip:1001@sipzone.local SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKsame
Max-Forwards: 70
From: <sip:1000@sipzone.local>;tag=c1
To: <sip:1001@sipzone.local>
Call-ID: call-9
CSeq: 1 CANCEL
Content-Length: 0

",
        );
        c.handle(t, dev, cancel);
        let (to3, f3) = one_send(&mut c);
        assert_eq!((to1, to1), (to2, to3), "same node");
        let b = |m: &Message| m.top_via().unwrap().branch().unwrap().to_string();
        assert_eq!(b(&f1), b(&f2));
        assert_eq!(b(&f1), b(&f3));
        // another INVITE gets another branch
        c.handle(t, dev, invite("call-9", "other", "127.0.0.1"));
        let (_, f4) = one_send(&mut c);
        assert_ne!(b(&f1), b(&f4));
    }

    #[test]
    fn rate_limits_per_source_answer_429_while_another_source_registers() {
        let t = t0();
        let mut c = up(t);
        let _ = outputs(&mut c);
        let flood = udp_device("127.0.0.5");
        let mut codes = Vec::new();
        for i in 0..10 {
            c.handle(t, flood, register(&format!("1{i:03}"), &format!("f{i}")));
            match outputs(&mut c).pop().unwrap() {
                Output::Send { .. } => codes.push(0),
                Output::Reply { msg, .. } => {
                    assert!(msg.header(HeaderName::RetryAfter).is_some());
                    codes.push(msg.status().unwrap());
                }
                o => panic!("{o:?}"),
            }
        }
        assert_eq!(
            codes,
            [0, 0, 0, 429, 429, 429, 429, 429, 429, 429],
            "burst 3"
        );
        assert_eq!(c.stats().rate_limited, 7);
        c.handle(t, udp_device("127.0.0.6"), register("2000", "q1"));
        assert!(matches!(one_send(&mut c), (f, _) if f.transport == Transport::Udp));
        // INVITEs have their own bucket; in-dialog requests are not limited
        for i in 0..3 {
            c.handle(
                t,
                flood,
                invite(&format!("i{i}"), &format!("i{i}"), "127.0.0.5"),
            );
            let _ = one_send(&mut c);
        }
        c.handle(t, flood, invite("i4", "i4", "127.0.0.5"));
        assert_eq!(one_reply(&mut c).1.status(), Some(429));
        // refilled a second later
        c.handle(
            t + Duration::from_secs(1),
            flood,
            invite("i5", "i5", "127.0.0.5"),
        );
        let _ = one_send(&mut c);
    }

    #[test]
    fn scanners_loops_hops_and_no_node_golden_table() {
        let t = t0();
        let dev = udp_device("127.0.0.1");
        let base = invite("g1", "g1", "127.0.0.1");
        let with = |name: &str, value: &str| {
            let mut m = base.clone();
            m.set(HeaderName::from_wire(name), value);
            reparse(&m)
        };
        let mut our_via = base.clone();
        our_via.push(Header::new(
            HeaderName::Via,
            &format!("SIP/2.0/UDP {LB};branch=z9hG4bKsz-1;sz=00"),
        ));
        // request, expected: None = dropped, Some(code) = answered
        let table: Vec<(&str, Message, Option<u16>)> = vec![
            ("scanner", with("User-Agent", "friendly-scanner"), None),
            ("max-forwards 0", with("Max-Forwards", "0"), Some(483)),
            ("our Via below", reparse(&our_via), Some(482)),
        ];
        for (name, msg, want) in table {
            let mut c = up(t);
            let _ = outputs(&mut c);
            c.handle(t, dev, msg);
            let out = outputs(&mut c);
            match want {
                None => assert!(out.is_empty(), "{name}: {out:?}"),
                Some(code) => {
                    let [Output::Reply { msg, .. }] = out.as_slice() else {
                        panic!("{name}: {out:?}")
                    };
                    assert_eq!(msg.status(), Some(code), "{name}");
                }
            }
        }
        // nothing up: 503 with Retry-After
        let mut c = Core::new(t, config(), key()).unwrap();
        c.handle(t, dev, base.clone());
        let (_, r) = one_reply(&mut c);
        assert_eq!(r.status(), Some(503));
        assert_eq!(r.header(HeaderName::RetryAfter), Some("5"));
        // a stateless answer repeats its To tag for a retransmission
        c.handle(t, dev, base);
        let (_, r2) = one_reply(&mut c);
        assert_eq!(r.to().unwrap().tag(), r2.to().unwrap().tag());
    }

    #[test]
    fn responses_not_ours_or_with_a_forged_via_token_are_dropped() {
        let t = t0();
        let mut c = up(t);
        let _ = outputs(&mut c);
        let dev = udp_device("127.0.0.1");
        c.handle(t, dev, invite("r1", "r1", "127.0.0.1"));
        let (node, fwd) = one_send(&mut c);
        // a response whose top Via is not ours
        let stray = invite("r2", "r2", "127.0.0.1").response(200, "OK", Some("x"));
        c.handle(t, node, reparse(&stray));
        // our Via with the token replaced by one naming another flow, signed
        // with another key
        let forged_tok = TokenKey::new(b"not-the-cluster-secret-at-all!!")
            .unwrap()
            .seal(&FlowToken::for_flow(&udp_device("192.0.2.66")))
            .unwrap();
        let mut forged = fwd.response(180, "Ringing", Some("n"));
        let top = forged.values(HeaderName::Via).next().unwrap().to_string();
        let cut = top.find(";sz=").unwrap();
        let new_top = format!("{};sz={forged_tok}", &top[..cut]);
        forged.pop_front_value(HeaderName::Via);
        forged.push_front(Header::new(HeaderName::Via, &new_top));
        c.handle(t, node, reparse(&forged));
        assert!(outputs(&mut c).is_empty());
        assert_eq!(c.stats().responses_dropped, 2);
        // the genuine one passes
        c.handle(t, node, reparse(&fwd.response(180, "Ringing", Some("n"))));
        let (to, _) = one_send(&mut c);
        assert_eq!(to.remote, dev.remote);
    }
}
