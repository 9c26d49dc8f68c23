//! Transaction keys: how a message finds its transaction (RFC 3261 §17.1.3,
//! §17.2.3), with the RFC 2543 fallback for requests whose branch lacks the
//! `z9hG4bK` magic cookie.

use std::fmt;

use crate::msg::{Message, Method};

use super::TxnError;

/// Identifies one transaction.
///
/// ACK is folded onto INVITE in server keys (an ACK for a non-2xx final
/// belongs to the INVITE transaction, §17.2.3); CANCEL keeps its own method,
/// so it has its own transaction and finds the INVITE it cancels through
/// [`TxnKey::with_method`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TxnKey {
    /// A client transaction (§17.1.3): the top Via branch of the request
    /// and the CSeq method.
    Client {
        /// The branch the TU put in the top Via.
        branch: Box<str>,
        /// The CSeq method of the request.
        method: Method,
    },
    /// A server transaction for an RFC 3261 request (§17.2.3): branch,
    /// sent-by of the top Via and the method (INVITE for ACK).
    Server {
        /// The top Via branch (with the magic cookie).
        branch: Box<str>,
        /// The top Via sent-by, host lowercased, `host[:port]` as written.
        sent_by: Box<str>,
        /// The request method, INVITE for ACK.
        method: Method,
    },
    /// A server transaction for a request without the magic cookie
    /// (RFC 2543 matching, §17.2.3).
    Rfc2543(Box<Rfc2543Key>),
}

/// The RFC 2543 matching fields (§17.2.3): Request-URI, From tag, Call-ID,
/// CSeq and the top Via. The To tag is left out: the ACK for a non-2xx final
/// carries the tag the server added, the INVITE did not.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rfc2543Key {
    /// The Request-URI as written.
    pub request_uri: Box<str>,
    /// The From tag, if any (RFC 2543 did not require one).
    pub from_tag: Option<Box<str>>,
    /// The Call-ID.
    pub call_id: Box<str>,
    /// The CSeq number.
    pub cseq: u32,
    /// The request method, INVITE for ACK.
    pub method: Method,
    /// The whole topmost Via value as written.
    pub top_via: Box<str>,
}

impl TxnKey {
    /// The client transaction key of a request the TU sends, or of a
    /// response received for one (§17.1.3): top Via branch + CSeq method.
    pub fn client(msg: &Message) -> Result<TxnKey, TxnError> {
        let via = msg.top_via()?;
        let branch = via
            .branch()
            .filter(|b| !b.is_empty())
            .ok_or(TxnError::NoBranch)?;
        Ok(TxnKey::Client {
            branch: branch.into(),
            method: msg.cseq()?.method,
        })
    }

    /// The server transaction key of a received request (§17.2.3).
    pub fn server(msg: &Message) -> Result<TxnKey, TxnError> {
        let method = match msg.method().ok_or(TxnError::NotRequest)? {
            Method::Ack => Method::Invite,
            m => m,
        };
        let via = msg.top_via()?;
        if via.is_rfc3261() {
            let branch = via.branch().unwrap_or_default();
            let sent_by = match via.port {
                Some(p) => format!("{}:{p}", via.host),
                None => via.host.to_string(),
            };
            return Ok(TxnKey::Server {
                branch: branch.into(),
                sent_by: sent_by.to_ascii_lowercase().into(),
                method,
            });
        }
        let top_via = msg
            .values(crate::msg::HeaderName::Via)
            .next()
            .unwrap_or_default();
        Ok(TxnKey::Rfc2543(Box::new(Rfc2543Key {
            request_uri: msg.request_uri_str().ok_or(TxnError::NotRequest)?.into(),
            from_tag: msg.from()?.tag().map(Into::into),
            call_id: msg.call_id().unwrap_or_default().into(),
            cseq: msg.cseq()?.seq,
            method,
            top_via: top_via.into(),
        })))
    }

    /// The same key with another method: a CANCEL's key with INVITE names
    /// the INVITE transaction it cancels (§9.2), and a client INVITE key
    /// with CANCEL names the CANCEL sent for it.
    pub fn with_method(&self, method: Method) -> TxnKey {
        match self {
            TxnKey::Client { branch, .. } => TxnKey::Client {
                branch: branch.clone(),
                method,
            },
            TxnKey::Server {
                branch, sent_by, ..
            } => TxnKey::Server {
                branch: branch.clone(),
                sent_by: sent_by.clone(),
                method,
            },
            TxnKey::Rfc2543(k) => TxnKey::Rfc2543(Box::new(Rfc2543Key {
                method,
                ..(**k).clone()
            })),
        }
    }

