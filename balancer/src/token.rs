//! Signed flow tokens: what the balancer needs to route a later request,
//! carried by the request itself instead of a table (DESIGN §1, §4; RFC 5626
//! §5.2 flow tokens).
//!
//! A token names a flow (transport, remote address, connection id) and,
//! where it matters, the node that owns the dialog or registration. It is
//! written as the `sz` parameter of the balancer's own Record-Route, Path and
//! Via URIs, and is protected by HMAC-SHA256 under the cluster secret, so
//! any balancer instance holding the secret can check it and nobody else
//! can forge or alter one. Verification is constant-time.
//!
//! Wire form: lowercase hex of
//!
//! ```text
//!   version (1) = 1
//!   transport (1)   0 UDP, 1 TCP, 2 TLS
//!   family (1)      4 or 6, then the address (4 or 16) and the port (2, big-endian)
//!   conn (1 + 8)    0, or 1 and the connection id (big-endian)
//!   owner (1 + n)   length (0..=64) and the node name in UTF-8
//!   mac (16)        HMAC-SHA256(key, "sipzone-flow-token" || all of the above), first 16 octets
//! ```
//!
//! Tokens do not expire: a dialog or registration lives as long as its peers
//! keep it, and a connection id is meaningless once its connection closed
//! (the send then fails and the request is answered by its sender's
//! transaction timeout). Rotating the cluster secret invalidates every
//! token; the version octet leaves room for a key id when rotation without
//! that cut is needed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use sip::flow::{ConnId, Flow, Transport};

const VERSION: u8 = 1;
const MAC_LEN: usize = 16;
const MAX_OWNER: usize = 64;
const DOMAIN: &[u8] = b"sipzone-flow-token";
/// Longest token in hex (IPv6, a connection, the longest owner name).
pub const MAX_TOKEN_HEX: usize = 2 * (3 + 16 + 2 + 9 + 1 + MAX_OWNER + MAC_LEN);

/// The parameter name that carries a token in the balancer's URIs and Vias.
pub const PARAM: &str = "sz";

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowToken {
    /// The transport of the flow.
    pub transport: Transport,
    /// The remote address of the flow.
    pub remote: SocketAddr,
    /// The connection, for TCP/TLS flows.
    pub conn: Option<ConnId>,
    /// The node that owns the dialog or registration, when there is one.
    pub owner: Option<String>,
}

impl FlowToken {
    /// A token for `flow` with no owner.
    pub fn for_flow(flow: &Flow) -> FlowToken {
        FlowToken {
            transport: flow.transport,
            remote: flow.remote,
            conn: flow.conn,
            owner: None,
        }
    }

    /// The same token naming `owner`.
    pub fn owned_by(mut self, owner: &str) -> FlowToken {
        self.owner = Some(owner.to_string());
        self
    }

