//! Simulated SIP devices: each registers one contact for its user with
//! digest credentials (RFC 3261 §10.2, §22.4), first drawing a 401 from the
//! registrar, then answering its challenge, one request at a time, each with
//! a higher CSeq on the same Call-ID (RFC 3261 §10.2.4), as a phone does.

use std::net::SocketAddr;

use bytes::Bytes;
use sip::auth::{self, Challenge};
use sip::msg::{Framing, HeaderName, Limits, Message};
use zone_node::state::Aor;

use crate::rng::SimRng;

/// The domain every simulated user registers in (the registrars' realm).
pub const REALM: &str = "sipzone.local";

/// Expiry asked for by every registration, in seconds (the registrar's
/// default maximum, so the binding outlives any simulated run).
pub const EXPIRES: u32 = 3600;

/// A REGISTER on its way to a node, waiting for the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// The node (index in the region) that proposed it.
    pub node: usize,
    /// Its CSeq.
    pub cseq: u32,
    /// The step at which it was sent.
    pub since: u64,
}

/// The strongest acknowledgement a device got: a 200 for a REGISTER adding
/// its contact with this CSeq, produced when the acknowledging replica had
/// applied up to `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// The acknowledged REGISTER's CSeq.
    pub cseq: u32,
    /// The acknowledging replica's applied index when it answered: the entry
    /// is at or below it.
    pub index: u64,
    /// Unix second at which the acknowledged binding expires.
    pub expires_at: u64,
    /// The node (index in the region) that answered.
    pub node: usize,
    /// The step at which it answered.
    pub step: u64,
}

/// One simulated phone.
#[derive(Debug, Clone)]
pub struct Device {
    /// The digest user name (also the AOR user).
    pub user: String,
    password: String,
    /// `sip:user@REALM`.
    pub aor: Aor,
    /// The Contact URI it registers (unique per device).
    pub contact: String,
    /// Its one registration Call-ID.
    pub call_id: String,
    /// Where its requests come from.
    pub src: SocketAddr,
    /// The last CSeq used.
    pub cseq: u32,
    /// The step at which it next sends, when idle.
    pub next_at: u64,
    /// The request in progress, if any.
    pub busy: Option<Busy>,
    /// The acknowledgement the invariants hold the region to; cleared when
    /// the device sends a removal (which may commit without an answer).
    pub acked: Option<Acked>,
    /// The CSeq of the last removal it sent (0: none): a REGISTER before it
    /// may rightly be undone by it.
    pub unregistered_at: u32,
}

/// The password of simulated user `user`.
pub fn password(user: &str) -> String {
    format!("pw-{user}")
}

impl Device {
    /// Device number `n`, registering user `user`.
    pub fn new(n: usize, user: &str) -> Device {
        let aor = Aor::parse(&format!("sip:{user}@{REALM}"))
            .expect("a user name of letters and digits makes a valid AOR");
        let port = 5060 + (n % 1000) as u16;
        let host = format!("10.1.{}.{}", n / 250, n % 250 + 1);
        Device {
            user: user.to_owned(),
            password: password(user),
            aor,
            contact: format!("sip:{user}@{host}:{port}"),
            call_id: format!("reg-{n}@sim"),
            src: format!("{host}:{port}")
                .parse()
                .expect("an IPv4 address and port parse"),
            cseq: 0,
            next_at: 0,
            busy: None,
            acked: None,
            unregistered_at: 0,
        }
    }

    /// The next REGISTER: adds the contact (`expires` > 0) or removes it,
    /// with credentials answering `challenge` when given.
    pub fn register(&mut self, expires: u32, challenge: Option<&Challenge>) -> Message {
        self.cseq += 1;
        let mut s = format!(
            "REGISTER sip:{REALM} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {src};branch=z9hG4bK{branch}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{REALM}>;tag=t{branch}\r\n\
             To: <sip:{user}@{REALM}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <{contact}>\r\n\
             Expires: {expires}\r\n",
            src = self.src,
            branch = format_args!("{}x{}", self.call_id.len(), self.cseq),
            user = self.user,
            call_id = self.call_id,
            cseq = self.cseq,
            contact = self.contact,
        );
        if let Some(ch) = challenge {
            // Only fails for a challenge without usable qop, which the
            // registrar never sends; a request without credentials then
            // draws another 401, which the simulation counts.
            if let Ok(a) = auth::respond(
                ch,
                "REGISTER",
                &format!("sip:{REALM}"),
                &self.user,
                &self.password,
                &format!("cn{}", self.cseq),
                1,
            ) {
                s += &format!("Authorization: {a}\r\n");
            }
        }
        s += "Content-Length: 0\r\n\r\n";
        Message::parse(Bytes::from(s), Framing::Datagram, &Limits::default())
            .expect("the device's own REGISTER parses")
    }

    /// A challenge from a 401, SHA-256 or MD5 at random among those offered.
    pub fn pick_challenge(resp: &Message, rng: &mut SimRng) -> Option<Challenge> {
        let all: Vec<Challenge> = resp
            .values(HeaderName::WwwAuthenticate)
            .filter_map(|v| Challenge::parse(v).ok())
            .collect();
        rng.pick(&all).cloned()
    }

    /// True when a 200 lists this device's contact.
    pub fn listed_in(&self, resp: &Message) -> bool {
        resp.values(HeaderName::Contact)
            .any(|v| v.contains(&format!("<{}>", self.contact)))
    }
}