    /// The method of the transaction (INVITE for an ACK's key).
    pub fn method(&self) -> &Method {
        match self {
            TxnKey::Client { method, .. } | TxnKey::Server { method, .. } => method,
            TxnKey::Rfc2543(k) => &k.method,
        }
    }

    /// True for client transaction keys.
    pub fn is_client(&self) -> bool {
        matches!(self, TxnKey::Client { .. })
    }
}

impl fmt::Display for TxnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxnKey::Client { branch, method } => write!(f, "client {method} {branch}"),
            TxnKey::Server {
                branch,
                sent_by,
                method,
            } => write!(f, "server {method} {branch} {sent_by}"),
            TxnKey::Rfc2543(k) => write!(
                f,
                "server-2543 {} {} {} {}",
                k.method, k.cseq, k.call_id, k.request_uri
            ),
        }
    }
}

/// A fresh RFC 3261 branch from injected random bytes: `z9hG4bK` + 16 hex
/// digits (§8.1.1.7). The caller supplies the randomness so cores stay
/// deterministic.
pub fn new_branch(rng_bytes: [u8; 8]) -> String {
    format!("{}{}", crate::msg::BRANCH_COOKIE, hex::encode(rng_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Framing, Limits};
    use bytes::Bytes;

    fn parse(s: &str) -> Message {
        Message::parse(
            Bytes::from(s.to_owned()),
            Framing::Datagram,
            &Limits::default(),
        )
        .unwrap()
    }

    const REQ: &str = "INVITE sip:bob@b.example SIP/2.0\r\n\
Via: SIP/2.0/UDP A.Example:5070;branch=z9hG4bKabc\r\n\
From: <sip:a@a.example>;tag=1\r\n\
To: <sip:bob@b.example>\r\n\
Call-ID: c1\r\n\
CSeq: 7 INVITE\r\n\
Max-Forwards: 70\r\n\r\n";

    #[test]
    fn server_keys_fold_ack_and_normalise_sent_by() {
        let k = TxnKey::server(&parse(REQ)).unwrap();
        assert_eq!(
            k,
            TxnKey::Server {
                branch: "z9hG4bKabc".into(),
                sent_by: "a.example:5070".into(),
                method: Method::Invite
            }
        );
        let ack = REQ.replace("INVITE", "ACK");
        assert_eq!(TxnKey::server(&parse(&ack)).unwrap(), k);
        let cancel = REQ.replace("INVITE", "CANCEL");
        let ck = TxnKey::server(&parse(&cancel)).unwrap();
        assert_ne!(ck, k);
        assert_eq!(ck.with_method(Method::Invite), k);
        let other_port = REQ.replace(":5070", ":5071");
        assert_ne!(TxnKey::server(&parse(&other_port)).unwrap(), k);
    }

    #[test]
    fn rfc2543_keys() {
        let old = REQ.replace(";branch=z9hG4bKabc", ";branch=1234");
        let k = TxnKey::server(&parse(&old)).unwrap();
        assert!(matches!(&k, TxnKey::Rfc2543(r) if r.cseq == 7 && &*r.call_id == "c1"));
        let ack = old
            .replace("INVITE", "ACK")
            .replace("To: <sip:bob@b.example>", "To: <sip:bob@b.example>;tag=x");
        assert_eq!(TxnKey::server(&parse(&ack)).unwrap(), k);
        let none = REQ.replace(";branch=z9hG4bKabc", "");
        assert!(matches!(
            TxnKey::server(&parse(&none)).unwrap(),
            TxnKey::Rfc2543(_)
        ));
        assert_eq!(TxnKey::client(&parse(&none)), Err(TxnError::NoBranch));
    }

    #[test]
    fn branches() {
        assert_eq!(
            new_branch([0, 1, 2, 3, 0xa, 0xb, 0xc, 0xff]),
            "z9hG4bK000102030a0b0cff"
        );
    }
}