    /// The flow to send on.
    pub fn flow(&self) -> Flow {
        Flow {
            transport: self.transport,
            remote: self.remote,
            local: None,
            conn: self.conn,
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not hex, too short or too long.
    #[error("malformed token")]
    Malformed,
    /// The MAC does not match: forged, altered, or another secret.
    #[error("token signature does not verify")]
    BadMac,
    /// The MAC matches but the content does not decode (an unknown version).
    #[error("unknown token content")]
    Content,
    /// The cluster secret is shorter than [`TokenKey::MIN_SECRET_LEN`].
    #[error("cluster secret of {0} octets is too short")]
    WeakSecret(usize),
    /// The owner name is longer than 64 octets.
    #[error("owner name too long")]
    OwnerTooLong,
}

/// The key tokens are signed with, from the cluster secret.
#[derive(Clone)]
pub struct TokenKey {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// Shortest accepted cluster secret, in octets.
    pub const MIN_SECRET_LEN: usize = 16;

    /// A key from the cluster secret.
    pub fn new(secret: &[u8]) -> Result<TokenKey, TokenError> {
        if secret.len() < Self::MIN_SECRET_LEN {
            return Err(TokenError::WeakSecret(secret.len()));
        }
        let mac = Hmac::<Sha256>::new_from_slice(secret)
            .map_err(|_| TokenError::WeakSecret(secret.len()))?;
        Ok(TokenKey { mac })
    }

    /// Encodes and signs `t` (hex).
    pub fn seal(&self, t: &FlowToken) -> Result<String, TokenError> {
        let mut raw = Vec::with_capacity(48);
        raw.push(VERSION);
        raw.push(match t.transport {
            Transport::Udp => 0,
            Transport::Tcp => 1,
            Transport::Tls => 2,
        });
        match t.remote.ip().to_canonical() {
            IpAddr::V4(ip) => {
                raw.push(4);
                raw.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                raw.push(6);
                raw.extend_from_slice(&ip.octets());
            }
        }
        raw.extend_from_slice(&t.remote.port().to_be_bytes());
        match t.conn {
            Some(ConnId(id)) => {
                raw.push(1);
                raw.extend_from_slice(&id.to_be_bytes());
            }
            None => raw.push(0),
        }
        let owner = t.owner.as_deref().unwrap_or("");
        if owner.len() > MAX_OWNER {
            return Err(TokenError::OwnerTooLong);
        }
        raw.push(owner.len() as u8);
        raw.extend_from_slice(owner.as_bytes());
        let tag = self
            .mac
            .clone()
            .chain_update(DOMAIN)
            .chain_update(&raw)
            .finalize()
            .into_bytes();
        raw.extend_from_slice(&tag[..MAC_LEN]);
        Ok(hex::encode(raw))
    }

    /// Checks and decodes a token (the MAC first, in constant time; the
    /// content only once it verified).
    pub fn open(&self, text: &str) -> Result<FlowToken, TokenError> {
        if text.len() > MAX_TOKEN_HEX || !text.len().is_multiple_of(2) {
            return Err(TokenError::Malformed);
        }
        let raw = hex::decode(text).map_err(|_| TokenError::Malformed)?;
        if raw.len() <= MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, tag) = raw.split_at(raw.len() - MAC_LEN);
        self.mac
            .clone()
            .chain_update(DOMAIN)
            .chain_update(body)
            .verify_truncated_left(tag)
            .map_err(|_| TokenError::BadMac)?;
        decode(body).ok_or(TokenError::Content)
    }
}

/// Decodes a verified token body.
fn decode(b: &[u8]) -> Option<FlowToken> {
    let mut r = Reader(b);
    if r.u8()? != VERSION {
        return None;
    }
    let transport = match r.u8()? {
        0 => Transport::Udp,
        1 => Transport::Tcp,
        2 => Transport::Tls,
        _ => return None,
    };
    let ip = match r.u8()? {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(r.take(4)?).ok()?)),
        6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(r.take(16)?).ok()?)),
        _ => return None,
    };
    let port = u16::from_be_bytes(r.take(2)?.try_into().ok()?);
    let conn = match r.u8()? {
        0 => None,
        1 => Some(ConnId(u64::from_be_bytes(r.take(8)?.try_into().ok()?))),
        _ => return None,
    };
    let n = r.u8()? as usize;
    let owner = std::str::from_utf8(r.take(n)?).ok()?;
    if !r.0.is_empty() {
        return None;
    }
    Some(FlowToken {
        transport,
        remote: SocketAddr::new(ip, port),
        conn,
        owner: (!owner.is_empty()).then(|| owner.to_string()),
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn samples() -> Vec<FlowToken> {
        vec![
            FlowToken {
                transport: Transport::Udp,
                remote: "192.0.2.10:5062".parse().unwrap(),
                conn: None,
                owner: None,
            },
            FlowToken {
                transport: Transport::Tcp,
                remote: "127.0.0.1:40000".parse().unwrap(),
                conn: Some(ConnId(77)),
                owner: Some("a1".into()),
            },
            FlowToken {
                transport: Transport::Tls,
                remote: "[2001:db8::1]:5061".parse().unwrap(),
                conn: Some(ConnId(u64::MAX)),
                owner: Some("b2-zone-b".into()),
            },
        ]
    }

    #[test]
    fn round_trips() {
        let k = key();
        for t in samples() {
            let s = k.seal(&t).unwrap();
            assert!(s.len() <= MAX_TOKEN_HEX);
            assert!(s.bytes().all(|b| b.is_ascii_hexdigit()), "usable in a URI");
            assert_eq!(k.open(&s), Ok(t));
        }
    }

    #[test]
    fn every_altered_octet_is_refused() {
        let k = key();
        for t in samples() {
            let s = k.seal(&t).unwrap();
            let raw = hex::decode(&s).unwrap();
            for i in 0..raw.len() {
                let mut bad = raw.clone();
                bad[i] ^= 0x01;
                assert_eq!(
                    k.open(&hex::encode(&bad)),
                    Err(TokenError::BadMac),
                    "octet {i}"
                );
            }
        }
    }

    #[test]
    fn forged_truncated_and_foreign_tokens_are_refused() {
        let k = key();
        let t = &samples()[1];
        let s = k.seal(t).unwrap();
        // another cluster's secret
        let other = TokenKey::new(b"another-secret-of-32-octets-long").unwrap();
        assert_eq!(other.open(&s), Err(TokenError::BadMac));
        // cut, extended, not hex, empty, huge
        assert_eq!(k.open(&s[..s.len() - 2]), Err(TokenError::BadMac));
        assert_eq!(k.open(&format!("{s}00")), Err(TokenError::BadMac));
        assert_eq!(k.open(&s[..s.len() - 1]), Err(TokenError::Malformed));
        assert_eq!(k.open("zz"), Err(TokenError::Malformed));
        assert_eq!(k.open(""), Err(TokenError::Malformed));
        assert_eq!(
            k.open(&"ab".repeat(MAX_TOKEN_HEX)),
            Err(TokenError::Malformed)
        );
        // a token built by hand with a zero MAC
        let mut raw = hex::decode(&s).unwrap();
        let n = raw.len();
        raw[n - MAC_LEN..].fill(0);
        assert_eq!(k.open(&hex::encode(raw)), Err(TokenError::BadMac));
    }

    #[test]
    fn weak_secrets_and_long_owners_are_refused() {
        assert_eq!(
            TokenKey::new(b"short").err(),
            Some(TokenError::WeakSecret(5))
        );
        let t = FlowToken {
            owner: Some("x".repeat(65)),
            ..samples()[0].clone()
        };
        assert_eq!(key().seal(&t), Err(TokenError::OwnerTooLong));
    }
}
